"""ChatGLM2/3 through the whole toolkit on the built-in tiny models (data/tiny-chatglm{2,3}): the recipes, train ->
checkpoint -> evaluate, the default run's gain, ChatGLM2's original P-Tuning checkpoints and a ChatGLM3
finetune_demo whole-model checkpoint (built here) for evaluation, chat and train.init_prefix_from, and the
exports in the original formats."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import ptuning.weights as weights_module
from hydra_entry import to_object
from ptuning.build import load
from ptuning.chat import load as chat_load
from ptuning.chat import parse_args
from ptuning.checkpoint import load_prefix, read_prefix
from ptuning.config import ModelConfig
from ptuning.export import main as export_main
from ptuning.models import family_for
from ptuning.models.chatglm2.family import ChatGLM2Family
from ptuning.models.chatglm2.weights import save_original
from ptuning.training import run as train_run

from .common import ROOT
from .test_configs import compose_train
from .test_evaluate import evaluate_py, reset_accelerate

TINY = {2: "builtin:tiny-chatglm2", 3: "builtin:tiny-chatglm3"}
QUICK = ["data.max_train_samples=64", "data.max_eval_samples=8", "train.per_device_batch_size=4",
         "train.save_total_limit=null", "train.eval_generation=false", "train.eval_before_training=false",
         "train.eval_steps=null", "train.plot=false"]
SMALL_EVAL = ["data.max_eval_samples=8", "generation.max_new_tokens=16", "batch_size=4"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_module):
    """In-process model runs of this module use one intra-op thread (see ``one_thread_module``)."""


def train(version: int, out, *overrides):
    reset_accelerate()
    cfg = to_object(compose_train([f"model=tiny_chatglm{version}", f"train.output_dir={out}",
                                   f"data.cache_dir={out.parent / 'cache'}", *QUICK, *overrides]))
    return train_run(cfg)


def test_presets_are_the_original_recipes():
    glm2 = to_object(compose_train(["conf=ptuning_adgen_chatglm2", "model.path=/m", "train.output_dir=/tmp/x"]))
    assert (glm2.model.name, glm2.model.pre_seq_len, glm2.train.learning_rate) == ("chatglm2-6b", 128, 2e-2)
    assert (glm2.data.max_source_length, glm2.data.max_target_length) == (64, 128)
    assert (glm2.train.per_device_batch_size, glm2.train.gradient_accumulation_steps) == (1, 16)
    assert (glm2.train.max_steps, glm2.train.logging_steps, glm2.train.save_steps) == (3000, 10, 1000)
    assert glm2.data.train_file == "data/AdvertiseGen/train.json" and glm2.model.dtype == "bfloat16"
    glm3 = to_object(compose_train(["conf=ptuning_chatglm3", "model.path=/m", "train.output_dir=/tmp/x"]))
    assert (glm3.model.name, glm3.model.pre_seq_len, glm3.train.learning_rate) == ("chatglm3-6b", 128, 5e-5)
    assert (glm3.data.max_source_length, glm3.data.max_target_length) == (256, 512)
    assert (glm3.train.per_device_batch_size, glm3.train.gradient_accumulation_steps, glm3.train.max_steps) == (4, 1, 3000)
    assert (glm3.train.save_steps, glm3.train.eval_steps, glm3.train.eval_batch_size) == (500, 500, 16)
    assert glm3.train.max_new_tokens == 512
    for version in (2, 3):
        tiny = to_object(compose_train([f"model=tiny_chatglm{version}", "train.output_dir=/tmp/x"]))
        assert tiny.model.resolved_path == ROOT / "data" / f"tiny-chatglm{version}"
        tiny.validate()


@pytest.mark.parametrize("version", [2, 3])
def test_prefix_is_sized_by_key_value_groups(version):
    loaded = load(ModelConfig(path=TINY[version], pre_seq_len=16))
    assert isinstance(loaded.family, ChatGLM2Family)
    config = loaded.model.config
    assert config.chatglm_version == version and config.num_key_value_heads == 2
    # 2 groups x 32 per layer and position for keys and values: 4 x 2 x 2 x 32 = 512, not 2 x 4 x 128 = 1024
    assert loaded.model.prefix_encoder.embedding.weight.shape == (16, 2 * 4 * 2 * 32)
    assert type(loaded.template).__name__ == f"ChatGLM{version}Template"


@pytest.mark.parametrize("version", [2, 3])
def test_train_checkpoint_evaluate(tmp_path, version):
    result = train(version, tmp_path / "run", "train.max_steps=4", "train.save_steps=2")
    checkpoint = result.checkpoint
    meta = json.loads((checkpoint / "prefix_config.json").read_text())
    assert meta["family"] == "chatglm2" and meta["base_model"] == TINY[version]
    assert (meta["num_key_value_heads"], meta["head_dim"], meta["num_layers"]) == (2, 32, 4)
    assert set(load_file(str(checkpoint / "prefix.safetensors"))) == {"prefix_encoder.embedding.weight"}
    proc = evaluate_py(f"model=tiny_chatglm{version}", f"prefix_checkpoint={checkpoint}",
                       f"output_dir={tmp_path / 'eval'}", f"data.cache_dir={tmp_path / 'cache'}", *SMALL_EVAL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["num_samples"] == 8 and metrics["new_tokens"] > 0
    rows = [json.loads(line) for line in (tmp_path / "eval" / "generated_predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(r["predict"] for r in rows)
    marker = "[Round 1]\n\n问：" if version == 2 else "<|user|>"
    assert marker in rows[0]["prompt"]


@pytest.mark.slow
@pytest.mark.parametrize("version", [2, 3])
def test_default_run_shows_the_gain(tmp_path, version):
    """The default run (800 steps, P 16) on the tiny model: the prefix teaches the frozen chat model the
    task's format (its answers without a prefix wrap the ad in chatty openings and closings)."""
    reset_accelerate()
    cfg = to_object(compose_train([f"model=tiny_chatglm{version}", f"train.output_dir={tmp_path / 'run'}",
                                   f"data.cache_dir={tmp_path / 'cache'}", "train.plot=false"]))
    train_run(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    base = next(r for r in records if r["step"] == 0 and "eval_rouge-l" in r)
    tuned = [r for r in records if r["step"] == 800 and "eval_rouge-l" in r][-1]
    assert tuned["eval_bleu-4"] >= base["eval_bleu-4"] + 25, (base, tuned)
    assert tuned["eval_rouge-l"] >= base["eval_rouge-l"] + 20, (base, tuned)


def original_checkpoint(folder, embedding: torch.Tensor):
    """What ChatGLM2's ptuning/main.py leaves in checkpoint-N: pytorch_model.bin with the prefix keys only."""
    folder.mkdir(parents=True)
    torch.save({"transformer.prefix_encoder.embedding.weight": embedding}, folder / "pytorch_model.bin")
    (folder / "trainer_state.json").write_text("{}")
    return folder


def test_chatglm2_original_checkpoint_for_evaluation_chat_and_init(tmp_path):
    embedding = torch.randn(8, 2 * 4 * 2 * 32, generator=torch.Generator().manual_seed(3))
    # in the original script's output folder (evaluation never writes inside one: its results go elsewhere)
    orig = original_checkpoint(tmp_path / "output" / "checkpoint-3000", embedding)
    prefix, meta = read_prefix(orig)
    assert meta is None and list(prefix) == ["transformer.prefix_encoder.embedding.weight"]
    # evaluation
    proc = evaluate_py("model=tiny_chatglm2", f"prefix_checkpoint={orig}", f"output_dir={tmp_path / 'eval'}",
                       f"data.cache_dir={tmp_path / 'cache'}", *SMALL_EVAL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["num_samples"] == 8
    # chat
    loaded, what = chat_load(parse_args(["--model-path", TINY[2], "--prefix-checkpoint", str(orig), "--device", "cpu"]))
    assert torch.equal(loaded.model.prefix_encoder.embedding.weight, embedding) and str(orig) in what
    # train.init_prefix_from: one step at a learning rate of 1e-12 moves it by about 1e-12
    result = train(2, tmp_path / "run", f"train.init_prefix_from={orig}", "model.pre_seq_len=8", "train.max_steps=1",
                   "train.save_steps=1", "train.learning_rate=1e-12")
    saved = load_file(str(result.checkpoint / "prefix.safetensors"))["prefix_encoder.embedding.weight"]
    assert (saved - embedding).abs().max().item() < 1e-9


@pytest.fixture(scope="module")
def finetune_demo_checkpoint(tmp_path_factory):
    """A ChatGLM3 finetune_demo checkpoint: the whole model with its prefix inside, sharded safetensors."""
    folder = tmp_path_factory.mktemp("output") / "checkpoint-500"
    loaded = load(ModelConfig(path=TINY[3], pre_seq_len=8))
    with torch.no_grad():
        loaded.model.prefix_encoder.embedding.weight.normal_(generator=torch.Generator().manual_seed(5))
    save_original(loaded.model, folder, safe=True, max_shard_bytes=1_500_000)
    config = json.loads((folder / "config.json").read_text())
    config.pop("chatglm_version")
    config["_name_or_path"] = "THUDM/chatglm3-6b"  # as HF's save_pretrained writes it from the published folder
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.model").write_bytes((ROOT / "data" / "tiny-chatglm3" / "tokenizer.model").read_bytes())
    for name in ("trainer_state.json", "training_args.bin", "optimizer.pt"):
        (folder / name).write_bytes(b"{}")
    return folder, loaded.model.prefix_encoder.embedding.weight.detach().clone()


def test_chatglm3_finetune_demo_checkpoint_gives_up_its_prefix(finetune_demo_checkpoint, monkeypatch, tmp_path):
    folder, embedding = finetune_demo_checkpoint
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    read = []
    real_open = weights_module.safe_open

    class Spy:
        def __init__(self, path, framework):
            self.inner = real_open(path, framework=framework)

        def __enter__(self):
            self.handle = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.handle.keys()

        def get_tensor(self, key):
            read.append(key)
            return self.handle.get_tensor(key)

    monkeypatch.setattr(weights_module, "safe_open", Spy)
    prefix, meta = read_prefix(folder)
    assert read == ["transformer.prefix_encoder.embedding.weight"]  # no backbone tensor is read
    assert meta is None and torch.equal(prefix["transformer.prefix_encoder.embedding.weight"], embedding)
    monkeypatch.undo()
    model = load(ModelConfig(path=TINY[3], pre_seq_len=8), init=False).model
    load_prefix(model, folder)
    assert torch.equal(model.prefix_encoder.embedding.weight, embedding)
    # the checkpoint is also a model folder: loaded whole, its prefix comes with it
    whole = family_for(folder).load_model(folder, dtype=torch.float32, pre_seq_len=8, prefix_projection=False,
                                          prefix_dropout=0.0)
    assert whole.config.chatglm_version == 3  # from _name_or_path
    assert torch.equal(whole.prefix_encoder.embedding.weight, embedding)


def test_chatglm3_finetune_demo_checkpoint_for_evaluation(finetune_demo_checkpoint, tmp_path):
    folder, _ = finetune_demo_checkpoint
    proc = evaluate_py("model=tiny_chatglm3", f"prefix_checkpoint={folder}", f"output_dir={tmp_path / 'eval'}",
                       f"data.cache_dir={tmp_path / 'cache'}", *SMALL_EVAL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["num_samples"] == 8


def test_exports_in_the_original_formats(tmp_path, capsys):
    result = train(2, tmp_path / "run", "train.max_steps=2", "train.save_steps=2", "model.pre_seq_len=8")
    checkpoint = result.checkpoint
    ours = load_file(str(checkpoint / "prefix.safetensors"))["prefix_encoder.embedding.weight"]
    # the prefix as ChatGLM2's ptuning/main.py saves and loads it
    assert export_main(["original", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "orig")]) == 0
    state = torch.load(tmp_path / "orig" / "pytorch_model.bin", weights_only=True)
    assert list(state) == ["transformer.prefix_encoder.embedding.weight"]
    assert torch.equal(state["transformer.prefix_encoder.embedding.weight"], ours)
    model = load(ModelConfig(path=TINY[2], pre_seq_len=8), init=False).model
    load_prefix(model, tmp_path / "orig")
    assert torch.equal(model.prefix_encoder.embedding.weight, ours)
    # the whole model with its prefix, as the published folders (pytorch_model-*.bin + index)
    assert export_main(["full", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "full"),
                        "--max-shard-size", "1MB"]) == 0
    written = sorted(p.name for p in (tmp_path / "full").iterdir())
    assert "pytorch_model.bin.index.json" in written and "tokenizer.model" in written
    config = json.loads((tmp_path / "full" / "config.json").read_text())
    assert (config["pre_seq_len"], config["padded_vocab_size"], config["chatglm_version"]) == (8, 1024, 2)
    again = family_for(tmp_path / "full").load_model(tmp_path / "full", dtype=torch.float32, pre_seq_len=8,
                                                      prefix_projection=False, prefix_dropout=0.0)
    ids = torch.tensor([[1001, 1003, 5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    capsys.readouterr()


@pytest.mark.parametrize("version", [2, 3])
def test_chat_turns_use_the_family_template(version):
    from ptuning.chat import ChatSession
    from ptuning.evaluation.generate import GenerationSettings
    from ptuning.models.base import Conversation

    loaded = load(ModelConfig(path=TINY[version]), pre_seq_len=None)
    session = ChatSession(loaded.model, loaded.template, GenerationSettings(max_new_tokens=24), 512)
    q1, q2 = "上衣，棉", "裤，牛仔"
    _, ids, _, _ = session.prepare(q1)
    first = "".join(session.reply(q1, ids))
    assert first.strip() and session.history == [(q1, first.strip())]
    assert "<|" not in first and "[gMASK]" not in first
    prompt, ids, dropped, _ = session.prepare(q2)
    assert dropped == 0
    assert ids == loaded.template.prompt(Conversation(q2, history=[(q1, first.strip())]), 10_000).ids
    if version == 2:
        assert prompt.startswith(f"[Round 1]\n\n问：{q1}\n\n答：{first.strip()}\n\n[Round 2]\n\n问：{q2}")
    else:
        tok = loaded.tokenizer
        assert ids[2] == tok.glm_tokens["<|user|>"] and ids[-1] == tok.glm_tokens["<|assistant|>"]
        assert ids.count(tok.glm_tokens["<|assistant|>"]) == 2  # the earlier answer and the new one


def test_missing_model_path_names_the_recipes_model():
    from ptuning.config import ConfigError

    for preset, name in (("ptuning_adgen_chatglm2", "chatglm2-6b"), ("ptuning_chatglm3", "chatglm3-6b")):
        with pytest.raises(ConfigError, match=rf"^model.path is required: set model.path=/path/to/{name} "):
            to_object(compose_train([f"conf={preset}", "train.output_dir=/tmp/x"]))
