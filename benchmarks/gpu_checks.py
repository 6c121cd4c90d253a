"""Correctness checks for a GPU machine: what the CPU test suite reaches only with mocks or on gloo.

    python benchmarks/gpu_checks.py --processes 2      # benchmarks/gpu.sh runs it with every GPU of the machine
    python benchmarks/gpu_checks.py --processes 1      # one device: the resume and fp16 checks only

Short ``train.py`` runs of the built-in tiny GLM-4 (a transformers decoder, float32, 4 steps of a global batch of 8
or the next multiple of the process count, a checkpoint every 2), on the machine's default device:

* **resume**: a run with prefix dropout 0.1 (drawn from the GPU's generator on a GPU) stopped after
  ``checkpoint-2`` and resumed ends bit for bit where the unbroken run ends (the checkpoint restores every
  device's random state);
* **fp16**: the gradient norm of step 1 with ``train.mixed_precision=fp16`` (a loss scale of 65536 on a GPU) is
  the float32 run's, within fp16's rounding, not 65536 times it (on a CPU accelerate makes no loss scaler: the
  check then only runs the path);
* **FSDP2** (``--processes`` > 1): ``launch/accelerate/fsdp2.yaml`` on that many processes with gradient
  checkpointing against one process at the same global batch (prefix dropout 0), and its resume, bit for bit.

Prints one line per check with what it measured and exits non-zero when one fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
RUN = ["model=tiny_glm4", "data.max_train_samples=64", "train.max_steps=4", "train.save_steps=2",
       "train.save_total_limit=null", "train.eval_steps=null", "train.eval_generation=false",
       "train.eval_before_training=false", "train.plot=false", "train.logging_steps=1"]
TOLERANCE = 1e-5  # float32, one process against several at the same global batch


def global_batch(processes: int) -> int:
    """The global batch of every run: 8, or the nearest multiple of ``processes`` above it (4 steps of it fit in
    the 64 rows up to 16 processes)."""
    return processes * -(-8 // processes)


def train(out: Path, *extra: str, processes: int = 1, batch: int = 8) -> None:
    """``train.py`` with :data:`RUN` into ``out`` at the global ``batch``: one process, or ``processes`` under the
    FSDP2 launch file. Exits with the run's last stderr lines when it fails."""
    launcher = [sys.executable]
    if processes > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(ROOT / "launch" / "accelerate" / "fsdp2.yaml"), "--num_processes", str(processes),
                    "--main_process_port", str(port)]
    cmd = [*launcher, "train.py", *RUN, f"train.per_device_batch_size={batch // processes}",
           f"train.output_dir={out}", f"data.cache_dir={out.parent / 'cache'}", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"gpu_checks: {' '.join(cmd[len(launcher):])} failed:\n{proc.stderr[-3000:]}")


def prefix(out: Path, step: int = 4) -> dict:
    return load_file(str(out / f"checkpoint-{step}" / "prefix.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def grad_norms(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]
    return [r["grad_norm"] for r in rows if "grad_norm" in r]


def resumed(work: Path, name: str, *extra: str, processes: int = 1, batch: int = 8) -> float:
    """The largest difference between an unbroken run and one resumed from its ``checkpoint-2``."""
    train(work / name, *extra, processes=processes, batch=batch)
    cut = work / f"{name}-cut"
    shutil.copytree(work / name / "checkpoint-2", cut / "checkpoint-2")
    train(cut, *extra, "train.resume_from=latest", processes=processes, batch=batch)
    return max_diff(prefix(work / name), prefix(cut))


def checks(work: Path, processes: int) -> list[tuple[str, str, bool]]:
    """(check, what it measured, passed) for every check."""
    out, batch = [], global_batch(processes)
    diff = resumed(work, "dropout", "model.prefix_dropout=0.1", batch=batch)
    out.append(("resume with prefix dropout 0.1", f"max |difference| {diff:.3g} (0 = bit for bit)", diff == 0))
    train(work / "fp32", "model.prefix_dropout=0", batch=batch)
    train(work / "fp16", "model.prefix_dropout=0", "train.mixed_precision=fp16", batch=batch)
    ratio = grad_norms(work / "fp16")[0] / grad_norms(work / "fp32")[0]
    out.append(("fp16 gradient norm / float32's, step 1", f"{ratio:.4f}", abs(ratio - 1) < 0.05))
    if processes > 1:
        diff = resumed(work, "fsdp2", "model.prefix_dropout=0", "model.gradient_checkpointing=true",
                       processes=processes, batch=batch)
        out.append((f"FSDP2 on {processes} processes, resumed", f"max |difference| {diff:.3g}", diff == 0))
        one = max_diff(prefix(work / "fp32"), prefix(work / "fsdp2"))
        out.append((f"FSDP2 on {processes} processes vs 1 process", f"max |difference| {one:.3g}", one <= TOLERANCE))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=1, help="FSDP2 processes (one per GPU); 1: no FSDP2 check")
    args = parser.parse_args()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    with tempfile.TemporaryDirectory() as tmp:
        results = checks(Path(tmp), args.processes)
    print(f"\ncorrectness on {device} ({args.processes} process(es) for FSDP2):")
    for name, measured, passed in results:
        print(f"  {name}: {measured}: {'ok' if passed else 'FAILED'}")
    failed = [name for name, _, passed in results if not passed]
    if failed:
        sys.exit(f"{len(failed)} check(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
