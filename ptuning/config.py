"""Typed configuration of every job. Entry scripts compose YAML with Hydra and convert it once into
these dataclasses; the library takes only these (it never imports Hydra)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .data.config import DataConfig
from .errors import ConfigError
from .paths import PACKAGE_SCHEME, package_file
from .weights import is_gguf_file

DTYPES = ("float32", "bfloat16", "float16")
MIXED_PRECISION = ("no", "bf16", "fp16")
PREFIX_INITS = ("random", "zeros", "text")
# transformers' schedules that need nothing beyond warmup_steps and max_steps (reduce_lr_on_plateau needs a
# metric at every step, cosine_with_min_lr and warmup_stable_decay their own arguments)
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")

# The built-in default: a tiny ChatGLM and the tokenizer of the bundled sample, shipped in data/.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
BUILTIN_MODEL = PROJECT_ROOT / "data" / "tiny-chatglm"
# model.path=builtin:<name> names a bundled model folder data/<name> (resolved from the project, not the
# working folder).
BUILTIN_SCHEME = "builtin:"


def builtin_models() -> list[str]:
    """Names of the bundled model folders (``data/tiny-*`` with a ``config.json``)."""
    return sorted(p.name for p in (PROJECT_ROOT / "data").glob("tiny-*") if (p / "config.json").is_file())


def is_model_reference(path: str) -> bool:
    """``path`` (a ``--model-path`` / ``model.path`` value) may name a model: ``builtin:`` / ``package:``
    (checked when resolved), an existing folder or an existing ``.gguf`` file."""
    text = str(path)
    if text.startswith((BUILTIN_SCHEME, PACKAGE_SCHEME)):
        return True
    return Path(text).expanduser().is_dir() or is_gguf_file(text)


def canonical_base_model(name: str) -> str:
    """How checkpoints name a base model, whichever way it was given: ``builtin:<name>`` for a bundled model,
    also when given (or recorded) as its folder ``data/<name>`` by any relative or absolute path;
    ``package:<module>/<file>`` as given (the same name on every machine); else the folder's (or ``.gguf``
    file's) absolute path (symlinks resolved)."""
    if name.startswith((BUILTIN_SCHEME, PACKAGE_SCHEME)):
        return name
    folder = Path(name).expanduser().resolve()
    if folder.parent == (PROJECT_ROOT / "data").resolve() and folder.name in builtin_models():
        return BUILTIN_SCHEME + folder.name
    return str(folder)


