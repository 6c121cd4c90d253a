"""The training output folder's rules: what a run may write, remove and resume there.

A run's folder (``train.output_dir``) holds its record ``run_config.json`` (the configuration and the run's
id), its log ``train_log.jsonl``, its loss plot ``loss.png``, its ``checkpoint-N`` folders and the
evaluations of those (``eval-checkpoint-N``). A run never deletes or resumes from what it did not write:

* :func:`check_output_dir` refuses a folder that cannot hold a run, before anything is loaded;
* :func:`hold_run_folder` takes the folder for the run (an OS lock on ``.ptuning.lock``, released when the
  process ends however it ends), so that a second run started into it at the same moment is refused;
* :func:`resolve_resume` decides the checkpoint a run resumes from (None: a fresh run) and refuses a folder
  that holds outputs under a run's names unless the user said what to do with them;
* :func:`open_run_folder` is the first write: it makes the folder, removes the recorded run's outputs with
  ``train.overwrite=true`` (:func:`clear_previous_run`) and records the run;
* :class:`RunLog` appends to ``train_log.jsonl`` and, on resume, drops what came after the checkpoint.

A write that finds the disk full stops the run with one line naming the file and the last complete
checkpoint (:func:`write_failure`).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

try:
    import fcntl
except ImportError:  # not a POSIX system: runs are not locked (hold_run_folder says so)
    fcntl = None

from ..checkpoint import (
    CHECKPOINT_FILES,
    CHECKPOINT_RE,
    META_FILE,
    ORIGINAL_FILE,
    PREFIX_FILE,
    RUN_FILE,
    STATE_FILE,
    checkpoint_run_id,
    folder_run_id,
    foreign_files,
    latest_checkpoint,
    list_checkpoints,
    no_space_message,
    not_our_checkpoint,
    run_checkpoints,
)
from ..config import TrainJobConfig
from ..evaluation.run import EVAL_FILES, evaluation_run_id
from ..weights import BIN_INDEX, SAFE_INDEX, SAFE_SINGLE, is_disk_full
from .errors import TrainingError

LOG_FILE = "train_log.jsonl"
PLOT_FILE = "loss.png"
LOCK_FILE = ".ptuning.lock"  # the OS lock of the run that holds the folder, and who that run is
# the files of a run in its output folder, beside its checkpoint-N folders
RUN_OUTPUT_FILES = (LOG_FILE, PLOT_FILE, RUN_FILE)
# settings that shape the updates: resuming with another value gives another result than the run it continues
RESUME_KEYS = ("train.per_device_batch_size", "train.gradient_accumulation_steps", "train.learning_rate",
               "train.weight_decay", "train.lr_scheduler", "train.warmup_steps", "train.max_grad_norm", "train.seed",
               "data.train_file", "data.max_train_samples", "data.packing", "data.pack_length")


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


# ---- the lock: one run per folder ----


@dataclass
class FolderLock:
    """The run's hold on its output folder (:func:`hold_run_folder`).

    Attributes:
        path: the lock file ``<output_dir>/.ptuning.lock``.
        fd: its descriptor, which holds the lock (None: the file system has no locks).
        made: the folders made to hold it, outermost first (removed again, when empty, if the run wrote nothing).
    """

    path: Path
    fd: int | None
    made: list[Path] = field(default_factory=list)

    def release(self, wrote: bool) -> None:
        """Lets go of the folder: removes the lock file and, when the run wrote nothing there (``wrote``
        false: it stopped before its first write), the folders it made for it that are empty now."""
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still held: a run that opens it next makes a new one
            for folder in reversed(self.made if not wrote else []):
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
        except OSError:
            pass  # the lock goes with the descriptor; a file left behind does not hold the folder
        finally:
            os.close(self.fd)
            self.fd = None


def hold_run_folder(out: Path) -> FolderLock:
    """Takes ``out`` for this run: makes it (when it does not exist) and takes an exclusive OS lock
    (``flock``) on ``out/.ptuning.lock``, recording there who holds it (pid, host, start time, command). The
    OS releases the lock when the process ends, however it ends, so a killed run never blocks a restart.

    Raises:
        TrainingError: another process holds the folder (the line names it), or the folder cannot be made.
    """
    made = [p for p in reversed([Path(os.path.abspath(out)), *Path(os.path.abspath(out)).parents]) if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TrainingError(f"train.output_dir={out}: cannot be created ({err.strerror or err})") from None
    path = out / LOCK_FILE
    if fcntl is None:
        print(f"warning: {out} cannot be locked on this system: nothing stops another run from writing into it "
              "at the same time", file=sys.stderr)
        return FolderLock(path, None, made)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise write_failure(path, out, err) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise TrainingError(
                f"train.output_dir={out} is in use by another run ({holder}); wait for it to end or stop it, or "
                "choose another train.output_dir"
            ) from None
        except OSError as err:  # a file system without locks (some network file systems)
            print(f"warning: {out} cannot be locked ({err.strerror or err}): nothing stops another run from "
                  "writing into it at the same time", file=sys.stderr)
            os.close(fd)
            return FolderLock(path, None, made)
        # the holder before us may have removed the file between our open and our lock: lock the file that is there
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(sys.argv)}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    except OSError:
        pass  # a full disk: the lock holds without the note (a refused run then cannot say who holds it)
    return FolderLock(path, fd, made)


def _holder(fd: int, longest: int = 300) -> str:
    """Who holds the lock, from what it recorded in the lock file."""
    try:
        record = json.loads(os.pread(fd, 65536, 0).decode("utf-8"))
        command = str(record["command"])
        if len(command) > longest:
            command = command[: longest - 3] + "..."
        return f"pid {record['pid']} on {record['host']}, started {record['started']}: {command}"
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return "it has not recorded who it is yet"


def write_failure(path: Path, out: Path, err: OSError) -> TrainingError:
    """The one-line error of a failed write of ``path`` in the run folder ``out``: a full disk names the last
    complete checkpoint and how to continue."""
    if is_disk_full(err):
        return TrainingError(no_space_message(path, latest_checkpoint(out)))
    return TrainingError(f"{path}: cannot write ({err.strerror or err})")


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
    recorded = folder_run_id(out)
    survey = FolderSurvey(recorded, [], [])
    for path in sorted(out.iterdir()) if out.is_dir() else []:
        why = _not_the_recorded_runs(path, recorded)
        if why is None:
            survey.ours.append(path)
        elif why:
            survey.others.append((path, why))
    return survey


def _not_the_recorded_runs(path: Path, recorded: str | None) -> str | None:
    """Why ``path``, named like a run's output, is not an output of run ``recorded``; None when it is one, ""
    when its name is none of a run's."""
    name = path.name
    if name in RUN_OUTPUT_FILES:
        if not path.is_file():
            return "not a file"
        if recorded is None:  # a log or plot without a record, or a record without a run id: no run's
            return f"no run recorded it (no run id in {RUN_FILE})" if name == RUN_FILE else "no run recorded it"
        return None
    if CHECKPOINT_RE.match(name):
        return not_our_checkpoint(path, recorded)
    if name.startswith(".tmp-") and CHECKPOINT_RE.match(name[len(".tmp-"):]):
        # an interrupted checkpoint write: checkpoint files only, of the recorded run (or not yet saying)
        ok = (path.is_dir() and recorded is not None and not foreign_files(path, CHECKPOINT_FILES)
              and checkpoint_run_id(path) in (None, recorded))
        return None if ok else "not an unfinished checkpoint of the run recorded here"
    if name.startswith("eval-") and CHECKPOINT_RE.match(name[len("eval-"):]):
        ok = path.is_dir() and recorded is not None and evaluation_run_id(path) == recorded
        return None if ok else "not an evaluation of the run recorded here"
    return ""


