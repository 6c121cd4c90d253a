"""Training and generation features, built by the rules of the original P-Tuning v2 ``main.py``.

Training row (``L_p`` prompt tokens, ``L_r`` response tokens)::

    input_ids = prompt[:max_source_length - 1] + [gMASK, <sop>] + response[:max_target_length - 2] + [<eop>]
    labels    = [-100] * (index of <sop>)      + [<sop>]        + response ids                   + [<eop>]

so ``<sop>`` is a target (predicted at the ``[gMASK]`` position). Rows are not padded here; the
collator pads each batch to its longest row.

Generation row: ``input_ids = prompt[:max_source_length - 2] + [gMASK, <sop>]`` (the original passed
the prompt to the tokenizer with ``max_length=max_source_length`` and truncation, which keeps two
fewer prompt tokens than training) and the response text as ``reference`` for the metrics.

Functions take a ``datasets`` batch: a dict of column name -> list of values, with the column names of
the :class:`~ptuning.data.config.DataConfig`.
"""

from __future__ import annotations

from typing import Any

from .config import DataConfig
from .template import build_prompt

IGNORE_INDEX = -100


def render_prompts(examples: dict[str, list[Any]], cfg: DataConfig) -> list[str]:
    """``source_prefix`` + the chat template of each row's query and history."""
    queries = examples[cfg.prompt_column]
    histories = examples[cfg.history_column] if cfg.history_column else [None] * len(queries)
    return [
        cfg.source_prefix + build_prompt(query, history)
        for query, history in zip(queries, histories, strict=True)
    ]


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    # tokenizer.encode(text, add_special_tokens=False), without its per-call padding and
    # truncation bookkeeping (it is most of the preprocessing time)
    return [tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text)) for text in texts]


def preprocess_train(
    examples: dict[str, list[Any]], tokenizer, cfg: DataConfig
) -> dict[str, list[list[int]]]:
    """Training features of a batch of rows.

    Returns:
        ``input_ids`` and ``labels``: one unpadded list per row, both of the row's length.
    """
    prompts = _encode(tokenizer, render_prompts(examples, cfg))
    responses = _encode(tokenizer, examples[cfg.response_column])
    bos, pad = tokenizer.bos_token_id, tokenizer.pad_token_id  # looked up once: not free on HF tokenizers
    features: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    for prompt, response in zip(prompts, responses, strict=True):
        input_ids = tokenizer.build_inputs_with_special_tokens(
            prompt[: cfg.max_source_length - 1], response[: cfg.max_target_length - 2]
        )
        context_length = input_ids.index(bos)
        labels = [IGNORE_INDEX] * context_length + input_ids[context_length:]
        if cfg.ignore_pad_token_for_loss:
            # The original padded first and then turned every pad id into -100; here the pads come in
            # the collator, and only a literal "<pad>" in the text can still produce that id.
            labels = [IGNORE_INDEX if label == pad else label for label in labels]
        features["input_ids"].append(input_ids)
        features["labels"].append(labels)
    return features


def preprocess_eval(examples: dict[str, list[Any]], tokenizer, cfg: DataConfig) -> dict[str, list[Any]]:
    """Generation features of a batch of rows.

    Returns:
        ``input_ids``: unpadded prompt ids ending in ``[gMASK] <sop>``; ``reference``: the response text;
        ``prompt``: the rendered prompt text (for prediction files).
    """
    texts = render_prompts(examples, cfg)
    prompts = _encode(tokenizer, texts)
    return {
        "prompt": texts,
        "input_ids": [
            tokenizer.build_inputs_with_special_tokens(prompt[: cfg.max_source_length - 2])
            for prompt in prompts
        ],
        "reference": list(examples[cfg.response_column]),
    }
