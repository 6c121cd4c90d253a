"""Packed training rows: several rows concatenated into one sequence of ``data.pack_length`` tokens.

Padded batches spend much of every step on pad tokens when rows differ in length; packing fills a fixed
number of token slots with whole rows instead. Every row keeps exactly what it sees unpacked: the prefix and
its own tokens (never a neighbour's), its own positions from 0, and its own targets; so the summed loss of a
pack is the summed loss of its rows.

* :func:`pack_rows` decides once per training set which rows share a pack (best fit over the rows in a
  seeded order): the same lengths, ``pack_length`` and seed always give the same packs, so the batch plan
  indexes packs as it indexes rows and a run resumes from its step counter alone.
* :class:`PackedRows` presents the packs as rows (``input_ids``, ``labels``, ``sequence_ids``); the first
  label of every row is hidden (-100): unpacked it predicts nothing, packed it would be predicted from the
  previous row's last token.
* :class:`~ptuning.data.collate.TrainingCollator` pads packs to ``pack_length`` (a static shape) and passes
  ``sequence_ids`` ``[B, L]`` on; the model takes it as an input (see :mod:`ptuning.models.base`): positions
  that restart per row (ChatGLM-6B: each row's 2D positions), and attention one row per batch row
  (:class:`~ptuning.models.packed.PackedLayout`) with the mask each row has alone, so a pack costs no attention
  over pairs of tokens of different rows; the linears and the MLP run on the packs without padding.

``sequence_ids`` numbers the rows of a pack 0, 1, ...; the padding after the last row is ``-1``.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch

from ..models.packed import PADDING_SEQUENCE
from .features import IGNORE_INDEX

__all__ = ["PADDING_SEQUENCE", "PackedRows", "pack_rows"]


def pack_rows(lengths: Sequence[int], pack_length: int, seed: int = 0) -> list[list[int]]:
    """Which rows share a pack: best fit in a seeded random order.

    Each row, in the order of a ``torch.randperm`` seeded with ``seed``, goes into the open pack with the
    least room that still takes it whole, or a new pack. Rows keep that order inside a pack.

    Args:
        lengths: tokens of every row.
        pack_length: tokens a pack holds.
        seed: the order's seed.

    Returns:
        The packs, each a list of row indices; every row is in exactly one.

    Raises:
        ValueError: a row longer than ``pack_length`` (names the row and both lengths).
    """
    if pack_length < 1:
        raise ValueError(f"pack_length must be >= 1, got {pack_length}")
    longest = max(range(len(lengths)), key=lambda i: lengths[i], default=None)
    if longest is not None and lengths[longest] > pack_length:
        raise ValueError(
            f"row {longest} has {lengths[longest]} tokens, more than data.pack_length={pack_length}: raise "
            "data.pack_length to at least the longest row"
        )
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
    packs: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, pack index), sorted
    for row in order:
        need = lengths[row]
        at = bisect.bisect_left(room, (need, -1))
        if at == len(room):
            packs.append([row])
            free, index = pack_length - need, len(packs) - 1
        else:
            free, index = room.pop(at)
            packs[index].append(row)
            free -= need
        if free > 0:
            bisect.insort(room, (free, index))
    return packs


class PackedRows:
    """Packs of a featurized training set, read as rows.

    ``len`` and ``[i]``: pack ``i`` as one row (``input_ids``, ``labels``, ``sequence_ids``, each as long as the
    pack's rows together), as the training loop reads the rows of a ``datasets.Dataset``.

    Args:
        rows: the featurized rows (``input_ids`` and ``labels`` per row; ``rows[i]`` reads row ``i``).
        lengths: tokens of every row.
        pack_length: tokens a pack holds.
        seed: the seed of :func:`pack_rows`.
    """

    def __init__(self, rows, lengths: Sequence[int], pack_length: int, seed: int = 0):
        self.rows, self.lengths, self.pack_length = rows, list(lengths), pack_length
        self.packs = pack_rows(self.lengths, pack_length, seed)

    @classmethod
    def from_rows(cls, rows, pack_length: int, seed: int = 0) -> PackedRows:
        """Packs a ``datasets.Dataset`` of training features (see :func:`pack_rows`)."""
        return cls(rows, [len(ids) for ids in rows["input_ids"]], pack_length, seed)

    def fill(self) -> float:
        """Share of the packs' token slots that hold row tokens (the rest is padding)."""
        return sum(self.lengths) / max(len(self.packs) * self.pack_length, 1)

    def per_pack(self, values: Sequence[int]) -> list[int]:
        """Per-row counts (e.g. each row's targets) summed over each pack's rows."""
        return [sum(values[i] for i in pack) for pack in self.packs]

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, key: int) -> dict[str, list[int]]:
        input_ids: list[int] = []
        labels: list[int] = []
        sequence_ids: list[int] = []
        for number, index in enumerate(self.packs[key]):
            row = self.rows[index]
            row_labels = list(row["labels"])
            row_labels[0] = IGNORE_INDEX  # predicted from the previous row's last token: never a target
            input_ids += row["input_ids"]
            labels += row_labels
            sequence_ids += [number] * len(row["input_ids"])
        return {"input_ids": input_ids, "labels": labels, "sequence_ids": sequence_ids}
