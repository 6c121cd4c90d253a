"""ChatGLM2-6B / ChatGLM3-6B as a family: the original folders loaded onto transformers' ``GlmForCausalLM``
with the generic prefix (:func:`ptuning.models.hf.attach_prefix`), their tokenizer and their templates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import GlmForCausalLM
from transformers.models.glm.modeling_glm import GlmRotaryEmbedding

from ...errors import ConfigError
from ...prefix import PrefixShape, load_prefix_state
from ...weights import CheckpointError
from ..base import Family, check_vocab_size
from ..hf.modeling import attach_prefix
from .config import read_original_config
from .memory import ChatGLM2Memory
from .rotary import ChatGLM2RotaryEmbedding
from .template import ChatGLM2Template, ChatGLM3Template
from .tokenizer import ChatGLM2Tokenizer
from .weights import ORIGINAL_PREFIX, load_backbone, save_original

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")
# files of an original folder that its code and demos need beside the weights
COMPANION_NAMES = ("tokenizer.model", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
                   "LICENSE", "MODEL_LICENSE")


def rotary_for(config) -> GlmRotaryEmbedding:
    """The rotary module that computes what the original does: ChatGLM2's (half-precision rounding, positions
    divided by ``rope_ratio``) or the class's own (ChatGLM3: base × ``rope_ratio``)."""
    if getattr(config, "chatglm_version", 3) == 2:
        return ChatGLM2RotaryEmbedding(config)
    return GlmRotaryEmbedding(config)


def prefix_shape(config, pre_seq_len: int, prefix_projection: bool = False) -> PrefixShape:
    """ChatGLM2/3's prefix: per layer G key/value groups of D (2 × 2 × 128 per layer and position for the
    real models: K = 2·28·2·128 = 14336, so 1.8 M parameters at P = 128); with projection its embedding is
    K wide and the MLP goes K -> H -> K (the original ``PrefixEncoder``)."""
    shape = PrefixShape(
        num_layers=config.num_hidden_layers,
        num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        pre_seq_len=pre_seq_len,
        prefix_projection=prefix_projection,
        hidden_size=config.hidden_size,
    )
    if prefix_projection:
        shape = PrefixShape(**{**shape.__dict__, "embedding_dim": shape.kv_width})
    return shape


def load_model(folder: str | Path, *, dtype=torch.float32, pre_seq_len: int | None = None,
               prefix_projection: bool = False, prefix_dropout: float = 0.0, device=None,
               chatglm_version: int | None = None) -> nn.Module:
    """An original ChatGLM2/3 folder as a ``GlmForCausalLM`` with the prefix contract (see
    :func:`ptuning.models.hf.attach_prefix`), backbone in ``dtype``, prefix float32.

    A ``transformer.prefix_encoder.*`` in the folder (the original's built-in prefix, e.g. a ChatGLM3
    ``finetune_demo`` checkpoint) becomes the prefix; it must match ``pre_seq_len`` / ``prefix_projection``.
    Without one the prefix starts as the original's (PyTorch defaults).

    Args:
        chatglm_version: 2 or 3 when known (None: decided from the folder, see
            :func:`ptuning.models.chatglm2.config.chatglm_version`).

    Raises:
        CheckpointError: config values the mapping cannot represent, weights that do not fit, or a folder
            prefix that does not match the asked one (each names the file and key).
    """
    folder = Path(folder)
    original = read_original_config(folder, version=chatglm_version)
    config = original.glm_config()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with torch.device("meta"):
        model = GlmForCausalLM(config)
    prefix_tensors = load_backbone(model, folder, config, dtype)
    model.model.rotary_emb = rotary_for(config)  # its buffers were made on the meta device
    model.config.dtype = dtype
    if prefix_tensors and not pre_seq_len:
        raise CheckpointError(
            f"{folder}: the folder holds a prefix ({ORIGINAL_PREFIX}*, pre_seq_len {original.pre_seq_len} in "
            f"config.json): set model.pre_seq_len={original.pre_seq_len} to use it"
        )
    shape = prefix_shape(config, pre_seq_len, prefix_projection) if pre_seq_len else None
    attach_prefix(model, shape, prefix_dropout)
    if prefix_tensors:
        load_prefix_state(model.prefix_encoder, prefix_tensors, f"{folder} (the prefix stored in the model folder)",
                          expected_by="the model's prefix")
    model.name_or_path = str(folder)
    if device is not None:
        model.to(device)
    return model.eval()


