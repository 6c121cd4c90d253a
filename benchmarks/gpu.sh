#!/usr/bin/env bash
# One unattended run on a fresh GPU machine, random bf16 weights, pre_seq_len 128, for two families at their real
# shapes: ChatGLM-6B (28 layers, hidden 4096, 32 heads, inner 16384, vocab 130528) and a transformers decoder
# shaped as Qwen3-8B (36 layers, hidden 4096, 32 heads, 8 key/value heads, vocab 151936). For each: the train
# step's time and fraction of the bf16 matmul peak at batch 16 x 128, peak memory at batch 1, rows of varied
# lengths padded and packed (row tokens/s, their ratio), decode tokens/s, and which SDPA kernel ran; with more
# than one GPU, the train step under FSDP2 on all of them (launch/accelerate/fsdp2.yaml). Plus a profiled
# ChatGLM-6B step (kernel time). Prints the tables at the end and writes benchmarks/results-gpu.json. Then
# benchmarks/gpu_checks.py: short train.py runs that check on the GPUs what the CPU tests reach only with mocks or
# gloo (resume bit for bit with prefix dropout drawn on the GPU, the fp16 gradient norm after unscaling, FSDP2
# against one process and its resume).
#
#   benchmarks/gpu.sh [bench.py options]   # on the GPU machine
#   benchmarks/gpu.sh --check              # anywhere (a CPU is fine): the install as a dry run, the imports, and
#                                          # every kind of measurement once at a tiny shape on the CPU
#                                          # (bench.py --smoke: both families, packed rows, FSDP2 on 2 processes)
#                                          # and gpu_checks.py on one process
#
# It keeps the machine's torch (pip may not replace it: it is pinned to the installed version), installs only
# what the benchmark imports (not DeepSpeed, Gradio, wandb, the server's packages), and stops at the first step
# that fails, with the reason (pip's own last lines). PYTHON chooses the interpreter (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
CHECK=0
if [[ "${1:-}" == "--check" ]]; then
    CHECK=1
    shift
fi
# the project's requirements the benchmark and the checks do not import (the rest of pyproject.toml's list is
# installed; the checks run train.py, which composes its config with Hydra)
NOT_NEEDED="torch deepspeed wandb gradio fastapi uvicorn matplotlib"

say() { echo "gpu.sh: $*" >&2; }
fail() {
    say "$*"
    say "stopped; nothing was measured"
    exit 1
}

# 1. the machine's torch, with CUDA
torch_version=$("$PYTHON" -c "import torch; print(torch.__version__)" 2>&1) ||
    fail "no torch for $PYTHON (${torch_version##*$'\n'}): install the CUDA build for this machine first, see https://pytorch.org/get-started/locally/"
if [[ $CHECK == 0 ]]; then
    "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" ||
        fail "torch $torch_version sees no CUDA device (a CPU build, or no driver): install the CUDA build of torch"
fi
say "torch $torch_version (kept: pinned for pip)"

# 2. the benchmark's packages, from pyproject.toml, torch pinned
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "torch==$torch_version" >"$work/constraints.txt"
requirements=$("$PYTHON" - "$NOT_NEEDED" <<'EOF'
import re
import sys

skip = set(sys.argv[1].split())
try:
    import tomllib

    with open("pyproject.toml", "rb") as f:
        requirements = tomllib.load(f)["project"]["dependencies"]
except ImportError:  # Python 3.10: the list's quoted strings
    text = open("pyproject.toml", encoding="utf-8").read()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M).group(1)
    requirements = [m for line in block.splitlines() for m in re.findall(r'"([^"]+)"', line.split("#")[0])]
for requirement in requirements:
    if re.split(r"[<>=!~ \[;]", requirement, maxsplit=1)[0].lower() not in skip:
        print(requirement)
EOF
) || fail "cannot read the requirements of pyproject.toml"
mapfile -t packages <<<"$requirements"
dry=()
if [[ $CHECK == 1 ]]; then
    dry=(--dry-run)
fi
say "installing ${#packages[@]} packages${dry:+ (dry run)}: ${packages[*]}"
if ! "$PYTHON" -m pip install --quiet --constraint "$work/constraints.txt" "${dry[@]}" "${packages[@]}" \
    >"$work/pip.log" 2>&1; then
    tail -n 15 "$work/pip.log" >&2
    fail "installing the benchmark's packages failed (pip's last lines above)"
fi

# 3. what the benchmark imports, and torch unchanged
"$PYTHON" - "$torch_version" <<'EOF' || fail "the benchmark cannot import what it needs (above)"
import sys

sys.path.insert(0, ".")
import torch

import accelerate  # noqa: F401
import ptuning.distributed
import ptuning.generation
import ptuning.models.chatglm
import ptuning.models.hf
import ptuning.perf
import hydra_entry  # noqa: F401  (train.py, which the correctness checks run)
from ptuning.training.loop import token_loss_sum  # noqa: F401
from transformers import Qwen3ForCausalLM  # noqa: F401

if torch.__version__ != sys.argv[1]:
    sys.exit(f"torch changed from {sys.argv[1]} to {torch.__version__}")
EOF

if [[ $CHECK == 1 ]]; then
    say "the benchmark's imports work; every kind of measurement once, tiny, on the CPU (bench.py --smoke) ..."
    # its tables on stdout; its progress and errors kept, shown if it fails
    "$PYTHON" benchmarks/bench.py --smoke --json "$work/smoke.json" 2>"$work/smoke.log" || {
        tail -n 30 "$work/smoke.log" >&2
        fail "the benchmark's smoke run failed (its last lines above)"
    }
    say "the correctness checks on one process on the CPU (gpu_checks.py) ..."
    "$PYTHON" benchmarks/gpu_checks.py --processes 1 || fail "a correctness check failed (above)"
    say "check passed: torch $torch_version kept, the packages resolve, the benchmark's imports work, its" \
        "measurements run (both families, padded and packed rows, FSDP2 on 2 processes, decoding) and so do" \
        "its correctness checks (resume, fp16)"
    exit 0
fi

# 4. the measurements (bench.py exits non-zero when one of them failed, after printing the table and why)
"$PYTHON" benchmarks/bench.py --device cuda --gpu-shape --json benchmarks/results-gpu.json "$@" ||
    fail "a measurement failed (its error is in the table and above)"

# 5. correctness on the GPUs: resume, fp16, and FSDP2 on every GPU when there are several
gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
"$PYTHON" benchmarks/gpu_checks.py --processes "$gpus" || fail "a correctness check failed (above)"
