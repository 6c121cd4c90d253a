"""Serving trained prefixes: an OpenAI-compatible HTTP API and a chat page, many prefixes batched on one
frozen backbone.

* :mod:`.engine`: the :class:`PrefixBank` of named prefixes and the server's decode loop
  (:func:`serving_decoder`, a :class:`ptuning.generation.Decoder`);
* :mod:`.scheduler`: the decode thread, answer text (:class:`ptuning.generation.Detokenizer`) and stop strings;
* :mod:`.service`: model names, prompts through the family's template, requests in flight;
* :mod:`.protocol`: OpenAI's request bodies and error body;
* :mod:`.app`: the FastAPI routes; :mod:`.web`: the Gradio page; :mod:`.cli`: ``ptuning-serve``.

The package itself imports nothing: ``python -m ptuning.serve`` imports it before its ``__main__``, which answers
Ctrl-C during the (seconds of) library imports with one line.
"""
