"""A KV cache for generation that grows by doubling and keeps room for the prefix in front.

transformers' ``DynamicCache`` concatenates every new token onto the whole cache, and attending to the
prefix then needs another concatenation of prefix and cache in every layer at every step: both copy all
cached keys and values per token. :class:`ChatGLMCache` writes each new token into a preallocated buffer
(doubling when full) whose first ``P`` slots hold this layer's prefix, so attention reads one contiguous
view of ``prefix + cached tokens`` with no copy. The prefix stays a separate, read-only input: the model
hands it to every layer, the cache only stores it next to the tokens, and ``get_seq_length`` and the
cached ``keys`` / ``values`` never include it.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class PrefixRoomLayer(DynamicLayer):
    """One layer's keys and values ``[B, N, T, D]`` inside a buffer ``[B, N, P + capacity, D]``."""

    def __init__(self, prefix_length: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.prefix_length = prefix_length
        self._k = self._v = None  # the buffers
        self._length = 0

    def _adopt(self) -> None:
        """Rebuild the buffers from ``keys`` / ``values`` after transformers replaced them (beam reorder,
        crop, batch select ...)."""
        keys, values = self.keys, self.values
        self._k = self._v = None
        self._length = 0
        if keys is not None and keys.numel() > 0:
            self._grow(keys, keys.shape[-2])
            self._write(keys, values)

    def _grow(self, like: torch.Tensor, needed: int) -> None:
        batch, heads, _, dim = like.shape
        capacity = max(64, needed)
        if self._k is not None:
            capacity = max(capacity, 2 * (self._k.shape[-2] - self.prefix_length))
        total = self.prefix_length + capacity
        k = like.new_empty(batch, heads, total, dim)
        v = like.new_empty(batch, heads, total, dim)
        if self._k is not None:
            end = self.prefix_length + self._length
            k[:, :, :end] = self._k[:, :, :end]
            v[:, :, :end] = self._v[:, :, :end]
        self._k, self._v = k, v

    def _write(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        start = self.prefix_length + self._length
        end = start + key_states.shape[-2]
        self._k[:, :, start:end] = key_states
        self._v[:, :, start:end] = value_states
        self._length += key_states.shape[-2]
        self.keys = self._k[:, :, self.prefix_length:end]
        self.values = self._v[:, :, self.prefix_length:end]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys = self.values = None
        if self._k is not None and (self.keys is None or self.keys.data_ptr() != self._k[:, :, self.prefix_length:].data_ptr()
                                    or self.keys.shape[-2] != self._length or self.keys.shape[0] != self._k.shape[0]):
            self._adopt()
        elif self._k is None and self.keys is not None and self.keys.numel() > 0:
            self._adopt()
        needed = self._length + key_states.shape[-2]
        if self._k is None or self._k.shape[0] != key_states.shape[0] or needed > self._k.shape[-2] - self.prefix_length:
            self._grow(key_states, needed)
        self._write(key_states, value_states)
        return self.keys, self.values

    def with_prefix(self, prefix_key: torch.Tensor, prefix_value: torch.Tensor):
        """Keys and values ``[B, N, P + T, D]`` with this layer's prefix in front, without concatenating."""
        p = self.prefix_length
        self._k[:, :, :p] = prefix_key
        self._v[:, :, :p] = prefix_value
        end = p + self._length
        return self._k[:, :, :end], self._v[:, :, :end]

    def get_seq_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def reset(self) -> None:
        self._k = self._v = None
        self._length = 0
        super().reset()


class ChatGLMCache(Cache):
    """The generation cache of :class:`~ptuning.models.chatglm.ChatGLMForConditionalGeneration`."""

    def __init__(self, config):
        prefix = config.pre_seq_len or 0
        super().__init__(layers=[PrefixRoomLayer(prefix) for _ in range(config.num_layers)])
