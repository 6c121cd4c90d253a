"""Reliability: killed runs resume exactly, numerical and storage faults stop cleanly, loading is safe,
runs are deterministic. (Bad user inputs: tests/test_bad_inputs.py.)

The kill test runs the built-in default training as ``python train.py`` subprocesses and kills them with
SIGKILL at exact moments through the test-only hook ``PTUNING_TEST_KILL_AT`` (ptuning/faults.py):
the process sends itself SIGKILL there, so the moment is exact and the death as abrupt as a pre-emption.
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from ptuning import checkpoint as checkpoint_module
from ptuning.build import load_model, load_tokenizer
from ptuning.checkpoint import list_checkpoints, prefix_metadata, save_checkpoint
from ptuning.config import BUILTIN_MODEL, ModelConfig
from ptuning.faults import ENV as KILL_ENV
from ptuning.faults import SIGNAL_ENV
from ptuning.training import TrainingError
from ptuning.training import loop as loop_module
from ptuning.training import run_folder as run_folder_module
from ptuning.training.run_folder import RunLog, resolve_resume
from ptuning.weights import CheckpointError, read_weights, save_weights

from .bad_inputs.recipes import Payload
from .common import ROOT, resize_disk, small_disk
from .test_evaluate import reset_accelerate
from .test_training import job
from .test_training import train as train_with_baseline


def train(tmp_path, *overrides):
    """test_training's in-process run without the base model's generation first (not needed here)."""
    return train_with_baseline(tmp_path, "train.eval_before_training=false", *overrides)

# A short default run: checkpoints at 3, 6, 9 and 10 (two kept), evaluations at 4 and 8 and at the end.
KILL_RUN = [
    "data.max_train_samples=64", "data.max_eval_samples=8", "train.max_steps=10", "train.per_device_batch_size=4",
    "train.save_steps=3", "train.save_total_limit=2", "train.eval_steps=4", "train.logging_steps=1",
    "train.eval_generation=false", "train.eval_before_training=false", "train.plot=false",
]
# Wall-clock measurements differ between any two runs; everything else in the log must not.
TIMING_KEYS = {"tokens_per_s", "samples_per_s", "peak_memory_mib", "matmul_peak_fraction", "eval_generation_s",
               "eval_new_tokens_per_s"}


def train_cli(out: Path, cache: Path, *extra: str, kill: str | None = None) -> subprocess.CompletedProcess:
    """``python train.py`` with the kill run's settings; ``kill`` = ``point@step`` to SIGKILL it there."""
    env = {k: v for k, v in os.environ.items() if k != KILL_ENV}
    if kill is not None:
        env[KILL_ENV] = kill
    args = [sys.executable, "train.py", *KILL_RUN, f"train.output_dir={out}", f"data.cache_dir={cache}", *extra]
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def log_records(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def checkpoint_names(out: Path) -> list[str]:
    return [p.name for p in list_checkpoints(out)]


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Bitwise the same prefix and optimizer state (float32 on CPU, one process)."""
    pa, pb = load_file(str(a / "prefix.safetensors")), load_file(str(b / "prefix.safetensors"))
    assert pa.keys() == pb.keys()
    assert all(torch.equal(pa[k], pb[k]) for k in pa), f"{a} and {b} hold different prefixes"
    sa = torch.load(a / "training_state.pt", weights_only=True)
    sb = torch.load(b / "training_state.pt", weights_only=True)
    assert (sa["step"], sa["micro_batch"], sa["scheduler"]) == (sb["step"], sb["micro_batch"], sb["scheduler"])
    for key, state in sa["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, sb["optimizer"]["state"][key][name]), f"optimizer {key}.{name} differs"


def test_one_command_restarts_a_run_killed_at_any_moment_to_the_same_prefix(tmp_path):
    """One uninterrupted run, and one started with ``train.resume_from=auto`` and killed seven times (at a
    different moment each time, before its first checkpoint too), each restart the very same command."""
    cache = tmp_path / "cache"
    full, cut = tmp_path / "full", tmp_path / "cut"
    done = train_cli(full, cache)
    assert done.returncode == 0, done.stderr[-3000:]
    assert checkpoint_names(full) == ["checkpoint-9", "checkpoint-10"]
    auto = "train.resume_from=auto"

    def killed(at):
        proc = train_cli(cut, cache, auto, kill=at)
        assert proc.returncode == -signal.SIGKILL, (at, proc.returncode, proc.stderr[-3000:])
        assert "Traceback" not in proc.stderr
        return proc

    # 1. the first start, right after it took the folder: nothing written but the lock file, whose lock died with
    # the process
    killed("locked@0")
    assert sorted(p.name for p in cut.iterdir()) == [".ptuning.lock"]
    # 2. in the middle of step 2, before the first checkpoint: the run's record and log are there
    killed("step@2")
    assert sorted(p.name for p in cut.iterdir()) == [".ptuning.lock", "run_config.json", "train_log.jsonl"]
    first_run = json.loads((cut / "run_config.json").read_text())["run_id"]
    # 3. inside the write of the first checkpoint: its files are complete in the temporary folder, not renamed.
    # resume_from=latest has nothing to resume; a fresh start without auto is refused and says how to go on
    proc = killed("save-write@3")
    assert ("starting the run over (replacing the record of the run that has none: run_config.json, "
            "train_log.jsonl)") in proc.stdout
    assert sorted(p.name for p in (cut / ".tmp-checkpoint-3").iterdir()) == [
        "prefix.safetensors", "prefix_config.json", "training_state.pt"]
    assert checkpoint_names(cut) == [] and json.loads((cut / "run_config.json").read_text())["run_id"] != first_run
    with pytest.raises(TrainingError, match=rf"^train.resume_from=latest: {cut} holds no checkpoint-N folder"):
        resolve_resume(job(cut, "train.resume_from=latest"))
    with pytest.raises(TrainingError, match=rf"^{cut} already holds an earlier run's outputs \(.tmp-checkpoint-3, "
                                            r"run_config.json, train_log.jsonl\): start that run over with "
                                            r"train.resume_from=auto \(it has no checkpoint\), "):
        resolve_resume(job(cut))
    # 4. in the middle of step 5 (gradients computed, not applied), after checkpoint-3
    killed("step@5")
    assert checkpoint_names(cut) == ["checkpoint-3"] and not (cut / ".tmp-checkpoint-3").exists()
    with open(cut / "train_log.jsonl", "a") as fh:  # as if the kill had also torn the log's last line
        fh.write('{"step": 5, "loss": 2.1')
    # 5. during the evaluation after step 8 (checkpoint-6 is the latest)
    assert "resumed from" in killed("eval@8").stdout
    assert checkpoint_names(cut) == ["checkpoint-3", "checkpoint-6"]
    # 6. right after checkpoint-9 is in place (and checkpoint-3 pruned)
    killed("saved@9")
    assert checkpoint_names(cut) == ["checkpoint-6", "checkpoint-9"]
    # 7. during the final evaluation, after the last checkpoint
    killed("eval@10")
    assert checkpoint_names(cut) == ["checkpoint-9", "checkpoint-10"]
    # and the last restart finishes
    proc = train_cli(cut, cache, auto)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: step 10" in proc.stdout

    for name in ("checkpoint-9", "checkpoint-10"):
        assert_same_checkpoint(full / name, cut / name)
    assert log_records(cut) == log_records(full)
    assert [r["step"] for r in log_records(full) if "loss" in r] == list(range(1, 11))
    assert [r["step"] for r in log_records(full) if "eval_loss" in r] == [4, 8, 10]
    assert sorted(p.name for p in cut.iterdir()) == sorted(p.name for p in full.iterdir())  # no .tmp-, no lock


def test_runlog_resume_drops_later_records_and_the_final_evaluation(tmp_path):
    path = tmp_path / "train_log.jsonl"
    rows = [{"step": 3, "loss": 1.0}, {"step": 4, "loss": 0.9}, {"step": 4, "eval_loss": 1.1},
            {"step": 5, "loss": 0.8}, {"step": 6, "loss": 0.7}, {"step": 6, "eval_loss": 1.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 7, "lo')
    # resumed from checkpoint-4 of a 6-step run: step 4's evaluation came before that save, it stays
    assert RunLog(path, True, keep_until_step=4, end_step=6).records() == rows[:3]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # resumed from the final checkpoint-6: the end-of-run evaluation is redone, so its record goes
    assert RunLog(path, True, keep_until_step=6, end_step=6).records() == rows[:5]


# ---- one run per folder ----


def train_popen(out: Path, cache: Path, *extra: str, env_extra: dict | None = None) -> subprocess.Popen:
    """``python train.py`` with the kill run's settings, started and not waited for."""
    env = {**{k: v for k, v in os.environ.items() if k != KILL_ENV}, **(env_extra or {})}
    args = [sys.executable, "train.py", *KILL_RUN, f"train.output_dir={out}", f"data.cache_dir={cache}", *extra]
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_one_runs_outputs(out: Path, seed: int) -> None:
    """``out`` holds one whole run's outputs, the run of ``seed``: its record, and each step logged once."""
    assert json.loads((out / "run_config.json").read_text())["train"]["seed"] == seed
    assert [r["step"] for r in log_records(out) if "loss" in r] == list(range(1, 11))
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-10", "checkpoint-9", "run_config.json",
                                                      "train_log.jsonl"]


