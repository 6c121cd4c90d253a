"""transformers' own decoders as a model family: GLM (``THUDM/glm-4-9b-chat-hf``), GLM-4-0414, Llama, Qwen2
and Qwen3, loaded with ``AutoModelForCausalLM`` / ``AutoTokenizer`` from a local folder (weights in the HF
layout, a fast ``tokenizer.json``) or a single ``.gguf`` file (:mod:`.gguf`), remote code never run. The prefix enters through the attention interface
(:mod:`.attention`, :mod:`.modeling`); prompts through the tokenizer's chat template (:mod:`.template`)."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer

from ...errors import ConfigError
from ...prefix import PrefixShape
from ...weights import CheckpointError, is_gguf_file
from .. import HF_ARCHITECTURES
from ..base import Family, check_vocab_size
from .gguf import load_gguf_tokenizer
from .memory import DecoderMemory
from .modeling import load_causal_lm_config, load_prefix_model, prefix_shape
from .template import ChatTemplatePrompt

#: ``config.json`` ``architectures`` this family takes (the classes whose attention calls the interface with
#: their ``layer_idx`` and whose prefix tests run in tests/test_hf_prefix.py)
ARCHITECTURES = HF_ARCHITECTURES

# Config values that decide what the backbone computes; recorded (hashed) with every checkpoint.
FINGERPRINT_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "rope_parameters",
    "partial_rotary_factor",
    "attention_bias",
    "tie_word_embeddings",
    "sliding_window",
    "use_sliding_window",
    "layer_types",
)

# The per-layer linears weight-only quantization replaces (GLM-4-0414 fuses gate and up into gate_up_proj).
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj", "down_proj")


def generation_stop_ids(folder: Path) -> list[int]:
    """``eos_token_id`` of the folder's ``generation_config.json`` (an id or a list), or none."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return []
    try:
        value = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return []
    return _ids(value)


def _ids(value) -> list[int]:
    if isinstance(value, int):
        return [value]
    return [v for v in value if isinstance(v, int)] if isinstance(value, list) else []


class HFFamily(Family):
    """transformers' own decoders (:data:`ARCHITECTURES`: GLM, GLM-4-0414, Llama, Qwen2, Qwen3), from a folder
    or one ``.gguf`` file: transformers' model class with the prefix attached (:func:`~.modeling.attach_prefix`;
    per layer ``[B, num_key_value_heads, P, head_dim]``, read by the attention interface, never rotated), the
    folder's fast tokenizer and its chat template. The prefix stays in this toolkit's checkpoint format: every
    export is refused (peft would shift the rotary positions; ``original`` and ``full`` are ChatGLM layouts).

    Raises (:meth:`load_model`, :meth:`model_config`):
        CheckpointError: no readable config, or a ``model_type`` only remote code defines.
    """

    name = "hf"
    label = "transformers decoder"

    def load_model(self, folder: Path, *, dtype, pre_seq_len, prefix_projection, prefix_dropout, device=None):
        return load_prefix_model(
            folder, dtype=dtype, pre_seq_len=pre_seq_len, prefix_projection=prefix_projection,
            prefix_dropout=prefix_dropout, device=device,
        )

    def model_config(self, folder: Path):
        """The folder's transformers config (``AutoConfig``, never remote code).

        Raises:
            CheckpointError: no or unreadable ``config.json``, or a ``model_type`` transformers does not know.
        """
        return load_causal_lm_config(folder)

    def load_tokenizer(self, folder: Path, vocab_size: int | None = None):
        """The folder's fast tokenizer (``tokenizer.json``) with its chat template, through ``AutoTokenizer``
        (never remote code).

        Raises:
            ConfigError: no ``tokenizer.json``, a tokenizer transformers cannot load without remote code, or
                more tokens than the model's ``vocab_size``.
        """
        folder = Path(folder)
        if is_gguf_file(folder):
            try:
                tokenizer = load_gguf_tokenizer(folder)
            except CheckpointError as err:
                raise ConfigError(str(err)) from None
        elif not (folder / "tokenizer.json").is_file():
            raise ConfigError(f"{folder}: no tokenizer.json (a transformers fast tokenizer) in the model folder")
        else:
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
            except (OSError, ValueError, KeyError) as err:
                lines = [line.strip() for line in str(err).splitlines() if line.strip()]
                raise ConfigError(f"{folder}: cannot load the tokenizer ({lines[0] if lines else type(err).__name__})") from None
        return check_vocab_size(tokenizer, folder, vocab_size)

    def describe(self, model_config=None) -> str:
        """The label with the architecture (``transformers decoder (GlmForCausalLM)``) when the config names one."""
        architectures = getattr(model_config, "architectures", None) or []
        return f"{self.label} ({architectures[0]})" if architectures else self.label

    def template(self, tokenizer, model_config) -> ChatTemplatePrompt:
        stops = _ids(getattr(model_config, "eos_token_id", None))
        folder = getattr(tokenizer, "name_or_path", None)
        if folder:
            stops += generation_stop_ids(Path(folder))
        return ChatTemplatePrompt(tokenizer, stops)

    def text_prefix_positions(self, length: int) -> list[int]:
        """``-length .. -1``: the text is read where it would stand right before the prompt (whose positions
        start at 0). Rotary attention depends on the distance between a query and a key only, so every prompt
        token then sees the prefix as it would see that text read first (its keys and values exactly; the
        prefix keys are used as given, never rotated again). At 0 .. P-1 the text's keys would sit at the
        prompt's own positions, where no text ever stood."""
        return list(range(-length, 0))

    def prefix_shape(self, model_config, pre_seq_len: int, prefix_projection: bool) -> PrefixShape:
        return prefix_shape(model_config, pre_seq_len, prefix_projection)

    def max_positions(self, model_config) -> int:
        return int(model_config.max_position_embeddings)

    def fingerprint_keys(self, model_config) -> dict:
        return {k: getattr(model_config, k) for k in FINGERPRINT_KEYS if getattr(model_config, k, None) is not None}

    def export_unsupported(self, kind: str) -> str | None:
        if kind in ("peft", "from-peft"):
            return (
                "peft's PREFIX_TUNING cannot carry the prefix of a transformers decoder as this toolkit applies it: "
                "peft feeds the prefix as P cached tokens and shifts the rotary positions of the real tokens by P, "
                "so the same values compute a different model"
            )
        if kind in ("original", "full"):
            return (
                f"'{kind}' writes ChatGLM-6B's original layout; the prefix of a transformers decoder stays in this "
                "toolkit's checkpoint format (prefix.safetensors + prefix_config.json)"
            )
        return None

    def block_linear_names(self) -> tuple[str, ...]:
        return BLOCK_LINEARS

    def train_memory(self) -> DecoderMemory:
        return DecoderMemory()

    def matmul_weights(self, model_config) -> int:
        c = model_config
        shape = prefix_shape(c, 0)
        q_width = c.num_attention_heads * shape.head_dim
        kv_width = shape.num_key_value_heads * shape.head_dim
        attention = c.hidden_size * (2 * q_width + 2 * kv_width)  # q, o and k, v
        mlp = 3 * c.hidden_size * c.intermediate_size  # gate, up, down
        return c.num_hidden_layers * (attention + mlp) + c.hidden_size * c.vocab_size
