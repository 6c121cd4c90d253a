"""peft in both directions (adapter export/import, peft's own prefix tuning and LoRA on our model) and the
full-model export in the original layout."""

from __future__ import annotations

import json
import re

import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel, PrefixTuningConfig, TaskType, get_peft_model
from peft.utils import load_peft_weights, set_peft_model_state_dict
from safetensors import safe_open

from ptuning import export as export_cli
from ptuning.build import load_model
from ptuning.checkpoint import load_prefix, prefix_metadata, save_checkpoint
from ptuning.config import ModelConfig
from ptuning.interop import (
    export_peft,
    export_peft_checkpoint,
    import_peft,
    load_peft_prefix,
    read_peft_adapter,
)
from ptuning.models.chatglm import ChatGLMForConditionalGeneration, CheckpointError, tiny_config
from ptuning.models.chatglm.layers import rotary_inv_freq
from ptuning.models.chatglm.original import export_full

from .common import ASSETS
from .test_model import batch

BASE = ASSETS / "parity" / "tiny-base"
PTUNING = ASSETS / "parity" / "tiny-ptuning"
KEY = "transformer.prefix_encoder.embedding.weight"


def prefixed_model(projection=False, pre_seq_len=5, dropout=0.0):
    """A tiny ChatGLM with random backbone and prefix (N(0, 1) embedding, as the original initialises it)."""
    torch.manual_seed(1)
    config = tiny_config(pre_seq_len=pre_seq_len, prefix_projection=projection, prefix_dropout=dropout)
    return ChatGLMForConditionalGeneration(config).eval()


def backbone_copy(model, **config_overrides):
    """The same backbone with another prefix setting (none by default); prefix weights are not copied."""
    values = {**model.config.to_dict(), "pre_seq_len": None, "prefix_projection": False, **config_overrides}
    other = ChatGLMForConditionalGeneration(model.config.__class__.from_dict(values)).eval()
    other.load_state_dict(
        {k: v for k, v in model.state_dict().items() if "prefix_encoder" not in k}, strict=False
    )
    return other


def logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def padded_batch(config):
    ids, labels = batch(config, rows=3, prompt=7, target=5)
    mask = (ids != config.pad_token_id).long()
    return ids, labels, mask


# ---- peft adapter export / import ----


@pytest.mark.parametrize("projection", [False, True])
def test_peft_export_reads_with_peft_and_imports_to_identical_logits(tmp_path, projection):
    model = prefixed_model(projection)
    config = model.config
    out = export_peft(model, tmp_path / "adapter", base_model_name_or_path="tiny")
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ] or sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    # peft's own readers
    peft_config = PeftConfig.from_pretrained(str(out))
    assert peft_config.peft_type == "PREFIX_TUNING" and peft_config.task_type == "CAUSAL_LM"
    assert (peft_config.num_virtual_tokens, peft_config.token_dim, peft_config.num_layers) == (5, 64, 2)
    assert (peft_config.num_attention_heads, peft_config.encoder_hidden_size) == (4, 64)
    assert peft_config.prefix_projection is projection
    raw = json.loads((out / "adapter_config.json").read_text())
    for key in (
        "num_virtual_tokens",
        "token_dim",
        "num_layers",
        "num_attention_heads",
        "encoder_hidden_size",
        "prefix_projection",
        "task_type",
        "peft_type",
    ):
        assert key in raw, key
    weights = load_peft_weights(str(out), device="cpu")
    with torch.no_grad():
        expected = model.transformer.prefix_encoder()
    assert list(weights) == ["prompt_embeddings"]
    assert weights["prompt_embeddings"].shape == (5, 2 * config.num_layers * config.hidden_size)
    assert torch.equal(weights["prompt_embeddings"], expected)
    # peft's state-dict loader accepts it on a peft model of our ChatGLM (inference mode, as from_pretrained)
    peft_model = get_peft_model(
        backbone_copy(model), PrefixTuningConfig(**{**peft_config.to_dict(), "inference_mode": True})
    )
    set_peft_model_state_dict(peft_model, weights)
    assert torch.equal(peft_model.prompt_encoder["default"].embedding.weight, expected)

    # back as a projection-free prefix: identical logits
    ids, _, mask = padded_batch(config)
    imported = backbone_copy(model, pre_seq_len=5, prefix_projection=False)
    load_peft_prefix(imported, out)
    assert torch.equal(logits(imported, ids, mask), logits(model, ids, mask))
    # and through our checkpoint format
    ckpt = import_peft(out, tmp_path / "ckpt", imported.config, base_model="tiny")
    again = backbone_copy(model, pre_seq_len=5, prefix_projection=False)
    load_prefix(again, ckpt)
    assert torch.equal(logits(again, ids), logits(model, ids))


