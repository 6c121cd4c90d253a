"""A trained prefix as a peft ``PREFIX_TUNING`` adapter, and such an adapter back as a prefix.

peft keeps a prefix as ``prompt_embeddings`` ``[P, 2·L·H]``: the prefix encoder's *output*, whose row p
viewed as ``[2·L, N, D]`` holds layer l's keys at 2l and values at 2l+1 — the layout of our
:class:`~ptuning.models.chatglm.PrefixEncoder` output, so the export is that output as it is. A prefix trained with
``prefix_projection`` is exported as its MLP's output (what peft itself saves for such adapters), so it is
read back as a projection-free prefix that computes the same keys and values.

An exported adapter loads with ``peft.PeftConfig.from_pretrained`` / ``peft.utils.load_peft_weights`` and
``peft.PeftModel.from_pretrained(model, folder)`` on our model (peft feeds it as a pre-filled cache, which
:class:`~ptuning.models.chatglm.ChatGLMModel` reads as a prefix).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from peft import PeftConfig, PrefixTuningConfig, TaskType
from peft.utils import load_peft_weights
from safetensors.torch import save_file

from ..checkpoint import (
    META_FILE,
    PREFIX_FILE,
    infer_prefix_shape,
    local_prefix_keys,
    prefix_metadata,
    read_prefix,
)
from ..models.chatglm.config import ChatGLMConfig
from ..models.chatglm.modeling import prefix_shape
from ..prefix import PrefixEncoder
from ..weights import CheckpointError

PREFIX_MODULE = "transformer.prefix_encoder"  # where ChatGLM-6B keeps its prefix encoder

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
EMBEDDING_KEY = f"{PREFIX_MODULE}.embedding.weight"


def prefix_output(config, prefix: dict[str, torch.Tensor]) -> torch.Tensor:
    """The prefix encoder's output ``[P, 2·L·H]`` (float32) for prefix weights under the full checkpoint keys."""
    encoder = PrefixEncoder(prefix_shape(config))
    local = {k: v.float() for k, v in local_prefix_keys(prefix).items()}  # whatever module path stored them
    try:
        encoder.load_state_dict(local, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"the prefix does not fit the config (pre_seq_len={config.pre_seq_len}, prefix_projection="
            f"{config.prefix_projection}, num_layers={config.num_layers}, hidden_size={config.hidden_size}): "
            f"{str(err).splitlines()[-1].strip()}"
        ) from None
    with torch.no_grad():
        return encoder().detach().float().contiguous()


def peft_config_for(config, *, base_model_name_or_path: str | None = None):
    """The ``peft.PrefixTuningConfig`` that describes a prefix of ``config`` (a :class:`ChatGLMConfig`)."""
    return PrefixTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=config.pre_seq_len,
        token_dim=config.hidden_size,
        num_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        # our projection MLP is H -> H -> 2·L·H, peft's token_dim -> encoder_hidden_size -> 2·L·token_dim
        encoder_hidden_size=config.hidden_size,
        prefix_projection=bool(config.prefix_projection),
        num_transformer_submodules=1,
        inference_mode=True,
        base_model_name_or_path=base_model_name_or_path,
    )


