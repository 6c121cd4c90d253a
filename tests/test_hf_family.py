"""The transformers-decoder family: picked from config.json, its tokenizer, prompt template and sizes.

Uses the built-in ``data/tiny-glm4`` (GLM-4 chat template, no text after an answer) and a ChatML tokenizer
built here (Qwen's layout: ``<|im_end|>`` after an answer, an empty ``<think></think>`` block before it).
"""

from __future__ import annotations

import json
import shutil

import pytest
from transformers import AutoConfig, PreTrainedTokenizerFast

from ptuning.config import ConfigError
from ptuning.models import HF_ARCHITECTURES, Conversation, UnsupportedModelError, family_for
from ptuning.models.hf.family import HFFamily
from ptuning.models.hf.template import ChatTemplatePrompt

from .common import ROOT, small_chatml_template

TINY = ROOT / "data" / "tiny-glm4"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}<think>\n\n</think>\n\n{% endif %}"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def family():
    return HFFamily()


@pytest.fixture(scope="module")
def glm4(family):
    tokenizer = family.load_tokenizer(TINY)
    return family.template(tokenizer, AutoConfig.from_pretrained(TINY))


@pytest.fixture(scope="module")
def chatml():
    """A small ChatML tokenizer (Qwen's special tokens, no leading special tokens)."""
    return small_chatml_template(CHATML, "<|endoftext|>")


def write_config(folder, **cfg):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


# ---------------------------------------------------------------- the family table


@pytest.mark.parametrize("arch", HF_ARCHITECTURES)
def test_family_is_picked_by_architectures(tmp_path, arch):
    folder = write_config(tmp_path / arch, architectures=[arch], model_type="whatever")
    assert family_for(folder).name == "hf"


def test_unsupported_architecture_is_one_line_naming_the_supported_ones(tmp_path):
    folder = write_config(tmp_path / "m", architectures=["MambaForCausalLM"], model_type="mamba")
    with pytest.raises(UnsupportedModelError) as err:
        family_for(folder)
    message = str(err.value)
    assert "\n" not in message
    assert "architectures=['MambaForCausalLM']" in message and "config.json" in message
    assert all(arch in message for arch in HF_ARCHITECTURES)


def test_remote_code_only_config_is_one_line_saying_what_to_convert_to(tmp_path):
    folder = write_config(tmp_path / "m", architectures=["ChatGLMModel"], model_type="chatglm",
                          auto_map={"AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"})
    with pytest.raises(UnsupportedModelError) as err:
        family_for(folder)
    message = str(err.value)
    assert "\n" not in message
    assert "auto_map" in message and "never run" in message and "GlmForCausalLM" in message


def test_the_builtin_model_is_this_family():
    family = family_for(TINY)
    assert family.name == "hf"
    config = AutoConfig.from_pretrained(TINY)
    assert family.max_positions(config) == config.max_position_embeddings == 512
    shape = family.prefix_shape(config, 16, False)
    assert (shape.num_layers, shape.num_key_value_heads, shape.head_dim) == (4, 2, 32)


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_needs_tokenizer_json_and_fits_the_vocabulary(tmp_path, family):
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    with pytest.raises(ConfigError, match=r"no-tokenizer: no tokenizer.json \(a transformers fast tokenizer\)"):
        family.load_tokenizer(folder)
    with pytest.raises(ConfigError, match=r"the tokenizer has \d+ tokens but the model's vocab_size is 100"):
        family.load_tokenizer(TINY, vocab_size=100)
    copy = tmp_path / "copy"
    shutil.copytree(TINY, copy)
    assert len(family.load_tokenizer(copy, vocab_size=AutoConfig.from_pretrained(TINY).vocab_size)) > 1000


# ---------------------------------------------------------------- the GLM-4 template


def test_glm4_plain_row_is_prompt_then_response_then_eos(glm4):
    tok = glm4.tokenizer
    row = glm4.train_row(Conversation(query="类型#上衣*材质#棉", plain=True), "这件上衣。", 64, 64)
    text = tok.decode(row.input_ids)
    assert text == "[gMASK]<sop>类型#上衣*材质#棉这件上衣。<|endoftext|>"
    start = row.labels.index(next(label for label in row.labels if label != -100))
    assert tok.decode(row.input_ids[start:]) == "这件上衣。<|endoftext|>"
    assert row.labels[start:] == row.input_ids[start:] and set(row.labels[:start]) == {-100}


