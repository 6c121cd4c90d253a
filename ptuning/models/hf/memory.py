"""transformers' decoders' part of the training memory estimate (:mod:`ptuning.memory`, ``architecture
"decoder"``): Llama, Qwen2, Qwen3, GLM and GLM-4, as they run with the prefix of :mod:`ptuning.models.hf`.

Their blocks differ in a few named ways, read from the config (``ModelShape.model_type``, ``attention_bias``,
``mlp_bias``, ``rotary_dim``):

* biases: the query/key/value projections have one with ``attention_bias`` (Qwen2: always); the output
  projection too with ``attention_bias`` in Llama and Qwen3 (GLM, GLM-4, Qwen2: never); the MLP with Llama's
  ``mlp_bias``;
* the MLP is SwiGLU, its gate and up projections fused into one ``gate_up_proj`` in GLM and GLM-4;
* RMSNorms: two per block, four in GLM-4 (after attention and after the MLP as well), and Qwen3's per-head
  norms of the queries and keys;
* the rotary part of a head (GLM, GLM-4: half of it, ``partial_rotary_factor``), which sizes the rotary
  module's two float32 inverse-frequency buffers and the cos/sin tables.

Per block autograd keeps, for the gradient of the input only (the backbone is frozen): every RMSNorm's input as
a float32 copy and its float32 reciprocal RMS, the query and the attention output, the keys and values with the
prefix in front repeated to the N query heads (transformers' SDPA repeats them whenever a mask is passed, which
the prefix attention does on a CPU below 1024 tokens, see :mod:`ptuning.models.hf.attention`), the attention's
log-sum-exp, the float mask SDPA makes of the bool mask (one for the batch: no padding mask in training), and
the SwiGLU's gate and up outputs and its SiLU output (``[T, 3F]``). ChatGLM2/3 run as GLM
(:mod:`ptuning.models.chatglm2.memory`).

Shapes: B batch, S tokens, T = B·S, P prefix length, d hidden size, F intermediate size, N query heads, G key/value
heads, D head size.
"""

from __future__ import annotations

from pathlib import Path

from ..memory import ModelShape, compute_bytes, linear_weight_bytes
from .modeling import load_causal_lm_config

#: transformers ``model_type`` values whose blocks these formulas describe
MODEL_TYPES = ("llama", "qwen2", "qwen3", "glm", "glm4")
#: the published shape of SmolLM2-135M-Instruct (a Llama, tied embeddings), the real model the toolkit ships
SMOLLM2_135M = ModelShape(architecture="decoder", model_type="llama", vocab=49152, hidden=576, layers=30, heads=9,
                          kv_heads=3, head_dim=64, inner=1536, rotary_dim=64, tied_embeddings=True)


