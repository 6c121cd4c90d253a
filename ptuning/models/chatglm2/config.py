"""The original ChatGLM2-6B / ChatGLM3-6B ``config.json`` and its mapping onto transformers' ``GlmConfig``.

The original folders (``THUDM/chatglm2-6b``, ``chatglm2-6b-32k``, ``chatglm3-6b``, ``chatglm3-6b-32k``,
``chatglm3-6b-base``) describe the model with the keys of their ``configuration_chatglm.py`` (identical in
ChatGLM2 and ChatGLM3). The architecture is the one transformers ships as ``GlmForCausalLM``: RMSNorm,
grouped-query attention with a bias on the query/key/value projection, rotary embedding on the first half
of each head in adjacent pairs, SwiGLU, untied output layer. :func:`read_original_config` reads and checks
the keys; :meth:`OriginalConfig.glm_config` maps them; :func:`original_config_dict` writes them back.

Keys whose values the mapping cannot represent (a LayerNorm model, post-layernorm residuals, biases on the
other linears, dropout between layers, quantized weights) are refused with one line naming the key.
``auto_map`` and the code files of the folder are never read.

ChatGLM2 and ChatGLM3 share these keys but differ in code, which matters in two places: ``rope_ratio``
(ChatGLM2-32k divides the positions by it; ChatGLM3 multiplies the rotary base by it) and the
half-precision rotary table (see :mod:`ptuning.models.chatglm2.rotary`). :func:`chatglm_version` decides
which one a folder holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from transformers import GlmConfig

from ...jsonfile import read_json_object
from ...weights import CheckpointError

VERSIONS = (2, 3)
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
# configuration_chatglm.py's flags that change nothing in the computation with torch >= 2 (the query/key
# layer scaling cancels, the softmax runs in float32 either way, fusion is an implementation detail) or
# are never read by the modeling code (original_rope).
# attention_dropout: the original's torch >= 2 branch calls scaled_dot_product_attention without dropout.
INERT_KEYS = (
    "apply_query_key_layer_scaling", "attention_softmax_in_fp32", "bias_dropout_fusion", "original_rope",
    "attention_dropout",
)
# key -> the only value GlmForCausalLM can represent
FIXED_KEYS = {
    "rmsnorm": True,
    "apply_residual_connection_post_layernorm": False,
    "post_layer_norm": True,
    "add_bias_linear": False,
    "fp32_residual_connection": False,
    "hidden_dropout": 0.0,
    "quantization_bit": 0,
    "tie_word_embeddings": False,
}


@dataclass
class OriginalConfig:
    """The ``config.json`` of an original ChatGLM2/3 folder; defaults are those of its
    ``configuration_chatglm.py``.

    Attributes (the original names; D = kv_channels, the head size):
        num_layers, hidden_size, ffn_hidden_size, kv_channels, num_attention_heads: the sizes.
        multi_query_attention, multi_query_group_num: grouped-query attention and its key/value heads.
        padded_vocab_size: rows of the embedding and of the output layer.
        seq_length: rows of the original's rotary table; every position must be below it.
        layernorm_epsilon: the RMSNorm epsilon.
        add_qkv_bias: a bias on the query/key/value projection.
        rope_ratio: ChatGLM2-32k: positions are divided by it; ChatGLM3: the base 10000 is multiplied.
        pre_seq_len, prefix_projection: the built-in P-Tuning v2 prefix (None = none).
        torch_dtype: the dtype of the stored weights.
        eos_token_id, pad_token_id: 2 and 0 in the real models.
        chatglm_version: 2 or 3 (not an original key: decided by :func:`chatglm_version`).
    """

    num_layers: int = 28
    hidden_size: int = 4096
    ffn_hidden_size: int = 13696
    kv_channels: int = 128
    num_attention_heads: int = 32
    multi_query_attention: bool = False
    multi_query_group_num: int = 1
    padded_vocab_size: int = 65024
    seq_length: int = 2048
    layernorm_epsilon: float = 1e-5
    add_qkv_bias: bool = False
    rope_ratio: float = 1.0
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    torch_dtype: str = "float32"
    eos_token_id: int = 2
    pad_token_id: int = 0
    chatglm_version: int = 2

    @property
    def num_key_value_heads(self) -> int:
        """G: ``multi_query_group_num`` with multi-query attention, else one key/value head per query head."""
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    def glm_config(self) -> GlmConfig:
        """The ``GlmConfig`` that computes what the original code computes (float32; see the rotary module
        for half precision). ``chatglm_version``, ``rope_ratio`` and the prefix keys ride along as extra
        attributes."""
        rope_theta = 10000.0 * (self.rope_ratio if self.chatglm_version == 3 else 1.0)
        return GlmConfig(
            vocab_size=self.padded_vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.ffn_hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.kv_channels,
            hidden_act="silu",
            attention_dropout=0.0,
            max_position_embeddings=self.seq_length,
            rms_norm_eps=self.layernorm_epsilon,
            attention_bias=self.add_qkv_bias,
            rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "partial_rotary_factor": 0.5},
            tie_word_embeddings=False,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            bos_token_id=None,
            use_cache=True,
            architectures=["GlmForCausalLM"],
            chatglm_version=self.chatglm_version,
            rope_ratio=self.rope_ratio,
            pre_seq_len=self.pre_seq_len,
            prefix_projection=self.prefix_projection,
        )


def _check(path: Path, key: str, value: Any, kind: str) -> Any:
    """``value`` if it has the ``kind`` the key needs, else a one-line CheckpointError naming the key."""
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool) and value > 0,
        "int?": value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0),
        "bool": isinstance(value, bool),
        "float+": isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0,
        "str": isinstance(value, str),
        "id": isinstance(value, int) and not isinstance(value, bool) and value >= 0,
    }[kind]
    if not ok:
        expected = {
            "int": "a positive integer",
            "int?": "a positive integer or null",
            "bool": "true or false",
            "float+": "a number > 0",
            "str": "a string",
            "id": "a token id (integer >= 0)",
        }[kind]
        raise CheckpointError(f"{path}: {key!r} is {json.dumps(value)}: expected {expected}")
    return value


KINDS = {
    "num_layers": "int", "hidden_size": "int", "ffn_hidden_size": "int", "kv_channels": "int",
    "num_attention_heads": "int", "multi_query_attention": "bool", "multi_query_group_num": "int",
    "padded_vocab_size": "int", "seq_length": "int", "layernorm_epsilon": "float+", "add_qkv_bias": "bool",
    "rope_ratio": "float+", "pre_seq_len": "int?", "prefix_projection": "bool",
    "torch_dtype": "str", "eos_token_id": "id", "pad_token_id": "id",
}


def parse_original_config(raw: dict, path: Path, version: int) -> OriginalConfig:
    """Checks the keys of an original ``config.json`` (already read) and keeps what the model needs.

    Raises:
        CheckpointError: one line naming the file, the key, its value and what is supported.
    """
    for key, supported in FIXED_KEYS.items():
        if key in raw and raw[key] != supported and not (raw[key] is None and key == "quantization_bit"):
            why = {
                "quantization_bit": "the weights of this folder are quantized; load the full-precision "
                "checkpoint and set model.quantization_bit instead",
            }.get(key, "the transformers Glm architecture this loader maps onto has no such variant")
            raise CheckpointError(
                f"{path}: {key!r} is {json.dumps(raw[key])}, only {json.dumps(supported)} is supported ({why})"
            )
    values = {}
    for item in fields(OriginalConfig):
        if item.name in raw and item.name != "chatglm_version":
            value = raw[item.name]
            if item.name == "rope_ratio" and value is None:
                continue
            values[item.name] = _check(path, item.name, value, KINDS[item.name])
    cfg = OriginalConfig(**values, chatglm_version=version)
    if cfg.torch_dtype not in ("float32", "float16", "bfloat16"):
        raise CheckpointError(f"{path}: 'torch_dtype' is {cfg.torch_dtype!r}: expected float32, float16 or bfloat16")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise CheckpointError(
            f"{path}: 'multi_query_group_num' is {cfg.multi_query_group_num}: it must divide "
            f"num_attention_heads ({cfg.num_attention_heads})"
        )
    if cfg.kv_channels % 4:
        raise CheckpointError(
            f"{path}: 'kv_channels' is {cfg.kv_channels}: expected a multiple of 4 (the rotary embedding turns "
            "adjacent pairs in the first half of each head)"
        )
    return cfg


def _mentions(value: Any, needle: str) -> bool:
    return isinstance(value, str) and needle in value.lower()


def chatglm_version(folder: Path, raw: dict) -> int:
    """2 for a ChatGLM2-6B folder, 3 for a ChatGLM3-6B one.

    Both write the same ``config.json`` keys and the same ``tokenizer.model``; only their code differs, and
    code is never read. The rule, first match wins:

    1. ``"chatglm_version": 2 | 3`` in ``config.json`` (folders this toolkit writes carry it);
    2. ``_name_or_path`` in ``config.json`` or ``name_or_path`` in ``tokenizer_config.json`` naming
       ``chatglm3`` or ``chatglm2`` (the published folders and what HF's ``save_pretrained`` writes from them,
       e.g. a ChatGLM3 ``finetune_demo`` checkpoint);
    3. ``tokenizer_config.json`` declaring one of ChatGLM3's role tokens (``<|user|>`` ...).

    Raises:
        CheckpointError: none of them says (the message shows the key to add).
    """
    path = folder / "config.json"
    stated = raw.get("chatglm_version")
    if stated is not None:
        if stated not in VERSIONS:
            raise CheckpointError(f"{path}: 'chatglm_version' is {json.dumps(stated)}: expected 2 or 3")
        return stated
    tokenizer_config: dict = {}
    tok_path = folder / "tokenizer_config.json"
    if tok_path.is_file():
        tokenizer_config = read_json_object(tok_path, CheckpointError)
    for name in (raw.get("_name_or_path"), tokenizer_config.get("name_or_path")):
        for version in (3, 2):
            if _mentions(name, f"chatglm{version}"):
                return version
    if any(role in json.dumps(tokenizer_config) for role in ROLE_TOKENS):
        return 3
    raise CheckpointError(
        f"{path}: cannot tell ChatGLM2-6B from ChatGLM3-6B (their config.json and tokenizer.model are alike and "
        "their code is never read); add \"chatglm_version\": 2 or 3 to this file"
    )


#: what tells GLM-4's original folder (``THUDM/glm-4-9b-chat``: ``model_type`` chatglm, ChatGLM2's config keys)
#: from a ChatGLM2/3 one: its tokenizer class, its vocabulary and its list of end tokens
GLM4_TOKENIZER_CLASS = "ChatGLM4Tokenizer"
GLM4_VOCAB_SIZE = 151552
GLM4_EOS_TOKEN_ID = 151329  # <|endoftext|>, first of its eos_token_id list


def glm4_original_evidence(folder: str | Path, raw: dict | None = None) -> str | None:
    """What marks ``folder`` as GLM-4's original remote-code layout (``THUDM/glm-4-9b-chat``, whose
    ``config.json`` reads like ChatGLM2/3's and whose ``tokenizer.model`` is tiktoken's, not SentencePiece),
    or None for any other folder."""
    folder = Path(folder)
    if raw is None:
        try:
            raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            raw = {}
    raw = raw if isinstance(raw, dict) else {}
    try:
        tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        tokenizer_config = {}
    if isinstance(tokenizer_config, dict) and tokenizer_config.get("tokenizer_class") == GLM4_TOKENIZER_CLASS:
        return f"tokenizer_config.json names {GLM4_TOKENIZER_CLASS}"
    eos = raw.get("eos_token_id")
    if isinstance(eos, list) and GLM4_EOS_TOKEN_ID in eos:
        return f"config.json has GLM-4's eos_token_id list {json.dumps(eos)}"
    if raw.get("padded_vocab_size") == GLM4_VOCAB_SIZE:
        return f"config.json has GLM-4's padded_vocab_size {GLM4_VOCAB_SIZE}"
    return None


def refuse_glm4_original(folder: str | Path, raw: dict | None = None) -> None:
    """Stops GLM-4's original remote-code folder before it is read as ChatGLM2/3.

    Raises:
        CheckpointError: one line naming the folder, what gave it away and the layout to use instead.
    """
    evidence = glm4_original_evidence(folder, raw)
    if evidence:
        raise CheckpointError(
            f"{Path(folder) / 'config.json'}: GLM-4's original remote-code layout (THUDM/glm-4-9b-chat: {evidence}), "
            "not ChatGLM2/3; its code is never run here: use THUDM/glm-4-9b-chat-hf (transformers' GlmForCausalLM) "
            "as the model folder instead"
        )


def read_original_config(folder: str | Path, raw: dict | None = None, version: int | None = None) -> OriginalConfig:
    """The checked :class:`OriginalConfig` of a ChatGLM2/3 folder.

    Args:
        raw: the ``config.json`` already read (None: read it).
        version: 2 or 3 when the caller knows it (None: :func:`chatglm_version` decides).

    Raises:
        CheckpointError: no or unreadable ``config.json``, a value the mapping cannot represent, or a folder
            whose version cannot be told (each one line naming the file and key).
    """
    folder = Path(folder)
    path = folder / "config.json"
    if raw is None:
        if not path.is_file():
            raise CheckpointError(f"{folder}: no config.json (expected a ChatGLM2-6B / ChatGLM3-6B model folder)")
        raw = read_json_object(path, CheckpointError)
    refuse_glm4_original(folder, raw)
    if version is not None and version not in VERSIONS:
        raise CheckpointError(f"chatglm_version {version!r}: expected 2 or 3")
    return parse_original_config(raw, path, version or chatglm_version(folder, raw))


def original_config_dict(config: GlmConfig, *, dtype: str | None = None, with_prefix: bool = True) -> dict:
    """``config.json`` in the original keys for a ``GlmConfig`` made by :meth:`OriginalConfig.glm_config`
    (the export), with ``chatglm_version`` kept so that it loads back without guessing.

    Args:
        dtype: the ``torch_dtype`` of the written weights.
        with_prefix: write ``pre_seq_len`` / ``prefix_projection`` (a whole model with its prefix inside).
    """
    multi_query = config.num_key_value_heads != config.num_attention_heads
    values = {
        "architectures": ["ChatGLMModel"],
        "model_type": "chatglm",
        "add_bias_linear": False,
        "add_qkv_bias": bool(config.attention_bias),
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True,
        "ffn_hidden_size": config.intermediate_size,
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "hidden_size": config.hidden_size,
        "kv_channels": config.head_dim,
        "layernorm_epsilon": config.rms_norm_eps,
        "multi_query_attention": multi_query,
        "multi_query_group_num": config.num_key_value_heads if multi_query else 1,
        "num_attention_heads": config.num_attention_heads,
        "num_layers": config.num_hidden_layers,
        "original_rope": True,
        "padded_vocab_size": config.vocab_size,
        "post_layer_norm": True,
        "rmsnorm": True,
        "seq_length": config.max_position_embeddings,
        "use_cache": True,
        "torch_dtype": dtype or "float16",
        "tie_word_embeddings": False,
        "eos_token_id": config.eos_token_id,
        "pad_token_id": config.pad_token_id,
        "quantization_bit": 0,
        "chatglm_version": getattr(config, "chatglm_version", 2),
    }
    ratio = getattr(config, "rope_ratio", 1.0)
    if ratio != 1.0:
        values["rope_ratio"] = ratio
    if with_prefix:
        values["pre_seq_len"] = getattr(config, "pre_seq_len", None)
        values["prefix_projection"] = bool(getattr(config, "prefix_projection", False))
    return values


__all__ = [
    "INERT_KEYS",
    "ROLE_TOKENS",
    "OriginalConfig",
    "chatglm_version",
    "glm4_original_evidence",
    "original_config_dict",
    "parse_original_config",
    "read_original_config",
    "refuse_glm4_original",
]
