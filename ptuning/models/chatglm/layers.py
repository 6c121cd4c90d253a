"""The ChatGLM-6B block, leaf modules first: 2D rotary embedding, attention, MLP, block.

Shapes: B batch, S new tokens, T cached + new tokens, P prefix length, N heads, D head size,
H = N·D hidden size, I inner size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from .cache import PrefixRoomLayer
from .config import ChatGLMConfig

# The original block takes num_layers=28 as a default argument and the model never passes its own
# layer count, so every ChatGLM-6B model scales its residuals by sqrt(2 * 28).
RESIDUAL_ALPHA = math.sqrt(2 * 28)


def rotary_inv_freq(head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """Inverse frequencies of one half of a head (size R = D/2), rounded to float16 as the original; computed on
    the CPU whatever the default device (the same bits on every machine), to be moved where they are used."""
    rot = head_dim // 2
    inv = 1.0 / (base ** (torch.arange(0, rot, 2, dtype=torch.float32, device="cpu") / rot))
    return inv.half().float()  # (R/2,)


def rotary_tables(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos and signed sin for the 2D rotary embedding of a whole head (see :func:`apply_rotary`).

    Args:
        position_ids: ``[B, 2, S]``; row 0 rotates the first half of each head, row 1 the second.
        inv_freq: ``[R/2]`` float32.
        dtype: activation dtype. For float16 the angles are formed in float16, as the original does.

    Returns:
        ``cos`` ``[B, 1, S, D]`` and ``sin`` ``[B, 1, S, D]`` in ``dtype``, the sine negated in the first and
        third quarters of the head (the signs of the original's ``rotate_half``, folded into the table).
    """
    if dtype == torch.float16:
        angle = position_ids.half()[..., None] * inv_freq.half()  # (B, 2, S, R/2)
    else:
        angle = position_ids.float()[..., None] * inv_freq  # (B, 2, S, R/2)
    angle = angle.transpose(1, 2)  # (B, S, 2, R/2): one angle per pair of each half
    cos = angle.cos()[..., None, :].expand(-1, -1, -1, 2, -1)  # (B, S, 2, 2, R/2)
    sin = angle.sin()[..., None, :]
    sin = torch.cat([-sin, sin], dim=-2)  # (B, S, 2, 2, R/2): -sin, +sin per half
    return cos.flatten(2).to(dtype)[:, None], sin.flatten(2).to(dtype)[:, None]  # (B, 1, S, D) each


def swap_quarters(x: torch.Tensor) -> torch.Tensor:
    """Quarters of the last dimension ``[a, b, c, d] -> [b, a, d, c]`` (one copy)."""
    return x.unflatten(-1, (2, 2, -1)).flip(-2).flatten(-3)


