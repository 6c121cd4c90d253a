"""A row's end token is a training target whatever the pad id is.

For every family, with a tokenizer whose pad id is its end token (SmolLM2, GLM-4 and most Llama / Qwen set-ups:
pad = eos), the token that ends each answer (eos, ``<|im_end|>``: what the family's answers end with) is the
last target of its row, and the padding the collator adds is masked by position: a shorter row's pads are
-100, its end token is not.
"""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig

from ptuning.data import IGNORE_INDEX, DataConfig, TrainingCollator, build_datasets, preprocess_train
from ptuning.models.chatglm.template import ChatGLMTemplate
from ptuning.models.chatglm2.template import ChatGLM2Template, ChatGLM3Template
from ptuning.models.chatglm2.tokenizer import ChatGLM2Tokenizer
from ptuning.models.hf.family import HFFamily
from ptuning.models.hf.template import ChatTemplatePrompt

from .common import ROOT, small_chatml_template
from .test_data import EOS, CharTokenizer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ROWS = [{"prompt": "hello world", "response": "the quick brown fox", "history": []},
        {"prompt": "how are you", "response": "fox", "history": []}]


class CharTokenizerPadIsEos(CharTokenizer):
    pad_token_id = EOS


def chatglm2_pad_is_eos(folder: str) -> ChatGLM2Tokenizer:
    tokenizer = ChatGLM2Tokenizer.from_pretrained(ROOT / "data" / folder)
    tokenizer.pad_token = tokenizer.eos_token
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    return tokenizer


def chatml_pad_is_im_end() -> ChatTemplatePrompt:
    """A small ChatML tokenizer laid out as SmolLM2-Instruct's: eos = pad = ``<|im_end|>``."""
    return small_chatml_template(CHATML, "<|im_end|>")


def glm4_pad_is_eos() -> ChatTemplatePrompt:
    folder = ROOT / "data" / "tiny-glm4"
    family = HFFamily()
    template = family.template(family.load_tokenizer(folder), AutoConfig.from_pretrained(folder))
    assert template.tokenizer.pad_token_id == template.tokenizer.eos_token_id  # as GLM-4 ships it
    return template


TEMPLATES = {
    "chatglm-6b": lambda: ChatGLMTemplate(CharTokenizerPadIsEos()),
    "chatglm2": lambda: ChatGLM2Template(chatglm2_pad_is_eos("tokenizer-chatglm2")),
    "chatglm3": lambda: ChatGLM3Template(chatglm2_pad_is_eos("tokenizer-chatglm3")),
    "glm4 (hf)": glm4_pad_is_eos,
    "chatml (hf)": chatml_pad_is_im_end,
}


def last_target(labels) -> int:
    return max(i for i, label in enumerate(labels) if label != IGNORE_INDEX)


@pytest.mark.parametrize("history", [True, False], ids=["chat rows", "plain rows"])
@pytest.mark.parametrize("name", list(TEMPLATES))
def test_the_end_token_is_the_last_target_when_it_is_the_pad_token(name, history):
    template = TEMPLATES[name]()
    pad = template.pad_token_id
    assert pad in template.stop_token_ids  # the answers of this set-up end with the pad id
    cfg = DataConfig(prompt_column="prompt", response_column="response",
                     history_column="history" if history else None, max_source_length=64, max_target_length=32)
    batch = {key: [row[key] for row in ROWS] for key in ROWS[0]}
    features = preprocess_train(batch, template, cfg)
    for ids, labels in zip(features["input_ids"], features["labels"], strict=True):
        end = last_target(labels)
        assert end == len(ids) - 1
        assert labels[end] == ids[end] == pad
    collated = TrainingCollator.from_config(template, cfg)(
        [{"input_ids": i, "labels": lab} for i, lab in zip(features["input_ids"], features["labels"], strict=True)]
    )
    short = min(range(2), key=lambda r: len(features["input_ids"][r]))
    length = len(features["input_ids"][short])
    assert length < collated["input_ids"].shape[1]  # the shorter row was padded
    assert collated["labels"][short, length - 1].item() == pad  # its end token: a target
    assert collated["input_ids"][short, length:].eq(pad).all()  # the pads: the same id ...
    assert collated["labels"][short, length:].eq(IGNORE_INDEX).all()  # ... masked by position


def test_chatglm_6b_still_drops_a_pad_token_written_inside_an_answer():
    # its original script turned every pad id into -100; its pad id (3) is never its end token
    template = ChatGLMTemplate(CharTokenizer())
    features = preprocess_train({"content": ["a"], "summary": ["x\x03y"]}, template, DataConfig())
    assert features["labels"][0][-4:] == [ord("x"), IGNORE_INDEX, ord("y"), EOS]


def test_data_files_of_chat_rows_train_on_im_end_through_the_whole_pipeline(tmp_path):
    template = chatml_pad_is_im_end()
    path = tmp_path / "train.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    cfg = DataConfig(train_file=str(path), prompt_column="prompt", response_column="response",
                     history_column="history", max_source_length=64, max_target_length=32,
                     cache_dir=str(tmp_path / "cache"))
    rows = build_datasets(cfg, template, "train")
    im_end = template.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for row in rows:
        targets = [t for t in row["labels"] if t != IGNORE_INDEX]
        assert targets[-1] == im_end
        assert template.tokenizer.decode(targets[:-1]) == row_response(rows, row)
    assert sum(t == im_end for row in rows for t in row["labels"]) == len(ROWS)


def row_response(rows, row) -> str:
    return ROWS[[r["input_ids"] for r in rows].index(row["input_ids"])]["response"]
