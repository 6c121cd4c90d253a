"""P-Tuning v2: the prefix encoder and the one place that decides what is trainable and saved.

The prefix encoder turns ids ``0..P-1`` into one set of keys and values per layer, ``[P, 2·L·H]``,
either straight from an embedding or through ``embedding [P, H] -> Linear -> tanh -> Linear``.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ChatGLMConfig

PREFIX_MODULE = "transformer.prefix_encoder"


class PrefixEncoder(nn.Module):
    """Makes the per-layer prefix keys/values.

    Output of :meth:`forward`: ``[P, 2·L·H]``; row p viewed as ``[2·L, N, D]`` holds layer l's keys at
    index 2l and its values at 2l+1 (heads in head order), as in the original.
    """

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.pre_seq_len = config.pre_seq_len
        self.prefix_projection = config.prefix_projection
        kv_width = 2 * config.num_layers * config.hidden_size
        if self.prefix_projection:
            self.embedding = nn.Embedding(config.pre_seq_len, config.hidden_size)
            self.trans = nn.Sequential(
                nn.Linear(config.hidden_size, config.hidden_size),
                nn.Tanh(),
                nn.Linear(config.hidden_size, kv_width),
            )
        else:
            self.embedding = nn.Embedding(config.pre_seq_len, kv_width)

    def forward(self) -> torch.Tensor:
        weight = self.embedding.weight  # (P, H) or (P, 2LH): the ids are 0..P-1, so the rows in order
        if self.prefix_projection:
            return self.trans(weight)  # (P, 2LH)
        return weight


def is_prefix_param(name: str) -> bool:
    """True for parameters (and state-dict keys) of the prefix encoder."""
    return name.startswith(PREFIX_MODULE + ".") or name.startswith("prefix_encoder.")


def mark_only_prefix_trainable(model: nn.Module) -> tuple[int, int]:
    """Freeze everything but the prefix encoder. Returns ``(trainable, total)`` parameter counts.

    The same predicate (:func:`is_prefix_param`) decides what :func:`prefix_state_dict` saves.
    """
    trainable = total = 0
    for name, param in model.named_parameters():
        keep = is_prefix_param(name)
        param.requires_grad_(keep)
        total += param.numel()
        trainable += param.numel() if keep else 0
    if trainable == 0:
        raise ValueError("the model has no prefix encoder: set pre_seq_len in its config")
    return trainable, total


def prefix_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The prefix encoder's weights under their full checkpoint keys (``transformer.prefix_encoder.*``)."""
    return {
        name: tensor.detach().clone()
        for name, tensor in model.state_dict().items()
        if is_prefix_param(name)
    }


def cast_backbone(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Casts every parameter to ``dtype`` except the prefix encoder, which stays float32."""
    for name, param in model.named_parameters():
        target = torch.float32 if is_prefix_param(name) else dtype
        if param.is_floating_point() and param.dtype != target:
            param.data = param.data.to(target)
    return model
