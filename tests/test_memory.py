"""``ptuning.memory``: the estimate against measured weight bytes, saved activations, the profiler's tensor
peak and the peak RSS of a fresh process.

Stated tolerances: weight bytes exact; activations autograd saves within 3%; the tensor peak of a train
step (torch profiler memory timeline) within 3%; the peak RSS rise of a fresh process (with an allocator
that returns freed memory at once) between the estimate and the estimate + 15% (the runtime's own buffers).
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest
import torch

from ptuning.memory import ModelShape, estimate, main, weight_bytes
from ptuning.models.chatglm import ChatGLMForConditionalGeneration, tiny_config
from ptuning.prefix import mark_only_prefix_trainable
from ptuning.quantization import quantize_backbone
from ptuning.quantization import weight_bytes as measured_weight_bytes

from .common import ROOT, saved_activation_bytes
from .test_quantization import bench_model

GIB = 2**30


def bench_batch(config, batch, seq):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.mask_token_id, (batch, seq), generator=g)
    ids[:, seq // 2 - 1] = config.gmask_token_id
    ids[:, seq // 2] = config.bos_token_id
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    return ids, labels


def model_at(setting, config_overrides=None, bench=False):
    dtype = torch.float32 if setting == "fp32" else torch.bfloat16
    if bench:
        model = bench_model(dtype)
    else:
        model = ChatGLMForConditionalGeneration(tiny_config(**(config_overrides or {}))).to(dtype)
        model.transformer.prefix_encoder.float()
    if setting in ("int8", "int4"):
        quantize_backbone(model, int(setting[3]))
    mark_only_prefix_trainable(model)
    return model.train()


@pytest.mark.parametrize("overrides", [dict(pre_seq_len=4), dict(pre_seq_len=6, prefix_projection=True)])
@pytest.mark.parametrize("setting", ["fp32", "bf16", "int8", "int4"])
def test_weight_bytes_are_exact(setting, overrides):
    model = model_at(setting, overrides)
    assert measured_weight_bytes(model) == weight_bytes(ModelShape.from_config(model.config), setting)


@pytest.mark.parametrize("setting", ["fp32", "bf16"])
def test_bench_weights_and_saved_activations(setting):
    model = model_at(setting, bench=True)
    shape = ModelShape.from_config(model.config, batch=2, seq=128)
    assert measured_weight_bytes(model) == weight_bytes(shape, setting)
    ids, labels = bench_batch(model.config, 2, 128)
    # the blocks' activations plus the loss's saved float32 log-softmax [B, S-1, V]
    expected = estimate(shape, setting).activations + 4 * 2 * 127 * model.config.vocab_size
    assert saved_activation_bytes(model, ids, labels) == pytest.approx(expected, rel=0.03)


def tensor_peak(model, ids, labels, tmp_path, **forward_kwargs) -> int:
    """Peak bytes of live CPU tensors during one train step (torch profiler memory timeline)."""
    from torch.profiler import ProfilerActivity, profile

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])

    def step():
        out = model(input_ids=ids, labels=labels, **forward_kwargs)  # kept, logits and all, to the step's end
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # AdamW's moments exist from the second step on
    with profile(
        activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True
    ) as prof:
        step()
    prof.export_memory_timeline(str(tmp_path / "timeline.json"), device="cpu")
    _, sizes = json.loads((tmp_path / "timeline.json").read_text())  # [times, [bytes by category]]
    return max(sum(row) for row in sizes)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("checkpointing", [False, True])
def test_tensor_peak_of_a_train_step(checkpointing, tmp_path):
    model = model_at("bf16", bench=True)
    if checkpointing:
        model.gradient_checkpointing_enable()
    ids, labels = bench_batch(model.config, 2, 128)
    shape = ModelShape.from_config(model.config, batch=2, seq=128, checkpointing=checkpointing)
    assert tensor_peak(model, ids, labels, tmp_path) == pytest.approx(estimate(shape, "bf16").total, rel=0.03)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_tensor_peak_when_only_target_positions_are_projected(tmp_path):
    model = model_at("int8", bench=True)
    if "return_logits" not in inspect.signature(model.forward).parameters:
        pytest.skip("the model forms every position's logits")
    ids, labels = bench_batch(model.config, 2, 128)
    positions = int((labels[:, 1:] != -100).sum()) // 2
    shape = ModelShape.from_config(model.config, batch=2, seq=128, logit_positions=positions)
    peak = tensor_peak(model, ids, labels, tmp_path, return_logits=False)
    assert peak == pytest.approx(estimate(shape, "int8").total, rel=0.03)


def test_peak_rss_of_a_fresh_process():
    """The benchmark's own child: one setting, built and trained in a new process."""
    # with glibc's default, freed blocks stay in the RSS by an amount that varies from run to run; a fixed
    # mmap threshold returns them at once, so the RSS follows the live tensors (see the benchmark)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(
        [
            sys.executable,
            "benchmarks/bench_quantization.py",
            "--child",
            "train",
            "int8",
            "2",
            "256",
            "2",
            "0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    rise = (row["peak_rss_mib"] - row["start_rss_mib"]) * 2**20
    assert row["estimate_weight_bytes"] == row["weight_bytes"]
    assert row["estimate_train_bytes"] <= rise <= 1.15 * row["estimate_train_bytes"]


def test_command_prints_the_real_model_table(capsys):
    main([])
    out = capsys.readouterr().out
    assert "28 layers" in out and "pre_seq_len 128" in out
    rows = {
        line.split("|")[1].strip(): line
        for line in out.splitlines()
        if line.startswith("| ") and "---" not in line
    }
    assert list(rows)[1:] == ["fp32", "bf16", "int8", "int4"]
    # the numbers of docs/quantization.md: real ChatGLM-6B, pre_seq_len 128, batch 1 x 128 tokens
    totals = {k: float(rows[k].rstrip(" |").rsplit("|", 1)[-1]) for k in ("fp32", "bf16", "int8", "int4")}
    assert totals == {"fp32": 26.16, "bf16": 13.32, "int8": 8.08, "int4": 5.53}
    assert "logits at 64 positions" in out
    main(["--json", "--batch", "4", "--seq", "512", "--gradient-checkpointing", "--pre-seq-len", "64"])
    data = json.loads(capsys.readouterr().out)
    assert data["shape"]["batch"] == 4 and data["shape"]["checkpointing"] is True
    assert data["shape"]["logit_positions"] == 256
    main(["--json", "--logit-positions", "0"])
    assert json.loads(capsys.readouterr().out)["shape"]["logit_positions"] is None
    est = data["estimate_bytes"]
    assert est["int4"]["total"] < est["int8"]["total"] < est["bf16"]["total"] < est["fp32"]["total"]


def test_command_reads_a_config(capsys):
    main(["--config", str(ROOT / "data" / "tiny-chatglm"), "--pre-seq-len", "16", "--json"])
    data = json.loads(capsys.readouterr().out)
    assert (
        data["shape"]["hidden"] == 128 and data["shape"]["layers"] == 4 and data["shape"]["pre_seq_len"] == 16
    )


def test_a_config_without_pre_seq_len_estimates_the_documented_default_prefix_in_mib(capsys):
    main(["--config", str(ROOT / "data" / "tiny-glm4"), "--json"])
    assert json.loads(capsys.readouterr().out)["shape"]["pre_seq_len"] == 128
    main(["--config", str(ROOT / "data" / "tiny-glm4")])
    out = capsys.readouterr().out
    assert "pre_seq_len 128" in out and "| training peak MiB |" in out
    fp32 = next(line for line in out.splitlines() if line.startswith("| fp32 |"))
    assert all(float(cell) > 0 for cell in fp32.strip(" |").split("|")[1:]), fp32
    # 4 layers x 2 (keys, values) x 2 key/value heads x 32 = 512 per position
    assert "Parameters: 1.24 M (embeddings separate); prefix 65,536." in out
    main(["--config", str(ROOT / "data" / "tiny-glm4"), "--pre-seq-len", "16", "--json"])
    assert json.loads(capsys.readouterr().out)["shape"]["pre_seq_len"] == 16


def test_config_with_model_or_logit_positions_past_seq_is_a_one_line_usage_error(capsys):
    folder = str(ROOT / "data" / "tiny-glm4")
    for argv, line in [
        (["--config", folder, "--model", "chatglm-6b"],
         f"--config {folder} and --model chatglm-6b: give one (--config reads a model's shape instead of --model's "
         "published one)"),
        (["--logit-positions", "200"], "--logit-positions 200: must be 0 (all) or between 1 and seq - 1 = 127 (--seq 128)"),
    ]:
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"python -m ptuning.memory: error: {line}"


def test_a_model_no_family_takes_is_a_one_line_usage_error(capsys, tmp_path):
    folder = tmp_path / "mamba"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["MambaForCausalLM"], "model_type": "mamba"}))
    with pytest.raises(SystemExit) as stop:
        main(["--config", str(folder)])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(folder) in err and "no model family handles" in err


def test_an_unreadable_config_file_is_named_once(capsys, tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_text("not a model")
    with pytest.raises(SystemExit) as stop:
        main(["--config", str(fake)])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"python -m ptuning.memory: error: --config: {fake}: not a GGUF file (it does not start with the bytes b'GGUF')"
