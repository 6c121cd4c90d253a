"""ChatGLM2/3's part of the training memory estimate (:mod:`ptuning.memory`, ``architecture "glm"``), as they
run on transformers' ``GlmForCausalLM``.

Grouped-query attention (G key/value heads of D, the prefix G·D wide per layer), a bias on the query/key/value
projections only, RMSNorm (its input is kept as a float32 copy and its float32 reciprocal RMS), SwiGLU (the
``[T, 2F]`` gate/up output and the ``[T, F]`` SiLU output are kept), untied output layer, and SDPA given the
keys/values expanded to the N query heads (transformers repeats them whenever a mask is passed, which the
prefix always is). The prefix projection's embedding is K = 2·L·G·D wide.

Shapes: B batch, S tokens, T = B·S, P prefix length, d hidden size, F ffn_hidden_size, N query heads.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..memory import ModelShape, compute_bytes, linear_weight_bytes
from .config import parse_original_config

# ChatGLM2-6B and ChatGLM3-6B (and their -base / -32k) share their shape
PUBLISHED = ModelShape(architecture="glm", vocab=65024, hidden=4096, layers=28, heads=32, kv_heads=2, head_dim=128,
                       inner=13696)


class ChatGLM2Memory:
    """The formulas of :class:`~ptuning.models.memory.ArchitectureMemory` for ChatGLM2/3."""

    name = "glm"
    label = "ChatGLM2/3"
    presets = {"chatglm2-6b": PUBLISHED, "chatglm3-6b": PUBLISHED}

    def shape(self, config, **overrides) -> ModelShape:
        """The shape of a ``GlmConfig`` of an original folder (the loaded model's config)."""
        values = dict(
            architecture=self.name,
            vocab=config.vocab_size,
            hidden=config.hidden_size,
            layers=config.num_hidden_layers,
            heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            inner=config.intermediate_size,
            pre_seq_len=getattr(config, "pre_seq_len", None) or 0,
            prefix_projection=bool(getattr(config, "prefix_projection", False)),
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )
        return ModelShape(**{**values, **overrides})

    def read_config(self, folder: Path):
        """The ``GlmConfig`` of an original folder's ``config.json``; ChatGLM2 and ChatGLM3 have the same sizes,
        so a folder that does not say which it is reads as ChatGLM3."""
        path = Path(folder) / "config.json"
        return parse_original_config(json.loads(path.read_text(encoding="utf-8")), path, 3).glm_config()

    def prefix_embedding_width(self, shape: ModelShape) -> int:
        return shape.kv_width

    def weight_bytes(self, shape: ModelShape, setting: str) -> int:
        c = compute_bytes(setting)
        d, inner = shape.hidden, shape.inner
        q, kv = shape.heads * shape.dim, shape.groups * shape.dim
        linears = [(q, d), (kv, d), (kv, d), (d, q), (2 * inner, d), (d, inner)]  # q, k, v, o, gate_up, down
        per_layer = sum(linear_weight_bytes(r, k, setting) for r, k in linears)
        per_layer += (q + 2 * kv) * c + 2 * d * c  # the query/key/value biases, two RMSNorm weights
        rotary = 2 * 4 * (shape.dim // 4)  # the rotary module's two float32 inverse-frequency buffers
        return shape.layers * per_layer + d * c + rotary  # + the final RMSNorm

    def parameter_count(self, shape: ModelShape) -> int:
        d, inner = shape.hidden, shape.inner
        q, kv = shape.heads * shape.dim, shape.groups * shape.dim
        block = d * (q + 2 * kv) + (q + 2 * kv) + q * d + 3 * d * inner + 2 * d
        return shape.layers * block + d

    def block_activation_bytes(self, shape: ModelShape, c: int) -> int:
        b, s, d = shape.batch, shape.seq, shape.hidden
        t, k = b * s, shape.pre_seq_len + s
        q = shape.heads * shape.dim
        return (
            2 * 4 * t * (d + 1)  # two RMSNorms: float32 input copy and reciprocal RMS
            + c * t * 2 * q  # query, attention output
            + c * 2 * b * k * q  # keys and values (prefix included) repeated to the query heads
            + 4 * b * shape.heads * s  # attention log-sum-exp (float32)
            + c * s * k  # the float mask SDPA makes of the bool mask, one for the batch (no padding mask in training)
            + c * t * 3 * shape.inner  # SwiGLU: gate/up output [T, 2F] and SiLU output [T, F]
        )

    def shared_activation_bytes(self, shape: ModelShape, c: int) -> int:
        # the rotary cos/sin tables, one for the batch, D/2 wide; the final norm keeps what the first block's
        # first norm does not (its input, the frozen embedding's output, needs no gradient), so the blocks'
        # two norms each count it already
        return c * 2 * shape.seq * shape.dim // 2
