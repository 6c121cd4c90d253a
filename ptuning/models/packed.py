"""What a model reads from packed training rows (see :mod:`ptuning.data.packing`): ``sequence_ids`` ``[B, L]``
numbers the rows of each pack 0, 1, ... and the padding after them :data:`PADDING_SEQUENCE`."""

from __future__ import annotations

import torch

#: ``sequence_ids`` of the padding after a pack's last row
PADDING_SEQUENCE = -1


def sequence_starts(sequence_ids: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` bool: True at the first token of every packed row (and of the padding after them)."""
    starts = torch.ones_like(sequence_ids, dtype=torch.bool)
    starts[:, 1:] = sequence_ids[:, 1:] != sequence_ids[:, :-1]
    return starts


def sequence_start_index(sequence_ids: torch.Tensor) -> torch.Tensor:
    """``[B, L]``: the index in the pack of the first token of each token's row."""
    index = torch.arange(sequence_ids.shape[1], device=sequence_ids.device).expand_as(sequence_ids)
    return torch.where(sequence_starts(sequence_ids), index, torch.zeros_like(index)).cummax(dim=-1).values


def packed_position_ids(sequence_ids: torch.Tensor) -> torch.Tensor:
    """Positions ``[B, L]`` that restart at 0 at the first token of every packed row: each row is numbered as
    it is alone."""
    index = torch.arange(sequence_ids.shape[1], device=sequence_ids.device)
    return index - sequence_start_index(sequence_ids)


def check_sequence_ids(sequence_ids: torch.Tensor, input_ids: torch.Tensor | None, attention_mask, cache) -> None:
    """Packed rows come alone: ``[B, L]`` like the ids, no padding mask (a pack's padding is its own
    sequence), no cache (training only).

    Raises:
        ValueError: naming what does not fit.
    """
    if input_ids is not None and tuple(sequence_ids.shape) != tuple(input_ids.shape):
        raise ValueError(
            f"sequence_ids has shape {tuple(sequence_ids.shape)}; expected the shape of input_ids "
            f"{tuple(input_ids.shape)} ([batch, tokens])"
        )
    if attention_mask is not None:
        raise ValueError("sequence_ids (packed rows) come without an attention_mask: each row's mask is built from them")
    if cache is not None:
        raise ValueError("sequence_ids (packed rows) are for training: no cache")


class PackedLayout:
    """The rows of a batch of packs laid out one per row, ``[R, W]`` (R rows, W the longest row), for attention.

    Attention over a whole pack with a block-diagonal mask computes every pair of the pack's tokens, most of them
    hidden; gathered one row per batch row (right-padded to the longest row), each row's attention is exactly its
    own and costs what it costs in a padded batch, while everything else (the linears, the MLP) runs on the packs
    without padding. The padding after a pack's last row is left out (its attention output is 0).

    Attributes:
        rows, width: R and W.
        source: ``[R * W]`` the flat token index (``b * L + l``) each slot reads (0 for the empty slots).
        filled: ``[R, W]`` bool: the slot holds a token.
        tokens: ``[T]`` the flat token index of every row token; ``slots``: ``[T]`` its flat slot index.
        pack: ``[R]`` the batch row (pack) of each row.
        batch, length: B and L of the packs.
    """

    def __init__(self, sequence_ids: torch.Tensor):
        batch, length = sequence_ids.shape
        device = sequence_ids.device
        real = (sequence_ids != PADDING_SEQUENCE).flatten()  # (B*L,)
        starts = sequence_starts(sequence_ids).flatten() & real
        row = starts.long().cumsum(0) - 1  # (B*L,): the row of each token (its own, for row tokens)
        place = packed_position_ids(sequence_ids).flatten()  # (B*L,): index inside the row
        self.tokens = real.nonzero().flatten()  # (T,)
        self.rows = int(starts.sum())
        self.width = int(place[self.tokens].max()) + 1 if self.rows else 0
        self.slots = row[self.tokens] * self.width + place[self.tokens]  # (T,)
        self.source = torch.zeros(self.rows * self.width, dtype=torch.long, device=device)
        self.source[self.slots] = self.tokens
        self.filled = torch.zeros(self.rows * self.width, dtype=torch.bool, device=device)
        self.filled[self.slots] = True
        self.filled = self.filled.view(self.rows, self.width)
        self.pack = starts.nonzero().flatten() // length  # (R,)
        self.batch, self.length = batch, length

    def to_rows(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, L, D]`` (heads first, as attention takes them) -> ``[R, H, W, D]``."""
        heads, dim = x.shape[1], x.shape[3]
        tokens = x.transpose(1, 2).reshape(self.batch * self.length, heads, dim)
        return tokens.index_select(0, self.source).view(self.rows, self.width, heads, dim).transpose(1, 2)

    def per_row(self, x: torch.Tensor) -> torch.Tensor:
        """A per-pack tensor ``[B or 1, ...]`` -> per row ``[R, ...]``."""
        return x.expand(self.rows, *x.shape[1:]) if x.shape[0] == 1 else x.index_select(0, self.pack)

    def from_rows(self, out: torch.Tensor) -> torch.Tensor:
        """An attention output ``[R, W, N, D]`` -> ``[B, L, N, D]`` (0 for the padding after the rows)."""
        heads, dim = out.shape[2], out.shape[3]
        picked = out.reshape(self.rows * self.width, heads, dim).index_select(0, self.slots)
        full = out.new_zeros(self.batch * self.length, heads, dim).index_copy(0, self.tokens, picked)
        return full.view(self.batch, self.length, heads, dim)

    def ids_rows(self, input_ids: torch.Tensor, fill: int) -> torch.Tensor:
        """``[B, L]`` ids -> ``[R, W]``, the empty slots set to ``fill``."""
        rows = input_ids.flatten().index_select(0, self.source).view(self.rows, self.width)
        return rows.masked_fill(~self.filled, fill)
