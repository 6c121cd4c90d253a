"""Memory of P-Tuning v2 training from the model shape alone: weight bytes and the peak of a train step at
fp32 / bf16 / int8 / int4 (``python -m ptuning.memory``).

The estimate counts the tensors a train step holds at its peak, which is the start of the backward pass
(the loss's gradient against the vocabulary), when every saved activation is still alive:

* **weights**: exactly as :func:`ptuning.quantization.weight_bytes` counts them (torchao int8 = 1 byte
  per weight + a float32 scale and an int8 zero point per output channel; NF4 = half a byte per weight +
  an int8 scale per 64 weights + the scales' own scales); biases, norms, embeddings and ``lm_head`` in the
  compute dtype (float32 for fp32, else 16-bit); the prefix in float32;
* **prefix training state**: its gradient and AdamW's two moments (float32);
* **activations** autograd saves per block for the gradient of the input only (the backbone is frozen): what
  each family's architecture keeps (its :class:`ArchitectureMemory`, from
  :meth:`~ptuning.models.base.Family.train_memory`); with gradient checkpointing only each block's input,
  plus one block recomputed during the backward;
* **logits**: for ``model(ids, labels=...)``, the ``[B, S, V]`` logits in the compute dtype (the output keeps
  them) and three float32 ``[B, S-1, V]`` tensors of the loss (log-softmax output, its gradient and the
  gradient of its input); when only the ``n`` positions per example that predict a target are projected
  (``logit_positions``, the training loop's call), the ``[B·n, V]`` logits in the compute dtype, which the
  fused loss (:class:`ptuning.models.loss.FusedCrossEntropy`) overwrites with their gradient, and two
  float32 tensors of its block of rows (the float32 copy and the softmax).

Process overhead (the CUDA context or the CPU process's own RSS) is not included. The command's default
shape is the real ChatGLM-6B with the original's P-Tuning v2 recipe (pre_seq_len 128, batch 1, 64 + 64
tokens) as our training loop runs it (logits only where a target is predicted).

The architectures are the families' (:mod:`ptuning.models.chatglm.memory`: ChatGLM-6B, ``architecture
"chatglm"``; :mod:`ptuning.models.hf.memory`: transformers' decoders, Llama, Qwen2/3, GLM and GLM-4,
``"decoder"``; :mod:`ptuning.models.chatglm2.memory`: ChatGLM2/3 as GLM on ``GlmForCausalLM``, ``"glm"``), written on
what :mod:`ptuning.models.memory` gives them (:class:`ModelShape`, the bytes of a weight at each setting);
``--model`` offers the published shapes they name.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

from .models import family_for
from .models.loss import BLOCK_ELEMENTS as LOSS_BLOCK_ELEMENTS
from .models.memory import (
    SETTINGS,
    ArchitectureMemory,
    ModelShape,
    architecture,
    architectures,
    compute_bytes,
    linear_weight_bytes,
    memory_of,
)
from .paths import PACKAGE_SCHEME, package_file

GIB = 2**30
MIB = 2**20
DEFAULT_PRE_SEQ_LEN = ModelShape.pre_seq_len  # the original recipe's 128 (--pre-seq-len)


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


def prefix_bytes(shape: ModelShape) -> int:
    """The prefix encoder's float32 parameters (with projection: an embedding E wide, the MLP E -> H -> K)."""
    if not shape.pre_seq_len:
        return 0
    kv = shape.kv_width
    if shape.prefix_projection:
        h = shape.hidden
        embedding = architecture(shape.architecture).prefix_embedding_width(shape)
        return 4 * (shape.pre_seq_len * embedding + embedding * h + h + h * kv + kv)
    return 4 * shape.pre_seq_len * kv


def embedding_count(shape: ModelShape) -> int:
    """Parameters of the input embedding and the output projection (one matrix when tied)."""
    return shape.vocab * shape.hidden * (1 if shape.tied_embeddings else 2)


def weight_bytes(shape: ModelShape, setting: str) -> int:
    """Bytes of every weight of the model at ``setting`` (fp32, bf16, int8 or int4)."""
    blocks = architecture(shape.architecture).weight_bytes(shape, setting)
    return blocks + embedding_count(shape) * compute_bytes(setting) + prefix_bytes(shape)


