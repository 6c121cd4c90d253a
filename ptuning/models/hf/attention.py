"""The prefix enters transformers' own decoders through the documented ``AttentionInterface``.

:func:`register` adds an attention implementation named :data:`ATTENTION_NAME` to
``transformers.AttentionInterface`` (and, so that the model still builds its causal / padding / sliding-window
mask, transformers' SDPA mask function under the same name to ``AttentionMaskInterface``). A model whose
``config._attn_implementation`` is that name calls :func:`prefix_attention` in every attention layer with the
rotated keys and values of its tokens (after the ``Cache`` update) and the keyword arguments that the model's
``forward`` was given: a :class:`~ptuning.prefix.PrefixKV` passed as ``prefix=`` reaches it there. For layer
``module.layer_idx`` it puts that layer's prefix keys/values in front of the token keys/values, adds prefix
columns to the mask the model built (visible, or as ``PrefixKV.mask`` says per row), and runs transformers' own
SDPA attention on the result. Without a prefix it is transformers' SDPA attention, call for call.

A decode loop of our own (:mod:`ptuning.generation`) calls the model with its own cache disabled and a
:class:`~ptuning.generation.SlotCache` as the keyword argument ``slot_cache``, which reaches this function the same
way: the new keys and values are stored in the slots; in a decode step the layer then attends over the slots
(the prefix in front, each row's own tokens) with the slots' mask instead of the model's.

So the backbone's code is untouched, positions are not shifted by P (the model computes them from its tokens
and cache alone), the prefix keys are not rotated, and the prefix is never written into the ``Cache``: exactly
the prefix of the original P-Tuning v2 and of ChatGLM2's built-in ``pre_seq_len``.

A batch without padding (the model hands over no mask) needs no mask with a prefix either: every query sees the
whole prefix and the tokens up to itself, which is causal attention aligned to the bottom-right corner of the
``[S, P + S]`` scores (``torch.nn.attention.bias.causal_lower_right``). :func:`causal_prefix_attention` runs
it without materializing a mask where a kernel allows (see :func:`no_mask_form`); only padded batches and
per-row prefix masks build the ``[B, 1, S, P + T]`` mask of :func:`prefixed_mask`. Packed rows (a
:class:`~ptuning.models.packed.PackedLayout` as the keyword argument ``packed_layout``) attend one row per batch
row the same way, without the block-diagonal mask over whole packs (except in sliding-window layers).

Shapes: B batch, N query heads, G key/value heads, S queries (new tokens), T token keys (cached + new),
P prefix length, D head size.
"""

from __future__ import annotations

import torch
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ...prefix import PrefixKV
from ..packed import PackedLayout

ATTENTION_NAME = "ptuning_prefix"

# A CPU has no lower-right causal kernel: torch materializes ``causal_lower_right`` there. Its causal kernel
# (``is_causal``) skips the score blocks above the diagonal, so P zero queries in front of the S real ones make
# the square ``[P + S, P + S]`` causal pattern whose last S rows are exactly the lower-right one, without a mask.
# Measured side by side (benchmarks/bench_prefix_mask.py --attention-only: forward + backward, B 2, 8 heads of
# 64, one thread, P 16 and 128): the zero queries run at 0.22-1.08x the speed of the materialized mask for
# S = 16 to 512 and 1.34-1.41x at S = 1024, so they are used from here on (and only for P <= S).
CPU_CAUSAL_MIN_QUERIES = 1024


def prefixed_mask(
    mask: torch.Tensor | None,
    prefix_mask: torch.Tensor | None,
    *,
    batch: int,
    queries: int,
    keys: int,
    prefix_length: int,
    causal: bool,
    device: torch.device,
) -> torch.Tensor | None:
    """The mask over ``[prefix | tokens]`` for a mask the model built over the tokens alone.

    Args:
        mask: what the model built: bool ``[b, 1, S, T]`` (True = attend), an additive float mask of that
            shape (0 = attend, a large negative value = hidden), or None. ``b`` is B or 1.
        prefix_mask: ``[B, P]`` bool (True = visible), or None for every prefix column visible.
        batch: B.
        queries: S.
        keys: T.
        prefix_length: P.
        causal: the layer is causal (``module.is_causal``).
        device: where to build new masks.

    Returns:
        ``[B or 1, 1, S, P + T]`` in the dtype of ``mask`` (bool when it was None), or None when every query
        sees every key. A None ``mask`` means what transformers' SDPA attention reads it as: for S > 1 on a causal
        layer its ``is_causal`` (upper-left aligned: query i sees keys 0..i; transformers passes None only when
        T == S, or when the keys beyond S are the unfilled slots of a static cache); otherwise no mask.
    """
    if mask is None:
        if causal and queries > 1:
            mask = torch.ones(queries, keys, dtype=torch.bool, device=device).tril()[None, None]  # (1, 1, S, T)
        elif prefix_mask is None:
            return None
        else:
            mask = torch.ones(1, 1, queries, keys, dtype=torch.bool, device=device)
    if mask.dim() != 4 or mask.shape[-2:] != (queries, keys):
        raise ValueError(
            f"attention mask of shape {tuple(mask.shape)}; expected [batch, 1, {queries}, {keys}] "
            "([batch, 1, queries, keys]) for a prefix"
        )
    if prefix_mask is None:
        visible = torch.ones(mask.shape[0], 1, queries, prefix_length, dtype=torch.bool, device=mask.device)
    else:
        if tuple(prefix_mask.shape) != (batch, prefix_length):
            raise ValueError(
                f"PrefixKV.mask has shape {tuple(prefix_mask.shape)}; expected [batch, prefix length] = "
                f"{[batch, prefix_length]}"
            )
        visible = prefix_mask.to(device=mask.device, dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, P)
        visible = visible.expand(batch, 1, queries, prefix_length)
        mask = mask.expand(batch, -1, -1, -1)
    if mask.dtype == torch.bool:
        columns = visible
    else:
        hidden = torch.finfo(mask.dtype).min
        columns = torch.zeros((), dtype=mask.dtype, device=mask.device).masked_fill(~visible, hidden)
        columns = columns.expand(visible.shape)
    return torch.cat([columns, mask], dim=-1)  # (B or 1, 1, S, P + T)