class DecoderMemory:
    """The formulas of :class:`~ptuning.models.memory.ArchitectureMemory` for transformers' decoders."""

    name = "decoder"
    label = "transformers decoder"
    presets = {"smollm2-135m": SMOLLM2_135M}

    def shape(self, config, **overrides) -> ModelShape:
        """The shape of a transformers decoder config (``overrides`` set batch, seq, ...).

        Raises:
            ValueError: a ``model_type`` these formulas do not describe.
        """
        model_type = getattr(config, "model_type", None)
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r}: the memory formulas know {', '.join(MODEL_TYPES)}")
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        rope = getattr(config, "rope_parameters", None) or {}
        rotary_fraction = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None)) or 1.0
        values = dict(
            architecture=self.name,
            model_type=model_type,
            vocab=config.vocab_size,
            hidden=config.hidden_size,
            layers=config.num_hidden_layers,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            inner=config.intermediate_size,
            attention_bias=bool(getattr(config, "attention_bias", False)),
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            rotary_dim=int(head_dim * rotary_fraction),
            pre_seq_len=getattr(config, "pre_seq_len", None) or 0,
            prefix_projection=bool(getattr(config, "prefix_projection", False)),
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )
        return ModelShape(**{**values, **overrides})

    def read_config(self, folder: Path):
        """The folder's transformers config (``AutoConfig``, never remote code)."""
        return load_causal_lm_config(folder)

    def prefix_embedding_width(self, shape: ModelShape) -> int:
        """E = H: the original P-Tuning v2's projection (:func:`ptuning.models.hf.modeling.prefix_shape`)."""
        return shape.hidden

    def weight_bytes(self, shape: ModelShape, setting: str) -> int:
        c = compute_bytes(setting)
        d, inner = shape.hidden, shape.inner
        q, kv = shape.heads * shape.dim, shape.groups * shape.dim
        mlp = [(2 * inner, d)] if _fused_gate_up(shape) else [(inner, d), (inner, d)]
        linears = [(q, d), (kv, d), (kv, d), (d, q), *mlp, (d, inner)]  # q, k, v, o, gate(_up), up, down
        per_layer = sum(linear_weight_bytes(r, k, setting) for r, k in linears)
        per_layer += (_bias_count(shape) + _norm_count(shape)) * c
        rotary = 2 * 4 * (_rotary_dim(shape) // 2)  # the rotary module's two float32 inverse-frequency buffers
        return shape.layers * per_layer + d * c + rotary  # + the final RMSNorm

    def parameter_count(self, shape: ModelShape) -> int:
        d, inner = shape.hidden, shape.inner
        q, kv = shape.heads * shape.dim, shape.groups * shape.dim
        block = d * (q + 2 * kv) + q * d + 3 * d * inner + _bias_count(shape) + _norm_count(shape)
        return shape.layers * block + d

    def block_activation_bytes(self, shape: ModelShape, c: int) -> int:
        b, s, d = shape.batch, shape.seq, shape.hidden
        t, k = b * s, shape.pre_seq_len + s
        q = shape.heads * shape.dim
        return (
            _norms_per_block(shape) * 4 * t * (d + 1)  # float32 input copy and reciprocal RMS each
            + _head_norm_bytes(shape)
            + c * t * 2 * q  # query, attention output
            + c * 2 * b * k * q  # keys and values (prefix included) repeated to the query heads
            + 4 * b * shape.heads * s  # attention log-sum-exp (float32)
            + c * s * k  # the float mask SDPA makes of the bool mask, one for the batch (no padding mask in training)
            + c * t * 3 * shape.inner  # SwiGLU: gate and up outputs [T, 2F] and SiLU output [T, F]
        )

    def shared_activation_bytes(self, shape: ModelShape, c: int) -> int:
        # the rotary cos/sin tables, one for the batch; the final norm keeps what the first block's first norm
        # does not (its input, the frozen embedding's output, needs no gradient), so the blocks' norms count it.
        # Nor do the first block's query and key norms keep anything (their input needs no gradient either);
        # with checkpointing the one block recomputed at a time is a later one.
        first_block = 0 if shape.checkpointing else _head_norm_bytes(shape)
        return c * 2 * shape.seq * _rotary_dim(shape) - first_block


def _fused_gate_up(shape: ModelShape) -> bool:
    return shape.model_type in ("glm", "glm4")


def _norms_per_block(shape: ModelShape) -> int:
    return 4 if shape.model_type == "glm4" else 2


def _norm_count(shape: ModelShape) -> int:
    """RMSNorm weights of one block."""
    per_head = 2 * shape.dim if shape.model_type == "qwen3" else 0
    return _norms_per_block(shape) * shape.hidden + per_head


def _bias_count(shape: ModelShape) -> int:
    """Bias parameters of one block."""
    q, kv = shape.heads * shape.dim, shape.groups * shape.dim
    count = q + 2 * kv if shape.attention_bias or shape.model_type == "qwen2" else 0
    if shape.attention_bias and shape.model_type in ("llama", "qwen3"):
        count += shape.hidden  # the output projection's
    if shape.mlp_bias:
        count += 2 * shape.inner + shape.hidden
    return count


def _head_norm_bytes(shape: ModelShape) -> int:
    """What Qwen3's per-head query and key RMSNorms keep in one block: float32 input copy and reciprocal RMS."""
    if shape.model_type != "qwen3":
        return 0
    t, heads = shape.batch * shape.seq, shape.heads + shape.groups
    return 4 * t * heads * shape.dim + 4 * t * heads


def _rotary_dim(shape: ModelShape) -> int:
    return shape.rotary_dim or shape.dim
