"""What the families' memory formulas share: the shape they read (:class:`ModelShape`), what each family's
formulas answer (:class:`ArchitectureMemory`, from :meth:`~ptuning.models.base.Family.train_memory`), the bytes of
a weight at each setting, and which family has which formulas.

The estimate of a train step and the command are :mod:`ptuning.memory`, which asks these; the families'
formulas (``models/*/memory.py``) build on them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Protocol

from ..quantization import NF4_BLOCK, NF4_SCALER_BLOCKS
from . import FAMILIES, family_of

SETTINGS = ("fp32", "bf16", "int8", "int4")


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs: the architecture, the prefix and the batch. Defaults: real ChatGLM-6B.

    ``architecture`` names the family formulas that read it (:func:`architecture`): "chatglm" is ChatGLM-6B
    (``inner`` = the GELU MLP width), "glm" is ChatGLM2/3 (``inner`` = the SwiGLU's ffn_hidden_size,
    ``kv_heads`` key/value heads of ``head_dim``), "decoder" is a transformers decoder (Llama, Qwen2/3, GLM,
    GLM-4), whose blocks differ as ``model_type``, ``attention_bias``, ``mlp_bias`` and ``rotary_dim`` say
    (:mod:`ptuning.models.hf.memory`; ChatGLM2/3 run as GLM).
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
    model_type: str | None = None  # transformers' model_type of a decoder's blocks ("llama", "glm4", ...)
    attention_bias: bool = False  # the config's attention_bias (biases of the query/key/value projections ...)
    mlp_bias: bool = False  # Llama's mlp_bias
    rotary_dim: int | None = None  # the rotated part of a head; None: all of it

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
        """The shape of a loaded model's config (its family's :meth:`ArchitectureMemory.shape`); ``overrides``
        set batch, seq, checkpointing...

        Raises:
            ValueError: the config's family has no memory formulas.
        """
        return memory_of(family_of(config)).shape(config, **overrides)


class ArchitectureMemory(Protocol):
    """What one family's architecture adds to the estimate (:meth:`~ptuning.models.base.Family.train_memory`).

    Attributes:
        name: ``ModelShape.architecture`` of its shapes.
        label: how the command's first line calls it.
        presets: published shapes (``--model``) by name.
    """

    name: str
    label: str
    presets: dict[str, ModelShape]

    def shape(self, config, **overrides) -> ModelShape:
        """The shape of a config of the family (``overrides`` set batch, seq, ...)."""
        ...

    def read_config(self, folder: Path) -> Any:
        """A model folder's config, as far as the sizes go (``--config``)."""
        ...

    def prefix_embedding_width(self, shape: ModelShape) -> int:
        """E: the prefix embedding's width with ``prefix_projection``."""
        ...

    def weight_bytes(self, shape: ModelShape, setting: str) -> int:
        """Bytes of the blocks, the final norm and any buffers (not the embeddings and the prefix, which
        :func:`ptuning.memory.weight_bytes` adds)."""
        ...

    def parameter_count(self, shape: ModelShape) -> int:
        """Parameters of the blocks and the final norm (not the embeddings and the prefix)."""
        ...

    def block_activation_bytes(self, shape: ModelShape, c: int) -> int:
        """What autograd keeps for one block's backward to its input (``c`` bytes per compute element)."""
        ...

    def shared_activation_bytes(self, shape: ModelShape, c: int) -> int:
        """What the blocks share or the model keeps outside them (rotary tables, the final norm)."""
        ...


def compute_bytes(setting: str) -> int:
    """Bytes per element of everything but the prefix: float32 for fp32, else 16-bit."""
    if setting not in SETTINGS:
        raise ValueError(f"setting {setting!r}: expected one of {', '.join(SETTINGS)}")
    return 4 if setting == "fp32" else 2


def linear_weight_bytes(rows: int, cols: int, setting: str) -> int:
    """Bytes of a ``[rows, cols]`` linear weight at ``setting`` (its bias not included)."""
    n = rows * cols
    if setting == "int8":
        return n + rows * (4 + 1)  # int8 codes, float32 scale and int8 zero point per output channel
    if setting == "int4":
        blocks = n // NF4_BLOCK
        scaler_block = next(s for s in NF4_SCALER_BLOCKS if blocks % s == 0)
        # codes two per byte, an int8 scale per block, a 16-bit factor per scaler block, the mean, the 16-entry table
        return n // 2 + blocks + 2 * (blocks // scaler_block) + 2 + 2 * 16
    return n * compute_bytes(setting)


@cache
def architectures() -> dict[str, ArchitectureMemory]:
    """The memory formulas of every family that has them, by ``ModelShape.architecture``."""
    found = {}
    for entry in FAMILIES:
        formulas = entry.load().train_memory()
        if formulas is not None:
            found[formulas.name] = formulas
    return found


def architecture(name: str) -> ArchitectureMemory:
    """The formulas of ``ModelShape.architecture`` ``name``.

    Raises:
        ValueError: no family has formulas of that name (names the known ones).
    """
    known = architectures()
    if name not in known:
        raise ValueError(f"architecture {name!r}: expected one of {', '.join(known)}")
    return known[name]


def memory_of(family) -> ArchitectureMemory:
    """The formulas of a family.

    Raises:
        ValueError: the family has none (names it).
    """
    formulas = family.train_memory()
    if formulas is None:
        raise ValueError(f"no memory estimate for {family.label} models (python -m ptuning.memory knows "
                         f"{', '.join(a.label for a in architectures().values())})")
    return formulas


__all__ = [
    "SETTINGS",
    "ArchitectureMemory",
    "ModelShape",
    "architecture",
    "architectures",
    "compute_bytes",
    "linear_weight_bytes",
    "memory_of",
]
