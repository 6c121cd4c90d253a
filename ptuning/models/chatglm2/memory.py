"""ChatGLM2/3's part of the training memory estimate (:mod:`ptuning.memory`, ``architecture "glm"``): they run on
transformers' ``GlmForCausalLM``, so their formulas are a GLM decoder's (:mod:`ptuning.models.hf.memory`):
grouped-query attention (G key/value heads of D, the prefix G·D wide per layer), a bias on the query/key/value
projections only, RMSNorm, SwiGLU with fused gate and up projections, half of each head rotated, untied output
layer. Only the published shapes, the folders they read (the original ``config.json``) and the prefix projection's
embedding (K = 2·L·G·D wide, as the original's) are their own.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..hf.memory import DecoderMemory
from ..memory import ModelShape
from .config import parse_original_config

# ChatGLM2-6B and ChatGLM3-6B (and their -base / -32k) share their shape
PUBLISHED = ModelShape(architecture="glm", model_type="glm", vocab=65024, hidden=4096, layers=28, heads=32, kv_heads=2,
                       head_dim=128, inner=13696, attention_bias=True, rotary_dim=64)


class ChatGLM2Memory(DecoderMemory):
    """The formulas of :class:`~ptuning.models.memory.ArchitectureMemory` for ChatGLM2/3: a GLM decoder's."""

    name = "glm"
    label = "ChatGLM2/3"
    presets = {"chatglm2-6b": PUBLISHED, "chatglm3-6b": PUBLISHED}

    def read_config(self, folder: Path):
        """The ``GlmConfig`` of an original folder's ``config.json``; ChatGLM2 and ChatGLM3 have the same sizes,
        so a folder that does not say which it is reads as ChatGLM3."""
        path = Path(folder) / "config.json"
        return parse_original_config(json.loads(path.read_text(encoding="utf-8")), path, 3).glm_config()

    def prefix_embedding_width(self, shape: ModelShape) -> int:
        """E = K: the original ``PrefixEncoder`` of ChatGLM2/3 projects K -> H -> K."""
        return shape.kv_width