def test_a_second_run_into_a_running_runs_folder_is_refused_naming_it_and_nothing_mixes(tmp_path):
    cache = tmp_path / "cache"
    # the first run stops itself (SIGSTOP) right after taking its folder, before it writes anything
    out = tmp_path / "held"
    first = train_popen(out, cache, "train.seed=1",
                        env_extra={KILL_ENV: "locked@0", SIGNAL_ENV: "SIGSTOP"})
    try:
        for _ in range(600):
            lock = out / ".ptuning.lock"
            if lock.is_file() and f'"pid": {first.pid},' in lock.read_text():
                break
            assert first.poll() is None, first.communicate()
            time.sleep(0.5)
        second = train_cli(out, cache, "train.seed=2")
        assert second.returncode == 2, second.stderr[-3000:]
        assert "Traceback" not in second.stderr
        assert len(error_lines(second.stderr)) == 1
        assert error_lines(second.stderr)[0].startswith(
            f"error: train.output_dir={out} is in use by another run (pid {first.pid} on "), second.stderr[-3000:]
        assert re.search(r", started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d: train\.py data\.max_train_samples=64 .*\); wait for it "
                         r"to end or stop it, or choose another train\.output_dir$", error_lines(second.stderr)[0])
        assert sorted(p.name for p in out.iterdir()) == [".ptuning.lock"]  # the refused run wrote nothing
    finally:
        first.send_signal(signal.SIGCONT)
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-3000:]
    assert "done: step 10" in stdout
    assert_one_runs_outputs(out, seed=1)

    # two runs started at the same moment: one runs, the other is refused, and the folder is the first's alone
    out = tmp_path / "race"
    runs = {seed: train_popen(out, cache, f"train.seed={seed}") for seed in (1, 2)}
    ends = {seed: proc.communicate(timeout=600) for seed, proc in runs.items()}
    codes = {seed: proc.returncode for seed, proc in runs.items()}
    assert sorted(codes.values()) == [0, 2], {seed: ends[seed][1][-2000:] for seed in runs}
    winner = next(seed for seed, code in codes.items() if code == 0)
    loser = 3 - winner
    refusal = error_lines(ends[loser][1])
    assert len(refusal) == 1 and "Traceback" not in ends[loser][1], ends[loser][1][-3000:]
    # refused while the winner ran (almost always), or, when it started that late, by the winner's outputs
    assert refusal[0].startswith((f"error: train.output_dir={out} is in use by another run (pid {runs[winner].pid} ",
                                  f"error: {out} already holds an earlier run's outputs")), refusal[0]
    assert_one_runs_outputs(out, seed=winner)


