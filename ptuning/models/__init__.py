"""Model families and the one table that picks a family for a model folder.

The family is read from the folder's ``config.json`` (``model_type``, ``architectures`` and the keys that
tell ChatGLM-6B from ChatGLM2/3, which share ``model_type`` "chatglm"); remote code (``auto_map``, ``.py``
files) is never looked at, let alone run. Nothing else in the toolkit branches on the model.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..jsonfile import read_json_object
from ..weights import CheckpointError, is_gguf_file
from .base import Conversation, Family, PromptIds, PromptTemplate, TrainRow, conversation_from_messages


class UnsupportedModelError(ValueError):
    """A model folder that no family handles; the message names ``architectures`` and what is supported."""


@dataclass(frozen=True)
class FamilyEntry:
    """One row of the table: which configs a family takes and where its code lives."""

    name: str
    target: str  # "module:Class"
    matches: Callable[[dict], bool]
    architectures: tuple[str, ...]  # shown in messages

    def load(self) -> Family:
        module, cls = self.target.split(":")
        return getattr(importlib.import_module(module), cls)()


def _is_chatglm_v1(cfg: dict) -> bool:
    return cfg.get("model_type") == "chatglm" and "inner_hidden_size" in cfg


def _is_chatglm2(cfg: dict) -> bool:
    # an original ChatGLM2/3 folder, or the GlmConfig it is loaded as (which records chatglm_version)
    original = cfg.get("model_type") == "chatglm" and "ffn_hidden_size" in cfg and "padded_vocab_size" in cfg
    return original or (cfg.get("model_type") == "glm" and cfg.get("chatglm_version") in (2, 3))


#: ``architectures`` of transformers' own decoder classes that :mod:`ptuning.models.hf` serves
HF_ARCHITECTURES = ("GlmForCausalLM", "Glm4ForCausalLM", "LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


#: their ``model_type`` values, for configs that name no ``architectures`` (configs built in code)
HF_MODEL_TYPES = ("glm", "glm4", "llama", "qwen2", "qwen3")


def _is_transformers_decoder(cfg: dict) -> bool:
    architectures = cfg.get("architectures")
    if not architectures:
        return cfg.get("model_type") in HF_MODEL_TYPES
    return isinstance(architectures, list) and any(a in HF_ARCHITECTURES for a in architectures)


FAMILIES: list[FamilyEntry] = [
    FamilyEntry("chatglm", "ptuning.models.chatglm.family:ChatGLMFamily", _is_chatglm_v1,
                ("ChatGLM-6B (model_type chatglm, ChatGLMModel / ChatGLMForConditionalGeneration)",)),
    FamilyEntry("chatglm2", "ptuning.models.chatglm2.family:ChatGLM2Family", _is_chatglm2,
                ("ChatGLM2-6B / ChatGLM3-6B (model_type chatglm with ffn_hidden_size and padded_vocab_size)",)),
    # last: a ChatGLM2/3 model loaded onto GlmForCausalLM (model_type glm with chatglm_version) is chatglm2's
    FamilyEntry("hf", "ptuning.models.hf.family:HFFamily", _is_transformers_decoder, HF_ARCHITECTURES),
]


def read_config(folder: str | Path) -> dict:
    """The folder's ``config.json`` as a dict; for a ``.gguf`` file, the transformers config stored in it (its
    ``architectures`` is None: the family is found by ``model_type``).

    Raises:
        UnsupportedModelError: no such folder, no ``config.json``, or not a JSON object (names the file); a
            ``.gguf`` file transformers cannot read.
    """
    folder = Path(folder)
    path = folder / "config.json"
    if is_gguf_file(folder):
        # only transformers' decoders come as single GGUF files: their family reads the config stored in one
        # (transformers' GGUF reader; loaded on first use, as every family's code)
        try:
            return family_named("hf").model_config(folder).to_dict()
        except CheckpointError as err:
            raise UnsupportedModelError(str(err)) from None
    if not folder.is_dir():
        raise UnsupportedModelError(
            f"{folder}: not a folder (expected a model folder with config.json and weights, or a .gguf file)")
    if not path.is_file():
        raise UnsupportedModelError(f"{folder}: no config.json (expected a model folder with config.json and weights)")
    return read_json_object(path, UnsupportedModelError)


def supported() -> list[str]:
    """Every architecture some family handles, for messages."""
    return [arch for entry in FAMILIES for arch in entry.architectures]


def family_for(folder: str | Path) -> Family:
    """The family that handles the model in ``folder``.

    Raises:
        UnsupportedModelError: one line naming ``architectures`` / ``model_type`` and the supported list; for a
            config that only points at remote code (``auto_map``), which supported layout to convert to.
    """
    cfg = read_config(folder)
    for entry in FAMILIES:
        if entry.matches(cfg):
            return entry.load()
    path = Path(folder) if is_gguf_file(folder) else Path(folder) / "config.json"
    arch = cfg.get("architectures")
    what = f"architectures={arch!r}, model_type={cfg.get('model_type')!r}"
    if cfg.get("auto_map"):
        raise UnsupportedModelError(
            f"{path}: {what} is defined only by remote code (auto_map), which is never run; convert the "
            f"checkpoint to a transformers-native layout (e.g. with the model's official *-hf release) — "
            f"supported: {'; '.join(supported())}"
        )
    raise UnsupportedModelError(f"{path}: no model family handles {what}; supported: {'; '.join(supported())}")


def family_named(name: str) -> Family:
    """The family recorded as ``family`` in a checkpoint's ``prefix_config.json``.

    Raises:
        UnsupportedModelError: no family of that name.
    """
    for entry in FAMILIES:
        if entry.name == name:
            return entry.load()
    raise UnsupportedModelError(f"no model family named {name!r}; known: {', '.join(e.name for e in FAMILIES)}")


def family_of(model_or_config) -> Family:
    """The family of a loaded model (recorded by :func:`ptuning.build.load_model`) or of a config object.

    Raises:
        UnsupportedModelError: no family handles the config.
    """
    family = getattr(model_or_config, "ptuning_family", None)
    if isinstance(family, Family):
        return family
    config = getattr(model_or_config, "config", model_or_config)
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    for entry in FAMILIES:
        if entry.matches(raw):
            return entry.load()
    raise UnsupportedModelError(
        f"no model family handles a config with model_type={raw.get('model_type')!r}; supported: {'; '.join(supported())}"
    )


__all__ = [
    "FAMILIES",
    "HF_ARCHITECTURES",
    "Conversation",
    "Family",
    "FamilyEntry",
    "PromptIds",
    "PromptTemplate",
    "TrainRow",
    "UnsupportedModelError",
    "conversation_from_messages",
    "family_for",
    "family_named",
    "family_of",
    "read_config",
    "supported",
]
