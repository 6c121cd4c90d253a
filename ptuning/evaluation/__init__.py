"""Evaluation of a prefix-tuned model: metrics over generated text."""
