"""ChatGLM-6B (``THUDM/chatglm-6b``) as a model family: our own model code, the original's keys, tokenizer
and prompt template."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ...errors import ConfigError
from ...prefix import PrefixShape
from ..base import Family, check_vocab_size
from .config import ChatGLMConfig
from .memory import ChatGLMMemory
from .modeling import ChatGLMForConditionalGeneration, prefix_shape
from .original import export_full
from .template import ChatGLMTemplate
from .tokenizer import ChatGLMTokenizer

# Config keys that decide what the backbone computes (not ids or bookkeeping); the fingerprint recorded with
# every checkpoint hashes exactly these, as checkpoints of earlier versions did.
FINGERPRINT_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_attention_heads",
    "inner_hidden_size",
    "layernorm_epsilon",
    "position_encoding_2d",
)


class ChatGLMFamily(Family):
    """ChatGLM-6B (``model_type`` "chatglm" with ``inner_hidden_size``): our own model code
    (:class:`~.modeling.ChatGLMForConditionalGeneration`, numbers equal to THUDM's), the ``ice_text.model``
    SentencePiece tokenizer, the original's prompts (chat turns as ``[Round N]\\n问：...\\n答：``) ending in
    ``[gMASK] <sop>``, 2D positions; prefix ``[B, heads, P, head size]`` per layer (no grouped keys/values).
    It carries every export: peft adapters both ways, the original prefix file and the original full-model
    folder."""

    name = "chatglm"
    label = "ChatGLM-6B"

    def load_model(self, folder: Path, *, dtype, pre_seq_len, prefix_projection, prefix_dropout, device=None):
        return ChatGLMForConditionalGeneration.from_pretrained(
            folder,
            dtype=dtype,
            device=device,
            pre_seq_len=pre_seq_len,
            prefix_projection=prefix_projection,
            prefix_dropout=prefix_dropout,
        )

    def model_config(self, folder: Path) -> ChatGLMConfig:
        return ChatGLMConfig.from_pretrained(str(folder))

    def load_tokenizer(self, folder: Path, vocab_size: int | None = None):
        if not (folder / "ice_text.model").is_file():
            raise ConfigError(f"{folder}: no ice_text.model (the ChatGLM-6B tokenizer) in the model folder")
        try:
            tokenizer = ChatGLMTokenizer.from_pretrained(str(folder))
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(str(err)) from None
        return check_vocab_size(tokenizer, folder, vocab_size)

    def template(self, tokenizer, model_config) -> ChatGLMTemplate:
        return ChatGLMTemplate(tokenizer)

    def prefix_shape(self, model_config: ChatGLMConfig, pre_seq_len: int, prefix_projection: bool) -> PrefixShape:
        return prefix_shape(model_config, pre_seq_len, prefix_projection)

    def max_positions(self, model_config: ChatGLMConfig) -> int:
        return int(model_config.max_sequence_length)

    def fingerprint_keys(self, model_config) -> dict:
        return {k: getattr(model_config, k) for k in FINGERPRINT_KEYS}

    def fingerprint(self, model_config) -> str:
        blob = json.dumps(self.fingerprint_keys(model_config), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def text_prefix_input(self, tokenizer, ids: list[int]) -> list[int]:
        # ChatGLM-6B reads a prompt only as ``text [gMASK] <sop>`` (its masks and 2D positions need both)
        return tokenizer.build_inputs_with_special_tokens(list(ids))

    def block_linear_names(self) -> tuple[str, ...]:
        return ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")

    def original_prefix_key(self, local_key: str) -> str:
        return f"transformer.prefix_encoder.{local_key}"

    def export_unsupported(self, kind: str) -> None:
        """None: every export carries a ChatGLM-6B prefix: ``peft``/``from-peft`` (the model reads peft's
        pre-filled cache as a prefix, see :mod:`ptuning.interop.peft`), ``original``
        (``transformer.prefix_encoder.*``, as THUDM's ``ptuning/main.py`` saves it) and ``full`` (the published
        folder layout)."""
        return None

    def export_full(self, model, out_dir: Path, *, dtype, max_shard_bytes: int, companions_from: Path | None = None):
        """See :func:`ptuning.models.chatglm.original.export_full`."""
        return export_full(model, out_dir, dtype=dtype, max_shard_bytes=max_shard_bytes, companions_from=companions_from)

    def train_memory(self) -> ChatGLMMemory:
        return ChatGLMMemory()

    def matmul_weights(self, model_config) -> int:
        d, inner = model_config.hidden_size, model_config.inner_hidden_size
        return model_config.num_layers * (3 * d * d + d * d + 2 * d * inner) + d * model_config.vocab_size
