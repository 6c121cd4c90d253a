"""Memory of P-Tuning v2 training from the model shape alone: weight bytes and the peak of a train step at
fp32 / bf16 / int8 / int4 (``python -m ptuning.memory``).

The estimate counts the tensors a train step holds at its peak, which is the start of the backward pass
(the loss's gradient against the vocabulary), when every saved activation is still alive:

* **weights**: exactly as :func:`ptuning.quantization.weight_bytes` counts them (torchao int8 = 1 byte
  per weight + a float32 scale and an int8 zero point per output channel; NF4 = half a byte per weight +
  an int8 scale per 64 weights + the scales' own scales); biases, norms, embeddings and ``lm_head`` in the
  compute dtype (float32 for fp32, else 16-bit); the prefix in float32;
* **prefix training state**: its gradient and AdamW's two moments (float32);
* **activations** autograd saves per block for the gradient of the input only (the backbone is frozen):
  both layer-norm inputs and statistics, the query, the keys and values including the prefix, the attention
  output and its log-sum-exp, the float attention mask SDPA builds, the GELU input; with gradient
  checkpointing only each block's input, plus one block recomputed during the backward;
* **logits**: for ``model(ids, labels=...)``, the ``[B, S, V]`` logits in the compute dtype (the output keeps
  them) and three float32 ``[B, S-1, V]`` tensors of the loss (log-softmax output, its gradient and the
  gradient of its input); when only the ``n`` positions per example that predict a target are projected
  (``logit_positions``, the training loop's call), the ``[B·n, V]`` logits in the compute dtype, which the
  fused loss (:class:`ptuning.models.loss.FusedCrossEntropy`) overwrites with their gradient, and two
  float32 tensors of its block of rows (the float32 copy and the softmax).

Process overhead (the CUDA context or the CPU process's own RSS) is not included. The command's default
shape is the real ChatGLM-6B with the original's P-Tuning v2 recipe (pre_seq_len 128, batch 1, 64 + 64
tokens) as our training loop runs it (logits only where a target is predicted).

``architecture="glm"`` is ChatGLM2-6B / ChatGLM3-6B on transformers' ``GlmForCausalLM`` (``--model
chatglm3-6b``): grouped-query attention (G key/value heads of D, the prefix G·D wide per layer), a bias on
the query/key/value projections only, RMSNorm (its input is kept as a float32 copy and its float32 reciprocal
RMS), SwiGLU (the ``[T, 2F]`` gate/up output and the ``[T, F]`` SiLU output are kept), untied output layer,
and SDPA given the keys/values expanded to the N query heads (transformers repeats them whenever a mask is
passed, which the prefix always is).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from .models.chatglm import ChatGLMConfig
from .models.chatglm2.config import parse_original_config

SETTINGS = ("fp32", "bf16", "int8", "int4")
ARCHITECTURES = ("chatglm", "glm")
NF4_BLOCK = 64
NF4_SCALER_BLOCKS = (256, 128, 64, 32, 16, 8, 4, 2, 1)
GIB = 2**30
LOSS_BLOCK_ELEMENTS = 1 << 21  # ptuning.models.loss.BLOCK_ELEMENTS (this module imports no torch)


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs: the architecture, the prefix and the batch. Defaults: real ChatGLM-6B.

    ``architecture`` "chatglm" is ChatGLM-6B (``inner`` = the GELU MLP width, every linear with a bias);
    "glm" is ChatGLM2/3 (``inner`` = ffn_hidden_size of the SwiGLU, ``kv_heads`` key/value heads of
    ``head_dim``; see the module).
    """

    vocab: int = 130528
    hidden: int = 4096
    layers: int = 28
    heads: int = 32
    inner: int = 16384
    pre_seq_len: int = 128
    prefix_projection: bool = False
    tied_embeddings: bool = False
    batch: int = 1
    seq: int = 128
    checkpointing: bool = False
    logit_positions: int | None = None  # project only this many positions per example to the vocabulary
    architecture: str = "chatglm"
    kv_heads: int | None = None  # None: one per attention head
    head_dim: int | None = None  # None: hidden // heads

    @property
    def groups(self) -> int:
        """G: the key/value heads."""
        return self.kv_heads or self.heads

    @property
    def dim(self) -> int:
        """D: the head size."""
        return self.head_dim or self.hidden // self.heads

    @property
    def kv_width(self) -> int:
        """K = 2·L·G·D: the prefix width per position."""
        return 2 * self.layers * self.groups * self.dim

    @classmethod
    def from_config(cls, config, **overrides) -> ModelShape:
        """The shape of a :class:`~ptuning.models.chatglm.ChatGLMConfig` or of a ChatGLM2/3 ``GlmConfig`` (the
        loaded model's); ``overrides`` set batch, seq, checkpointing..."""
        if hasattr(config, "intermediate_size"):  # GlmConfig (ChatGLM2/3 mapped onto GlmForCausalLM)
            values = dict(
                architecture="glm",
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
            values.update(overrides)
            return cls(**values)
        values = dict(
            vocab=config.vocab_size,
            hidden=config.hidden_size,
            layers=config.num_layers,
            heads=config.num_attention_heads,
            inner=config.inner_hidden_size,
            pre_seq_len=config.pre_seq_len or 0,
            prefix_projection=bool(config.prefix_projection),
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )
        values.update(overrides)
        return cls(**values)


@dataclass(frozen=True)
class Estimate:
    """Bytes of each part of a train step's peak; ``total`` is their sum."""

    setting: str
    weights: int
    prefix_state: int
    activations: int
    logits: int

    @property
    def total(self) -> int:
        return self.weights + self.prefix_state + self.activations + self.logits


def compute_bytes(setting: str) -> int:
    """Bytes per element of everything but the prefix: float32 for fp32, else 16-bit."""
    if setting not in SETTINGS:
        raise ValueError(f"setting {setting!r}: expected one of {', '.join(SETTINGS)}")
    return 4 if setting == "fp32" else 2


def _linear_weight_bytes(rows: int, cols: int, setting: str) -> int:
    n = rows * cols
    if setting == "int8":
        return n + rows * (4 + 1)  # int8 codes, float32 scale and int8 zero point per output channel
    if setting == "int4":
        blocks = n // NF4_BLOCK
        scaler_block = next(s for s in NF4_SCALER_BLOCKS if blocks % s == 0)
        # codes two per byte, an int8 scale per block, a 16-bit factor per scaler block, the mean, the 16-entry table
        return n // 2 + blocks + 2 * (blocks // scaler_block) + 2 + 2 * 16
    return n * compute_bytes(setting)


def prefix_bytes(shape: ModelShape) -> int:
    """The prefix encoder's float32 parameters (ChatGLM2/3: K = 2·L·G·D wide, its projection embedding K
    wide too)."""
    if not shape.pre_seq_len:
        return 0
    kv = shape.kv_width
    if shape.prefix_projection:
        h = shape.hidden
        embedding = kv if shape.architecture == "glm" else h
        return 4 * (shape.pre_seq_len * embedding + embedding * h + h + h * kv + kv)
    return 4 * shape.pre_seq_len * kv


def weight_bytes(shape: ModelShape, setting: str) -> int:
    """Bytes of every weight of the model at ``setting`` (fp32, bf16, int8 or int4)."""
    c = compute_bytes(setting)
    d, inner = shape.hidden, shape.inner
    if shape.architecture == "glm":
        q, kv = shape.heads * shape.dim, shape.groups * shape.dim
        linears = [(q, d), (kv, d), (kv, d), (d, q), (2 * inner, d), (d, inner)]  # q, k, v, o, gate_up, down
        per_layer = sum(_linear_weight_bytes(r, k, setting) for r, k in linears)
        per_layer += (q + 2 * kv) * c + 2 * d * c  # the query/key/value biases, two RMSNorm weights
        embeddings = shape.vocab * d * c * (1 if shape.tied_embeddings else 2)
        rotary = 2 * 4 * (shape.dim // 4)  # the rotary module's two float32 inverse-frequency buffers
        return shape.layers * per_layer + d * c + embeddings + rotary + prefix_bytes(shape)
    linears = [(3 * d, d), (d, d), (inner, d), (d, inner)]  # (out, in): qkv, dense, h->4h, 4h->h
    per_layer = sum(_linear_weight_bytes(r, k, setting) + r * c for r, k in linears)  # weights + biases
    per_layer += 2 * 2 * d * c  # two layer norms
    embeddings = shape.vocab * d * c * (1 if shape.tied_embeddings else 2)
    return shape.layers * per_layer + 2 * d * c + embeddings + prefix_bytes(shape)


def _block_activation_bytes(shape: ModelShape, c: int) -> int:
    """What autograd keeps for one block's backward to its input."""
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


def _glm_block_activation_bytes(shape: ModelShape, c: int) -> int:
    """What autograd keeps for one ChatGLM2/3 block's backward to its input (see the module)."""
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


def estimate(shape: ModelShape, setting: str) -> Estimate:
    """The peak of one train step (forward, backward, AdamW on the prefix) at ``setting``."""
    if shape.architecture not in ARCHITECTURES:
        raise ValueError(f"architecture {shape.architecture!r}: expected one of {', '.join(ARCHITECTURES)}")
    c = compute_bytes(setting)
    b, s, d = shape.batch, shape.seq, shape.hidden
    t = b * s
    glm = shape.architecture == "glm"
    block = _glm_block_activation_bytes(shape, c) if glm else _block_activation_bytes(shape, c)
    prefix_kv = b * shape.pre_seq_len * shape.kv_width  # elements of the per-layer prefix keys/values
    # rotary cos/sin tables (ChatGLM2/3: one for the batch, D/2 wide); the final norm's input and statistics
    # (ChatGLM2/3: what it keeps equals what the first block's first norm does not keep, its input being the
    # frozen embedding's output, which needs no gradient; so the blocks' two norms each count it already)
    rotary = c * 2 * s * shape.dim // 2 if glm else c * 2 * t * shape.hidden // shape.heads
    final_norm = 0 if glm else c * t * (d + 2)
    shared = (
        rotary
        + b * s * (shape.pre_seq_len + s)  # the bool mask
        + prefix_kv  # the prefix dropout's mask (bool)
        + final_norm
        + 8 * t  # the token ids the embedding keeps
    )
    if shape.checkpointing:
        # each block keeps its input and the prefix tensors it was given; one block is recomputed at a time
        activations = shared + shape.layers * c * t * d + c * prefix_kv + block
    else:
        activations = shared + shape.layers * block
    if shape.logit_positions is None:
        logits = c * t * shape.vocab + 3 * 4 * b * (s - 1) * shape.vocab
    else:
        rows = b * shape.logit_positions
        block = min(rows, max(1, LOSS_BLOCK_ELEMENTS // shape.vocab))  # the fused loss's rows at a time
        logits = c * rows * shape.vocab + 2 * 4 * block * shape.vocab  # + their float32 copy and softmax
    return Estimate(
        setting=setting,
        weights=weight_bytes(shape, setting),
        prefix_state=3 * prefix_bytes(shape),
        activations=activations,
        logits=logits,
    )


def table(shape: ModelShape, settings=SETTINGS) -> str:
    """A markdown table of the estimate at each setting (GiB)."""
    rows = [
        "| setting | weights GiB | prefix + AdamW GiB | activations GiB | logits + loss GiB | training peak GiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for setting in settings:
        e = estimate(shape, setting)
        rows.append(
            f"| {setting} | {e.weights / GIB:.2f} | {e.prefix_state / GIB:.3f} | {e.activations / GIB:.3f} | "
            f"{e.logits / GIB:.3f} | {e.total / GIB:.2f} |"
        )
    return "\n".join(rows)


# the published shapes (--model); ChatGLM2-6B and ChatGLM3-6B (and their -base / -32k) share theirs
PRESETS = {
    "chatglm-6b": ModelShape(),
    "chatglm2-6b": ModelShape(architecture="glm", vocab=65024, hidden=4096, layers=28, heads=32, kv_heads=2,
                              head_dim=128, inner=13696),
}
PRESETS["chatglm3-6b"] = PRESETS["chatglm2-6b"]


def _config_shape(path: str) -> ModelShape:
    """The shape of a model folder or config.json: ChatGLM-6B, or ChatGLM2/3 (original keys)."""
    folder = Path(path)
    folder = folder.parent if folder.name == "config.json" else folder
    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if "ffn_hidden_size" in raw:
        return ModelShape.from_config(parse_original_config(raw, folder / "config.json", 3).glm_config())
    return ModelShape.from_config(ChatGLMConfig.from_pretrained(str(folder)))


def _shape_from_args(args: argparse.Namespace) -> ModelShape:
    if args.config:
        base = _config_shape(args.config)
    else:
        base = PRESETS[args.model]
    overrides = {
        key: value
        for key, value in dict(
            pre_seq_len=args.pre_seq_len,
            prefix_projection=args.prefix_projection,
            tied_embeddings=args.tied_embeddings,
            batch=args.batch,
            seq=args.seq,
            checkpointing=args.gradient_checkpointing,
        ).items()
        if value is not None
    }
    values = asdict(base)
    values.update(overrides)
    # the training loop projects only the positions that predict a target: the second half of the
    # default 64 + 64 recipe; 0 = every position, logits kept (a plain model(ids, labels=...) call)
    positions = values["seq"] // 2 if args.logit_positions is None else args.logit_positions
    values["logit_positions"] = positions or None
    return ModelShape(**values)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ptuning.memory",
        description="Estimated weight bytes and P-Tuning v2 training peak memory at fp32 / bf16 / int8 / int4, "
        "from the model shape alone (default: the real ChatGLM-6B, pre_seq_len 128, batch 1, 64 + 64 tokens).",
    )
    parser.add_argument(
        "--config", help="a ChatGLM-6B / ChatGLM2-6B / ChatGLM3-6B config.json or model folder (instead of --model)"
    )
    parser.add_argument("--model", choices=sorted(PRESETS), default="chatglm-6b",
                        help="a published model's shape (default chatglm-6b)")
    parser.add_argument("--pre-seq-len", type=int)
    parser.add_argument("--prefix-projection", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument(
        "--tied-embeddings",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="lm_head shares the word embeddings (default: separate, as ChatGLMConfig)",
    )
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq", type=int, help="tokens per example (source + target)")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument(
        "--logit-positions",
        type=int,
        help="positions per example that predict a target, the only ones the training loop projects to the "
        "vocabulary (default: half of --seq, as the 64 + 64 recipe; 0: every position, logits kept, as a plain "
        "model(ids, labels=...) call)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    shape = _shape_from_args(args)
    for key in ("batch", "seq", "layers", "hidden", "heads", "inner", "vocab"):
        if getattr(shape, key) <= 0:
            parser.error(f"{key} must be positive, got {getattr(shape, key)}")
    if shape.pre_seq_len < 0 or shape.seq < 2:
        parser.error("pre_seq_len must be >= 0 and seq >= 2")
    if shape.logit_positions is not None and not 0 < shape.logit_positions < shape.seq:
        parser.error("--logit-positions must be 0 (all) or between 1 and seq - 1")
    if args.json:
        out = {s: {**asdict(estimate(shape, s)), "total": estimate(shape, s).total} for s in SETTINGS}
        print(json.dumps({"shape": asdict(shape), "estimate_bytes": out}, indent=2))
        return
    groups = f" ({shape.groups} key/value heads of {shape.dim})" if shape.architecture == "glm" else ""
    print(
        f"{'ChatGLM2/3' if shape.architecture == 'glm' else 'ChatGLM'} shape: vocab {shape.vocab}, hidden "
        f"{shape.hidden}, {shape.layers} layers, {shape.heads} heads{groups}, inner {shape.inner}; pre_seq_len {shape.pre_seq_len}{' with projection' if shape.prefix_projection else ''}, "
        f"batch {shape.batch} x {shape.seq} tokens, gradient checkpointing {'on' if shape.checkpointing else 'off'}, "
        f"logits at {shape.logit_positions or 'all'} positions per example"
    )
    print()
    print(table(shape))
    print()
    print("Tensors only: add the process overhead (CUDA context ~0.5 GiB; CPU process ~0.4 GiB RSS).")
    print(
        f"Parameters: {_param_count(shape) / 1e9:.2f} B (embeddings {'tied' if shape.tied_embeddings else 'separate'}); "
        f"prefix {prefix_bytes(shape) // 4 / 1e6:.2f} M."
    )


def _param_count(shape: ModelShape) -> float:
    d, inner = shape.hidden, shape.inner
    if shape.architecture == "glm":
        q, kv = shape.heads * shape.dim, shape.groups * shape.dim
        block = d * (q + 2 * kv) + (q + 2 * kv) + q * d + 3 * d * inner + 2 * d
        return shape.layers * block + d + shape.vocab * d * (1 if shape.tied_embeddings else 2) + prefix_bytes(shape) / 4
    block = 4 * d * d + 2 * d * inner + 3 * d + d + inner + d + 4 * d
    return (
        shape.layers * block
        + 2 * d
        + shape.vocab * d * (1 if shape.tied_embeddings else 2)
        + prefix_bytes(shape) / 4
    )


if __name__ == "__main__":
    main()


__all__ = ["ARCHITECTURES", "PRESETS", "SETTINGS", "Estimate", "ModelShape", "compute_bytes", "estimate", "math", "table", "weight_bytes"]
