"""Parity of ChatGLM2-6B / ChatGLM3-6B loaded onto transformers' GlmForCausalLM with the original code, on every
recorded set (tests/assets/parity-glm2/README.md; sets in ../shared/parity-glm2 are picked up too).

Sizes come from each set's config.json, special ids from its cases.json. Tolerances are the README's. Two
places compare real-token positions only, in sets without a prefix: the original lets a pad row attend to
every token when there is neither prefix nor cache (its rule against fully masked rows), transformers gives a
pad row nothing to attend; a pad row's output feeds no real token and no target, and with a prefix both give
pad rows the prefix alone (compared in full).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers.models.glm.modeling_glm import GlmRotaryEmbedding

import ptuning.models.hf.attention as prefix_attention_module
from ptuning.models.chatglm2.family import load_model
from ptuning.models.chatglm2.rotary import ChatGLM2RotaryEmbedding, rope_table
from ptuning.prefix import mark_only_prefix_trainable

from .common import GLM2_PARITY_DIRS, parity_sets, read_cases

SETS = parity_sets(GLM2_PARITY_DIRS)
assert SETS, "no ChatGLM2/3 parity sets found (tests/assets/parity-glm2)"

LOGITS, HIDDEN, KV, LOSS = 1e-4, 2e-4, 1e-5, 1e-5


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def grad_tolerance(expected: torch.Tensor) -> float:
    return 1e-6 + 1e-4 * expected.abs().max().item()


@pytest.fixture(scope="module", params=SETS, ids=[s.name for s in SETS])
def case(request, one_thread_module):
    folder = request.param
    cases = read_cases(folder)
    config = json.loads((folder / "config.json").read_text())
    model = load_model(folder, dtype=torch.float32, pre_seq_len=config["pre_seq_len"],
                       prefix_projection=config["prefix_projection"], chatglm_version=cases["chatglm_version"])
    return folder, model, load_file(str(folder / "vectors.safetensors")), cases, config


class MaskRecorder:
    """Records the mask layer 0's SDPA call gets (True = may attend), materialised like SDPA reads it."""

    def __init__(self, monkeypatch):
        self.masks: list[torch.Tensor] = []
        original = prefix_attention_module.sdpa_attention_forward

        def spy(module, query, key, value, attention_mask, **kwargs):
            if module.layer_idx == 0:
                self.masks.append(self.materialise(attention_mask, query, key, kwargs.get("is_causal")))
            return original(module, query, key, value, attention_mask, **kwargs)

        monkeypatch.setattr(prefix_attention_module, "sdpa_attention_forward", spy)

    @staticmethod
    def materialise(mask, query, key, is_causal) -> torch.Tensor:
        batch, queries, keys = query.shape[0], query.shape[2], key.shape[2]
        if mask is None:
            causal = (is_causal if is_causal is not None else True) and queries > 1
            full = torch.ones(queries, keys, dtype=torch.bool)
            return (full.tril() if causal else full).expand(batch, 1, queries, keys)
        if mask.dtype != torch.bool:
            mask = mask == 0
        return mask.expand(batch, 1, queries, keys)


def test_every_size_read_from_config(case):
    _, model, _, cases, config = case
    glm = model.config
    assert (glm.num_hidden_layers, glm.hidden_size, glm.intermediate_size, glm.head_dim) == (
        config["num_layers"], config["hidden_size"], config["ffn_hidden_size"], config["kv_channels"])
    assert glm.num_key_value_heads == config["multi_query_group_num"]
    assert glm.vocab_size == config["padded_vocab_size"]
    assert glm.chatglm_version == cases["chatglm_version"]
    assert isinstance(model.model.rotary_emb, ChatGLM2RotaryEmbedding) == (cases["chatglm_version"] == 2)


@torch.no_grad()
def test_forward_logits_hidden_states_prefix_and_cache(case):
    _, model, v, _, config = case
    last = []
    hook = model.model.layers[-1].register_forward_hook(lambda m, i, o: last.append(o[0] if isinstance(o, tuple) else o))
    try:
        out = model(v["fwd.input_ids"], output_hidden_states=True, use_cache=True)
    finally:
        hook.remove()
    assert max_diff(out.logits, v["fwd.logits"]) <= LOGITS
    # index L of the original is the last layer's output before the final norm (transformers stores it after)
    hidden = torch.stack([*out.hidden_states[:-1], last[0]])
    assert max_diff(hidden, v["fwd.hidden_states"]) <= HIDDEN
    prefix_length = config["pre_seq_len"] or 0
    if prefix_length:
        kv = model.prefix_key_values(1, torch.float32)
        got = torch.stack([torch.stack([k[0], val[0]]) for k, val in zip(kv.keys, kv.values, strict=True)])  # (L, 2, G, P, D)
        assert max_diff(got.transpose(2, 3), v["fwd.prefix_kv"]) <= KV
        # the original caches the prefix in front of the tokens; here it stays out of the cache
        assert max_diff(kv.keys[0][0].permute(1, 0, 2), v["fwd.presents.0.key"][:prefix_length, 0]) <= KV
    layer = out.cache.layers[0]
    assert layer.keys.shape[2] == v["fwd.input_ids"].shape[1]  # tokens only
    assert max_diff(layer.keys.permute(2, 0, 1, 3), v["fwd.presents.0.key"][prefix_length:]) <= KV
    assert max_diff(layer.values.permute(2, 0, 1, 3), v["fwd.presents.0.value"][prefix_length:]) <= KV