def _describe(others: list[tuple[Path, str]]) -> str:
    return ", ".join(f"{path.name} ({why})" for path, why in others)


def _names(paths: list[Path]) -> str:
    return ", ".join(p.name for p in paths)


def resolve_resume(cfg: TrainJobConfig) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run.

    A fresh run refuses a folder that holds outputs under a run's names unless ``train.overwrite=true``
    (which removes only the recorded run's own outputs, see :func:`clear_previous_run`). With
    ``train.resume_from=auto`` it is the latest checkpoint of the folder's recorded run, or a fresh run where
    there is none: in a folder without a run's outputs, or one that holds only the record of a run stopped
    before its first checkpoint (which the run then replaces, see :func:`open_run_folder`). Any run refuses to
    start when a checkpoint it would save would replace a folder it did not write.

    Raises:
        TrainingError: one line saying what is in the way and what to do.
    """
    out = Path(cfg.train.output_dir)
    resume = cfg.train.resume_from
    if resume == "auto":
        # only the recorded run's own checkpoints resume without being named: in a folder that records no run,
        # a checkpoint (copied in from another run, or a folder a user made) stops it as it stops a fresh run
        if folder_run_id(out) is None or latest_checkpoint(out) is None:
            _check_fresh_run(cfg, out)
            return None
        resume = "latest"
    if resume is None:
        _check_fresh_run(cfg, out)
        return None
    path = _latest_to_resume(out) if resume == "latest" else _checkpoint_to_resume(out, resume)
    named = CHECKPOINT_RE.match(path.name)
    at = int(named.group(1)) if named else 0
    if at > cfg.train.max_steps:
        raise past_the_end(path, at, cfg)
    # its log and record go where no run's files of those names are
    _check_run_files(cfg, survey_output_dir(out).others)
    # the checkpoints it saves replace only the same run's (a re-save after a crash); anything else is in the way
    run_id = checkpoint_run_id(path)
    _check_save_targets(cfg, [(p, why) for p in list_checkpoints(out)
                              if (why := not_our_checkpoint(p, run_id) or _extra_files(p)) is not None],
                        start=at)
    return path


def only_a_run_record(survey: FolderSurvey) -> bool:
    """Whether the folder's run outputs are only the record of a run without a checkpoint (one stopped before
    its first): its ``run_config.json`` naming the run (the first file a run writes), its log and plot, its
    unfinished checkpoint writes (``.tmp-checkpoint-N``), and nothing else under a run's names."""
    return (survey.run_id is not None and not survey.others
            and all(p.name in RUN_OUTPUT_FILES or p.name.startswith(".tmp-") for p in survey.ours))


