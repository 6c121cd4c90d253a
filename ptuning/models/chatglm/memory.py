"""ChatGLM-6B's part of the training memory estimate (:mod:`ptuning.memory`, ``architecture "chatglm"``).

Per block autograd keeps, for the gradient of the input only (the backbone is frozen): both layer-norm inputs
and statistics, the query, the keys and values including the prefix, the attention output and its
log-sum-exp, the float attention mask SDPA builds, the GELU input. Every linear has a bias; the prefix
projection's embedding is ``hidden_size`` wide.

Shapes: B batch, S tokens, T = B·S, P prefix length, d hidden size, V vocabulary.
"""

from __future__ import annotations

from pathlib import Path

from ..memory import ModelShape, compute_bytes, linear_weight_bytes
from .config import ChatGLMConfig


class ChatGLMMemory:
    """The formulas of :class:`~ptuning.models.memory.ArchitectureMemory` for ChatGLM-6B."""

    name = "chatglm"
    label = "ChatGLM"
    #: the published shape (``ModelShape``'s defaults are the real ChatGLM-6B)
    presets = {"chatglm-6b": ModelShape()}

    def shape(self, config: ChatGLMConfig, **overrides) -> ModelShape:
        values = dict(
            architecture=self.name,
            vocab=config.vocab_size,
            hidden=config.hidden_size,
            layers=config.num_layers,
            heads=config.num_attention_heads,
            inner=config.inner_hidden_size,
            pre_seq_len=config.pre_seq_len or 0,
            prefix_projection=bool(config.prefix_projection),
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )
        return ModelShape(**{**values, **overrides})

    def read_config(self, folder: Path) -> ChatGLMConfig:
        return ChatGLMConfig.from_pretrained(str(folder))

    def prefix_embedding_width(self, shape: ModelShape) -> int:
        return shape.hidden

    def weight_bytes(self, shape: ModelShape, setting: str) -> int:
        c = compute_bytes(setting)
        d, inner = shape.hidden, shape.inner
        linears = [(3 * d, d), (d, d), (inner, d), (d, inner)]  # (out, in): qkv, dense, h->4h, 4h->h
        per_layer = sum(linear_weight_bytes(r, k, setting) + r * c for r, k in linears)  # weights + biases
        per_layer += 2 * 2 * d * c  # two layer norms
        return shape.layers * per_layer + 2 * d * c  # + the final layer norm

    def parameter_count(self, shape: ModelShape) -> int:
        d, inner = shape.hidden, shape.inner
        block = 4 * d * d + 2 * d * inner + 3 * d + d + inner + d + 4 * d
        return shape.layers * block + 2 * d

    def block_activation_bytes(self, shape: ModelShape, c: int) -> int:
        b, s, d = shape.batch, shape.seq, shape.hidden
        t, k = b * s, shape.pre_seq_len + s
        return (
            c * t * (2 * d + 4)  # two layer-norm inputs, their mean and rstd
            + c * t * 2 * d  # query, attention output
            + c * 2 * b * k * d  # keys and values, prefix included
            + 4 * b * shape.heads * s  # attention log-sum-exp (float32)
            + c * b * s * k  # the float mask SDPA makes of the bool mask
            + c * t * shape.inner  # GELU input
        )

    def shared_activation_bytes(self, shape: ModelShape, c: int) -> int:
        t, d = shape.batch * shape.seq, shape.hidden
        rotary = c * 2 * t * d // shape.heads  # the 2D rotary cos/sin tables, per row
        final_norm = c * t * (d + 2)  # the final layer norm's input and statistics
        return rotary + final_norm
