"""Hydra at the edge: schema registration and config conversion shared by train.py and evaluate.py.

Nothing under ``ptuning/`` imports Hydra; the entry scripts compose YAML from ``conf/``, convert it once
into the typed dataclasses of ``ptuning.config`` and call the library.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from ptuning.config import PROJECT_ROOT, ConfigError, ModelConfig, TrainJobConfig
from ptuning.distributed import exit_together, process_rank
from ptuning.evaluation.run import EvaluateJobConfig, EvaluateModelConfig

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
    model: EvaluateModelConfig = field(default_factory=lambda: EvaluateModelConfig(path=MISSING))


def project_path(relative: str) -> str:
    """``${project:data/...}`` in a config file: a file shipped with the project, found wherever the command
    runs from. Relative to the working folder when it lies inside it (as the path reads in the project
    folder), absolute otherwise. Paths given on the command line stay relative to the working folder."""
    path = PROJECT_ROOT / relative
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def register() -> None:
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainSchema)
    store.store(name="evaluate_schema", node=EvaluateSchema)
    OmegaConf.register_new_resolver("project", project_path, replace=True)


def unknown_keys(cfg: DictConfig) -> list[str]:
    """Dotted keys of ``cfg`` that its typed schema does not have: Hydra's ``+key=value`` adds a key to a
    structured config, and converting it to the dataclasses would then drop that key without a word."""
    found: list[str] = []

    def walk(node: DictConfig, prefix: str) -> None:
        kind = OmegaConf.get_type(node)
        known = {f.name for f in dataclasses.fields(kind)} if dataclasses.is_dataclass(kind) else None
        for key in node.keys():
            if key == "hydra":
                continue
            if known is not None and key not in known:
                found.append(f"{prefix}{key}")
                continue
            child = node._get_node(key)
            if isinstance(child, DictConfig):
                walk(child, f"{prefix}{key}.")

    walk(cfg, "")
    return found


def to_object(cfg: DictConfig, schema=None):
    """The composed config as typed dataclasses; a missing mandatory key gets a one-line hint, a key the
    schema does not have (added with ``+``) is an error naming it."""
    extra = unknown_keys(cfg)
    if extra:
        raise ConfigError(_no_such_key(extra[0], _walk_keys(cfg)))
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
    check_yaml_syntax(config_name, args)
    if any(arg.startswith("-") for arg in args):
        return  # --help, --cfg, --multirun...: Hydra's own modes, left to Hydra
    # hydra.* overrides configure Hydra itself (run dir, logging), which compose() does not accept
    overrides = [arg for arg in args if not arg.lstrip("+~").startswith("hydra")]
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        fail(_compose_error_line(err, config_name))
    except yaml.YAMLError as err:  # a config file (conf/conf/mine.yaml ...) that is not valid YAML
        fail(yaml_error_line(err))
    extra = unknown_keys(cfg)
    if extra:
        fail(_no_such_key(extra[0], _known_keys(config_name)))


def check_yaml_syntax(config_name: str, args: list[str]) -> None:
    """Parses the primary config file and each ``group=option`` file the command line names (every option of
    a sweep's ``group=a,b``), so that a YAML syntax error in a user's own file is one line also in Hydra's own
    modes (``-m``), where composing is left to Hydra (whose report is a long traceback)."""
    files = [Path(CONF_DIR) / f"{config_name}.yaml"]
    for arg in args:
        group, sep, options = arg.lstrip("+~").partition("=")
        if sep and not arg.startswith("-") and not group.startswith("hydra"):
            files += [Path(CONF_DIR) / group / f"{option.strip()}.yaml" for option in options.split(",")]
    for path in files:
        if not path.is_file():
            continue
        try:
            yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            fail(yaml_error_line(err, path))
        except (OSError, UnicodeDecodeError) as err:
            fail(f"{path}: cannot read the config file ({err})")


def yaml_error_line(err: yaml.YAMLError, path: Path | None = None) -> str:
    """One line for a config file PyYAML cannot parse: the file (relative to the working folder when inside
    it), the 1-based line and column of the problem and what PyYAML expected, e.g. ``conf/conf/mine.yaml, line
    3, column 2: YAML syntax error: expected <block end>, but found '<block mapping start>' (while parsing a block
    mapping that starts at line 1)``."""
    mark = getattr(err, "problem_mark", None)
    if mark is None:
        return f"a config file is not valid YAML: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    path = Path(path or mark.name)
    try:
        path = path.resolve().relative_to(Path.cwd())
    except ValueError:
        pass
    problem = getattr(err, "problem", None) or "invalid syntax"
    context = getattr(err, "context", None)
    context_mark = getattr(err, "context_mark", None)
    where = ""
    if context and context_mark is not None and context_mark.line != mark.line:
        where = f" ({context} that starts at line {context_mark.line + 1})"
    return f"{path}, line {mark.line + 1}, column {mark.column + 1}: YAML syntax error: {problem}{where}"


def _no_such_key(key: str, known: list[str]) -> str:
    """``<key>: no such key`` with a suggestion only when one is close: a key of the same section whose name
    is a near-miss of this one (``max_stepz`` -> ``max_steps``), or the same name in another section
    (``train.pre_seq_len`` -> ``model.pre_seq_len``); otherwise the keys the section has."""
    parent, _, name = key.rpartition(".")
    siblings = [k for k in known if k.rpartition(".")[0] == parent]
    # the names alone are compared: every key of a section shares its "train." start, which made any two
    # keys of one section look alike ("train.foo" -> "train.plot")
    close = difflib.get_close_matches(name, [k.rpartition(".")[2] for k in siblings], n=1, cutoff=0.75)
    if close:
        return f"{key}: no such key (did you mean {f'{parent}.' if parent else ''}{close[0]}?)"
    elsewhere = [k for k in known if k.rpartition(".")[2] == name and k != key]
    if name and len(elsewhere) == 1:
        return f"{key}: no such key (did you mean {elsewhere[0]}?)"
    return f"{key}: no such key (expected one of {', '.join(siblings)})"


def _known_keys(config_name: str) -> list[str]:
    """Every dotted key of the config composed without overrides."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return _walk_keys(compose(config_name))


def _walk_keys(cfg: DictConfig) -> list[str]:
    """Every dotted key of ``cfg`` that its schema has."""
    tree = OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False)
    extra = set(unknown_keys(cfg))
    keys: list[str] = []

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            keys.append(prefix + str(key))
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")

    walk(tree, "")
    return [k for k in keys if k.split(".")[0] != "hydra" and not any(k == e or k.startswith(e + ".") for e in extra)]


