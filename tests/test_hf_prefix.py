"""The prefix in transformers' own decoders (GLM, GLM-4, Llama, Qwen2, Qwen3) through the AttentionInterface.

Tiny random configs built here. The references: peft's ``PrefixTuningConfig`` on the plain transformers model
with the same prefix values and peft's position shift undone; a hand-written attention over the concatenated
keys/values; the plain transformers model itself for a model without prefix.
"""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    Glm4Config,
    Glm4ForCausalLM,
    GlmConfig,
    GlmForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import ptuning.models.hf.attention as attention_module
from ptuning.models.hf import attach_prefix, load_causal_lm, load_prefix_model, prefix_attention, prefix_shape
from ptuning.models.hf.attention import (
    CPU_CAUSAL_MIN_QUERIES,
    causal_prefix_attention,
    no_mask_form,
    prefixed_mask,
)
from ptuning.prefix import PrefixEncoder, PrefixKV, PrefixShape, mark_only_prefix_trainable, prefix_key_values
from ptuning.weights import CheckpointError

VOCAB = 96
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    tie_word_embeddings=False,
)
ARCHITECTURES = {
    # GLM: partial rotary (half of each head), q/k/v biases, GQA
    "GlmForCausalLM": (GlmConfig, GlmForCausalLM, dict(head_dim=8, partial_rotary_factor=0.5)),
    # GLM-4-0414: extra post-norms, head_dim set in the config
    "Glm4ForCausalLM": (Glm4Config, Glm4ForCausalLM, dict(head_dim=8)),
    "LlamaForCausalLM": (LlamaConfig, LlamaForCausalLM, {}),
    "Qwen2ForCausalLM": (Qwen2Config, Qwen2ForCausalLM, {}),
    # Qwen3: head_dim (16) is not hidden / heads (8)
    "Qwen3ForCausalLM": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=16)),
}
P = 3


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_module):
    """In-process model runs of this module use one intra-op thread (see ``one_thread_module``)."""


def plain_model(arch: str, seed: int = 0):
    config_cls, model_cls, extra = ARCHITECTURES[arch]
    config = config_cls(**COMMON, **extra)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return model_cls(config).eval()


def with_prefix(plain, pre_seq_len=P, projection=False, dropout=0.0, seed=1):
    torch.manual_seed(seed)
    shape = prefix_shape(plain.config, pre_seq_len, projection) if pre_seq_len else None
    return attach_prefix(copy.deepcopy(plain), shape, dropout)


