"""Loading the backbone, the prefix and the tokenizer from a typed ``ModelConfig``."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from .config import BUILTIN_MODEL, ConfigError, ModelConfig
from .model import ChatGLMForConditionalGeneration
from .model.loading import weight_files


def base_model_name(cfg: ModelConfig) -> str:
    return "builtin:tiny-chatglm" if cfg.path is None else str(Path(cfg.path).expanduser().resolve())


def weights_digest(folder: Path) -> str:
    """sha256 of the built-in backbone's weight files (it is small): recorded in checkpoint metadata."""
    digest = hashlib.sha256()
    for path in weight_files(folder):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def base_metadata(cfg: ModelConfig, config) -> dict:
    """How ``prefix_config.json`` describes the backbone ``cfg`` loads (``config``: its model config): the
    name, the config fingerprint and, for the built-in model, a digest of its weights."""
    from .training.checkpoint import prefix_metadata

    return prefix_metadata(config, base_model_name(cfg), weights_digest(cfg.resolved_path) if cfg.path is None else None)


def load_model(cfg: ModelConfig, **overrides) -> ChatGLMForConditionalGeneration:
    """The frozen backbone in ``cfg.dtype`` with a float32 prefix of ``cfg.pre_seq_len``.

    With ``cfg.quantization_bit`` 8 or 4 the block linears are quantized at load time and the rest of the
    backbone is 16-bit (bfloat16 when ``cfg.dtype`` is float32), see :mod:`ptuning.model.quantization`.
    """
    dtype = getattr(torch, cfg.dtype)
    device = None
    if cfg.quantization_bit:
        if dtype == torch.float32:
            dtype = torch.bfloat16  # load straight in 16 bits: a float32 copy of the real model would not fit
        # quantize on the target device (a GPU when there is one) one linear at a time, so the 16-bit backbone
        # never has to fit there; NF4 of ChatGLM-6B takes ~5 minutes on 2 CPU cores
        device = overrides.pop("device", None) or ("cuda" if torch.cuda.is_available() else None)
    model = ChatGLMForConditionalGeneration.from_pretrained(
        cfg.resolved_path,
        dtype=dtype,
        pre_seq_len=cfg.pre_seq_len,
        prefix_projection=cfg.prefix_projection,
        prefix_dropout=cfg.prefix_dropout,
        **overrides,
    )
    if cfg.quantization_bit:
        from .model.quantization import quantize_backbone  # imports torchao only when asked for

        quantize_backbone(model, cfg.quantization_bit, device=device)
    return model


def load_tokenizer(cfg: ModelConfig, vocab_size: int | None = None):
    """The ChatGLM tokenizer of the model folder; checks it fits the model's vocabulary."""
    from .tokenizer import ChatGLMTokenizer

    folder = cfg.resolved_path
    if not (folder / "ice_text.model").is_file():
        raise ConfigError(f"{folder}: no ice_text.model (the ChatGLM tokenizer) in the model folder")
    tokenizer = ChatGLMTokenizer.from_pretrained(str(folder))
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ConfigError(
            f"{folder}: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}"
        )
    return tokenizer


__all__ = ["BUILTIN_MODEL", "base_metadata", "base_model_name", "load_model", "load_tokenizer", "weights_digest"]
