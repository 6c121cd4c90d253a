"""Model behaviour beyond the parity vectors: loading layouts, errors, cache, checkpointing, dtypes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ptuning.models.chatglm import ChatGLMForConditionalGeneration, CheckpointError, tiny_config
from ptuning.prefix import mark_only_prefix_trainable, prefix_state_dict
from ptuning.weights import save_weights

from .common import ASSETS

PTUNING = ASSETS / "parity" / "tiny-ptuning"
BASE = ASSETS / "parity" / "tiny-base"


def batch(config, rows=3, prompt=6, target=5, seed=0):
    """Left-padded rows ``prompt [gMASK] <sop> target <eop>`` with random lengths, and their labels."""
    g = torch.Generator().manual_seed(seed)
    seqs, labels = [], []
    for r in range(rows):
        p = torch.randint(5, 900, (prompt - r,), generator=g).tolist()
        t = torch.randint(5, 900, (target,), generator=g).tolist()
        ids = p + [config.gmask_token_id, config.bos_token_id] + t + [config.eos_token_id]
        seqs.append(ids)
        labels.append([-100] * (len(p) + 1) + ids[len(p) + 1:])
    width = max(map(len, seqs))
    ids = torch.tensor([[config.pad_token_id] * (width - len(s)) + s for s in seqs])
    lab = torch.tensor([[-100] * (width - len(s)) + s for s in labels])
    return ids, lab


@pytest.mark.parametrize("layout", ["safetensors", "sharded-safetensors", "bin", "sharded-bin"])
def test_every_weight_layout_loads_to_identical_logits(tmp_path, layout):
    reference = ChatGLMForConditionalGeneration.from_pretrained(PTUNING)
    state = load_file(str(PTUNING / "model.safetensors"))  # includes rotary_emb.inv_freq, as real checkpoints
    folder = tmp_path / layout
    save_weights(state, folder, safe="safetensors" in layout, max_shard_bytes=200_000 if "sharded" in layout else None)
    (folder / "config.json").write_text((PTUNING / "config.json").read_text())
    if "sharded" in layout:
        assert len(list(folder.glob("*-of-*"))) > 1
        assert list(folder.glob("*.index.json"))
    model = ChatGLMForConditionalGeneration.from_pretrained(folder)
    ids, _ = batch(model.config)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_save_pretrained_round_trip_keeps_original_keys(tmp_path):
    model = ChatGLMForConditionalGeneration.from_pretrained(PTUNING)
    model.save_pretrained(tmp_path / "out")
    keys = set(load_file(str(tmp_path / "out" / "model.safetensors")))
    assert "transformer.layers.0.attention.query_key_value.weight" in keys
    assert "transformer.prefix_encoder.embedding.weight" in keys
    assert "lm_head.weight" in keys
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_layers"] == 2 and config["pre_seq_len"] == 4
    again = ChatGLMForConditionalGeneration.from_pretrained(tmp_path / "out")
    ids, _ = batch(model.config)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_original_config_auto_map_is_ignored(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    config = json.loads((BASE / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes((BASE / "model.safetensors").read_bytes())
    model = ChatGLMForConditionalGeneration.from_pretrained(folder)
    assert not hasattr(model.config, "auto_map") or model.config.auto_map is None


def test_missing_key_names_it(tmp_path):
    state = load_file(str(BASE / "model.safetensors"))
    del state["transformer.layers.1.mlp.dense_4h_to_h.bias"]
    save_weights(state, tmp_path)
    (tmp_path / "config.json").write_text((BASE / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"missing key\(s\) transformer\.layers\.1\.mlp\.dense_4h_to_h\.bias"):
        ChatGLMForConditionalGeneration.from_pretrained(tmp_path)


def test_misshaped_key_names_both_shapes(tmp_path):
    state = load_file(str(BASE / "model.safetensors"))
    state["transformer.final_layernorm.weight"] = torch.ones(32)
    save_weights(state, tmp_path)
    (tmp_path / "config.json").write_text((BASE / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"final_layernorm\.weight' has shape \[32\] .* expects \[64\]"):
        ChatGLMForConditionalGeneration.from_pretrained(tmp_path)


def test_missing_shard_and_empty_folder_are_named(tmp_path):
    state = load_file(str(BASE / "model.safetensors"))
    save_weights(state, tmp_path / "m", max_shard_bytes=200_000)
    (tmp_path / "m" / "config.json").write_text((BASE / "config.json").read_text())
    victim = sorted((tmp_path / "m").glob("model-*"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        ChatGLMForConditionalGeneration.from_pretrained(tmp_path / "m")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "config.json").write_text((BASE / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no weights found"):
        ChatGLMForConditionalGeneration.from_pretrained(tmp_path / "e")


def test_bad_config_value_names_key_and_allowed():
    with pytest.raises(Exception, match=r"'hidden_size' = 63: expected a multiple of num_attention_heads"):
        tiny_config(hidden_size=63)
    with pytest.raises(Exception, match=r"'pre_seq_len' = 0"):
        tiny_config(pre_seq_len=0)


def test_base_checkpoint_gets_fresh_float32_prefix():
    model = ChatGLMForConditionalGeneration.from_pretrained(BASE, pre_seq_len=8, dtype=torch.bfloat16)
    emb = model.transformer.prefix_encoder.embedding.weight
    assert emb.dtype == torch.float32 and emb.shape == (8, 2 * 2 * 64)
    assert 0.5 < emb.std().item() < 1.5  # PyTorch's N(0, 1) embedding init, as the original
    assert model.lm_head.weight.dtype == torch.bfloat16


def test_mark_only_prefix_trainable_counts_and_state_dict():
    model = ChatGLMForConditionalGeneration.from_pretrained(PTUNING)
    trainable, total = mark_only_prefix_trainable(model)
    assert trainable == 4 * 2 * 2 * 64
    assert total == sum(p.numel() for p in model.parameters())
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["transformer.prefix_encoder.embedding.weight"]
    assert list(prefix_state_dict(model)) == ["transformer.prefix_encoder.embedding.weight"]
    with pytest.raises(ValueError, match="no prefix encoder"):
        mark_only_prefix_trainable(ChatGLMForConditionalGeneration.from_pretrained(BASE))


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_projection_shapes_and_gradients(projection):
    config = tiny_config(pre_seq_len=6, prefix_projection=projection)
    model = ChatGLMForConditionalGeneration(config)
    mark_only_prefix_trainable(model)
    names = sorted(prefix_state_dict(model))
    if projection:
        assert names == [
            "transformer.prefix_encoder.embedding.weight",
            "transformer.prefix_encoder.trans.0.bias",
            "transformer.prefix_encoder.trans.0.weight",
            "transformer.prefix_encoder.trans.2.bias",
            "transformer.prefix_encoder.trans.2.weight",
        ]
        assert model.transformer.prefix_encoder.embedding.weight.shape == (6, 64)
    else:
        assert names == ["transformer.prefix_encoder.embedding.weight"]
    ids, labels = batch(config)
    model(ids, labels=labels).loss.backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == name.startswith("transformer.prefix_encoder."), name


def test_prefix_dropout_only_in_training():
    config = tiny_config(pre_seq_len=4)
    model = ChatGLMForConditionalGeneration(config)
    ids, _ = batch(config)
    model.eval()
    with torch.no_grad():
        a, b = model(ids).logits, model(ids).logits
        assert torch.equal(a, b)
        model.train()
        c = model(ids).logits
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("folder", [PTUNING, BASE], ids=["prefix", "base"])
def test_cached_and_uncached_generation_identical(folder):
    model = ChatGLMForConditionalGeneration.from_pretrained(folder)
    ids, _ = batch(model.config, rows=3, target=0)
    ids = ids[:, :-1]  # prompts end in [gMASK] <sop>
    results = []
    for use_cache in (True, False):
        out = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=use_cache,
                             output_scores=True, return_dict_in_generate=True)
        results.append(out)
    assert torch.equal(results[0].sequences, results[1].sequences)
    assert (torch.stack(results[0].scores) - torch.stack(results[1].scores)).abs().max() < 1e-5


def test_sampling_is_seeded_and_stops_at_eop():
    model = ChatGLMForConditionalGeneration.from_pretrained(PTUNING)
    ids, _ = batch(model.config, rows=2, target=0)
    ids = ids[:, :-1]
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(model.generate(ids, max_new_tokens=10, do_sample=True, top_p=0.7, temperature=0.95))
    assert torch.equal(runs[0], runs[1])
    # make <eop> the certain next token: generation stops after one step
    with torch.no_grad():
        model.transformer.final_layernorm.weight.zero_()
        model.transformer.final_layernorm.bias.fill_(1.0)
        model.lm_head.weight.zero_()
        model.lm_head.weight[model.config.eos_token_id] = 1.0
    out = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 1
    assert (out[:, -1] == model.config.eos_token_id).all()


def test_hf_padding_mask_generation_matches_unpadded_rows():
    model = ChatGLMForConditionalGeneration.from_pretrained(PTUNING)
    ids, _ = batch(model.config, rows=2, target=0)
    ids = ids[:, :-1]
    padding = (ids != model.config.pad_token_id).long()
    together = model.generate(ids, attention_mask=padding, max_new_tokens=5, do_sample=False)
    for row in range(2):
        alone = ids[row][padding[row].bool()][None]
        single = model.generate(alone, max_new_tokens=5, do_sample=False)
        assert torch.equal(together[row, -5:], single[0, -5:])


def test_gradient_checkpointing_gives_same_loss_and_prefix_grads():
    config = tiny_config(pre_seq_len=4, num_layers=3)
    model = ChatGLMForConditionalGeneration(config)
    mark_only_prefix_trainable(model)
    model.eval()  # no dropout, so both passes see the same prefix
    ids, labels = batch(config)
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            model.activation_checkpointing_enable()
        model.zero_grad(set_to_none=True)
        model.transformer.train(checkpointing)  # checkpointing acts in training mode
        model.transformer.prefix_dropout.eval()
        loss = model(ids, labels=labels).loss
        loss.backward()
        results.append((loss.detach(), model.transformer.prefix_encoder.embedding.weight.grad.clone()))
    assert model.transformer.layers[0].gradient_checkpointing
    assert torch.equal(results[0][0], results[1][0])
    assert torch.allclose(results[0][1], results[1][1], atol=1e-7, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_backbone_with_float32_prefix_trains(dtype):
    model = ChatGLMForConditionalGeneration.from_pretrained(BASE, pre_seq_len=4, dtype=dtype)
    mark_only_prefix_trainable(model)
    model.train()
    ids, labels = batch(model.config)
    loss = model(ids, labels=labels).loss
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert list(grads) == ["transformer.prefix_encoder.embedding.weight"]
    assert grads["transformer.prefix_encoder.embedding.weight"].dtype == torch.float32
    assert model.transformer.layers[0].attention.dense.weight.dtype == dtype


def test_inputs_without_sop_give_a_clear_error():
    model = ChatGLMForConditionalGeneration(tiny_config())
    with pytest.raises(ValueError, match=r"rows \[0\] contain no <sop>"):
        model(torch.tensor([[5, 6, 7, 991]]))


def test_beam_search_and_several_sequences_per_prompt():
    model = ChatGLMForConditionalGeneration.from_pretrained(PTUNING)
    ids, _ = batch(model.config, rows=2, target=0)
    ids = ids[:, :-1]
    beams = model.generate(ids, max_new_tokens=4, num_beams=3, do_sample=False, num_return_sequences=2)
    assert beams.shape == (4, ids.shape[1] + 4)
    greedy = model.generate(ids, max_new_tokens=4, do_sample=False)
    single = model.generate(ids, max_new_tokens=4, num_beams=1, do_sample=False, num_return_sequences=1)
    assert torch.equal(greedy, single)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_target_only_loss_equals_full_logits_loss(reduction):
    config = tiny_config(pre_seq_len=4)
    model = ChatGLMForConditionalGeneration(config).eval()
    ids, labels = batch(config)
    full = model(ids, labels=labels, loss_reduction=reduction)
    lean = model(ids, labels=labels, loss_reduction=reduction, return_logits=False)
    assert lean.logits is None and full.logits is not None
    assert torch.allclose(full.loss, lean.loss, rtol=1e-6, atol=1e-6)
    if reduction == "sum":
        count = (labels[:, 1:] != -100).sum()
        assert torch.allclose(full.loss, model(ids, labels=labels).loss * count, rtol=1e-6)


def test_cache_buffers_grow_without_concatenating_and_keep_the_prefix_apart():
    from ptuning.models.chatglm.cache import ChatGLMCache, PrefixRoomLayer

    model = ChatGLMForConditionalGeneration.from_pretrained(PTUNING)
    ids, _ = batch(model.config, rows=2, target=0)
    ids = ids[:, :-1]
    cache = ChatGLMCache(model.config)
    out = model.generate(ids, max_new_tokens=70, min_new_tokens=70, do_sample=False, cache=cache,
                         eos_token_id=model.config.eos_token_id)
    layer = cache.layers[0]
    assert isinstance(layer, PrefixRoomLayer)
    # the prompt and all generated tokens but the last are cached, never the prefix
    assert cache.get_seq_length() == out.shape[1] - 1 == layer.keys.shape[2]
    assert layer._k.shape[2] >= 4 + cache.get_seq_length()  # grown past its first 64 slots
    assert layer.keys.data_ptr() == layer._k[:, :, 4:].data_ptr()  # a view of the buffer
    plain = model.generate(ids, max_new_tokens=70, min_new_tokens=70, do_sample=False, use_cache=False,
                           eos_token_id=model.config.eos_token_id)
    assert torch.equal(out, plain)
