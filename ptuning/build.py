"""Loading a model folder through its family: the backbone, the prefix, the tokenizer and the template.

This is the only place the training loop, evaluation, chat and the server get a model from; the family
(:func:`ptuning.models.family_for`, chosen by the folder's ``config.json``) does the family-specific part.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers.utils import logging as hf_logging

from .config import BUILTIN_MODEL, BUILTIN_SCHEME, ConfigError, ModelConfig, is_gguf_file
from .models import Family, PromptTemplate, UnsupportedModelError, family_for
from .prefix import PrefixKV, PrefixShape, prefix_module_name, reset_prefix, set_prefix_from_key_values
from .quantization import quantize_backbone
from .weights import file_sha256, recorded_source_digest, weight_files


@dataclass
class Loaded:
    """A model folder loaded for use: the family, the model (prefix float32), its tokenizer and template
    (None when loaded without them), and what the checkpoint of its prefix said, when it has one
    (:func:`ptuning.checkpoint.load_model_with_prefix`)."""

    family: Family
    model: nn.Module
    tokenizer: object | None
    template: PromptTemplate | None
    #: how the loaded prefix's training prompts were rendered ("plain" / "chat"), when its checkpoint says
    prompt_format: str | None = None
    #: the loaded prefix's ``prefix_config.json`` (None: a new prefix, or a checkpoint that records none)
    prefix_meta: dict | None = None
    #: how this backbone differs from the one the loaded prefix was trained on (None: the same, or unknown)
    base_change: str | None = None

    @property
    def max_positions(self) -> int:
        return self.family.max_positions(self.model.config)


def model_family(cfg: ModelConfig, key: str = "model.path") -> Family:
    """The family of ``cfg``'s model folder (or ``.gguf`` file).

    Args:
        key: the setting or flag that named the model, for messages (``--model-path`` in chat and serve).

    Raises:
        ConfigError: no family handles it, or the file cannot be read (one line, ``model.path=X: why``, naming
            ``architectures`` and what is supported).
    """
    try:
        return family_for(cfg.resolved_path)
    except UnsupportedModelError as err:
        text = str(err)
        own = f"{cfg.resolved_path}: "
        raise ConfigError(f"{key}={cfg.path if cfg.path is not None else cfg.resolved_path}: {text[len(own):] if text.startswith(own) else text}") from None


def base_model_name(cfg: ModelConfig) -> str:
    return cfg.base_model_name


def weights_digest(folder: Path) -> str:
    """sha256 of a built-in backbone's weight files (they are small): recorded in checkpoint metadata."""
    digest = hashlib.sha256()
    for path in weight_files(folder):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def base_weights_digest(cfg: ModelConfig) -> str | None:
    """The weights digest checkpoints record for ``cfg``'s backbone: a built-in model's weight files and a
    ``.gguf`` file (config, tokenizer and weights in one file, so a different quantization of the same config
    is told apart) are hashed; a model folder is named by its path and config fingerprint only (hashing
    gigabytes at every start would cost minutes), except a folder ``python -m ptuning.convert`` wrote from a
    ``.gguf`` file and nobody changed since: it has the file's digest (:func:`~ptuning.weights.recorded_source_digest`),
    so a prefix trained on the file goes into the folder without a warning, and back."""
    path = cfg.resolved_path
    if is_gguf_file(path):
        return file_sha256(path)
    if cfg.base_model_name.startswith(BUILTIN_SCHEME):
        return weights_digest(path)
    return recorded_source_digest(path)


def load_model(cfg: ModelConfig, *, family: Family | None = None, **overrides) -> nn.Module:
    """The frozen backbone in ``cfg.dtype`` with a float32 prefix of ``cfg.pre_seq_len`` (random init; see
    :func:`init_prefix` for the other initialisations).

    With ``cfg.quantization_bit`` 8 or 4 the block linears are quantized at load time and the rest of the
    backbone is 16-bit (bfloat16 when ``cfg.dtype`` is float32), see :mod:`ptuning.quantization`.

    Args:
        overrides: ``device`` (where to put the model), ``pre_seq_len`` (None = no prefix encoder).
    """
    family = family or model_family(cfg)
    dtype = getattr(torch, cfg.dtype)
    device = overrides.pop("device", None)
    quantize_on = None
    if cfg.quantization_bit:
        if dtype == torch.float32:
            dtype = torch.bfloat16  # load straight in 16 bits: a float32 copy of the real model would not fit
        # quantize on the target device (a GPU when there is one) one linear at a time, so the 16-bit backbone
        # never has to fit there; NF4 of ChatGLM-6B takes ~5 minutes on 2 CPU cores
        quantize_on = device or ("cuda" if torch.cuda.is_available() else None)
        device = None
    pre_seq_len = overrides.pop("pre_seq_len", cfg.pre_seq_len)
    if overrides:
        raise TypeError(f"unexpected load_model arguments: {sorted(overrides)}")
    with _no_loading_bar():
        model = family.load_model(
            cfg.resolved_path,
            dtype=dtype,
            pre_seq_len=pre_seq_len,
            prefix_projection=cfg.prefix_projection,
            prefix_dropout=cfg.prefix_dropout,
            device=device,
        )
    if cfg.quantization_bit:
        quantize_backbone(model, cfg.quantization_bit, device=quantize_on, linear_names=family.block_linear_names())
    model.ptuning_family = family  # read by ptuning.models.family_of (checkpoint metadata, export)
    return model


