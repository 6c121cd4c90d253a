"""The training output folder's rules on their own: no model, no data, folders made by hand.

The end-to-end runs over the same rules are in tests/test_training.py and tests/test_reliability.py.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ptuning.config import ConfigError, TrainJobConfig
from ptuning.training import TrainingError
from ptuning.training.run_folder import (
    LOCK_FILE,
    LOG_FILE,
    RunLog,
    check_output_dir,
    check_resumable,
    clear_previous_run,
    hold_run_folder,
    open_run_folder,
    resolve_resume,
    survey_output_dir,
    update_settings,
    warn_changed_settings,
)


def job(out, **train) -> TrainJobConfig:
    cfg = TrainJobConfig()
    cfg.train.output_dir = str(out)
    cfg.train.max_steps, cfg.train.save_steps = 6, 3
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def checkpoint(folder, step: int, run_id: str | None, *, state: bool = True):
    """A checkpoint folder as a run writes it (the files' contents do not matter to the folder rules)."""
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "prefix.safetensors").write_bytes(b"prefix")
    (path / "prefix_config.json").write_text(json.dumps({} if run_id is None else {"run_id": run_id}))
    if state:
        (path / "training_state.pt").write_bytes(b"state")
    return path


def record_run(folder, run_id: str, **sections) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "run_config.json").write_text(json.dumps({"run_id": run_id, **sections}))


def evaluation(folder, name: str, run_id: str | None):
    path = folder / name
    path.mkdir(parents=True)
    (path / "metrics.json").write_text(json.dumps({"run_id": run_id}))
    (path / "generated_predictions.jsonl").write_text("")
    return path


# ---- check_output_dir ----


def test_an_output_dir_that_is_a_file_a_model_or_a_checkpoint_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(TrainingError, match=r"^train.output_dir=.*file: exists and is not a folder$"):
        check_output_dir(tmp_path / "file")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    with pytest.raises(TrainingError, match=r"it is a model folder \(config.json \+ weights\)"):
        check_output_dir(model)
    ckpt = checkpoint(tmp_path, 3, "a")
    with pytest.raises(TrainingError, match=r"it is a checkpoint folder; choose another folder$"):
        check_output_dir(ckpt)
    with pytest.raises(TrainingError, match=rf"it is inside the checkpoint folder {ckpt}; choose another folder$"):
        check_output_dir(ckpt / "run")


def test_an_output_dir_that_would_be_made_is_only_probed(tmp_path):
    check_output_dir(tmp_path / "a" / "b")
    assert sorted(tmp_path.iterdir()) == []  # the probe is gone and nothing was made
    (tmp_path / "blocker").write_text("x")
    with pytest.raises(TrainingError, match=r"cannot be created: .*blocker is not a folder$"):
        check_output_dir(tmp_path / "blocker" / "run")


# ---- one run per folder ----

HOLD = """
import sys
from pathlib import Path
from ptuning.training.run_folder import hold_run_folder
lock = hold_run_folder(Path(sys.argv[1]))
print("held", flush=True)
sys.stdin.read()  # until the test closes it, or kills this process
lock.release(wrote=True)
"""


