"""Hydra at the edge: schema registration and config conversion shared by train.py and evaluate.py.

Nothing under ``ptuning/`` imports Hydra; the entry scripts compose YAML from ``conf/``, convert it once
into the typed dataclasses of ``ptuning.config`` and call the library.
"""

from __future__ import annotations

import difflib
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
        hint = HINTS.get(key, f"set {key}=...")
        name = OmegaConf.select(cfg, "model.name", default=None)
        if key == "model.path" and name:  # the recipe's model (chatglm2-6b, chatglm3-6b, ...)
            hint = hint.replace("/path/to/chatglm-6b", f"/path/to/{name}")
        raise ConfigError(f"{key} is required: {hint}") from None
    except OmegaConfBaseException as err:
        raise ConfigError(str(err).splitlines()[0]) from None
    except ValueError as err:  # a dataclass __post_init__ check
        raise ConfigError(_qualified(str(err), cfg)) from None


def _qualified(message: str, cfg: DictConfig) -> str:
    """``max_source_length must be ...`` -> ``data.max_source_length must be ...``: a section's own check
    knows its field name, not where the field sits in the command line's keys."""
    name = message.split(" ", 1)[0]
    sections = [key for key in cfg if isinstance(cfg._get_node(key), DictConfig) and name in cfg._get_node(key)]
    return f"{sections[0]}.{message}" if len(sections) == 1 else message


def check_overrides(config_name: str, args: list[str] | None = None) -> None:
    """Composes the command line's overrides before Hydra runs the job, so that a misspelled key, a value of
    the wrong type or an unknown option ends as one ``error:`` line naming it. (Hydra's own report spans
    several lines and ends with a hint about HYDRA_FULL_ERROR, and it exits 1.)"""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    args = sys.argv[1:] if args is None else args
    if any(arg.startswith("-") for arg in args):
        return  # --help, --cfg, --multirun...: Hydra's own modes, left to Hydra
    # hydra.* overrides configure Hydra itself (run dir, logging), which compose() does not accept
    overrides = [arg for arg in args if not arg.lstrip("+~").startswith("hydra")]
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            compose(config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        fail(_compose_error_line(err, config_name))


def _known_keys(config_name: str) -> list[str]:
    """Every dotted key of the config composed without overrides."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        tree = OmegaConf.to_container(compose(config_name), resolve=False, throw_on_missing=False)
    keys: list[str] = []

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            keys.append(prefix + str(key))
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")

    walk(tree, "")
    return keys


def _compose_error_line(err: Exception, config_name: str) -> str:
    """One line out of a Hydra composition error: the override or key at fault and what was expected."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    cause = err.__cause__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        key = cause.full_key
        reason = str(cause).splitlines()[0].strip()
        if reason.startswith("Key ") and " not in " in reason:  # a key the schema does not have
            known = _known_keys(config_name)
            close = difflib.get_close_matches(key, known, n=1)
            if close:
                return f"{key}: no such key (did you mean {close[0]}?)"
            parent = key.rpartition(".")[0]
            siblings = [k for k in known if k.rpartition(".")[0] == parent]
            return f"{key}: no such key (expected one of {', '.join(siblings)})"
        return f"{key}: {reason}"
    options = [line for line in str(err).splitlines() if line.startswith("\t") and "provider=" not in line]
    if options:  # an unknown option of a config group: list the ones there are
        return f"{lines[0]} (available: {', '.join(o.strip() for o in options)})"
    return ": ".join(lines[:2]) if lines else type(err).__name__


def fail(message: str) -> None:
    """One line on stderr and a non-zero exit: user mistakes get no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


register()
