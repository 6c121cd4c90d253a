"""The training loop: accelerate for devices and processes, a deterministic batch plan, prefix-only
checkpoints with exact resume.

The loss of an optimizer step is the mean over every target token of its global batch (all processes,
all accumulation micro-steps), so one process and several give the same update for the same global batch.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from transformers import get_scheduler

from ..build import ignored_config_prefix, load, model_family, weights_digest
from ..config import TrainJobConfig
from ..distributed import Collectives, LaunchError, start
from ..evaluation.metrics import METRIC_NAMES
from ..perf import matmul_peak_flops, model_train_flops_per_token, peak_memory_mib, set_cpu_threads
from ..prefix import mark_only_prefix_trainable, prefix_module_name
from ..weights import BIN_INDEX, SAFE_INDEX, SAFE_SINGLE, CheckpointError
from .checkpoint import (
    CHECKPOINT_FILES,
    CHECKPOINT_RE,
    ORIGINAL_FILE,
    PREFIX_FILE,
    RUN_FILE,
    STATE_FILE,
    base_model_change,
    capture_rng,
    checkpoint_in,
    checkpoint_run_id,
    folder_run_id,
    foreign_files,
    latest_checkpoint,
    list_checkpoints,
    load_prefix,
    load_training_state,
    not_our_checkpoint,
    prefix_metadata,
    restore_rng,
    run_checkpoints,
    save_checkpoint,
)
from .faults import kill_point

LOG_FILE = "train_log.jsonl"
PLOT_FILE = "loss.png"
# the files of a run in its output folder, beside its checkpoint-N folders
RUN_OUTPUT_FILES = (LOG_FILE, PLOT_FILE, RUN_FILE)
# settings that shape the updates: resuming with another value gives another result than the run it continues
RESUME_KEYS = ("train.per_device_batch_size", "train.gradient_accumulation_steps", "train.learning_rate",
               "train.weight_decay", "train.lr_scheduler", "train.warmup_steps", "train.max_grad_norm", "train.seed",
               "data.train_file", "data.max_train_samples", "data.packing", "data.pack_length")


class TrainingError(RuntimeError):
    """A run that cannot start or go on; the message says why and what to do."""


class TrainingInterrupted(Exception):
    """Ctrl-C (SIGINT) stopped the run; the message says where and how to go on.

    Attributes:
        step: the last completed optimizer step.
        checkpoint: the run's last checkpoint, or None when it wrote none yet.
    """

    def __init__(self, step: int, checkpoint: Path | None):
        self.step, self.checkpoint = step, checkpoint
        if checkpoint is None:
            text = f"interrupted at step {step}, before the first checkpoint: nothing to resume, start the run again"
        else:
            text = f"interrupted at step {step}; last checkpoint {checkpoint}; continue with train.resume_from=latest"
        super().__init__(text)


@dataclass
class TrainResult:
    output_dir: Path
    step: int
    checkpoint: Path | None
    train_loss: float | None = None
    eval_loss: float | None = None
    metrics: dict = field(default_factory=dict)
    baseline_metrics: dict = field(default_factory=dict)  # the untuned prefix (eval_before_training)
    main_process: bool = True  # False on the other processes of a run: only the main one reports


@dataclass
class _Progress:
    """How far a run got: what an interruption reports."""

    step: int = 0
    checkpoint: Path | None = None
    bar: object = None  # the progress bar, closed however the run ends


class BatchPlan:
    """Which examples form global micro-batch ``k``: epoch ``k // per_epoch`` shuffles all examples with
    ``seed + epoch`` and cuts them into global micro-batches (the incomplete last one is dropped).
    Resuming needs only ``k``."""

    def __init__(self, num_examples: int, global_batch: int, seed: int, unit: str = "examples"):
        self.per_epoch = num_examples // global_batch
        if self.per_epoch == 0:
            raise TrainingError(
                f"the training set has {num_examples} {unit}, fewer than one global batch "
                f"({global_batch} = per_device_batch_size x processes)"
            )
        self.num_examples, self.global_batch, self.seed = num_examples, global_batch, seed
        self._epoch, self._perm = -1, None

    def __call__(self, k: int) -> list[int]:
        epoch, pos = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.num_examples, generator=g).tolist()
        return self._perm[pos * self.global_batch : (pos + 1) * self.global_batch]


def target_count(labels: list[int]) -> int:
    """Tokens that the loss scores: labels at positions 1.. that are not -100."""
    return sum(1 for t in labels[1:] if t != -100)


def token_loss_sum(model, ids: torch.Tensor, labels: torch.Tensor, **inputs) -> torch.Tensor:
    """Summed next-token cross-entropy (float32) over the batch's target tokens: the model's loss times
    its target count. Logits are formed only where a target is predicted, and no generation cache is built
    (writing every layer's keys and values into one, and its backward, cost ~5% of a CPU step). ``inputs``:
    further model inputs of the batch (``sequence_ids`` of packed rows)."""
    return model(input_ids=ids, labels=labels, loss_reduction="sum", return_logits=False, use_cache=False,
                 **inputs).loss


def model_inputs(batch: dict, device) -> dict:
    """The collated batch's model inputs besides ``input_ids`` and ``labels`` (e.g. ``sequence_ids``), on ``device``."""
    return {key: value.to(device) for key, value in batch.items() if key not in ("input_ids", "labels")}


def make_accelerator(cfg: TrainJobConfig) -> tuple[Accelerator, Collectives]:
    try:
        return start(mixed_precision=cfg.train.mixed_precision)
    except LaunchError as err:
        raise TrainingError(str(err)) from None


def gathered(params, deepspeed: bool):
    """Full values of ``params`` inside the block, also when ZeRO-3 partitions them (a collective)."""
    if deepspeed:
        import deepspeed as ds

        return ds.zero.GatheredParameters(list(params), modifier_rank=None)
    return nullcontext()


def configure_deepspeed(accelerator: Accelerator, cfg: TrainJobConfig, world: int) -> None:
    """Fills the DeepSpeed config's batch / accumulation / clipping from the training keys; a value the user
    set that contradicts them is an error naming both."""
    plugin = accelerator.state.deepspeed_plugin
    ds = plugin.deepspeed_config
    wanted = {
        "train_micro_batch_size_per_gpu": cfg.train.per_device_batch_size,
        "gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
        "train_batch_size": cfg.train.per_device_batch_size * cfg.train.gradient_accumulation_steps * world,
        "gradient_clipping": cfg.train.max_grad_norm or 0.0,
    }
    keys = {"train_micro_batch_size_per_gpu": "train.per_device_batch_size",
            "gradient_accumulation_steps": "train.gradient_accumulation_steps",
            "train_batch_size": "train.per_device_batch_size x gradient_accumulation_steps x processes",
            "gradient_clipping": "train.max_grad_norm"}
    for key, value in wanted.items():
        have = ds.get(key, "auto")
        if have != "auto" and float(have) != float(value):
            raise TrainingError(
                f"DeepSpeed config {getattr(plugin, 'hf_ds_config_file', None) or os.environ.get('ACCELERATE_DEEPSPEED_CONFIG_FILE', '')}: "
                f"{key}={have} conflicts with {keys[key]} ({value}); set it to \"auto\" or make them agree"
            )
        ds[key] = value
    for precision in ("fp16", "bf16"):
        section = ds.get(precision, {})
        if section.get("enabled") == "auto":
            section["enabled"] = cfg.train.mixed_precision == precision


def check_output_dir(out: Path) -> None:
    """Refuses a ``train.output_dir`` that cannot hold a run, before anything is loaded: a file, a folder that
    cannot be created or written, a model folder, a checkpoint folder or a folder inside one.

    Raises:
        TrainingError: ``train.output_dir=<folder>: <why>``.
    """
    def refuse(why: str) -> TrainingError:
        return TrainingError(f"train.output_dir={out}: {why}")

    absolute = Path(os.path.abspath(out))
    if out.exists() and not out.is_dir():
        raise refuse("exists and is not a folder")
    for parent in absolute.parents:
        if any((parent / name).is_file() for name in CHECKPOINT_FILES):
            raise refuse(f"it is inside the checkpoint folder {parent}; choose another folder")
    if out.is_dir():
        if (out / "config.json").is_file() and any(
            (out / name).is_file() for name in (SAFE_SINGLE, SAFE_INDEX, BIN_INDEX, ORIGINAL_FILE)
        ):
            raise refuse("it is a model folder (config.json + weights); choose another folder")
        if any((out / name).is_file() for name in (*CHECKPOINT_FILES, ORIGINAL_FILE)):
            raise refuse("it is a checkpoint folder; choose another folder")
        if not os.access(out, os.W_OK | os.X_OK):
            raise refuse("not writable")
        return
    # it would be made: the nearest folder that exists must take a new folder (a uniquely named probe, removed
    # at once: several processes may check the same folder together)
    existing = next(p for p in absolute.parents if p.exists())
    if not existing.is_dir():
        raise refuse(f"cannot be created: {existing} is not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".ptuning-probe-", dir=existing))
    except OSError as err:
        raise refuse(f"cannot be created in {existing} ({err.strerror or err})") from None


@dataclass
class FolderSurvey:
    """What an output folder holds under the names a run writes.

    Attributes:
        run_id: the run that ``run_config.json`` records (None: none).
        ours: what this toolkit wrote for that run: its checkpoints (and their unfinished writes), evaluations
            of its checkpoints, and the files ``train_log.jsonl``, ``loss.png``, ``run_config.json``.
        others: ``(path, why)`` of each other entry named like a run's output (``checkpoint-N``,
            ``eval-checkpoint-N`` ...) that this toolkit did not write for that run: kept by every run.
    """

    run_id: str | None
    ours: list[Path]
    others: list[tuple[Path, str]]


def survey_output_dir(out: Path) -> FolderSurvey:
    """Sorts what ``out`` holds under a run's names into the recorded run's outputs and everything else."""
    from ..evaluation.run import evaluation_run_id

    recorded = folder_run_id(out)
    survey = FolderSurvey(recorded, [], [])
    for path in sorted(out.iterdir()) if out.is_dir() else []:
        name = path.name
        if name in RUN_OUTPUT_FILES:
            why = None if path.is_file() else "not a file"
        elif CHECKPOINT_RE.match(name):
            why = not_our_checkpoint(path, recorded)
        elif name.startswith(".tmp-") and CHECKPOINT_RE.match(name[len(".tmp-"):]):
            # an interrupted checkpoint write: checkpoint files only, of the recorded run (or not yet saying)
            ok = (path.is_dir() and recorded is not None and not foreign_files(path, CHECKPOINT_FILES)
                  and checkpoint_run_id(path) in (None, recorded))
            why = None if ok else "not an unfinished checkpoint of the run recorded here"
        elif name.startswith("eval-") and CHECKPOINT_RE.match(name[len("eval-"):]):
            ok = path.is_dir() and recorded is not None and evaluation_run_id(path) == recorded
            why = None if ok else "not an evaluation of the run recorded here"
        else:
            continue
        if why is None:
            survey.ours.append(path)
        else:
            survey.others.append((path, why))
    return survey


def _describe(others: list[tuple[Path, str]]) -> str:
    return ", ".join(f"{path.name} ({why})" for path, why in others)


def resolve_resume(cfg: TrainJobConfig) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run.

    A fresh run refuses a folder that holds outputs under a run's names unless ``train.overwrite=true``
    (which removes only the recorded run's own outputs, see :func:`clear_previous_run`). Any run refuses to
    start when a checkpoint it would save would replace a folder it did not write.
    """
    out = Path(cfg.train.output_dir)
    resume = cfg.train.resume_from
    if resume is None:
        survey = survey_output_dir(out)
        if (survey.ours or survey.others) and not cfg.train.overwrite:
            parts = []
            if survey.ours:
                parts.append(f"an earlier run's outputs ({_names(survey.ours)})")
            if survey.others:
                parts.append(f"{_describe(survey.others)}, which no run here wrote")
            options = []
            latest = latest_checkpoint(out)
            if latest is not None and all((latest / name).is_file() for name in (PREFIX_FILE, STATE_FILE)):
                options.append("resume with train.resume_from=latest")
            options.append("choose another train.output_dir")
            if survey.ours and survey.others:
                options.append(f"set train.overwrite=true to remove the earlier run's outputs and start over "
                               f"(it keeps {_names([p for p, _ in survey.others])})")
            elif survey.ours:
                options.append("set train.overwrite=true to remove them and start over")
            else:
                options.append("set train.overwrite=true to start a new run beside them (they are kept)")
            raise TrainingError(
                f"{out} already holds {' and '.join(parts)}: {', '.join(options[:-1])}, or {options[-1]}"
            )
        # with overwrite the recorded run's checkpoints go; a checkpoint folder that stays must not be in the way
        leftover = [(p, why) for p, why in survey.others]
        leftover += [(p, "it holds files a checkpoint does not: " + ", ".join(foreign_files(p, CHECKPOINT_FILES)))
                     for p in survey.ours if p.is_dir() and CHECKPOINT_RE.match(p.name)
                     and foreign_files(p, CHECKPOINT_FILES)]
        _check_save_targets(cfg, leftover, start=0)
        return None
    if resume == "latest":
        found = latest_checkpoint(out)
        if found is None and list_checkpoints(out):
            raise TrainingError(
                f"train.resume_from=latest: the checkpoints in {out} ({_names(list_checkpoints(out))}) were not "
                f"written by the run its {RUN_FILE} records; resume one on purpose with train.resume_from=<folder>"
            )
        if found is None:
            raise TrainingError(f"train.resume_from=latest: {out} holds no checkpoint-N folder to resume")
        path = found
    else:
        path = Path(resume)
        if not path.exists():
            raise TrainingError(f"train.resume_from={resume!r}: no such checkpoint folder")
        if not path.is_dir():
            raise TrainingError(f"train.resume_from={resume}: not a folder (expected a checkpoint-N folder)")
        if not (path / PREFIX_FILE).is_file():
            if (path / ORIGINAL_FILE).is_file():
                raise TrainingError(
                    f"train.resume_from={resume}: an original P-Tuning v2 checkpoint ({ORIGINAL_FILE}) holds no "
                    f"training state to resume; start from its prefix with train.init_prefix_from={resume}"
                )
            hint = ""
            if list_checkpoints(path):
                hint = (f"; it is a training output folder: resume its latest with train.output_dir={resume} "
                        "train.resume_from=latest")
            raise TrainingError(f"train.resume_from={resume}: not a checkpoint (no {PREFIX_FILE}){hint}")
        recorded = folder_run_id(out)
        if recorded is not None and checkpoint_run_id(path) != recorded and run_checkpoints(out, recorded):
            raise TrainingError(
                f"train.resume_from={resume}: {out} holds checkpoints of another run ({_names(run_checkpoints(out, recorded))}); "
                "resume into the checkpoint's own folder or choose another train.output_dir"
            )
    named = CHECKPOINT_RE.match(path.name)
    at = int(named.group(1)) if named else 0
    if at > cfg.train.max_steps:
        raise _past_the_end(path, at, cfg)
    # the checkpoints it saves replace only the same run's (a re-save after a crash); anything else is in the way
    run_id = checkpoint_run_id(path)
    _check_save_targets(cfg, [(p, why) for p in list_checkpoints(out)
                              if (why := not_our_checkpoint(p, run_id) or _extra_files(p)) is not None],
                        start=at)
    return path


def check_resumable(path: Path) -> None:
    """Refuses a checkpoint without training state before anything is loaded."""
    if not (path / STATE_FILE).is_file():
        raise TrainingError(
            f"{path / STATE_FILE}: missing; {path} cannot be resumed (it holds no training state); start from its "
            f"prefix with train.init_prefix_from={path}"
        )


def _extra_files(path: Path) -> str | None:
    extra = foreign_files(path, CHECKPOINT_FILES)
    return f"it holds files a checkpoint does not: {', '.join(extra)}" if extra else None


def _past_the_end(path: Path, step: int, cfg: TrainJobConfig) -> TrainingError:
    return TrainingError(
        f"train.resume_from: {path} is at step {step}, past train.max_steps={cfg.train.max_steps}: nothing to "
        f"train; raise train.max_steps to train on (or evaluate it with evaluate.py prefix_checkpoint={path})"
    )


def _check_save_targets(cfg: TrainJobConfig, in_the_way: list[tuple[Path, str]], start: int) -> None:
    """Refuses a run whose checkpoint-N (a step after ``start`` that it saves; written through
    ``.tmp-checkpoint-N``) would replace a folder of ``in_the_way`` (folders it must not remove)."""
    max_steps, every = cfg.train.max_steps, cfg.train.save_steps
    for path, why in in_the_way:
        m = CHECKPOINT_RE.match(path.name.removeprefix(".tmp-"))
        step = int(m.group(1)) if m else None
        if step is not None and start < step <= max_steps and (step % every == 0 or step == max_steps):
            raise TrainingError(
                f"train.output_dir={cfg.train.output_dir}: this run would save checkpoint-{step}, but {path} is "
                f"already there ({why}) and a run replaces only its own checkpoints: move it, or choose another "
                "train.output_dir"
            )


def warn_changed_settings(cfg: TrainJobConfig, resume: Path) -> str | None:
    """The warning when a resumed run's settings that shape the updates differ from those of the run that
    wrote ``resume`` (its folder's ``run_config.json``, when it records the checkpoint's run), else None."""
    try:
        record = json.loads((resume.parent / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or record.get("run_id") != checkpoint_run_id(resume):
        return None
    now = asdict(cfg)
    changed = []
    for key in RESUME_KEYS:
        section, name = key.split(".")
        before, after = (record.get(section) or {}).get(name), now[section][name]
        if key == "data.train_file" and before is not None and after is not None:
            same = str(before) == str(after) or _same_file(before, after)
        else:
            same = before == after
        if not same and name in (record.get(section) or {}):
            changed.append(f"{key} ({before} -> {after})")
    if not changed:
        return None
    return (f"warning: resuming {resume} with {', '.join(changed)} changed from the run that wrote it "
            f"({resume.parent / RUN_FILE}): the result will differ from an uninterrupted run")


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(Path(a).expanduser(), Path(b).expanduser())
    except OSError:
        return False


def _names(paths: list[Path]) -> str:
    return ", ".join(p.name for p in paths)


def clear_previous_run(out: Path) -> tuple[list[str], list[str]]:
    """``train.overwrite=true``: removes the outputs of the run that ``out`` records (see
    :func:`survey_output_dir`): the files its checkpoints and evaluations consist of (then each folder, when
    nothing else is left in it), its log, loss plot and run record.

    Returns:
        ``(removed, kept)``: names removed, and what stays that a run here did not write (named with why, and
        ``checkpoint-3/notes.txt`` for a file a user put inside a removed checkpoint).
    """
    from ..evaluation.run import EVAL_FILES

    survey = survey_output_dir(out)
    removed: list[str] = []
    kept = [f"{path.name} ({why})" for path, why in survey.others]
    for path in survey.ours:
        if path.is_file():
            path.unlink()
            removed.append(path.name)
            continue
        files = EVAL_FILES if path.name.startswith("eval-") else CHECKPOINT_FILES
        for name in files:
            (path / name).unlink(missing_ok=True)
        left = sorted(p.name for p in path.iterdir())
        if left:  # a user's file inside: it stays, and so does the folder
            kept += [f"{path.name}/{name}" for name in left]
            removed.append(f"{path.name}'s {'evaluation' if path.name.startswith('eval-') else 'checkpoint'} files")
        else:
            path.rmdir()
            removed.append(path.name)
    return removed, kept


class RunLog:
    """``train_log.jsonl`` (main process only): one JSON object per log or eval step."""

    def __init__(self, path: Path, enabled: bool, keep_until_step: int | None, end_step: int | None = None):
        self.path, self.enabled = path, enabled
        if enabled and path.exists():
            # resuming: drop what the interrupted run logged after its checkpoint, including the end-of-run
            # evaluation when it resumes from the final step (that evaluation runs again), and a last line
            # torn by a kill
            kept = []
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                at = record.get("step", 0)
                after_final_save = at == end_step and "loss" not in record
                if keep_until_step is not None and (at < keep_until_step or (at == keep_until_step and not after_final_save)):
                    kept.append(line)
            # through a temporary file: a kill during this rewrite must not lose the log
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def run(cfg: TrainJobConfig, *, trackers=None) -> TrainResult:
    """Trains the prefix as ``cfg`` says. ``trackers``: an optional :class:`ptuning.training.tracking.Tracker`.

    Nothing in ``train.output_dir`` is written or removed before the config, the model and the data have
    been checked. A small model on a CPU runs with one intra-op thread unless ``OMP_NUM_THREADS`` is set
    (:func:`ptuning.perf.set_cpu_threads`); the thread count is restored on return.

    Raises:
        ConfigError, DataError, CheckpointError, TrainingError: a run that cannot start or go on.
        TrainingInterrupted: Ctrl-C; says at which step it stopped and what to resume.
    """
    where = _Progress()
    threads = torch.get_num_threads()
    try:
        return _train(cfg, trackers, where)
    except KeyboardInterrupt:
        raise TrainingInterrupted(where.step, where.checkpoint) from None
    finally:
        if where.bar is not None:
            where.bar.close()
        torch.set_num_threads(threads)


def _train(cfg: TrainJobConfig, trackers, where: _Progress) -> TrainResult:
    from ..data import PackedRows, TrainingCollator, build_datasets  # imported here: it pulls in datasets
    from ..data.loading import check_positions

    cfg.validate()
    out = Path(cfg.train.output_dir)
    check_output_dir(out)
    model_family(cfg.model)  # a folder no family handles fails here, before anything is written
    accelerator, comm = make_accelerator(cfg)
    resume = resolve_resume(cfg)
    # a training output folder starts from its latest checkpoint, as prefix_checkpoint= takes it
    init_from = checkpoint_in(cfg.train.init_prefix_from) if cfg.train.init_prefix_from else None
    if resume is not None:
        check_resumable(resume)
    main = comm.is_main_process
    if resume is not None and main:
        changed = warn_changed_settings(cfg, resume)
        if changed:
            print(changed, file=sys.stderr)
    set_seed(cfg.train.seed)

    # the prefix starts as model.prefix_init says unless a checkpoint's prefix replaces it
    loaded = load(cfg.model, init=resume is None and not cfg.train.init_prefix_from)
    model, template = loaded.model, loaded.template
    set_cpu_threads(model, accelerator.device)
    # before accelerate.prepare: ZeRO-3 partitions the parameters there
    trained_meta = None
    if resume is not None:
        trained_meta = load_prefix(model, resume)
    elif cfg.train.init_prefix_from:
        trained_meta = load_prefix(model, init_from)
    trainable, total = mark_only_prefix_trainable(model)
    if cfg.model.gradient_checkpointing:
        model.activation_checkpointing_enable()
    builtin = cfg.model.base_model_name.startswith("builtin:")
    meta = prefix_metadata(model, cfg.model.base_model_name, weights_digest(cfg.model.resolved_path) if builtin else None)
    changed = base_model_change(trained_meta, meta, resume or init_from)
    if changed and resume is not None and not cfg.train.allow_base_model_change:
        raise TrainingError(
            f"{resume} {changed}: resume on the model it was trained on, or set "
            "train.allow_base_model_change=true to go on with this one on purpose"
        )
    if changed and main:
        print(f"warning: {resume or init_from} {changed}", file=sys.stderr)
    # the run's id marks its checkpoints as its own: a resumed run keeps the id of the run it continues
    run_id = (trained_meta or {}).get("run_id") if resume is not None else None
    meta["run_id"] = run_id = run_id or uuid.uuid4().hex[:12]
    # how the prompts were rendered: chat (history / conversations, the chat template) or plain (ADGEN rows)
    meta["prompt_format"] = "chat" if cfg.data.history_column or cfg.data.conversation_column else "plain"
    with accelerator.main_process_first():
        train_ds = build_datasets(cfg.data, template, "train")
        eval_ds = (build_datasets(cfg.data, template, "validation", features="train")
                   if cfg.data.validation_file else None)
        # generation features, built once for the evaluations before and after training
        gen_examples = (build_datasets(cfg.data, template, "validation").to_list()
                        if cfg.data.validation_file and (cfg.train.eval_generation or cfg.train.eval_before_training)
                        else None)
    # every process checks the same rows, so all stop with the same message
    limit = loaded.max_positions
    shorten = "lower data.max_source_length / data.max_target_length (rows are cut to them)"
    check_positions([len(x) for x in train_ds["input_ids"]], limit, cfg.data.train_file, shorten)
    if eval_ds is not None:
        check_positions([len(x) for x in eval_ds["input_ids"]], limit, cfg.data.validation_file, shorten)
    if gen_examples is not None:
        check_positions([len(x["input_ids"]) for x in gen_examples], limit, cfg.data.validation_file,
                        "lower data.max_source_length or train.max_new_tokens", extra=cfg.train.max_new_tokens,
                        what="prompts")
    collate = TrainingCollator.from_config(template, cfg.data)
    targets = [target_count(lab) for lab in train_ds["labels"]]
    world, rank, bs = comm.num_processes, comm.process_index, cfg.train.per_device_batch_size
    # the batch plan draws rows, or packs of rows (made once from the row lengths and the seed)
    units, unit = train_ds, "examples"
    if cfg.data.packing:
        try:
            units = PackedRows.from_rows(train_ds, cfg.data.pack_length, cfg.train.seed)
        except ValueError as err:
            raise TrainingError(f"{cfg.data.train_file}: {err}") from None
        targets, unit = units.per_pack(targets), f"packed sequences of {cfg.data.pack_length} tokens"
    plan = BatchPlan(len(units), bs * world, cfg.train.seed, unit)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
    scheduler = get_scheduler(
        cfg.train.lr_scheduler,
        optimizer,
        num_warmup_steps=cfg.train.warmup_steps,
        num_training_steps=cfg.train.max_steps,
    )
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if deepspeed:
        configure_deepspeed(accelerator, cfg, world)
    model, optimizer = accelerator.prepare(model, optimizer)
    # accelerate's unwrap_model imports DeepSpeed whenever it is installed (seconds, and a warning on stdout)
    raw = accelerator.unwrap_model(model) if deepspeed else getattr(model, "module", model)

    step, micro = 0, 0
    if resume is not None:
        state = load_training_state(resume)
        if state.get("world_size", 1) != world:
            raise TrainingError(
                f"{resume} was written by {state.get('world_size', 1)} process(es); resume it with the same number "
                f"(now {world}) so the data order and optimizer state line up"
            )
        if deepspeed:
            optimizer.optimizer.load_state_dict(state["optimizer"])  # the ZeRO optimizer picks its own part
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, micro = state["step"], state["micro_batch"]
        if step > cfg.train.max_steps:
            raise _past_the_end(resume, step, cfg)
        restore_rng(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
        if main:
            print(f"resumed from {resume} at step {step}")
            if step == cfg.train.max_steps:
                print(f"{resume} is at train.max_steps={step}: nothing left to train; running the end-of-run "
                      "evaluation only (raise train.max_steps to train on)")
    where.step, where.checkpoint = step, resume
    # everything is checked: from here on the run writes (the main process only)
    if main:
        created = not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TrainingError(f"train.output_dir={out}: cannot be created ({err.strerror or err})") from None
        if trackers is not None:
            try:
                trackers.start(asdict(cfg), out)
            except Exception as err:  # noqa: BLE001 - the tracker's own failure (network, login), one line
                if created:
                    shutil.rmtree(out, ignore_errors=True)
                reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise TrainingError(f"logger.backend={cfg.logger.backend}: the tracker did not start ({reason})") from None
        removed, kept = clear_previous_run(out) if resume is None and cfg.train.overwrite else ([], [])
        if removed:
            print(f"train.overwrite=true: removed the previous run's {', '.join(removed)} from {out}")
        if kept:
            print(f"train.overwrite=true: kept what a run here did not write in {out}: {', '.join(kept)}")
    log = RunLog(out / LOG_FILE, main, keep_until_step=step if resume is not None else None,
                 end_step=cfg.train.max_steps)
    if main and (resume is None or folder_run_id(out) != run_id):
        if resume is None:
            (out / LOG_FILE).write_text("")
        (out / RUN_FILE).write_text(
            json.dumps({"run_id": run_id, **asdict(cfg)}, indent=2, ensure_ascii=False, default=str) + "\n"
        )

    device = accelerator.device
    peak = matmul_peak_flops(
        torch.bfloat16 if cfg.train.mixed_precision == "bf16" else torch.float32, device=device
    )
    if main:
        note = ignored_config_prefix(cfg.model.resolved_path, f"the prefix is model.pre_seq_len={meta['pre_seq_len']}")
        if note:
            print(note, file=sys.stderr)
        print(
            f"training {trainable:,} of {total:,} parameters ({100 * trainable / total:.3f}%, a "
            f"{meta['pre_seq_len']}-token prefix{' with projection' if meta['prefix_projection'] else ''}) on {world} "
            f"process(es), {len(train_ds)} examples"
            + (f" in {len(units)} {unit} ({100 * units.fill():.1f}% filled)" if cfg.data.packing else "")
            + f", {_count(cfg.train.max_steps, 'step')}"
        )

    def save(at_step: int) -> Path | None:
        rng = comm.gather_objects([capture_rng()])
        # ZeRO partitions the optimizer state: keep every rank's part
        shards = comm.gather_objects([optimizer.state_dict()]) if deepspeed else None
        path = None
        with gathered(raw.get_submodule(prefix_module_name(raw)).parameters(), deepspeed):
            if main:
                state = {
                    "optimizer": shards if deepspeed else optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "step": at_step,
                    "micro_batch": micro,
                    "rng": rng,
                    "world_size": world,
                    "skipped_nonfinite_steps": skipped,
                }
                path = save_checkpoint(out, at_step, raw, meta, state, cfg.train.save_total_limit)
        comm.barrier()
        return path

    def evaluate_loss() -> float | None:
        if eval_ds is None:
            return None
        model.eval()
        loss_sum = torch.zeros((), device=device)
        count = torch.zeros((), device=device)
        n = len(eval_ds)
        mine = list(range(rank, n, world))
        with torch.no_grad():
            for start in range(0, len(mine), cfg.train.eval_batch_size):
                batch = collate([eval_ds[i] for i in mine[start : start + cfg.train.eval_batch_size]])
                ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
                with accelerator.autocast():
                    loss_sum += token_loss_sum(model, ids, labels)
                count += (labels[:, 1:] != -100).sum()
                kill_point("eval", step)  # test-only: SIGKILL during an evaluation
        stats = comm.sum(torch.stack([loss_sum, count.float()]))
        model.train()
        return (stats[0] / stats[1]).item()

    baseline: dict = {}
    if cfg.train.eval_before_training and cfg.data.validation_file and resume is None:
        from ..evaluation.run import evaluate_model

        baseline = evaluate_model(raw, template, cfg.data, cfg.train, comm, examples=gen_examples)
        record = {"eval_loss": evaluate_loss(), **{f"eval_{k}": v for k, v in baseline.items()}}
        log.write({"step": 0, **record})
        if trackers is not None and main:
            trackers.log(record, 0)
        if main:
            print(f"untuned prefix: eval loss {record['eval_loss']:.4f}, "
                  + ", ".join(f"{k} {baseline[k]:.2f}" for k in METRIC_NAMES))

    progress = None
    if main:
        from tqdm.auto import tqdm

        progress = where.bar = tqdm(total=cfg.train.max_steps, initial=step, desc="train", dynamic_ncols=True)
    window_loss, window_steps, window_tokens, window_samples = 0.0, 0, 0, 0
    window_start = time.perf_counter()
    shown: dict[str, str] = {}  # the progress bar's postfix
    last_checkpoint = resume
    train_loss = eval_loss = None
    # a resumed run goes on counting: the metric covers the whole run
    skipped = state.get("skipped_nonfinite_steps", 0) if resume is not None else 0
    model.train()
    while step < cfg.train.max_steps:
        step += 1
        batches = [plan(micro + a) for a in range(cfg.train.gradient_accumulation_steps)]
        micro += len(batches)
        global_targets = sum(targets[i] for b in batches for i in b)
        local_loss = torch.zeros((), device=device)
        local_tokens = 0
        for a, indices in enumerate(batches):
            batch = collate([units[i] for i in indices[rank * bs : (rank + 1) * bs]])
            ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
            inputs = model_inputs(batch, device)
            sync = a == len(batches) - 1
            # DDP and DeepSpeed average gradients over processes: scale so the update is the global token mean
            scale = world / max(global_targets, 1)
            if deepspeed:
                with accelerator.autocast():
                    loss_sum = token_loss_sum(model, ids, labels, **inputs)
                model.set_gradient_accumulation_boundary(sync)
                model.backward(loss_sum * scale, scale_wrt_gas=False)
                if sync:
                    model.step()  # clips with the config's gradient_clipping, then the optimizer step
            else:
                with nullcontext() if sync else accelerator.no_sync(model):
                    with accelerator.autocast():
                        loss_sum = token_loss_sum(model, ids, labels, **inputs)
                    accelerator.backward(loss_sum * scale)
            local_loss += loss_sum.detach()
            local_tokens += ids.numel()
        comm.average_gradients(params)  # no-op unless accelerate could not set up DDP itself
        kill_point("step", step)  # test-only: SIGKILL with the gradients computed, the update not applied
        if deepspeed:
            grad_norm = model.get_global_grad_norm()
            grad_norm = float("nan") if grad_norm is None else grad_norm
        elif cfg.train.max_grad_norm is not None:
            grad_norm = accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm)
        else:
            grad_norm = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in params if p.grad is not None])
            )
        grad_norm = float(grad_norm)
        stats = comm.sum(torch.tensor([local_loss.item(), float(local_tokens)], device=device))
        step_loss = stats[0].item() / max(global_targets, 1)
        if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
            if cfg.train.mixed_precision == "fp16":
                # skipped and counted. A loss scaler (fp16 on a GPU) must see the overflow: its step skips
                # the update and lowers the scale. Without one (accelerate has none on a CPU; DeepSpeed
                # scales inside model.step()) a step would apply the non-finite gradients: drop them.
                if accelerator.scaler is not None:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                log.write({"step": step, "skipped_nonfinite_steps": skipped})
                if step % cfg.train.save_steps == 0 or step == cfg.train.max_steps:
                    # the checkpoint schedule holds whether or not this step updated (else a skipped last
                    # step would leave the run without its final checkpoint)
                    try:
                        last_checkpoint = save(step)
                    except CheckpointError as err:
                        raise TrainingError(str(err)) from None
                where.step, where.checkpoint = step, last_checkpoint
                continue
            last = latest_checkpoint(out)
            raise TrainingError(
                f"step {step}: non-finite {'loss' if not math.isfinite(step_loss) else 'gradient norm'} "
                f"(loss={step_loss}, grad_norm={grad_norm}); last good checkpoint: {last or 'none'}"
            )
        if not deepspeed:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        scheduler.step()

        window_loss += step_loss
        window_steps += 1
        window_tokens += int(stats[1].item())
        window_samples += bs * world * len(batches)
        train_loss = step_loss
        if progress is not None:
            progress.update(1)
            # tokens/s is the last logging window's (a single step's timing jitters too much to read)
            shown.update(loss=f"{step_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", grad_norm=f"{grad_norm:.3f}")
            progress.set_postfix(shown)
        if step % cfg.train.logging_steps == 0 or step == cfg.train.max_steps:
            elapsed = time.perf_counter() - window_start
            tokens_per_s = window_tokens / elapsed
            seq = window_tokens / max(window_samples, 1)
            achieved = model_train_flops_per_token(raw, int(round(seq))) * tokens_per_s
            record = {
                "step": step,
                "loss": window_loss / window_steps,
                "learning_rate": scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "tokens_per_s": tokens_per_s,
                "samples_per_s": window_samples / elapsed,
                "peak_memory_mib": peak_memory_mib(device),
                "matmul_peak_fraction": achieved / peak,
                "skipped_nonfinite_steps": skipped,
            }
            log.write(record)
            if trackers is not None and main:
                trackers.log(record, step)
            if progress is not None:
                shown["tokens_per_s"] = f"{tokens_per_s:,.0f}"
                progress.set_postfix(shown)
            window_loss, window_steps, window_tokens, window_samples = 0.0, 0, 0, 0
            window_start = time.perf_counter()
        if cfg.train.eval_steps and step % cfg.train.eval_steps == 0 and step != cfg.train.max_steps:
            eval_loss = evaluate_loss()
            if eval_loss is not None:
                log.write({"step": step, "eval_loss": eval_loss})
                if trackers is not None and main:
                    trackers.log({"eval_loss": eval_loss}, step)
                if progress is not None:
                    progress.write(f"step {step}: eval loss {eval_loss:.4f}")
        if step % cfg.train.save_steps == 0 or step == cfg.train.max_steps:
            try:
                last_checkpoint = save(step)
            except CheckpointError as err:
                raise TrainingError(str(err)) from None
            kill_point("saved", step)  # test-only: SIGKILL right after a checkpoint
        where.step, where.checkpoint = step, last_checkpoint
    if progress is not None:
        progress.close()

    eval_loss = evaluate_loss()
    metrics: dict = {}
    if eval_loss is not None:
        log.write({"step": step, "eval_loss": eval_loss})
    if cfg.train.eval_generation and cfg.data.validation_file:
        from ..evaluation.run import evaluate_model

        metrics = evaluate_model(raw, template, cfg.data, cfg.train, comm, examples=gen_examples)
        log.write({"step": step, **{f"eval_{k}": v for k, v in metrics.items()}})
    if trackers is not None and main:
        trackers.log({"eval_loss": eval_loss, **{f"eval_{k}": v for k, v in metrics.items()}}, step)
    if main:
        if cfg.train.plot:
            from .plot import plot_losses

            plot_losses(log.records(), out / PLOT_FILE)
        if trackers is not None:
            trackers.finish()
    comm.barrier()
    return TrainResult(out, step, last_checkpoint, train_loss, eval_loss, metrics, baseline, main)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
