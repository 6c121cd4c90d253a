"""Weight-only int8 / NF4 backbone: load, forward, backward to the prefix only, memory, the training loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ptuning import memory
from ptuning.build import load_model
from ptuning.config import ModelConfig
from ptuning.models.chatglm import ChatGLMForConditionalGeneration, tiny_config
from ptuning.perf import BENCH_SHAPE
from ptuning.prefix import mark_only_prefix_trainable
from ptuning.quantization import QuantizedLinear, block_linears, quantize_backbone, weight_bytes

from .test_model import batch

# the performance issue's bench configuration
BENCH = dict(
    BENCH_SHAPE,
    max_sequence_length=2048,
    bos_token_id=31994,
    eos_token_id=31995,
    mask_token_id=31990,
    gmask_token_id=31991,
)
# relative distance of the prefix gradient from the bf16 model's, and of the first loss, per bit width
TOLERANCE = {8: 0.01, 4: 0.05}


def bench_model(dtype=torch.bfloat16) -> ChatGLMForConditionalGeneration:
    torch.set_default_dtype(dtype)
    try:
        model = ChatGLMForConditionalGeneration(tiny_config(**BENCH))
    finally:
        torch.set_default_dtype(torch.float32)
    model.transformer.prefix_encoder.float()
    return model


def prefix_grad_and_loss(model, ids, labels):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return grads, loss.detach()


def check_only_prefix_gets_gradients(grads):
    assert list(grads) == ["transformer.prefix_encoder.embedding.weight"]
    grad = grads["transformer.prefix_encoder.embedding.weight"]
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("bits", [8, 4])
def test_builtin_model_loads_quantized_and_trains_the_prefix_only(bits):
    model = load_model(ModelConfig(quantization_bit=bits, prefix_dropout=0.0))
    reference = load_model(ModelConfig(dtype="bfloat16", prefix_dropout=0.0))
    reference.load_state_dict({k: v for k, v in model.state_dict().items() if "prefix" in k}, strict=False)
    assert model.config.quantization_bit == bits
    linears = block_linears(model)
    assert len(linears) == 4 * model.config.num_layers
    assert all(
        type(m) is QuantizedLinear and type(m.weight) not in (nn.Parameter, torch.Tensor) for _, m in linears
    )
    # embeddings, norms, biases and lm_head stay 16-bit; the prefix float32
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.transformer.word_embeddings.weight.dtype == torch.bfloat16
    assert model.transformer.layers[0].attention.query_key_value.bias.dtype == torch.bfloat16
    assert model.transformer.prefix_encoder.embedding.weight.dtype == torch.float32

    for m in (model, reference):
        mark_only_prefix_trainable(m)
        m.train()
    ids, labels = batch(model.config, rows=3, prompt=10, target=8)
    grads, loss = prefix_grad_and_loss(model, ids, labels)
    ref_grads, ref_loss = prefix_grad_and_loss(reference, ids, labels)
    check_only_prefix_gets_gradients(grads)
    # the trained built-in backbone quantizes with little loss of accuracy
    assert abs(loss / ref_loss - 1) < TOLERANCE[bits], (loss, ref_loss)
    g, r = (
        grads["transformer.prefix_encoder.embedding.weight"],
        ref_grads["transformer.prefix_encoder.embedding.weight"],
    )
    assert (g - r).norm() / r.norm() < 4 * TOLERANCE[bits]


@pytest.mark.parametrize("bits", [8, 4])
def test_bench_configuration_forward_backward(bits):
    model = bench_model()
    bf16_bytes = weight_bytes(model)
    quantize_backbone(model, bits)
    mark_only_prefix_trainable(model)
    model.train()
    ids, labels = batch(model.config, rows=2, prompt=24, target=12)
    grads, loss = prefix_grad_and_loss(model, ids, labels)
    check_only_prefix_gets_gradients(grads)
    assert torch.isfinite(loss)
    # the measured ratios of the quantization table in benchmarks/README.md (bench configuration, whole model incl. embeddings)
    ratio = weight_bytes(model) / bf16_bytes
    assert ratio == pytest.approx({8: 0.863, 4: 0.795}[bits], abs=0.001)
    # and exactly what ptuning.memory computes from the shape alone
    assert weight_bytes(model) == memory.weight_bytes(
        memory.ModelShape.from_config(model.config), f"int{bits}"
    )


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_linear_backward_is_the_dequantized_weights(bits):
    torch.manual_seed(0)
    linear = nn.Linear(128, 192).to(torch.bfloat16)
    model = nn.Module()
    model.layers = nn.ModuleList([nn.Module()])
    model.layers[0].dense = linear
    quantize_backbone(model, bits)
    weight = linear.weight
    dense = weight.get_original_weight() if bits == 4 else weight.dequantize()
    x = torch.randn(5, 128, dtype=torch.bfloat16, requires_grad=True)
    y = linear(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = torch.nn.functional.linear(x_ref, dense, linear.bias)
    y_ref.backward(grad)
    assert torch.allclose(y.float(), y_ref.float(), rtol=0.02, atol=0.02)
    assert torch.allclose(x.grad.float(), x_ref.grad.float(), rtol=0.02, atol=0.02)


class WeightSizedCopies(TorchDispatchMode):
    """Counts the copies / casts whose result is as large as a weight of ``numel`` elements."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default, torch.ops.aten.mul.Tensor):
            if isinstance(out, torch.Tensor) and out.numel() == self.numel:
                self.count += 1
        return out