def holder(folder):
    """Another process that holds ``folder`` as a run does (``python -c HOLD <folder>``)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), "--some", "arguments"], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_folder_held_by_a_running_process_refuses_another_run_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    proc = holder(out)
    try:
        with pytest.raises(TrainingError) as refused:
            hold_run_folder(out)
        assert re.fullmatch(
            rf"train.output_dir={out} is in use by another run \(pid {proc.pid} on {re.escape(socket.gethostname())}, "
            rf"started \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d: -c {out} --some arguments\); wait for it to end or stop "
            r"it, or choose another train.output_dir", str(refused.value)), str(refused.value)
        # what overwrite and the folder rules see: the lock file is no run output, and stays
        record_run(out, "run1")
        assert survey_output_dir(out).ours == [out / "run_config.json"]
        clear_previous_run(out)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
    finally:
        proc.kill()
        proc.wait()
    # a killed holder never blocks the next run: the OS released its lock (its file stays until then)
    assert (out / LOCK_FILE).is_file()
    lock = hold_run_folder(out)
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release(wrote=True)
    assert sorted(p.name for p in out.iterdir()) == []
    proc = holder(out)  # and the folder is free again once a run ends
    proc.communicate("")
    assert proc.returncode == 0
    hold_run_folder(out).release(wrote=True)


def test_a_run_that_stops_before_writing_removes_the_folders_it_made_to_hold_its_own(tmp_path):
    out = tmp_path / "a" / "b" / "run"
    lock = hold_run_folder(out)
    assert out.is_dir() and (out / LOCK_FILE).is_file()
    lock.release(wrote=False)
    assert sorted(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    lock = hold_run_folder(tmp_path / "kept")
    lock.release(wrote=False)
    assert sorted(tmp_path.iterdir()) == [tmp_path / "kept"]  # it was there before: only the lock file goes


# ---- what a folder holds ----


def test_the_survey_tells_the_recorded_runs_outputs_from_everything_else(tmp_path):
    record_run(tmp_path, "run1")
    (tmp_path / LOG_FILE).write_text("")
    mine = checkpoint(tmp_path, 3, "run1")
    other = checkpoint(tmp_path, 6, "run2")
    (tmp_path / "checkpoint-9").mkdir()  # a user's folder under a checkpoint's name
    unfinished = checkpoint(tmp_path, 12, "run1", state=False).rename(tmp_path / ".tmp-checkpoint-12")
    scored = evaluation(tmp_path, "eval-checkpoint-3", "run1")
    foreign = evaluation(tmp_path, "eval-checkpoint-6", "run2")
    (tmp_path / "notes.txt").write_text("not a run's name: not surveyed")
    survey = survey_output_dir(tmp_path)
    assert survey.run_id == "run1"
    assert survey.ours == sorted([tmp_path / "run_config.json", tmp_path / LOG_FILE, mine, unfinished, scored])
    assert survey.others == [
        (other, "written by run run2; run_config.json records run run1"),
        (tmp_path / "checkpoint-9", "not a checkpoint: no prefix.safetensors"),
        (foreign, "not an evaluation of the run recorded here"),
    ]


def test_overwrite_removes_only_the_recorded_runs_files_and_names_what_stays(tmp_path):
    record_run(tmp_path, "run1")
    (tmp_path / LOG_FILE).write_text("")
    mine = checkpoint(tmp_path, 3, "run1")
    (mine / "notes.txt").write_text("the user's")
    gone = checkpoint(tmp_path, 6, "run1")
    other = checkpoint(tmp_path, 9, "run2")
    evaluation(tmp_path, "eval-checkpoint-6", "run1")
    removed, kept = clear_previous_run(tmp_path)
    assert removed == ["checkpoint-3's checkpoint files", "checkpoint-6", "eval-checkpoint-6", "run_config.json",
                       "train_log.jsonl"]
    assert kept == ["checkpoint-9 (written by run run2; run_config.json records run run1)", "checkpoint-3/notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-9"]
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and not gone.exists()
    assert sorted(p.name for p in other.iterdir()) == ["prefix.safetensors", "prefix_config.json",
                                                       "training_state.pt"]


def test_a_log_no_run_recorded_is_never_removed_and_stops_the_run_naming_it(tmp_path):
    (tmp_path / LOG_FILE).write_text('{"my": "log"}\n')  # the user's file: no run_config.json records a run
    (tmp_path / "run_config.json").write_text('{"my": "settings"}')
    survey = survey_output_dir(tmp_path)
    assert survey.ours == [] and survey.others == [
        (tmp_path / "run_config.json", "no run recorded it (no run id in run_config.json)"),
        (tmp_path / LOG_FILE, "no run recorded it")]
    assert clear_previous_run(tmp_path) == ([], ["run_config.json (no run recorded it (no run id in run_config.json))",
                                                 "train_log.jsonl (no run recorded it)"])
    (tmp_path / "run_config.json").unlink()
    for how in ({}, {"overwrite": True}, {"resume_from": "auto"}):
        with pytest.raises(TrainingError) as refused:
            resolve_resume(job(tmp_path, **how))
        assert str(refused.value) == (
            f"train.output_dir={tmp_path}: this run writes train_log.jsonl, but {tmp_path / LOG_FILE} is already "
            "there (no run recorded it) and a run replaces only its own files: move it, or choose another "
            "train.output_dir")
    # resuming a checkpoint into that folder would rewrite the log too
    elsewhere = checkpoint(tmp_path / "run", 3, "run1")
    with pytest.raises(TrainingError, match=r"this run writes train_log.jsonl, but .* \(no run recorded it\)"):
        resolve_resume(job(tmp_path, resume_from=str(elsewhere)))
    assert (tmp_path / LOG_FILE).read_text() == '{"my": "log"}\n'


# ---- which checkpoint a run resumes from ----


def test_a_fresh_run_starts_in_an_empty_folder_and_refuses_an_earlier_runs_outputs(tmp_path):
    assert resolve_resume(job(tmp_path / "new")) is None
    record_run(tmp_path, "run1")
    checkpoint(tmp_path, 3, "run1")
    with pytest.raises(TrainingError) as refused:
        resolve_resume(job(tmp_path))
    assert str(refused.value) == (
        f"{tmp_path} already holds an earlier run's outputs (checkpoint-3, run_config.json): resume with "
        "train.resume_from=latest, choose another train.output_dir, or set train.overwrite=true to remove them "
        "and start over")
    assert resolve_resume(job(tmp_path, overwrite=True)) is None


def test_overwrite_is_refused_when_a_checkpoint_it_would_save_is_someone_elses(tmp_path):
    record_run(tmp_path, "run1")
    checkpoint(tmp_path, 3, "run1")
    theirs = checkpoint(tmp_path, 6, "run2")
    with pytest.raises(TrainingError) as refused:
        resolve_resume(job(tmp_path, overwrite=True))
    assert str(refused.value) == (
        f"train.output_dir={tmp_path}: this run would save checkpoint-6, but {theirs} is already there (written by "
        "run run2; run_config.json records run run1) and a run replaces only its own checkpoints: move it, or "
        "choose another train.output_dir")
    assert resolve_resume(job(tmp_path, overwrite=True, max_steps=5)) is None  # saves 3 and 5 only


def test_resume_latest_takes_the_recorded_runs_newest_checkpoint_only(tmp_path):
    record_run(tmp_path, "run1")
    checkpoint(tmp_path, 3, "run1")
    checkpoint(tmp_path, 4, "run2")
    assert resolve_resume(job(tmp_path, resume_from="latest", max_steps=3)) == tmp_path / "checkpoint-3"
    record_run(tmp_path, "gone")
    with pytest.raises(TrainingError, match=r"the checkpoints in .* \(checkpoint-3, checkpoint-4\) were not written "
                                            r"by the run its run_config.json records"):
        resolve_resume(job(tmp_path, resume_from="latest"))
    with pytest.raises(TrainingError, match=r"^train.resume_from=latest: .*empty holds no checkpoint-N folder to "
                                            r"resume \(train.resume_from=auto starts the run over where there is none\)$"):
        resolve_resume(job(tmp_path / "empty", resume_from="latest"))


def test_resume_auto_takes_the_latest_checkpoint_or_starts_over_a_run_stopped_before_its_first(tmp_path, capsys):
    auto = {"resume_from": "auto"}
    assert resolve_resume(job(tmp_path / "new", **auto)) is None  # nothing there: a fresh run
    # only the record of a run killed before its first checkpoint (in the middle of writing it): a fresh run,
    # which replaces that record and nothing else
    out = tmp_path / "killed"
    record_run(out, "run1")
    (out / LOG_FILE).write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    checkpoint(out, 3, "run1").rename(out / ".tmp-checkpoint-3")
    (out / "wandb").mkdir()
    (out / "notes.txt").write_text("the user's")
    with pytest.raises(TrainingError) as refused:  # a fresh run without auto says how to start it again
        resolve_resume(job(out))
    assert str(refused.value) == (
        f"{out} already holds an earlier run's outputs (.tmp-checkpoint-3, run_config.json, train_log.jsonl): start "
        "that run over with train.resume_from=auto (it has no checkpoint), choose another "
        "train.output_dir, or set train.overwrite=true to remove them and start over")
    assert resolve_resume(job(out, **auto)) is None
    open_run_folder(job(out, **auto), "run2", None, 0, None, main=True)
    assert capsys.readouterr().out == (
        f"train.resume_from=auto: {out} holds no checkpoint to resume; starting the run over (replacing the record "
        "of the run that has none: .tmp-checkpoint-3, run_config.json, train_log.jsonl)\n")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "run_config.json", "train_log.jsonl", "wandb"]
    assert json.loads((out / "run_config.json").read_text())["run_id"] == "run2"
    assert (out / LOG_FILE).read_text() == ""
    # once it has a checkpoint, the same command resumes it
    checkpoint(out, 3, "run2")
    checkpoint(out, 6, "run2")
    assert resolve_resume(job(out, **auto)) == out / "checkpoint-6"
    # a folder with outputs no run here wrote, or another run's evaluations, is no run to start over
    theirs = tmp_path / "theirs"
    record_run(theirs, "run1")
    checkpoint(theirs, 3, "run2")
    with pytest.raises(TrainingError) as refused:
        resolve_resume(job(theirs, **auto))
    assert str(refused.value) == (
        f"train.resume_from=auto: {theirs} holds no checkpoint of a run to resume, and holds an earlier run's outputs "
        "(run_config.json) and checkpoint-3 (written by run run2; run_config.json records run run1), which no run "
        "here wrote: choose another train.output_dir, or set train.overwrite=true instead of train.resume_from=auto "
        "to remove the earlier run's outputs and start over (it keeps checkpoint-3)")
    scored = tmp_path / "scored"
    record_run(scored, "run1")
    evaluation(scored, "eval-checkpoint-3", "run1")
    with pytest.raises(TrainingError, match=r"^train.resume_from=auto: .* holds no checkpoint of a run to resume, "
                                            r"and holds an earlier run's outputs \(eval-checkpoint-3, run_config.json\)"):
        resolve_resume(job(scored, **auto))
    with pytest.raises(ConfigError, match=r"train.resume_from=auto and train.overwrite=true contradict each other"):
        job(out, overwrite=True, **auto).validate()


def test_resume_auto_in_a_folder_that_records_no_run_resumes_nothing_it_finds_there(tmp_path):
    copied = tmp_path / "copied"  # a checkpoint copied in from another run, no run_config.json
    theirs = checkpoint(copied, 3, "run2")
    for how in ({"resume_from": "auto"}, {}):
        with pytest.raises(TrainingError) as refused:
            resolve_resume(job(copied, **how))
        start = (f"train.resume_from=auto: {copied} holds no checkpoint of a run to resume, and holds" if how
                 else f"{copied} already holds")
        instead = " instead of train.resume_from=auto" if how else ""
        assert str(refused.value) == (
            f"{start} checkpoint-3 (a checkpoint of run run2; the folder records no run (run_config.json)), which "
            f"no run here wrote: resume checkpoint-3 on purpose with train.resume_from={theirs}, choose another "
            f"train.output_dir, or set train.overwrite=true{instead} to start a new run beside them (they are kept)")
    made = tmp_path / "made"  # a folder a user made under a checkpoint's name: not called a checkpoint
    (made / "checkpoint-5").mkdir(parents=True)
    with pytest.raises(TrainingError, match=r"^train.resume_from=auto: .* holds checkpoint-5 \(not a checkpoint: no "
                                            r"prefix.safetensors\), which no run here wrote: choose another "):
        resolve_resume(job(made, resume_from="auto"))
    with pytest.raises(TrainingError) as refused:
        resolve_resume(job(made, resume_from="latest"))
    assert str(refused.value) == (
        f"train.resume_from=latest: {made / 'checkpoint-5'} is not a checkpoint (no prefix.safetensors): move it "
        "away, or resume a checkpoint on purpose with train.resume_from=<folder>")


def test_resume_from_a_folder_says_what_the_folder_is_instead(tmp_path):
    original = tmp_path / "original"
    original.mkdir()
    (original / "pytorch_model.bin").write_bytes(b"")
    run = tmp_path / "run"
    checkpoint(run, 3, "run1")
    cases = [
        (tmp_path / "missing", "no such checkpoint folder"),
        (original, "an original P-Tuning v2 checkpoint (pytorch_model.bin) holds no training state to resume; "
                   f"start from its prefix with train.init_prefix_from={original}"),
        (run, f"not a checkpoint (no prefix.safetensors); it is a training output folder: resume its latest with "
              f"train.output_dir={run} train.resume_from=latest"),
    ]
    for folder, why in cases:
        with pytest.raises(TrainingError) as refused:
            resolve_resume(job(tmp_path / "out", resume_from=str(folder)))
        assert why in str(refused.value)
    late = checkpoint(tmp_path / "late", 9, "run1")
    with pytest.raises(TrainingError, match=r"is at step 9, past train.max_steps=6: nothing to train"):
        resolve_resume(job(tmp_path / "late", resume_from=str(late)))


def test_resuming_needs_the_training_state(tmp_path):
    ckpt = checkpoint(tmp_path, 3, "run1", state=False)
    with pytest.raises(TrainingError, match=r"training_state.pt: missing; .* cannot be resumed"):
        check_resumable(ckpt)
    check_resumable(checkpoint(tmp_path, 6, "run1"))


def test_resuming_with_other_update_settings_warns_with_before_and_after(tmp_path):
    data = tmp_path / "train.json"
    data.write_text("")
    record_run(tmp_path, "run1", train={"learning_rate": 0.02, "seed": 42}, data={"train_file": str(data)})
    ckpt = checkpoint(tmp_path, 3, "run1")
    cfg = job(tmp_path, learning_rate=0.02, seed=42)
    cfg.data.train_file = str(tmp_path / "." / "train.json")  # the same file by another path
    assert warn_changed_settings(cfg, ckpt) is None
    cfg.train.learning_rate = 0.01
    assert warn_changed_settings(cfg, ckpt) == (
        f"warning: resuming {ckpt} with train.learning_rate (0.02 -> 0.01) changed from the run that wrote it "
        f"({tmp_path / 'run_config.json'}): the result will differ from an uninterrupted run")
    record_run(tmp_path, "another", train={"learning_rate": 0.02})
    assert warn_changed_settings(cfg, ckpt) is None  # the record is not of the checkpoint's run


def test_resuming_compares_with_the_settings_the_checkpoint_was_written_with_not_the_first_run(tmp_path):
    # the folder's record is of the first, packed run; checkpoint-8 was written by a resume without packing
    record_run(tmp_path, "run1", data={"packing": True, "pack_length": 128})
    first = job(tmp_path)
    first.data.packing, first.data.pack_length = True, 128
    packed = checkpoint(tmp_path, 4, "run1")
    (packed / "prefix_config.json").write_text(json.dumps({"run_id": "run1", "update_settings": update_settings(first)}))
    unpacked_cfg = job(tmp_path)
    unpacked = checkpoint(tmp_path, 8, "run1")
    (unpacked / "prefix_config.json").write_text(
        json.dumps({"run_id": "run1", "update_settings": update_settings(unpacked_cfg)}))
    assert warn_changed_settings(unpacked_cfg, unpacked) is None
    assert warn_changed_settings(unpacked_cfg, packed) == (
        f"warning: resuming {packed} with data.packing (True -> False), data.pack_length (128 -> 1024) changed from "
        f"the run that wrote it ({packed / 'prefix_config.json'}): the result will differ from an uninterrupted run")


def test_pack_length_is_no_change_when_neither_run_packs(tmp_path):
    record_run(tmp_path, "run1", data={"packing": False, "pack_length": 128})
    ckpt = checkpoint(tmp_path, 3, "run1")
    cfg = job(tmp_path)
    assert not cfg.data.packing and cfg.data.pack_length != 128
    assert warn_changed_settings(cfg, ckpt) is None
    cfg.data.packing = True
    assert "data.packing (False -> True), data.pack_length (128 -> " in warn_changed_settings(cfg, ckpt)


# ---- the first writes ----


def test_opening_the_folder_records_the_run_and_starts_an_empty_log(tmp_path):
    out = tmp_path / "a" / "run"
    log = open_run_folder(job(out), "run1", None, 0, None, main=True)
    assert json.loads((out / "run_config.json").read_text())["run_id"] == "run1"
    assert (out / LOG_FILE).read_text() == ""
    log.write({"step": 1, "loss": 2.0})
    assert log.records() == [{"step": 1, "loss": 2.0}]
    quiet = open_run_folder(job(tmp_path / "other"), "run1", None, 0, None, main=False)
    quiet.write({"step": 1})
    assert not (tmp_path / "other").exists()  # only the main process writes


def test_a_tracker_that_does_not_start_leaves_no_folder_behind(tmp_path):
    class Broken:
        def start(self, config, out):
            raise ConnectionError("wandb.ai: no route to host\nretrying...")

    cfg = job(tmp_path / "run")
    cfg.logger.backend = "wandb"
    with pytest.raises(TrainingError) as refused:
        open_run_folder(cfg, "run1", None, 0, Broken(), main=True)
    assert str(refused.value) == "logger.backend=wandb: the tracker did not start (wandb.ai: no route to host)"
    assert not (tmp_path / "run").exists()


def test_overwrite_on_opening_says_what_it_removed_and_kept(tmp_path, capsys):
    record_run(tmp_path, "old")
    checkpoint(tmp_path, 3, "old")
    checkpoint(tmp_path, 9, "someone")
    open_run_folder(job(tmp_path, overwrite=True), "new", None, 0, None, main=True)
    assert capsys.readouterr().out.splitlines() == [
        f"train.overwrite=true: removed the previous run's checkpoint-3, run_config.json from {tmp_path}",
        f"train.overwrite=true: kept what a run here did not write in {tmp_path}: checkpoint-9 (written by run "
        "someone; run_config.json records run old)",
    ]
    assert json.loads((tmp_path / "run_config.json").read_text())["run_id"] == "new"


def test_a_resumed_runs_log_drops_what_came_after_its_checkpoint(tmp_path):
    path = tmp_path / LOG_FILE
    rows = [{"step": 2, "loss": 1.0}, {"step": 3, "loss": 0.9}, {"step": 3, "eval_loss": 0.8},
            {"step": 4, "loss": 0.7}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')  # torn by a kill
    assert RunLog(path, True, keep_until_step=3, end_step=6).records() == rows[:3]
    # resumed from the final step: its end-of-run evaluation runs again, so the old one goes
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    assert RunLog(path, True, keep_until_step=3, end_step=3).records() == rows[:2]
