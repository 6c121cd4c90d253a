"""The train step's fused code paths against plain reference computations: the fused cross-entropy, the
rotary embedding, and the float32 prefix gradients of a whole step (float32 and bf16 backbones, with and
without gradient checkpointing)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ptuning.models.chatglm import ChatGLMForConditionalGeneration, tiny_config
from ptuning.models.chatglm.layers import apply_rotary, rotary_inv_freq, rotary_tables
from ptuning.models.chatglm2.config import OriginalConfig
from ptuning.models.chatglm2.family import prefix_shape as chatglm2_prefix_shape
from ptuning.models.chatglm2.family import rotary_for
from ptuning.models.hf import attach_prefix
from ptuning.models.hf import prefix_shape as hf_prefix_shape
from ptuning.models.loss import FusedCrossEntropy, cross_entropy
from ptuning.prefix import mark_only_prefix_trainable
from ptuning.training.loop import token_loss_sum

from .test_model import batch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("vocab", [1000, 100000])  # one block of rows, and two (BLOCK_ELEMENTS // vocab rows each)
def test_fused_cross_entropy_matches_float32_cross_entropy(dtype, reduction, vocab):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(37, vocab, generator=g) * 4).to(dtype)
    targets = torch.randint(0, vocab, (37,), generator=g)
    reference = logits.clone().requires_grad_()
    expected = F.cross_entropy(reference.float(), targets, reduction=reduction)
    (expected * 3.0).backward()
    fused = logits.clone().requires_grad_()
    got = cross_entropy(fused * 1, targets, reduction)  # a non-leaf, as the projection's output is
    (got * 3.0).backward()
    assert got.dtype == torch.float32
    assert torch.allclose(got, expected, rtol=1e-6, atol=1e-5)
    assert fused.grad.dtype == dtype
    # float32: the same numbers up to rounding (the exponent of a tiny probability carries that of log(sum)); bf16: the gradient is rounded once more (before the
    # upstream scale), so entries differ by at most one bf16 rounding step of their magnitude
    step = 1e-5 if dtype == torch.float32 else 2**-7
    tol = step * reference.grad.abs().float() + 1e-9
    assert ((fused.grad.float() - reference.grad.float()).abs() <= tol).all()


def test_fused_cross_entropy_is_exact_where_the_target_probability_underflows():
    logits = torch.zeros(3, 50)
    logits[:, 7] = 150.0  # p[target] = exp(-150) / ...: zero in float32
    targets = torch.tensor([0, 7, 49])
    expected = F.cross_entropy(logits, targets, reduction="none").sum()
    got = cross_entropy(logits.clone().requires_grad_() * 1, targets, "sum")
    assert torch.isfinite(got) and torch.allclose(got, expected, rtol=1e-6)


def test_fused_cross_entropy_consumes_its_input_and_refuses_a_second_backward():
    logits = torch.randn(5, 11, requires_grad=True)
    targets = torch.tensor([0, 3, 10, 4, 4])
    inner = logits * 1
    loss, _ = FusedCrossEntropy.apply(inner, targets)
    softmax = torch.softmax(logits.detach(), dim=1)
    softmax[torch.arange(5), targets] -= 1
    assert torch.allclose(inner.detach(), softmax, atol=1e-6)  # overwritten by the unscaled gradient
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_cross_entropy_without_gradients_leaves_logits_alone():
    logits = torch.randn(4, 9)
    kept = logits.clone()
    loss = cross_entropy(logits, torch.tensor([1, 2, 3, 4]), "sum")
    assert torch.equal(logits, kept)
    assert torch.allclose(loss, F.cross_entropy(kept, torch.tensor([1, 2, 3, 4]), reduction="sum"))


def original_rotary(x, position_ids, head_dim):
    """The original ChatGLM-6B 2D rotary embedding written out: ``rotate_half`` on each half of the head."""
    inv_freq = rotary_inv_freq(head_dim)
    if x.dtype == torch.float16:  # the original forms float16 angles in float16
        angle = position_ids.half()[..., None] * inv_freq.half()  # (B, 2, S, R/2)
    else:
        angle = position_ids.float()[..., None] * inv_freq
    angle = torch.cat([angle, angle], dim=-1)  # (B, 2, S, R)
    cos, sin = angle.cos()[:, :, None], angle.sin()[:, :, None]  # (B, 2, 1, S, R)

    def rotate_half(t):
        a, b = t.chunk(2, dim=-1)
        return torch.cat([-b, a], dim=-1)

    x1, x2 = x.chunk(2, dim=-1)
    y1 = x1 * cos[:, 0].to(x.dtype) + rotate_half(x1) * sin[:, 0].to(x.dtype)
    y2 = x2 * cos[:, 1].to(x.dtype) + rotate_half(x2) * sin[:, 1].to(x.dtype)
    return torch.cat([y1, y2], dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rotary_matches_the_original_rotate_half(dtype):
    g = torch.Generator().manual_seed(0)
    positions = torch.randint(0, 500, (2, 2, 7), generator=g)
    x = torch.randn(2, 3, 7, 32, generator=g).to(dtype)
    cos, sin = rotary_tables(positions, rotary_inv_freq(32), dtype)
    got = apply_rotary(x, cos, sin)
    expected = original_rotary(x, positions, 32)
    # one rounding (addcmul) instead of two: at most one step of the dtype apart
    step = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    assert ((got.float() - expected.float()).abs() <= step * expected.float().abs().clamp_min(1)).all()


def test_rotary_gradient_is_the_transposed_rotation():
    g = torch.Generator().manual_seed(1)
    positions = torch.randint(0, 500, (2, 2, 5), generator=g)
    cos, sin = rotary_tables(positions, rotary_inv_freq(16), torch.float64)
    x = torch.randn(2, 3, 5, 16, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: apply_rotary(t, cos, sin), (x,))
    y = apply_rotary(x, cos, sin)
    reference = original_rotary(x, positions, 16)
    assert torch.allclose(y, reference, atol=1e-12)


def prefix_grad(model, ids, labels, *, fast: bool, autocast: bool):
    """The prefix embedding's gradient of one summed-loss step: the training loop's path (``fast``: fused
    loss, no cache) or the plain one (every logit in float32, ``F.cross_entropy``, the generation cache)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if fast:
            loss = token_loss_sum(model, ids, labels)
        else:
            loss = model(ids, labels=labels, loss_reduction="sum", use_cache=True).loss
    loss.backward()
    return loss.detach(), model.transformer.prefix_encoder.embedding.weight.grad.clone()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_step_prefix_gradients_stay_float32_and_match_the_plain_path(dtype, checkpointing):
    torch.manual_seed(0)
    config = tiny_config(pre_seq_len=4, num_layers=3)
    model = ChatGLMForConditionalGeneration(config)
    model.to(dtype)
    model.transformer.prefix_encoder.float()
    mark_only_prefix_trainable(model)
    if checkpointing:
        model.activation_checkpointing_enable()
    model.train()
    model.transformer.prefix_dropout.eval()  # both passes see the same prefix
    ids, labels = batch(config, rows=3, prompt=9, target=7)
    autocast = dtype == torch.bfloat16
    loss_fast, grad_fast = prefix_grad(model, ids, labels, fast=True, autocast=autocast)
    loss_plain, grad_plain = prefix_grad(model, ids, labels, fast=False, autocast=autocast)
    assert grad_fast.dtype == grad_plain.dtype == torch.float32
    assert grad_fast.abs().sum() > 0
    if dtype == torch.float32:
        assert torch.allclose(loss_fast, loss_plain, rtol=1e-6)
        assert torch.allclose(grad_fast, grad_plain, rtol=1e-4, atol=1e-6)
    else:  # the bf16 backbone rounds each path's activations its own way
        assert torch.allclose(loss_fast, loss_plain, rtol=2e-3)
        cosine = F.cosine_similarity(grad_fast.flatten(), grad_plain.flatten(), dim=0)
        assert cosine > 0.999
        assert (grad_fast.norm() / grad_plain.norm() - 1).abs() < 1e-2