def _compose_error_line(err: Exception, config_name: str) -> str:
    """One line out of a Hydra composition error: the override or key at fault and what was expected."""
    from hydra.errors import OverrideParseException

    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    override = getattr(err, "override", None)
    if override is None and lines and lines[0].startswith("Ambiguous value for argument '"):
        override = lines[0][len("Ambiguous value for argument '"):].rstrip("'")
    if override and "=" in override and (isinstance(err, OverrideParseException) or lines[0].startswith("Ambiguous")):
        return _quoting_hint(override)
    cause = err.__cause__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        key = cause.full_key
        reason = str(cause).splitlines()[0].strip()
        if reason.startswith("Key ") and " not in " in reason:  # a key the schema does not have
            return _no_such_key(key, _known_keys(config_name))
        return f"{key}: {reason}"
    options = [line for line in str(err).splitlines() if line.startswith("\t") and "provider=" not in line]
    if options:  # an unknown option of a config group: list the ones there are
        return f"{lines[0]} (available: {', '.join(o.strip() for o in options)})"
    return ": ".join(lines[:2]) if lines else type(err).__name__


def _quoting_hint(override: str) -> str:
    """The line for an override Hydra's grammar cannot read (spaces, commas, CJK punctuation, brackets...):
    how to quote its value so that the shell leaves the quotes for Hydra."""
    key, _, value = override.partition("=")
    value = value.strip("'\"")
    return (
        f"{override}: Hydra cannot read this value; quote it, with the whole override in double quotes so the "
        f"shell keeps the single ones: \"{key}='{value}'\""
    )


def fail(message: str, *, every_process: bool = True) -> NoReturn:
    """One line on stderr and exit status 2: user mistakes get no traceback.

    In a run of several processes (``accelerate launch``) every process exits with 2, and the line is printed
    once, by the main process, when ``every_process`` raised it alike (the command line, the config, or an
    error the processes agreed on: :func:`ptuning.distributed.on_every_process`); an error of this process
    alone is printed by it."""
    if not every_process or process_rank() == 0:
        print(f"error: {message}", file=sys.stderr)
    exit_together(2)


register()