def write_peft_adapter(
    config,
    prefix: dict[str, torch.Tensor],
    out_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Writes ``adapter_config.json`` and ``adapter_model.safetensors`` for prefix weights of ``config``."""
    if not config.pre_seq_len:
        raise CheckpointError("the model has no prefix (pre_seq_len is null): nothing to export")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    embeddings = prefix_output(config, prefix)
    peft_config_for(config, base_model_name_or_path=base_model_name_or_path).save_pretrained(str(out_dir))
    save_file({"prompt_embeddings": embeddings}, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return out_dir


def export_peft(model, out_dir: str | os.PathLike, *, base_model_name_or_path: str | None = None) -> Path:
    """Writes the prefix of ``model`` (a :class:`ChatGLMForConditionalGeneration`) as a peft adapter folder."""
    prefix = {k: v for k, v in model.state_dict().items() if k.startswith(PREFIX_MODULE + ".")}
    name = base_model_name_or_path or getattr(model, "name_or_path", None) or None
    return write_peft_adapter(model.config, prefix, out_dir, base_model_name_or_path=name)


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
        config: the base model's :class:`ChatGLMConfig`; needed for the original format (it records no sizes).
            With our checkpoints the recorded sizes are checked against it, or used alone when it is None.
    """
    prefix, meta = read_prefix(checkpoint)
    if config is None:
        if meta is None:
            raise CheckpointError(
                f"{checkpoint}: an original-format prefix records no model sizes; give the base model (--model)"
            )
        config = ChatGLMConfig(
            **{k: meta[k] for k in ("num_layers", "hidden_size", "num_attention_heads")},
            pre_seq_len=meta["pre_seq_len"],
            prefix_projection=meta["prefix_projection"],
        )
    else:
        found = meta or infer_prefix_shape(prefix)
        config = config.__class__.from_dict(
            {**config.to_dict(), **{k: found[k] for k in ("pre_seq_len", "prefix_projection")}}
        )
        if meta is not None:
            for key in ("num_layers", "hidden_size", "num_attention_heads"):
                if key in meta and meta[key] != getattr(config, key):
                    raise CheckpointError(
                        f"{checkpoint}: the prefix was trained with {key}={meta[key]} but the model has {key}={getattr(config, key)}"
                    )
    if base_model_name_or_path is None and meta is not None:
        base_model_name_or_path = meta.get("base_model")
    return write_peft_adapter(config, prefix, out_dir, base_model_name_or_path=base_model_name_or_path)


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


def _fit(adapter: dict, config, adapter_dir) -> None:
    for ours, theirs in (
        ("num_layers", "num_layers"),
        ("hidden_size", "token_dim"),
        ("num_attention_heads", "num_attention_heads"),
    ):
        if adapter[theirs] != getattr(config, ours):
            raise CheckpointError(
                f"{adapter_dir}: the adapter has {theirs}={adapter[theirs]} but the model has {ours}={getattr(config, ours)}"
            )


def load_peft_prefix(model, adapter_dir: str | os.PathLike) -> None:
    """Loads a peft prefix adapter into ``model``, whose prefix must be projection-free of the same length."""
    adapter, emb = read_peft_adapter(adapter_dir)
    config = model.config
    _fit(adapter, config, adapter_dir)
    if config.pre_seq_len != adapter["num_virtual_tokens"] or config.prefix_projection:
        raise CheckpointError(
            f"{adapter_dir}: the adapter is a projection-free prefix of {adapter['num_virtual_tokens']} tokens, but the "
            f"model has pre_seq_len={config.pre_seq_len}, prefix_projection={config.prefix_projection} "
            f"(load the model with pre_seq_len={adapter['num_virtual_tokens']}, prefix_projection=False)"
        )
    model.get_submodule(PREFIX_MODULE).embedding.weight.data.copy_(emb)


def import_peft(
    adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, config=None, *, base_model: str | None = None
) -> Path:
    """Converts a peft prefix adapter into one of our prefix checkpoint folders (``prefix.safetensors`` +
    ``prefix_config.json``), usable by ``train.init_prefix_from``, evaluation and the other exports.

    Args:
        adapter_dir: the peft adapter folder.
        out_dir: the checkpoint folder to write.
        config: the base model's :class:`ChatGLMConfig`, checked against the adapter and fingerprinted
            into the metadata; None records the adapter's sizes only.
        base_model: recorded as the metadata's ``base_model`` (default: the adapter's ``base_model_name_or_path``).
    """
    adapter, emb = read_peft_adapter(adapter_dir)
    if config is not None:
        _fit(adapter, config, adapter_dir)
        values = {
            **config.to_dict(),
            "pre_seq_len": adapter["num_virtual_tokens"],
            "prefix_projection": False,
        }
        target = config.__class__.from_dict(values)
    else:
        target = ChatGLMConfig(
            num_layers=adapter["num_layers"],
            hidden_size=adapter["token_dim"],
            num_attention_heads=adapter["num_attention_heads"],
            pre_seq_len=adapter["num_virtual_tokens"],
            prefix_projection=False,
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({EMBEDDING_KEY: emb.contiguous()}, str(out_dir / PREFIX_FILE), metadata={"format": "pt"})
    meta = prefix_metadata(target, base_model or adapter.get("base_model_name_or_path") or "unknown")
    if config is None:
        meta.pop("base_config_fingerprint")  # the adapter alone does not say what the backbone computes
    meta["imported_from"] = f"peft:{Path(adapter_dir).resolve()}"
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out_dir


__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "export_peft",
    "export_peft_checkpoint",
    "import_peft",
    "load_peft_prefix",
    "peft_config_for",
    "prefix_output",
    "read_peft_adapter",
    "write_peft_adapter",
]
