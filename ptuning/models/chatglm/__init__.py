"""ChatGLM-6B (v1): our own model code, with parameter names equal to the original checkpoint keys."""

from ...weights import CheckpointError
from ..loss import causal_lm_loss
from .config import ChatGLMConfig, tiny_config
from .modeling import ChatGLMForConditionalGeneration, ChatGLMModel

__all__ = [
    "ChatGLMConfig",
    "ChatGLMForConditionalGeneration",
    "ChatGLMModel",
    "CheckpointError",
    "causal_lm_loss",
    "tiny_config",
]
