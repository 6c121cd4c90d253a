"""ChatGLM-6B model core with the P-Tuning v2 prefix."""

from .config import ChatGLMConfig, tiny_config
from .modeling import ChatGLMForConditionalGeneration, ChatGLMModel, causal_lm_loss
from .prefix import PrefixEncoder, is_prefix_param, mark_only_prefix_trainable, prefix_state_dict

__all__ = [
    "ChatGLMConfig",
    "ChatGLMForConditionalGeneration",
    "ChatGLMModel",
    "PrefixEncoder",
    "causal_lm_loss",
    "is_prefix_param",
    "mark_only_prefix_trainable",
    "prefix_state_dict",
    "tiny_config",
]
