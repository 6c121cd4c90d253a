"""Weight-only quantization of the frozen backbone (``quantization_bit`` 8 or 4), through torchao.

The four linear layers of every block (``query_key_value``, ``dense``, ``dense_h_to_4h``,
``dense_4h_to_h``) hold 97% of ChatGLM-6B's block weights; they are replaced by torchao tensor subclasses:

* **8 bits**: :class:`torchao.quantization.Int8WeightOnlyConfig`, symmetric int8 with one scale per
  output channel (``Int8Tensor``). Its matmul dequantizes on the fly and has a backward to the input.
* **4 bits**: torchao's ``NF4Tensor`` (4-bit NormalFloat, the QLoRA format): two codes per byte, one
  absmax scale per group of 64 weights, the scales themselves quantized to int8 in blocks of up to 256.
  It is the only packed 4-bit format of torchao 0.18 that runs on CPU *and* CUDA and trains through:
  ``Int4WeightOnlyConfig`` needs CUDA (tinygemm / mslk kernels), the prototype CPU ``Int4OpaqueTensor``
  has no backward, and ``IntxWeightOnlyConfig(weight_dtype=torch.int4)`` stores one code per byte (no
  saving over int8).

Embeddings, layer norms, biases and ``lm_head`` stay in the backbone's 16-bit dtype (bfloat16 unless the
backbone is already float16); the prefix encoder stays float32 and receives the only gradients.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .prefix import cast_backbone, is_prefix_param

QUANTIZED_LINEARS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
BITS = (4, 8)
NF4_BLOCK = 64  # weights per scale (QLoRA's choice; the tensor size must be a multiple)
NF4_SCALER_BLOCKS = (
    256,
    128,
    64,
    32,
    16,
    8,
    4,
    2,
    1,
)  # scales per int8 scale-of-scales, largest that divides


@contextmanager
def _quiet_torchao_import():
    """torchao's wheel ships CUDA-only extension libraries; on a CPU build of torch their failed loads are
    logged as warnings at import time although nothing used here needs them."""
    logger = logging.getLogger("torchao")
    level = logger.level
    if not torch.cuda.is_available():
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _torchao():
    with _quiet_torchao_import():
        import torchao.quantization as ao
    return ao


class _FrozenQuantizedLinear(torch.autograd.Function):
    """``y = x W^T + b`` with a quantized, frozen ``W``; the backward reaches ``x`` (and ``b``) only.

    torchao's int8 matmul casts the int8 weight to the activation dtype, and autograd would keep that full
    16-bit copy of every layer alive until the backward: training would then hold int8 *and* 16-bit weights.
    Here only the quantized tensor is saved and the backward dequantizes one layer at a time.

    ``compute`` is the dtype the product runs in (None: the activation's); the result comes back in the
    activation's dtype, as torchao returns it.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                compute: torch.dtype | None = None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.has_bias = bias is not None
        ctx.x_dtype = x.dtype
        out_dtype, x = x.dtype, x if compute is None else x.to(compute)
        if bias is not None and compute is not None:
            bias = bias.to(compute)
        if _is_nf4(weight):
            y = F.linear(x, _dequantize(weight, x.dtype), bias)
        else:
            y = F.linear(x, weight, bias)  # torchao's int8 kernel; autograd is off inside forward
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ _dequantize(weight, grad.dtype)).to(ctx.x_dtype)
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_b, None


def _is_nf4(weight: torch.Tensor) -> bool:
    return hasattr(weight, "get_original_weight") and hasattr(weight, "quantized_scalers")


