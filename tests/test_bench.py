"""``benchmarks/bench.py``'s train-step pieces at a small batch: the profile child and the side-by-side summary;
the model made in its dtype, the profile's GPU activity, and the matmul peak it compares with."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from .common import ROOT

SCRIPT = ROOT / "benchmarks" / "bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_profile_child_splits_the_bf16_step():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--child", "--kind", "train-profile", "--dtype", "bfloat16", "--autocast",
         "--batch", "1", "--seq", "32", "--warmup", "1", "--repeats", "1", "--threads", "1"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    parts = r["parts_s"]
    assert set(parts) == {"matmul", "attention", "loss", "other"} and all(v > 0 for v in parts.values())
    assert r["total_s"] == pytest.approx(sum(parts.values()))
    # the step's matmuls: 4 layers x 4 linears forward, their input gradients (but not layer 0's qkv, whose
    # input needs none), lm_head both ways, at 32 tokens (16 targets)
    d, inner, vocab, tokens, targets = 512, 2048, 32000, 32, 16
    block = 2 * tokens * (3 * d * d + d * d + 2 * d * inner)
    expected = 2 * 4 * block - 2 * tokens * 3 * d * d + 2 * 2 * targets * d * vocab
    assert r["matmul_flops"] == pytest.approx(expected, rel=1e-6)
    assert r["matmul_at_peak_s"] == pytest.approx(r["matmul_flops"] / r["peak_flops"])


def test_side_by_side_summary_and_verdict(bench, capsys):
    def row(step, cpu):
        return {"step_s": min(step), "median_step_s": sorted(step)[1], "rounds_step_s": step,
                "rounds_cpu_s": cpu, "best_cpu_s": min(cpu), "median_cpu_s": sorted(cpu)[1]}

    rows = {
        "train float32": row([0.60, 0.70, 0.65], [0, 0, 0]),
        "train bf16 autocast (bf16 backbone)": row([0.30, 0.40, 0.35], [0, 0, 0]),
        "train float32, 1 thread": row([1, 1, 1], [1.2, 1.3, 1.25]),
        "train bf16 autocast, 1 thread": row([1, 1, 1], [0.6, 0.7, 0.65]),
    }
    summary = bench.speedups(rows)
    assert summary["bf16_vs_fp32_best"] == pytest.approx(2.0)
    assert summary["bf16_vs_fp32_median"] == pytest.approx(0.65 / 0.35)
    assert summary["bf16_vs_original_fp32"] == pytest.approx([0.90 / 0.30, 0.94 / 0.30])
    assert summary["bf16_vs_fp32_cpu_1_thread_best"] == pytest.approx(2.0)
    bench.print_speedups(rows, summary, "7")
    out = capsys.readouterr().out
    assert "3.00-3.13x; target 4x: missed" in out and "3 alternating rounds" in out
    rows["train bf16 autocast (bf16 backbone)"] = row([0.2, 0.22, 0.21], [0, 0, 0])
    bench.print_speedups(rows, bench.speedups(rows), "7")
    assert "target 4x: met" in capsys.readouterr().out
    assert bench.speedups({"train float32": {"error": "failed"}}) is None


class Allocations(TorchDispatchMode):
    """The dtypes of every tensor of at least ``numel`` elements made while inside."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.dtypes = numel, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.numel() >= self.numel:
            self.dtypes.add(out.dtype)
        return out


def test_the_benchmark_model_is_made_in_its_dtype_without_a_float32_copy(bench):
    shape = dict(bench.BENCH, hidden_size=64, num_attention_heads=4, inner_hidden_size=256, vocab_size=1000,
                 num_layers=2, pre_seq_len=4)
    with Allocations(64 * 64) as seen:  # every backbone weight is at least hidden x hidden
        model, _ = bench.build(shape, "cpu", "bfloat16", 4)
    assert seen.dtypes == {torch.bfloat16}  # the prefix (4 x 2·2·64 numbers) is smaller; no float32 weight was made
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if "prefix_encoder" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "prefix_encoder" not in n} == {torch.bfloat16}
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["transformer.prefix_encoder.embedding.weight"]