def _check_fresh_run(cfg: TrainJobConfig, out: Path) -> None:
    """A fresh run starts in a folder without outputs under a run's names, or with ``train.overwrite=true``
    where the checkpoints it saves replace none of the folders that stay, or with ``train.resume_from=auto``
    over the record of a run stopped before its first checkpoint."""
    survey = survey_output_dir(out)
    _check_run_files(cfg, survey.others)
    auto = cfg.train.resume_from == "auto"
    if (survey.ours or survey.others) and not cfg.train.overwrite and not (auto and only_a_run_record(survey)):
        raise _refusal(out, survey, auto)
    # with overwrite the recorded run's checkpoints go; a checkpoint folder that stays must not be in the way
    leftover = [(p, why) for p, why in survey.others]
    leftover += [(p, "it holds files a checkpoint does not: " + ", ".join(foreign_files(p, CHECKPOINT_FILES)))
                 for p in survey.ours if p.is_dir() and CHECKPOINT_RE.match(p.name)
                 and foreign_files(p, CHECKPOINT_FILES)]
    _check_save_targets(cfg, leftover, start=0)


def _check_run_files(cfg: TrainJobConfig, others: list[tuple[Path, str]]) -> None:
    """Refuses a run that would write its log, plot or record (:data:`RUN_OUTPUT_FILES`) over a file of that
    name that no run recorded here (``others`` of :func:`survey_output_dir`): a run never replaces it."""
    for path, why in others:
        if path.name in RUN_OUTPUT_FILES:
            raise TrainingError(
                f"train.output_dir={cfg.train.output_dir}: this run writes {path.name}, but {path} is already there "
                f"({why}) and a run replaces only its own files: move it, or choose another train.output_dir"
            )


def _refusal(out: Path, survey: FolderSurvey, auto: bool) -> TrainingError:
    """Why a fresh run does not start over what ``out`` holds, and the ways on."""
    parts = []
    if survey.ours:
        parts.append(f"an earlier run's outputs ({_names(survey.ours)})")
    if survey.others:
        parts.append(f"{_describe(survey.others)}, which no run here wrote")
    options = []
    latest = latest_checkpoint(out)
    if latest is not None and all((latest / name).is_file() for name in (PREFIX_FILE, STATE_FILE)):
        if survey.run_id is None:  # no run recorded it: resuming it is the user's choice, said by its path
            options.append(f"resume {latest.name} on purpose with train.resume_from={latest}")
        else:
            options.append("resume with train.resume_from=latest")
    elif not auto and only_a_run_record(survey):
        options.append("start that run over with train.resume_from=auto (it has no checkpoint)")
    options.append("choose another train.output_dir")
    instead = " instead of train.resume_from=auto" if auto else ""
    if survey.ours and survey.others:
        options.append(f"set train.overwrite=true{instead} to remove the earlier run's outputs and start over "
                       f"(it keeps {_names([p for p, _ in survey.others])})")
    elif survey.ours:
        options.append(f"set train.overwrite=true{instead} to remove them and start over")
    else:
        options.append(f"set train.overwrite=true{instead} to start a new run beside them (they are kept)")
    start = f"train.resume_from=auto: {out} holds no checkpoint of a run to resume, and" if auto else f"{out} already"
    return TrainingError(f"{start} holds {' and '.join(parts)}: {', '.join(options[:-1])}, or {options[-1]}")


