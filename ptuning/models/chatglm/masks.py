"""Attention masks and 2D position ids of the GLM prefix-LM, built with tensor ops.

ChatGLM-6B lays a sequence out as ``prompt [gMASK] <sop> response <eop>``. Everything before
``<sop>`` (the *context*) is bidirectional; from ``<sop>`` on the sequence is causal. Every token
carries two positions: row 0 is its place in the context (frozen at the ``[gMASK]`` position for the
generated part) and row 1 its place inside the generated block (0 in the context, 1 at ``<sop>``).

Two recipes exist in the original code and both are reproduced here:

* **model-built** (:func:`build_masks`): used when only ``input_ids`` are given. Left pads are *not*
  masked and take positions 0, 1, 2, ...
* **padding-aware** (``padding_mask`` given): what the original tokenizer returns for a left-padded
  batch. The recipe runs on the unpadded row; pad rows and columns are hidden and pad positions are 0.

Packed training rows (:func:`build_packed_masks`) get the model-built recipe per row: each row's mask and
positions are exactly those of the row alone, and no row sees another.

Masks use the original convention: ``True`` = may **not** attend.
"""

from __future__ import annotations

import torch

from ..packed import PADDING_SEQUENCE, sequence_start_index, sequence_starts


def _first_index(hits: torch.Tensor) -> torch.Tensor:
    """Index of the first True along the last dim (``hits`` must have one per row)."""
    return hits.int().argmax(dim=-1)


def context_lengths(input_ids: torch.Tensor, bos_token_id: int) -> torch.Tensor:
    """Index of the first ``<sop>`` (bos) of each row: ``[B]``.

    Raises:
        ValueError: a row has no ``<sop>``, naming the row.
    """
    hits = input_ids == bos_token_id
    found = hits.any(dim=-1)
    if not bool(found.all()):
        rows = (~found).nonzero().flatten().tolist()
        raise ValueError(
            f"input_ids rows {rows} contain no <sop> (bos id {bos_token_id}); ChatGLM inputs end the prompt "
            "with [gMASK] <sop> (use tokenizer.build_inputs_with_special_tokens)"
        )
    return _first_index(hits)


def mask_positions(input_ids: torch.Tensor, mask_token_id: int, gmask_token_id: int) -> torch.Tensor:
    """Index of the mask token of each row: ``[gMASK]`` if the row has one, else ``[MASK]``: ``[B]``."""
    gmask = input_ids == gmask_token_id
    mask = input_ids == mask_token_id
    has_gmask = gmask.any(dim=-1)
    found = has_gmask | mask.any(dim=-1)
    if not bool(found.all()):
        rows = (~found).nonzero().flatten().tolist()
        raise ValueError(
            f"input_ids rows {rows} contain neither [gMASK] (id {gmask_token_id}) nor [MASK] (id {mask_token_id})"
        )
    return torch.where(has_gmask, _first_index(gmask), _first_index(mask))


def mask_token_ids(config) -> dict[str, int]:
    """The special ids :func:`build_masks` and :func:`build_packed_masks` take (``bos_token_id``,
    ``mask_token_id``, ``gmask_token_id``), read from a :class:`~ptuning.models.chatglm.config.ChatGLMConfig`."""
    return dict(bos_token_id=config.bos_token_id, mask_token_id=config.mask_token_id,
                gmask_token_id=config.gmask_token_id)


