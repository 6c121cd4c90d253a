"""Data pipeline: files in, checked rows, P-Tuning v2 features, dynamically padded batches."""

from .collate import GenerationCollator, LengthGroupedSampler, TrainingCollator
from .config import DataConfig
from .features import IGNORE_INDEX, preprocess_eval, preprocess_train, render_prompts
from .loading import DataError, ReadReport, build_datasets, exit_on_data_error, load_rows, read_rows
from .packing import PackedRows, pack_rows

__all__ = [
    "IGNORE_INDEX",
    "DataConfig",
    "DataError",
    "GenerationCollator",
    "LengthGroupedSampler",
    "PackedRows",
    "ReadReport",
    "TrainingCollator",
    "build_datasets",
    "exit_on_data_error",
    "load_rows",
    "pack_rows",
    "preprocess_eval",
    "preprocess_train",
    "read_rows",
    "render_prompts",
]
