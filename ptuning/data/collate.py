"""Batching with dynamic padding: each batch is padded to its own longest row.

* Training batches are RIGHT-padded, as the original P-Tuning v2 script pads (it padded every row to
  ``max_source_length + max_target_length``; the longest row of the batch is enough, because right
  pads come after ``<eop>``, are never attended to by a real token in the causal part, and carry
  label -100). They hold ``input_ids`` and ``labels`` only: the model builds its mask and positions
  from the ids.
* Packed training rows (:mod:`ptuning.data.packing`) carry ``sequence_ids``; a batch of them is padded to
  ``pack_length`` (one static shape for every step), the padding's ``sequence_ids`` being -1.
* Generation batches are LEFT-padded, so that every prompt ends at the last column where decoding
  continues. They hold ``input_ids`` and the padding mask ``attention_mask`` ``[B, S]`` (1 = real
  token), from which the model builds the original tokenizer's mask and positions.

:class:`LengthGroupedSampler` optionally orders rows so that a batch holds rows of similar lengths,
which keeps the padding small.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Sampler

from ..models.packed import PADDING_SEQUENCE
from .config import DataConfig
from .features import IGNORE_INDEX


@dataclass
class TrainingCollator:
    """Right-pads training rows to the batch's longest, and packed rows to ``pack_length``.

    Attributes:
        pad_token_id: fills ``input_ids``.
        label_pad_id: fills ``labels``: -100 (ignored by the loss), or the pad id when
            ``ignore_pad_token_for_loss`` is off, as the original.
        pack_length: the width of a batch of packed rows (rows with ``sequence_ids``); None: their longest.
    """

    pad_token_id: int
    label_pad_id: int = IGNORE_INDEX
    pack_length: int | None = None

    @classmethod
    def from_config(cls, tokenizer, cfg: DataConfig) -> TrainingCollator:
        pad = tokenizer.pad_token_id
        return cls(pad_token_id=pad, label_pad_id=IGNORE_INDEX if cfg.ignore_pad_token_for_loss else pad,
                   pack_length=cfg.pack_length if cfg.packing else None)

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Rows with ``input_ids`` and ``labels`` (and ``sequence_ids`` when packed) -> the same ``[B, S]``
        int64 tensors."""
        longest = max(len(row["input_ids"]) for row in rows)
        packed = "sequence_ids" in rows[0]
        if packed and self.pack_length is not None:
            if longest > self.pack_length:
                raise ValueError(f"a packed row of {longest} tokens is longer than pack_length={self.pack_length}")
            longest = self.pack_length
        # on the host, whatever the default device (the loop moves batches to the model's device)
        input_ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long, device="cpu")
        labels = torch.full((len(rows), longest), self.label_pad_id, dtype=torch.long, device="cpu")
        sequence_ids = (torch.full((len(rows), longest), PADDING_SEQUENCE, dtype=torch.long, device="cpu")
                        if packed else None)
        for i, row in enumerate(rows):
            length = len(row["input_ids"])
            input_ids[i, :length] = torch.as_tensor(row["input_ids"], device="cpu")
            labels[i, :length] = torch.as_tensor(row["labels"], device="cpu")
            if sequence_ids is not None:
                sequence_ids[i, :length] = torch.as_tensor(row["sequence_ids"], device="cpu")
        batch = {"input_ids": input_ids, "labels": labels}
        if sequence_ids is not None:
            batch["sequence_ids"] = sequence_ids
        return batch


@dataclass
class GenerationCollator:
    """Left-pads prompt rows to the batch's longest.

    Attributes:
        pad_token_id: fills ``input_ids``.
    """

    pad_token_id: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> GenerationCollator:
        return cls(pad_token_id=tokenizer.pad_token_id)

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Rows with ``input_ids`` (and optionally ``reference``) -> a batch.

        Returns:
            ``input_ids`` ``[B, S]`` int64, ``attention_mask`` ``[B, S]`` int64 (1 = real token), and
            ``reference`` (list of B strings) when the rows have it.
        """
        longest = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long, device="cpu")
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.long, device="cpu")
        for i, row in enumerate(rows):
            start = longest - len(row["input_ids"])
            input_ids[i, start:] = torch.as_tensor(row["input_ids"], device="cpu")
            attention_mask[i, start:] = 1
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "reference" in rows[0]:
            batch["reference"] = [row["reference"] for row in rows]
        return batch


class LengthGroupedSampler(Sampler[int]):
    """A random order of row indices in which neighbours have similar lengths.

    Each epoch the indices are shuffled, cut into mega-batches of ``batch_size * mega_batch_mult`` and
    each mega-batch is sorted longest first; the mega-batch holding the longest row goes first, so a
    batch that does not fit in memory fails on the first step rather than hours in.

    Args:
        lengths: length of every row, e.g. ``[len(ids) for ids in dataset["input_ids"]]``.
        batch_size: the per-device batch size.
        mega_batch_mult: mega-batch size in batches (larger: tighter grouping, less randomness).
        seed: base seed; epoch ``e`` uses ``seed + e`` (see :meth:`set_epoch`).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, mega_batch_mult: int = 50, seed: int = 0):
        if batch_size < 1 or mega_batch_mult < 1:
            raise ValueError(
                f"batch_size and mega_batch_mult must be >= 1, got {batch_size}, {mega_batch_mult}"
            )
        self.lengths = list(lengths)
        self.mega_batch_size = batch_size * mega_batch_mult
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use another order for ``epoch`` (the same for every process given the same seed)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        if not self.lengths:
            return iter(())
        generator = torch.Generator(device="cpu").manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator, device="cpu").tolist()
        megas = [
            sorted(order[start : start + self.mega_batch_size], key=lambda i: -self.lengths[i])
            for start in range(0, len(order), self.mega_batch_size)
        ]
        longest = max(range(len(megas)), key=lambda m: self.lengths[megas[m][0]])
        megas[0], megas[longest] = megas[longest], megas[0]
        return iter([index for mega in megas for index in mega])