@torch.no_grad()
def test_all_ones_mask_changes_nothing(case):
    _, model, v, cases, _ = case
    ids = v["fwd.input_ids"]
    out = model(ids, attention_mask=torch.ones_like(ids))
    assert cases["cases"]["fwd"].get("all_ones_mask_same_logits", True)
    assert max_diff(out.logits, v["fwd.logits"]) <= LOGITS


def real_rows(mask_2d: torch.Tensor, has_prefix: bool) -> torch.Tensor:
    """[B, S] rows to compare: all of them with a prefix, the real tokens without (see the module)."""
    return torch.ones_like(mask_2d, dtype=torch.bool) if has_prefix else mask_2d.bool()


@torch.no_grad()
def test_masks_the_attention_uses(case, monkeypatch):
    _, model, v, _, config = case
    has_prefix = bool(config["pre_seq_len"])
    recorder = MaskRecorder(monkeypatch)
    splits = [("left", v["left.input_ids"], v["left.attention_mask"], v["left.position_ids"]),
              ("train_padmask", v["train.input_ids"], v["train_padmask.attention_mask"], v["train.position_ids"])]
    if has_prefix:
        splits.append(("fwd", v["fwd.input_ids"], None, None))
    for split, ids, mask, positions in splits:
        recorder.masks.clear()
        model(ids, attention_mask=mask, position_ids=positions)
        expected = ~v[f"{split}.full_mask"]  # True = may attend
        rows = real_rows(mask if mask is not None else torch.ones_like(ids), has_prefix)
        got = recorder.masks[0]
        assert got.shape == expected.shape, split
        assert torch.equal(got[:, 0][rows], expected[:, 0][rows]), split
    # base sets hand the layers no mask for fwd: plain causal
    if not has_prefix:
        recorder.masks.clear()
        model(v["fwd.input_ids"])
        s = v["fwd.input_ids"].shape[1]
        assert torch.equal(recorder.masks[0][0, 0], torch.ones(s, s, dtype=torch.bool).tril())


def test_generation_masks_per_step(case, monkeypatch):
    _, model, v, cases, _ = case
    recorder = MaskRecorder(monkeypatch)
    with torch.no_grad():
        model.generate(v["gen_tok.input_ids"], attention_mask=v["gen_tok.attention_mask"],
                       position_ids=v["gen_tok.position_ids"], max_new_tokens=8, do_sample=False)
    steps = cases["cases"]["gen_tok"]["step_full_mask_shapes"]
    assert len(recorder.masks) == len(steps)
    for i in range(1, len(steps)):
        expected = ~v[f"gen_tok.step_full_mask.{i}"]
        assert torch.equal(recorder.masks[i], expected), i


@pytest.mark.parametrize("inputs", ["collator", "ids_only"])
def test_training_loss_logits_and_prefix_gradients(case, inputs):
    _, model, v, cases, config = case
    model.train()
    model.zero_grad(set_to_none=True)
    try:
        kwargs = {}
        if inputs == "collator":  # what the original collator passed: all-ones mask, positions 0..S-1
            kwargs = dict(attention_mask=v["train.attention_mask"], position_ids=v["train.position_ids"])
        out = model(v["train.input_ids"], labels=v["train.labels"], **kwargs)
        assert abs(out.loss.item() - v["train.loss"].item()) <= LOSS
        assert abs(out.loss.item() - cases["cases"]["train"]["loss"]) <= LOSS
        assert max_diff(out.logits, v["train.logits"]) <= LOGITS
        grads = {k[len("train.grad.transformer."):]: g for k, g in v.items() if k.startswith("train.grad.")}
        if not config["pre_seq_len"]:
            assert not grads and model.prefix_encoder is None
            return
        mark_only_prefix_trainable(model)  # as the original with pre_seq_len: only prefix_encoder.* trains
        model.zero_grad(set_to_none=True)
        out = model(v["train.input_ids"], labels=v["train.labels"], **kwargs)
        out.loss.backward()
        params = dict(model.named_parameters())
        assert grads, "prefix set without recorded gradients"
        assert {n for n, p in params.items() if p.grad is not None} == set(grads)
        for name, expected in grads.items():
            assert max_diff(params[name].grad, expected) <= grad_tolerance(expected), name
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)


