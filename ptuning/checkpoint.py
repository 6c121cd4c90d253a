"""Prefix checkpoints: the formats, saving and resume state, finding the latest, and loading a model with a
checkpoint's prefix (:func:`load_model_with_prefix`, the one way training, evaluation, chat and export get one;
the server loads one backbone and each prefix with :func:`load_prefix_encoder`).

A checkpoint folder ``checkpoint-{step}/`` holds

* ``prefix.safetensors``: the prefix encoder's weights under ``transformer.prefix_encoder.*``;
* ``prefix_config.json``: what they fit (pre_seq_len, prefix_projection, layers, width, heads), the base
  model and a fingerprint of its config, the id of the training run that wrote it (``run_id``), how its
  prompts were rendered (``prompt_format``) and the settings that shaped its updates (``update_settings``,
  compared with those of a run that resumes it);
* ``training_state.pt``: optimizer, scheduler, step, the state of every random generator (Python's, NumPy's,
  torch's on the CPU and on each GPU, per process) and data position, for exact resume.

It is written to a temporary folder and renamed, so a crash never leaves a half-written checkpoint. Reading
also takes the original P-Tuning v2 script's checkpoints (``pytorch_model.bin`` holding the prefix) and whole
models with their prefix inside (ChatGLM3's ``finetune_demo``, ``python -m ptuning.export full``); peft
adapters are converted with ``python -m ptuning.export from-peft`` (:mod:`ptuning.interop.peft`).

A training output folder records its run's id in ``run_config.json``. A run prunes only its own
checkpoints, and "the latest checkpoint" of a folder is the newest one its recorded run wrote, so a run
never deletes or resumes from a checkpoint another run left there.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from accelerate.utils import get_torch_accelerator_backend
from safetensors import safe_open

from .build import Loaded, base_weights_digest, load
from .config import ConfigError, ModelConfig, canonical_base_model
from .faults import kill_point
from .jsonfile import read_json_object
from .models import Family, UnsupportedModelError, family_named, family_of, read_config
from .prefix import (
    PREFIX_ATTRIBUTE,
    PrefixEncoder,
    is_prefix_param,
    load_prefix_state,
    local_prefix_keys,
    prefix_module_name,
    prefix_state_dict,
)
from .weights import (
    BIN_INDEX,
    SAFE_INDEX,
    SAFE_SINGLE,
    CheckpointError,
    is_disk_full,
    load_failure,
    read_matching,
    read_weights,
    save_safetensors,
    save_torch,
    torch_load,
    weight_files,
)

PREFIX_FILE = "prefix.safetensors"
META_FILE = "prefix_config.json"
STATE_FILE = "training_state.pt"
RUN_FILE = "run_config.json"  # the training run's configuration and id, in its output folder
ORIGINAL_FILE = "pytorch_model.bin"
PEFT_ADAPTER_FILE = "adapter_config.json"  # a peft adapter folder: not read as a prefix, imported with export from-peft
# the files a checkpoint of ours consists of: all that train.overwrite (or a re-save) ever removes from one
CHECKPOINT_FILES = (PREFIX_FILE, META_FILE, STATE_FILE)
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
DEFAULT_RUN = Path("outputs") / "default"  # train.py's default output folder: where a command looks by default
# Sizes every prefix_config.json records (ptuning.prefix.PrefixShape.describe); checkpoints of earlier
# versions recorded pre_seq_len, prefix_projection, num_layers, hidden_size and num_attention_heads.
FIT_KEYS = ("pre_seq_len", "prefix_projection", "num_layers", "num_key_value_heads", "head_dim")


def backbone_metadata(cfg: ModelConfig, model: torch.nn.Module) -> dict:
    """How ``prefix_config.json`` describes the backbone that ``cfg`` loads (``model``, with or without a prefix
    encoder): its name (:attr:`~ptuning.config.ModelConfig.base_model_name`), the fingerprint of its config (a
    hash of the values that decide what it computes, the family's choice of keys) and, for a built-in model, a
    digest of its weights (a built-in model's weight files, a ``.gguf`` file: :func:`~ptuning.build.base_weights_digest`)."""
    meta = {"base_model": cfg.base_model_name, "base_config_fingerprint": family_of(model).fingerprint(model.config)}
    digest = base_weights_digest(cfg)
    if digest is not None:
        meta["base_weights_sha256"] = digest
    return meta


def prefix_metadata(model_or_config, base_model: str, weights_sha256: str | None = None, *,
                    family: Family | None = None) -> dict:
    """What ``prefix_config.json`` records: the prefix's sizes (:data:`FIT_KEYS`), the family, the base model
    and the fingerprint of its config (and of its weights, for the small built-in models).

    Args:
        model_or_config: the model (its prefix encoder gives the sizes) or its config (``pre_seq_len`` and
            ``prefix_projection`` from the config).
    """
    family = family or family_of(model_or_config)
    config = getattr(model_or_config, "config", model_or_config)
    if isinstance(model_or_config, torch.nn.Module):
        shape = model_or_config.get_submodule(prefix_module_name(model_or_config)).shape
    else:
        shape = family.prefix_shape(config, config.pre_seq_len, bool(getattr(config, "prefix_projection", False)))
    meta = shape.describe()
    meta.update(family=family.name, base_model=base_model, base_config_fingerprint=family.fingerprint(config))
    if weights_sha256 is not None:
        meta["base_weights_sha256"] = weights_sha256
    return meta


def base_metadata(cfg: ModelConfig, model: torch.nn.Module) -> dict:
    """:func:`prefix_metadata` of ``model`` (loaded from ``cfg``, with its prefix encoder): what a checkpoint
    of a prefix trained on it records."""
    backbone = backbone_metadata(cfg, model)
    return prefix_metadata(model, backbone["base_model"], backbone.get("base_weights_sha256"))


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of ``output_dir``, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in output_dir.iterdir()
        if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()
    ]
    return [p for _, p in sorted(found)]


def checkpoint_run_id(checkpoint: str | os.PathLike) -> str | None:
    """The id of the run that wrote ``checkpoint`` (its ``prefix_config.json``), or None when it records none
    (a checkpoint of the original script, or an unreadable one)."""
    try:
        meta = json.loads((Path(checkpoint) / META_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return meta.get("run_id") if isinstance(meta, dict) else None


def folder_run_id(output_dir: str | os.PathLike) -> str | None:
    """The run id that the training output folder records (``run_config.json``), or None."""
    try:
        record = json.loads((Path(output_dir) / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record.get("run_id") if isinstance(record, dict) else None


def not_our_checkpoint(path: str | os.PathLike, run_id: str | None) -> str | None:
    """Why ``path`` is not a checkpoint that run ``run_id`` wrote (``"not a checkpoint: no prefix.safetensors"``,
    ``"written by run 1a2b3c4d5e6f"`` ...), or None when it is one: a folder with ``prefix.safetensors`` and a
    ``prefix_config.json`` that records ``run_id``."""
    path = Path(path)
    if not path.is_dir():
        return "not a folder"
    if not (path / PREFIX_FILE).is_file():
        if (path / ORIGINAL_FILE).is_file():
            return f"an original P-Tuning v2 checkpoint ({ORIGINAL_FILE})"
        return f"not a checkpoint: no {PREFIX_FILE}"
    written_by = checkpoint_run_id(path)
    if written_by is None:
        return "a checkpoint that records no run id"
    if run_id is None:
        return f"a checkpoint of run {written_by}; the folder records no run ({RUN_FILE})"
    if written_by != run_id:
        return f"written by run {written_by}; {RUN_FILE} records run {run_id}"
    return None


def foreign_files(path: str | os.PathLike, ours: tuple[str, ...]) -> list[str]:
    """Names inside folder ``path`` other than the files ``ours`` (what a user put there)."""
    return sorted(p.name for p in Path(path).iterdir() if p.name not in ours or not p.is_file())


def run_checkpoints(output_dir: str | os.PathLike, run_id: str | None) -> list[Path]:
    """The checkpoints of ``output_dir`` written by run ``run_id``, oldest first."""
    return [p for p in list_checkpoints(output_dir) if checkpoint_run_id(p) == run_id]


def checkpoint_in(path: str | os.PathLike) -> Path:
    """``path`` when it is a checkpoint folder; for a training output folder (no prefix files of its own), its
    latest checkpoint (:func:`latest_checkpoint`), as ``prefix_checkpoint=`` takes it; else ``path`` as it is
    (reading it then says what is wrong)."""
    path = Path(path).expanduser()
    markers = (PREFIX_FILE, META_FILE, STATE_FILE, ORIGINAL_FILE, SAFE_SINGLE, SAFE_INDEX, BIN_INDEX)
    if path.is_dir() and not any((path / name).is_file() for name in markers):
        found = latest_checkpoint(path)
        if found is not None:
            return found
    return path


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint of the run that ``output_dir`` records in ``run_config.json``; in a folder that
    records no run (checkpoints copied there by hand), the newest checkpoint. None when there is none."""
    recorded = folder_run_id(output_dir)
    found = list_checkpoints(output_dir) if recorded is None else run_checkpoints(output_dir, recorded)
    return found[-1] if found else None


def resolve_checkpoint(prefix_checkpoint: str | None, key: str = "prefix_checkpoint") -> Path:
    """The checkpoint folder a command was given (evaluation, chat, serving).

    Args:
        prefix_checkpoint: a checkpoint folder (ours or the original's), a training output folder (its
            latest ``checkpoint-N``), or None for the latest checkpoint of ``outputs/default``.
        key: how the setting is named in messages (``--prefix-checkpoint`` for the chat command).

    Raises:
        ConfigError: nothing to evaluate there; the message says what to run or set.
    """
    if prefix_checkpoint is not None and not str(prefix_checkpoint).strip():
        raise ConfigError(f"{key} is empty; expected a checkpoint-N folder or a run folder (its latest checkpoint)")
    if prefix_checkpoint is None:
        found = latest_checkpoint(DEFAULT_RUN)
        if found is None:
            raise ConfigError(
                f"{key} is not set and {DEFAULT_RUN} holds no checkpoint: run `python train.py` "
                f"first or set {key}=/path/to/checkpoint-N"
            )
        return found
    path = Path(prefix_checkpoint).expanduser()
    if not path.exists():
        raise ConfigError(f"{key}={prefix_checkpoint}: no such folder")
    if not path.is_dir():
        raise ConfigError(f"{key}={prefix_checkpoint}: not a folder (expected a checkpoint-N folder)")
    return checkpoint_in(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_checkpoint_files(tmp: Path, prefix: dict, meta: dict, training_state: dict | None) -> None:
    """The checkpoint's files in the (new) folder ``tmp``, each flushed to the disk.

    Raises:
        OSError: a write failed (``errno`` ENOSPC on a full disk), naming the file.
    """
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_safetensors({k: v.contiguous() for k, v in prefix.items()}, tmp / PREFIX_FILE, metadata={"format": "pt"})
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    if training_state is not None:
        save_torch(training_state, tmp / STATE_FILE)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def no_space_message(writing: Path, last: Path | None) -> str:
    """The line of a training run stopped by a full disk while writing ``writing``; ``last``: its last complete
    checkpoint (None: none yet)."""
    if last is None:
        return (f"no space left on device writing {writing}; the run has no complete checkpoint yet; free space and "
                "start it again with train.resume_from=auto")
    return (f"no space left on device writing {writing}; the last complete checkpoint is {last}; free space and "
            "continue with train.resume_from=auto")


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    model: torch.nn.Module,
    meta: dict,
    training_state: dict | None = None,
    save_total_limit: int | None = None,
    *,
    prefix: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Writes ``checkpoint-{step}`` atomically and prunes the oldest beyond ``save_total_limit``, counting
    only the checkpoints of the same run (``meta["run_id"]``): another run's checkpoints are never removed.
    ``prefix``: the prefix's weights under their full keys when the caller gathered them (a sharded model);
    by default :func:`~ptuning.prefix.prefix_state_dict` of ``model``.

    Raises:
        CheckpointError: the prefix is not finite (nothing is written), or the write failed (the previous
            checkpoints are untouched; the temporary folder is removed); a full disk says so in one line with
            the last complete checkpoint (:func:`no_space_message`). Any other exception, and
            KeyboardInterrupt, also removes the temporary folder before it goes on.
    """
    output_dir = Path(output_dir)
    state = prefix_state_dict(model) if prefix is None else prefix
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"step {step}: the prefix has non-finite values ({', '.join(bad)}); not saved")
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".tmp-checkpoint-{step}"
    try:
        _write_checkpoint_files(tmp, state, meta, training_state)
        kill_point("save-write", step)  # test-only: a SIGKILL between writing the files and the rename
        if final.exists():  # a re-save of the same step (resume after a crash right after saving)
            why = not_our_checkpoint(final, meta.get("run_id"))
            extra = foreign_files(final, CHECKPOINT_FILES) if why is None else []
            if why is not None or extra:
                raise CheckpointError(
                    f"{final}: exists and is not this run's to replace ({why or 'it also holds ' + ', '.join(extra)}); "
                    "move it away and resume with train.resume_from=latest"
                )
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(output_dir)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(err):
            runs = run_checkpoints(output_dir, meta.get("run_id"))
            raise CheckpointError(no_space_message(final, runs[-1] if runs else None)) from None
        raise CheckpointError(
            f"{final}: writing the checkpoint failed ({err.strerror or err}); earlier checkpoints are intact"
        ) from None
    except BaseException:  # any error, and Ctrl-C: the half-written folder of this save goes with it
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(output_dir, meta.get("run_id"), save_total_limit)
    return final


def prune_checkpoints(output_dir: str | os.PathLike, run_id: str | None, save_total_limit: int | None) -> list[Path]:
    """Removes the oldest checkpoints of run ``run_id`` in ``output_dir`` beyond the newest
    ``save_total_limit`` (None: keeps all); another run's checkpoints are never counted or removed.
    Returns the folders removed."""
    if save_total_limit is None:
        return []
    old = run_checkpoints(output_dir, run_id)[:-save_total_limit]
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old


def device_generators() -> tuple[str | None, object]:
    """This machine's accelerator type (``"cuda"``, ...) and the torch module that holds its random generators
    (``torch.cuda``), as accelerate finds them; ``(None, None)`` on a machine without one."""
    device_type, module = get_torch_accelerator_backend()
    if device_type is not None and not hasattr(module, "get_rng_state"):  # the generic torch.accelerator
        module = torch.get_device_module(device_type)
    return device_type, module


def capture_rng() -> dict:
    """The state of every random generator this process draws from: Python's, NumPy's, torch's on the CPU
    and on each of the machine's GPUs (prefix and attention dropout draw there), what accelerate's own
    checkpoints record. NumPy's key array (uint32) is stored as an int64 tensor (the weights-only loader reads tensors)."""
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    device_type, module = device_generators()
    if device_type is not None:
        get_all = getattr(module, "get_rng_state_all", None)
        state["device_type"] = device_type
        state["device"] = list(get_all()) if get_all is not None else [module.get_rng_state()]
    return state


def restore_rng(state: dict) -> str | None:
    """Puts back the generators :func:`capture_rng` recorded. Returns a warning when the device generators
    cannot all be restored (the checkpoint comes from a machine with other GPUs, or none): the run goes on,
    with dropout no longer drawing what an unbroken run would."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        kind, key, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    device_type, module = device_generators()
    saved, saved_type = state.get("device") or [], state.get("device_type")
    have = 0
    if device_type is not None:
        get_all = getattr(module, "get_rng_state_all", None)
        have = len(get_all()) if get_all is not None else 1
    if have == len(saved) and (not saved or device_type == saved_type):
        if not saved:
            return None
        if hasattr(module, "set_rng_state_all"):
            module.set_rng_state_all(saved)
        else:
            module.set_rng_state(saved[0])
        return None
    return (f"its random state covers {len(saved)} {saved_type or 'GPU'} device(s), this machine has {have} "
            f"{device_type or 'GPU'} device(s): dropout will not draw what an unbroken run would")


def load_training_state(checkpoint: str | os.PathLike) -> dict:
    """The resume state of a checkpoint folder: its ``training_state.pt`` as saved, on the CPU (weights-only
    unpickling; DeepSpeed's few optimizer-state classes allowed when this run uses DeepSpeed).

    Returns:
        ``{"optimizer", "scheduler", "step", "micro_batch", "rng", "world_size", ...}``: the optimizer and
        scheduler state dicts, the optimizer steps done, the micro-batches consumed, the random generators'
        states (one entry per process) and the process count that wrote it.

    Raises:
        CheckpointError: no ``training_state.pt`` (the folder cannot be resumed), or it cannot be read
            (truncated, not a torch file, or a DeepSpeed run's state read without DeepSpeed); names the file.
    """
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; {checkpoint} cannot be resumed (it holds no training state)")
    try:
        with torch.serialization.safe_globals(_deepspeed_state_classes()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file is the user's to replace
        why = load_failure(err)
        if "deepspeed" in str(err) and "deepspeed" not in sys.modules:
            why = "it was written by a DeepSpeed run: resume it under DeepSpeed with the same process count"
        raise CheckpointError(f"{path}: cannot read the training state ({why})") from None


def _deepspeed_state_classes() -> list:
    """The few DeepSpeed classes a ZeRO optimizer state holds; allowed by the weights-only unpickler.
    Empty unless this run uses DeepSpeed (imported by accelerate then): importing it costs seconds and
    prints a warning about the accelerator it detects."""
    if "deepspeed" not in sys.modules:
        return []
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def read_prefix(checkpoint: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Prefix weights (full keys, as stored) and metadata of a checkpoint folder: ours
    (``prefix.safetensors``), the original P-Tuning v2 script's (``pytorch_model.bin`` holding the prefix), or
    a whole model with its prefix inside (e.g. a ChatGLM3 ``finetune_demo`` checkpoint: sharded safetensors
    with ``transformer.prefix_encoder.*``), of which only the prefix tensors are read."""
    checkpoint = Path(checkpoint)
    if (checkpoint / PREFIX_FILE).is_file():
        state = read_weights(checkpoint / PREFIX_FILE)  # unreadable or truncated: a one-line CheckpointError
        meta = _read_meta(checkpoint / META_FILE)
    elif (checkpoint / ORIGINAL_FILE).is_file():
        state = read_matching(checkpoint, is_prefix_param)  # memory-mapped: a whole model is not read
        meta = None
    elif checkpoint.is_dir() and any((checkpoint / name).is_file() for name in (SAFE_SINGLE, SAFE_INDEX, BIN_INDEX)):
        state = read_matching(checkpoint, is_prefix_param)
        meta = None
    elif checkpoint.is_dir() and (checkpoint / PEFT_ADAPTER_FILE).is_file():
        base = _read_meta(checkpoint / PEFT_ADAPTER_FILE, "peft adapter config") or {}
        model = base.get("base_model_name_or_path") if isinstance(base.get("base_model_name_or_path"), str) else None
        raise CheckpointError(
            f"{checkpoint}: a peft adapter ({PEFT_ADAPTER_FILE}), not a prefix checkpoint; import it first: python -m "
            f"ptuning.export from-peft --adapter {checkpoint} --out <new folder> --model {model or '<its base model>'}, "
            "then use the new folder"
        )
    elif checkpoint.is_dir():
        raise CheckpointError(
            f"{checkpoint}: no {PREFIX_FILE} (ours), {ORIGINAL_FILE} (original P-Tuning v2) or model weights with "
            f"a prefix inside"
        )
    elif not checkpoint.exists():
        raise CheckpointError(f"{checkpoint}: no such folder")
    else:
        raise CheckpointError(f"{checkpoint}: not a folder (expected a checkpoint folder)")
    prefix = {k: v for k, v in state.items() if is_prefix_param(k)}
    if not prefix:
        raise CheckpointError(f"{checkpoint}: holds no *.{PREFIX_ATTRIBUTE}.* weights")
    bad = [k for k, v in prefix.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        # a NaN/inf prefix makes every generated token garbage: refuse it here rather than evaluate it
        raise CheckpointError(f"{checkpoint}: the prefix has non-finite values in {', '.join(bad)}; not loaded")
    return prefix, meta


def folder_prefix_length(folder: Path) -> int | None:
    """``pre_seq_len`` of a model folder whose weights hold a prefix (a whole model with its prefix inside, as
    ``python -m ptuning.export full`` or ChatGLM3's ``finetune_demo`` write it), else None."""
    try:
        stored = read_config(folder).get("pre_seq_len")
        if not isinstance(stored, int) or stored <= 0:
            return None
        read_prefix(folder)  # only the prefix tensors are read
    except (UnsupportedModelError, CheckpointError):
        return None
    return stored


def ignored_config_prefix(folder: Path, used: str) -> str | None:
    """The note for a model folder whose ``config.json`` sets ``pre_seq_len`` (as the original ChatGLM2/3 code
    reads it to add a prefix) while its weights hold none: the setting is ignored, the prefix is what ``used``
    says (``the prefix is model.pre_seq_len=16``); None when there is nothing to say."""
    try:
        stored = read_config(folder).get("pre_seq_len")
    except UnsupportedModelError:
        return None
    if not isinstance(stored, int) or isinstance(stored, bool) or stored <= 0 or folder_prefix_length(folder):
        return None
    return (f"note: {folder / 'config.json'} sets pre_seq_len {stored} but the folder's weights hold no prefix; "
            f"the setting is ignored ({used})")


def prefix_format(checkpoint: str | os.PathLike) -> str:
    """How a checkpoint folder that :func:`read_prefix` reads holds its prefix, in words for start-up lines:
    ``ours (prefix.safetensors)``, ``original P-Tuning v2 (pytorch_model.bin)`` or ``a whole model with its
    prefix inside``."""
    checkpoint = Path(checkpoint)
    if (checkpoint / PREFIX_FILE).is_file():
        return f"ours ({PREFIX_FILE})"
    if (checkpoint / ORIGINAL_FILE).is_file() and not (checkpoint / "config.json").is_file():
        return f"original P-Tuning v2 ({ORIGINAL_FILE})"
    return "a whole model with its prefix inside"


def _read_meta(path: Path, what: str = "prefix metadata") -> dict | None:
    """``prefix_config.json`` (or another JSON object, ``what``) as a dict, None when absent; unreadable is a
    CheckpointError naming the file."""
    if not path.is_file():
        return None
    return read_json_object(path, CheckpointError, what)


def base_model_change(trained: dict | None, current: dict, checkpoint: str | os.PathLike | None = None) -> str | None:
    """How the backbone described by ``current`` differs from the one a prefix was trained on, or None.

    Args:
        trained: the checkpoint's ``prefix_config.json`` (None for the original script's checkpoints, which
            record no base model).
        current: :func:`prefix_metadata` of the model the prefix goes into.
        checkpoint: the checkpoint folder: one that records no base model but holds a whole model (a ChatGLM3
            ``finetune_demo`` checkpoint, ``export full``) is compared by its backbone (see
            :func:`whole_model_change`).

    Returns:
        ``"was trained on A (config fingerprint a) but the model is B (config fingerprint b)"``, or None
        when the base model's name, config fingerprint and (where both record it) weights digest agree, or
        both record the same weights digest and config fingerprint (whatever the names). Names
        are compared as :func:`~ptuning.config.canonical_base_model` writes them: ``builtin:<name>`` and the
        folder it stands for (by any path) are the same model; a different weights digest still differs.
    """
    if not trained or "base_model" not in trained:
        return whole_model_change(checkpoint, current) if checkpoint is not None else None

    def same(key: str) -> bool:
        if key == "base_model":
            return canonical_base_model(str(trained[key])) == canonical_base_model(str(current[key]))
        return trained[key] == current[key]

    keys = ("base_model", "base_config_fingerprint", "base_weights_sha256")
    if all(same(k) for k in keys if k in trained and k in current):
        return None
    if all(k in trained and k in current and same(k) for k in keys[1:]):
        return None  # the same weights and config under another name (a .gguf file and the folder converted from it)

    def name(meta: dict) -> str:
        text = f"{meta.get('base_model')} (config fingerprint {meta.get('base_config_fingerprint')}"
        if trained.get("base_weights_sha256") != current.get("base_weights_sha256") and meta.get("base_weights_sha256"):
            text += f", weights {meta['base_weights_sha256']}"
        return text + ")"

    return f"was trained on {name(trained)} but the model is {name(current)}"


# config.json keys that are no part of what a backbone computes (training knobs, the prefix, bookkeeping)
_NOT_BACKBONE_KEYS = {"pre_seq_len", "prefix_projection", "prefix_dropout", "use_cache", "quantization_bit",
                      "hidden_dropout", "attention_dropout"}


def whole_model_change(checkpoint: str | os.PathLike, current: dict) -> str | None:
    """How the model folder a prefix goes into differs from the backbone stored in a whole-model checkpoint
    (a ChatGLM3 ``finetune_demo`` checkpoint, an ``export full`` folder: ``config.json`` and every weight, the
    prefix included), or None: what can be compared is, the numeric ``config.json`` values both folders have
    and one normalisation weight both store under the same key (equal within 16-bit rounding).

    Args:
        current: :func:`prefix_metadata` of the model the prefix goes into (its ``base_model`` names the folder).

    Returns:
        ``"was trained on the model stored with it (config.json chatglm_version 3 (the model's 2); weights
        differ at transformer.encoder.final_layernorm.weight) but the model is builtin:tiny-chatglm2"``, as
        :func:`base_model_change` words it; None for a checkpoint that is no whole model.
    """
    checkpoint = Path(checkpoint)
    if (checkpoint / PREFIX_FILE).is_file() or not (checkpoint / "config.json").is_file():
        return None
    base = ModelConfig(path=str(current.get("base_model"))).resolved_path
    try:
        theirs, mine = (json.loads((f / "config.json").read_text(encoding="utf-8")) for f in (checkpoint, base))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(theirs, dict) or not isinstance(mine, dict):
        return None
    differs = [f"{key} {theirs[key]} (the model's {mine[key]})" for key in sorted(set(theirs) & set(mine) - _NOT_BACKBONE_KEYS)
               if isinstance(theirs[key], (int, float)) and theirs[key] != mine[key]]
    found = differs and f"config.json {', '.join(differs)}"
    weight = _differing_weight(checkpoint, base)
    if weight:
        found = f"{found}; weights differ at {weight}" if found else f"weights differ at {weight}"
    return f"was trained on the model stored with it ({found}) but the model is {current.get('base_model')}" if found else None


def _differing_weight(checkpoint: Path, base: Path) -> str | None:
    """The key of a normalisation weight that both folders store and that differs beyond 16-bit rounding, or
    None (equal, or nothing comparable: other key names, unreadable files). Only the two tensors are read."""
    try:
        common = sorted(set(_weight_names(checkpoint)) & set(_weight_names(base)))
    except (CheckpointError, OSError, ValueError, KeyError, TypeError, RuntimeError):  # nothing to compare
        return None
    norms = [k for k in common if "norm" in k and k.endswith(".weight") and not is_prefix_param(k)]
    if not norms:
        return None
    key = norms[-1]  # the last layer's (or the final) norm: sorted keys put the deepest layer near the end
    try:
        theirs, mine = (read_matching(folder, key.__eq__)[key].float() for folder in (checkpoint, base))
    except (CheckpointError, KeyError):
        return None
    same = theirs.shape == mine.shape and torch.allclose(theirs, mine, rtol=1e-2, atol=1e-3)
    return None if same else key


def _weight_names(folder: Path) -> list[str]:
    """Every weight key of a model folder, read from its index or file headers (no tensor is loaded)."""
    for index_name in (SAFE_INDEX, BIN_INDEX):
        if (folder / index_name).is_file():
            return list(json.loads((folder / index_name).read_text(encoding="utf-8"))["weight_map"])
    names: list[str] = []
    for path in weight_files(folder):
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                names += list(handle.keys())
        else:
            names += list(torch_load(path))  # memory-mapped: the tensors are not read
    return names


@dataclass(frozen=True)
class PrefixCheckpoint:
    """A prefix checkpoint read from disk (:func:`read_checkpoint`), before any model is loaded.

    Attributes:
        path: the checkpoint folder.
        prefix: the prefix weights under their keys as stored (``transformer.prefix_encoder.embedding.weight``
            ...).
        meta: its ``prefix_config.json``; None for the original format and for whole models, which record none.
    """

    path: Path
    prefix: dict[str, torch.Tensor]
    meta: dict | None

    @property
    def sizes(self) -> dict:
        """``pre_seq_len`` and ``prefix_projection``: as recorded, else as the weights show."""
        if self.meta and "pre_seq_len" in self.meta:
            return {"pre_seq_len": self.meta["pre_seq_len"],
                    "prefix_projection": self.meta.get("prefix_projection", False)}
        return infer_prefix_shape(self.prefix)


def read_checkpoint(checkpoint: str | os.PathLike | PrefixCheckpoint) -> PrefixCheckpoint:
    """:func:`read_prefix` of ``checkpoint`` as a :class:`PrefixCheckpoint` (one already read as it is).

    Raises:
        CheckpointError: unreadable, holds no prefix, or a prefix with non-finite values.
    """
    if isinstance(checkpoint, PrefixCheckpoint):
        return checkpoint
    return PrefixCheckpoint(Path(checkpoint), *read_prefix(checkpoint))


#: the prefix's own settings, which are ``model.*`` keys (the other sizes are the backbone's, its folder's)
PREFIX_SETTINGS = ("pre_seq_len", "prefix_projection")


def prefix_fit_mismatch(trained: dict, have: dict, *, hint: str = "set {keys} to load it") -> str | None:
    """Every size in which a prefix (``trained``: its ``prefix_config.json`` or inferred shape) differs from the
    model's (``have``), in one sentence, or None when they agree.

    Args:
        hint: what to say about the ``model.*`` keys that would make them agree (``{keys}``:
            ``model.pre_seq_len=16 model.prefix_projection=false``; ``{names}``: ``model.pre_seq_len and
            model.prefix_projection``).

    Returns:
        e.g. ``the prefix was trained with pre_seq_len=16, prefix_projection=true but the model has
        pre_seq_len=8, prefix_projection=false (set model.pre_seq_len=16 model.prefix_projection=true to load
        it)``.
    """
    keys = [k for k in have if k in trained and trained[k] != have[k]]
    if not keys:
        return None

    def shown(value) -> str:
        return str(value).lower() if isinstance(value, bool) else str(value)

    text = (f"the prefix was trained with {', '.join(f'{k}={shown(trained[k])}' for k in keys)} but the model has "
            f"{', '.join(f'{k}={shown(have[k])}' for k in keys)}")
    settings = [k for k in keys if k in PREFIX_SETTINGS]
    if settings and len(settings) == len(keys):  # the backbone's own sizes cannot be set: only a hint for these
        text += " (" + hint.format(keys=" ".join(f"model.{k}={shown(trained[k])}" for k in settings),
                                   names=" and ".join(f"model.{k}" for k in settings)) + ")"
    return text


def infer_prefix_shape(prefix: dict[str, torch.Tensor]) -> dict:
    """pre_seq_len and prefix_projection of a prefix state dict (for checkpoints without metadata)."""
    local = local_prefix_keys(prefix)
    return {"pre_seq_len": local["embedding.weight"].shape[0], "prefix_projection": "trans.0.weight" in local}


def load_prefix(model: torch.nn.Module, checkpoint: str | os.PathLike | PrefixCheckpoint) -> dict | None:
    """Loads a prefix checkpoint into ``model`` (a model of any family, or a module holding a bare
    ``prefix_encoder``); a prefix that does not fit is an error naming both values.

    Returns:
        The checkpoint's metadata (None for the original format, which has none).

    Raises:
        CheckpointError: unreadable, trained on a model of another family, or it does not fit the model's
            prefix encoder.
    """
    checkpoint = read_checkpoint(checkpoint)
    try:
        encoder = model.get_submodule(prefix_module_name(model))
    except ValueError:
        raise CheckpointError(
            f"{checkpoint.path}: holds a prefix but the model has no prefix encoder (pre_seq_len=null)"
        ) from None
    if checkpoint.meta is not None and checkpoint.meta.get("family") and hasattr(model, "config"):
        _check_family(model, checkpoint)  # a whole model, not a bare encoder
    _check_sizes(encoder, checkpoint)
    load_prefix_state(encoder, checkpoint.prefix, str(checkpoint.path))
    return checkpoint.meta


def _check_family(model: torch.nn.Module, checkpoint: PrefixCheckpoint) -> None:
    try:
        mine = family_of(model)
    except UnsupportedModelError:
        return
    if checkpoint.meta["family"] != mine.name:
        try:
            theirs = family_named(checkpoint.meta["family"]).label
        except UnsupportedModelError:
            theirs = checkpoint.meta["family"]
        raise CheckpointError(
            f"{checkpoint.path}: the prefix was trained on a {theirs} model "
            f"({checkpoint.meta.get('base_model')}) but the model is a {mine.label} model"
        )


def _check_sizes(encoder: PrefixEncoder, checkpoint: PrefixCheckpoint) -> None:
    """Refuses a prefix whose recorded sizes (or, for the original's checkpoints, what its tensors show) differ
    from ``encoder``'s, naming the ``model.*`` keys that would make them agree (keys and shapes are checked as
    the prefix loads, :func:`~ptuning.prefix.load_prefix_state`)."""
    meta = checkpoint.meta
    trained = meta if meta is not None and "pre_seq_len" in meta else {**(meta or {}), **checkpoint.sizes}
    mismatch = prefix_fit_mismatch(trained, encoder.shape.describe())
    if mismatch:
        raise CheckpointError(f"{checkpoint.path}: {mismatch}")


def load_prefix_encoder(checkpoint: str | os.PathLike | PrefixCheckpoint, family: Family, config) -> PrefixEncoder:
    """The checkpoint's prefix as a prefix encoder of its own, for a backbone of ``family`` with ``config``
    that has none (the server keeps one backbone and many prefixes), with the checks of :func:`load_prefix`.

    Raises:
        CheckpointError: unreadable, or it does not fit the backbone.
    """
    checkpoint = read_checkpoint(checkpoint)
    sizes = checkpoint.sizes
    holder = torch.nn.Module()
    holder.prefix_encoder = PrefixEncoder(
        family.prefix_shape(config, int(sizes["pre_seq_len"]), bool(sizes.get("prefix_projection")))
    )
    load_prefix(holder, checkpoint)
    return holder.prefix_encoder


def load_model_with_prefix(
    cfg: ModelConfig,
    checkpoint: str | os.PathLike | PrefixCheckpoint | None,
    *,
    device: str | torch.device | None = None,
    sizes: Literal["checkpoint", "config"] = "checkpoint",
    tokenizer: bool = True,
) -> Loaded:
    """The model of ``cfg`` with the prefix of ``checkpoint`` loaded: how training (resume,
    ``train.init_prefix_from``), evaluation, chat and export get a model with a trained prefix.

    Args:
        cfg: the model folder, dtype, quantization and the prefix's settings.
        checkpoint: a checkpoint folder (ours, the original's, or a whole model with its prefix inside), or
            None for a new prefix initialised as ``cfg.prefix_init`` says.
        device: where the model goes (default: where it loads, the CPU).
        sizes: ``"checkpoint"``: the prefix's ``pre_seq_len`` and ``prefix_projection`` are the checkpoint's;
            ``"config"``: they are ``cfg``'s, and a checkpoint that does not fit them is an error naming the
            ``model.*`` key to set.
        tokenizer: also load the tokenizer and the prompt template (else both are None).

    Returns:
        The :class:`~ptuning.build.Loaded` model, with ``prefix_meta`` (the checkpoint's metadata),
        ``prompt_format`` (how its training prompts were rendered, when recorded) and ``base_change`` (how this
        backbone differs from the one the prefix was trained on, see :func:`base_model_change`; the caller
        warns or refuses).

    Raises:
        ConfigError, CheckpointError: the model or the checkpoint cannot be read, or they do not fit.
    """
    if checkpoint is None:
        return load(cfg, device=device, init=True, tokenizer=tokenizer)
    checkpoint = read_checkpoint(checkpoint)
    if sizes == "checkpoint":
        cfg = replace(cfg, **checkpoint.sizes)
    loaded = load(cfg, device=device, init=False, tokenizer=tokenizer)
    meta = load_prefix(loaded.model, checkpoint)
    loaded.prefix_meta = meta
    loaded.prompt_format = (meta or {}).get("prompt_format")
    loaded.base_change = base_model_change(meta, base_metadata(cfg, loaded.model), checkpoint.path)
    return loaded


def export_original(checkpoint: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Writes the prefix as the family's original P-Tuning v2 script saved it: ``pytorch_model.bin`` with the
    keys its code loads (``transformer.prefix_encoder.*`` for ChatGLM-6B and ChatGLM2/3; the family comes from
    ``prefix_config.json``), and our metadata beside it.

    Raises:
        CheckpointError: unreadable, or the checkpoint's family has no original prefix format.
    """
    prefix, meta = read_prefix(checkpoint)
    if meta is not None and meta.get("family"):
        try:
            family = family_named(meta["family"])
        except UnsupportedModelError as err:
            raise CheckpointError(f"{checkpoint}: {err}") from None
        local = local_prefix_keys(prefix)
        keys = {k: family.original_prefix_key(k) for k in local}
        if None in keys.values():
            raise CheckpointError(
                f"{checkpoint}: {family.label} has no original P-Tuning v2 prefix format; export a peft adapter"
            )
        prefix = {keys[k]: v for k, v in local.items()}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_torch({k: v.clone() for k, v in prefix.items()}, out_dir / ORIGINAL_FILE)
    if meta is not None:
        (out_dir / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out_dir / ORIGINAL_FILE
