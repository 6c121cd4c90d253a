"""Continuous batching of many prefixes on one frozen backbone: the decode loop of :mod:`ptuning.generation` with
a bank of named prefixes.

The server decodes with a :class:`~ptuning.generation.Decoder` (a slot cache with one row per request, each its
own length; one decode forward per step over the running rows and one prefill forward over the rows added
since; a row that ends leaves at once and its slot is free). Its requests, step outputs and errors are the
decode loop's own (:class:`~ptuning.generation.Request`, :class:`~ptuning.generation.StepOutput`,
:class:`~ptuning.generation.DecoderFull`); this module adds only what serving needs on top:

The :class:`PrefixBank` holds every prefix's keys and values, computed once from its encoder, stacked
``[N, P_max, K]`` and left-aligned with a visibility mask ``[N, P_max]`` (shorter prefixes, and the base model
with none, hide their unused columns), as the decoder's :class:`~ptuning.generation.PrefixTable`: a request names
its prefix by index (:meth:`PrefixBank.index`), the decoder gathers the rows' prefixes into one
:class:`~ptuning.prefix.PrefixKV` that the model takes in place of its own (the model contract in
:mod:`ptuning.models.base`). So a row never attends to another row's prefix.

Shapes: N prefixes (the base model's empty one first), P_max the longest prefix, K = 2·L·G·D.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..generation import Decoder, PrefixTable
from ..prefix import PrefixKV, PrefixShape, split_key_values

__all__ = ["PrefixBank", "serving_decoder"]


class PrefixBank:
    """Named prefixes' keys and values, computed once, stacked and padded to the longest.

    Args:
        shape: the model's prefix shape (layers, key/value heads, head size); ``pre_seq_len`` is ignored.
        prefixes: name -> the encoder's output ``[P_i, K]`` (any float dtype).
        dtype: the backbone's dtype (the keys and values are cast once, as training casts them per step).
        device: where the bank lives.

    Index 0 is the bare base model (no visible column); prefix ``i`` of ``names`` has index ``i``.

    Raises:
        ValueError: a prefix that is not ``[P, K]``.
    """

    def __init__(self, shape: PrefixShape, prefixes: Mapping[str, torch.Tensor], dtype: torch.dtype, device=None):
        self.shape = shape
        self.names: list[str | None] = [None, *prefixes]
        self.lengths = [0] + [int(t.shape[0]) for t in prefixes.values()]
        width = max(self.lengths)
        kv = torch.zeros(len(self.names), width, shape.kv_width, dtype=dtype, device=device)  # (N, P_max, K)
        for i, tensor in enumerate(prefixes.values(), start=1):
            if tensor.dim() != 2 or tensor.shape[1] != shape.kv_width:
                raise ValueError(f"prefix {self.names[i]!r}: shape {list(tensor.shape)}, expected [P, {shape.kv_width}]")
            kv[i, : tensor.shape[0]] = tensor.detach().to(device=device, dtype=dtype)
        self.kv = kv
        lengths = torch.tensor(self.lengths, device=device)
        self.mask = torch.arange(width, device=device)[None] < lengths[:, None]  # (N, P_max)

    @property
    def longest(self) -> int:
        """P_max, the columns every row's prefix room needs."""
        return max(self.lengths)

    def index(self, name: str | None) -> int:
        """The bank index of ``name`` (None: the bare base model). Raises KeyError for an unknown name."""
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(name) from None

    def table(self) -> PrefixTable:
        """The bank as the decoder's prefix table (row i of a batch gets the prefix its request's index names)."""
        keys, values = split_key_values(self.kv, self.shape)  # per layer (N, G, P_max, D)
        return PrefixTable(PrefixKV(keys, values, self.mask))


def serving_decoder(model, bank: PrefixBank, *, max_batch_size: int, max_length: int, pad_token_id: int = 0,
                    vocab_limit: int | None = None, capacity: int | None = None) -> Decoder:
    """The server's decode loop: ``model`` (any family keeping the contract of :mod:`ptuning.models.base`, in
    eval mode, without a prefix encoder of its own) with every prefix of ``bank`` for its rows.

    Args:
        max_batch_size: rows decoded together at most.
        max_length: prompt + new tokens of a row at most (the family's ``max_positions``).
        pad_token_id: the id left pads carry in a prefill (never attended to).
        vocab_limit: ids from here on are never chosen (see :func:`ptuning.generation.vocab_limit`).
        capacity: tokens per row allocated up front (default: grown to what requests need as they come).
    """
    return Decoder(model, max_batch_size=max_batch_size, max_length=max_length, prefixes=bank.table(),
                   capacity=capacity, pad_token_id=pad_token_id, vocab_limit=vocab_limit)
