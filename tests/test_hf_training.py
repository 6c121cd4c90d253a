"""The transformers-decoder family end to end on the built-in tiny GLM-4 (``data/tiny-glm4``): ``train.py``
learns and ``evaluate.py`` reproduces it, a recipe preset on a saved copy, chat, two processes and DeepSpeed
ZeRO-3 equal one process, a killed run resumes bitwise, a quantized backbone trains, and the exports say what
they cannot carry."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from ptuning.build import load
from ptuning.config import ModelConfig
from ptuning.models import Conversation
from ptuning.quantization import QuantizedLinear, block_linears

from .common import ROOT
from .test_distributed import ACCELERATE, FAST, free_port, max_diff, prefix
from .test_distributed import env as one_thread_env
from .test_reliability import assert_same_checkpoint, checkpoint_names, log_records, train_cli

TINY_GLM4 = ROOT / "data" / "tiny-glm4"
QUICK = ["train.eval_generation=false", "train.eval_before_training=false", "train.plot=false"]


def run(*args, timeout=600, check=True):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=one_thread_env())
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A short run of ``python train.py model=tiny_glm4`` with the base model (no prefix) scored first."""
    out = tmp_path_factory.mktemp("tiny-glm4")
    proc = run("train.py", "model=tiny_glm4", "train.max_steps=60", "train.save_steps=60", "train.eval_steps=null",
               "data.max_eval_samples=32", "train.plot=false", f"train.output_dir={out}",
               f"data.cache_dir={out}/.cache")
    return out, proc


@pytest.mark.slow
def test_tiny_glm4_run_learns_and_evaluate_reproduces_it(tuned, tmp_path):
    out, proc = tuned
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < 0.8 * losses[0], losses
    base = next(r for r in records if r["step"] == 0 and "eval_rouge-l" in r)
    done = [r for r in records if r["step"] == 60 and "eval_rouge-l" in r][-1]
    assert done["eval_rouge-l"] >= base["eval_rouge-l"] + 5, (base, done)
    assert "base model (no prefix) -> tuned prefix" in proc.stdout
    meta = json.loads((out / "checkpoint-60" / "prefix_config.json").read_text())
    assert (meta["family"], meta["base_model"], meta["prompt_format"]) == ("hf", "builtin:tiny-glm4", "plain")
    assert (meta["num_layers"], meta["num_key_value_heads"], meta["head_dim"], meta["pre_seq_len"]) == (4, 2, 32, 16)
    run("evaluate.py", "model.path=builtin:tiny-glm4", f"prefix_checkpoint={out / 'checkpoint-60'}",
        f"output_dir={tmp_path / 'eval'}", "data.max_eval_samples=32", f"data.cache_dir={tmp_path}/cache")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for key in ("bleu-4", "rouge-1", "rouge-2", "rouge-l"):
        assert metrics[key] == pytest.approx(done[f"eval_{key}"], abs=1e-6), key
    first = json.loads((tmp_path / "eval" / "generated_predictions.jsonl").read_text().splitlines()[0])
    assert first["prompt"].startswith("[gMASK]<sop>类型#")  # ADGEN rows: plain prompt, no chat template


