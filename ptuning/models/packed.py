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
