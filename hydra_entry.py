"""Hydra at the edge: schema registration and config conversion shared by train.py and evaluate.py.

Nothing under ``ptuning/`` imports Hydra; the entry scripts compose YAML from ``conf/``, convert it once
into the typed dataclasses of ``ptuning.config`` and call the library.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from ptuning.config import ConfigError, ModelConfig, TrainJobConfig
from ptuning.evaluation.run import EvaluateJobConfig

CONF_DIR = str(Path(__file__).resolve().parent / "conf")

HINTS = {
    "model.path": "set model.path=/path/to/chatglm-6b (or run `python train.py` for the built-in tiny model)",
    "data.train_file": "set data.train_file=/path/to/train.json",
}


def _model_without_path() -> ModelConfig:
    # model.path has no default in the schema: each model/*.yaml sets it (null = built-in), and
    # chatglm_6b.yaml leaves it missing so that the user must give it
    return ModelConfig(path=MISSING)


@dataclass
class TrainSchema(TrainJobConfig):
    run_name: str = "default"
    model: ModelConfig = field(default_factory=_model_without_path)


@dataclass
class EvaluateSchema(EvaluateJobConfig):
    run_name: str = "evaluate"
    model: ModelConfig = field(default_factory=_model_without_path)


def register() -> None:
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainSchema)
    store.store(name="evaluate_schema", node=EvaluateSchema)


def to_object(cfg: DictConfig, schema=None):
    """The composed config as typed dataclasses; a missing mandatory key gets a one-line hint."""
    try:
        return OmegaConf.to_object(cfg)
    except MissingMandatoryValue as err:
        key = err.full_key
        raise ConfigError(f"{key} is required: {HINTS.get(key, f'set {key}=...')}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(str(err).splitlines()[0]) from None
    except ValueError as err:  # a dataclass __post_init__ check
        raise ConfigError(str(err)) from None


def fail(message: str) -> None:
    """One line on stderr and a non-zero exit: user mistakes get no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


register()