class _Rotary(torch.autograd.Function):
    """``y = x·cos + swap(x)·sin`` in three elementwise ops, and its transpose ``dx = g·cos − swap(g)·sin``
    (``swap`` is its own transpose; the sine's signs flip with it) in three more. Written out with
    ``chunk``/``neg``/``cat`` the same rotation takes six ops forward and more backward, each a pass over ``q``
    or ``k``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return torch.addcmul(x * cos, swap_quarters(x), sin)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return torch.addcmul(grad * cos, swap_quarters(grad), sin, value=-1), None, None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, N, S, D]`` with the tables of :func:`rotary_tables` (``[B, 1, S, D]``).

    The original's ``x·cos + rotate_half(x)·sin`` per half of the head, with ``rotate_half([a, b]) = [-b, a]``:
    quarters ``[a, b, c, d]`` become ``[a·c₁ − b·s₁, b·c₁ + a·s₁, c·c₂ − d·s₂, d·c₂ + c·s₂]``, where the
    table's signed sine ``[-s₁, s₁, -s₂, s₂]`` multiplies ``[b, a, d, c]``.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return _Rotary.apply(x, cos, sin)
    return torch.addcmul(x * cos, swap_quarters(x), sin)


class SelfAttention(nn.Module):
    """Multi-head attention with a per-head fused qkv projection and an optional read-only prefix.

    The qkv output ``[B, S, 3H]`` is laid out per head as ``[N, 3D]`` (q, k, v of head n are next to
    each other), as in the original checkpoint.
    """

    def __init__(self, config: ChatGLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attn_mask: torch.Tensor | None,
        prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache=None,
        uniform_rows: torch.Tensor | None = None,
        slot_cache=None,
        packed_layout=None,
    ) -> torch.Tensor:
        """
        Args:
            x: ``[B, S, H]`` normalised input.
            rotary: cos, sin ``[B, 1, S, D]``.
            attn_mask: ``[B, 1, S, P + T]`` bool, True = may attend (SDPA convention), or None.
            prefix: this layer's prefix keys and values ``[B, N, P, D]`` (not rotated, not cached).
            cache: a transformers ``Cache``; receives the rotated keys and the values of the new tokens.
            uniform_rows: ``[B, 1, S, 1]`` bool: rows whose keys are all masked. The original fills masked
                scores with -10000, so such a row attends uniformly; a zero query reproduces that.
            slot_cache: a :class:`~ptuning.generation.SlotCache` of a decode loop of our own (instead of
                ``cache``): stores the new keys and values; in a decode step attention reads the prefix and the
                row's cached tokens from it, with its mask (``attn_mask`` is then not used).
            packed_layout: packed rows (:class:`~ptuning.models.packed.PackedLayout`): attention runs one row per
                batch row, ``attn_mask`` and ``uniform_rows`` being the rows' (``[R, 1, W, P + W]``, ``[R, 1, W, 1]``).
        """
        bsz, seq, _ = x.shape
        qkv = self.query_key_value(x).view(bsz, seq, self.num_heads, 3 * self.head_dim)  # (B, S, N, 3D)
        qkv = qkv.transpose(1, 2)  # (B, N, S, 3D)
        q, k, v = qkv.split(self.head_dim, dim=-1)  # each (B, N, S, D)
        cos, sin = rotary
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        if packed_layout is not None:  # training only: no cache
            return self.dense(self._packed_attention(q, k, v, prefix, attn_mask, uniform_rows, packed_layout, x.dtype))
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, N, T, D)
        read = slot_cache.update(self.layer_idx, k, v, prefix) if slot_cache is not None else None
        if read is not None:  # a decode step: keys and values (B, N, P + T, D) of the slots, and their mask
            k, v, attn_mask = read
            q = q.to(k.dtype)  # a float32 cache of a 16-bit model attends in float32 (ptuning.generation)
        elif prefix is not None:
            layer = cache.layers[self.layer_idx] if cache is not None else None
            if isinstance(layer, PrefixRoomLayer) and layer.prefix_length == prefix[0].shape[2]:
                k, v = layer.with_prefix(*prefix)  # (B, N, P + T, D), a view: no copy of the cache
            else:
                k = torch.cat([prefix[0], k], dim=2)  # (B, N, P + T, D)
                v = torch.cat([prefix[1], v], dim=2)
        if uniform_rows is not None:
            q = q.masked_fill(uniform_rows, 0.0)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, N, S, D)
        ctx = ctx.transpose(1, 2).reshape(bsz, seq, -1).to(x.dtype)  # (B, S, H)
        return self.dense(ctx)


    @staticmethod
    def _packed_attention(q, k, v, prefix, attn_mask, uniform_rows, layout, dtype) -> torch.Tensor:
        """Attention of packed rows one row per batch row: ``q, k, v`` ``[B, N, L, D]`` (the prefix not yet in
        front) -> ``[B, L, H]``."""
        q, k, v = layout.to_rows(q), layout.to_rows(k), layout.to_rows(v)  # (R, N, W, D)
        if prefix is not None:
            k = torch.cat([layout.per_row(prefix[0]), k], dim=2)  # (R, N, P + W, D)
            v = torch.cat([layout.per_row(prefix[1]), v], dim=2)
        if uniform_rows is not None:
            q = q.masked_fill(uniform_rows, 0.0)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (R, N, W, D)
        ctx = layout.from_rows(ctx.transpose(1, 2))  # (B, L, N, D)
        return ctx.flatten(2).to(dtype)  # (B, L, H)


class GLU(nn.Module):
    """The original's MLP (named GLU there, but without a gate): Linear -> tanh-GELU -> Linear."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class GLMBlock(GradientCheckpointingLayer):
    """One transformer layer. The residuals add the *normalised* input scaled by sqrt(56)."""

    def __init__(self, config: ChatGLMConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = SelfAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = GLU(config)

    def forward(
        self,
        hidden: torch.Tensor,
        prefix_key: torch.Tensor | None = None,
        prefix_value: torch.Tensor | None = None,
        *,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attn_mask: torch.Tensor | None,
        cache=None,
        uniform_rows: torch.Tensor | None = None,
        slot_cache=None,
        packed_layout=None,
    ) -> torch.Tensor:
        """``hidden`` ``[B, S, H]`` -> ``[B, S, H]``. The prefix tensors are positional so that gradient
        checkpointing passes them through as inputs and their gradients reach the prefix encoder."""
        x = self.input_layernorm(hidden)
        prefix = None if prefix_key is None else (prefix_key, prefix_value)
        attn = self.attention(x, rotary, attn_mask, prefix=prefix, cache=cache, uniform_rows=uniform_rows,
                              slot_cache=slot_cache, packed_layout=packed_layout)
        hidden = torch.add(attn, x, alpha=RESIDUAL_ALPHA)  # one pass: attn + sqrt(56)·x
        m = self.post_attention_layernorm(hidden)
        return torch.add(self.mlp(m), m, alpha=RESIDUAL_ALPHA)