def test_glm4_chat_row_uses_the_chat_template_and_ends_with_eos(glm4):
    tok = glm4.tokenizer
    conversation = Conversation(query="类型#裙", history=[("类型#上衣", "好的")], system="你是助手。")
    prompt = glm4.prompt(conversation, 256)
    assert tok.decode(prompt.ids) == "[gMASK]<sop><|system|>\n你是助手。<|user|>\n类型#上衣<|assistant|>\n好的<|user|>\n类型#裙<|assistant|>\n"
    assert glm4.render_text(conversation) == tok.decode(prompt.ids)
    row = glm4.train_row(conversation, "这条裙子。", 256, 64)
    assert row.input_ids[:len(prompt.ids)] == prompt.ids
    assert tok.decode(row.input_ids[len(prompt.ids):]) == "这条裙子。<|endoftext|>"
    stops = {tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")}
    assert stops <= set(glm4.stop_token_ids)
    assert glm4.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")


def test_truncation_drops_oldest_turns_then_cuts_the_query(glm4):
    history = [("类型#上衣*材质#棉" * 2, "这件上衣。" * 3), ("类型#裤", "这条裤子。"), ("类型#裙", "这条裙子。")]
    conversation = Conversation(query="类型#裙*颜色#白色", history=history)
    full = glm4.prompt(conversation, 10_000)
    assert (full.dropped_turns, full.truncated_tokens) == (0, 0)
    without_oldest = glm4.prompt(Conversation(query=conversation.query, history=history[1:]), 10_000)
    fit = glm4.prompt(conversation, len(without_oldest.ids))
    assert fit.ids == without_oldest.ids and fit.dropped_turns == 1 and fit.truncated_tokens == 0
    alone = glm4.prompt(Conversation(query=conversation.query), 10_000)
    assert glm4.prompt(conversation, len(alone.ids)).dropped_turns == 3
    cut = glm4.prompt(conversation, len(alone.ids) - 2)
    assert cut.dropped_turns == 3 and cut.truncated_tokens >= 2 and len(cut.ids) <= len(alone.ids) - 2
    text = glm4.tokenizer.decode(cut.ids)
    # the query's start stays, the generation prompt after it
    assert text.startswith("[gMASK]<sop><|user|>\n类型#裙") and text.endswith("<|assistant|>\n")
    assert "白色" not in text
    assert len(cut.ids) == len(alone.ids) - cut.truncated_tokens
    # the training row applies the same rule to its prompt
    row = glm4.train_row(conversation, "好。", len(alone.ids) - 2, 16)
    assert row.input_ids[:len(cut.ids)] == cut.ids
    assert (row.dropped_turns, row.truncated_tokens) == (3, cut.truncated_tokens)


def test_plain_rows_keep_the_start_of_a_long_prompt_and_cut_long_responses(glm4):
    query = "类型#上衣*材质#棉*颜色#白色*风格#文艺*衣样式#毛衣*袖长#七分袖"
    whole = glm4.prompt(Conversation(query=query, plain=True), 1000)
    cut = glm4.prompt(Conversation(query=query, plain=True), 8)
    assert cut.ids == whole.ids[:8] and cut.truncated_tokens == len(whole.ids) - 8
    row = glm4.train_row(Conversation(query=query, plain=True), "这件白色纯棉毛衣，七分袖露出手腕。", 8, 4)
    answer = row.input_ids[8:]
    assert len(answer) == 4 and answer[-1] == glm4.eos_id
    body = len(glm4.encode("这件白色纯棉毛衣，七分袖露出手腕。"))
    assert row.truncated_answer_tokens == body - 3  # 3 kept before the end token
    with pytest.raises(ValueError, match="a plain prompt -> response row has no history"):
        glm4.prompt(Conversation(query="q", history=[("a", "b")], plain=True), 100)


def test_source_prefix_goes_in_front_of_the_query(glm4):
    tok = glm4.tokenizer
    plain = glm4.prompt(Conversation(query="类型#裙", source_prefix="广告：", plain=True), 100)
    assert tok.decode(plain.ids) == "[gMASK]<sop>广告：类型#裙"
    chat = glm4.prompt(Conversation(query="类型#裙", source_prefix="广告：", history=[("类型#裤", "好")]), 100)
    assert tok.decode(chat.ids).endswith("<|user|>\n广告：类型#裙<|assistant|>\n")


# ---------------------------------------------------------------- a ChatML (Qwen) template


def test_chatml_answer_ends_at_im_end_and_decode_drops_the_empty_think_block(chatml):
    tok = chatml.tokenizer
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert chatml.lead == [] and im_end in chatml.stop_token_ids
    conversation = Conversation(query="hello")
    prompt = chatml.prompt(conversation, 100)
    assert tok.decode(prompt.ids) == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    row = chatml.train_row(conversation, "world", 100, 100)
    answer = row.input_ids[len(prompt.ids):]
    assert tok.decode(answer) == "<think>\n\n</think>\n\nworld<|im_end|>"  # the trailing newline is no target
    assert answer[-1] == im_end
    assert chatml.decode(answer) == "world"
    plain = chatml.train_row(Conversation(query="hello", plain=True), "world", 100, 100)
    assert tok.decode(plain.input_ids) == "helloworld<|endoftext|>"


def test_a_tokenizer_without_chat_template_serves_plain_rows_only(chatml):
    tok = PreTrainedTokenizerFast(tokenizer_object=chatml.tokenizer.backend_tokenizer, eos_token="<|endoftext|>")
    plain_only = ChatTemplatePrompt(tok)
    assert plain_only.prompt(Conversation(query="hello", plain=True), 10).ids == tok("hello")["input_ids"]
    with pytest.raises(ValueError, match="no chat template"):
        plain_only.prompt(Conversation(query="hello"), 10)


# ---------------------------------------------------------------- sizes and fingerprint


def test_fingerprint_follows_the_backbone_and_matmul_count(family):
    config = AutoConfig.from_pretrained(TINY)
    same = AutoConfig.from_pretrained(TINY)
    other = AutoConfig.from_pretrained(TINY, num_hidden_layers=3)
    assert family.fingerprint(config) == family.fingerprint(same) != family.fingerprint(other)
    h, heads, groups, d, inter, layers, vocab = 128, 4, 2, 32, 384, 4, config.vocab_size
    per_layer = h * heads * d * 2 + h * groups * d * 2 + 3 * h * inter
    assert family.matmul_weights(config) == layers * per_layer + h * vocab
    assert {"q_proj", "gate_up_proj", "down_proj"} <= set(family.block_linear_names())


def test_long_texts_raise_no_model_max_length_warning(family, capfd, caplog):
    # rows longer than the tokenizer's model_max_length are cut by the truncation rule, after encoding them whole
    template = family.template(family.load_tokenizer(ROOT / "data" / "tiny-glm4"),
                               AutoConfig.from_pretrained(ROOT / "data" / "tiny-glm4"))
    template.tokenizer.model_max_length = 32
    long = "类型#裙*颜色#白色*风格#简约" * 20
    for conversation in (Conversation(query=long, plain=True), Conversation(query=long, history=[(long, long)])):
        row = template.train_row(conversation, long, 64, 64)
        assert len(row.input_ids) <= 128
        assert len(template.prompt(conversation, 48).ids) <= 48
    out = capfd.readouterr()
    shown = out.out + out.err + caplog.text
    assert "Token indices sequence length" not in shown


def test_loading_a_model_shows_no_transformers_loading_bar(capfd):
    from transformers.utils import logging as hf_logging

    from ptuning.build import load_model
    from ptuning.config import ModelConfig

    capfd.readouterr()
    load_model(ModelConfig(path="builtin:tiny-glm4", pre_seq_len=4))
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err + captured.out, captured.err
    assert hf_logging.is_progress_bar_enabled()  # switched off only while the model loads
