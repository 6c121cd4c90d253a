"""The accelerate training loop, prefix checkpoints and experiment tracking."""

from .checkpoint import export_original, latest_checkpoint, load_prefix, read_prefix, save_checkpoint
from .errors import TrainingError, TrainingInterrupted
from .loop import TrainResult, run

__all__ = [
    "TrainResult",
    "TrainingError",
    "TrainingInterrupted",
    "export_original",
    "latest_checkpoint",
    "load_prefix",
    "read_prefix",
    "run",
    "save_checkpoint",
]
