"""ChatGLM2/3 shapes no public parity set covers (prefix_projection, 1 or 3 key/value groups, no multi-query
attention, other head sizes, longer prefixes), against a plain-PyTorch float64 implementation written from the
computation the parity README spells out (tests/assets/parity-glm2/README.md, "What an implementation must
reproduce"): logits with and without left padding, the training loss and the prefix gradients."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from ptuning.models.chatglm2.family import load_model
from ptuning.prefix import mark_only_prefix_trainable

SHAPES = {
    "projection-3groups": dict(num_layers=3, hidden_size=96, num_attention_heads=6, multi_query_group_num=3,
                               kv_channels=16, ffn_hidden_size=200, padded_vocab_size=300, pre_seq_len=7,
                               prefix_projection=True),
    "1group-wide-heads": dict(num_layers=2, hidden_size=64, num_attention_heads=4, multi_query_group_num=1,
                              kv_channels=32, ffn_hidden_size=96, padded_vocab_size=256, pre_seq_len=12,
                              prefix_projection=False),
    "no-multi-query": dict(num_layers=2, hidden_size=48, num_attention_heads=3, multi_query_attention=False,
                           kv_channels=8, ffn_hidden_size=64, padded_vocab_size=200, pre_seq_len=5,
                           prefix_projection=True),
}


def original_weights(cfg: dict, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, n, d, f, v = cfg["hidden_size"], cfg["num_attention_heads"], cfg["kv_channels"], cfg["ffn_hidden_size"], cfg["padded_vocab_size"]
    groups = cfg["multi_query_group_num"] if cfg.get("multi_query_attention", True) else n
    qkv = n * d + 2 * groups * d
    k = 2 * cfg["num_layers"] * groups * d

    def normal(*shape, std=1.0):
        return torch.randn(*shape, generator=g) * std

    w = {"transformer.embedding.word_embeddings.weight": normal(v, h)}
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + normal(h, std=0.1)
        w[p + "self_attention.query_key_value.weight"] = normal(qkv, h, std=2 / math.sqrt(h))
        w[p + "self_attention.query_key_value.bias"] = normal(qkv, std=0.1)
        w[p + "self_attention.dense.weight"] = normal(h, n * d, std=1 / math.sqrt(n * d))
        w[p + "post_attention_layernorm.weight"] = 1 + normal(h, std=0.1)
        w[p + "mlp.dense_h_to_4h.weight"] = normal(2 * f, h, std=1 / math.sqrt(h))
        w[p + "mlp.dense_4h_to_h.weight"] = normal(h, f, std=1 / math.sqrt(f))
    w["transformer.encoder.final_layernorm.weight"] = 1 + normal(h, std=0.1)
    w["transformer.output_layer.weight"] = normal(v, h, std=2 / math.sqrt(h))
    w["transformer.prefix_encoder.embedding.weight"] = normal(cfg["pre_seq_len"], k)
    if cfg["prefix_projection"]:
        w["transformer.prefix_encoder.trans.0.weight"] = normal(h, k, std=1 / math.sqrt(k))
        w["transformer.prefix_encoder.trans.0.bias"] = normal(h, std=0.02)
        w["transformer.prefix_encoder.trans.2.weight"] = normal(k, h, std=1 / math.sqrt(h))
        w["transformer.prefix_encoder.trans.2.bias"] = normal(k, std=0.02)
    return w


def reference(cfg: dict, w: dict, ids, mask2d=None, positions=None, labels=None):
    """The README's computation in float64 (upstream conventions; prefix set, no cache)."""
    w = {k: t.double() for k, t in w.items()}
    b, s = ids.shape
    n, d = cfg["num_attention_heads"], cfg["kv_channels"]
    groups = cfg["multi_query_group_num"] if cfg.get("multi_query_attention", True) else n
    eps, layers, length = 1e-5, cfg["num_layers"], cfg["pre_seq_len"]
    positions = torch.arange(s).expand(b, s) if positions is None else positions

    def rms(x, weight):
        return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    def rotate(x):  # x (B, S, heads, D): first D/2 dims in adjacent pairs
        half, quarter = d // 2, d // 4
        theta = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) * 2 / half)
        angle = positions[..., None].double() * theta  # (B, S, D/4)
        cos, sin = angle.cos()[:, :, None], angle.sin()[:, :, None]
        pairs = x[..., :half].reshape(*x.shape[:-1], quarter, 2)
        a, c = pairs[..., 0], pairs[..., 1]
        turned = torch.stack([a * cos - c * sin, c * cos + a * sin], -1).flatten(-2)
        return torch.cat([turned, x[..., half:]], -1)

    kv = w["transformer.prefix_encoder.embedding.weight"]
    if cfg["prefix_projection"]:
        kv = torch.tanh(kv @ w["transformer.prefix_encoder.trans.0.weight"].T + w["transformer.prefix_encoder.trans.0.bias"])
        kv = kv @ w["transformer.prefix_encoder.trans.2.weight"].T + w["transformer.prefix_encoder.trans.2.bias"]
    kv = kv.view(length, 2 * layers, groups, d)
    # visibility (B, S, P + S): prefix columns always, then causal, hiding pad columns (a prefix is present)
    visible = torch.ones(b, s, length + s, dtype=torch.bool)
    visible[:, :, length:] = torch.ones(s, s, dtype=torch.bool).tril()
    if mask2d is not None:
        visible[:, :, length:] &= mask2d.bool()[:, None, :]
    x = w["transformer.embedding.word_embeddings.weight"][ids]
    for i in range(layers):
        p = f"transformer.encoder.layers.{i}."
        a = rms(x, w[p + "input_layernorm.weight"])
        qkv = a @ w[p + "self_attention.query_key_value.weight"].T + w[p + "self_attention.query_key_value.bias"]
        q, k, v = qkv.split([n * d, groups * d, groups * d], -1)
        q, k = rotate(q.view(b, s, n, d)), rotate(k.view(b, s, groups, d))
        v = v.view(b, s, groups, d)
        k = torch.cat([kv[:, 2 * i].expand(b, -1, -1, -1), k], 1)  # (B, P + S, G, D), prefix not rotated
        v = torch.cat([kv[:, 2 * i + 1].expand(b, -1, -1, -1), v], 1)
        group = torch.arange(n) // (n // groups)
        scores = torch.einsum("bsnd,btnd->bnst", q, k[:, :, group]) / math.sqrt(d)
        scores = scores.masked_fill(~visible[:, None], float("-inf"))
        ctx = torch.einsum("bnst,btnd->bsnd", scores.softmax(-1), v[:, :, group]).reshape(b, s, n * d)
        x = x + ctx @ w[p + "self_attention.dense.weight"].T
        u = rms(x, w[p + "post_attention_layernorm.weight"]) @ w[p + "mlp.dense_h_to_4h.weight"].T
        gate, up = u.chunk(2, -1)
        x = x + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.dense_4h_to_h.weight"].T
    logits = rms(x, w["transformer.encoder.final_layernorm.weight"]) @ w["transformer.output_layer.weight"].T
    loss = None
    if labels is not None:
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                                 ignore_index=-100)
    return logits, loss


