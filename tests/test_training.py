"""The training loop: checkpoints, exact resume, refusals, original-format interop, wandb, faults."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState, PartialState
from safetensors.torch import load_file

from hydra_entry import to_object
from ptuning.build import load_model
from ptuning.config import ModelConfig
from ptuning.training import TrainingError, export_original, load_prefix, run
from ptuning.training import loop as loop_module
from ptuning.weights import CheckpointError

from .common import read_wandb_history
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
    with pytest.raises(TrainingError, match="already holds checkpoints .*train.resume_from=latest.*train.overwrite=true"):
        train(tmp_path)
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
    with pytest.raises(CheckpointError, match="prefix_projection=False but the model has prefix_projection=True"):
        load_prefix(model, result.checkpoint)


def test_nonfinite_loss_stops_naming_step_and_checkpoint(tmp_path, monkeypatch):
    real = loop_module.token_loss_sum
    calls = {"n": 0}

    def poisoned(model, ids, labels):
        calls["n"] += 1
        value = real(model, ids, labels)
        return value * float("nan") if calls["n"] == 5 else value

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
