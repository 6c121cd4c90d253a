"""ChatGLM2-6B's rotary table, half-precision rounding included.

Shapes: B batch, S positions, D head size; the rotary part is the first D/2 dims of each head, turned in
adjacent pairs, so there are D/4 frequencies ``θ_i = 1 / base^(2i / (D/2))``.

transformers' ``GlmRotaryEmbedding`` computes ``p · θ_i`` in float32 and rounds only cos/sin to the model's
dtype. That is exactly what ChatGLM3-6B's code does, in every dtype. ChatGLM2-6B's code (``RotaryEmbedding
.forward_impl`` of ``THUDM/chatglm2-6b`` ``modeling_chatglm.py``) builds its table in the dtype of its
``inv_freq`` buffer, i.e. the model's: in float16 / bfloat16 the frequencies, the positions (``arange`` in
that dtype, divided by ``rope_ratio`` for the 32k model) and each product ``p · θ_i`` are rounded to it,
then cos/sin are taken in float32 and rounded again. Positions above 2048 (float16) or 256 (bfloat16) are
thereby rounded (2049 -> 2048), and the angle error grows with the position. A real ChatGLM2 checkpoint
computes what its original computes: :class:`ChatGLM2RotaryEmbedding` reproduces that table bit for bit in
every dtype (float32 included, where it equals the class's own), and replaces the model's rotary module
for ChatGLM2 folders only.
"""

from __future__ import annotations

import torch
from transformers.models.glm.modeling_glm import GlmRotaryEmbedding

HALF = (torch.float16, torch.bfloat16)


def chatglm2_angles(position_ids: torch.Tensor, rotary_dim: int, dtype: torch.dtype, rope_ratio: float = 1.0,
                    base: float = 10000.0) -> torch.Tensor:
    """``p · θ_i`` as ChatGLM2's code computes them for a model in ``dtype``.

    Args:
        position_ids: ``[...]`` integer positions.
        rotary_dim: D/2, the rotated dims per head.
        dtype: the model's dtype; in float16 / bfloat16 every step is rounded to it (see the module).
        rope_ratio: ChatGLM2-32k's position divisor.

    Returns:
        ``[..., D/4]`` float32 angles.
    """
    work = dtype if dtype in HALF else torch.float32
    device = position_ids.device
    theta = 1.0 / (int(base) ** (torch.arange(0, rotary_dim, 2, dtype=work, device=device) / rotary_dim))  # (D/4,)
    positions = position_ids.to(work)
    if rope_ratio != 1.0:
        positions = positions / rope_ratio
    return (positions[..., None] * theta).float()  # (..., D/4), the product rounded to `work` first


class ChatGLM2RotaryEmbedding(GlmRotaryEmbedding):
    """``GlmRotaryEmbedding`` with ChatGLM2-6B's table (see the module). ``forward(x, position_ids)`` returns
    ``(cos, sin)``, each ``[B, S, D/2]`` in ``x``'s dtype, in the layout ``GlmAttention`` expects (the D/4
    values twice)."""

    def __init__(self, config):
        super().__init__(config)
        self.rotary_dim = int(config.head_dim * config.rope_parameters.get("partial_rotary_factor", 0.5))
        self.rope_ratio = float(getattr(config, "rope_ratio", 1.0) or 1.0)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = chatglm2_angles(position_ids, self.rotary_dim, x.dtype, self.rope_ratio)  # (B, S, D/4)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, S, D/2)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rope_table(rotary: GlmRotaryEmbedding, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The cos/sin table a rotary module uses for a model in ``dtype``, in the original's layout
    ``[n, D/4, 2]`` (index 0 cos, 1 sin) — to compare with the original's ``rotary_pos_emb`` cache."""
    probe = torch.zeros(1, dtype=dtype, device=positions.device)
    cos, sin = rotary(probe, positions[None])  # (1, n, D/2) each
    quarter = cos.shape[-1] // 2
    return torch.stack([cos[0, :, :quarter], sin[0, :, :quarter]], dim=-1)  # (n, D/4, 2)


__all__ = ["ChatGLM2RotaryEmbedding", "chatglm2_angles", "rope_table"]
