"""Real-layout ChatGLM2/3 folders: .bin shards and safetensors (sharded or not) load onto GlmForCausalLM and give
the same model; the original keys are written back exactly; config values the mapping cannot represent and
weights that do not fit fail with one line naming the key; a folder's prefix is read without the backbone."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import ptuning.weights as weights_module
from ptuning.models import family_for
from ptuning.models.chatglm2.family import ChatGLM2Family, load_model
from ptuning.models.chatglm2.weights import read_original_prefix, save_original
from ptuning.weights import CheckpointError

from .common import ASSETS

SOURCE = ASSETS / "parity-glm2" / "glm3-tiny-ptuning"  # random weights, ChatGLM3 code, P = 4


@pytest.fixture(scope="module")
def source(one_thread_module):
    return load_model(SOURCE, pre_seq_len=4, chatglm_version=3)


@pytest.fixture(scope="module")
def ids():
    return torch.tensor([[501, 503, 506, 7, 8, 9, 507, 10]])


@pytest.mark.parametrize("layout", ["bin-shards", "safetensors-shards", "safetensors", "bin"])
def test_layouts_load_to_the_same_model(source, ids, tmp_path, layout):
    safe = layout.startswith("safetensors")
    shard = 200_000 if layout.endswith("shards") else None
    paths = save_original(source, tmp_path, safe=safe, max_shard_bytes=shard, with_prefix=False)
    assert (len(paths) > 1) == layout.endswith("shards")
    index = tmp_path / ("model.safetensors.index.json" if safe else "pytorch_model.bin.index.json")
    assert index.is_file() == layout.endswith("shards")
    family = family_for(tmp_path)
    assert isinstance(family, ChatGLM2Family)
    model = family.load_model(tmp_path, dtype=torch.float32, pre_seq_len=4, prefix_projection=False,
                              prefix_dropout=0.0)
    assert model.config.chatglm_version == 3  # written by the export, read back without guessing
    model.prefix_encoder.load_state_dict(source.prefix_encoder.state_dict())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, source(ids).logits)


def test_export_writes_the_original_keys_and_values(source, tmp_path):
    save_original(source, tmp_path, safe=True, max_shard_bytes=None)
    written, original = load_file(str(tmp_path / "model.safetensors")), load_file(str(SOURCE / "model.safetensors"))
    assert list(written) == list(original)  # same keys, same order (prefix last)
    for key, tensor in original.items():
        if key.endswith("inv_freq"):
            assert written[key].shape == tensor.shape
            continue
        assert torch.equal(written[key], tensor), key
    config = json.loads((tmp_path / "config.json").read_text())
    expected = json.loads((SOURCE / "config.json").read_text())
    for key in ("num_layers", "hidden_size", "ffn_hidden_size", "kv_channels", "num_attention_heads",
                "multi_query_attention", "multi_query_group_num", "padded_vocab_size", "seq_length",
                "layernorm_epsilon", "add_qkv_bias", "pre_seq_len", "prefix_projection", "rmsnorm"):
        assert config[key] == expected[key], key
    assert config["chatglm_version"] == 3 and "auto_map" not in config


def test_bfloat16_load_casts_backbone_keeps_prefix_float32(tmp_path):
    model = load_model(SOURCE, dtype=torch.bfloat16, pre_seq_len=4, chatglm_version=3)
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.model.norm.weight.dtype == torch.bfloat16
    assert model.prefix_encoder.embedding.weight.dtype == torch.float32
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def copy_source(tmp_path, **config_changes):
    for name in ("model.safetensors", "tokenizer.model"):
        shutil.copy(SOURCE / name, tmp_path / name)
    config = json.loads((SOURCE / "config.json").read_text()) | {"chatglm_version": 3}
    for key, value in config_changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize(("key", "value", "message"), [
    ("rmsnorm", False, "'rmsnorm' is false, only true is supported"),
    ("add_bias_linear", True, "'add_bias_linear' is true"),
    ("apply_residual_connection_post_layernorm", True, "'apply_residual_connection_post_layernorm'"),
    ("post_layer_norm", False, "'post_layer_norm'"),
    ("hidden_dropout", 0.1, "'hidden_dropout' is 0.1"),
    ("quantization_bit", 4, "quantized"),
    ("multi_query_group_num", 3, "'multi_query_group_num' is 3"),
    ("kv_channels", 18, "'kv_channels' is 18"),
    ("num_layers", "2", "'num_layers' is \"2\": expected a positive integer"),
    ("chatglm_version", 4, "'chatglm_version' is 4"),
])
def test_unsupported_config_values_name_the_key(tmp_path, key, value, message):
    folder = copy_source(tmp_path, **{key: value})
    with pytest.raises(CheckpointError, match=message) as err:
        family_for(folder).load_model(folder, pre_seq_len=4, prefix_projection=False, prefix_dropout=0.0)
    assert "\n" not in str(err.value) and "config.json" in str(err.value)


def test_weights_that_do_not_fit_name_the_key(tmp_path):
    folder = copy_source(tmp_path, ffn_hidden_size=96)
    with pytest.raises(CheckpointError, match=r"'transformer.encoder.layers.0.mlp.dense_4h_to_h.weight' has shape \[64, 160\].*expected \[64, 96\]"):
        load_model(folder, pre_seq_len=4)
    state = load_file(str(SOURCE / "model.safetensors"))
    from safetensors.torch import save_file

    folder = copy_source(tmp_path)
    save_file({**state, "transformer.extra.weight": torch.zeros(2)}, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected key.*transformer.extra.weight"):
        load_model(folder, pre_seq_len=4)
    save_file({k: v for k, v in state.items() if "layers.1.mlp" not in k}, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing weight.*transformer.encoder.layers.1.mlp.dense_h_to_4h.weight"):
        load_model(folder, pre_seq_len=4)


def test_folder_prefix_must_match_the_asked_one(tmp_path):
    folder = copy_source(tmp_path)
    with pytest.raises(CheckpointError, match="set model.pre_seq_len=4"):
        load_model(folder, pre_seq_len=None)
    with pytest.raises(CheckpointError, match=r"has shape \[4, 128\] but the model's prefix expects \[8, 128\]"):
        load_model(folder, pre_seq_len=8)
    with pytest.raises(CheckpointError, match="prefix_projection false"):
        load_model(folder, pre_seq_len=4, prefix_projection=True)


def test_remote_code_is_never_run(tmp_path, ids, source):
    folder = copy_source(tmp_path, auto_map={"AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"})
    marker = tmp_path / "ran"
    for name in ("modeling_chatglm.py", "configuration_chatglm.py", "tokenization_chatglm.py"):
        (folder / name).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    family = family_for(folder)
    model = family.load_model(folder, pre_seq_len=4, prefix_projection=False, prefix_dropout=0.0)
    family.load_tokenizer(folder, model.config.vocab_size)
    assert not marker.exists()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, source(ids).logits)


@pytest.mark.parametrize("safe", [True, False])
def test_prefix_of_a_whole_model_read_alone(source, tmp_path, monkeypatch, safe):
    save_original(source, tmp_path, safe=safe, max_shard_bytes=150_000)
    index = json.loads((tmp_path / ("model.safetensors.index.json" if safe else "pytorch_model.bin.index.json")).read_text())
    prefix_files = {f for k, f in index["weight_map"].items() if k.startswith("transformer.prefix_encoder.")}
    assert len(set(index["weight_map"].values())) > len(prefix_files)
    opened, read = [], []
    if safe:
        real_open = weights_module.safe_open

        class Spy:
            def __init__(self, path, framework):
                opened.append(path)
                self.handle = real_open(path, framework=framework)

            def __enter__(self):
                self.inner = self.handle.__enter__()
                return self

            def __exit__(self, *exc):
                return self.handle.__exit__(*exc)

            def keys(self):
                return self.inner.keys()

            def get_tensor(self, key):
                read.append(key)
                return self.inner.get_tensor(key)

        monkeypatch.setattr(weights_module, "safe_open", Spy)
    else:
        real_load = torch.load
        monkeypatch.setattr(torch, "load", lambda path, *a, **k: opened.append(path) or real_load(path, *a, **k))
    prefix = read_original_prefix(tmp_path)
    assert {p.rsplit("/", 1)[-1] for p in map(str, opened)} == prefix_files
    if safe:
        assert read == ["transformer.prefix_encoder.embedding.weight"]
    assert torch.equal(prefix["transformer.prefix_encoder.embedding.weight"], source.prefix_encoder.embedding.weight)


def test_no_prefix_in_folder(tmp_path, source):
    save_original(source, tmp_path, safe=True, with_prefix=False)
    with pytest.raises(CheckpointError, match="no transformer.prefix_encoder"):
        read_original_prefix(tmp_path)
