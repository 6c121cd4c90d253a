"""``benchmarks/bench.py``'s train-step pieces at a small batch: the profile child and the side-by-side summary."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

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