# ---- numerical faults ----


def poison_loss(monkeypatch, steps: set[int], how: str = "loss"):
    """Makes the loss (``how="loss"``) or only its gradient (``how="grad"``) non-finite at ``steps``."""
    real = loop_module.token_loss_sum
    calls = {"n": 0}

    def poisoned(model, ids, labels, **kwargs):
        calls["n"] += 1  # one call per micro-batch: with no accumulation, the step number
        value = real(model, ids, labels, **kwargs)
        if calls["n"] not in steps:
            return value
        if how == "loss":
            return value * float("nan")
        # sqrt at 0 has an infinite slope: the loss value stays finite, its gradient is not
        return value + (value * 0.0).abs().sqrt()

    monkeypatch.setattr(loop_module, "token_loss_sum", poisoned)


def test_nonfinite_gradient_stops_naming_step_and_last_checkpoint(tmp_path, monkeypatch):
    poison_loss(monkeypatch, {5}, how="grad")
    with pytest.raises(TrainingError, match=r"^step 5: non-finite gradient norm \(loss=[0-9.]+, grad_norm=nan\); "
                                            r"last good checkpoint: .*checkpoint-3$"):
        train(tmp_path)
    assert checkpoint_names(tmp_path) == ["checkpoint-3"]


def test_nonfinite_before_any_checkpoint_says_none(tmp_path, monkeypatch):
    poison_loss(monkeypatch, {1})
    with pytest.raises(TrainingError, match=r"^step 1: non-finite loss .*last good checkpoint: none$"):
        train(tmp_path)