def _need(ok: bool, key: str, value, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: expected {allowed}")


def check_data_file(key: str, path: str, none_hint: str = "") -> None:
    """A data file setting (``data.train_file`` ...) names an existing file.

    Raises:
        ConfigError: ``data.train_file is empty``, ``data.train_file=x: is a folder``, ``... no such file``.
    """
    if not str(path).strip():
        raise ConfigError(f"{key} is empty: expected a .json, .jsonl or .csv file{none_hint}")
    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(f"{key}={path}: is a folder, expected a .json, .jsonl or .csv file")
    if not p.is_file():
        raise ConfigError(f"{key}={path}: no such file")


@dataclass
class ModelConfig:
    """``model.*``: the frozen backbone and the prefix."""

    # a model folder (any supported family), a .gguf file (transformers' decoders), builtin:<name> or
    # package:<module>/<file>; null = the built-in tiny ChatGLM-6B
    path: str | None = None
    name: str = "tiny"  # a label recorded in checkpoints and logs
    pre_seq_len: int = 16
    prefix_projection: bool = False
    prefix_dropout: float = 0.1  # dropout on the prefix keys/values in training, as the original
    prefix_init: str = "random"  # random (the original) / zeros / text (the frozen model's keys/values of a text)
    prefix_init_text: str | None = None  # the text of prefix_init=text
    dtype: str = "float32"  # backbone dtype: float32 / bfloat16 / float16 (the prefix is always float32)
    gradient_checkpointing: bool = False
    quantization_bit: int = 0  # 0 (none), 8 or 4: weight-only quantized frozen backbone

    def validate(self) -> None:
        """Checks every ``model.*`` value before anything is loaded.

        Raises:
            ConfigError: one line naming the key, the value and what is allowed (``model.pre_seq_len=0: expected
                a positive integer``): a non-positive ``pre_seq_len``, ``prefix_dropout`` outside [0, 1), an
                unknown ``prefix_init`` / ``dtype`` / ``quantization_bit``, ``prefix_init=text`` without a text
                or with ``prefix_projection``, a ``prefix_init_text`` without ``prefix_init=text``, a ``path``
                that names no built-in model, installed package file, model folder or ``.gguf`` file.
        """
        _need(self.pre_seq_len > 0, "model.pre_seq_len", self.pre_seq_len, "a positive integer")
        _need(0.0 <= self.prefix_dropout < 1.0, "model.prefix_dropout", self.prefix_dropout, "a probability in [0, 1)")
        _need(self.prefix_init in PREFIX_INITS, "model.prefix_init", self.prefix_init, " / ".join(PREFIX_INITS))
        if self.prefix_init == "text":
            _need(bool(self.prefix_init_text and str(self.prefix_init_text).strip()), "model.prefix_init_text",
                  self.prefix_init_text, "a non-empty text with model.prefix_init=text")
            _need(not self.prefix_projection, "model.prefix_init", self.prefix_init,
                  "random or zeros with model.prefix_projection=true (text sets the prefix embedding itself)")
        elif self.prefix_init_text is not None:
            raise ConfigError(
                f"model.prefix_init_text is set but model.prefix_init={self.prefix_init!r}: the text is used only "
                "with model.prefix_init=text (set it, or drop model.prefix_init_text)"
            )
        _need(self.dtype in DTYPES, "model.dtype", self.dtype, " / ".join(DTYPES))
        _need(
            self.quantization_bit in (0, 4, 8), "model.quantization_bit", self.quantization_bit, "0, 4 or 8"
        )
        if self.path is not None and str(self.path).startswith(BUILTIN_SCHEME):
            _need(
                self.resolved_path.is_dir(), "model.path", self.path,
                "a built-in model (" + ", ".join(f"{BUILTIN_SCHEME}{n}" for n in builtin_models()) + ") or a model folder",
            )
        elif self.path is not None and str(self.path).startswith(PACKAGE_SCHEME):
            try:
                found = self.resolved_path
            except ConfigError as err:
                raise ConfigError(f"model.path={err}") from None
            _need(is_gguf_file(found) or found.is_dir(), "model.path", self.path,
                  f"a .gguf file or model folder in the installed package (not found at {found})")
        elif self.path is not None:
            p = Path(self.path).expanduser()
            _need(
                p.is_dir() or is_gguf_file(p), "model.path", self.path,
                "an existing model folder (config.json + weights) or .gguf file",
            )

    @property
    def resolved_path(self) -> Path:
        """The model folder or ``.gguf`` file: ``model.path`` (relative to the working folder), a bundled
        ``builtin:<name>`` (``data/<name>`` of the project, wherever the command runs), a file of an installed
        package (``package:<module>/<file>``, see :func:`package_file`), or the built-in tiny ChatGLM-6B.

        Raises:
            ConfigError: a ``package:`` reference whose package is not installed.
        """
        if self.path is None:
            return BUILTIN_MODEL
        if str(self.path).startswith(BUILTIN_SCHEME):
            return PROJECT_ROOT / "data" / str(self.path)[len(BUILTIN_SCHEME):]
        if str(self.path).startswith(PACKAGE_SCHEME):
            return package_file(str(self.path))
        return Path(self.path).expanduser()

    @property
    def base_model_name(self) -> str:
        """How checkpoints name the base model: ``builtin:<name>`` (also for a bundled model given by its folder,
        ``data/<name>``) or the folder's absolute path (see :func:`canonical_base_model`)."""
        if self.path is None:
            return BUILTIN_SCHEME + BUILTIN_MODEL.name
        return canonical_base_model(str(self.path))


@dataclass
class TrainConfig:
    """``train.*``: the optimisation loop, checkpoints and evaluation during training."""

    output_dir: str | None = None  # train.py: null = outputs/<run_name> (a sweep: its job folder)
    max_steps: int = 800
    per_device_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 3e-2
    weight_decay: float = 0.0
    lr_scheduler: str = "linear"  # one of SCHEDULERS
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"  # no / bf16 / fp16 (fp16 uses loss scaling)
    seed: int = 42
    logging_steps: int = 20
    eval_steps: int | None = 200  # null = the validation loss only at the end
    save_steps: int = 200
    save_total_limit: int | None = 3
    # null / latest / auto (latest, or a fresh start where there is none) / a checkpoint folder
    resume_from: str | None = None
    overwrite: bool = False  # a new run over an earlier run's outputs: removes them (only what that run wrote)
    allow_base_model_change: bool = False  # resume a checkpoint on another base model than it was trained on
    init_prefix_from: str | None = None  # start from this prefix (ours or the original's checkpoint-N)
    eval_generation: bool = True  # generate on the validation set at the end and compute BLEU/ROUGE
    # score the base model (no prefix) first, at step 0 (loss and BLEU/ROUGE, whatever eval_generation says):
    # what tuning gained
    eval_before_training: bool = True
    max_new_tokens: int = 64
    eval_batch_size: int = 32
    plot: bool = True  # write loss.png at the end

    def validate(self) -> None:
        """Checks every ``train.*`` value before anything is loaded (``output_dir`` must be set by then:
        ``train.py`` turns null into ``outputs/<run_name>``).

        Raises:
            ConfigError: one line naming the key, the value and what is allowed: no ``output_dir``; a step count,
                batch size or ``max_new_tokens`` that is not a positive integer; a learning rate that is not
                positive; negative ``warmup_steps``; an unknown ``lr_scheduler`` / ``mixed_precision``; a
                ``max_grad_norm``, ``eval_steps`` or ``save_total_limit`` neither null nor positive;
                ``resume_from`` together with ``overwrite``.
        """
        _need(bool(self.output_dir), "train.output_dir", self.output_dir, "a folder")
        for key in (
            "max_steps",
            "per_device_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "save_steps",
            "eval_batch_size",
            "max_new_tokens",
        ):
            value = getattr(self, key)
            _need(isinstance(value, int) and value > 0, f"train.{key}", value, "a positive integer")
        _need(self.learning_rate > 0, "train.learning_rate", self.learning_rate, "a positive number")
        _need(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, "0 or more")
        _need(
            self.lr_scheduler in SCHEDULERS, "train.lr_scheduler", self.lr_scheduler, " / ".join(SCHEDULERS)
        )
        _need(
            self.mixed_precision in MIXED_PRECISION,
            "train.mixed_precision",
            self.mixed_precision,
            " / ".join(MIXED_PRECISION),
        )
        _need(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            "train.max_grad_norm",
            self.max_grad_norm,
            "null or a positive number",
        )
        _need(
            self.eval_steps is None or self.eval_steps > 0,
            "train.eval_steps",
            self.eval_steps,
            "null or a positive integer",
        )
        _need(
            self.save_total_limit is None or self.save_total_limit > 0,
            "train.save_total_limit",
            self.save_total_limit,
            "null or a positive integer",
        )
        if self.resume_from is not None and self.overwrite:
            raise ConfigError(
                f"train.resume_from={self.resume_from} and train.overwrite=true contradict each other: resuming "
                "continues the run in train.output_dir, overwrite removes it; drop one of them"
            )


@dataclass
class LoggerConfig:
    """``logger.*``: wandb (offline when no API key is configured) or nothing."""

    backend: str = "none"  # none / wandb
    project: str = "ptuning"
    entity: str | None = None
    run_name: str | None = None
    mode: str | None = None  # online / offline / disabled; null = online with an API key, else offline

    def validate(self) -> None:
        """Checks ``logger.*``.

        Raises:
            ConfigError: an unknown ``backend`` or ``mode`` (one line naming the key and what is allowed), or
                ``mode`` online / offline without ``logger=wandb``.
        """
        _need(self.backend in ("none", "wandb"), "logger.backend", self.backend, "none / wandb")
        _need(
            self.mode in (None, "online", "offline", "disabled"),
            "logger.mode",
            self.mode,
            "null / online / offline / disabled",
        )
        if self.backend == "none" and self.mode in ("online", "offline"):
            raise ConfigError(
                f"logger.mode={self.mode} needs logger=wandb (logger.backend is none, so nothing would be logged): "
                "add logger=wandb, or drop logger.mode"
            )


@dataclass
class TrainJobConfig:
    """Everything ``python train.py`` needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    def validate(self) -> TrainJobConfig:
        """Checks the whole job (each section's ``validate``, then that ``data.train_file`` and
        ``data.validation_file`` name existing files) and returns it.

        Raises:
            ConfigError: the first bad value, one line naming its key (``data.train_file=x.json: no such file``).
        """
        self.model.validate()
        self.train.validate()
        self.logger.validate()
        # checked here so that the mistake costs no model loading, and named by its key as evaluation does
        for key in ("train_file", "validation_file"):
            path = getattr(self.data, key)
            _need(path is not None or key != "train_file", f"data.{key}", path, "a .json, .jsonl or .csv file")
            if path is not None:
                check_data_file(f"data.{key}", path,
                                " (data.validation_file=null for none)" if key == "validation_file" else "")
        return self