@pytest.fixture(params=list(SHAPES), scope="module")
def shape_case(request, tmp_path_factory):
    cfg = {"model_type": "chatglm", "chatglm_version": 3, "multi_query_attention": True, "seq_length": 128,
           "add_qkv_bias": True, "layernorm_epsilon": 1e-5, "rmsnorm": True, **SHAPES[request.param]}
    if not cfg["multi_query_attention"]:
        cfg["multi_query_group_num"] = 1  # ignored by the original without multi-query attention
    folder = tmp_path_factory.mktemp(request.param)
    weights = original_weights(cfg, seed=len(request.param))
    save_file(weights, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg))
    model = load_model(folder, pre_seq_len=cfg["pre_seq_len"], prefix_projection=cfg["prefix_projection"])
    return cfg, weights, model


def test_logits_plain_and_left_padded(shape_case):
    cfg, weights, model = shape_case
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg["padded_vocab_size"], (3, 10), generator=g)
    with torch.no_grad():
        got = model(ids).logits
    expected, _ = reference(cfg, weights, ids)
    assert (got.double() - expected).abs().max().item() <= 1e-4
    mask = torch.ones_like(ids)
    mask[0, :4], mask[2, :1] = 0, 0
    ids = ids.masked_fill(mask == 0, 0)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        got = model(ids, attention_mask=mask, position_ids=positions).logits
    expected, _ = reference(cfg, weights, ids, mask, positions)
    assert (got.double() - expected).abs().max().item() <= 1e-4  # every row: pad rows see the prefix alone


def test_loss_and_prefix_gradients(shape_case):
    cfg, weights, model = shape_case
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, cfg["padded_vocab_size"], (2, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = -100
    mark_only_prefix_trainable(model)
    model.train()
    try:
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=labels).loss
        loss.backward()
    finally:
        model.eval()
    prefix = {k: v.clone().requires_grad_(True) for k, v in weights.items() if "prefix_encoder" in k}
    _, expected = reference(cfg, {**weights, **prefix}, ids, labels=labels)
    expected.backward()
    assert abs(loss.item() - expected.item()) <= 1e-5
    params = dict(model.named_parameters())
    for key, tensor in prefix.items():
        got = params[key[len("transformer."):]].grad
        tol = 1e-6 + 1e-4 * tensor.grad.abs().max().item()
        assert (got.double() - tensor.grad).abs().max().item() <= tol, key


def test_the_reference_itself_reproduces_a_recorded_set():
    """The float64 reference above against the original code's vectors (so its agreement above means something)."""
    from safetensors.torch import load_file

    from .common import ASSETS

    folder = ASSETS / "parity-glm2" / "glm2-tiny-ptuning"
    cfg = json.loads((folder / "config.json").read_text())
    weights = load_file(str(folder / "model.safetensors"))
    v = load_file(str(folder / "vectors.safetensors"))
    logits, _ = reference(cfg, weights, v["fwd.input_ids"])
    assert (logits - v["fwd.logits"].double()).abs().max().item() <= 1e-4
    mask, positions = v["left.attention_mask"], v["left.position_ids"]
    logits, _ = reference(cfg, weights, v["left.input_ids"], mask, positions)
    assert (logits - v["left.logits"].double()).abs().max().item() <= 1e-4
    _, loss = reference(cfg, weights, v["train.input_ids"], labels=v["train.labels"])
    assert abs(loss.item() - v["train.loss"].item()) <= 1e-5
