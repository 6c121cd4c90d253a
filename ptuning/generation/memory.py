"""How much memory a decode cache takes and whether it fits, checked before anything is allocated.

A slot cache holds, for every layer, keys and values of ``slots x (prefix room + tokens)`` columns of
``key/value heads x head size`` numbers: :func:`cache_bytes`. Before the cache grows (and before a server
loads its model) the bytes it needs are compared with what the device has free (:func:`available_bytes`: the
CUDA driver's free memory plus what PyTorch's caching allocator holds unused, or the kernel's
``MemAvailable`` on a CPU); at most :data:`MEMORY_SHARE` of it goes to the cache, the rest stays for the
forward's activations. A cache that does not fit raises :class:`CacheMemoryError`, one line with the bytes
needed, the bytes available and how many rows (or tokens per row) would fit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

#: the share of the free memory a cache may take (the rest is left for the activations of a forward)
MEMORY_SHARE = 0.9
GIB = 2**30


class CacheMemoryError(MemoryError):
    """The generation cache does not fit in the device's free memory (the message says what would fit)."""


@dataclass(frozen=True)
class CacheShape:
    """What one token of one row costs in a slot cache: L layers x (key + value) x G heads x D x bytes."""

    num_layers: int
    num_key_value_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def column_bytes(self) -> int:
        """Bytes of one cache column (one token or prefix position of one row), keys and values of every layer."""
        size = torch.empty((), dtype=self.dtype, device="cpu").element_size()
        return 2 * self.num_layers * self.num_key_value_heads * self.head_dim * size

    def bytes(self, slots: int, columns: int) -> int:
        """Bytes of a cache of ``slots`` rows of ``columns`` columns each (prefix room + tokens)."""
        return slots * columns * self.column_bytes


def cache_dtype(compute: torch.dtype, device) -> torch.dtype:
    """The cache's dtype for a model computing in ``compute`` on ``device``: the compute dtype, except float32 for
    16-bit models on a CPU (see :func:`ptuning.generation.default_cache_dtype`)."""
    if torch.device(device).type == "cpu" and compute in (torch.bfloat16, torch.float16):
        return torch.float32
    return compute


def available_bytes(device) -> int | None:
    """Bytes that can be allocated on ``device`` now, or None when that cannot be told (then nothing is
    checked).

    CUDA: the driver's free memory (``torch.cuda.mem_get_info``) plus what PyTorch's caching allocator reserves
    but does not use. CPU: ``MemAvailable`` of ``/proc/meminfo`` (what the kernel can give without swapping).
    """
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        free, _ = torch.cuda.mem_get_info(index)
        return int(free + torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index))
    if device.type == "cpu":
        return _mem_available()
    return None


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(need: int, device, *, what: str, fits: str | None = None, free: int | None = None) -> None:
    """Raises :class:`CacheMemoryError` when ``need`` bytes exceed :data:`MEMORY_SHARE` of the free memory.

    Args:
        need: bytes about to be allocated.
        device: where.
        what: what the bytes are for (the start of the message).
        fits: what would fit instead (the end of the message), e.g. ``"at most 12 rows fit"``.
        free: the free bytes, when the caller measured them (default :func:`available_bytes`).
    """
    free = available_bytes(device) if free is None else free
    if free is None or need <= MEMORY_SHARE * free:
        return
    tail = f"; {fits}" if fits else ""
    raise CacheMemoryError(f"{what} needs {gib(need)} but {gib(free)} of memory is free on {torch.device(device)} "
                           f"(the cache may take {MEMORY_SHARE:.0%} of it){tail}")


def rows_that_fit(shape: CacheShape, columns: int, device, free: int | None = None) -> int | None:
    """How many rows of ``columns`` columns fit in :data:`MEMORY_SHARE` of the free memory (None: unknown)."""
    free = available_bytes(device) if free is None else free
    if free is None:
        return None
    return int(MEMORY_SHARE * free) // max(1, shape.bytes(1, columns))


def gib(n: int) -> str:
    """Bytes as a short human number (``1.50 GiB``, ``12.0 MiB``)."""
    return f"{n / GIB:.2f} GiB" if n >= GIB / 4 else f"{n / 2**20:.1f} MiB"
