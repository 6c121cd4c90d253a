#!/usr/bin/env bash
# One run on a fresh GPU machine: install, then measure the real ChatGLM-6B shape (28 layers, hidden 4096,
# 32 heads, inner 16384, vocab 130528) with random bf16 weights, pre_seq_len 128, sequence 64 + 64:
# step time and fraction of the bf16 matmul peak at batch 16, peak memory at batch 1, generation.
# Prints one table at the end and writes benchmarks/results-gpu.json.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" 2>/dev/null || {
    echo "no CUDA torch here: install one first (pip install torch)"; exit 1; }
python -m pip install -q -e . 2>/dev/null || python -m pip install -q --no-deps -e .
python benchmarks/bench.py --device cuda --gpu-shape --json benchmarks/results-gpu.json "$@"
