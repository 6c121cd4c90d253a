"""A trained prefix as a peft ``PREFIX_TUNING`` adapter, and such an adapter back as a prefix.

peft keeps a prefix as ``prompt_embeddings`` ``[P, 2·L·G·D]``: the prefix encoder's *output*, whose row p
viewed as ``[2·L, G, D]`` holds layer l's keys at 2l and values at 2l+1 — the layout of our
:class:`~ptuning.prefix.PrefixEncoder` output, so the export is that output as it is. A prefix trained with
``prefix_projection`` is exported as its MLP's output (what peft itself saves for such adapters), so it is
read back as a projection-free prefix that computes the same keys and values.

The sizes come from the family's prefix shape (:meth:`~ptuning.models.base.Family.prefix_shape`); which
families peft can carry at all is theirs to say (:meth:`~ptuning.models.base.Family.export_unsupported`:
today ChatGLM-6B, whose model reads peft's pre-filled cache as a prefix, so an exported adapter also loads
with ``peft.PeftModel.from_pretrained(model, folder)`` on our model).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from peft import PeftConfig, PrefixTuningConfig, TaskType
from peft.utils import load_peft_weights

from ..checkpoint import META_FILE, PREFIX_FILE, infer_prefix_shape, local_prefix_keys, read_prefix
from ..models import FAMILIES, Family, family_of
from ..prefix import PREFIX_ATTRIBUTE, PrefixEncoder, PrefixShape, prefix_module_name, prefix_state_dict
from ..weights import CheckpointError, save_safetensors

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def config_prefix_shape(config, pre_seq_len: int | None = None, prefix_projection: bool | None = None) -> PrefixShape:
    """The prefix of ``config`` as its family shapes it (default: the config's ``pre_seq_len`` /
    ``prefix_projection``)."""
    pre_seq_len = config.pre_seq_len if pre_seq_len is None else pre_seq_len
    projection = bool(config.prefix_projection) if prefix_projection is None else prefix_projection
    return family_of(config).prefix_shape(config, pre_seq_len, projection)


def encoder_output(shape: PrefixShape, prefix: dict[str, torch.Tensor]) -> torch.Tensor:
    """The prefix encoder's output ``[P, 2·L·G·D]`` (float32) for prefix weights under their full checkpoint
    keys (whatever module path stored them).

    Raises:
        CheckpointError: the weights do not fit ``shape`` (names its sizes).
    """
    encoder = PrefixEncoder(shape)
    local = {k: v.float() for k, v in local_prefix_keys(prefix).items()}
    try:
        encoder.load_state_dict(local, strict=True)
    except RuntimeError as err:
        sizes = ", ".join(f"{k}={v}" for k, v in shape.describe().items())
        raise CheckpointError(
            f"the prefix does not fit the config ({sizes}): {str(err).splitlines()[-1].strip()}"
        ) from None
    with torch.no_grad():
        return encoder().detach().float().contiguous()


def prefix_output(config, prefix: dict[str, torch.Tensor]) -> torch.Tensor:
    """:func:`encoder_output` for a prefix of ``config`` (its ``pre_seq_len`` / ``prefix_projection``)."""
    return encoder_output(config_prefix_shape(config), prefix)


def peft_config_for(shape: PrefixShape, *, base_model_name_or_path: str | None = None):
    """The ``peft.PrefixTuningConfig`` that describes a prefix of ``shape``: peft's ``num_attention_heads`` heads
    of ``token_dim / num_attention_heads`` per layer are our G key/value heads of D."""
    return PrefixTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=shape.pre_seq_len,
        token_dim=shape.num_key_value_heads * shape.head_dim,
        num_layers=shape.num_layers,
        num_attention_heads=shape.num_key_value_heads,
        # our projection MLP is E -> H -> 2·L·G·D, peft's token_dim -> encoder_hidden_size -> 2·L·token_dim
        encoder_hidden_size=shape.hidden_size,
        prefix_projection=shape.prefix_projection,
        num_transformer_submodules=1,
        inference_mode=True,
        base_model_name_or_path=base_model_name_or_path,
    )


def write_peft_adapter(
    shape: PrefixShape,
    prefix: dict[str, torch.Tensor],
    out_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Writes ``adapter_config.json`` and ``adapter_model.safetensors`` for prefix weights of ``shape``."""
    if not shape.pre_seq_len:
        raise CheckpointError("the model has no prefix (pre_seq_len is null): nothing to export")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    embeddings = encoder_output(shape, prefix)
    peft_config_for(shape, base_model_name_or_path=base_model_name_or_path).save_pretrained(str(out_dir))
    save_safetensors({"prompt_embeddings": embeddings}, out_dir / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    return out_dir


def _encoder(model) -> PrefixEncoder:
    try:
        return model.get_submodule(prefix_module_name(model))
    except ValueError:
        raise CheckpointError("the model has no prefix (pre_seq_len is null)") from None


def export_peft(model, out_dir: str | os.PathLike, *, base_model_name_or_path: str | None = None) -> Path:
    """Writes the prefix of ``model`` (a model of a family peft can carry) as a peft adapter folder."""
    shape = _encoder(model).shape
    name = base_model_name_or_path or getattr(model, "name_or_path", None) or None
    return write_peft_adapter(shape, prefix_state_dict(model), out_dir, base_model_name_or_path=name)


def recorded_shape(meta: dict, prefix: dict[str, torch.Tensor]) -> PrefixShape:
    """The prefix shape a checkpoint's ``prefix_config.json`` records (G and D, or the attention heads and
    hidden size that earlier versions recorded), the projection's embedding width read off its weights."""
    heads = meta.get("num_key_value_heads") or meta["num_attention_heads"]
    head_dim = meta.get("head_dim") or meta["hidden_size"] // heads
    embedding = local_prefix_keys(prefix)["embedding.weight"].shape[1]
    return PrefixShape(num_layers=meta["num_layers"], num_key_value_heads=heads, head_dim=head_dim,
                       pre_seq_len=meta["pre_seq_len"], prefix_projection=bool(meta["prefix_projection"]),
                       hidden_size=meta.get("hidden_size", 0),
                       embedding_dim=embedding if meta["prefix_projection"] else None)


def export_peft_checkpoint(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    config=None,
    *,
    base_model_name_or_path: str | None = None,
) -> Path:
    """A prefix checkpoint folder (ours, or the original P-Tuning v2's ``pytorch_model.bin``) as a peft adapter.

    Args:
        checkpoint: the checkpoint folder.
        out_dir: where the adapter goes.
        config: the base model's config; needed for the original format (it records no sizes). With our
            checkpoints the recorded sizes are checked against it, or used alone when it is None.
    """
    prefix, meta = read_prefix(checkpoint)
    if config is None:
        if meta is None:
            raise CheckpointError(
                f"{checkpoint}: an original-format prefix records no model sizes; give the base model (--model)"
            )
        shape = recorded_shape(meta, prefix)
    else:
        found = meta or infer_prefix_shape(prefix)
        shape = config_prefix_shape(config, found["pre_seq_len"], found["prefix_projection"])
        if meta is not None:
            for key, value in shape.describe().items():
                if key in meta and meta[key] != value:
                    raise CheckpointError(
                        f"{checkpoint}: the prefix was trained with {key}={meta[key]} but the model has {key}={value}"
                    )
    if base_model_name_or_path is None and meta is not None:
        base_model_name_or_path = meta.get("base_model")
    return write_peft_adapter(shape, prefix, out_dir, base_model_name_or_path=base_model_name_or_path)


def read_peft_adapter(adapter_dir: str | os.PathLike) -> tuple[dict, torch.Tensor]:
    """The adapter's config (as a dict) and ``prompt_embeddings`` ``[P, 2·L·H]``, read with peft's own loaders.

    Raises:
        CheckpointError: not a peft ``PREFIX_TUNING`` adapter, or its embeddings do not fit its config.
    """
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"{adapter_dir}: no {ADAPTER_CONFIG} (expected a peft adapter folder)")
    try:
        json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{adapter_dir / ADAPTER_CONFIG}: not a readable JSON file ({err})") from None
    config = PeftConfig.from_pretrained(str(adapter_dir))
    peft_type = getattr(config.peft_type, "value", config.peft_type)
    if peft_type != "PREFIX_TUNING":
        raise CheckpointError(
            f"{adapter_dir}: a {peft_type} adapter; only PREFIX_TUNING adapters are prefixes"
        )
    if getattr(config, "num_transformer_submodules", 1) not in (None, 1):
        raise CheckpointError(f"{adapter_dir}: an encoder-decoder adapter (num_transformer_submodules=2)")
    try:
        weights = load_peft_weights(str(adapter_dir), device="cpu")
    except Exception as err:  # noqa: BLE001 - safetensors / torch report a damaged file in many ways
        raise CheckpointError(
            f"{adapter_dir}: cannot read the adapter's weights ({type(err).__name__}: {err})"
        ) from None
    if "prompt_embeddings" not in weights:
        raise CheckpointError(f"{adapter_dir}: {ADAPTER_WEIGHTS} holds no prompt_embeddings")
    emb = weights["prompt_embeddings"]
    expected = (config.num_virtual_tokens, 2 * config.num_layers * config.token_dim)
    if tuple(emb.shape) != expected:
        raise CheckpointError(
            f"{adapter_dir}: prompt_embeddings has shape {list(emb.shape)} but the config says {list(expected)} "
            f"(num_virtual_tokens, 2 x num_layers x token_dim)"
        )
    return config.to_dict(), emb.float()