class Interrupted(Exception):
    pass


def test_fp16_skips_and_counts_nonfinite_steps_across_a_resume(tmp_path, monkeypatch):
    # accelerate has no loss scaler on a CPU (fp16 autocast is a no-op there): the loop's own skip is tested;
    # with a scaler (GPU) the same branch lets the scaler skip the update and lower the scale
    # step 3 is skipped and is a save step: its checkpoint is still written
    poison_loss(monkeypatch, {3, 5})
    real_save = loop_module.save_checkpoint
    seen = {}

    def save_then_stop(output_dir, step, model, meta, state, limit, **kwargs):
        seen["prefix_at_3"] = model.transformer.prefix_encoder.embedding.weight.detach().clone()
        real_save(output_dir, step, model, meta, state, limit, **kwargs)
        raise Interrupted

    monkeypatch.setattr(loop_module, "save_checkpoint", save_then_stop)
    with pytest.raises(Interrupted):
        train(tmp_path, "train.mixed_precision=fp16")
    monkeypatch.setattr(loop_module, "save_checkpoint", real_save)
    assert torch.isfinite(seen["prefix_at_3"]).all()  # the skipped step 3 did not apply its NaN gradients
    result = train(tmp_path, "train.mixed_precision=fp16", "train.resume_from=latest")
    assert result.step == 6 and result.checkpoint == tmp_path / "checkpoint-6"
    rows = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 4, 6]
    skips = [(r["step"], r["skipped_nonfinite_steps"]) for r in rows if "loss" not in r and "skipped_nonfinite_steps" in r]
    assert skips == [(3, 1), (5, 2)]
    # the count survived the resume: the metric covers the whole run
    assert [r["skipped_nonfinite_steps"] for r in rows if "loss" in r] == [0, 0, 1, 2]
    assert all(torch.isfinite(v).all() for v in load_file(str(result.checkpoint / "prefix.safetensors")).values())


def test_a_nonfinite_prefix_is_never_written(tmp_path):
    model = load_model(ModelConfig())
    meta = prefix_metadata(model.config, "builtin:tiny-chatglm")
    save_checkpoint(tmp_path, 3, model, meta)
    with torch.no_grad():
        model.transformer.prefix_encoder.embedding.weight[0, 0] = float("inf")
    with pytest.raises(CheckpointError, match=r"step 6: the prefix has non-finite values "
                                              r"\(transformer\.prefix_encoder\.embedding\.weight\); not saved"):
        save_checkpoint(tmp_path, 6, model, meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]


# ---- storage faults ----


@pytest.mark.parametrize(("writer", "code"), [("save_safetensors", errno.ENOSPC), ("save_torch", errno.ENOSPC),
                                              ("save_torch", errno.EACCES)])