@contextmanager
def _no_loading_bar() -> Iterator[None]:
    """transformers' ``Loading weights`` progress bar off while a model loads (it loads in a blink for the small
    models and says nothing the start-up lines do not; a large model's load is the one long wait a user expects)."""
    shown = hf_logging.is_progress_bar_enabled()
    if shown:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def load_tokenizer(cfg: ModelConfig, vocab_size: int | None = None, *, family: Family | None = None):
    """The tokenizer of the model folder, checked against the model's vocabulary size when given.

    Raises:
        ConfigError: no usable tokenizer files, or more tokens than the model has rows.
    """
    family = family or model_family(cfg)
    return family.load_tokenizer(cfg.resolved_path, vocab_size)


def load(cfg: ModelConfig, *, device=None, pre_seq_len="config", init: bool = True,
         tokenizer: bool = True) -> Loaded:
    """Model, tokenizer and template of ``cfg``, the prefix initialised as ``cfg.prefix_init`` says.

    Args:
        device: where the model goes (default: where it loads, the CPU).
        pre_seq_len: the prefix length; ``"config"`` = ``cfg.pre_seq_len``, None = no prefix encoder.
        init: apply ``cfg.prefix_init`` (off when a checkpoint's prefix will replace it anyway).
        tokenizer: also load the tokenizer and the template (an export needs neither; ``prefix_init=text``
            needs both).
    """
    family = model_family(cfg)
    kwargs = {"device": device} if device is not None else {}
    if pre_seq_len != "config":
        kwargs["pre_seq_len"] = pre_seq_len
    model = load_model(cfg, family=family, **kwargs)
    loaded = Loaded(family, model, None, None)
    if tokenizer or (init and cfg.prefix_init == "text"):
        loaded.tokenizer = family.load_tokenizer(cfg.resolved_path, model.config.vocab_size)
        loaded.template = family.template(loaded.tokenizer, model.config)
    if init:
        init_prefix(loaded, cfg)
    return loaded


def _has_prefix(model: nn.Module) -> bool:
    try:
        prefix_module_name(model)
        return True
    except ValueError:
        return False


def prefix_shape_of(loaded: Loaded) -> PrefixShape:
    """The shape of the loaded model's prefix encoder."""
    return loaded.model.get_submodule(prefix_module_name(loaded.model)).shape


@torch.no_grad()
def init_prefix(loaded: Loaded, cfg: ModelConfig) -> None:
    """Initialises the prefix as ``cfg.prefix_init`` says.

    * ``random``: as loaded (the original: PyTorch's defaults, embedding N(0, 1));
    * ``zeros``: every prefix key and value 0 (:func:`ptuning.prefix.reset_prefix`);
    * ``text``: the frozen model's own keys and values for the first P tokens of ``cfg.prefix_init_text``
      (repeated when shorter): the text is run through the model without a prefix and each layer's cached
      keys (rotated at the positions the family gives, :meth:`~ptuning.models.base.Family.text_prefix_positions`:
      -P..-1 for transformers' decoders, right before the prompt; 0..P-1 otherwise) and values become the
      prefix. peft's MetaMathQA comparison of prefix tuning: 18.6 % from random init, 35.8 % from zeros,
      41.6 % from text.

    Raises:
        ConfigError: ``text`` with ``prefix_projection``, or a text that gives no tokens.
    """
    if not _has_prefix(loaded.model):
        return
    encoder = loaded.model.get_submodule(prefix_module_name(loaded.model))
    if cfg.prefix_init in ("random", None):
        return
    if cfg.prefix_init == "zeros":
        reset_prefix(encoder, "zeros")
        return
    if encoder.prefix_projection:
        raise ConfigError("model.prefix_init=text: expected model.prefix_projection=false (text sets the embedding)")
    text = cfg.prefix_init_text or ""
    ids = loaded.tokenizer.convert_tokens_to_ids(loaded.tokenizer.tokenize(text))
    if not ids:
        raise ConfigError(f"model.prefix_init_text={text!r}: the tokenizer makes no tokens of it")
    length = encoder.shape.pre_seq_len
    ids = (ids * (length // len(ids) + 1))[:length]
    model = loaded.model
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    shape = encoder.shape
    dtype = next(p.dtype for n, p in model.named_parameters() if "prefix_encoder" not in n and p.is_floating_point())
    hidden = torch.zeros(1, shape.num_key_value_heads, 0, shape.head_dim, dtype=dtype, device=device)
    no_prefix = PrefixKV([hidden] * shape.num_layers, [hidden] * shape.num_layers)
    run = loaded.family.text_prefix_input(loaded.tokenizer, ids)
    positions = loaded.family.text_prefix_positions(len(run))
    where = {} if positions is None else {"position_ids": torch.tensor([positions], device=device)}
    out = model(input_ids=torch.tensor([run], device=device), use_cache=True, prefix=no_prefix, **where)
    cache = out.cache
    keys = [layer.keys[0, :, :length].float() for layer in cache.layers]  # (G, P, D) each
    values = [layer.values[0, :, :length].float() for layer in cache.layers]
    try:
        set_prefix_from_key_values(encoder, keys, values)
    except ValueError as err:
        raise ConfigError(f"model.prefix_init=text: {err}") from None
    model.train(was_training)


__all__ = [
    "BUILTIN_MODEL",
    "Loaded",
    "base_model_name",
    "base_weights_digest",
    "init_prefix",
    "load",
    "load_model",
    "load_tokenizer",
    "model_family",
    "prefix_shape_of",
    "weights_digest",
]