def _latest_to_resume(out: Path) -> Path:
    """``train.resume_from=latest``: the newest checkpoint of the run that ``out`` records."""
    found = latest_checkpoint(out)
    if found is None and list_checkpoints(out):
        raise TrainingError(
            f"train.resume_from=latest: the checkpoints in {out} ({_names(list_checkpoints(out))}) were not "
            f"written by the run its {RUN_FILE} records; resume one on purpose with train.resume_from=<folder>"
        )
    if found is None:
        raise TrainingError(f"train.resume_from=latest: {out} holds no checkpoint-N folder to resume (train.resume_from="
                            "auto starts the run over where there is none)")
    if not (found / PREFIX_FILE).is_file() and not (found / ORIGINAL_FILE).is_file():
        raise TrainingError(f"train.resume_from=latest: {found} is not a checkpoint (no {PREFIX_FILE}): move it away, "
                            "or resume a checkpoint on purpose with train.resume_from=<folder>")
    return found


def _checkpoint_to_resume(out: Path, resume: str) -> Path:
    """``train.resume_from=<folder>``: a checkpoint folder of ours, whose run does not collide with the one
    that ``out`` records."""
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


def past_the_end(path: Path, step: int, cfg: TrainJobConfig) -> TrainingError:
    """The error for a checkpoint at ``step`` beyond ``train.max_steps``: nothing to train."""
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


def update_settings(cfg: TrainJobConfig) -> dict:
    """The values of :data:`RESUME_KEYS` (``{"train.learning_rate": 0.02, ...}``) that each checkpoint records
    in its ``prefix_config.json`` (``update_settings``), for :func:`warn_changed_settings` when it is resumed."""
    return {key: str(value) if isinstance(value, Path) else value
            for key, value in _resume_settings(asdict(cfg)).items()}


def _resume_settings(sections: dict) -> dict:
    """The values of :data:`RESUME_KEYS` that ``sections`` (a config as nested dicts) holds, by dotted key."""
    settings = {}
    for key in RESUME_KEYS:
        section, name = key.split(".")
        if isinstance(sections.get(section), dict) and name in sections[section]:
            settings[key] = sections[section][name]
    return settings


