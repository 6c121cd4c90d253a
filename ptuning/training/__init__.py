"""The accelerate training loop, prefix checkpoints and experiment tracking."""

from .checkpoint import export_original, latest_checkpoint, load_prefix, read_prefix, save_checkpoint
from .loop import TrainingError, TrainResult, run

__all__ = [
    "TrainResult",
    "TrainingError",
    "export_original",
    "latest_checkpoint",
    "load_prefix",
    "read_prefix",
    "run",
    "save_checkpoint",
]