@pytest.mark.parametrize("bits", [8, 4])
def test_fp16_autocast_over_a_bf16_quantized_backbone_makes_no_second_weight_copy(bits):
    torch.manual_seed(0)
    linear = nn.Linear(256, 384).to(torch.bfloat16)
    model = nn.Module()
    model.layers = nn.ModuleList([nn.Module()])
    model.layers[0].dense = linear
    quantize_backbone(model, bits, dtype=torch.bfloat16)
    x = torch.randn(3, 256, dtype=torch.bfloat16, requires_grad=True)
    copies = {}
    outputs = {}
    for name, autocast in (("plain", False), ("fp16 autocast", True)):
        with torch.autocast("cpu", dtype=torch.float16, enabled=autocast), WeightSizedCopies(256 * 384) as seen:
            outputs[name] = linear(x)
        copies[name] = seen.count
    # the weight is turned into 16-bit numbers once per call, as without autocast, not once more into float16
    assert copies["fp16 autocast"] == copies["plain"] <= 2, copies
    assert outputs["fp16 autocast"].dtype == torch.bfloat16
    assert torch.equal(outputs["fp16 autocast"], outputs["plain"])
    outputs["fp16 autocast"].sum().backward()  # the backward still reaches the input
    assert x.grad is not None and x.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("bits", [8, 4])
def test_autograd_keeps_no_dequantized_weight(bits):
    """Training memory: the forward saves the quantized weights for the backward, not 16-bit copies."""
    model = ChatGLMForConditionalGeneration(tiny_config(pre_seq_len=4)).to(torch.bfloat16)
    model.transformer.prefix_encoder.float()
    quantize_backbone(model, bits)
    mark_only_prefix_trainable(model)
    weight_shapes = {tuple(m.weight.shape) for _, m in block_linears(model)}
    weight_shapes |= {(b, a) for a, b in weight_shapes}
    saved = []

    def pack(t):
        saved.append((type(t), tuple(t.shape)))
        return t

    ids, labels = batch(model.config)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=labels)
    dense_copies = [s for kind, s in saved if kind in (torch.Tensor, nn.Parameter) and s in weight_shapes]
    assert dense_copies == []
    assert any(kind not in (torch.Tensor, nn.Parameter) for kind, _ in saved)


def test_gradient_checkpointing_through_quantized_layers():
    model = ChatGLMForConditionalGeneration(tiny_config(pre_seq_len=4, prefix_dropout=0.0)).to(torch.bfloat16)
    model.transformer.prefix_encoder.float()
    quantize_backbone(model, 4)
    mark_only_prefix_trainable(model)
    model.train()
    ids, labels = batch(model.config)
    plain, plain_loss = prefix_grad_and_loss(model, ids, labels)
    model.gradient_checkpointing_enable()
    ckpt, ckpt_loss = prefix_grad_and_loss(model, ids, labels)
    assert torch.equal(plain_loss, ckpt_loss)
    key = "transformer.prefix_encoder.embedding.weight"
    assert torch.allclose(plain[key], ckpt[key], rtol=1e-3, atol=1e-6)


def test_refusals():
    model = ChatGLMForConditionalGeneration(tiny_config(pre_seq_len=4))
    with pytest.raises(ValueError, match="expected 8 .* or 4"):
        quantize_backbone(model, 3)
    with pytest.raises(ValueError, match="16 bits"):
        quantize_backbone(model, 8, dtype=torch.float32)
    quantize_backbone(model, 8)
    assert model.lm_head.weight.dtype == torch.bfloat16  # a float32 model goes to bfloat16
    with pytest.raises(ValueError, match="already quantized"):
        quantize_backbone(model, 4)


def test_training_loop_with_int4_backbone(tmp_path):
    from .test_training import prefix_of, train

    result = train(tmp_path, "model.quantization_bit=4", "model.dtype=bfloat16", "train.max_steps=3")
    assert result.step == 3 and result.train_loss is not None
    assert list(prefix_of(result.checkpoint)) == ["transformer.prefix_encoder.embedding.weight"]