def test_peft_from_pretrained_on_our_model_gives_our_logits(tmp_path):
    model = prefixed_model()
    export_peft(model, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(backbone_copy(model), str(tmp_path / "adapter")).eval()
    ids, _, mask = padded_batch(model.config)
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids, attention_mask=mask).logits, logits(model, ids, mask))
        assert torch.equal(peft_model(input_ids=ids).logits, logits(model, ids))


def test_import_refuses_adapters_that_do_not_fit(tmp_path):
    model = prefixed_model()
    export_peft(model, tmp_path / "adapter")
    with pytest.raises(CheckpointError, match="pre_seq_len=3"):
        load_peft_prefix(backbone_copy(model, pre_seq_len=3), tmp_path / "adapter")
    wider = ChatGLMForConditionalGeneration(tiny_config(hidden_size=128, pre_seq_len=5))
    with pytest.raises(CheckpointError, match="token_dim=64 but the model has hidden_size=128"):
        load_peft_prefix(wider, tmp_path / "adapter")
    LoraConfig(r=2, target_modules=["query_key_value"]).save_pretrained(str(tmp_path / "lora"))
    with pytest.raises(CheckpointError, match="LORA adapter"):
        read_peft_adapter(tmp_path / "lora")


@pytest.mark.parametrize("projection", [False, True])
def test_a_checkpoint_exports_to_peft_from_its_recorded_sizes_alone(tmp_path, projection):
    model = prefixed_model(projection)
    checkpoint = save_checkpoint(tmp_path / "run", 1, model, prefix_metadata(model, "tiny"))
    export_peft(model, tmp_path / "direct")
    export_peft_checkpoint(checkpoint, tmp_path / "recorded")  # no base model: the sizes prefix_config.json records
    export_peft_checkpoint(checkpoint, tmp_path / "checked", model.config)
    direct = load_peft_weights(str(tmp_path / "direct"), device="cpu")["prompt_embeddings"]
    for name in ("recorded", "checked"):
        assert torch.equal(load_peft_weights(str(tmp_path / name), device="cpu")["prompt_embeddings"], direct)
        config = PeftConfig.from_pretrained(str(tmp_path / name))
        assert (config.num_layers, config.token_dim, config.num_attention_heads) == (2, 64, 4)
    wider = tiny_config(hidden_size=128, pre_seq_len=5, prefix_projection=projection)
    with pytest.raises(CheckpointError, match="trained with head_dim=16 but the model has head_dim=32"):
        export_peft_checkpoint(checkpoint, tmp_path / "wider", wider)


# ---- peft as a client of our model ----


def peft_twin(model):
    """peft's prefix tuning on the backbone of ``model``, with the same prefix values."""
    peft_model = get_peft_model(
        backbone_copy(model),
        PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=model.config.pre_seq_len),
    )
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(model.transformer.prefix_encoder())
    return peft_model


def test_peft_prompt_layout_is_ours():
    model = prefixed_model()
    peft_model = peft_twin(model)
    cache = peft_model.get_prompt(batch_size=2)
    ours = model.transformer.prefix_key_values(2, torch.float32)
    assert len(cache.layers) == len(ours) == model.config.num_layers
    for layer, (key, value) in zip(cache.layers, ours, strict=True):
        assert torch.equal(layer.keys, key) and torch.equal(
            layer.values, value
        )  # [B, N, P, D], key 2l, value 2l+1


