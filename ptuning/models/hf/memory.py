"""transformers' decoders' part of the training memory estimate (:mod:`ptuning.memory`, ``architecture
"transformers"``): ChatGLM2/3's formulas (:mod:`ptuning.models.chatglm2.memory`), whose architecture they share —
grouped-query attention, RMSNorm, SwiGLU, the prefix attended with SDPA — read from a transformers config (a
model folder's ``config.json``, the config in a ``.gguf`` file, or a loaded model's, whose prefix length
:func:`~ptuning.models.hf.modeling.attach_prefix` records). What differs between the decoders is counted from
the config: the attention biases (Qwen2's query/key/value always; Llama's and Qwen3's with
``attention_bias``, also on the output projection; GLM's and GLM-4's on query/key/value), Llama's
``mlp_bias``, GLM-4's two extra RMSNorms per layer, Qwen3's query/key RMSNorms, and the rotary buffers
(``inv_freq`` and ``original_inv_freq``, the rotated part of the head: ``partial_rotary_factor``).
"""

from __future__ import annotations

from pathlib import Path

from ...memory import ModelShape, compute_bytes, linear_weight_bytes
from ..chatglm2.memory import ChatGLM2Memory
from .modeling import load_causal_lm_config


class TransformersDecoderMemory(ChatGLM2Memory):
    """The formulas of :class:`~ptuning.memory.ArchitectureMemory` for Llama, Qwen2/3, GLM and GLM-4 decoders."""

    name = "transformers"
    label = "transformers decoder"
    presets: dict[str, ModelShape] = {}

    def shape(self, config, **overrides) -> ModelShape:
        """The shape of a transformers decoder config (``head_dim`` where it gives one, else hidden / heads)."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        values = dict(
            architecture=self.name,
            vocab=config.vocab_size,
            hidden=config.hidden_size,
            layers=config.num_hidden_layers,
            heads=config.num_attention_heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            inner=config.intermediate_size,
            pre_seq_len=getattr(config, "pre_seq_len", None) or 0,
            prefix_projection=bool(getattr(config, "prefix_projection", False)),
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            layer_vector_params=layer_vector_params(config, head_dim, kv_heads),
            buffer_elements=rotary_buffer_elements(config, head_dim),
        )
        return ModelShape(**{**values, **overrides})

    def read_config(self, folder: Path):
        """The folder's (or ``.gguf`` file's) transformers config, never remote code."""
        return load_causal_lm_config(folder)

    def prefix_embedding_width(self, shape: ModelShape) -> int:
        return shape.hidden  # the projection's embedding is H wide, as the original P-Tuning v2 (prefix_shape)

    def weight_bytes(self, shape: ModelShape, setting: str) -> int:
        if shape.layer_vector_params is None or shape.buffer_elements is None:
            return super().weight_bytes(shape, setting)
        c = compute_bytes(setting)
        d, inner = shape.hidden, shape.inner
        q, kv = shape.heads * shape.dim, shape.groups * shape.dim
        linears = [(q, d), (kv, d), (kv, d), (d, q), (2 * inner, d), (d, inner)]  # q, k, v, o, gate + up, down
        per_layer = sum(linear_weight_bytes(r, k, setting) for r, k in linears) + shape.layer_vector_params * c
        return shape.layers * per_layer + d * c + 4 * shape.buffer_elements  # + the final RMSNorm

    def parameter_count(self, shape: ModelShape) -> int:
        if shape.layer_vector_params is None:
            return super().parameter_count(shape)
        d, inner = shape.hidden, shape.inner
        q, kv = shape.heads * shape.dim, shape.groups * shape.dim
        return shape.layers * (d * (q + 2 * kv) + q * d + 3 * d * inner + shape.layer_vector_params) + d


def layer_vector_params(config, head_dim: int, kv_heads: int) -> int:
    """One layer's biases and norm weights (see the module for which decoder has which)."""
    d, model_type = config.hidden_size, config.model_type
    q, kv = config.num_attention_heads * head_dim, kv_heads * head_dim
    bias = bool(getattr(config, "attention_bias", False))
    if model_type == "qwen2":
        biases = q + 2 * kv
    elif model_type in ("glm", "glm4"):
        biases = (q + 2 * kv) if bias else 0
    else:  # llama, qwen3: attention_bias also gives the output projection a bias
        biases = (q + 2 * kv + d) if bias else 0
    if getattr(config, "mlp_bias", False):  # llama: gate, up, down
        biases += 2 * config.intermediate_size + d
    norms = 2 * d + (2 * d if model_type == "glm4" else 0) + (2 * head_dim if model_type == "qwen3" else 0)
    return biases + norms


def rotary_buffer_elements(config, head_dim: int) -> int:
    """``inv_freq`` and ``original_inv_freq``: half the rotated part of a head each."""
    rope = getattr(config, "rope_parameters", None) or {}
    factor = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
    return 2 * (int(head_dim * factor) // 2)