@torch.no_grad()
def test_training_rows_with_their_padding_mask(case):
    _, model, v, cases, config = case
    mask = v["train_padmask.attention_mask"]
    out = model(v["train.input_ids"], attention_mask=mask, position_ids=v["train.position_ids"], labels=v["train.labels"])
    assert abs(out.loss.item() - cases["cases"]["train_padmask"]["loss"]) <= LOSS
    rows = real_rows(mask, bool(config["pre_seq_len"]))
    assert max_diff(out.logits[rows], v["train_padmask.logits"][rows]) <= LOGITS


@torch.no_grad()
def test_left_padded_rows(case):
    _, model, v, cases, config = case
    mask = v["left.attention_mask"]
    assert (mask == 0).sum(1).tolist() == cases["cases"]["left"]["pad_counts"]
    rows = real_rows(mask, bool(config["pre_seq_len"]))
    out = model(v["left.input_ids"], attention_mask=mask, position_ids=v["left.position_ids"])
    assert max_diff(out.logits[rows], v["left.logits"][rows]) <= LOGITS
    # no positions given: 0..S-1 across the pads, as the original
    out = model(v["left.input_ids"], attention_mask=mask)
    assert max_diff(out.logits[rows], v["left_nopos.logits"][rows]) <= LOGITS


@pytest.mark.parametrize("split", ["gen", "gen_tok"])
@pytest.mark.parametrize("use_cache", [True, False])
@torch.no_grad()
def test_greedy_generation(case, split, use_cache):
    _, model, v, cases, _ = case
    ids = v[f"{split}.input_ids"]
    if split == "gen_tok":
        kwargs = dict(attention_mask=v["gen_tok.attention_mask"], position_ids=v["gen_tok.position_ids"])
    else:
        # the original's generate() with ids only: the mask from the pad id, positions 0..S-1 across the pads
        # (recorded in cases.json); transformers' generate() counts from the first real token unless told
        positions = cases["cases"]["gen"]["step_position_ids"][0]
        kwargs = dict(attention_mask=(ids != 0).long(), position_ids=torch.tensor(positions))
    out = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=use_cache, output_scores=True,
                         return_dict_in_generate=True, **kwargs)
    assert torch.equal(out.sequences, v[f"{split}.sequences"])
    assert out.sequences[:, ids.shape[1]:].tolist() == cases["cases"][split]["new_token_ids"]
    assert max_diff(torch.stack(out.scores), v[f"{split}.scores"]) <= LOGITS


def test_rotary_tables_in_every_dtype(case):
    _, model, v, cases, config = case
    positions = v["rope.positions"]
    assert positions.tolist() == cases["rope_positions"]
    for head_dim, prefix in ((config["kv_channels"], "rope"), (128, "rope128")):
        glm = model.config.__class__(**{**model.config.to_dict(), "head_dim": head_dim})
        glm.chatglm_version, glm.rope_ratio = model.config.chatglm_version, 1.0
        rotary = ChatGLM2RotaryEmbedding(glm) if cases["chatglm_version"] == 2 else GlmRotaryEmbedding(glm)
        assert max_diff(rope_table(rotary, positions, torch.float32), v[f"{prefix}.cache.float32"]) <= 1e-6
        for dtype in (torch.float16, torch.bfloat16):
            table = rope_table(rotary, positions, dtype)
            expected = v[f"{prefix}.cache.{str(dtype)[6:]}"]
            assert table.dtype == expected.dtype and torch.equal(table, expected), (head_dim, dtype)
        if cases["chatglm_version"] == 2:  # the class's own table differs: the quirk is real
            plain = rope_table(GlmRotaryEmbedding(glm), positions, torch.bfloat16)
            assert not torch.equal(plain, v[f"{prefix}.cache.bfloat16"])


def test_half_precision_model_uses_the_original_table(case):
    folder, _, v, cases, config = case
    model = load_model(folder, dtype=torch.bfloat16, pre_seq_len=config["pre_seq_len"],
                       prefix_projection=config["prefix_projection"], chatglm_version=cases["chatglm_version"])
    table = rope_table(model.model.rotary_emb, v["rope.positions"], torch.bfloat16)
    assert torch.equal(table, v["rope.cache.bfloat16"])
    with torch.no_grad():
        logits = model(v["fwd.input_ids"]).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert (logits.float().argmax(-1) == v["fwd.logits"].argmax(-1)).float().mean() >= 0.9