def _fit(adapter: dict, config, layers: int, adapter_dir) -> None:
    """Refuses an adapter whose sizes are not the model's: peft's ``num_layers``, ``token_dim`` and
    ``num_attention_heads`` against the model's layers and its config's ``hidden_size`` and
    ``num_attention_heads`` (how peft sizes a prefix)."""
    for ours, value, theirs in (
        ("num_layers", layers, "num_layers"),
        ("hidden_size", config.hidden_size, "token_dim"),
        ("num_attention_heads", config.num_attention_heads, "num_attention_heads"),
    ):
        if adapter[theirs] != value:
            raise CheckpointError(
                f"{adapter_dir}: the adapter has {theirs}={adapter[theirs]} but the model has {ours}={value}"
            )


def load_peft_prefix(model, adapter_dir: str | os.PathLike) -> None:
    """Loads a peft prefix adapter into ``model``, whose prefix must be projection-free of the same length."""
    adapter, emb = read_peft_adapter(adapter_dir)
    encoder = _encoder(model)
    shape = encoder.shape
    _fit(adapter, model.config, shape.num_layers, adapter_dir)
    if shape.pre_seq_len != adapter["num_virtual_tokens"] or shape.prefix_projection:
        raise CheckpointError(
            f"{adapter_dir}: the adapter is a projection-free prefix of {adapter['num_virtual_tokens']} tokens, but the "
            f"model has pre_seq_len={shape.pre_seq_len}, prefix_projection={shape.prefix_projection} "
            f"(load the model with pre_seq_len={adapter['num_virtual_tokens']}, prefix_projection=False)"
        )
    encoder.embedding.weight.data.copy_(emb)