def decoder(kind: str):
    """A tiny transformers decoder (Llama) or ChatGLM2 (its original config on ``GlmForCausalLM``) with a prefix
    of 4, bf16 backbone and float32 prefix, only the prefix trainable."""
    from transformers import GlmForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "llama":
        config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
        model = LlamaForCausalLM(config)
        attach_prefix(model, hf_prefix_shape(config, 4))
    else:
        config = OriginalConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, kv_channels=16, num_attention_heads=4,
                                multi_query_attention=True, multi_query_group_num=2, padded_vocab_size=300,
                                seq_length=256, add_qkv_bias=True, chatglm_version=2).glm_config()
        model = GlmForCausalLM(config)
        model.model.rotary_emb = rotary_for(config)
        attach_prefix(model, chatglm2_prefix_shape(config, 4))
    model.to(torch.bfloat16)
    model.prefix_encoder.float()
    mark_only_prefix_trainable(model)
    return model.train()


@pytest.mark.parametrize("kind", ["llama", "chatglm2"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_transformers_decoders_and_chatglm2_train_with_the_fused_loss(kind, checkpointing):
    model = decoder(kind)
    if checkpointing:
        model.activation_checkpointing_enable()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 300, (3, 16), generator=g)
    labels = ids.clone()
    labels[:, :9] = -100
    grads, losses = [], []
    for fused in (True, False):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=labels, loss_reduction="sum", return_logits=not fused, use_cache=False)
        assert (type(out.loss.grad_fn).__name__ == "FusedCrossEntropyBackward") == fused
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append(model.prefix_encoder.embedding.weight.grad.clone())
    assert losses[0].dtype == torch.float32 and grads[0].dtype == torch.float32
    # the bf16 backbone rounds the two paths' logits alike (the same projection); the losses differ by float32
    # summation order, the gradients by one bf16 rounding of the loss gradient
    assert torch.allclose(losses[0], losses[1], rtol=1e-5)
    assert F.cosine_similarity(grads[0].flatten(), grads[1].flatten(), dim=0) > 0.999
    assert (grads[0].norm() / grads[1].norm() - 1).abs() < 1e-2


def test_memory_estimate_uses_the_fused_loss_block():
    from ptuning import memory
    from ptuning.models import loss

    assert memory.LOSS_BLOCK_ELEMENTS == loss.BLOCK_ELEMENTS
