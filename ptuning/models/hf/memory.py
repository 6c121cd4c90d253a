"""transformers' decoders' part of the training memory estimate (:mod:`ptuning.memory`, ``architecture
"transformers"``): ChatGLM2/3's formulas (:mod:`ptuning.models.chatglm2.memory`), whose architecture they share —
grouped-query attention, RMSNorm, SwiGLU, the prefix attended with SDPA — read from a transformers config (a
model folder's ``config.json`` or the config in a ``.gguf`` file). ChatGLM2's query/key/value biases are counted
for every model (a few thousand parameters too many where a model has none, e.g. Llama's).
"""

from __future__ import annotations

from pathlib import Path

from ...memory import ModelShape
from ..chatglm2.memory import ChatGLM2Memory
from .modeling import load_causal_lm_config


class TransformersDecoderMemory(ChatGLM2Memory):
    """The formulas of :class:`~ptuning.memory.ArchitectureMemory` for Llama, Qwen2/3, GLM and GLM-4 decoders."""

    name = "transformers"
    label = "transformers decoder"
    presets: dict[str, ModelShape] = {}

    def shape(self, config, **overrides) -> ModelShape:
        """The shape of a transformers decoder config (``head_dim`` where it gives one, else hidden / heads)."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        values = dict(
            architecture=self.name,
            vocab=config.vocab_size,
            hidden=config.hidden_size,
            layers=config.num_hidden_layers,
            heads=config.num_attention_heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            inner=config.intermediate_size,
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )
        return ModelShape(**{**values, **overrides})

    def read_config(self, folder: Path):
        """The folder's (or ``.gguf`` file's) transformers config, never remote code."""
        return load_causal_lm_config(folder)