class ChatGLM2Family(Family):
    """ChatGLM2-6B and ChatGLM3-6B (``model_type`` chatglm with ``ffn_hidden_size`` / ``padded_vocab_size``)."""

    name = "chatglm2"
    label = "ChatGLM2-6B / ChatGLM3-6B"

    def load_model(self, folder: Path, *, dtype=torch.float32, pre_seq_len: int | None = None,
                   prefix_projection: bool = False, prefix_dropout: float = 0.0, device=None) -> nn.Module:
        """See :func:`load_model`."""
        return load_model(folder, dtype=dtype, pre_seq_len=pre_seq_len, prefix_projection=prefix_projection,
                          prefix_dropout=prefix_dropout, device=device)

    def model_config(self, folder: Path):
        """The ``GlmConfig`` of an original folder (the version decided as for the model), its built-in prefix
        (``pre_seq_len`` / ``prefix_projection``) riding along."""
        return read_original_config(Path(folder)).glm_config()

    def load_tokenizer(self, folder: Path, vocab_size: int | None = None) -> ChatGLM2Tokenizer:
        """``tokenizer.model`` of the folder with ChatGLM2's or ChatGLM3's special tokens (the version decided as
        for the model, :func:`ptuning.models.chatglm2.config.chatglm_version`).

        Raises:
            ConfigError: no ``tokenizer.model``, an undecidable version, or more tokens than the model's
                embedding rows.
        """
        folder = Path(folder)
        try:
            tokenizer = ChatGLM2Tokenizer.from_pretrained(folder)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(str(err)) from None
        return check_vocab_size(tokenizer, folder, vocab_size, "padded_vocab_size")

    def template(self, tokenizer, model_config):
        return ChatGLM3Template(tokenizer) if model_config.chatglm_version == 3 else ChatGLM2Template(tokenizer)

    def prefix_shape(self, model_config, pre_seq_len: int, prefix_projection: bool) -> PrefixShape:
        return prefix_shape(model_config, pre_seq_len, prefix_projection)

    def max_positions(self, model_config) -> int:
        """``seq_length``: the rows of the original's rotary table."""
        return model_config.max_position_embeddings

    def fingerprint_keys(self, model_config) -> dict:
        keys = ("chatglm_version", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "attention_bias",
                "rope_ratio", "max_position_embeddings")
        return {key: getattr(model_config, key, None) for key in keys}

    def block_linear_names(self) -> tuple[str, ...]:
        return BLOCK_LINEARS

    def export_unsupported(self, kind: str) -> str | None:
        if kind == "from-peft":
            return (
                "a peft PREFIX_TUNING adapter does not compute a ChatGLM2/3 prefix: peft feeds it as P cached tokens "
                "and shifts the rotary positions of the real tokens by P, which the original and this toolkit do not "
                "(only ChatGLM-6B adapters import)"
            )
        if kind == "peft":
            return (
                "peft's PREFIX_TUNING cannot carry a ChatGLM2/3 prefix as the original and this toolkit apply it: "
                "peft feeds the prefix as P cached tokens and shifts the rotary positions of the real tokens by P; "
                "export 'original' (transformer.prefix_encoder.*, as ChatGLM2's ptuning/main.py saves it) or 'full' "
                "instead"
            )
        return None

    def original_prefix_key(self, local_key: str) -> str:
        """``transformer.prefix_encoder.*``: ChatGLM2's ``ptuning/main.py`` saves and loads these keys."""
        return ORIGINAL_PREFIX + local_key

    def export_full(self, model, out_dir: Path, *, dtype, max_shard_bytes: int, companions_from: Path | None = None):
        """The model (prefix inside, with ``pre_seq_len`` in ``config.json``) as an original folder:
        ``pytorch_model-0000N-of-0000M.bin`` + index as the published ``chatglm2-6b``, which the original code
        (and a ChatGLM3 ``finetune_demo`` reader) loads in one piece. ``companions_from``: the base folder
        whose tokenizer and code files are copied beside it, its ``auto_map`` kept in ``config.json`` (as data:
        nothing is run here)."""
        out_dir = Path(out_dir)
        paths = save_original(model, out_dir, dtype=dtype, safe=False, max_shard_bytes=max_shard_bytes)
        if companions_from is not None:
            source = Path(companions_from)
            for path in sorted(source.iterdir()):
                if path.is_file() and (path.suffix == ".py" or path.name in COMPANION_NAMES):
                    shutil.copy2(path, out_dir / path.name)
            base = json.loads((source / "config.json").read_text(encoding="utf-8"))
            if base.get("auto_map"):
                written = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
                (out_dir / "config.json").write_text(json.dumps({**written, "auto_map": base["auto_map"]}, indent=2) + "\n")
        return paths

    def train_memory(self) -> ChatGLM2Memory:
        return ChatGLM2Memory()

    def matmul_weights(self, model_config) -> int:
        c = model_config
        heads, groups, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        per_layer = c.hidden_size * (heads + 2 * groups) * d + heads * d * c.hidden_size + 3 * c.hidden_size * c.intermediate_size
        return c.num_hidden_layers * per_layer + c.vocab_size * c.hidden_size


__all__ = ["BLOCK_LINEARS", "ChatGLM2Family", "load_model", "prefix_shape", "rotary_for"]