def test_a_prefix_of_another_family_is_refused_in_one_line(tuned, tmp_path):
    out, _ = tuned
    proc = run("evaluate.py", f"prefix_checkpoint={out / 'checkpoint-60'}", f"output_dir={tmp_path / 'eval'}",
               "data.max_eval_samples=4", f"data.cache_dir={tmp_path}/cache", check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert last.endswith("checkpoint-60: the prefix was trained on a transformers decoder model (builtin:tiny-glm4) "
                         "but the model is a ChatGLM-6B model"), last


def test_chat_with_a_plain_prefix_and_with_the_chat_template(tuned):
    out, _ = tuned
    message = "类型#裤*颜色#黑色*风格#通勤*裤型#工装裤*裤长#长裤*裤腰型#高腰\n"
    for flags, rendered in ((["--plain"], "[gMASK]<sop>类型#裤"), ([], "[gMASK]<sop><|user|>\n类型#裤")):
        proc = subprocess.run(
            [sys.executable, "-m", "ptuning.chat", "--model-path", "builtin:tiny-glm4", "--prefix-checkpoint",
             str(out / "checkpoint-60"), "--show-prompt", "--max-new-tokens", "32", *flags],
            cwd=ROOT, input=message + message + "exit\n", capture_output=True, text=True, timeout=300,
            env=one_thread_env(),
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        prompts = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith('{"turn"')]
        assert [p["prompt"].startswith(rendered) for p in prompts] == [True, True]
        # the chat template carries the first turn into the second; plain prompts stand alone
        assert (prompts[1]["prompt_tokens"] > prompts[0]["prompt_tokens"]) == (not flags)
        answers = [line for line in proc.stdout.splitlines() if "Assistant: " in line]
        assert len(answers) == 2 and len(answers[0].split("Assistant: ", 1)[1]) > 5, proc.stdout
        # the checkpoint says its prompts were plain: without --plain, chat says how to match them
        assert ("note: this prefix was trained on plain prompts" in proc.stderr) == (not flags)


@pytest.mark.slow
def test_recipe_preset_on_a_saved_copy_trains_with_checkpointing(tmp_path):
    folder = tmp_path / "glm-4-9b-chat-hf"
    shutil.copytree(TINY_GLM4, folder)
    run("train.py", "conf=glm4_adgen", f"model.path={folder}", "model.dtype=float32", "data=adgen_sample",
        "train.max_steps=2", "train.save_steps=2", "data.max_eval_samples=4", *QUICK,
        f"train.output_dir={tmp_path / 'out'}", f"data.cache_dir={tmp_path}/cache")
    meta = json.loads((tmp_path / "out" / "checkpoint-2" / "prefix_config.json").read_text())
    assert meta["pre_seq_len"] == 128 and meta["base_model"] == str(folder.resolve())
    state = json.loads((tmp_path / "out" / "run_config.json").read_text())
    assert state["model"]["gradient_checkpointing"] is True and state["train"]["gradient_accumulation_steps"] == 16


def test_quantized_backbone_trains_the_prefix():
    full = load(ModelConfig(path="builtin:tiny-glm4", prefix_dropout=0.0))
    quantized = load(ModelConfig(path="builtin:tiny-glm4", prefix_dropout=0.0, quantization_bit=8))
    linears = block_linears(quantized.model, quantized.family.block_linear_names())
    # q, k, v, o, gate_up, down in each of 4 layers
    assert len(linears) == 24 and all(isinstance(m, QuantizedLinear) for _, m in linears)
    quantized.model.prefix_encoder.load_state_dict(full.model.prefix_encoder.state_dict())
    row = full.template.train_row(Conversation(query="类型#裙*颜色#白色", plain=True), "这条白色裙子。", 64, 64)
    ids, labels = torch.tensor([row.input_ids]), torch.tensor([row.labels])
    reference = full.model(ids, labels=labels).loss
    loss = quantized.model(ids, labels=labels).loss
    assert abs(loss.item() - reference.item()) < 0.05 * reference.item()
    loss.backward()
    assert quantized.model.prefix_encoder.embedding.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["peft", "original", "full"])
