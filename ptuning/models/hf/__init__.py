"""transformers' own decoders (GLM, GLM-4, Llama, Qwen2, Qwen3) with the P-Tuning v2 prefix entering through
the ``AttentionInterface`` (:mod:`.attention`, :mod:`.modeling`)."""

from .attention import ATTENTION_NAME, prefix_attention, register
from .modeling import attach_prefix, load_causal_lm, load_prefix_model, prefix_class, prefix_shape

__all__ = [
    "ATTENTION_NAME",
    "attach_prefix",
    "load_causal_lm",
    "load_prefix_model",
    "prefix_attention",
    "prefix_class",
    "prefix_shape",
    "register",
]