def left_padded(rows=(7, 5, 3), seed=0):
    """Left-padded ids ``[B, S]``, their mask (1 = real) and positions counted from the first real token."""
    g = torch.Generator().manual_seed(seed)
    width = max(rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for r, n in enumerate(rows):
        ids[r, width - n:] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[r, width - n:] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def training_batch(rows=3, length=9, seed=0):
    """Right-padded rows with a prompt (no targets) and a response (targets), as the collator makes them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (rows, length), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    for r in range(1, rows):
        ids[r, length - r:] = 0
        labels[r, length - r:] = -100
    return ids, labels


# ---------------------------------------------------------------- the reference: peft, shift undone


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_same_logits_as_peft_prefix_tuning_with_positions_unshifted(arch):
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    plain = plain_model(arch)
    ours = with_prefix(plain)
    shape = ours.prefix_encoder.shape
    peft_config = PrefixTuningConfig(
        task_type=TaskType.CAUSAL_LM, num_virtual_tokens=P, num_layers=shape.num_layers,
        num_attention_heads=shape.num_key_value_heads, token_dim=shape.num_key_value_heads * shape.head_dim,
    )
    reference = get_peft_model(copy.deepcopy(plain), peft_config).eval()
    with torch.no_grad():
        reference.prompt_encoder["default"].embedding.weight.copy_(ours.prefix_encoder.embedding.weight)
    ids, mask, positions = left_padded()
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, position_ids=positions).logits
        # peft adds P to the position ids it is given (its prefix sits in the cache as P earlier tokens)
        want = reference(input_ids=ids, attention_mask=mask, position_ids=positions - P).logits
        shifted = reference(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-6)
    assert (got[real] - shifted[real]).abs().max() > 1e-3  # the shift matters: the comparison can fail


def test_attention_equals_a_hand_written_reference_for_every_mask_form():
    """prefix_attention against softmax(q·[prefix keys | keys]) with GQA, for a bool, a float and no mask."""
    g = torch.Generator().manual_seed(0)
    batch, heads, groups, queries, keys, length, dim = 2, 4, 2, 3, 5, 4, 8
    query = torch.randn(batch, heads, queries, dim, generator=g)
    key = torch.randn(batch, groups, keys, dim, generator=g)
    value = torch.randn(batch, groups, keys, dim, generator=g)
    prefix = PrefixKV([torch.randn(batch, groups, length, dim, generator=g)],
                      [torch.randn(batch, groups, length, dim, generator=g)],
                      mask=torch.tensor([[True] * length, [True, True, False, False]]))
    module = SimpleNamespace(layer_idx=0, is_causal=True, num_key_value_groups=heads // groups, training=False)
    # queries are the last 3 of 5 tokens; row 1 has its first token padded
    visible = torch.ones(batch, 1, queries, keys, dtype=torch.bool).tril(diagonal=keys - queries)
    visible[1, :, :, 0] = False

    def by_hand(mask_rows):
        k = torch.cat([prefix.keys[0], key], 2).repeat_interleave(heads // groups, 1)  # (B, N, P + T, D)
        v = torch.cat([prefix.values[0], value], 2).repeat_interleave(heads // groups, 1)
        scores = query @ k.transpose(-1, -2) / dim**0.5  # (B, N, S, P + T)
        full = torch.cat([prefix.mask[:, None, None, :].expand(-1, 1, queries, -1), mask_rows], -1)
        weights = scores.masked_fill(~full, float("-inf")).softmax(-1)
        return (weights @ v).transpose(1, 2)  # (B, S, N, D)

    want = by_hand(visible)
    as_bool, _ = prefix_attention(module, query, key, value, visible, scaling=dim**-0.5, prefix=prefix)
    additive = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
    as_float, _ = prefix_attention(module, query, key, value, additive, scaling=dim**-0.5, prefix=prefix)
    torch.testing.assert_close(as_bool, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(as_float, want, rtol=1e-5, atol=1e-6)
    # no mask with S == T: causal (what the model's SDPA does with it)
    key, value = key[:, :, :queries], value[:, :, :queries]
    causal = torch.ones(batch, 1, queries, queries, dtype=torch.bool).tril()
    none, _ = prefix_attention(module, query, key, value, None, scaling=dim**-0.5, prefix=prefix)
    torch.testing.assert_close(none, by_hand(causal), rtol=1e-5, atol=1e-6)


def test_prefixed_mask_shapes_and_errors():
    mask = prefixed_mask(None, None, batch=2, queries=1, keys=6, prefix_length=3, causal=True, device="cpu")
    assert mask is None  # one query sees everything: no mask at all
    causal = prefixed_mask(None, None, batch=2, queries=3, keys=3, prefix_length=2, causal=True, device="cpu")
    assert causal.tolist() == [[[[True, True, True, False, False], [True, True, True, True, False],
                                 [True, True, True, True, True]]]]
    with pytest.raises(ValueError, match=r"PrefixKV.mask has shape \(1, 2\); expected \[batch, prefix length\]"):
        prefixed_mask(None, torch.ones(1, 2, dtype=torch.bool), batch=2, queries=3, keys=3, prefix_length=2,
                      causal=True, device="cpu")
    with pytest.raises(ValueError, match=r"attention mask of shape \(2, 1, 3, 4\)"):
        prefixed_mask(torch.ones(2, 1, 3, 4, dtype=torch.bool), None, batch=2, queries=3, keys=3, prefix_length=2,
                      causal=True, device="cpu")


def test_a_batch_without_padding_needs_no_mask_on_a_gpu_and_none_on_a_cpu_from_1024_tokens():
    assert no_mask_form(torch.device("cuda"), 16, 128) == "lower_right"
    assert no_mask_form(torch.device("cpu"), CPU_CAUSAL_MIN_QUERIES, 128) == "zero_queries"
    assert no_mask_form(torch.device("cpu"), CPU_CAUSAL_MIN_QUERIES - 1, 128) == "mask"
    assert no_mask_form(torch.device("cpu"), CPU_CAUSAL_MIN_QUERIES, CPU_CAUSAL_MIN_QUERIES + 1) == "mask"


@pytest.mark.parametrize("form", ["lower_right", "zero_queries"])
def test_every_form_without_a_mask_gives_the_outputs_and_gradients_of_the_materialized_mask(form):
    """causal_lower_right (as a GPU runs it; torch materializes it on a CPU) and zero queries + is_causal against
    the [1, 1, S, P + S] mask the prefix attention built for every batch before, with grouped heads."""
    g = torch.Generator().manual_seed(0)
    batch, heads, groups, queries, length, dim = 2, 4, 2, 9, 5, 8
    module = SimpleNamespace(layer_idx=0, is_causal=True, num_key_value_groups=heads // groups, training=False)
    query = torch.randn(batch, heads, queries, dim, generator=g)
    key = torch.randn(batch, groups, length + queries, dim, generator=g)
    value = torch.randn(batch, groups, length + queries, dim, generator=g)
    weights = torch.randn(batch, queries, heads, dim, generator=g)

    def run(form):
        q, k, v = (t.clone().requires_grad_() for t in (query, key, value))
        out, _ = causal_prefix_attention(module, q, k, v, prefix_length=length, scaling=dim**-0.5, form=form)
        (out * weights).sum().backward()
        return out.detach(), q.grad, k.grad, v.grad

    for got, want in zip(run(form), run("mask"), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="form='flash': expected 'lower_right', 'zero_queries' or 'mask'"):
        run("flash")


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen3ForCausalLM"])
def test_long_batches_without_padding_build_no_mask_and_keep_logits_and_prefix_gradients(arch, monkeypatch):
    model = with_prefix(plain_model(arch)).train()
    model.config.max_position_embeddings = 2 * CPU_CAUSAL_MIN_QUERIES
    mark_only_prefix_trainable(model)
    ids = torch.randint(3, VOCAB, (2, CPU_CAUSAL_MIN_QUERIES), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    masks = []
    original = attention_module.sdpa_attention_forward

    def spy(module, query, key, value, attention_mask, **kwargs):
        masks.append(attention_mask)
        return original(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(attention_module, "sdpa_attention_forward", spy)

    def step():
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=labels)
        out.loss.backward()
        return out.logits.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    logits, grads = step()
    assert masks and all(mask is None for mask in masks)  # zero queries + is_causal: nothing materialized
    monkeypatch.setattr(attention_module, "no_mask_form", lambda *_: "mask")
    masks.clear()
    logits_before, grads_before = step()
    assert all(mask is not None and mask.shape[-2:] == (CPU_CAUSAL_MIN_QUERIES, P + CPU_CAUSAL_MIN_QUERIES)
               for mask in masks)
    torch.testing.assert_close(logits, logits_before, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, grads_before, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- no prefix = the plain model


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_no_prefix_is_the_plain_model_bit_for_bit(arch):
    plain = plain_model(arch)
    ours = with_prefix(plain, pre_seq_len=0)
    assert ours.prefix_encoder is None
    ids, mask, positions = left_padded()
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, plain(ids).logits)
        assert torch.equal(ours(ids, attention_mask=mask).logits, plain(ids, attention_mask=mask).logits)
    settings = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids, **settings), plain.generate(ids, **settings))


# ---------------------------------------------------------------- gradient checkpointing


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_checkpointing_gives_equal_loss_and_prefix_gradients(arch):
    model = with_prefix(plain_model(arch), projection=arch == "LlamaForCausalLM").train()
    mark_only_prefix_trainable(model)
    ids, labels = training_batch()

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=labels, return_logits=False).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    runs = []
    attention = model.base_model.layers[0].self_attn
    handle = attention.register_forward_hook(lambda *_: runs.append(1))
    loss, grads = step()
    assert len(runs) == 1
    model.activation_checkpointing_enable()
    runs.clear()
    loss_ckpt, grads_ckpt = step()
    assert len(runs) == 2  # the layer ran again in backward: it was checkpointed
    handle.remove()
    assert grads and all(g.abs().sum() > 0 for g in grads.values())
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=0)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-6, atol=1e-7)


def test_reentrant_checkpointing_is_refused():
    model = with_prefix(plain_model("LlamaForCausalLM"))
    with pytest.raises(ValueError, match="use_reentrant=True: reentrant checkpointing drops the prefix gradients"):
        model.activation_checkpointing_enable({"use_reentrant": True})


# ---------------------------------------------------------------- generation


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_generation_cached_equals_uncached(arch):
    model = with_prefix(plain_model(arch))
    ids, mask, _ = left_padded()
    base = dict(attention_mask=mask, max_new_tokens=6, pad_token_id=0)
    for settings in (dict(do_sample=False), dict(do_sample=False, num_beams=3),
                     dict(do_sample=True, top_k=20, temperature=0.8)):
        torch.manual_seed(3)
        cached = model.generate(ids, **base, **settings, use_cache=True)
        torch.manual_seed(3)
        uncached = model.generate(ids, **base, **settings, use_cache=False)
        assert torch.equal(cached, uncached), settings
    # a static cache hands the attention no mask in prefill with keys longer than queries (its empty slots)
    static = model.generate(ids, **base, do_sample=False, cache_implementation="static")
    assert torch.equal(static, model.generate(ids, **base, do_sample=False))


@pytest.mark.parametrize("arch", ["GlmForCausalLM", "Qwen3ForCausalLM"])
def test_the_prefix_is_never_in_the_cache_and_changes_the_output(arch):
    plain = plain_model(arch)
    model = with_prefix(plain)
    ids, mask, _ = left_padded()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        bare = plain(ids, attention_mask=mask)
    assert out.cache.get_seq_length() == ids.shape[1]
    assert out.cache.layers[0].keys.shape[2] == ids.shape[1]
    assert (out.logits - bare.logits).abs().max() > 1e-3
    greedy = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert not torch.equal(model.generate(ids, **greedy), plain.generate(ids, **greedy))


# ---------------------------------------------------------------- several prefixes in one batch


def stacked_prefix(encoders: list[PrefixEncoder | None], dtype=torch.float32) -> PrefixKV:
    """One row per encoder (None = no prefix), padded to the longest with hidden columns."""
    longest = max(e.pre_seq_len for e in encoders if e is not None)
    parts = [prefix_key_values(e, 1, dtype) if e is not None else None for e in encoders]
    ref = next(p for p in parts if p is not None)
    layers = len(ref.keys)
    keys, values, mask = [[] for _ in range(layers)], [[] for _ in range(layers)], []
    for part in parts:
        have = part.length if part is not None else 0
        mask.append([True] * have + [False] * (longest - have))
        for i in range(layers):
            for out, src in ((keys[i], part.keys[i] if part else None), (values[i], part.values[i] if part else None)):
                pad = torch.zeros(1, ref.keys[i].shape[1], longest - have, ref.keys[i].shape[3], dtype=dtype)
                out.append(pad if src is None else torch.cat([src, pad], 2))
    return PrefixKV([torch.cat(k) for k in keys], [torch.cat(v) for v in values], torch.tensor(mask))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_rows_with_different_prefixes_get_what_they_get_alone(arch):
    plain = plain_model(arch)
    short = with_prefix(plain, pre_seq_len=2, seed=5)
    long = with_prefix(plain, pre_seq_len=4, seed=6)
    encoders = [short.prefix_encoder, long.prefix_encoder, None]
    ids, mask, positions = left_padded((5, 7, 6))
    prefix = stacked_prefix(encoders)
    with torch.no_grad():
        together = long(ids, attention_mask=mask, position_ids=positions, prefix=prefix).logits
        for row, alone_model in enumerate((short, long, plain)):
            real = mask[row].bool()
            alone = alone_model(ids[row:row + 1, real], position_ids=positions[row:row + 1, real]).logits[0]
            torch.testing.assert_close(together[row, real], alone, rtol=1e-5, atol=1e-5)
    settings = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    batched = long.generate(ids, attention_mask=mask, prefix=prefix, **settings)
    beams = long.generate(ids, attention_mask=mask, prefix=prefix, num_beams=2, **settings)
    for row, alone_model in enumerate((short, long, plain)):
        real = mask[row].bool()
        alone = alone_model.generate(ids[row:row + 1, real], **settings)[0]
        assert batched[row, ids.shape[1]:].tolist() == alone[real.sum():].tolist()
        alone_beams = alone_model.generate(ids[row:row + 1, real], num_beams=2, **settings)[0]
        assert beams[row, ids.shape[1]:].tolist() == alone_beams[real.sum():].tolist()


# ---------------------------------------------------------------- dtypes, shapes, loading


def test_bf16_backbone_keeps_a_float32_prefix_with_float32_gradients():
    plain = plain_model("Qwen3ForCausalLM").to(torch.bfloat16)
    model = with_prefix(plain).train()
    assert model.prefix_encoder.embedding.weight.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.bfloat16
    mark_only_prefix_trainable(model)
    ids, labels = training_batch()
    loss = model(ids, labels=labels, return_logits=False, loss_reduction="sum").loss
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    grad = model.prefix_encoder.embedding.weight.grad
    assert grad.dtype == torch.float32 and grad.abs().sum() > 0


def test_loss_forms_agree():
    model = with_prefix(plain_model("LlamaForCausalLM"))
    ids, labels = training_batch()
    with torch.no_grad():
        full = model(ids, labels=labels)
        targets_only = model(ids, labels=labels, return_logits=False)
        summed = model(ids, labels=labels, return_logits=False, loss_reduction="sum")
    assert targets_only.logits is None
    want = F.cross_entropy(full.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(full.loss, want)
    torch.testing.assert_close(targets_only.loss, want)
    torch.testing.assert_close(summed.loss, want * (labels[:, 1:] != -100).sum())
    with pytest.raises(ValueError, match="loss_reduction='avg': expected 'mean' or 'sum'"):
        model(ids, labels=labels, loss_reduction="avg")


def test_prefix_shape_reads_grouped_heads_and_head_dim():
    config = Qwen3Config(**COMMON, head_dim=16)
    shape = prefix_shape(config, 128)
    assert (shape.num_layers, shape.num_key_value_heads, shape.head_dim) == (2, 2, 16)
    assert shape.kv_width == 2 * 2 * 2 * 16
    no_gqa = LlamaConfig(**{**COMMON, "num_key_value_heads": None})
    assert prefix_shape(no_gqa, 4).num_key_value_heads == 4 and prefix_shape(no_gqa, 4).head_dim == 8


def test_attach_prefix_refuses_a_shape_that_does_not_fit():
    plain = plain_model("LlamaForCausalLM")
    wrong = PrefixShape(num_layers=2, num_key_value_heads=4, head_dim=8, pre_seq_len=3)
    with pytest.raises(ValueError, match=r"\(num_layers, num_key_value_heads, head_dim\) = \(2, 4, 8\), but the "
                                         r"model's attention has \(2, 2, 8\)"):
        attach_prefix(plain, wrong)


def test_a_model_with_prefix_pickles():
    import pickle

    model = with_prefix(plain_model("Qwen2ForCausalLM"))
    again = pickle.loads(pickle.dumps(model))
    assert type(again) is type(model)
    ids, mask, _ = left_padded()
    with torch.no_grad():
        assert torch.equal(again(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)


def test_prefix_dropout_only_in_training():
    model = with_prefix(plain_model("LlamaForCausalLM"), dropout=0.5)
    ids, _ = training_batch()
    with torch.no_grad():
        a, b = model(ids).logits, model(ids).logits
        assert torch.equal(a, b)
        model.train()
        c = model(ids).logits
    assert not torch.equal(a, c)


def test_load_from_a_folder_and_refuse_remote_code(tmp_path):
    plain = plain_model("Glm4ForCausalLM")
    plain.save_pretrained(tmp_path / "glm4")
    loaded = load_prefix_model(tmp_path / "glm4", pre_seq_len=P)
    assert type(loaded).__name__ == "Glm4ForCausalLMWithPrefix"
    reference = with_prefix(plain)
    with torch.no_grad():
        loaded.prefix_encoder.embedding.weight.copy_(reference.prefix_encoder.embedding.weight)
        ids, mask, _ = left_padded()
        torch.testing.assert_close(loaded(ids, attention_mask=mask).logits,
                                   reference(ids, attention_mask=mask).logits, rtol=0, atol=0)
    bf16 = load_causal_lm(tmp_path / "glm4", dtype=torch.bfloat16)
    assert bf16.lm_head.weight.dtype == torch.bfloat16

    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps(
        {"model_type": "chatglm", "architectures": ["ChatGLMModel"],
         "auto_map": {"AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"}}))
    (remote / "modeling_chatglm.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(CheckpointError, match=r"model_type 'chatglm' is not a transformers model \(only remote "
                                              r"code, auto_map, defines it; that is never run\)") as err:
        load_causal_lm(remote)
    assert "\n" not in str(err.value)

    broken = tmp_path / "broken"
    plain.save_pretrained(broken)
    from safetensors.torch import load_file, save_file

    state = load_file(str(broken / "model.safetensors"))
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing keys: model.layers.1.mlp.down_proj.weight"):
        load_causal_lm(broken)