def test_the_profile_records_the_gpus_kernels_and_counts_their_time(bench):
    from torch.profiler import ProfilerActivity

    assert bench.profile_activities("cpu") == [ProfilerActivity.CPU]
    assert bench.profile_activities("cuda:0") == [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    event = SimpleNamespace(self_cpu_time_total=10.0, self_device_time_total=2500.0)
    assert bench.self_time_s(event, "cpu") == pytest.approx(1e-5)
    assert bench.self_time_s(event, "cuda") == pytest.approx(2.5e-3)  # the kernels' time, not the launches'


def test_the_matmul_peak_times_enough_synchronised_work(monkeypatch):
    """Each timed span holds as many products as last ``min_seconds`` (a single small product is mostly clock and
    launch overhead), with the device synchronised before the clock starts and before it stops. A fake clock
    makes every product take 1 ms."""
    from ptuning import perf

    events: list[str] = []
    clock = [0.0]
    monkeypatch.setattr(perf, "_synchronizer", lambda device: lambda: events.append("sync"))
    monkeypatch.setattr(perf.time, "perf_counter", lambda: clock[0])

    class Products(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.mm:
                events.append("mm")
                clock[0] += 1e-3
            return func(*args, **(kwargs or {}))

    with Products():
        flops = perf.matmul_peak_flops(torch.float32, size=32, repeats=3, min_seconds=0.05)
    spans = "".join("s" if e == "sync" else "m" for e in events).split("s")[1::2]  # between a sync pair
    assert all(span for span in spans) and events[0] == events[-1] == "sync"
    assert len(spans[-1]) >= 50 and len(set(spans[-3:])) == 1  # the repeats time the same count of products
    assert flops == pytest.approx(2 * 32**3 / 1e-3)  # FLOPs of the products over their (fake) time


GPU_SH = ROOT / "benchmarks" / "gpu.sh"


def fake_python(folder, *, pip_error: str | None = None, no_torch: bool = False, bench_error: str | None = None):
    """A ``python`` for gpu.sh that is this one, except for what is made to fail."""
    path = folder / "python"
    lines = ["#!/usr/bin/env bash"]
    if bench_error:
        lines.append(f'if [[ "$1" == benchmarks/bench.py ]]; then echo "{bench_error}" >&2; exit 1; fi')
    if no_torch:
        lines.append('if [[ "$1" == "-c" && "$2" == *"import torch"* ]]; then '
                     'echo "ModuleNotFoundError: No module named \'torch\'" >&2; exit 1; fi')
    if pip_error:
        lines.append(f'if [[ "$1" == "-m" && "$2" == "pip" ]]; then echo "{pip_error}" >&2; exit 1; fi')
    lines.append(f'exec {sys.executable} "$@"')
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o755)
    return path


def gpu_sh(*args, python, **env):
    return subprocess.run(["bash", str(GPU_SH), *args], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHON": str(python), "PIP_NO_INDEX": "1", **env})


def test_gpu_sh_check_passes_keeping_torch_installing_only_what_it_needs_and_running_every_measurement():
    proc = gpu_sh("--check", python=sys.executable)
    assert proc.returncode == 0, proc.stderr
    import torch

    assert f"torch {torch.__version__} (kept: pinned for pip)" in proc.stderr
    installing = next(line for line in proc.stderr.splitlines() if "installing" in line)
    assert "(dry run)" in installing and "transformers" in installing and "torchao" in installing
    for not_needed in ("deepspeed", "gradio", "wandb", "torch>", "fastapi"):
        assert not_needed not in installing
    assert proc.stderr.strip().endswith("FSDP2 on 2 processes, decoding) and so do its correctness checks (resume, fp16)")
    # the correctness checks the GPU run ends with, each once on the CPU
    assert "\ncorrectness on CPU (1 process(es) for FSDP2):\n" in proc.stdout
    assert "  resume with prefix dropout 0.1: max |difference| 0 (0 = bit for bit): ok\n" in proc.stdout
    assert re.search(r"\n  fp16 gradient norm / float32's, step 1: \d\.\d{4}: ok\n", proc.stdout), proc.stdout[-2000:]
    # the smoke run's tables: each kind of measurement with its numbers and the attention kernel that ran
    rows = {line.split(" | ")[0].lstrip("| "): line for line in proc.stdout.splitlines() if line.startswith("| ")}
    for name in ("ChatGLM-6B: train bf16, 4 rows of 8-32 tokens, packed in 64",
                 "Qwen3-8B-shaped decoder: train bf16, 4 rows of 8-32 tokens, padded",
                 "Qwen3-8B-shaped decoder: train bf16, 4 rows of 8-32 tokens, packed in 64",
                 "Qwen3-8B-shaped decoder: FSDP2 on 2 processes, train bf16 + checkpointing, batch 4 x 32 each"):
        cells = rows[name].split(" | ")
        assert float(cells[1]) > 0 and 0 < float(cells[5]) < 1, rows[name]  # step s, fraction of the peak
        assert "flash_attention_for_cpu x" in cells[7], rows[name]
    assert "Qwen3-8B-shaped decoder: packed / padded row tokens/s at equal row tokens per step: " in proc.stdout
    ours = next(line for line in proc.stdout.splitlines()
                if line.startswith("| Qwen3-8B-shaped decoder: generate bf16 | ours b1 |"))
    assert float(ours.split(" | ")[3]) > 0  # decode tokens/s


def test_gpu_sh_check_stops_when_a_measurement_fails(tmp_path):
    python = fake_python(tmp_path, bench_error="RuntimeError: the packed step broke")
    proc = gpu_sh("--check", python=python)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert "RuntimeError: the packed step broke" in lines and lines[-2:] == [
        "gpu.sh: the benchmark's smoke run failed (its last lines above)",
        "gpu.sh: stopped; nothing was measured",
    ]


def test_gpu_sh_stops_at_a_failed_install_with_pips_reason(tmp_path):
    error = "ERROR: Could not find a version that satisfies the requirement transformers<6,>=5.0"
    proc = gpu_sh("--check", python=fake_python(tmp_path, pip_error=error))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert error in lines and lines[-2:] == [
        "gpu.sh: installing the benchmark's packages failed (pip's last lines above)",
        "gpu.sh: stopped; nothing was measured",
    ]
    assert "check passed" not in proc.stderr


def test_gpu_sh_needs_the_machines_cuda_torch_and_never_installs_one(tmp_path):
    proc = gpu_sh("--check", python=fake_python(tmp_path, no_torch=True))
    assert proc.returncode == 1 and "gpu.sh: no torch for" in proc.stderr and "installing" not in proc.stderr
    assert "No module named 'torch'" in proc.stderr
    import torch

    if not torch.cuda.is_available():  # without --check, a CPU machine is refused before anything is installed
        proc = gpu_sh(python=fake_python(tmp_path, pip_error="pip must not run"))
        assert proc.returncode == 1 and "sees no CUDA device" in proc.stderr and "pip must not run" not in proc.stderr
