"""Training and generation features of a batch of rows, through the model family's prompt template.

The template (:class:`~ptuning.models.base.PromptTemplate`) decides the special tokens, the chat layout and
the budgets of its original P-Tuning v2 script; the same template serves evaluation, chat and serving, so a
row is cut the same way everywhere: whole oldest turns first, the current query's turn always kept, the
query itself cut only if it alone does not fit. Rows are not padded here; the collator pads each batch to
its longest row.

Functions take a ``datasets`` batch: a dict of column name -> list of values, with the column names of
the :class:`~ptuning.data.config.DataConfig`.
"""

from __future__ import annotations

import json
from typing import Any

from ..models.base import IGNORE_INDEX, Conversation, PromptTemplate
from .config import DataConfig


def conversations(examples: dict[str, list[Any]], cfg: DataConfig) -> list[Conversation]:
    """Each row's query, history and ``source_prefix`` (and for chat-format rows system message, tool turns
    and tools) as a family-neutral :class:`Conversation`; rows of data without a history column (ADGEN) are
    ``plain`` (prompt -> response, no chat template)."""
    queries = examples[cfg.prompt_column]
    if cfg.conversation_column:
        return [
            Conversation(query=query, history=[tuple(turn) for turn in history], system=system or None,
                         source_prefix=cfg.source_prefix, extra=json.loads(extra),
                         tools=json.loads(tools) if tools else None)
            for query, history, system, extra, tools in zip(
                queries, examples["history"], examples["system"], examples["extra"], examples["tools"], strict=True)
        ]
    histories = examples[cfg.history_column] if cfg.history_column else [None] * len(queries)
    plain = not cfg.history_column
    return [
        Conversation(query=query, history=[tuple(turn) for turn in (history or ())], source_prefix=cfg.source_prefix,
                     plain=plain)
        for query, history in zip(queries, histories, strict=True)
    ]


def render_prompts(examples: dict[str, list[Any]], cfg: DataConfig, template: PromptTemplate) -> list[str]:
    """The prompt text of each row (for prediction files)."""
    return [template.render_text(c) for c in conversations(examples, cfg)]


def preprocess_train(
    examples: dict[str, list[Any]], template: PromptTemplate, cfg: DataConfig
) -> dict[str, list]:
    """Training features of a batch of rows.

    The labels are the template's: every answer token and the token that ends the answer are targets, also
    when the tokenizer's pad id is its end token (SmolLM2, GLM-4 and most Llama / Qwen set-ups: pad = eos =
    ``<|im_end|>`` / ``<|endoftext|>``), so a tuned prefix learns to stop. Rows are not padded here; the
    collator pads and masks the padding by position. Only a template whose original script did so
    (``PromptTemplate.ignores_pad_id_in_answers``: ChatGLM-6B) turns a pad token written inside an answer's
    text into -100 with ``data.ignore_pad_token_for_loss``, never the row's last target (its end token).

    Returns:
        ``input_ids`` and ``labels``: one unpadded list per row, both of the row's length; ``dropped_turns``
        and ``truncated_tokens``: what each row lost to fit ``max_source_length``; ``truncated_answer_tokens``:
        response tokens cut to fit ``max_target_length``.
    """
    masks_pad = cfg.ignore_pad_token_for_loss and template.ignores_pad_id_in_answers
    features: dict[str, list] = {"input_ids": [], "labels": [], "dropped_turns": [], "truncated_tokens": [],
                                 "truncated_answer_tokens": []}
    for conversation, response in zip(conversations(examples, cfg), examples[cfg.response_column], strict=True):
        row = template.train_row(conversation, response, cfg.max_source_length, cfg.max_target_length)
        labels = ignore_pad_in_answer(row.labels, template.pad_token_id) if masks_pad else row.labels
        features["input_ids"].append(row.input_ids)
        features["labels"].append(labels)
        features["dropped_turns"].append(row.dropped_turns)
        features["truncated_tokens"].append(row.truncated_tokens)
        features["truncated_answer_tokens"].append(row.truncated_answer_tokens)
    return features


def ignore_pad_in_answer(labels: list[int], pad_id: int) -> list[int]:
    """``labels`` with every target equal to ``pad_id`` set to -100 except the last target (the row's end
    token): the original ChatGLM-6B script's ``ignore_pad_token_for_loss`` on a row without its padding (its
    pad id, 3, is never its end token, so this is exactly what it computed)."""
    last = max((i for i, label in enumerate(labels) if label != IGNORE_INDEX), default=-1)
    return [IGNORE_INDEX if label == pad_id and i != last else label for i, label in enumerate(labels)]


def preprocess_eval(examples: dict[str, list[Any]], template: PromptTemplate, cfg: DataConfig) -> dict[str, list]:
    """Generation features of a batch of rows.

    Returns:
        ``input_ids``: unpadded prompt ids (ending where the answer starts); ``reference``: the response
        text; ``prompt``: the rendered prompt text (for prediction files); ``dropped_turns`` and
        ``truncated_tokens``: what each prompt lost to fit.
    """
    budget = template.generation_budget(cfg.max_source_length)
    features: dict[str, list] = {"prompt": [], "input_ids": [], "reference": list(examples[cfg.response_column]),
                                 "dropped_turns": [], "truncated_tokens": []}
    for conversation in conversations(examples, cfg):
        prompt = template.prompt(conversation, budget)
        features["prompt"].append(template.render_text(conversation))
        features["input_ids"].append(prompt.ids)
        features["dropped_turns"].append(prompt.dropped_turns)
        features["truncated_tokens"].append(prompt.truncated_tokens)
    return features