def no_mask_form(device: torch.device, queries: int, prefix_length: int) -> str:
    """How :func:`causal_prefix_attention` runs a batch without a mask on ``device``.

    Returns:
        ``"lower_right"``: SDPA with ``causal_lower_right(S, P + S)`` (CUDA runs it in its FlashAttention or
        memory-efficient kernel; other non-CPU devices as torch dispatches it); ``"zero_queries"``: P zero
        queries in front and SDPA's ``is_causal`` (a CPU from :data:`CPU_CAUSAL_MIN_QUERIES` queries on, with
        P <= S); ``"mask"``: the materialized ``[1, 1, S, P + S]`` mask (a CPU below that, where it is faster
        and what torch would materialize for ``causal_lower_right`` anyway).
    """
    if torch.device(device).type != "cpu":
        return "lower_right"
    if queries >= CPU_CAUSAL_MIN_QUERIES and prefix_length <= queries:
        return "zero_queries"
    return "mask"


def causal_prefix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    prefix_length: int,
    dropout: float = 0.0,
    scaling: float | None = None,
    form: str | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal attention of S queries over ``[prefix | S tokens]``: query i sees the P prefix keys and the tokens
    0..i (the bottom-right-aligned causal pattern), with no mask built where a kernel allows.

    Args:
        query: ``[B, N, S, D]``.
        key, value: ``[B, G, P + S, D]``, the prefix in front.
        prefix_length: P.
        form: ``"lower_right"``, ``"zero_queries"`` or ``"mask"`` (see :func:`no_mask_form`; None: as it says
            for the query's device). All three compute the same attention.

    Returns:
        ``([B, S, N, D], None)`` as transformers' attention functions.
    """
    batch, heads, queries, dim = query.shape
    form = form or no_mask_form(query.device, queries, prefix_length)
    if form == "lower_right":
        return sdpa_attention_forward(module, query, key, value, causal_lower_right(queries, key.shape[2]),
                                      dropout=dropout, scaling=scaling, is_causal=False, **kwargs)
    if form == "zero_queries":
        padded = torch.cat([query.new_zeros(batch, heads, prefix_length, dim), query], dim=2)  # (B, N, P + S, D)
        out, weights = sdpa_attention_forward(module, padded, key, value, None, dropout=dropout, scaling=scaling,
                                              is_causal=True, **kwargs)
        return out[:, prefix_length:], weights  # (B, S, N, D)
    if form != "mask":
        raise ValueError(f"form={form!r}: expected 'lower_right', 'zero_queries' or 'mask'")
    mask = prefixed_mask(None, None, batch=batch, queries=queries, keys=queries, prefix_length=prefix_length,
                         causal=True, device=query.device)
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                  is_causal=False, **kwargs)


def prefix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    prefix: PrefixKV | None = None,
    slot_cache=None,
    packed_layout: PackedLayout | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention over the layer's prefix and the tokens (an ``AttentionInterface`` function).

    Args:
        module: the attention layer; ``module.layer_idx`` picks the prefix's layer.
        query: ``[B, N, S, D]`` (rotated).
        key: ``[B, G, T, D]`` (rotated, cached + new).
        value: ``[B, G, T, D]``.
        attention_mask: the mask the model built (see :func:`prefixed_mask`).
        prefix: the prefix of every layer; keys/values ``[B or 1, G, P, D]``. None or P = 0: plain SDPA.
        slot_cache: a decode loop's :class:`~ptuning.generation.SlotCache` (the model's own cache disabled). In a
            decode step the keys and values are the slots' (``[B, G, P + T, D]``) and so is the mask; a layer
            with a sliding window (``module.sliding_window``) also hides the tokens outside it.
        packed_layout: the rows of packed training rows (the model's ``sequence_ids``): each row attends over the
            prefix and its own tokens alone (see :class:`~ptuning.models.packed.PackedLayout`); a sliding-window
            layer uses the model's block-diagonal mask instead.

    Returns:
        ``([B, S, N, D], None)`` as transformers' attention functions.
    """
    if slot_cache is not None:
        read = _store_in_slots(module, key, value, prefix, slot_cache)
        if read is not None:  # a decode step: attend over the slots
            return _slot_attention(module, query, *read, slot_cache, dropout=dropout, scaling=scaling, **kwargs)
    if prefix is None or prefix.length == 0:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    batch, _, queries, _ = query.shape
    prefix_keys, prefix_values = _layer_prefix(module, prefix, key, value, batch)
    length = prefix_keys.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if packed_layout is not None and prefix.mask is None and causal and not getattr(module, "sliding_window", None):
        layout = packed_layout
        key = torch.cat([layout.per_row(prefix_keys), layout.to_rows(key)], dim=2)  # (R, G, P + W, D)
        value = torch.cat([layout.per_row(prefix_values), layout.to_rows(value)], dim=2)
        out, weights = causal_prefix_attention(module, layout.to_rows(query), key, value, prefix_length=length,
                                               dropout=dropout, scaling=scaling, **kwargs)
        return layout.from_rows(out), weights  # (B, S, N, D)
    if attention_mask is None and prefix.mask is None and causal and queries > 1:
        # no padding: the keys beyond S can only be the unfilled slots of a static cache (see prefixed_mask)
        key, value = key[:, :, :queries], value[:, :, :queries]
        key = torch.cat([prefix_keys, key], dim=2)  # (B, G, P + S, D)
        value = torch.cat([prefix_values, value], dim=2)
        return causal_prefix_attention(module, query, key, value, prefix_length=length, dropout=dropout,
                                       scaling=scaling, **kwargs)
    mask = prefixed_mask(
        attention_mask, prefix.mask, batch=batch, queries=queries, keys=key.shape[2], prefix_length=length,
        causal=causal, device=query.device,
    )
    key = torch.cat([prefix_keys, key], dim=2)  # (B, G, P + T, D)
    value = torch.cat([prefix_values, value], dim=2)  # (B, G, P + T, D)
    return sdpa_attention_forward(
        module, query, key, value, mask, dropout=dropout, scaling=scaling, is_causal=False, **kwargs
    )


def _layer_prefix(module: torch.nn.Module, prefix: PrefixKV, key: torch.Tensor, value: torch.Tensor,
                  batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prefix keys and values of layer ``module.layer_idx``, ``[B, G, P, D]`` each, on the device and in the
    dtype of the token keys / values.

    Raises:
        ValueError: their key/value heads or head size differ from the token keys'.
    """
    prefix_keys, prefix_values = prefix.layer(module.layer_idx)
    if prefix_keys.shape[1] != key.shape[1] or prefix_keys.shape[3] != key.shape[3]:
        raise ValueError(
            f"layer {module.layer_idx}: prefix keys of shape {tuple(prefix_keys.shape)} do not fit keys of shape "
            f"{tuple(key.shape)} (expected [batch, {key.shape[1]} key/value heads, P, {key.shape[3]}])"
        )
    prefix_keys = prefix_keys.to(device=key.device, dtype=key.dtype).expand(batch, -1, -1, -1)
    prefix_values = prefix_values.to(device=value.device, dtype=value.dtype).expand(batch, -1, -1, -1)
    return prefix_keys, prefix_values


def _store_in_slots(module: torch.nn.Module, key: torch.Tensor, value: torch.Tensor, prefix: PrefixKV | None,
                    slot_cache):
    """Stores the layer's new keys and values (and its prefix, where it changed) in the slot cache; in a decode
    step returns what to attend over: keys and values ``[B, G, P + T, D]`` and their mask (None in a prefill)."""
    layer_prefix = None
    if prefix is not None and prefix.length:
        pk, pv = prefix.layer(module.layer_idx)
        layer_prefix = (pk.to(dtype=key.dtype), pv.to(dtype=value.dtype))
    return slot_cache.update(module.layer_idx, key, value, layer_prefix)


def _slot_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask,
                    slot_cache, *, dropout: float, scaling: float | None, **kwargs) -> tuple[torch.Tensor, None]:
    """A decode step's attention over the slots (prefix in front, each row's own tokens) with the slots' mask;
    a sliding-window layer also hides the tokens outside its window."""
    window = getattr(module, "sliding_window", None)
    if window:
        mask = slot_cache.window_mask(window)
    # a float32 cache of a 16-bit model (see ptuning.generation.default_cache_dtype): attend in float32
    out, weights = sdpa_attention_forward(
        module, query.to(key.dtype), key, value, mask, dropout=dropout, scaling=scaling, is_causal=False, **kwargs
    )
    return out.to(query.dtype), weights


def register() -> str:
    """Registers :func:`prefix_attention` and its mask function under :data:`ATTENTION_NAME` (idempotent).

    Returns:
        The name to set as a model's attention implementation (``model.set_attn_implementation(name)``).
    """
    AttentionInterface.register(ATTENTION_NAME, prefix_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME
