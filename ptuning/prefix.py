"""P-Tuning v2's prefix, shared by every model family, and the one place that decides what is trainable
and what is saved.

A prefix of length ``P`` is, for every layer, ``P`` learned keys and values that every token may attend to.
They are a separate, read-only input to each layer: never rotated, never shifting positions, never written
into the generation cache (as the original P-Tuning v2 and ChatGLM2's built-in prefix use them).

Shapes: B batch, P prefix length, L layers, G key/value heads (``num_key_value_heads``; the attention heads
when the model has no grouped-query attention), D head size, K = 2·L·G·D, H hidden size.

The encoder (``PrefixEncoder``) turns the ids ``0..P-1`` into ``[P, K]``: straight from an embedding, or
with ``prefix_projection`` through ``embedding [P, E] -> Linear(E, H) -> tanh -> Linear(H, K)``. Row p
viewed as ``[2L, G, D]`` holds layer l's keys at index 2l and its values at 2l+1, groups in order (the layout
of the original ChatGLM-6B / ChatGLM2-6B prefix encoders, so their checkpoints load as they are).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .weights import CheckpointError

PREFIX_ATTRIBUTE = "prefix_encoder"


@dataclass(frozen=True)
class PrefixShape:
    """What a prefix must look like for a model.

    Attributes:
        num_layers: L.
        num_key_value_heads: G, the key/value heads per layer.
        head_dim: D.
        pre_seq_len: P.
        prefix_projection: put an MLP between the embedding and the keys/values.
        hidden_size: H, the MLP's hidden width.
        embedding_dim: E, the embedding width with ``prefix_projection`` (ChatGLM-6B and the original
            P-Tuning v2: H; ChatGLM2/3: K). Ignored without projection (the embedding is K wide).
    """

    num_layers: int
    num_key_value_heads: int
    head_dim: int
    pre_seq_len: int
    prefix_projection: bool = False
    hidden_size: int = 0
    embedding_dim: int | None = None

    @property
    def kv_width(self) -> int:
        """K = 2·L·G·D: the width of one prefix position."""
        return 2 * self.num_layers * self.num_key_value_heads * self.head_dim

    def describe(self) -> dict:
        """The sizes recorded with a checkpoint (``prefix_config.json``)."""
        return {
            "pre_seq_len": self.pre_seq_len,
            "prefix_projection": self.prefix_projection,
            "num_layers": self.num_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_size": self.hidden_size,
        }


class PrefixEncoder(nn.Module):
    """Makes the per-layer prefix keys/values of one prefix.

    Parameters (the original checkpoint keys under ``...prefix_encoder.``): ``embedding.weight`` ``[P, K]``
    (or ``[P, E]`` with projection), and with projection ``trans.0`` (E -> H) and ``trans.2`` (H -> K).
    :meth:`forward` returns ``[P, K]``.
    """

    def __init__(self, shape: PrefixShape):
        super().__init__()
        self.shape = shape
        self.pre_seq_len = shape.pre_seq_len
        self.prefix_projection = shape.prefix_projection
        k = shape.kv_width
        if shape.prefix_projection:
            if shape.hidden_size <= 0:
                raise ValueError("prefix_projection needs the hidden_size of the projection MLP")
            e = shape.embedding_dim or shape.hidden_size
            self.embedding = nn.Embedding(shape.pre_seq_len, e)
            self.trans = nn.Sequential(nn.Linear(e, shape.hidden_size), nn.Tanh(), nn.Linear(shape.hidden_size, k))
        else:
            self.embedding = nn.Embedding(shape.pre_seq_len, k)

    def forward(self) -> torch.Tensor:
        weight = self.embedding.weight  # (P, E) or (P, K): the ids are 0..P-1, so the rows in order
        return self.trans(weight) if self.prefix_projection else weight  # (P, K)


@dataclass
class PrefixKV:
    """The read-only prefix input of every layer.

    Attributes:
        keys: per layer ``[B, G, P, D]`` (not rotated).
        values: per layer ``[B, G, P, D]``.
        mask: ``[B, P]`` bool, True = visible, or None (every prefix column visible). Rows with a shorter
            prefix (several prefixes batched together, or none) hide their unused columns.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor | None = None

    @property
    def length(self) -> int:
        """P: the prefix columns (dim 2 of each layer's ``[B, G, P, D]``); 0 for no layers (no prefix)."""
        return self.keys[0].shape[2] if self.keys else 0

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keys, values)`` of layer ``i``, each ``[B, G, P, D]``.

        Raises:
            IndexError: ``i`` is not a layer of the prefix.
        """
        return self.keys[i], self.values[i]

    def __iter__(self):
        """``(keys, values)`` of each layer in order."""
        return iter(zip(self.keys, self.values, strict=True))

    def __len__(self) -> int:
        return len(self.keys)


def split_key_values(kv: torch.Tensor, shape: PrefixShape) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``[B, P, K]`` -> per-layer keys and values ``[B, G, P, D]`` (views, no copy).

    One ``unbind`` rather than 2L indexings: its backward stacks the 2L gradients once, where each
    indexing's backward would write a zero-filled ``[2L, B, G, P, D]`` tensor and add it to the others
    (work quadratic in the layer count: ~6 GB of memory traffic per step for ChatGLM-6B at P = 128)."""
    batch, length = kv.shape[:2]
    kv = kv.view(batch, length, 2 * shape.num_layers, shape.num_key_value_heads, shape.head_dim)
    layers = kv.permute(2, 0, 3, 1, 4).unbind(0)  # 2L x (B, G, P, D)
    return list(layers[0::2]), list(layers[1::2])


def prefix_key_values(
    encoder: PrefixEncoder, batch_size: int, dtype: torch.dtype, dropout: nn.Module | None = None
) -> PrefixKV:
    """The encoder's prefix for a batch: computed in float32, cast to the backbone's ``dtype``, then dropped
    out independently per batch row in training (``dropout.p``; the original's order: cast, view, dropout)."""
    kv = encoder().to(dtype)[None].expand(batch_size, -1, -1)  # (B, P, K)
    if dropout is not None and dropout.training and dropout.p > 0:
        kv = dropout(kv)  # independent per batch row
    keys, values = split_key_values(kv, encoder.shape)
    return PrefixKV(keys, values)


def no_prefix(model: nn.Module) -> PrefixKV:
    """A prefix of length 0 that fits ``model``'s layers: given as ``prefix=`` to its ``forward`` (or to
    generation), the model computes without its own prefix, as the base model it was loaded from (the
    baseline a tuned prefix is measured against).

    Raises:
        ValueError: the model has no prefix encoder (it is the base model already).
    """
    shape = model.get_submodule(prefix_module_name(model)).shape
    embeddings = model.get_input_embeddings().weight
    dtype = embeddings.dtype if embeddings.is_floating_point() else torch.float32
    empty = torch.zeros(1, shape.num_key_value_heads, 0, shape.head_dim, dtype=dtype, device=embeddings.device)
    return PrefixKV([empty] * shape.num_layers, [empty] * shape.num_layers)


def is_prefix_param(name: str) -> bool:
    """True for parameters and state-dict keys of a prefix encoder (``...prefix_encoder.*``), whatever the
    family puts it under (``transformer.prefix_encoder.`` for ChatGLM, ``prefix_encoder.`` for others)."""
    return f".{PREFIX_ATTRIBUTE}." in f".{name}"


def mark_only_prefix_trainable(model: nn.Module) -> tuple[int, int]:
    """Freezes everything but the prefix encoder. Returns ``(trainable, total)`` parameter counts.

    The same predicate (:func:`is_prefix_param`) decides what :func:`prefix_state_dict` saves.

    Raises:
        ValueError: the model has no prefix encoder.
    """
    trainable = total = 0
    for name, param in model.named_parameters():
        keep = is_prefix_param(name)
        param.requires_grad_(keep)
        total += param.numel()
        trainable += param.numel() if keep else 0
    if trainable == 0:
        raise ValueError("the model has no prefix encoder: set pre_seq_len")
    return trainable, total


def prefix_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The prefix encoder's weights under their full keys (e.g. ``transformer.prefix_encoder.embedding.weight``)."""
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items() if is_prefix_param(name)}