def build_masks(
    input_ids: torch.Tensor,
    *,
    bos_token_id: int,
    mask_token_id: int,
    gmask_token_id: int,
    padding_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention mask and position ids for a whole (padded) batch.

    Args:
        input_ids: ``[B, S]``.
        padding_mask: optional ``[B, S]``, 1/True = real token. Without it, the model-built recipe.

    Returns:
        ``hidden`` ``[B, 1, S, S]`` bool (True = hidden) and ``position_ids`` ``[B, 2, S]`` int64.
    """
    batch, seq = input_ids.shape
    device = input_ids.device
    ctx = context_lengths(input_ids, bos_token_id)[:, None]  # (B, 1)
    mpos = mask_positions(input_ids, mask_token_id, gmask_token_id)[:, None]  # (B, 1)
    col = torch.arange(seq, device=device)[None, :]  # (1, S)
    in_block = col >= ctx  # (B, S): <sop> and after

    if padding_mask is None:
        place = col.expand(batch, seq)
    else:
        real = padding_mask.bool()
        # index of each token in the unpadded row (pads: 0)
        place = (real.long().cumsum(dim=-1) - 1).clamp_min(0)
    mask_place = place.gather(1, mpos)  # (B, 1)
    pos0 = torch.where(in_block, mask_place, place)
    pos1 = torch.where(in_block, col - ctx + 1, torch.zeros_like(col))
    if padding_mask is not None:
        pos0 = pos0.masked_fill(~real, 0)
        pos1 = pos1.masked_fill(~real, 0)
    position_ids = torch.stack([pos0, pos1], dim=1)  # (B, 2, S)

    rows = torch.arange(seq, device=device)[:, None]  # (S, 1)
    hidden = (col > rows)[None] & in_block[:, None, :]  # (B, S, S)
    if padding_mask is not None:
        pad = ~real
        hidden = hidden | pad[:, None, :] | pad[:, :, None]
    return hidden[:, None], position_ids


def _first_in_row(hits: torch.Tensor, row: torch.Tensor, rows: int) -> torch.Tensor:
    """For every token, the pack index of the first hit in its row (``rows`` when the row has none).

    Args:
        hits: ``[B, L]`` bool.
        row: ``[B, L]`` the row number of each token in its pack (0, 1, ...).
        rows: the most rows a pack holds.
    """
    batch, seq = hits.shape
    index = torch.arange(seq, device=hits.device).expand(batch, seq)
    first = torch.full((batch, rows), seq, dtype=torch.long, device=hits.device)
    first = first.scatter_reduce(1, row, torch.where(hits, index, seq), reduce="amin")  # (B, rows)
    return first.gather(1, row)  # (B, L)


def build_packed_masks(
    input_ids: torch.Tensor,
    sequence_ids: torch.Tensor,
    *,
    bos_token_id: int,
    mask_token_id: int,
    gmask_token_id: int,
    with_mask: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Attention mask and position ids of packed rows: :func:`build_masks` (model-built recipe) of every row
    alone, placed on the diagonal of the pack; a row sees no other row.

    Args:
        input_ids: ``[B, L]``.
        sequence_ids: ``[B, L]``: the row of each token (0, 1, ...; :data:`PADDING_SEQUENCE` for the padding
            after the last row, which is causal among itself with positions 0).

        with_mask: False: the positions only (the mask is None).

    Returns:
        ``hidden`` ``[B, 1, L, L]`` bool (True = hidden) and ``position_ids`` ``[B, 2, L]`` int64.

    Raises:
        ValueError: a row without ``<sop>`` or without a mask token.
    """
    batch, seq = input_ids.shape
    device = input_ids.device
    starts = sequence_starts(sequence_ids)
    row = starts.long().cumsum(dim=-1) - 1  # (B, L): 0, 1, ... per pack
    rows = int(row.max()) + 1
    start = sequence_start_index(sequence_ids)  # (B, L)
    padding = sequence_ids == PADDING_SEQUENCE
    col = torch.arange(seq, device=device).expand(batch, seq)
    ctx = _first_in_row(input_ids == bos_token_id, row, rows)  # (B, L)
    gmask = _first_in_row(input_ids == gmask_token_id, row, rows)
    mpos = torch.where(gmask < seq, gmask, _first_in_row(input_ids == mask_token_id, row, rows))
    missing = ~padding & ((ctx == seq) | (mpos == seq))
    if bool(missing.any()):
        b, t = missing.nonzero()[0].tolist()
        what = "<sop>" if int(ctx[b, t]) == seq else "[gMASK] / [MASK]"
        raise ValueError(
            f"packed row {int(sequence_ids[b, t])} of batch row {b} has no {what}; ChatGLM inputs end the prompt "
            "with [gMASK] <sop> (use tokenizer.build_inputs_with_special_tokens)"
        )
    ctx = torch.where(padding, start, ctx)  # the padding: all "block", i.e. causal
    in_block = col >= ctx
    pos0 = torch.where(in_block, mpos - start, col - start)
    pos1 = torch.where(in_block, col - ctx + 1, torch.zeros_like(col))
    position_ids = torch.stack([pos0, pos1], dim=1).masked_fill(padding[:, None], 0)  # (B, 2, L)
    if not with_mask:
        return None, position_ids
    same_row = row[:, :, None] == row[:, None, :]  # (B, L, L)
    later = col[:, None, :] > col[:, :, None]  # key after query
    hidden = ~same_row | (later & in_block[:, None, :])
    return hidden[:, None], position_ids


def extend_step_masks(
    input_ids: torch.Tensor,
    past_length: int,
    *,
    padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mask rows for tokens fed after a cache of ``past_length`` tokens: ``[B, 1, q, past + q]``.

    The context (and ``<sop>``) is in the cache, so the new tokens are causal among themselves and see
    every cached token except pads (when ``padding_mask`` ``[B, past + q]`` is given).
    """
    batch, q = input_ids.shape
    device = input_ids.device
    col = torch.arange(past_length + q, device=device)[None, :]
    rows = torch.arange(past_length, past_length + q, device=device)[:, None]
    hidden = (col > rows)[None].expand(batch, q, past_length + q)
    if padding_mask is not None:
        hidden = hidden | ~padding_mask.bool()[:, None, :]
    return hidden[:, None]
