"""The accelerate training recipe, its output folder's rules and experiment tracking."""

from .errors import TrainingError, TrainingInterrupted
from .loop import TrainResult, run

__all__ = ["TrainResult", "TrainingError", "TrainingInterrupted", "run"]
