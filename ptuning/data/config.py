"""Configuration of the data pipeline: which files, which columns, how long, how strict."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    """Where the data is and how rows become model features.

    Attributes:
        train_file, validation_file, test_file: local ``.json`` / ``.jsonl`` / ``.csv`` files (None: no
            such split).
        prompt_column, response_column: column names of the query and the answer.
        history_column: column of earlier ``[query, response]`` turns (chat data), or None.
        conversation_column: column of chat-format rows instead of prompt / response / history: a list of
            ``{"role", "content"}`` messages ending with the assistant's answer (ChatGLM3's ``finetune_demo``
            format, ``conversations``; see :func:`ptuning.models.base.conversation_from_messages`), or None.
        tools_column: with ``conversation_column``, the column of each row's tool definitions (``tools``; a
            row without it offers none), or None.
        source_prefix: text put in front of every prompt (after the history template).
        max_source_length: prompt budget: training keeps ``max_source_length - 1`` prompt tokens,
            evaluation ``max_source_length - 2``, as the original P-Tuning v2 script.
        max_target_length: response budget: training keeps ``max_target_length - 2`` response tokens.
        max_train_samples, max_eval_samples: keep only the first N rows of the train / eval splits.
        ignore_pad_token_for_loss: the padding the collator adds is labelled -100 (ignored by the loss)
            rather than with the pad id; it never touches a row's end token, also when its id is the pad id
            (ChatGLM-6B's template also drops a pad token written inside an answer, as its original).
        preprocessing_num_workers: processes for tokenization (None: in this process).
        skip_bad_rows: skip malformed rows (counted and reported once) instead of stopping at the first.
        overwrite_cache: recompute the cached features instead of reusing them.
        cache_dir: where normalized files and cached features go (None: the ``datasets`` cache).
        packing: train on packed rows: whole rows concatenated into sequences of ``pack_length`` tokens, each
            row seeing the prefix and its own tokens only (see :mod:`ptuning.data.packing`); then
            ``train.per_device_batch_size`` counts packed sequences, not rows. Evaluation stays unpacked.
        pack_length: tokens of a packed sequence (at least the longest training row); used with ``packing``.
    """

    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    prompt_column: str = "content"
    response_column: str = "summary"
    history_column: str | None = None
    conversation_column: str | None = None
    tools_column: str | None = None
    source_prefix: str = ""
    max_source_length: int = 64
    max_target_length: int = 64
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    ignore_pad_token_for_loss: bool = True
    preprocessing_num_workers: int | None = None
    skip_bad_rows: bool = False
    overwrite_cache: bool = False
    cache_dir: str | None = None
    packing: bool = False
    pack_length: int = 1024

    def __post_init__(self) -> None:
        # evaluation keeps max_source_length - 2 prompt tokens, training max_target_length - 2 response ones
        if self.max_source_length < 2:
            raise ValueError(f"max_source_length must be >= 2, got {self.max_source_length}")
        if self.max_target_length < 2:
            raise ValueError(f"max_target_length must be >= 2, got {self.max_target_length}")
        for name in ("max_train_samples", "max_eval_samples", "preprocessing_num_workers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer or None, got {value}")
        if self.prompt_column == self.response_column:
            raise ValueError(f"prompt_column and response_column are both {self.prompt_column!r}")
        if self.tools_column is not None and self.conversation_column is None:
            raise ValueError("tools_column needs conversation_column (tools belong to chat-format rows)")
        if self.pack_length < 2:
            raise ValueError(f"pack_length must be >= 2, got {self.pack_length}")
        if self.packing and not self.ignore_pad_token_for_loss:
            raise ValueError(
                "packing needs data.ignore_pad_token_for_loss=true (the default): packed rows have no pads of their "
                "own to score; set it, or turn data.packing off"
            )
        if self.conversation_column is not None and self.history_column is not None:
            raise ValueError("history_column and conversation_column exclude each other (a conversation holds its history)")

    def file_for(self, split: str) -> str:
        """The file of ``split`` (``train``, ``validation`` or ``test``).

        Raises:
            ValueError: unknown split, or no file configured for it.
        """
        files = {"train": self.train_file, "validation": self.validation_file, "test": self.test_file}
        if split not in files:
            raise ValueError(f"unknown split {split!r}: expected one of {sorted(files)}")
        if files[split] is None:
            raise ValueError(f"no {split}_file configured")
        return files[split]