def test_peft_prefix_tuning_equals_our_prefix_in_logits_loss_and_gradient():
    model = prefixed_model()
    peft_model = peft_twin(model)
    ids, labels, mask = padded_batch(model.config)
    peft_model.eval()
    with torch.no_grad():
        assert torch.equal(peft_model(input_ids=ids, attention_mask=mask).logits, logits(model, ids, mask))
        assert torch.equal(peft_model(input_ids=ids).logits, logits(model, ids))

    for m in (model, peft_model):
        m.train()
    model.transformer.requires_grad_(False)
    model.lm_head.requires_grad_(False)
    model.transformer.prefix_encoder.requires_grad_(True)
    ours = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    theirs = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert torch.equal(ours, theirs)
    ours.backward()
    theirs.backward()
    assert [n for n, p in peft_model.named_parameters() if p.grad is not None] == [
        "prompt_encoder.default.embedding.weight"
    ]
    grad = peft_model.prompt_encoder["default"].embedding.weight.grad
    assert torch.allclose(grad, model.transformer.prefix_encoder.embedding.weight.grad, rtol=1e-5, atol=1e-7)


def test_peft_prefix_with_gradient_checkpointing_and_with_our_own_prefix():
    model = prefixed_model()
    peft_model = peft_twin(model)
    ids, labels, mask = padded_batch(model.config)
    peft_model.train()
    plain = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
    peft_model.base_model.gradient_checkpointing_enable()
    checkpointed = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert torch.equal(plain, checkpointed)  # the layers drop caches there; the prefix still counts
    checkpointed.backward()
    assert peft_model.prompt_encoder["default"].embedding.weight.grad.abs().sum() > 0
    # both prefixes at once: ours first, then peft's
    stacked = get_peft_model(
        backbone_copy(model, pre_seq_len=3),
        PrefixTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=2),
    ).eval()
    with torch.no_grad():
        out = stacked(input_ids=ids, attention_mask=mask).logits
    assert out.shape == (*ids.shape, model.config.vocab_size) and torch.isfinite(out).all()


def test_generate_through_peft_prefix_is_refused_with_a_way_out():
    peft_model = peft_twin(prefixed_model()).eval()
    ids, _, _ = padded_batch(peft_model.config)
    with pytest.raises(RuntimeError, match="load_peft_prefix"):
        peft_model.generate(input_ids=ids[:1], max_new_tokens=2)


