"""ChatGLM-6B model core with the P-Tuning v2 prefix."""

from .config import ChatGLMConfig, tiny_config
from .loading import CheckpointError
from .modeling import ChatGLMForConditionalGeneration, ChatGLMModel, causal_lm_loss
from .prefix import (
    PrefixEncoder,
    cast_backbone,
    is_prefix_param,
    mark_only_prefix_trainable,
    prefix_state_dict,
)

__all__ = [
    "ChatGLMConfig",
    "CheckpointError",
    "cast_backbone",
    "ChatGLMForConditionalGeneration",
    "ChatGLMModel",
    "PrefixEncoder",
    "causal_lm_loss",
    "is_prefix_param",
    "mark_only_prefix_trainable",
    "prefix_state_dict",
    "tiny_config",
]