def estimate(shape: ModelShape, setting: str) -> Estimate:
    """The peak of one train step (forward, backward, AdamW on the prefix) at ``setting``."""
    formulas = architecture(shape.architecture)
    c = compute_bytes(setting)
    b, s, d = shape.batch, shape.seq, shape.hidden
    t = b * s
    block = formulas.block_activation_bytes(shape, c)
    prefix_kv = b * shape.pre_seq_len * shape.kv_width  # elements of the per-layer prefix keys/values
    shared = (
        formulas.shared_activation_bytes(shape, c)
        + b * s * (shape.pre_seq_len + s)  # the bool mask
        + prefix_kv  # the prefix dropout's mask (bool)
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
    """A markdown table of the estimate at each setting: in GiB, or in MiB for a model whose fp32 training peak
    is under 1 GiB (a small model's numbers would all read 0.00 GiB)."""
    unit, size = ("GiB", GIB) if estimate(shape, "fp32").total >= GIB else ("MiB", MIB)
    rows = [
        f"| setting | weights {unit} | prefix + AdamW {unit} | activations {unit} | logits + loss {unit} | "
        f"training peak {unit} |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for setting in settings:
        e = estimate(shape, setting)
        rows.append(
            f"| {setting} | {e.weights / size:.2f} | {e.prefix_state / size:.3f} | {e.activations / size:.3f} | "
            f"{e.logits / size:.3f} | {e.total / size:.2f} |"
        )
    return "\n".join(rows)


def count(n: float) -> str:
    """A parameter count as the summary prints it: ``6.25 B``, ``134.7 M``, or exactly (``16,384``) under a
    million."""
    if n >= 1e9:
        return f"{n / 1e9:.2f} B"
    if n >= 1e6:
        return f"{n / 1e6:.2f} M"
    return f"{round(n):,}"


@cache
def presets() -> dict[str, ModelShape]:
    """The published shapes (``--model``), by name, from every family's formulas."""
    return {name: shape for formulas in architectures().values() for name, shape in formulas.presets.items()}


def __getattr__(name: str):
    if name == "PRESETS":  # the published shapes, collected from the families on first use
        return presets()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def config_shape(path: str | Path) -> ModelShape:
    """The shape of a model folder (or its ``config.json``), or of a ``.gguf`` file (also as
    ``package:<module>/<file>``), read by its family. The prefix is the config's ``pre_seq_len``, or
    :data:`DEFAULT_PRE_SEQ_LEN` where it sets none (a backbone's config).

    Raises:
        ValueError: no family takes the folder, or its family has no memory formulas (one line).
    """
    if str(path).startswith(PACKAGE_SCHEME):  # a file of an installed package, as model.path takes it
        path = package_file(str(path))
    folder = Path(path)
    folder = folder.parent if folder.name == "config.json" else folder
    formulas = memory_of(family_for(folder))
    config = formulas.read_config(folder)
    if getattr(config, "pre_seq_len", None) is None:  # a backbone's config: the default prefix (--pre-seq-len)
        return formulas.shape(config, pre_seq_len=DEFAULT_PRE_SEQ_LEN)
    return formulas.shape(config)


def _shape_from_args(args: argparse.Namespace) -> ModelShape:
    base = config_shape(args.config) if args.config else presets()[args.model or "chatglm-6b"]
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
        "--config", help="a model folder or its config.json, of any supported family, or a .gguf file (also "
        "package:<module>/<file>) (instead of --model)"
    )
    parser.add_argument("--model", choices=sorted(presets()),
                        help="a published model's shape (default chatglm-6b)")
    parser.add_argument("--pre-seq-len", type=int,
                        help=f"prefix length (default: the pre_seq_len that --config's config.json sets, else "
                        f"{DEFAULT_PRE_SEQ_LEN})")
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
    if args.config and args.model:
        parser.error(f"--config {args.config} and --model {args.model}: give one (--config reads a model's shape "
                     "instead of --model's published one)")
    try:
        shape = _shape_from_args(args)
    except ValueError as err:
        # a reader's message may already start with the file it names
        said = str(err)
        parser.error(f"--config: {said}" if args.config and said.startswith(str(args.config))
                     else f"--config {args.config}: {said}")
    for key in ("batch", "seq", "layers", "hidden", "heads", "inner", "vocab"):
        if getattr(shape, key) <= 0:
            parser.error(f"{key} must be positive, got {getattr(shape, key)}")
    if shape.pre_seq_len < 0 or shape.seq < 2:
        parser.error("pre_seq_len must be >= 0 and seq >= 2")
    if shape.logit_positions is not None and not 0 < shape.logit_positions < shape.seq:
        parser.error(f"--logit-positions {shape.logit_positions}: must be 0 (all) or between 1 and seq - 1 = "
                     f"{shape.seq - 1} (--seq {shape.seq})")
    if args.json:
        out = {s: {**asdict(estimate(shape, s)), "total": estimate(shape, s).total} for s in SETTINGS}
        print(json.dumps({"shape": asdict(shape), "estimate_bytes": out}, indent=2))
        return
    groups = f" ({shape.groups} key/value heads of {shape.dim})" if shape.kv_heads else ""
    print(
        f"{architecture(shape.architecture).label} shape: vocab {shape.vocab}, hidden "
        f"{shape.hidden}, {shape.layers} layers, {shape.heads} heads{groups}, inner {shape.inner}; pre_seq_len {shape.pre_seq_len}{' with projection' if shape.prefix_projection else ''}, "
        f"batch {shape.batch} x {shape.seq} tokens, gradient checkpointing {'on' if shape.checkpointing else 'off'}, "
        f"logits at {shape.logit_positions or 'all'} positions per example"
    )
    print()
    print(table(shape))
    print()
    print("Tensors only: add the process overhead (CUDA context ~0.5 GiB; CPU process ~0.4 GiB RSS).")
    print(
        f"Parameters: {count(_param_count(shape))} (embeddings {'tied' if shape.tied_embeddings else 'separate'}); "
        f"prefix {count(prefix_bytes(shape) // 4)}."
    )


def _param_count(shape: ModelShape) -> float:
    formulas = architecture(shape.architecture)
    return formulas.parameter_count(shape) + embedding_count(shape) + prefix_bytes(shape) / 4


if __name__ == "__main__":
    main()


__all__ = [
    "SETTINGS",
    "ArchitectureMemory",
    "Estimate",
    "ModelShape",
    "architecture",
    "architectures",
    "compute_bytes",
    "config_shape",
    "estimate",
    "linear_weight_bytes",
    "memory_of",
    "presets",
    "table",
    "weight_bytes",
]
