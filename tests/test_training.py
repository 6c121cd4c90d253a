"""The training loop: checkpoints, exact resume, refusals, original-format interop, wandb, faults."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState, PartialState
from safetensors.torch import load_file

from hydra_entry import to_object
from ptuning.build import load_model
from ptuning.checkpoint import export_original, load_prefix
from ptuning.config import ModelConfig
from ptuning.training import TrainingError, run, run_folder
from ptuning.training import loop as loop_module
from ptuning.weights import CheckpointError

from .common import ROOT, read_wandb_history
from .test_configs import compose_train

FAST = [
    "data.max_train_samples=64", "data.max_eval_samples=8", "train.max_steps=6", "train.per_device_batch_size=4",
    "train.eval_generation=false", "train.plot=false", "train.logging_steps=1", "train.save_steps=3",
    "train.eval_steps=null", "train.save_total_limit=null",
]


def job(tmp_path, *overrides):
    cfg = to_object(compose_train([f"train.output_dir={tmp_path}", f"data.cache_dir={tmp_path}/.cache", *FAST,
                                   *overrides]))
    return cfg


def train(tmp_path, *overrides):
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    return run(job(tmp_path, *overrides))


def prefix_of(checkpoint):
    return load_file(str(checkpoint / "prefix.safetensors"))


def losses(out_dir):
    rows = [json.loads(line) for line in (out_dir / "train_log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_run_writes_prefix_only_checkpoints_and_logs(tmp_path):
    result = train(tmp_path, "train.plot=true")
    assert result.step == 6 and result.checkpoint == tmp_path / "checkpoint-6"
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    ckpt = tmp_path / "checkpoint-6"
    assert sorted(p.name for p in ckpt.iterdir()) == ["prefix.safetensors", "prefix_config.json", "training_state.pt"]
    weights = prefix_of(ckpt)
    assert list(weights) == ["transformer.prefix_encoder.embedding.weight"]
    assert weights["transformer.prefix_encoder.embedding.weight"].shape == (16, 2 * 4 * 128)
    meta = json.loads((ckpt / "prefix_config.json").read_text())
    assert meta["pre_seq_len"] == 16 and meta["num_layers"] == 4 and meta["hidden_size"] == 128
    assert meta["base_model"] == "builtin:tiny-chatglm" and len(meta["base_config_fingerprint"]) == 16
    records = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_s", "samples_per_s", "peak_memory_mib",
                "matmul_peak_fraction"):
        assert all(math.isfinite(r[key]) for r in steps), key
    assert any("eval_loss" in r for r in records)
    # train.eval_generation=false (FAST) skips generation at the end, not the base model's scores at step 0
    # (train.eval_before_training, true by default), as docs/configuration.md says
    assert "eval_rouge-l" in next(r for r in records if r["step"] == 0)
    assert not any("eval_rouge-l" in r for r in records if r["step"] > 0)
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert not list(tmp_path.glob(".tmp-*"))


def test_only_the_prefix_changes(tmp_path):
    result = train(tmp_path)
    model = load_model(ModelConfig())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    load_prefix(model, result.checkpoint)
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == ["transformer.prefix_encoder.embedding.weight"]


class Interrupted(Exception):
    pass


def test_resume_latest_equals_uninterrupted(tmp_path, monkeypatch):
    full = train(tmp_path / "full")
    real_save = loop_module.save_checkpoint

    def save_then_stop(*args, **kwargs):
        path = real_save(*args, **kwargs)
        raise Interrupted(path)

    monkeypatch.setattr(loop_module, "save_checkpoint", save_then_stop)
    with pytest.raises(Interrupted):
        train(tmp_path / "cut")
    monkeypatch.setattr(loop_module, "save_checkpoint", real_save)
    assert sorted(p.name for p in (tmp_path / "cut").glob("checkpoint-*")) == ["checkpoint-3"]
    resumed = train(tmp_path / "cut", "train.resume_from=latest")
    assert resumed.step == 6
    a, b = prefix_of(full.checkpoint), prefix_of(resumed.checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "full") == losses(tmp_path / "cut")


def test_refuses_to_start_over_existing_checkpoints(tmp_path):
    train(tmp_path, "train.max_steps=3")
    with pytest.raises(TrainingError) as refused:
        train(tmp_path)
    assert str(refused.value) == (
        f"{tmp_path} already holds an earlier run's outputs (checkpoint-3, run_config.json, train_log.jsonl): resume "
        "with train.resume_from=latest, choose another train.output_dir, or set train.overwrite=true to remove them "
        "and start over")
    result = train(tmp_path, "train.overwrite=true")
    assert result.step == 6


def test_resume_latest_without_checkpoints_is_an_error(tmp_path):
    with pytest.raises(TrainingError, match="holds no checkpoint-N"):
        train(tmp_path, "train.resume_from=latest")


def test_save_total_limit_prunes_oldest(tmp_path):
    train(tmp_path, "train.save_steps=1", "train.save_total_limit=2")
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-5", "checkpoint-6"]


def test_original_format_export_and_import(tmp_path):
    result = train(tmp_path / "run")
    exported = export_original(result.checkpoint, tmp_path / "orig")
    state = torch.load(exported, weights_only=True)
    assert list(state) == ["transformer.prefix_encoder.embedding.weight"]
    # the original script's checkpoint: pytorch_model.bin with the prefix keys, no metadata
    (tmp_path / "orig" / "prefix_config.json").unlink()
    model = load_model(ModelConfig())
    load_prefix(model, tmp_path / "orig")
    assert torch.equal(model.transformer.prefix_encoder.embedding.weight, prefix_of(result.checkpoint)[
        "transformer.prefix_encoder.embedding.weight"])
    # and it is a valid starting point for training
    resumed = train(tmp_path / "again", f"train.init_prefix_from={tmp_path / 'orig'}", "train.max_steps=3")
    assert resumed.step == 3


def test_prefix_that_does_not_fit_names_both_values(tmp_path):
    result = train(tmp_path, "train.max_steps=3")
    model = load_model(ModelConfig(pre_seq_len=8))
    with pytest.raises(CheckpointError, match="pre_seq_len=16 but the model has pre_seq_len=8"):
        load_prefix(model, result.checkpoint)
    model = load_model(ModelConfig(prefix_projection=True))
    with pytest.raises(CheckpointError, match="prefix_projection=false but the model has prefix_projection=true"):
        load_prefix(model, result.checkpoint)


def test_nonfinite_loss_stops_naming_step_and_checkpoint(tmp_path, monkeypatch):
    real = loop_module.token_loss_sum
    calls = {"n": 0}

    def poisoned(model, ids, labels, **kwargs):
        calls["n"] += model.training  # training steps only (the base model's eval loss comes first)
        value = real(model, ids, labels, **kwargs)
        return value * float("nan") if calls["n"] == 5 and model.training else value

    monkeypatch.setattr(loop_module, "token_loss_sum", poisoned)
    with pytest.raises(TrainingError, match=r"step 5: non-finite loss .*last good checkpoint: .*checkpoint-3"):
        train(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-3"]


def test_wandb_offline_records_metrics(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc key: offline
    from ptuning.training.tracking import make_tracker

    cfg = job(tmp_path / "run", "logger=wandb")
    AcceleratorState._reset_state(True)
    run(cfg, trackers=make_tracker(cfg))
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*/*.wandb"))
    assert len(runs) == 1
    deadline = time.time() + 60  # wandb's service process may still be flushing the file after finish()
    while True:
        history = read_wandb_history(runs[0])
        logged = [row for row in history if "loss" in row]
        if len(logged) == 6 or time.time() > deadline:
            break
        time.sleep(0.5)
    assert [row["_step"] for row in logged] == [1, 2, 3, 4, 5, 6]
    assert logged[0]["loss"] == pytest.approx(losses(tmp_path / "run")[1])
    for key in ("learning_rate", "grad_norm", "tokens_per_s", "matmul_peak_fraction"):
        assert key in logged[-1], key
    assert any("eval_loss" in row for row in history)


# ---- faults found by trying the toolkit as a user would (one test per kind, named by item) ----


def file_digests(folder):
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def checkpoint_names(folder):
    return sorted((p.name for p in folder.glob("checkpoint-*")), key=lambda n: int(n.split("-")[1]))


def test_overwrite_removes_the_old_run_only_after_checks_and_keeps_the_new_checkpoints(tmp_path, capsys):
    from .common import ROOT

    train(tmp_path, "train.eval_before_training=false")  # the old run: checkpoint-3 and checkpoint-6
    run_id = json.loads((tmp_path / "run_config.json").read_text())["run_id"]
    (tmp_path / "eval-checkpoint-6").mkdir()  # evaluate.py's files for the run's checkpoint-6
    (tmp_path / "eval-checkpoint-6" / "metrics.json").write_text(json.dumps(
        {"checkpoint": str(tmp_path / "checkpoint-6"), "data_file": "dev.json", "num_samples": 8, "run_id": run_id}))
    (tmp_path / "eval-checkpoint-6" / "generated_predictions.jsonl").write_text(
        '{"prompt": "p", "labels": "l", "predict": "x"}\n')
    (tmp_path / "eval-checkpoint-3").mkdir()  # a folder of that name with the user's own numbers: kept
    (tmp_path / "eval-checkpoint-3" / "metrics.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("the user's own file")
    before = file_digests(tmp_path)
    # a start that fails (a data file without the response column) touches nothing
    bad = ROOT / "tests" / "bad_inputs" / "data" / "missing_column.json"
    from ptuning.data import DataError

    with pytest.raises(DataError):
        train(tmp_path, "train.overwrite=true", f"data.train_file={bad}")
    assert file_digests(tmp_path) == before
    capsys.readouterr()
    # the new run saves every step and keeps 2: its own checkpoints stay, although their step numbers are
    # lower than the old run's
    result = train(tmp_path, "train.overwrite=true", "train.max_steps=3", "train.save_steps=1",
                   "train.save_total_limit=2", "train.eval_before_training=false")
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("train.overwrite=true")]
    assert said == [f"train.overwrite=true: removed the previous run's checkpoint-3, checkpoint-6, eval-checkpoint-6, "
                    f"run_config.json, train_log.jsonl from {tmp_path}",
                    f"train.overwrite=true: kept what a run here did not write in {tmp_path}: eval-checkpoint-3 (not an "
                    "evaluation of the run recorded here)"]
    assert (tmp_path / "eval-checkpoint-3" / "metrics.json").read_text() == "{}"
    assert result.checkpoint == tmp_path / "checkpoint-3"
    assert checkpoint_names(tmp_path) == ["checkpoint-2", "checkpoint-3"]
    assert (tmp_path / "notes.txt").read_text() == "the user's own file"
    assert run_folder.resolve_resume(job(tmp_path, "train.resume_from=latest")) == tmp_path / "checkpoint-3"
    assert [r["step"] for r in map(json.loads, (tmp_path / "train_log.jsonl").read_text().splitlines())
            if "loss" in r] == [1, 2, 3]


def test_pruning_and_latest_never_take_another_runs_checkpoints(tmp_path):
    from ptuning.checkpoint import latest_checkpoint, prefix_metadata, resolve_checkpoint, save_checkpoint

    model = load_model(ModelConfig())
    base = prefix_metadata(model, "builtin:tiny-chatglm")
    save_checkpoint(tmp_path, 800, model, {**base, "run_id": "old"})  # copied in from another run
    (tmp_path / "run_config.json").write_text(json.dumps({"run_id": "new"}))
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, {**base, "run_id": "new"}, save_total_limit=2)
    assert checkpoint_names(tmp_path) == ["checkpoint-2", "checkpoint-3", "checkpoint-800"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-3"
    assert resolve_checkpoint(str(tmp_path)) == tmp_path / "checkpoint-3"  # evaluate.py / chat on the run folder
    assert run_folder.resolve_resume(job(tmp_path, "train.resume_from=latest")) == tmp_path / "checkpoint-3"
    # a folder whose recorded run has no checkpoint there: resume refuses the others' instead of taking them
    (tmp_path / "run_config.json").write_text(json.dumps({"run_id": "gone"}))
    with pytest.raises(TrainingError, match=r"the checkpoints in .* \(checkpoint-2, checkpoint-3, checkpoint-800\) "
                                            r"were not written by the run its run_config.json records"):
        run_folder.resolve_resume(job(tmp_path, "train.resume_from=latest"))


def test_resume_on_another_base_model_is_refused_and_init_warns(tmp_path, capsys):
    import shutil

    from ptuning.config import BUILTIN_MODEL

    other = tmp_path / "other-model"  # same architecture and shapes, another model folder
    shutil.copytree(BUILTIN_MODEL, other)
    run_dir = tmp_path / "run"
    train(run_dir, "train.max_steps=3", "train.eval_before_training=false")
    meta = json.loads((run_dir / "checkpoint-3" / "prefix_config.json").read_text())
    fingerprint = meta["base_config_fingerprint"]
    before = file_digests(run_dir)
    with pytest.raises(TrainingError) as refused:
        train(run_dir, "train.resume_from=latest", f"model.path={other}", "train.eval_before_training=false")
    assert str(refused.value) == (
        f"{run_dir / 'checkpoint-3'} was trained on builtin:tiny-chatglm (config fingerprint {fingerprint}, weights "
        f"{meta['base_weights_sha256']}) but the model is {other.resolve()} (config fingerprint {fingerprint}): "
        "resume on the model it was trained on, or set train.allow_base_model_change=true to go on with this one "
        "on purpose")
    assert file_digests(run_dir) == before
    capsys.readouterr()
    # on purpose: it goes on, says so in one line, and the next checkpoint names the model it now trains on
    result = train(run_dir, "train.resume_from=latest", f"model.path={other}", "train.allow_base_model_change=true",
                   "train.eval_before_training=false")
    assert result.step == 6
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: " + str(refused.value).rsplit(": resume on", 1)[0]]
    assert json.loads((run_dir / "checkpoint-6" / "prefix_config.json").read_text())["base_model"] == str(other.resolve())
    # a prefix to start from: a warning, no refusal
    train(tmp_path / "init", f"train.init_prefix_from={run_dir / 'checkpoint-3'}", f"model.path={other}",
          "train.max_steps=3", "train.eval_before_training=false")
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "was trained on builtin:tiny-chatglm" in warnings[0]


def test_a_bundled_model_is_the_same_base_model_by_name_or_by_folder(tmp_path, monkeypatch):
    from ptuning.checkpoint import base_model_change
    from ptuning.config import BUILTIN_MODEL, PROJECT_ROOT

    monkeypatch.chdir(PROJECT_ROOT / "data")
    same_folder = ["builtin:tiny-chatglm", str(BUILTIN_MODEL), "tiny-chatglm", "./tiny-chatglm/",
                   "../data/tiny-chatglm", str(PROJECT_ROOT / "tests" / ".." / "data" / "tiny-chatglm")]
    # how checkpoints name it from now on, whichever way it is given
    assert {ModelConfig(path=p).base_model_name for p in same_folder} == {"builtin:tiny-chatglm"}
    trained = {"base_model": "builtin:tiny-chatglm", "base_config_fingerprint": "f" * 16, "base_weights_sha256": "d" * 16}
    for path in same_folder:
        current = {"base_model": path, "base_config_fingerprint": "f" * 16, "base_weights_sha256": "d" * 16}
        assert base_model_change(trained, current) is None, path
        assert base_model_change(current, trained) is None, path  # e.g. a checkpoint that recorded the folder
    # another model of the same shapes: other weights, or another folder
    other_weights = {**trained, "base_weights_sha256": "e" * 16}
    assert "weights eeeeeeeeeeeeeeee" in base_model_change(trained, other_weights)
    copy = {"base_model": str(tmp_path / "tiny-chatglm"), "base_config_fingerprint": "f" * 16}
    assert base_model_change(trained, copy).endswith(f"but the model is {tmp_path / 'tiny-chatglm'} (config "
                                                     f"fingerprint {'f' * 16})")
    assert ModelConfig(path=str(tmp_path)).base_model_name == str(tmp_path.resolve())


def test_ctrl_c_names_the_step_and_the_checkpoint_to_resume(tmp_path, monkeypatch):
    from ptuning.training.loop import TrainingInterrupted

    real = loop_module.token_loss_sum
    calls = {"n": 0}

    def interrupted_in_step_5(model, ids, labels, **kwargs):
        calls["n"] += model.training
        if calls["n"] == 5 and model.training:
            raise KeyboardInterrupt
        return real(model, ids, labels, **kwargs)

    monkeypatch.setattr(loop_module, "token_loss_sum", interrupted_in_step_5)
    with pytest.raises(TrainingInterrupted) as stopped:
        train(tmp_path, "train.eval_before_training=false")
    assert str(stopped.value) == (f"interrupted at step 4; last checkpoint {tmp_path / 'checkpoint-3'}; "
                                  "continue with train.resume_from=latest")
    calls["n"] = 4  # the next call is the 5th: Ctrl-C in the first step of a new run
    with pytest.raises(TrainingInterrupted, match=r"^interrupted at step 0, before the first checkpoint: nothing to "
                                                  r"resume; start the run again with train.resume_from=auto \(it "
                                                  r"replaces this run's record\)$"):
        train(tmp_path / "early", "train.eval_before_training=false")
    assert train(tmp_path / "early", "train.eval_before_training=false", "train.resume_from=auto").step == 6


def test_ctrl_c_right_after_or_during_a_save_names_the_done_step_and_the_newest_checkpoint(tmp_path, monkeypatch):
    """Ctrl-C at the moments around a checkpoint (the fault points, raising KeyboardInterrupt there): the line
    names the step whose update was applied and the newest complete checkpoint, and a save that was
    interrupted leaves no ``.tmp-checkpoint-N`` behind."""
    from ptuning import checkpoint as checkpoint_module
    from ptuning.training.loop import TrainingInterrupted

    def ctrl_c_at(point: str, step: int):
        def fault(name: str, at: int) -> None:
            if (name, at) == (point, step):
                raise KeyboardInterrupt
        monkeypatch.setattr(loop_module, "kill_point", fault)
        monkeypatch.setattr(checkpoint_module, "kill_point", fault)

    cases = {  # where: (step, last checkpoint, the checkpoints on disk)
        ("saved", 3): (3, "checkpoint-3", ["checkpoint-3"]),  # right after the first save
        ("save-write", 6): (6, "checkpoint-3", ["checkpoint-3"]),  # inside the final save, before its rename
        ("saved", 6): (6, "checkpoint-6", ["checkpoint-3", "checkpoint-6"]),  # right after the final save
    }
    for (point, step), (done, last, on_disk) in cases.items():
        out = tmp_path / f"{point}-{step}"
        ctrl_c_at(point, step)
        with pytest.raises(TrainingInterrupted) as stopped:
            train(out, "train.eval_before_training=false")
        assert str(stopped.value) == (f"interrupted at step {done}; last checkpoint {out / last}; continue with "
                                      "train.resume_from=latest")
        assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == on_disk
    ctrl_c_at("none", 0)
    assert train(tmp_path / "save-write-6", "train.eval_before_training=false",
                 "train.resume_from=latest").checkpoint == tmp_path / "save-write-6" / "checkpoint-6"


def test_a_resume_with_nothing_left_to_train_still_keeps_only_save_total_limit_checkpoints(tmp_path):
    every = ["train.max_steps=4", "train.save_steps=1", "train.eval_before_training=false"]
    train(tmp_path, *every)  # save_total_limit=null: all four kept
    assert [p.name for p in sorted(tmp_path.glob("checkpoint-*"))] == [f"checkpoint-{n}" for n in (1, 2, 3, 4)]
    result = train(tmp_path, *every, "train.resume_from=latest", "train.save_total_limit=3")
    assert result.step == 4 and result.checkpoint == tmp_path / "checkpoint-4"
    assert [p.name for p in sorted(tmp_path.glob("checkpoint-*"))] == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]


def test_the_console_shows_eval_loss_and_throughput_as_the_docs_say(tmp_path, capsys):
    import re

    from .common import ROOT

    train(tmp_path, "train.eval_steps=2", "train.logging_steps=2", "train.eval_before_training=false")
    captured = capsys.readouterr()
    assert [line for line in captured.out.splitlines() if "eval loss" in line and line.startswith("step")] == [
        f"step {n}: eval loss {loss:.4f}" for n, loss in
        [(r["step"], r["eval_loss"]) for r in map(json.loads, (tmp_path / "train_log.jsonl").read_text().splitlines())
         if "eval_loss" in r and r["step"] in (2, 4)]]
    bar = captured.err.replace("\r", "\n").splitlines()[-1]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    docs = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    logging_section = docs.split("## Logging", 1)[1].split("\n## ", 1)[0]
    shown = re.search(r"progress bar with the step's (.*?)`tokens_per_s`", logging_section, re.S).group(0)
    keys = re.findall(r"`(\w+)`", shown)
    assert keys == ["loss", "lr", "grad_norm", "tokens_per_s"]
    for key in keys:
        assert re.search(rf"\b{key}=[0-9]", bar), (key, bar)
    assert "`step N: eval loss X`" in logging_section
    # the checkpoints the README lists are the ones the default run keeps
    default = to_object(compose_train(["train.output_dir=/tmp/x"])).train
    kept = list(range(default.save_steps, default.max_steps + 1, default.save_steps))[-default.save_total_limit:]
    assert f"checkpoint-{{{','.join(map(str, kept))}}}/" in readme


def test_the_base_model_baseline_reaches_wandb_and_the_loss_plot(tmp_path, monkeypatch):
    from ptuning.training.plot import loss_curves
    from ptuning.training.tracking import make_tracker

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc key: offline
    cfg = job(tmp_path / "run", "logger=wandb", "train.eval_before_training=true", "train.max_new_tokens=8")
    AcceleratorState._reset_state(True)
    run(cfg, trackers=make_tracker(cfg))
    records = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    baseline = next(r for r in records if r["step"] == 0)
    assert math.isfinite(baseline["eval_loss"]) and "eval_rouge-l" in baseline
    assert loss_curves(records)[1][0] == (0, baseline["eval_loss"])
    wandb_file = next((tmp_path / "run" / "wandb").glob("offline-run-*/*.wandb"))
    deadline = time.time() + 60
    while True:
        history = read_wandb_history(wandb_file)
        first = next((row for row in history if row.get("_step") == 0), None)
        if first is not None or time.time() > deadline:
            break
        time.sleep(0.5)
    assert first is not None, history
    assert first["eval_loss"] == pytest.approx(baseline["eval_loss"])
    assert first["eval_rouge-l"] == pytest.approx(baseline["eval_rouge-l"])


def test_a_small_model_on_cpu_runs_with_one_thread_unless_omp_num_threads_says(tmp_path, monkeypatch):
    from ptuning.models.chatglm import tiny_config
    from ptuning.perf import BENCH_SHAPE, set_cpu_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        tiny = load_model(ModelConfig()).config
        assert set_cpu_threads(tiny, "cpu") == 1 and torch.get_num_threads() == 1
        torch.set_num_threads(2)
        assert set_cpu_threads(tiny_config(**BENCH_SHAPE), "cpu") is None and torch.get_num_threads() == 2
        assert set_cpu_threads(tiny, "cuda") is None and torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert set_cpu_threads(tiny, "cpu") is None and torch.get_num_threads() == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        # a training run: one thread while it runs, the caller's count afterwards
        seen = []
        real = loop_module.token_loss_sum

        def spy(*args, **kwargs):
            seen.append(torch.get_num_threads())
            return real(*args, **kwargs)

        monkeypatch.setattr(loop_module, "token_loss_sum", spy)
        train(tmp_path, "train.max_steps=2", "train.eval_before_training=false")
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_rows_longer_than_the_models_positions_are_refused_in_training_and_evaluation(tmp_path):
    from ptuning.data import DataError
    from ptuning.evaluation.run import EvaluateJobConfig
    from ptuning.evaluation.run import run as evaluate

    # the built-in model covers 512 positions; a 1,023-token prompt and a 480-token response do not fit
    rows = [{"content": "裙" * 1023, "summary": "好" * 480}] + [{"content": "裙子", "summary": "好"}] * 15
    data = tmp_path / "long.json"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    longer = ["data.max_source_length=1024", "data.max_target_length=480", f"data.train_file={data}",
              f"data.validation_file={data}"]
    with pytest.raises(DataError) as err:
        train(tmp_path / "run", *longer)
    message = str(err.value)
    assert f"{data}: 1 of 16 rows need more than the model's 512 positions (longest 1" in message
    assert "lower data.max_source_length / data.max_target_length" in message
    # refused before anything was written (the folder holds only the test's data cache)
    assert [p.name for p in (tmp_path / "run").iterdir()] == [".cache"]
    # evaluation: the prompt and the tokens to generate must fit too
    checkpoint = train(tmp_path / "ok").checkpoint
    cfg = EvaluateJobConfig(prefix_checkpoint=str(checkpoint), output_dir=str(tmp_path / "eval"), split="validation")
    cfg.data.validation_file, cfg.data.max_source_length = str(data), 1024
    cfg.data.cache_dir = str(tmp_path / ".cache")
    with pytest.raises(DataError, match=r"1 of 16 prompts need more than the model's 512 positions \(longest \d+ tokens, "
                                        r"prompt \+ 64 new tokens\); lower data.max_source_length or generation.max_new_tokens"):
        evaluate(cfg)


def test_init_prefix_from_a_run_folder_takes_its_latest_checkpoint_and_names_model_keys(tmp_path, monkeypatch):
    first = train(tmp_path / "run")
    assert first.checkpoint == tmp_path / "run" / "checkpoint-6"
    # a prefix that does not fit: the message names the checkpoint taken and the model.* key to set
    with pytest.raises(CheckpointError) as err:
        train(tmp_path / "bad", f"train.init_prefix_from={tmp_path / 'run'}", "model.pre_seq_len=8")
    assert str(err.value) == (f"{tmp_path / 'run' / 'checkpoint-6'}: the prefix was trained with pre_seq_len=16 but "
                              "the model has pre_seq_len=8 (set model.pre_seq_len=16 to load it)")
    taken = []
    real = loop_module.load_model_with_prefix

    def recording(cfg, checkpoint, **kwargs):
        taken.append(checkpoint)
        return real(cfg, checkpoint, **kwargs)

    monkeypatch.setattr(loop_module, "load_model_with_prefix", recording)
    again = train(tmp_path / "again", f"train.init_prefix_from={tmp_path / 'run'}", "train.max_steps=1")
    assert again.step == 1 and taken == [tmp_path / "run" / "checkpoint-6"]


# ---- the training output folder and resume (one test per kind) ----


def refused_before_loading(monkeypatch):
    """Makes loading the model an error: a refusal must come before it."""
    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(loop_module, "load_model_with_prefix", loaded)


def test_overwrite_removes_only_what_the_folders_run_wrote(tmp_path, capsys, monkeypatch):
    other = tmp_path / "other"
    train(other, "train.max_steps=3", "train.eval_before_training=false")  # another run, another run id
    out = tmp_path / "run"
    (out / "checkpoint-7").mkdir(parents=True)  # the user's folders (no run was ever here)
    (out / "checkpoint-7" / "notes.txt").write_text("mine")
    (out / "eval-checkpoint-3").mkdir()
    (out / "eval-checkpoint-3" / "metrics.json").write_text('{"bleu-4": 1}')
    import shutil

    shutil.copytree(other / "checkpoint-3", out / "checkpoint-9")  # a checkpoint copied in from another run
    before = file_digests(out)
    other_id = json.loads((other / "run_config.json").read_text())["run_id"]
    foreign = (f"checkpoint-7 (not a checkpoint: no prefix.safetensors), checkpoint-9 (a checkpoint of run {other_id}; "
               "the folder records no run (run_config.json)), eval-checkpoint-3 (not an evaluation of the run recorded "
               "here)")
    # without overwrite: refused, and checkpoint-7 is not called a checkpoint
    with pytest.raises(TrainingError) as refused:
        train(out, "train.max_steps=2", "train.eval_before_training=false")
    assert str(refused.value) == (
        f"{out} already holds {foreign}, which no run here wrote: resume checkpoint-9 on purpose with "
        f"train.resume_from={out / 'checkpoint-9'}, choose another train.output_dir, or set train.overwrite=true to "
        "start a new run beside them (they are kept)")
    assert file_digests(out) == before
    # overwrite: nothing of it is removed, all of it is named
    capsys.readouterr()
    train(out, "train.overwrite=true", "train.max_steps=2", "train.eval_before_training=false")
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("train.overwrite=true")]
    assert said == [f"train.overwrite=true: kept what a run here did not write in {out}: {foreign}"]
    assert {k: v for k, v in file_digests(out).items() if k in before} == before
    assert checkpoint_names(out) == ["checkpoint-2", "checkpoint-7", "checkpoint-9"]
    # a file the user put inside the run's checkpoint stays, with its folder; the checkpoint's files go
    (out / "checkpoint-2" / "notes.txt").write_text("about step 2")
    # a checkpoint the next run would save where a folder it may not remove is: refused before loading
    with monkeypatch.context() as m:
        refused_before_loading(m)
        for steps, name, why in (("7", "checkpoint-7", "not a checkpoint: no prefix.safetensors"),
                                 ("2", "checkpoint-2", "it holds files a checkpoint does not: notes.txt")):
            with pytest.raises(TrainingError) as refused:
                train(out, "train.overwrite=true", f"train.max_steps={steps}")
            assert str(refused.value) == (
                f"train.output_dir={out}: this run would save {name}, but {out / name} is already there ({why}) and a "
                "run replaces only its own checkpoints: move it, or choose another train.output_dir")
    capsys.readouterr()
    run_id = json.loads((out / "run_config.json").read_text())["run_id"]
    train(out, "train.overwrite=true", "train.max_steps=3", "train.eval_before_training=false")
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("train.overwrite=true")]
    foreign = foreign.replace(f"a checkpoint of run {other_id}; the folder records no run (run_config.json)",
                              f"written by run {other_id}; run_config.json records run {run_id}")
    assert said == [
        f"train.overwrite=true: removed the previous run's checkpoint-2's checkpoint files, run_config.json, "
        f"train_log.jsonl from {out}",
        f"train.overwrite=true: kept what a run here did not write in {out}: {foreign}, checkpoint-2/notes.txt"]
    assert [p.name for p in (out / "checkpoint-2").iterdir()] == ["notes.txt"]
    assert checkpoint_names(out) == ["checkpoint-2", "checkpoint-3", "checkpoint-7", "checkpoint-9"]


def test_a_log_plot_or_run_record_alone_is_an_earlier_runs_output(tmp_path, monkeypatch):
    import shutil

    train(tmp_path, "train.max_steps=3", "train.plot=true", "train.eval_before_training=false")
    shutil.rmtree(tmp_path / "checkpoint-3")  # no checkpoint left: the log, plot and record still are the run's
    before = file_digests(tmp_path)
    refused_before_loading(monkeypatch)
    with pytest.raises(TrainingError) as refused:
        train(tmp_path)
    assert str(refused.value) == (
        f"{tmp_path} already holds an earlier run's outputs (loss.png, run_config.json, train_log.jsonl): start "
        "that run over with train.resume_from=auto (it has no checkpoint), choose another train.output_dir, or set "
        "train.overwrite=true to remove them and start over")
    assert file_digests(tmp_path) == before
    handmade = tmp_path / "handmade"  # files of those names, made by hand: not replaced silently either
    handmade.mkdir()
    (handmade / "train_log.jsonl").write_text("my notes\n")
    for how in ((), ("train.overwrite=true",), ("train.resume_from=auto",)):  # no run's record: none replaces it
        with pytest.raises(TrainingError, match=r"this run writes train_log.jsonl, but .*handmade/train_log.jsonl is "
                                                r"already there \(no run recorded it\)"):
            train(handmade, *how)
    assert (handmade / "train_log.jsonl").read_text() == "my notes\n"


def test_an_output_dir_that_cannot_hold_a_run_is_refused_before_loading(tmp_path, monkeypatch):
    from ptuning.config import BUILTIN_MODEL

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "prefix.safetensors").write_bytes(b"")
    refused_before_loading(monkeypatch)
    cases = {
        a_file: "exists and is not a folder",
        a_file / "sub": f"cannot be created: {a_file} is not a folder",
        BUILTIN_MODEL: "it is a model folder (config.json + weights); choose another folder",
        checkpoint: "it is a checkpoint folder; choose another folder",
        checkpoint / "sub": f"it is inside the checkpoint folder {checkpoint}; choose another folder",
    }
    if Path("/proc/self").is_dir():  # a file system that makes no folders
        cases[Path("/proc/run")] = "cannot be created in /proc (No such file or directory)"
    for folder, why in cases.items():
        with pytest.raises(TrainingError) as refused:
            run(to_object(compose_train([f"train.output_dir={folder}", *FAST])))
        assert str(refused.value) == f"train.output_dir={folder}: {why}"
    assert a_file.read_text() == "x" and sorted(p.name for p in checkpoint.iterdir()) == ["prefix.safetensors"]
    assert not list(tmp_path.glob("**/.ptuning-probe-*"))


def test_the_inverse_sqrt_schedule_trains(tmp_path):
    result = train(tmp_path, "train.lr_scheduler=inverse_sqrt", "train.warmup_steps=2", "train.max_steps=4",
                   "train.eval_before_training=false")
    assert result.step == 4
    rates = {r["step"]: r["learning_rate"] for r in map(json.loads, (tmp_path / "train_log.jsonl").read_text().splitlines())
             if "learning_rate" in r}
    lr = job(tmp_path).train.learning_rate
    # warmup to the full rate at step 2, then lr / sqrt(step / warmup_steps)
    assert rates[1] == pytest.approx(lr / 2) and rates[2] == pytest.approx(lr)
    assert rates[4] == pytest.approx(lr / math.sqrt(2))


def test_resume_says_when_nothing_is_left_and_what_changed(tmp_path, capsys, monkeypatch):
    import shutil

    train(tmp_path, "train.eval_before_training=false")  # checkpoint-3 and checkpoint-6
    with monkeypatch.context() as m:
        refused_before_loading(m)
        with pytest.raises(TrainingError) as refused:
            train(tmp_path, "train.resume_from=latest", "train.max_steps=3")
    assert str(refused.value) == (
        f"train.resume_from: {tmp_path / 'checkpoint-6'} is at step 6, past train.max_steps=3: nothing to train; raise "
        f"train.max_steps to train on (or evaluate it with evaluate.py prefix_checkpoint={tmp_path / 'checkpoint-6'})")
    # at train.max_steps: said in one line; the end-of-run evaluation runs again and the run ends normally
    capsys.readouterr()
    result = train(tmp_path, "train.resume_from=latest")
    assert result.step == 6 and result.checkpoint == tmp_path / "checkpoint-6"
    assert (f"{tmp_path / 'checkpoint-6'} is at train.max_steps=6: nothing left to train; running the end-of-run "
            "evaluation only (raise train.max_steps to train on)") in capsys.readouterr().out.splitlines()
    # settings that shape the updates, changed on resume: one warning naming them
    shutil.rmtree(tmp_path / "checkpoint-6")
    other_data = tmp_path / "train_copy.json"
    shutil.copy(ROOT / "data" / "adgen_sample" / "train.json", other_data)
    capsys.readouterr()
    train(tmp_path, "train.resume_from=latest", "train.per_device_batch_size=2", "train.gradient_accumulation_steps=2",
          "train.learning_rate=0.01", "train.seed=7", f"data.train_file={other_data}")
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    before = json.loads((tmp_path / "run_config.json").read_text())
    assert warnings == [
        f"warning: resuming {tmp_path / 'checkpoint-3'} with train.per_device_batch_size (4 -> 2), "
        f"train.gradient_accumulation_steps (1 -> 2), train.learning_rate ({before['train']['learning_rate']} -> 0.01), "
        f"train.seed (42 -> 7), data.train_file ({before['data']['train_file']} -> {other_data}) changed from the "
        f"run that wrote it ({tmp_path / 'checkpoint-3' / 'prefix_config.json'}): the result will differ from an "
        "uninterrupted run"]
    # the same settings (the same file by another path): no warning
    shutil.rmtree(tmp_path / "checkpoint-6")
    capsys.readouterr()
    train(tmp_path, "train.resume_from=latest", f"data.train_file={Path(before['data']['train_file']).resolve()}")
    assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")] == []


def test_resume_from_a_plain_folder_says_it_is_not_a_checkpoint(tmp_path, monkeypatch):
    train(tmp_path, "train.max_steps=3", "train.eval_before_training=false")
    (tmp_path / "my_stuff").mkdir()
    refused_before_loading(monkeypatch)
    for folder, message in (
        (tmp_path / "my_stuff", "not a checkpoint (no prefix.safetensors)"),
        (tmp_path, f"not a checkpoint (no prefix.safetensors); it is a training output folder: resume its latest "
                   f"with train.output_dir={tmp_path} train.resume_from=latest"),
    ):
        with pytest.raises(TrainingError) as refused:
            train(tmp_path, f"train.resume_from={folder}")
        assert str(refused.value) == f"train.resume_from={folder}: {message}"