def _writer_settings(resume: Path) -> tuple[dict, Path] | None:
    """What the run that wrote ``resume`` used, and the file that says so: the checkpoint's own record
    (``update_settings`` in its ``prefix_config.json``), else (a checkpoint of an earlier version) the folder's
    ``run_config.json`` when it records the checkpoint's run; None when neither says."""
    meta_file = resume / META_FILE
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        meta = None
    if isinstance(meta, dict) and isinstance(meta.get("update_settings"), dict):
        return meta["update_settings"], meta_file
    try:
        record = json.loads((resume.parent / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    written_by = meta.get("run_id") if isinstance(meta, dict) else None  # the checkpoint's run, read above
    if not isinstance(record, dict) or record.get("run_id") != written_by:
        return None
    return _resume_settings(record), resume.parent / RUN_FILE


def warn_changed_settings(cfg: TrainJobConfig, resume: Path) -> str | None:
    """The warning when a resumed run's settings that shape the updates (:data:`RESUME_KEYS`) differ from those
    of the run that wrote ``resume`` (see :func:`_writer_settings`), else None. ``data.pack_length`` counts
    only when either run packs."""
    found = _writer_settings(resume)
    if found is None:
        return None
    before_all, source = found
    now = update_settings(cfg)
    packed = bool(before_all.get("data.packing")) or bool(now["data.packing"])
    changed = []
    for key in RESUME_KEYS:
        if key not in before_all or (key == "data.pack_length" and not packed):
            continue
        before, after = before_all[key], now[key]
        if key == "data.train_file" and before is not None and after is not None:
            same = str(before) == str(after) or _same_file(before, after)
        else:
            same = before == after
        if not same:
            changed.append(f"{key} ({before} -> {after})")
    if not changed:
        return None
    return (f"warning: resuming {resume} with {', '.join(changed)} changed from the run that wrote it "
            f"({source}): the result will differ from an uninterrupted run")


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(Path(a).expanduser(), Path(b).expanduser())
    except OSError:
        return False


def clear_previous_run(out: Path) -> tuple[list[str], list[str]]:
    """``train.overwrite=true``: removes the outputs of the run that ``out`` records (see
    :func:`survey_output_dir`): the files its checkpoints and evaluations consist of (then each folder, when
    nothing else is left in it), its log, loss plot and run record.

    Returns:
        ``(removed, kept)``: names removed, and what stays that a run here did not write (named with why, and
        ``checkpoint-3/notes.txt`` for a file a user put inside a removed checkpoint).
    """
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
    """``train_log.jsonl`` (main process only): one JSON object per log or eval step.

    A write that fails (a full disk) stops the run at once (:func:`write_failure`); with ``defer`` the error is
    kept and raised by :meth:`raise_failure` instead, at a point where every process of the run stops together,
    and nothing more is written to the log meanwhile.
    """

    def __init__(self, path: Path, enabled: bool, keep_until_step: int | None, end_step: int | None = None,
                 defer: bool = False):
        self.path, self.enabled, self.defer = path, enabled, defer
        self.failure: TrainingError | None = None
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
            _write_atomic(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if not self.enabled or self.failure is not None:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        except OSError as err:
            self.failure = write_failure(self.path, self.path.parent, err)
            if not self.defer:
                raise self.failure from None

    def raise_failure(self) -> None:
        """Raises the error of a write that failed (with ``defer``), if one did."""
        if self.failure is not None:
            raise self.failure

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def _write_atomic(path: Path, text: str) -> None:
    """``path`` with ``text``, written beside it and renamed: a kill or a full disk leaves the old file whole.

    Raises:
        TrainingError: the write failed (:func:`write_failure`).
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise write_failure(path, path.parent, err) from None


def open_run_folder(cfg: TrainJobConfig, run_id: str, resume: Path | None, step: int, trackers,
                    main: bool, defer_failures: bool = False) -> RunLog:
    """The run's first writes, once everything is checked (main process only; the others get a disabled log):
    makes ``train.output_dir``, starts the tracker, removes the recorded run's outputs when
    ``train.overwrite=true`` starts a fresh run (or the record of a run stopped before its first checkpoint
    when ``train.resume_from=auto`` starts over), and records this run in ``run_config.json``.

    Args:
        run_id: this run's id (a resumed run keeps the id of the run it continues).
        resume: the checkpoint it resumes from (None: a fresh run).
        step: the step it starts after (the log keeps what was logged up to it).
        trackers: a :class:`~ptuning.training.tracking.WandbTracker` or None.
        defer_failures: see :class:`RunLog` (a run of several processes).

    Returns:
        The run's log.

    Raises:
        TrainingError: the folder cannot be made or written, or the tracker did not start (a folder made for
            the run is removed again).
    """
    out = Path(cfg.train.output_dir)
    if main:
        _make_folder(cfg, out, trackers)
        _clear_for_a_fresh_run(cfg, out, resume)
    log = RunLog(out / LOG_FILE, main, keep_until_step=step if resume is not None else None,
                 end_step=cfg.train.max_steps, defer=defer_failures)
    if main and (resume is None or folder_run_id(out) != run_id):
        # the record first: a folder with a log but no record was not written by a run
        _write_atomic(out / RUN_FILE,
                      json.dumps({"run_id": run_id, **asdict(cfg)}, indent=2, ensure_ascii=False, default=str) + "\n")
        if resume is None:
            _write_atomic(out / LOG_FILE, "")
    return log


def _clear_for_a_fresh_run(cfg: TrainJobConfig, out: Path, resume: Path | None) -> None:
    """A fresh run's removals, said in one line each: the recorded run's outputs (``train.overwrite=true``),
    or the record of a run stopped before its first checkpoint (``train.resume_from=auto``)."""
    if resume is not None or not (cfg.train.overwrite or cfg.train.resume_from == "auto"):
        return
    removed, kept = clear_previous_run(out)
    if cfg.train.overwrite:
        if removed:
            print(f"train.overwrite=true: removed the previous run's {', '.join(removed)} from {out}")
        if kept:
            print(f"train.overwrite=true: kept what a run here did not write in {out}: {', '.join(kept)}")
    elif removed:
        print(f"train.resume_from=auto: {out} holds no checkpoint to resume; starting the run over (replacing the "
              f"record of the run that has none: {', '.join(removed)})")


def _make_folder(cfg: TrainJobConfig, out: Path, trackers) -> None:
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise TrainingError(f"train.output_dir={out}: cannot be created ({err.strerror or err})") from None
    if trackers is not None:
        before = set(out.iterdir())
        try:
            trackers.start(asdict(cfg), out)
        except Exception as err:  # noqa: BLE001 - the tracker's own failure (network, login), one line
            for path in set(out.iterdir()) - before:  # what the tracker made (its wandb/ folder)
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
            if created:
                shutil.rmtree(out, ignore_errors=True)
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise TrainingError(f"logger.backend={cfg.logger.backend}: the tracker did not start ({reason})") from None
