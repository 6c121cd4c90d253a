"""Interoperability: peft prefix adapters (both directions). The original full-model layouts are the families' own
(:meth:`ptuning.models.base.Family.export_full`, e.g. :mod:`ptuning.models.chatglm.original`)."""

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
    "export_peft",
    "export_peft_checkpoint",
    "import_peft",
    "load_peft_prefix",
    "peft_config_for",
    "prefix_output",
    "read_peft_adapter",
]
