"""Serving trained prefixes: an OpenAI-compatible HTTP API and a chat page, many prefixes batched on one
frozen backbone.

* :mod:`.engine`: :class:`Engine` (``add`` / ``step`` / ``cancel``) and the :class:`PrefixBank`;
* :mod:`.scheduler`: the decode thread, detokenisation and stop strings;
* :mod:`.service`: model names, prompts through the family's template, requests in flight;
* :mod:`.protocol`: OpenAI's request bodies and error body;
* :mod:`.app`: the FastAPI routes; :mod:`.web`: the Gradio page; :mod:`.cli`: ``ptuning-serve``.
"""

from .engine import DecodeEngine, Engine, EngineFull, EngineRequest, PrefixBank, StepOutput

__all__ = ["DecodeEngine", "Engine", "EngineFull", "EngineRequest", "PrefixBank", "StepOutput"]