def test_lora_through_peft_trains_only_lora_weights():
    """The documented alternative method: LoRA on query_key_value, through peft."""
    model = backbone_copy(prefixed_model())
    lora = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value"], task_type=TaskType.CAUSAL_LM)
    )
    ids, labels, mask = padded_batch(model.config)
    lora.train()
    loss = lora(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    with_grad = [n for n, p in lora.named_parameters() if p.grad is not None]
    assert with_grad and all("lora_" in n for n in with_grad)
    assert len(with_grad) == 2 * model.config.num_layers  # lora_A and lora_B of every query_key_value
    assert all(p.grad is None for n, p in lora.named_parameters() if "lora_" not in n)


# ---- full model in the original layout ----


@pytest.mark.parametrize("source", [BASE, PTUNING])
def test_full_export_round_trip_has_the_original_keys(tmp_path, source):
    model = ChatGLMForConditionalGeneration.from_pretrained(source)
    paths = export_full(model, tmp_path / "full", max_shard_bytes=120_000)
    assert len(paths) > 1 and [p.name for p in paths][0] == f"pytorch_model-00001-of-{len(paths):05d}.bin"
    index = json.loads((tmp_path / "full" / "pytorch_model.bin.index.json").read_text())
    with safe_open(str(source / "model.safetensors"), "pt") as f:
        original_keys = set(f.keys())
        inv_freq = f.get_tensor("transformer.layers.0.attention.rotary_emb.inv_freq")
    assert set(index["weight_map"]) == original_keys
    shard = torch.load(
        tmp_path / "full" / index["weight_map"]["transformer.layers.1.attention.rotary_emb.inv_freq"],
        weights_only=True,
    )
    assert torch.equal(shard["transformer.layers.1.attention.rotary_emb.inv_freq"], inv_freq)
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    original_config = json.loads((source / "config.json").read_text())
    assert set(original_config) <= set(config)
    assert {k: config[k] for k in original_config} == original_config
    assert config["auto_map"]["AutoModel"] == "modeling_chatglm.ChatGLMForConditionalGeneration"

    reloaded = ChatGLMForConditionalGeneration.from_pretrained(tmp_path / "full")
    ids, _ = batch(model.config)
    assert torch.equal(logits(reloaded, ids), logits(model, ids))


def test_full_export_in_float16_and_of_a_quantized_model(tmp_path):
    model = ChatGLMForConditionalGeneration.from_pretrained(PTUNING)
    export_full(model, tmp_path / "half", dtype=torch.float16)
    state = torch.load(tmp_path / "half" / "pytorch_model-00001-of-00001.bin", weights_only=True)
    assert state["transformer.word_embeddings.weight"].dtype == torch.float16
    assert state[KEY].dtype == torch.float32  # the prefix stays float32, as the original script saves it
    assert torch.equal(
        state["transformer.layers.0.attention.rotary_emb.inv_freq"], rotary_inv_freq(16).half()
    )
    assert json.loads((tmp_path / "half" / "config.json").read_text())["torch_dtype"] == "float16"
    from ptuning.quantization import quantize_backbone

    with pytest.raises(CheckpointError, match="quantized"):
        export_full(quantize_backbone(model, 8), tmp_path / "q")


# ---- the command line ----


def test_export_command_line(tmp_path, capsys):
    model = load_model(ModelConfig(pre_seq_len=4, prefix_dropout=0.0)).eval()
    with torch.no_grad():
        model.transformer.prefix_encoder.embedding.weight.normal_()
    ckpt = save_checkpoint(tmp_path / "run", 7, model, prefix_metadata(model.config, "builtin:tiny-chatglm"))
    ids, _ = batch(model.config)
    expected = logits(model, ids)

    assert export_cli.main(["peft", "--checkpoint", str(ckpt), "--out", str(tmp_path / "adapter")]) == 0
    assert (
        export_cli.main(
            [
                "from-peft",
                "--adapter",
                str(tmp_path / "adapter"),
                "--out",
                str(tmp_path / "back"),
                "--model",
                "data/tiny-chatglm",
            ]
        )
        == 0
    )
    again = load_model(ModelConfig(pre_seq_len=4)).eval()
    load_prefix(again, tmp_path / "back")
    assert torch.equal(logits(again, ids), expected)

    assert (
        export_cli.main(
            ["full", "--checkpoint", str(ckpt), "--out", str(tmp_path / "full"), "--max-shard-size", "300KB"]
        )
        == 0
    )
    full = tmp_path / "full"
    assert len(list(full.glob("pytorch_model-*-of-*.bin"))) > 1
    assert (full / "ice_text.model").is_file() and (full / "tokenizer_config.json").is_file()
    assert torch.equal(logits(ChatGLMForConditionalGeneration.from_pretrained(full), ids), expected)

    assert export_cli.main(["original", "--checkpoint", str(ckpt), "--out", str(tmp_path / "orig")]) == 0
    assert list(torch.load(tmp_path / "orig" / "pytorch_model.bin", weights_only=True)) == [KEY]
    # an original-format prefix records no sizes: the peft export then needs the base model
    (tmp_path / "orig" / "prefix_config.json").unlink()
    assert (
        export_cli.main(["peft", "--checkpoint", str(tmp_path / "orig"), "--out", str(tmp_path / "a2")]) == 2
    )
    assert "give the base model" in capsys.readouterr().err
    assert (
        export_cli.main(
            [
                "peft",
                "--checkpoint",
                str(tmp_path / "orig"),
                "--out",
                str(tmp_path / "a2"),
                "--model",
                "data/tiny-chatglm",
            ]
        )
        == 0
    )
    assert torch.equal(read_peft_adapter(tmp_path / "a2")[1], read_peft_adapter(tmp_path / "adapter")[1])


# ---- faults found by trying the toolkit as a user would (one test per kind, named by item) ----


def test_the_documented_peft_path_raises_no_warning_of_ours():
    # in a fresh interpreter: filters installed at import survive there (pytest restores its own after
    # collecting a module)
    import json
    import subprocess
    import sys

    from .common import ROOT

    script = """
import json, warnings, torch
from tests.test_interop import padded_batch, peft_twin, prefixed_model

model = prefixed_model()
ids, _, mask = padded_batch(model.config)

def documented_path_warnings():
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        peft_twin(model)(input_ids=ids, attention_mask=mask)
    return [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]

shown = documented_path_warnings()
warnings.resetwarnings()  # without the filters ptuning installs, the noise is there
warnings.simplefilter("always")
print(json.dumps([shown, documented_path_warnings()]))
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with_filters, without = json.loads(proc.stdout.strip().splitlines()[-1])
    assert with_filters == []
    assert any("`past_key_values` is deprecated" in text for text in without), without


# ---- the export command line writes only into a new folder, and refuses what it cannot carry ----


def _tree(folder):
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


def _one_error(capsys):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.fixture(scope="module")
def qa_checkpoints(tmp_path_factory):
    """A prefix checkpoint of the built-in ChatGLM-6B, ChatGLM2 and ChatGLM3 (random prefixes)."""
    root = tmp_path_factory.mktemp("export")
    found = {}
    for name in ("tiny-chatglm", "tiny-chatglm2", "tiny-chatglm3"):
        cfg = ModelConfig(path=f"builtin:{name}", pre_seq_len=4, prefix_dropout=0.0)
        model = load_model(cfg).eval()
        found[name] = save_checkpoint(root / f"run-{name}", 3, model, prefix_metadata(model, cfg.base_model_name))
        (root / f"run-{name}" / "run_config.json").write_text('{"run_id": null}\n')
    return found


def test_export_refuses_a_folder_that_holds_anything_and_writes_nothing(qa_checkpoints, tmp_path, capsys):
    from .common import ROOT

    ckpt = qa_checkpoints["tiny-chatglm"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    builtin = ROOT / "data" / "tiny-chatglm"
    before = {p: _tree(p) for p in (mine, builtin, ckpt.parent)}
    cases = [
        (["peft", "--checkpoint", str(ckpt), "--out", str(mine)], "the folder is not empty"),
        (["original", "--checkpoint", str(ckpt), "--out", str(ckpt)], "is a checkpoint folder"),
        (["peft", "--checkpoint", str(ckpt), "--out", str(builtin)], "is a model folder"),
        (["full", "--checkpoint", str(ckpt), "--out", str(builtin)], "is a model folder"),
        (["original", "--checkpoint", str(ckpt), "--out", str(ckpt / "x")], "a checkpoint folder; give a folder outside it"),
        (["peft", "--checkpoint", str(ckpt), "--out", str(ckpt.parent / "adapter")],
         "a training output folder; give a folder outside it"),
        (["full", "--checkpoint", str(ckpt), "--out", str(builtin / "full")], "a model folder; give a folder outside it"),
    ]
    for argv, expected in cases:
        assert export_cli.main(argv) == 2, argv
        err = _one_error(capsys)
        assert err.startswith(f"error: --out {argv[-1]}: ") and expected in err, err
    assert {p: _tree(p) for p in before} == before
    assert not (ckpt / "x").exists() and not (builtin / "full").exists()


def test_export_writes_a_new_or_empty_folder_and_leaves_nothing_when_it_fails(qa_checkpoints, tmp_path, capsys):
    ckpt = qa_checkpoints["tiny-chatglm"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export_cli.main(["original", "--checkpoint", str(ckpt), "--out", str(empty)]) == 0
    assert sorted(p.name for p in empty.iterdir()) == ["prefix_config.json", "pytorch_model.bin"]
    assert export_cli.main(["peft", "--checkpoint", str(ckpt), "--out", str(tmp_path / "a" / "b" / "adapter")]) == 0
    assert (tmp_path / "a" / "b" / "adapter" / "adapter_config.json").is_file()
    capsys.readouterr()
    # fails after the folder was begun (an original-format prefix records no sizes): no folder, no parents
    (empty / "prefix_config.json").unlink()
    assert export_cli.main(["peft", "--checkpoint", str(empty), "--out", str(tmp_path / "new" / "deeper" / "x")]) == 2
    assert "give the base model" in _one_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "empty"]
    assert not [p for p in (tmp_path / "a" / "b").iterdir() if p.name != "adapter"]  # no temporary folder left


def test_an_export_that_fills_the_disk_is_one_line_and_leaves_nothing(qa_checkpoints, tmp_path, capsys, monkeypatch):
    import errno
    import os

    from ptuning import checkpoint as checkpoint_module

    from .common import small_disk

    ckpt = qa_checkpoints["tiny-chatglm"]

    def no_space(obj, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(checkpoint_module, "save_torch", no_space)
    out = tmp_path / "exports" / "original"
    assert export_cli.main(["original", "--checkpoint", str(ckpt), "--out", str(out)]) == 2
    assert _one_error(capsys) == (f"error: no space left on device writing {out / 'pytorch_model.bin'}; the partial "
                                  f"export was removed ({out} is not written); free space and run the export again")
    assert not (tmp_path / "exports").exists()
    monkeypatch.undo()
    # a real full disk: the whole model does not fit in 300 KB
    with small_disk(tmp_path / "disk", "300k") as disk:
        out = disk / "full"
        assert export_cli.main(["full", "--checkpoint", str(ckpt), "--out", str(out)]) == 2
        err = _one_error(capsys)
        assert re.fullmatch(rf"error: no space left on device writing {re.escape(str(out))}/pytorch_model-\d+-of-\d+"
                            rf"\.bin; the partial export was removed \({re.escape(str(out))} is not written\); free "
                            r"space and run the export again", err), err
        assert list(disk.iterdir()) == []


@pytest.mark.parametrize("name", ["tiny-chatglm2", "tiny-chatglm3"])
def test_peft_export_of_a_chatglm2_or_3_prefix_is_refused_in_one_line(qa_checkpoints, tmp_path, capsys, name):
    ckpt = qa_checkpoints[name]
    for argv in (["peft", "--checkpoint", str(ckpt), "--out", str(tmp_path / "adapter")],
                 ["peft", "--checkpoint", str(ckpt), "--out", str(tmp_path / "adapter"), "--model", f"builtin:{name}"]):
        assert export_cli.main(argv) == 2
        err = _one_error(capsys)
        assert err.startswith("error: peft export of a ChatGLM2-6B / ChatGLM3-6B prefix: ") and "'original'" in err
        assert not (tmp_path / "adapter").exists()
    # the prefix's keys (prefix_encoder.*, not transformer.prefix_encoder.*) are read whole
    from ptuning.checkpoint import read_prefix
    from ptuning.interop.peft import prefix_output

    prefix, meta = read_prefix(ckpt)
    assert list(prefix) == ["prefix_encoder.embedding.weight"]
    width = prefix["prefix_encoder.embedding.weight"].shape[1]  # 2·L·G·D
    config = tiny_config(pre_seq_len=4)
    config.num_layers, config.hidden_size, config.num_attention_heads = meta["num_layers"], width // (2 * meta["num_layers"]), 2
    assert torch.equal(prefix_output(config, prefix), prefix["prefix_encoder.embedding.weight"].float())


def test_from_peft_takes_a_builtin_model_and_refuses_an_adapter_of_another_family(qa_checkpoints, tmp_path, capsys):
    from .common import ROOT

    ckpt = qa_checkpoints["tiny-chatglm"]
    adapter = tmp_path / "adapter"
    assert export_cli.main(["peft", "--checkpoint", str(ckpt), "--out", str(adapter)]) == 0
    assert export_cli.main(["from-peft", "--adapter", str(adapter), "--out", str(tmp_path / "back"),
                            "--model", "builtin:tiny-chatglm"]) == 0
    meta = json.loads((tmp_path / "back" / "prefix_config.json").read_text())
    assert (meta["family"], meta["base_model"]) == ("chatglm", "builtin:tiny-chatglm")
    capsys.readouterr()
    # a ChatGLM-6B adapter onto ChatGLM3: refused, nothing written
    for model in ("builtin:tiny-chatglm3", str(ROOT / "data" / "tiny-chatglm3")):
        assert export_cli.main(["from-peft", "--adapter", str(adapter), "--out", str(tmp_path / "wrong"),
                                "--model", model]) == 2
        assert _one_error(capsys).startswith("error: from-peft onto a ChatGLM2-6B / ChatGLM3-6B model (")
    # an adapter that names a ChatGLM3 base model, onto ChatGLM-6B (the sizes alone would fit)
    raw = json.loads((adapter / "adapter_config.json").read_text())
    raw["base_model_name_or_path"] = "builtin:tiny-chatglm3"
    (adapter / "adapter_config.json").write_text(json.dumps(raw))
    assert export_cli.main(["from-peft", "--adapter", str(adapter), "--out", str(tmp_path / "wrong"),
                            "--model", "builtin:tiny-chatglm"]) == 2
    err = _one_error(capsys)
    assert "a ChatGLM2-6B / ChatGLM3-6B model, but --model" in err and "is a ChatGLM-6B model" in err
    assert export_cli.main(["from-peft", "--adapter", str(adapter), "--out", str(tmp_path / "wrong"),
                            "--model", "builtin:nope"]) == 2
    assert _one_error(capsys).startswith("error: --model builtin:nope: no such built-in model (expected one of builtin:")
    assert not (tmp_path / "wrong").exists()


def test_a_damaged_adapter_or_a_bad_shard_size_is_one_line(qa_checkpoints, tmp_path, capsys):
    import shutil

    ckpt = qa_checkpoints["tiny-chatglm"]
    adapter = tmp_path / "adapter"
    assert export_cli.main(["peft", "--checkpoint", str(ckpt), "--out", str(adapter)]) == 0
    capsys.readouterr()
    broken_config, broken_weights = tmp_path / "cfg", tmp_path / "weights"
    shutil.copytree(adapter, broken_config)
    (broken_config / "adapter_config.json").write_text("{")
    shutil.copytree(adapter, broken_weights)
    (broken_weights / "adapter_model.safetensors").write_text("garbage\n")
    for folder, message in ((broken_config, "adapter_config.json: not a readable JSON file"),
                            (broken_weights, "cannot read the adapter's weights")):
        for model in ([], ["--model", "builtin:tiny-chatglm"]):
            out = tmp_path / "imported"
            assert export_cli.main(["from-peft", "--adapter", str(folder), "--out", str(out), *model]) == 2
            assert message in _one_error(capsys)
            assert not out.exists()
    for size in ("abc", "0", "-5MB"):
        with pytest.raises(SystemExit) as exit_:
            export_cli.main(["full", "--checkpoint", str(ckpt), "--out", str(tmp_path / "full"),
                             "--max-shard-size", size])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "--max-shard-size" in err, err
        assert not (tmp_path / "full").exists()


def test_export_takes_a_run_folders_latest_checkpoint_and_names_a_missing_folder(qa_checkpoints, tmp_path, capsys):
    ckpt = qa_checkpoints["tiny-chatglm"]
    assert export_cli.main(["original", "--checkpoint", str(ckpt.parent), "--out", str(tmp_path / "from-run")]) == 0
    assert export_cli.main(["original", "--checkpoint", str(ckpt), "--out", str(tmp_path / "from-checkpoint")]) == 0
    assert _tree(tmp_path / "from-run") == _tree(tmp_path / "from-checkpoint")
    capsys.readouterr()
    missing = tmp_path / "no-such-run"
    for kind in ("original", "peft", "full"):
        assert export_cli.main([kind, "--checkpoint", str(missing), "--out", str(tmp_path / kind)]) == 2
        assert _one_error(capsys) == f"error: --checkpoint={missing}: no such folder"
        assert not (tmp_path / kind).exists()


def test_a_peft_adapter_given_as_a_prefix_checkpoint_says_it_is_one_and_how_to_import_it(qa_checkpoints, tmp_path,
                                                                                         capsys):
    from ptuning.chat import main as chat_main
    from ptuning.config import BUILTIN_MODEL

    adapter = tmp_path / "adapter"
    assert export_cli.main(["peft", "--checkpoint", str(qa_checkpoints["tiny-chatglm"]), "--out", str(adapter)]) == 0
    capsys.readouterr()
    how = (f"{adapter}: a peft adapter (adapter_config.json), not a prefix checkpoint; import it first: python -m "
           f"ptuning.export from-peft --adapter {adapter} --out <new folder> --model {BUILTIN_MODEL}, then use the new "
           "folder")
    assert chat_main(["--prefix-checkpoint", str(adapter)]) == 2
    assert _one_error(capsys) == f"error: {how}"
    assert export_cli.main(["original", "--checkpoint", str(adapter), "--out", str(tmp_path / "x")]) == 2
    assert _one_error(capsys) == f"error: {how}"
    # the command it gives works, and its result is a prefix checkpoint
    command = how.split("import it first: python -m ptuning.export ")[1].split(", then")[0]
    imported = tmp_path / "imported"
    assert export_cli.main(command.replace("<new folder>", str(imported)).split()) == 0
    assert export_cli.main(["original", "--checkpoint", str(imported), "--out", str(tmp_path / "x")]) == 0


def test_a_whole_model_checkpoint_of_another_backbone_warns_in_one_line_as_ours_do(qa_checkpoints, tmp_path, capsys):
    from ptuning.chat import load as chat_load
    from ptuning.chat import parse_args as chat_args
    from ptuning.serve.cli import load as serve_load
    from ptuning.serve.cli import parse_args as serve_args

    full = {}
    for name in ("tiny-chatglm2", "tiny-chatglm3"):  # the same sizes; another chatglm_version and other weights
        full[name] = tmp_path / name
        assert export_cli.main(["full", "--checkpoint", str(qa_checkpoints[name]), "--out", str(full[name]),
                                "--dtype", "float16"]) == 0
    capsys.readouterr()
    chat_load(chat_args(["--model-path", "builtin:tiny-chatglm2", "--prefix-checkpoint", str(full["tiny-chatglm3"])]))
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"warning: {full['tiny-chatglm3']} was trained on the model stored with it (config.json chatglm_version 3 "
        "(the model's 2); weights differ at transformer.encoder."), err
    assert err[0].endswith("but the model is builtin:tiny-chatglm2")
    serve_load(serve_args(["--model-path", "builtin:tiny-chatglm2", "--prefix", f"p={full['tiny-chatglm3']}"]),
               [("p", str(full["tiny-chatglm3"]))])
    assert capsys.readouterr().err.splitlines() == [err[0].replace("warning: ", "warning: --prefix p: ")]
    # its own backbone (saved in float16, the base model's float32 rounded): no warning
    chat_load(chat_args(["--model-path", "builtin:tiny-chatglm2", "--prefix-checkpoint", str(full["tiny-chatglm2"])]))
    assert capsys.readouterr().err == ""


def test_the_documented_exports_write_into_outputs_and_take_a_run_folder():
    from .common import ROOT

    shown = [(ROOT / page).read_text(encoding="utf-8") for page in ("README.md", "docs/checkpoints.md",
                                                                     "docs/families.md")]
    commands = [c for text in shown for c in re.findall(r"python -m ptuning\.export (?:peft|original|full|from-peft) [^\n`#]+", text)]
    assert len(commands) >= 5, commands
    for command in commands:
        out = re.search(r"--out (\S+)", command)
        assert out and out.group(1).startswith("outputs/"), command  # never into the project folder itself
    assert any(re.search(r"--checkpoint outputs/default(\s|$)", c) for c in commands)  # a run folder: its latest
