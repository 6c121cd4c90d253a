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


def load_model(cfg: ModelConfig, **overrides) -> ChatGLMForConditionalGeneration:
    """The frozen backbone in ``cfg.dtype`` with a float32 prefix of ``cfg.pre_seq_len``."""
    return ChatGLMForConditionalGeneration.from_pretrained(
        cfg.resolved_path,
        dtype=getattr(torch, cfg.dtype),
        pre_seq_len=cfg.pre_seq_len,
        prefix_projection=cfg.prefix_projection,
        prefix_dropout=cfg.prefix_dropout,
        **overrides,
    )


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


__all__ = ["BUILTIN_MODEL", "base_model_name", "load_model", "load_tokenizer", "weights_digest"]
