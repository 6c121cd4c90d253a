"""ChatGLM-6B configuration, reading the original ``config.json`` keys as they are."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig


@strict
class ChatGLMConfig(PreTrainedConfig):
    """Configuration of a ChatGLM-6B (v1) model, optionally with a P-Tuning v2 prefix.

    The field names are those of the original ``config.json``; its ``auto_map`` is ignored (no remote
    code is ever executed). ``pre_seq_len`` switches the prefix on; ``prefix_projection`` puts an MLP of
    width ``hidden_size`` between the prefix embedding and the per-layer keys/values.
    """

    model_type = "chatglm"
    attribute_map = {"num_hidden_layers": "num_layers"}

    vocab_size: int = 130528
    hidden_size: int = 4096
    num_layers: int = 28
    num_attention_heads: int = 32
    inner_hidden_size: int = 16384
    max_sequence_length: int = 2048
    layernorm_epsilon: float = 1e-5
    bos_token_id: int = 130004
    eos_token_id: int = 130005
    pad_token_id: int = 3
    mask_token_id: int = 130000
    gmask_token_id: int = 130001
    position_encoding_2d: bool = True
    pre_seq_len: int | None = None
    prefix_projection: bool = False
    prefix_dropout: float = 0.1
    quantization_bit: int = 0
    use_cache: bool = True
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        kwargs.pop("auto_map", None)  # the original's remote-code pointers: never used
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Check every size; errors name the key, the value and what is allowed."""

        def need(ok: bool, key: str, allowed: str) -> None:
            if not ok:
                raise ValueError(f"config key '{key}' = {getattr(self, key)!r}: expected {allowed}")

        for key in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "inner_hidden_size"):
            need(getattr(self, key) > 0, key, "a positive integer")
        need(
            self.hidden_size % self.num_attention_heads == 0,
            "hidden_size",
            f"a multiple of num_attention_heads ({self.num_attention_heads})",
        )
        need(
            (self.hidden_size // self.num_attention_heads) % 4 == 0,
            "num_attention_heads",
            f"a head size (hidden_size / heads) divisible by 4 for the 2D rotary embedding, got "
            f"{self.hidden_size}/{self.num_attention_heads}",
        )
        need(self.position_encoding_2d is True, "position_encoding_2d", "true (ChatGLM-6B uses 2D positions)")
        need(
            self.pre_seq_len is None or self.pre_seq_len > 0,
            "pre_seq_len",
            "null (no prefix) or a positive integer",
        )
        need(self.quantization_bit in (0, 4, 8), "quantization_bit", "0, 4 or 8")
        need(0.0 <= self.prefix_dropout < 1.0, "prefix_dropout", "a probability in [0, 1)")
        for key in ("bos_token_id", "eos_token_id", "mask_token_id", "gmask_token_id"):
            value = getattr(self, key)
            need(0 <= value < self.vocab_size, key, f"an id in [0, vocab_size={self.vocab_size})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def tiny_config(**overrides) -> ChatGLMConfig:
    """A few-layer ChatGLM of hidden size 64 for tests and the built-in default.

    The special ids sit at the top of a 1,000-token vocabulary, in the same order as the real model's
    (``[MASK] [gMASK] [sMASK] <unused_0> <sop> <eop>``).
    """
    values = dict(
        vocab_size=1000,
        hidden_size=64,
        num_layers=2,
        num_attention_heads=4,
        inner_hidden_size=256,
        max_sequence_length=512,
        bos_token_id=994,
        eos_token_id=995,
        pad_token_id=3,
        mask_token_id=990,
        gmask_token_id=991,
    )
    values.update(overrides)
    return ChatGLMConfig(**values)
