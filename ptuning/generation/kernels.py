"""Faster matrix products for generating on a CPU: a frozen backbone's linears with oneDNN's pre-packed weights.

A token at a time, decoding is a matrix-vector product per linear; how fast the weights stream through the
CPU decides the speed. ``torch.nn.functional.linear`` on a CPU runs MKL (float32) or oneDNN with a weight
reordered at every call (bfloat16). oneDNN can instead take a weight reordered once into its own blocked
layout (``torch.ops.mkldnn._reorder_linear_weight``, what ``torch.compile`` uses for a frozen CPU model) and
run ``torch.ops.mkldnn._linear_pointwise`` on it. Measured on the project's 2-core AMD EPYC (bench shape, one
thread, CPU time of a decode step, best of 40): bfloat16 6.0 vs 8.9 ms at 1 row, 9.9 vs 13.3 ms at 8 rows;
float32 14.4 vs 20.6 ms at 8 rows, but 10.1 vs 9.3 ms at one row, where MKL's matrix-vector product (over a
column-major output projection, see
:meth:`~ptuning.models.chatglm.ChatGLMForConditionalGeneration.store_lm_head_column_major`) is the faster one. So
bfloat16 linears are always packed, float32 ones only for batches of more than one row.

:func:`packed_linears` swaps the layout in and out: inside it, every eligible linear holds only its packed
weight (the dense ``weight`` parameter is an empty placeholder: no second copy of the backbone) and calls
oneDNN; on leaving, the dense weights come back bit for bit (a reorder is a permutation) with their layout.
The packed op has no backward, so this is for generation only: it refuses a model in training mode.
bfloat16 results are identical to ``F.linear``'s; float32 ones differ in the last bits (another summation
order).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

DTYPES = (torch.float32, torch.bfloat16)


def packing_available(dtype: torch.dtype) -> bool:
    """oneDNN can run pre-packed linears of ``dtype`` on this CPU."""
    if dtype not in DTYPES or not torch.backends.mkldnn.is_available():
        return False
    return dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _eligible(module: nn.Module, shared: set[int], rows: int) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module) is nn.Linear
        and type(weight) is nn.Parameter
        and type(weight.data) is torch.Tensor  # no quantized or other tensor subclass
        and weight.device.type == "cpu"
        and weight.layout == torch.strided
        and weight.dim() == 2
        and weight.numel() > 0
        and not weight.requires_grad
        and packing_available(weight.dtype)
        and id(weight) not in shared
        and "forward" not in module.__dict__ and not hasattr(module, "_hf_hook")  # no one else's forward wrapper
        and (weight.dtype != torch.float32 or rows > 1)  # MKL is faster at one float32 row (the module docstring)
    )


def _shared_weights(model: nn.Module) -> set[int]:
    """Parameters used by more than one module (tied embeddings): never packed."""
    seen: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            seen[id(param)] = seen.get(id(param), 0) + 1
    return {key for key, count in seen.items() if count > 1}


def _packed_forward(module: nn.Linear, packed: torch.Tensor):
    bias = module.bias

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    return forward


@contextmanager
def packed_linears(model: nn.Module, rows: int = 1) -> Iterator[int]:
    """Runs the model's frozen CPU linears (bfloat16, and float32 for ``rows`` > 1; untied, not quantized) on
    oneDNN's pre-packed weights while inside. Nested use packs nothing more.

    Args:
        model: in eval mode.
        rows: the rows decoded together (any count works; it picks the layout, and at 1 float32 stays dense).

    Yields:
        The number of linears packed (0 when oneDNN is not available for the model's dtype).

    Raises:
        RuntimeError: the model is in training mode (the packed op has no backward).
    """
    if model.training:
        raise RuntimeError("packed_linears is for generation: the model is in training mode (call model.eval())")
    shared = _shared_weights(model)
    swapped: list[tuple[nn.Linear, torch.Tensor, bool]] = []
    try:
        with torch.no_grad():
            for module in model.modules():
                if getattr(module, "_ptuning_packed", False) or not _eligible(module, shared, rows):
                    continue
                weight = module.weight
                column_major = not weight.is_contiguous()
                packed = torch.ops.mkldnn._reorder_linear_weight(weight.data.contiguous(), rows)
                swapped.append((module, packed, column_major))
                weight.data = weight.data.new_empty(0)  # the packed copy is the only one now
                module.forward = _packed_forward(module, packed)
                module._ptuning_packed = True
        yield len(swapped)
    finally:
        with torch.no_grad():
            for module, packed, column_major in reversed(swapped):
                dense = packed.to_dense()
                module.weight.data = dense.t().contiguous().t() if column_major else dense
                del module.forward
                del module._ptuning_packed
