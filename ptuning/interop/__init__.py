"""Interoperability: peft prefix adapters (both directions) and the original ChatGLM-6B full-model layout."""

from .original import export_full, original_config, original_state_dict
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
