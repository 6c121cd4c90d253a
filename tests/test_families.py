"""The family seam: which family takes a folder, one-line errors for folders none takes, and the one
truncation rule of every template (oldest turns first, the current query's turn always kept)."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import pytest

from ptuning.config import BUILTIN_MODEL, ConfigError, ModelConfig
from ptuning.models import Conversation, UnsupportedModelError, family_for, supported
from ptuning.models.chatglm.family import ChatGLMFamily
from ptuning.models.chatglm.template import ChatGLMTemplate, build_prompt
from ptuning.models.chatglm.tokenizer import ChatGLMTokenizer

from .common import ROOT


@pytest.fixture(scope="module")
def template() -> ChatGLMTemplate:
    return ChatGLMTemplate(ChatGLMTokenizer.from_pretrained(BUILTIN_MODEL))


def write_config(folder, config: dict):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_the_built_in_model_is_chatglm():
    assert isinstance(family_for(BUILTIN_MODEL), ChatGLMFamily)


def test_an_unknown_architecture_is_one_line_naming_it_and_the_supported(tmp_path):
    folder = write_config(tmp_path / "m", {"architectures": ["MambaForCausalLM"], "model_type": "mamba"})
    with pytest.raises(UnsupportedModelError) as err:
        family_for(folder)
    message = str(err.value)
    assert "\n" not in message
    assert "architectures=['MambaForCausalLM']" in message and str(folder / "config.json") in message
    assert all(name in message for name in supported())


def test_a_remote_code_only_config_says_what_to_convert_to(tmp_path):
    folder = write_config(
        tmp_path / "m",
        {"architectures": ["MyModel"], "model_type": "mine", "auto_map": {"AutoModel": "modeling_mine.MyModel"}},
    )
    (folder / "modeling_mine.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(UnsupportedModelError, match=r"only by remote code \(auto_map\), which is never run; convert"):
        family_for(folder)


def test_missing_or_broken_config_names_the_file(tmp_path):
    with pytest.raises(UnsupportedModelError, match="no config.json"):
        family_for(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UnsupportedModelError, match=r"config.json: not valid JSON"):
        family_for(tmp_path)


def test_train_py_on_an_unsupported_folder_is_one_line(tmp_path):
    folder = write_config(tmp_path / "m", {"architectures": ["MambaForCausalLM"], "model_type": "mamba"})
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"model.path={folder}", f"train.output_dir={tmp_path / 'out'}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "MambaForCausalLM" in lines[0] and f"model.path={folder}:" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_builtin_names_resolve_from_the_project_and_unknown_ones_list_what_exists(tmp_path):
    assert ModelConfig(path="builtin:tiny-chatglm").resolved_path == BUILTIN_MODEL
    assert ModelConfig(path="builtin:tiny-chatglm").base_model_name == "builtin:tiny-chatglm"
    assert ModelConfig().base_model_name == "builtin:tiny-chatglm"
    with pytest.raises(ConfigError, match=r"model.path='builtin:nope': expected a built-in model \(builtin:tiny-chatglm"):
        ModelConfig(path="builtin:nope").validate()


# ---- the one truncation rule (ChatGLM-6B's template) ----

HISTORY = [(f"问题{i}：类型#裙*颜色#黑色*风格#简约", f"回答{i}：这条黑色裙子简约大方，值得入手。") for i in range(5)]


def test_long_history_drops_whole_oldest_turns_and_keeps_the_question(template):
    conversation = Conversation(query="再写一段关于白色上衣的文案", history=HISTORY)
    row = template.train_row(conversation, "白色上衣", max_source_length=200, max_target_length=16)
    gmask = row.input_ids.index(template.gmask_id)
    prompt = template.tokenizer.decode(row.input_ids[:gmask])
    assert 0 < row.dropped_turns < len(HISTORY) and row.truncated_tokens == 0
    kept = HISTORY[row.dropped_turns:]
    assert prompt == build_prompt("再写一段关于白色上衣的文案", kept)
    assert prompt.endswith(f"[Round {len(kept)}]\n问：再写一段关于白色上衣的文案\n答：")
    assert gmask <= 199
    # one more turn would not have fitted
    longer = template.encode(build_prompt("再写一段关于白色上衣的文案", HISTORY[row.dropped_turns - 1:]))
    assert len(longer) > 199
    # evaluation and chat cut the same conversation by the same rule (two fewer tokens for evaluation)
    prompt_ids = template.prompt(conversation, template.generation_budget(200))
    assert prompt_ids.ids[-2:] == [template.gmask_id, template.bos_id]
    assert template.tokenizer.decode(prompt_ids.ids[:-2]).endswith("问：再写一段关于白色上衣的文案\n答：")


def test_a_question_that_alone_does_not_fit_keeps_its_start_and_the_frame(template):
    query = "开头" + "很长的问题" * 40 + "结尾的问题"
    row = template.train_row(Conversation(query=query, history=HISTORY[:2]), "好", 48, 8)
    gmask = row.input_ids.index(template.gmask_id)
    prompt = template.tokenizer.decode(row.input_ids[:gmask])
    assert row.dropped_turns == 2 and row.truncated_tokens > 0 and gmask <= 47
    assert prompt.startswith("[Round 0]\n问：开头很长的问题") and prompt.endswith("\n答：")
    assert "结尾" not in prompt


def test_a_row_without_history_keeps_the_original_truncation(template):
    query = "类型#裙*颜色#黑色*风格#简约*图案#线条*裙型#百褶裙" * 3
    row = template.train_row(Conversation(query=query), "好", 16, 8)
    ids = template.encode(query)
    assert row.input_ids[:15] == ids[:15] and row.truncated_tokens == len(ids) - 15 and row.dropped_turns == 0


# ---- prefix initialisation (every family: model.prefix_init) ----


def test_prefix_init_zeros_and_text():
    import torch

    from ptuning.build import load
    from ptuning.prefix import PrefixKV, split_key_values

    zeros = load(ModelConfig(pre_seq_len=6, prefix_init="zeros"))
    assert torch.count_nonzero(zeros.model.transformer.prefix_encoder()) == 0
    projected = load(ModelConfig(pre_seq_len=6, prefix_projection=True, prefix_init="zeros"))
    encoder = projected.model.transformer.prefix_encoder
    assert torch.count_nonzero(encoder()) == 0 and torch.count_nonzero(encoder.trans[0].weight) > 0

    text = "类型#裙*颜色#黑色"
    loaded = load(ModelConfig(pre_seq_len=6, prefix_init="text", prefix_init_text=text))
    model, tokenizer = loaded.model, loaded.tokenizer
    ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text))
    assert len(ids) >= 6
    # the frozen model's own keys and values of the text's first 6 tokens, computed independently
    shape = model.transformer.prefix_encoder.shape
    empty = torch.zeros(1, shape.num_key_value_heads, 0, shape.head_dim)
    with torch.no_grad():
        cache = model(input_ids=torch.tensor([ids[:6] + [tokenizer.gmask_token_id, tokenizer.bos_token_id]]), use_cache=True,
                      prefix=PrefixKV([empty] * shape.num_layers, [empty] * shape.num_layers)).cache
    keys, values = split_key_values(model.transformer.prefix_encoder()[None].detach(), shape)
    for layer, k, v in zip(cache.layers, keys, values, strict=True):
        assert torch.allclose(k[0], layer.keys[0, :, :6], atol=1e-6)
        assert torch.allclose(v[0], layer.values[0, :, :6], atol=1e-6)
    # a short text is repeated to fill the prefix
    short = load(ModelConfig(pre_seq_len=6, prefix_init="text", prefix_init_text="裙"))
    assert torch.count_nonzero(short.model.transformer.prefix_encoder()) > 0


def test_prefix_init_checks_are_one_line():
    with pytest.raises(ConfigError, match=r"model.prefix_init='ones': expected random / zeros / text"):
        ModelConfig(prefix_init="ones").validate()
    with pytest.raises(ConfigError, match=r"model.prefix_init_text=None: expected a non-empty text"):
        ModelConfig(prefix_init="text").validate()
    with pytest.raises(ConfigError, match=r"model.prefix_init='text': expected random or zeros with model.prefix_projection=true"):
        ModelConfig(prefix_init="text", prefix_init_text="x", prefix_projection=True).validate()


# ---- corrupt SentencePiece files, GLM-4's original remote-code folder ----

@pytest.mark.parametrize(("builtin", "vocab"), [("tiny-chatglm", "ice_text.model"), ("tiny-chatglm2", "tokenizer.model"),
                                                ("tiny-chatglm3", "tokenizer.model")])
def test_a_corrupt_sentencepiece_file_is_one_line_naming_it(tmp_path, builtin, vocab):
    import shutil

    folder = tmp_path / builtin
    shutil.copytree(ROOT / "data" / builtin, folder)
    (folder / vocab).write_bytes(b"\x00not a sentencepiece model\xff" * 7)
    with pytest.raises(ConfigError) as err:
        family_for(folder).load_tokenizer(folder)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{folder / vocab}: not a readable SentencePiece model")
    if builtin != "tiny-chatglm2":
        return
    # and the command line: one line, exit 2, no folder made
    proc = subprocess.run([sys.executable, "train.py", f"model.path={folder}", f"train.output_dir={tmp_path / 'out'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {folder / vocab}: not a readable SentencePiece")
    assert not (tmp_path / "out").exists()


def glm4_original_folder(folder, *, tokenizer_class=True, eos=True, vocab=151552):
    """A tiny folder in the layout of the original THUDM/glm-4-9b-chat (remote code, tiktoken tokenizer.model)."""
    config = {
        "_name_or_path": "THUDM/glm-4-9b-chat", "model_type": "chatglm", "architectures": ["ChatGLMModel"],
        "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                     "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
        "add_bias_linear": False, "add_qkv_bias": True, "ffn_hidden_size": 64, "hidden_size": 32, "kv_channels": 8,
        "layernorm_epsilon": 1.5625e-07, "multi_query_attention": True, "multi_query_group_num": 2,
        "num_attention_heads": 4, "num_layers": 2, "rope_ratio": 500, "original_rope": True, "padded_vocab_size": vocab,
        "post_layer_norm": True, "rmsnorm": True, "seq_length": 131072, "torch_dtype": "bfloat16",
        "tie_word_embeddings": False, "eos_token_id": [151329, 151336, 151338] if eos else 2, "pad_token_id": 151329,
    }
    write_config(folder, config)
    tokenizer_config = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    if tokenizer_class:
        tokenizer_config.update(tokenizer_class="ChatGLM4Tokenizer",
                                auto_map={"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]})
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (folder / "tokenizer.model").write_text("IQ== 0\nIg== 1\nIw== 2\n")  # tiktoken's format: base64 token, rank
    return folder


@pytest.mark.parametrize("marks", [{}, {"tokenizer_class": False}, {"tokenizer_class": False, "eos": False}])
def test_glm4_original_remote_code_folder_is_refused_naming_the_hf_release(tmp_path, marks):
    from ptuning.models.chatglm2.family import ChatGLM2Family
    from ptuning.weights import CheckpointError

    folder = glm4_original_folder(tmp_path / "glm-4-9b-chat", **marks)
    family = family_for(folder)
    assert isinstance(family, ChatGLM2Family)
    for load in (lambda: family.load_model(folder, pre_seq_len=None), lambda: family.load_tokenizer(folder)):
        with pytest.raises((CheckpointError, ConfigError)) as err:
            load()
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"{folder / 'config.json'}: GLM-4's original remote-code layout")
        assert "THUDM/glm-4-9b-chat-hf (transformers' GlmForCausalLM)" in message
    if marks:
        return
    proc = subprocess.run([sys.executable, "train.py", f"model.path={folder}", f"train.output_dir={tmp_path / 'out'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "GLM-4's original remote-code layout" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_chatglm2_and_3_folders_are_not_mistaken_for_glm4():
    from ptuning.models.chatglm2.config import glm4_original_evidence

    for name in ("tiny-chatglm2", "tiny-chatglm3"):
        assert glm4_original_evidence(ROOT / "data" / name) is None


@functools.cache
def every_template() -> dict:
    from transformers import AutoConfig

    from ptuning.models.chatglm2.template import ChatGLM2Template, ChatGLM3Template
    from ptuning.models.chatglm2.tokenizer import ChatGLM2Tokenizer
    from ptuning.models.hf.family import HFFamily

    glm4 = ROOT / "data" / "tiny-glm4"
    return {
        "chatglm": ChatGLMTemplate(ChatGLMTokenizer.from_pretrained(BUILTIN_MODEL)),
        "chatglm2": ChatGLM2Template(ChatGLM2Tokenizer.from_pretrained(ROOT / "data" / "tokenizer-chatglm2")),
        "chatglm3": ChatGLM3Template(ChatGLM2Tokenizer.from_pretrained(ROOT / "data" / "tokenizer-chatglm3")),
        "glm4": HFFamily().template(HFFamily().load_tokenizer(glm4), AutoConfig.from_pretrained(glm4)),
    }


# ChatGLM3's rows are always role-token conversations: it has no plain form
@pytest.mark.parametrize(("family", "kind"), [(f, k) for f in ("chatglm", "chatglm2", "chatglm3", "glm4")
                                              for k in ("plain", "one turn", "after earlier turns")
                                              if (f, k) != ("chatglm3", "plain")])
def test_every_family_keeps_the_start_of_a_question_that_alone_does_not_fit(family, kind):
    template = every_template()[family]
    query = "开头" + "这件白色纯棉毛衣，七分袖露出手腕。" * 8 + "结尾"
    history = [("白色好看吗", "好看")] if kind == "after earlier turns" else []
    conversation = Conversation(query=query, history=history, plain=kind == "plain")
    whole = template.prompt(Conversation(query=query, plain=kind == "plain"), 10_000)
    budget = len(whole.ids) - 20
    out = template.prompt(conversation, budget)
    text = template.tokenizer.decode(out.ids, skip_special_tokens=True)
    assert len(out.ids) <= budget and out.truncated_tokens > 0 and out.dropped_turns == len(history)
    assert "开头这件白色纯棉毛衣" in text and "结尾" not in text, text
    # what follows the question stays, so the answer starts where it always does: ChatGLM-6B's [gMASK] <sop>,
    # ChatGLM3's <|assistant|>, GLM-4's generation prompt, ChatGLM2's "\n\n答：" after earlier turns (a ChatGLM2
    # prompt without them is cut as its original main.py cuts it: its first ids, the frame too)
    kept = {"chatglm": 2, "chatglm2": 0 if not history else 3, "chatglm3": 1, "glm4": 0 if kind == "plain" else 1}
    assert out.ids[len(out.ids) - kept[family]:] == whole.ids[len(whole.ids) - kept[family]:]
    if family == "chatglm2" and history:
        assert text.endswith("\n\n答：")
