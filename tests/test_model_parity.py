"""Parity with the original ChatGLM-6B implementation on every recorded set (see assets/parity/README.md)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from ptuning.models.chatglm import ChatGLMForConditionalGeneration
from ptuning.models.chatglm.masks import build_masks

from .common import parity_sets, read_cases

SETS = parity_sets()
assert SETS, "no parity sets found (tests/assets/parity)"


@pytest.fixture(scope="module", params=SETS, ids=[s.name for s in SETS])
def case(request):
    folder = request.param
    model = ChatGLMForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    return folder, model, load_file(str(folder / "vectors.safetensors")), read_cases(folder)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def test_model_built_masks_and_positions_exact(case):
    _, model, v, _ = case
    cfg = model.config
    hidden, positions = build_masks(
        v["fwd.input_ids"], bos_token_id=cfg.bos_token_id, mask_token_id=cfg.mask_token_id,
        gmask_token_id=cfg.gmask_token_id,
    )
    assert torch.equal(hidden, v["fwd.attention_mask"])
    assert torch.equal(positions, v["fwd.position_ids"])
    for split in ("train",):
        hidden, positions = build_masks(
            v[f"{split}.input_ids"], bos_token_id=cfg.bos_token_id, mask_token_id=cfg.mask_token_id,
            gmask_token_id=cfg.gmask_token_id,
        )
        assert torch.equal(hidden, v[f"{split}.attention_mask"])
        assert torch.equal(positions, v[f"{split}.position_ids"])


def test_tokenizer_style_masks_from_padding_exact(case):
    _, model, v, _ = case
    cfg = model.config
    ids = v["fwd_tok.input_ids"]
    padding = ~v["fwd_tok.attention_mask"][:, 0, -1, :]  # last row: every real token visible
    hidden, positions = build_masks(
        ids, bos_token_id=cfg.bos_token_id, mask_token_id=cfg.mask_token_id,
        gmask_token_id=cfg.gmask_token_id, padding_mask=padding,
    )
    assert torch.equal(hidden, v["fwd_tok.attention_mask"])
    assert torch.equal(positions, v["fwd_tok.position_ids"])


@torch.no_grad()
def test_forward_logits_hidden_states_and_prefix(case):
    _, model, v, _ = case
    out = model(v["fwd.input_ids"], output_hidden_states=True)
    assert max_diff(out.logits, v["fwd.logits"]) <= 1e-4
    assert max_diff(torch.stack(out.hidden_states), v["fwd.hidden_states"]) <= 2e-4
    if "fwd.prefix_kv" in v:
        kv = model.transformer.prefix_key_values(1, torch.float32)
        got = torch.stack([torch.stack([k[0], val[0]]) for k, val in kv])  # (L, 2, N, P, D)
        assert max_diff(got.transpose(2, 3), v["fwd.prefix_kv"]) <= 1e-5


@torch.no_grad()
def test_forward_with_tokenizer_mask_and_positions(case):
    _, model, v, _ = case
    out = model(
        v["fwd_tok.input_ids"],
        attention_mask=v["fwd_tok.attention_mask"],
        position_ids=v["fwd_tok.position_ids"],
    )
    assert torch.isfinite(out.logits).all()
    assert max_diff(out.logits, v["fwd_tok.logits"]) <= 1e-4


@torch.no_grad()
def test_forward_with_hf_padding_mask_equals_tokenizer_mask(case):
    _, model, v, _ = case
    padding = (~v["fwd_tok.attention_mask"][:, 0, -1, :]).long()
    out = model(v["fwd_tok.input_ids"], attention_mask=padding)
    assert max_diff(out.logits, v["fwd_tok.logits"]) <= 1e-4


@pytest.mark.parametrize("split", ["loss", "train"])
def test_loss_and_prefix_gradients(case, split):
    _, model, v, cases = case
    model.zero_grad(set_to_none=True)
    out = model(v[f"{split}.input_ids"], labels=v[f"{split}.labels"])
    assert abs(out.loss.item() - v[f"{split}.loss"].item()) <= 1e-5
    assert abs(out.loss.item() - cases["cases"][split]["loss"]) <= 1e-5
    grads = {k[len(split) + 6:]: g for k, g in v.items() if k.startswith(f"{split}.grad.")}
    if model.config.pre_seq_len is None:
        assert not grads
        return
    out.loss.backward()
    params = dict(model.named_parameters())
    assert grads, "prefix set without recorded gradients"
    for name, expected in grads.items():
        got = params[name].grad
        assert got is not None, name
        tol = 1e-6 + 1e-4 * expected.abs().max().item()
        assert max_diff(got, expected) <= tol, name


@pytest.mark.parametrize("split", ["gen", "gen_tok"])
@pytest.mark.parametrize("use_cache", [True, False])
@torch.no_grad()
def test_greedy_generation(case, split, use_cache):
    _, model, v, _ = case
    kwargs = {}
    if split == "gen_tok":
        kwargs = dict(attention_mask=v["gen_tok.attention_mask"], position_ids=v["gen_tok.position_ids"])
    out = model.generate(
        v[f"{split}.input_ids"], max_new_tokens=8, do_sample=False, use_cache=use_cache,
        output_scores=True, return_dict_in_generate=True, **kwargs,
    )
    assert torch.equal(out.sequences, v[f"{split}.sequences"])
    assert max_diff(torch.stack(out.scores), v[f"{split}.scores"]) <= 1e-4