def local_prefix_keys(prefix: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Prefix weights keyed inside the encoder (``embedding.weight``, ``trans.0.weight`` ...), whatever module
    path the checkpoint stored them under (``transformer.prefix_encoder.`` for ChatGLM, ``prefix_encoder.``
    for the others)."""
    marker = f"{PREFIX_ATTRIBUTE}."
    return {k[k.index(marker) + len(marker):]: v for k, v in prefix.items()}


def load_prefix_state(encoder: PrefixEncoder, prefix: dict[str, torch.Tensor], source: str, *,
                      expected_by: str = "the model") -> None:
    """Copies a stored prefix into ``encoder`` (as float32) once its keys and shapes are checked against it: how
    every prefix is loaded, a checkpoint's (:func:`ptuning.checkpoint.load_prefix`) or the one a model folder
    holds (ChatGLM2/3's built-in prefix).

    Args:
        prefix: the prefix weights under their stored keys (``transformer.prefix_encoder.embedding.weight``, ...).
        source: where they come from, first in every message (a checkpoint or model folder).
        expected_by: what the messages say expects the shapes (``the model``, ``the model's prefix``).

    Raises:
        CheckpointError: missing or unexpected keys (and whether the stored ones look like a prefix with or
            without ``prefix_projection``), or a key of another shape (naming it, both shapes and the encoder's
            sizes); one line.
    """
    local = local_prefix_keys(prefix)
    stored = dict(zip(local, prefix, strict=True))  # key in the encoder -> the key as stored
    expected = encoder.state_dict()
    if set(local) != set(expected):
        missing, unknown = sorted(set(expected) - set(local)), sorted(set(local) - set(expected))
        looks = "true" if any(k.startswith("trans.") for k in local) else "false"
        raise CheckpointError(
            f"{source}: prefix keys {sorted(prefix)} do not fit the model's prefix encoder (missing "
            f"{missing or 'none'}, unexpected {unknown or 'none'}; the checkpoint looks like prefix_projection {looks})"
        )
    sizes = ", ".join(f"{k}={v}" for k, v in encoder.shape.describe().items() if k != "prefix_projection")
    for key, tensor in local.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{source}: '{stored[key]}' has shape {list(tensor.shape)} but {expected_by} expects "
                f"{list(expected[key].shape)} ({sizes})"
            )
    encoder.load_state_dict({k: v.float() for k, v in local.items()})


def prefix_module_name(model: nn.Module) -> str:
    """The qualified name of the model's prefix encoder.

    Raises:
        ValueError: the model has none.
    """
    for name, module in model.named_modules():
        if isinstance(module, PrefixEncoder):
            return name
    raise ValueError("the model has no prefix encoder: set pre_seq_len")


def cast_backbone(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Casts every floating parameter to ``dtype`` except the prefix encoder's, which stay float32."""
    for name, param in model.named_parameters():
        target = torch.float32 if is_prefix_param(name) else dtype
        if param.is_floating_point() and param.dtype != target:
            param.data = param.data.to(target)
    return model


def reset_prefix(encoder: PrefixEncoder, init: str = "random") -> None:
    """Initialises a prefix encoder in place.

    Args:
        init: ``random`` (PyTorch's defaults, as the original: embedding N(0, 1)) or ``zeros`` (every
            prefix key and value starts at 0; with projection the last linear is zeroed, so the output is 0
            while the MLP below it still gets gradients through its bias).
    """
    for sub in encoder.modules():
        if sub is not encoder and hasattr(sub, "reset_parameters"):
            sub.reset_parameters()
    if init == "zeros":
        with torch.no_grad():
            if encoder.prefix_projection:
                encoder.trans[2].weight.zero_()
                encoder.trans[2].bias.zero_()
            else:
                encoder.embedding.weight.zero_()
    elif init != "random":
        raise ValueError(f"prefix init {init!r}: expected random or zeros (text is set from the model's own keys)")


def set_prefix_from_key_values(encoder: PrefixEncoder, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    """Sets an embedding-form prefix (no projection) to given per-layer keys and values ``[G, P, D]``
    (e.g. the frozen model's own keys and values for a text: ``model.prefix_init=text``).

    Raises:
        ValueError: the encoder has a projection, or the shapes do not fit.
    """
    shape = encoder.shape
    if encoder.prefix_projection:
        raise ValueError("model.prefix_init=text sets the prefix embedding directly: it needs model.prefix_projection=false")
    want = (shape.num_key_value_heads, shape.pre_seq_len, shape.head_dim)
    got = {tuple(t.shape) for t in [*keys, *values]}
    if got != {want} or len(keys) != shape.num_layers or len(values) != shape.num_layers:
        raise ValueError(f"prefix keys/values of shapes {sorted(got)} for {len(keys)} layers; expected {want} for {shape.num_layers}")
    stacked = torch.stack([t for pair in zip(keys, values, strict=True) for t in pair])  # (2L, G, P, D)
    with torch.no_grad():
        encoder.embedding.weight.copy_(stacked.permute(2, 0, 1, 3).reshape(shape.pre_seq_len, -1).float())  # (P, K)