def _nf4_dequantize(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """torchao's NF4 storage decoded with one gather per byte.

    ``NF4Tensor.get_original_weight`` decodes with about ten elementwise passes (shifts, masks, int64
    indices, stacking), which makes a 4-bit step on a CPU several times slower than a 16-bit one. Each
    byte holds two codes (high nibble first, in element order), so a 256-row table of value pairs decodes
    it at once; the per-block scales come from torchao's own ``dequantize_scalers``. The arithmetic is
    the same (code value times block scale in the weight's dtype), so the result is identical.
    """
    nf4 = weight.nf4.to(weight.dtype)
    byte = torch.arange(256, device=nf4.device)
    pairs = torch.stack([nf4[byte >> 4], nf4[byte & 15]], dim=-1)  # (256, 2): byte -> (first, second)
    values = F.embedding(weight.quantized_data.int(), pairs)  # (numel / 2, 2)
    scalers = weight.dequantize_scalers(
        weight.quantized_scalers, weight.quantization_factor, weight.scaler_block_size
    )
    dense = values.view(weight.n_blocks, weight.block_size) * scalers.to(weight.dtype)[:, None]
    return dense.view(weight.shape).to(dtype)


def _dequantize(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if _is_nf4(weight):
        return _nf4_dequantize(weight, dtype)
    return weight.dequantize(dtype)


class QuantizedLinear(nn.Linear):
    """An ``nn.Linear`` whose weight is a torchao quantized tensor (the class of a linear is swapped in place,
    so names, hooks and ``isinstance(m, nn.Linear)`` stay as they were)."""

    bits: int = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        if torch.is_autocast_enabled(device):
            # autocast would cast the (de)quantized weight once more to its own dtype on every call (fp16
            # mixed precision over a bf16 backbone: a second whole-weight copy per linear): the product runs in
            # the weight's own 16-bit dtype instead, outside autocast, and returns in the activation's dtype
            with torch.autocast(device, enabled=False):
                return _FrozenQuantizedLinear.apply(x, self.weight, self.bias, self.weight.dtype)
        return _FrozenQuantizedLinear.apply(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        kind = "int8 per-channel" if self.bits == 8 else f"NF4 groups of {NF4_BLOCK}"
        return f"{super().extra_repr()}, weight={kind}"


def _is_block_linear(name: str, module: nn.Module, names: tuple[str, ...]) -> bool:
    return (
        isinstance(module, nn.Linear)
        and ".layers." in f".{name}"
        and name.rsplit(".", 1)[-1] in names
        and not is_prefix_param(name + ".weight")
    )


def block_linears(model: nn.Module, names: tuple[str, ...] | None = None) -> list[tuple[str, nn.Linear]]:
    """The ``(name, module)`` of every block linear that :func:`quantize_backbone` quantizes: the linears
    inside ``...layers.N.`` whose last name is one of ``names`` (the family's; default ChatGLM-6B's)."""
    names = names or QUANTIZED_LINEARS
    return [(name, m) for name, m in model.named_modules() if _is_block_linear(name, m, names)]


def _nf4(weight: torch.Tensor) -> torch.Tensor:
    ao = _torchao()
    n_blocks, rest = divmod(weight.numel(), NF4_BLOCK)
    if rest:
        raise ValueError(
            f"4-bit quantization needs weights whose size is a multiple of {NF4_BLOCK}, got {list(weight.shape)}"
        )
    scaler_block = next(s for s in NF4_SCALER_BLOCKS if n_blocks % s == 0)
    return ao.to_nf4(weight.contiguous(), block_size=NF4_BLOCK, scaler_block_size=scaler_block)


def is_quantized(model: nn.Module) -> bool:
    """True when any linear holds a quantized weight."""
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def quantize_backbone(
    model: nn.Module,
    bits: int,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    linear_names: tuple[str, ...] | None = None,
) -> nn.Module:
    """Quantizes the block linears of ``model`` in place to weight-only int8 (``bits=8``) or NF4 (``bits=4``).

    Args:
        model: a :class:`~ptuning.models.chatglm.ChatGLMForConditionalGeneration` (or its ``transformer``).
        bits: 8 or 4.
        dtype: the 16-bit dtype of everything that stays unquantized (and of the dequantized matmuls).
            Default: the backbone's dtype when it is 16-bit, else bfloat16.
        linear_names: the per-layer linears to quantize (the family's ``block_linear_names``; default
            ChatGLM-6B's four).
        device: quantize there, one linear at a time, then move the whole model there (the 16-bit block
            weights never have to fit on the device together; NF4 of ChatGLM-6B takes ~5 minutes on 2 CPU
            cores, a GPU is much faster). Default: where the weights are.

    Returns:
        ``model``, with ``config.quantization_bit`` set to ``bits``.

    Raises:
        ValueError: ``bits`` is not 4 or 8, ``dtype`` is not 16-bit, or the model is already quantized.
    """
    if bits not in BITS:
        raise ValueError(f"quantization bits = {bits!r}: expected 8 (int8) or 4 (NF4)")
    linears = block_linears(model, linear_names)
    if not linears:
        raise ValueError(f"the model has no block linears named {linear_names or QUANTIZED_LINEARS} to quantize")
    if is_quantized(model):
        raise ValueError("the model is already quantized")
    current = linears[0][1].weight.dtype
    dtype = dtype or (current if current in (torch.float16, torch.bfloat16) else torch.bfloat16)
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"a quantized backbone keeps its other weights in 16 bits: dtype={dtype} must be float16 or bfloat16"
        )
    cast_backbone(model, dtype)
    ao = _torchao()
    # set_inductor_config=False: quantizing must not change torch.compile's global settings
    int8 = ao.Int8WeightOnlyConfig(set_inductor_config=False)
    for _, linear in linears:
        if device is not None:
            linear.to(device)
        if bits == 8:
            ao.quantize_(linear, int8, filter_fn=None)
            del linear.extra_repr  # torchao's per-instance repr; QuantizedLinear has its own
        else:
            linear.weight = nn.Parameter(_nf4(linear.weight.data), requires_grad=False)
        linear.__class__ = QuantizedLinear
        linear.bits = bits
    if device is not None:
        model.to(device)
    config = getattr(model, "config", None)
    if config is not None:
        config.quantization_bit = bits
    return model


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds, counting the inner tensors of quantized tensor subclasses."""
    if type(tensor) not in (torch.Tensor, nn.Parameter) and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, n)) for n in names)
    return tensor.numel() * tensor.element_size()


def weight_bytes(model: nn.Module, *, include_prefix: bool = True) -> int:
    """Bytes of every parameter and buffer of ``model`` (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if id(tensor) in seen or (not include_prefix and is_prefix_param(name)):
            continue
        seen.add(id(tensor))
        total += tensor_bytes(tensor)
    return total


__all__ = [
    "BITS",
    "QUANTIZED_LINEARS",
    "QuantizedLinear",
    "block_linears",
    "is_quantized",
    "quantize_backbone",
    "tensor_bytes",
    "weight_bytes",
]
