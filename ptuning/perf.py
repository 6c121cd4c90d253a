"""The performance measures shared by the training loop and the benchmarks.

FLOPs per trained token of a frozen backbone with a prefix: ``4·N + 12·L·(N_h·D)·(S + P)``, where N counts
the matmul weights a token passes through (the family's count, e.g. ChatGLM-6B per layer ``3d² + d² +
2·d·inner``, times L, plus the output projection ``d·vocab``; embeddings excluded): forward 2N and backward to
the activations 2N (no weight gradients for a frozen backbone); attention (query width N_h·D) forward
``4·L·(N_h·D)·(S+P)``, backward twice that.
"""

from __future__ import annotations

import math
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from .models import family_of
from .prefix import prefix_module_name

# The bench configuration of the performance issue: the ChatGLM-6B architecture at hidden 512, 8 heads,
# 4 layers, inner 2048, vocab 32000, with a 32-token prefix (``tiny_config(**BENCH_SHAPE)``).
BENCH_SHAPE = dict(vocab_size=32000, hidden_size=512, num_attention_heads=8, num_layers=4, inner_hidden_size=2048,
                   pre_seq_len=32)


def train_flops_per_token(config, seq_len: int, prefix_len: int | None = None) -> float:
    """FLOPs of one trained token of a model of any family: ``4·N + 12·L·(N_h·D)·(S + P)`` with N from the
    family (:meth:`~ptuning.models.base.Family.matmul_weights`), L and D from its prefix shape and N_h the
    config's attention heads.

    Args:
        config: the model's config (or the model).
        prefix_len: P (default: the config's ``pre_seq_len``, 0 without one).
    """
    config = getattr(config, "config", config)
    family = family_of(config)
    shape = family.prefix_shape(config, 0, False)
    prefix_len = (getattr(config, "pre_seq_len", None) or 0) if prefix_len is None else prefix_len
    width = config.num_attention_heads * shape.head_dim
    return 4 * family.matmul_weights(config) + 12 * shape.num_layers * width * (seq_len + prefix_len)


def model_train_flops_per_token(model, seq_len: int) -> float:
    """:func:`train_flops_per_token` of a loaded model, P from its prefix encoder."""
    shape = model.get_submodule(prefix_module_name(model)).shape
    return train_flops_per_token(model.config, seq_len, shape.pre_seq_len)


#: a timed span of matmuls lasts at least this long, so that the clock, the launches and the synchronisation
#: around it are a small part of it (one 2048^3 product takes ~25 us on an H100: timed alone, overhead dominates)
MATMUL_TIMING_S = 0.05


def matmul_peak_flops(
    dtype: torch.dtype = torch.float32, size: int | None = None, device="cpu", repeats: int = 5,
    min_seconds: float = MATMUL_TIMING_S,
) -> float:
    """FLOP/s of square matmuls in ``dtype`` on ``device``: the best of ``repeats`` timed spans, each of as many
    ``size``-cubed products back to back as take at least ``min_seconds``, the device synchronised before the
    clock starts and before it stops.

    Args:
        size: the matrices' side (default 8192 on a GPU, where smaller products leave it idle between
            launches; 2048 on a CPU, where one product already takes tenths of a second).
    """
    device = torch.device(device)
    size = size or (8192 if device.type == "cuda" else 2048)
    g = torch.Generator(device="cpu").manual_seed(0)  # its own generator: measuring must not move the training RNG
    a = torch.randn(size, size, generator=g, device="cpu").to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=g, device="cpu").to(device=device, dtype=dtype)
    out = torch.empty(size, size, dtype=dtype, device=device)
    sync = _synchronizer(device)

    def timed(count: int) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(count):
            torch.mm(a, b, out=out)
        sync()
        return time.perf_counter() - start

    timed(1)  # warm-up: kernel selection, first-touch of the output
    count, took = 1, timed(1)
    while took < min_seconds and count < 1 << 20:
        count = max(2 * count, math.ceil(count * min_seconds / max(took, 1e-9)))
        took = timed(count)
    best = min([took] + [timed(count) for _ in range(repeats - 1)])
    return 2 * size**3 * count / best


def _synchronizer(device: torch.device):
    """Waits for the device's queued work (a no-op on a CPU, where work is done when the call returns)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def peak_memory_mib(device="cpu") -> float:
    """Peak memory of this process: CUDA allocator peak on a GPU, else peak RSS."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


# Below this many matmul weights per token (the built-in tiny model has 0.9 million, the bench configuration
# 29 million) a CPU op takes microseconds and a second intra-op thread that waits for a core costs more than
# it gives. The tiny default run's training step on 2 cores (benchmarks/bench_threads.py, side by side):
# 1 thread 30 ms vs 2 threads 46 ms (median) at a load average of 2, 66 ms vs 1,274 ms at 4 to 8; with the
# machine to itself 2 threads were at most ~25% faster.
SMALL_MODEL_WEIGHTS = 4_000_000


def set_cpu_threads(config, device="cpu") -> int | None:
    """One intra-op thread for a small model on a CPU, unless ``OMP_NUM_THREADS`` chooses the count.

    Args:
        config: the model, or its config (its family's ``matmul_weights`` reads the sizes).
        device: where the model runs; other devices are left alone.

    Returns:
        The thread count it set, or None when it left torch's setting alone.
    """
    if torch.device(device).type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return None
    weights = family_of(config).matmul_weights(getattr(config, "config", config))
    if weights >= SMALL_MODEL_WEIGHTS or torch.get_num_threads() == 1:
        return None
    torch.set_num_threads(1)
    return 1


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` says, for benchmark reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
