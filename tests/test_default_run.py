"""`python train.py` end to end on the built-in default, Hydra multirun, and the ADGEN recipe on a saved model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ptuning.models.chatglm import ChatGLMForConditionalGeneration

from .common import ROOT

QUICK = ["train.eval_generation=false", "train.eval_before_training=false", "train.plot=false"]


def run(*args, timeout=600):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.mark.slow
def test_default_run_learns_and_evaluate_reproduces_it(tmp_path):
    out = tmp_path / "default"
    proc = run("train.py", f"train.output_dir={out}", f"data.cache_dir={tmp_path}/cache")
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < 0.5 * losses[0], losses
    base = next(r for r in records if r["step"] == 0 and "eval_rouge-l" in r)
    tuned = [r for r in records if r["step"] == 800 and "eval_rouge-l" in r][-1]
    assert tuned["eval_rouge-l"] >= base["eval_rouge-l"] + 10, (base, tuned)
    assert "base model (no prefix) -> tuned prefix" in proc.stdout
    assert (out / "loss.png").is_file() and (out / "checkpoint-800" / "prefix.safetensors").is_file()
    # evaluate.py on the same prefix gives the same numbers
    run("evaluate.py", f"prefix_checkpoint={out / 'checkpoint-800'}", f"output_dir={tmp_path / 'eval'}",
        "batch_size=32", f"data.cache_dir={tmp_path}/cache")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for key in ("bleu-4", "rouge-1", "rouge-2", "rouge-l"):
        assert metrics[key] == pytest.approx(tuned[f"eval_{key}"], abs=1e-6), key


def test_multirun_sweep_gives_each_run_its_own_folder(tmp_path):
    run("train.py", "-m", "model.pre_seq_len=4,8", "train.max_steps=2", "train.save_steps=2",
        "data.max_train_samples=32", "train.eval_steps=null", "data.max_eval_samples=4", *QUICK,
        f"hydra.sweep.dir={tmp_path}", f"data.cache_dir={tmp_path}/cache")
    folders = [p for p in tmp_path.iterdir() if (p / "checkpoint-2").is_dir()]
    assert sorted(f.name for f in folders) == ["0", "1"]  # hydra.job.num
    lengths = [json.loads((tmp_path / n / "checkpoint-2" / "prefix_config.json").read_text())["pre_seq_len"]
               for n in ("0", "1")]
    assert lengths == [4, 8]


def test_adgen_recipe_on_a_saved_model_trains_two_steps(tmp_path):
    model = ChatGLMForConditionalGeneration.from_pretrained(ROOT / "data" / "tiny-chatglm")
    model.save_pretrained(tmp_path / "model")
    for name in ("ice_text.model", "tokenizer_config.json"):
        (tmp_path / "model" / name).write_bytes((ROOT / "data" / "tiny-chatglm" / name).read_bytes())
    run("train.py", "conf=ptuning_adgen", f"model.path={tmp_path / 'model'}", "model.dtype=float32",
        "data=adgen_sample", "train.max_steps=2", "train.save_steps=2", "data.max_eval_samples=4", *QUICK,
        f"train.output_dir={tmp_path / 'out'}", f"data.cache_dir={tmp_path}/cache")
    meta = json.loads((tmp_path / "out" / "checkpoint-2" / "prefix_config.json").read_text())
    assert meta["pre_seq_len"] == 128 and meta["base_model"] == str((tmp_path / "model").resolve())
    state = json.loads((tmp_path / "out" / "run_config.json").read_text())
    assert state["train"]["gradient_accumulation_steps"] == 16 and state["train"]["learning_rate"] == 2e-2