def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, writer, code):
    # tests run as root, which a read-only folder would not stop: the write itself fails instead (as a full
    # disk's does: ptuning.weights turns what torch and safetensors report into the OSError of the write)
    before = {}
    real = getattr(checkpoint_module, writer)
    calls = {"n": 0}

    def second_call_fails(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            return real(obj, path, *args, **kwargs)
        before.update({p.name: p.read_bytes() for p in (tmp_path / "checkpoint-3").iterdir()})
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(checkpoint_module, writer, second_call_fails)
    if code == errno.ENOSPC:
        expected = (f"no space left on device writing {tmp_path / 'checkpoint-6'}; the last complete checkpoint is "
                    f"{tmp_path / 'checkpoint-3'}; free space and continue with train.resume_from=auto")
    else:
        expected = f"{tmp_path / 'checkpoint-6'}: writing the checkpoint failed (Permission denied); earlier checkpoints are intact"
    with pytest.raises(TrainingError) as stopped:
        train(tmp_path)
    assert str(stopped.value) == expected
    assert sorted(p.name for p in tmp_path.iterdir() if "checkpoint" in p.name) == ["checkpoint-3"]  # no .tmp-
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoint-3").iterdir()} == before
    assert not (tmp_path / ".ptuning.lock").exists()  # the run let go of its folder
    if code == errno.ENOSPC:  # once space is back, the command the line gives continues from the intact checkpoint
        monkeypatch.undo()
        assert train(tmp_path, "train.resume_from=auto").step == 6


def test_a_full_disk_before_the_first_checkpoint_or_in_the_log_is_one_line_too(tmp_path, monkeypatch):
    def no_space(obj, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(checkpoint_module, "save_torch", no_space)
    with pytest.raises(TrainingError) as stopped:
        train(tmp_path / "first")
    assert str(stopped.value) == (
        f"no space left on device writing {tmp_path / 'first' / 'checkpoint-3'}; the run has no complete checkpoint "
        "yet; free space and start it again with train.resume_from=auto")
    assert sorted(p.name for p in (tmp_path / "first").iterdir()) == [".cache", "run_config.json", "train_log.jsonl"]
    monkeypatch.undo()
    assert train(tmp_path / "first", "train.resume_from=auto").step == 6  # it starts over

    appends = {"n": 0}

    def log_full_after_step_3(file, mode="r", *args, **kwargs):
        if mode == "a":
            appends["n"] += 1
            if appends["n"] > 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return open(file, mode, *args, **kwargs)

    monkeypatch.setattr(run_folder_module, "open", log_full_after_step_3, raising=False)
    with pytest.raises(TrainingError) as stopped:
        train(tmp_path / "log")
    assert str(stopped.value) == (
        f"no space left on device writing {tmp_path / 'log' / 'train_log.jsonl'}; the last complete checkpoint is "
        f"{tmp_path / 'log' / 'checkpoint-3'}; free space and continue with train.resume_from=auto")


def test_a_real_full_disk_stops_the_run_in_one_line_and_the_command_it_gives_continues(tmp_path):
    """A 300 KB tmpfs holds one checkpoint of the built-in model (213 KB), not two."""
    with small_disk(tmp_path / "disk", "300k") as disk:
        out = disk / "run"

        def train_py(*extra):
            args = [sys.executable, "train.py", "data.max_train_samples=64", "data.max_eval_samples=8",
                    "train.max_steps=60", "train.save_steps=20", "train.eval_steps=20", "train.eval_generation=false",
                    "train.plot=false", f"train.output_dir={out}", f"data.cache_dir={tmp_path / 'cache'}", *extra]
            return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)

        proc = train_py()
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert errors == [f"error: no space left on device writing {out / 'checkpoint-40'}; the last complete "
                          f"checkpoint is {out / 'checkpoint-20'}; free space and continue with "
                          "train.resume_from=auto"], proc.stderr[-3000:]
        assert sorted(p.name for p in out.iterdir()) == ["checkpoint-20", "run_config.json", "train_log.jsonl"]
        assert sorted(p.name for p in (out / "checkpoint-20").iterdir()) == [
            "prefix.safetensors", "prefix_config.json", "training_state.pt"]
        resize_disk(disk, "8m")
        proc = train_py("train.resume_from=auto")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"resumed from {out / 'checkpoint-20'} at step 20" in proc.stdout
        assert "done: step 60" in proc.stdout


# ---- safe loading ----


def test_bin_weights_load_with_weights_only_and_a_pickle_payload_never_runs(tmp_path, monkeypatch):
    folder = tmp_path / "bin-model"
    folder.mkdir()
    for name in ("config.json", "ice_text.model"):
        (folder / name).write_bytes((BUILTIN_MODEL / name).read_bytes())
    save_weights(load_file(str(BUILTIN_MODEL / "model.safetensors")), folder, safe=False, max_shard_bytes=1_000_000)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_model(ModelConfig(path=str(folder)))
    assert len(calls) > 1 and all(flag is True for flag in calls)
    marker = tmp_path / "PAYLOAD_RAN"
    torch.save({"transformer.word_embeddings.weight": Payload(marker)}, folder / "evil.bin")
    with pytest.raises(CheckpointError, match=r"evil\.bin: cannot read weights \(it holds Python objects that "
                                              r"the safe loader .* refuses, so nothing in it was run"):
        read_weights(folder / "evil.bin")
    assert not marker.exists()


def test_auto_map_never_imports_remote_code(tmp_path):
    folder = tmp_path / "remote-code-model"
    folder.mkdir()
    for name in ("model.safetensors", "ice_text.model"):
        (folder / name).write_bytes((BUILTIN_MODEL / name).read_bytes())
    marker = tmp_path / "REMOTE_CODE_RAN"
    for module in ("configuration_chatglm", "modeling_chatglm", "tokenization_chatglm"):
        (folder / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').write({module!r})\n")
    config = json.loads((BUILTIN_MODEL / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_chatglm.ChatGLMConfig",
        "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
    }
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((BUILTIN_MODEL / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    cfg = ModelConfig(path=str(folder))
    model = load_model(cfg)
    load_tokenizer(cfg, vocab_size=model.config.vocab_size)
    assert not marker.exists()
    assert not any(name.endswith(("configuration_chatglm", "modeling_chatglm", "tokenization_chatglm"))
                   for name in sys.modules)


def test_data_files_are_never_unpickled():
    # the data pipeline reads bytes as UTF-8 text and parses JSON / CSV only; nothing in it can unpickle
    # (the bad-input corpus feeds it pickles too: tests/test_bad_inputs.py, data-pickle-*)
    unsafe = re.compile(r"\b(pickle|dill|marshal|joblib)\b|torch\.load|\beval\(|\bexec\(")
    for path in sorted((ROOT / "ptuning" / "data").glob("*.py")):
        found = unsafe.search(path.read_text())
        assert found is None, f"{path.name} uses {found.group(0)}"


# ---- determinism ----


def test_same_seed_same_loss_curve(tmp_path):
    train(tmp_path / "a", "train.max_steps=4")
    train(tmp_path / "b", "train.max_steps=4")
    a, b = log_records(tmp_path / "a"), log_records(tmp_path / "b")
    assert [r["step"] for r in a if "loss" in r] == [1, 2, 3, 4]
    assert a == b  # losses, learning rates, gradient norms and evaluation losses, exactly
    pa = load_file(str(tmp_path / "a" / "checkpoint-4" / "prefix.safetensors"))
    pb = load_file(str(tmp_path / "b" / "checkpoint-4" / "prefix.safetensors"))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


# ---- what a GPU run keeps and gathers, checked on a CPU ----


class FakeCuda:
    """``torch.cuda``'s generator calls for ``devices`` GPUs, each a CPU generator: what a checkpoint must record
    on a GPU machine, on a machine without one."""

    def __init__(self, devices: int = 1):
        self.generators = [torch.Generator().manual_seed(1000 + i) for i in range(devices)]

    def get_rng_state(self, device: int = 0) -> torch.Tensor:
        return self.generators[device].get_state()

    def get_rng_state_all(self) -> list[torch.Tensor]:
        return [g.get_state() for g in self.generators]

    def set_rng_state_all(self, states) -> None:
        for generator, state in zip(self.generators, states, strict=True):
            generator.set_state(state)

    def manual_seed_all(self, seed: int) -> None:
        for generator in self.generators:
            generator.manual_seed(seed)


def on_this_machine(monkeypatch, fake: FakeCuda) -> None:
    monkeypatch.setattr(checkpoint_module, "get_torch_accelerator_backend", lambda: ("cuda", fake))


def test_a_checkpoint_records_and_restores_every_generator_the_run_draws_from(monkeypatch):
    fake = FakeCuda(devices=2)
    on_this_machine(monkeypatch, fake)

    def draws():
        return (random.random(), float(np.random.rand()), torch.rand(1).item(),
                *(torch.rand(1, generator=g).item() for g in fake.generators))

    draws()
    buffer = io.BytesIO()
    torch.save(checkpoint_module.capture_rng(), buffer)  # as the checkpoint stores it, and reads it back
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["device_type"] == "cuda" and len(saved["device"]) == 2
    first = draws()
    assert draws() != first
    assert checkpoint_module.restore_rng(saved) is None
    assert draws() == first  # Python, NumPy, torch's CPU generator and both GPUs' draw the same again
    # resumed on a machine with one GPU: the CPU generators are restored, the run says dropout will differ
    on_this_machine(monkeypatch, FakeCuda(devices=1))
    assert checkpoint_module.restore_rng(saved) == (
        "its random state covers 2 cuda device(s), this machine has 1 cuda device(s): dropout will not draw what "
        "an unbroken run would")
    assert draws()[:3] == first[:3]


def test_without_a_gpu_the_cpu_generators_are_kept_and_a_gpu_machines_checkpoint_resumes_with_a_warning():
    """The path a run on a machine without an accelerator takes (no fake: accelerate's own answer here)."""
    if checkpoint_module.device_generators() != (None, None):
        pytest.skip("this machine has an accelerator: the path is the one the fake GPUs above take")

    def draws():
        return random.random(), float(np.random.rand()), torch.rand(1).item()

    saved = checkpoint_module.capture_rng()
    assert set(saved) == {"python", "numpy", "torch"}  # nothing recorded for devices this machine lacks
    first = draws()
    assert checkpoint_module.restore_rng(saved) is None
    assert draws() == first
    # a checkpoint written on a machine with 2 GPUs: the CPU generators come back; the GPUs' cannot, and it says so
    from_gpus = {**saved, "device_type": "cuda", "device": [torch.Generator().manual_seed(i).get_state() for i in (1, 2)]}
    assert checkpoint_module.restore_rng(from_gpus) == (
        "its random state covers 2 cuda device(s), this machine has 0 GPU device(s): dropout will not draw what an "
        "unbroken run would")
    assert draws() == first
    # a checkpoint written before NumPy's and the devices' states were recorded resumes as it did
    assert checkpoint_module.restore_rng({"python": saved["python"], "torch": saved["torch"]}) is None
    assert (random.random(), torch.rand(1).item()) == (first[0], first[2])


def test_a_gpu_machines_checkpoint_resumes_on_a_cpu_saying_dropout_will_differ(tmp_path, monkeypatch, capsys):
    if checkpoint_module.device_generators() != (None, None):
        pytest.skip("this machine has an accelerator")
    full = train(tmp_path / "full")
    real_save = loop_module.save_checkpoint

    def save_then_stop(*args, **kwargs):
        real_save(*args, **kwargs)
        raise Interrupted

    with monkeypatch.context() as patch:
        patch.setattr(loop_module, "save_checkpoint", save_then_stop)
        with pytest.raises(Interrupted):
            train(tmp_path / "cut")
    path = tmp_path / "cut" / "checkpoint-3" / "training_state.pt"
    state = torch.load(path, weights_only=True)
    state["rng"][0].update(device_type="cuda", device=[torch.Generator().manual_seed(7).get_state()])
    torch.save(state, path)
    capsys.readouterr()
    resumed = train(tmp_path / "cut", "train.resume_from=latest")
    assert re.search(r"^warning: \S*checkpoint-3: its random state covers 1 cuda device\(s\), this machine has 0 GPU "
                     r"device\(s\): dropout will not draw what an unbroken run would$", capsys.readouterr().err, re.M)
    # what the CPU drew (prefix dropout 0.1 here) came back: the run still ends as the unbroken one
    assert_same_checkpoint(full.checkpoint, resumed.checkpoint)


def test_resume_restores_the_gpu_generator_that_prefix_dropout_draws_from(tmp_path, monkeypatch):
    """On a GPU, prefix dropout (0.1 in the tiny preset, as in every real one) draws from the CUDA generator, which
    ``set_seed`` re-seeds when a run resumes. Here every dropout draws from a fake GPU's generator."""
    fake = FakeCuda()
    on_this_machine(monkeypatch, fake)
    real_seed = loop_module.set_seed

    def set_seed(seed):  # accelerate's set_seed seeds every GPU too
        real_seed(seed)
        fake.manual_seed_all(seed)

    def dropout_on_the_gpu(input, p=0.5, training=True, inplace=False):
        if not training or p == 0:
            return input
        keep = torch.empty_like(input).bernoulli_(1 - p, generator=fake.generators[0])
        return input * keep / (1 - p)

    monkeypatch.setattr(loop_module, "set_seed", set_seed)
    monkeypatch.setattr(torch.nn.functional, "dropout", dropout_on_the_gpu)
    full = train(tmp_path / "full")
    real_save = loop_module.save_checkpoint

    def save_then_stop(*args, **kwargs):
        real_save(*args, **kwargs)
        raise Interrupted

    monkeypatch.setattr(loop_module, "save_checkpoint", save_then_stop)
    with pytest.raises(Interrupted):
        train(tmp_path / "cut")
    monkeypatch.setattr(loop_module, "save_checkpoint", real_save)
    state = torch.load(tmp_path / "cut" / "checkpoint-3" / "training_state.pt", weights_only=True)
    # the GPU generator had moved on from its seed: re-seeding it alone would repeat step 1's dropout masks
    assert not torch.equal(state["rng"][0]["device"][0], torch.Generator().manual_seed(42).get_state())
    resumed = train(tmp_path / "cut", "train.resume_from=latest")
    assert_same_checkpoint(full.checkpoint, resumed.checkpoint)
    assert log_records(tmp_path / "full") == log_records(tmp_path / "cut")


def tensors_in(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors_in(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in tensors_in(v)]
    return []


def test_every_tensor_a_save_gathers_is_on_the_cpu(tmp_path, monkeypatch):
    """Under DeepSpeed every process's ZeRO optimizer part is gathered for the checkpoint; its tensors live on the
    GPU, and a CUDA tensor sent to another process is rebuilt on that process's GPU. Here a recipe pretends to run
    under DeepSpeed with its optimizer state on a (fake) GPU; what reaches the gathers must be on the CPU."""
    recipe = loop_module.Recipe(job(tmp_path), None, loop_module._Progress())
    reset_accelerate()
    recipe.setup()
    with FakeTensorMode(allow_non_fake_inputs=True):
        on_gpu = {"exp_avg": torch.zeros(16, 1024, device="cuda"), "step": torch.zeros((), device="cuda")}
    zero_part = {"state": {0: on_gpu}, "param_groups": [{"params": [0], "lr": 0.1}]}
    gathered: list = []

    def gather_objects(items):
        gathered.extend(items)
        return list(items)

    recipe.deepspeed = True
    monkeypatch.setattr(loop_module, "gathered", lambda params, deepspeed: nullcontext())
    monkeypatch.setattr(recipe.optimizer, "state_dict", lambda: zero_part)
    monkeypatch.setattr(recipe.comm, "gather_objects", gather_objects)
    monkeypatch.setattr(loop_module, "save_checkpoint", lambda *args, **kwargs: tmp_path / "not-written")
    on_this_machine(monkeypatch, FakeCuda())
    recipe.save()
    found = tensors_in(gathered)
    assert sum(isinstance(t, FakeTensor) for t in found) == 2  # the optimizer's two went through the gathers
    assert {t.device.type for t in found} == {"cpu"}


def test_fp16_loss_scaling_logs_the_unscaled_gradient_norm_and_trains_as_without_it(tmp_path, monkeypatch):
    """fp16 on a GPU scales the loss by 65536 before the backward (torch.amp.GradScaler); the gradient norm that is
    logged, checked and clipped is the unscaled one. On a CPU accelerate makes no scaler: one is given to it, and
    its autocast left out (fp16 matmuls on a CPU would change the numbers). Scaling by a power of two and back is
    exact, so the run equals one without a scaler, with clipping (train.max_grad_norm) and without."""
    real_accelerator, real_build = loop_module.make_accelerator, loop_module.Recipe._build_optimizer

    def with_a_loss_scaler(cfg):
        accelerator, comm = real_accelerator(cfg)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=65536.0)  # before prepare: the optimizer's
        accelerator.autocast = nullcontext
        return accelerator, comm

    def build(self):
        real_build(self)
        self.accelerator.native_amp = True  # as accelerate sets it on a GPU (after prepare: no autocast forward)

    for clip in ("train.max_grad_norm=null", "train.max_grad_norm=0.01"):
        plain = train(tmp_path / f"plain{clip[-4:]}", clip, "train.max_steps=3")
        with monkeypatch.context() as patch:
            patch.setattr(loop_module, "make_accelerator", with_a_loss_scaler)
            patch.setattr(loop_module.Recipe, "_build_optimizer", build)
            scaled = train(tmp_path / f"scaled{clip[-4:]}", clip, "train.max_steps=3", "train.mixed_precision=fp16")
        norms = [[r["grad_norm"] for r in log_records(out.output_dir) if "grad_norm" in r] for out in (plain, scaled)]
        assert len(norms[0]) == 3 and norms[0] == norms[1], (clip, norms)
        assert [r["skipped_nonfinite_steps"] for r in log_records(scaled.output_dir) if "loss" in r] == [0, 0, 0]
        a, b = load_file(str(plain.checkpoint / "prefix.safetensors")), load_file(str(scaled.checkpoint / "prefix.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), clip
