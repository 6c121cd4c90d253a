"""``ptuning.memory`` for ChatGLM2/3 (architecture "glm"): weight bytes exactly, the activations a train step
saves within 3%, the published shape (--model chatglm3-6b) and original folders (--config)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GlmForCausalLM

from ptuning.memory import PRESETS, ModelShape, estimate, main, prefix_bytes, weight_bytes
from ptuning.models.chatglm2.config import OriginalConfig
from ptuning.models.chatglm2.family import BLOCK_LINEARS, prefix_shape, rotary_for
from ptuning.models.hf.modeling import attach_prefix
from ptuning.prefix import cast_backbone, mark_only_prefix_trainable
from ptuning.quantization import quantize_backbone
from ptuning.quantization import weight_bytes as measured_weight_bytes

from .common import ASSETS, saved_activation_bytes

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def glm_model(setting: str, projection: bool):
    original = OriginalConfig(num_layers=2, hidden_size=128, ffn_hidden_size=352, kv_channels=32, num_attention_heads=4,
                              multi_query_attention=True, multi_query_group_num=2, padded_vocab_size=1024,
                              seq_length=512, add_qkv_bias=True, chatglm_version=3)
    config = original.glm_config()
    model = GlmForCausalLM(config)
    model.model.rotary_emb = rotary_for(config)
    attach_prefix(model, prefix_shape(config, 8, projection), 0.1)
    model.config.pre_seq_len, model.config.prefix_projection = 8, projection
    cast_backbone(model, DTYPES.get(setting, torch.bfloat16))
    if setting in ("int8", "int4"):
        quantize_backbone(model, int(setting[3]), linear_names=BLOCK_LINEARS)
    mark_only_prefix_trainable(model)
    return model.train()


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("setting", ["fp32", "bf16", "int8", "int4"])
def test_weight_bytes_are_exact(setting, projection):
    model = glm_model(setting, projection)
    shape = ModelShape.from_config(model.config)
    assert measured_weight_bytes(model) == weight_bytes(shape, setting)


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("setting", ["fp32", "bf16"])
def test_weight_bytes_and_saved_activations(setting, projection):
    model = glm_model(setting, projection)
    shape = ModelShape.from_config(model.config, batch=2, seq=128)
    assert shape.architecture == "glm" and shape.kv_width == 2 * 2 * 2 * 32
    assert sum(p.numel() * 4 for p in model.prefix_encoder.parameters()) == prefix_bytes(shape)
    ids = torch.randint(3, 1000, (2, 128))
    labels = ids.clone()
    labels[:, :64] = -100
    # the blocks' activations plus the loss's saved float32 log-softmax [B, S-1, V]
    expected = estimate(shape, setting).activations + 4 * 2 * 127 * 1024
    assert saved_activation_bytes(model, ids, labels) == pytest.approx(expected, rel=0.03)


def test_published_shape_and_prefix_size(capsys):
    shape = PRESETS["chatglm3-6b"]
    assert prefix_bytes(ModelShape(**{**shape.__dict__, "pre_seq_len": 128})) // 4 == 128 * 2 * 28 * 2 * 128  # 1.8 M
    main(["--model", "chatglm3-6b", "--pre-seq-len", "128"])
    out = capsys.readouterr().out
    assert "ChatGLM2/3 shape: vocab 65024, hidden 4096, 28 layers, 32 heads (2 key/value heads of 128)" in out
    assert "prefix 1.84 M" in out and "Parameters: 6.25 B" in out  # 6.24 B backbone + the prefix
    bf16 = estimate(ModelShape(**{**shape.__dict__, "logit_positions": 64}), "bf16")
    int4 = estimate(ModelShape(**{**shape.__dict__, "logit_positions": 64}), "int4")
    assert int4.weights < bf16.weights / 3


def test_config_of_an_original_folder(capsys):
    main(["--config", str(ASSETS / "parity-glm2" / "glm2-tiny-ptuning"), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["shape"]["architecture"] == "glm"
    assert (out["shape"]["kv_heads"], out["shape"]["head_dim"], out["shape"]["inner"]) == (2, 16, 160)
    assert out["shape"]["pre_seq_len"] == 4
