"""Interoperability: peft prefix adapters (both directions); the original full-model layouts are the families' own
(:meth:`ptuning.models.base.Family.export_full`; ChatGLM-6B's re-exported here)."""

from ..models.chatglm.original import export_full, original_config, original_state_dict
from .peft import (
    export_peft,
    export_peft_checkpoint,
    import_peft,
    load_peft_prefix,
    peft_config_for,
    prefix_output,
    read_peft_adapter,
)

__all__ = [
    "export_full",
    "export_peft",
    "export_peft_checkpoint",
    "import_peft",
    "load_peft_prefix",
    "original_config",
    "original_state_dict",
    "peft_config_for",
    "prefix_output",
    "read_peft_adapter",
]