def adapter_family() -> Family:
    """The family a peft adapter is read as when no base model is given: the one family whose prefix peft
    computes (every other refuses ``from-peft``).

    Raises:
        CheckpointError: not exactly one such family (give the base model).
    """
    takers = [family for family in (entry.load() for entry in FAMILIES) if family.export_unsupported("from-peft") is None]
    if len(takers) != 1:
        raise CheckpointError("give the base model (--model): more than one model family reads peft prefix adapters")
    return takers[0]


def import_peft(
    adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, config=None, *, base_model: str | None = None
) -> Path:
    """Converts a peft prefix adapter into one of our prefix checkpoint folders (``prefix.safetensors`` +
    ``prefix_config.json``), usable by ``train.init_prefix_from``, evaluation and the other exports.

    Args:
        adapter_dir: the peft adapter folder.
        out_dir: the checkpoint folder to write.
        config: the base model's config, checked against the adapter and fingerprinted into the metadata;
            None records the adapter's sizes only (read as :func:`adapter_family`'s).
        base_model: recorded as the metadata's ``base_model`` (default: the adapter's ``base_model_name_or_path``).
    """
    adapter, emb = read_peft_adapter(adapter_dir)
    length = adapter["num_virtual_tokens"]
    if config is not None:
        family = family_of(config)
        shape = family.prefix_shape(config, length, False)
        _fit(adapter, config, shape.num_layers, adapter_dir)
    else:
        family = adapter_family()
        heads = adapter["num_attention_heads"]
        shape = PrefixShape(num_layers=adapter["num_layers"], num_key_value_heads=heads,
                            head_dim=adapter["token_dim"] // heads, pre_seq_len=length, hidden_size=adapter["token_dim"])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # under the family's own key (what its original code and our loading both read), else the bare encoder's
    key = family.original_prefix_key("embedding.weight") or f"{PREFIX_ATTRIBUTE}.embedding.weight"
    save_safetensors({key: emb.contiguous()}, out_dir / PREFIX_FILE, metadata={"format": "pt"})
    # what ptuning.checkpoint.prefix_metadata records; without a config nothing says what the
    # backbone computes, so no fingerprint
    meta = {**shape.describe(), "family": family.name,
            "base_model": base_model or adapter.get("base_model_name_or_path") or "unknown"}
    if config is not None:
        meta["base_config_fingerprint"] = family.fingerprint(config)
    meta["imported_from"] = f"peft:{Path(adapter_dir).resolve()}"
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out_dir


__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "adapter_family",
    "encoder_output",
    "export_peft",
    "export_peft_checkpoint",
    "import_peft",
    "load_peft_prefix",
    "peft_config_for",
    "prefix_output",
    "read_peft_adapter",
    "recorded_shape",
    "write_peft_adapter",
]