def test_exports_a_transformers_prefix_cannot_take_say_why(tuned, tmp_path, kind):
    out, _ = tuned
    proc = subprocess.run([sys.executable, "-m", "ptuning.export", kind, "--checkpoint", str(out / "checkpoint-60"),
                           "--out", str(tmp_path / "export")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {kind} export of a transformers decoder prefix: ")
    assert not (tmp_path / "export").exists()


# ---------------------------------------------------------------- processes and resume


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single-glm4")
    run("train.py", "model=tiny_glm4", *FAST, f"train.output_dir={out}", f"data.cache_dir={out}/.cache",
        "train.per_device_batch_size=8")
    return out


@pytest.mark.multiproc
def test_two_processes_equal_one(single, tmp_path):
    proc = subprocess.run(
        [*ACCELERATE, "--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port()), "train.py",
         "model=tiny_glm4", *FAST, f"train.output_dir={tmp_path}", f"data.cache_dir={tmp_path}/.cache",
         "train.per_device_batch_size=4"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=one_thread_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 process(es)" in proc.stdout
    assert max_diff(prefix(single), prefix(tmp_path)) <= 1e-5


@pytest.mark.multiproc
def test_deepspeed_zero3_equals_one_process_and_resumes_exactly(single, tmp_path):
    config = ROOT / "launch" / "accelerate" / "deepspeed_zero3.yaml"
    args = [*ACCELERATE, "--config_file", str(config), "--main_process_port", str(free_port()), "train.py",
            "model=tiny_glm4", *FAST, "train.per_device_batch_size=4"]

    def launch(out, *extra):
        proc = subprocess.run([*args, f"train.output_dir={out}", f"data.cache_dir={out}/.cache", *extra], cwd=ROOT,
                              capture_output=True, text=True, timeout=300, env=one_thread_env())
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    launch(tmp_path / "full")
    assert max_diff(prefix(single), prefix(tmp_path / "full")) <= 1e-5
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "cut" / "checkpoint-2")
    assert "resumed from" in launch(tmp_path / "cut", "train.resume_from=latest").stdout
    a, b = prefix(tmp_path / "full"), prefix(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.multiproc
def test_evaluate_under_a_zero3_launch_loads_the_model_whole_and_equals_one_process(single, tmp_path):
    # transformers partitions a model at load under a ZeRO-3 launch; evaluation hands it to no DeepSpeed engine
    # (it failed with "Padding_idx must be within num_embeddings" at the first decode)
    config = ROOT / "launch" / "accelerate" / "deepspeed_zero3.yaml"
    common = ["evaluate.py", "model=tiny_glm4", f"prefix_checkpoint={single / 'checkpoint-4'}",
              "data.max_eval_samples=5", "generation.max_new_tokens=8", f"data.cache_dir={tmp_path}/.cache"]
    run(*common, f"output_dir={tmp_path / 'one'}")
    proc = subprocess.run([*ACCELERATE, "--config_file", str(config), "--main_process_port", str(free_port()),
                           *common, f"output_dir={tmp_path / 'zero3'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=one_thread_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "with 2 process(es)" in proc.stdout
    rows = [(tmp_path / name / "generated_predictions.jsonl").read_text() for name in ("one", "zero3")]
    assert rows[0] == rows[1] and rows[0].count("\n") == 5


EVALUATING = ["data.max_eval_samples=5", "train.eval_before_training=true", "train.eval_generation=true",
              "train.max_new_tokens=4", "train.eval_batch_size=2", "train.eval_steps=2"]


@pytest.mark.multiproc
def test_fsdp2_equals_one_process_and_evaluates_rows_the_processes_split_unevenly(tmp_path):
    """FSDP2 with gradient checkpointing; 5 validation rows (3 and 2 per process): the loss evaluation runs as many
    sharded forwards on each process, and generation decodes on the gathered model."""
    run("train.py", "model=tiny_glm4", *FAST, *EVALUATING, f"train.output_dir={tmp_path / 'one'}",
        f"data.cache_dir={tmp_path}/.cache", "train.per_device_batch_size=8")
    config = ROOT / "launch" / "accelerate" / "fsdp2.yaml"
    proc = subprocess.run(
        [*ACCELERATE, "--config_file", str(config), "--main_process_port", str(free_port()), "train.py",
         "model=tiny_glm4", *FAST, *EVALUATING, "model.gradient_checkpointing=true",
         f"train.output_dir={tmp_path / 'two'}", f"data.cache_dir={tmp_path}/.cache2", "train.per_device_batch_size=4"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=one_thread_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 Glm4DecoderLayer" in proc.stdout and proc.stdout.count("base model (no prefix) -> tuned prefix on ") == 1
    assert max_diff(prefix(tmp_path / "one"), prefix(tmp_path / "two")) <= 1e-5
    one, two = (log_records(tmp_path / name) for name in ("one", "two"))
    losses = [[(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r] for records in (one, two)]
    assert [step for step, _ in losses[1]] == [0, 2, 4]
    assert all(abs(a - b) <= 1e-5 for (_, a), (_, b) in zip(*losses, strict=True)), losses
    assert [r["step"] for r in two if "eval_rouge-l" in r] == [0, 4]


@pytest.mark.slow
def test_killed_mid_step_resumes_bitwise(tmp_path):
    cache, full, cut = tmp_path / "cache", tmp_path / "full", tmp_path / "cut"
    done = train_cli(full, cache, "model=tiny_glm4")
    assert done.returncode == 0, done.stderr[-3000:]
    killed = train_cli(cut, cache, "model=tiny_glm4", kill="step@5")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert checkpoint_names(cut) == ["checkpoint-3"]
    killed = train_cli(cut, cache, "model=tiny_glm4", "train.resume_from=latest", kill="saved@9")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = train_cli(cut, cache, "model=tiny_glm4", "train.resume_from=latest")
    assert resumed.returncode == 0 and "done: step 10" in resumed.stdout, resumed.stderr[-3000:]
    for name in ("checkpoint-9", "checkpoint-10"):
        assert_same_checkpoint(full / name, cut / name)
    assert log_records(cut) == log_records(full)


@pytest.mark.parametrize(("config", "expect"), [
    ({"architectures": ["MambaForCausalLM"], "model_type": "mamba"},
     r"^error: model.path=.*config.json: no model family handles architectures=\['MambaForCausalLM'\], "
     r"model_type='mamba'; supported: .*Qwen3ForCausalLM"),
    ({"architectures": ["ChatGLMModel"], "model_type": "chatglm", "auto_map": {"AutoModel": "modeling_chatglm.X"}},
     r"^error: model.path=.* is defined only by remote code \(auto_map\), which is never run; convert the "
     r"checkpoint to a transformers-native layout .*GlmForCausalLM"),
])
def test_train_py_on_an_unsupported_folder_is_one_line(tmp_path, config, expect):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_chatglm.py").write_text("raise SystemExit('remote code ran')\n")
    proc = run("train.py", f"model.path={folder}", f"train.output_dir={tmp_path / 'out'}", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-2000:]
    assert re.match(expect, lines[0]), lines[0]
    assert not (tmp_path / "out").exists()
