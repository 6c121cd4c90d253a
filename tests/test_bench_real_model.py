"""benchmarks/bench_real_model.py's fair decoding of peft's prefix tuning, on the built-in tiny GLM-4: peft's own
``generate()`` drops the prefix at prefill (its answers are the base model's), the bench's greedy loop answers
what peft's training forward computes, row by row, also in a left-padded batch."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from peft import PrefixTuningConfig, get_peft_model
from transformers import AutoConfig

from ptuning.models.hf.family import HFFamily
from ptuning.models.hf.modeling import load_causal_lm

from .common import ROOT

TINY = ROOT / "data" / "tiny-glm4"


def bench_module():
    spec = importlib.util.spec_from_file_location("bench_real_model", ROOT / "benchmarks" / "bench_real_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def peft_prefix():
    torch.manual_seed(0)
    family = HFFamily()
    template = family.template(family.load_tokenizer(TINY), AutoConfig.from_pretrained(TINY))
    model = get_peft_model(load_causal_lm(TINY), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.normal_(0, 2)  # a prefix that changes the answers
    return model.eval(), template


def prompts(template) -> list[list[int]]:
    from ptuning.models import Conversation

    return [template.prompt(Conversation(query=q, plain=True), 48).ids for q in ("类型#裙*颜色#黑色", "类型#上衣")]


def test_the_greedy_loop_answers_what_peft_trains(peft_prefix):
    model, template = peft_prefix
    wrapper = bench_module().Peft(model, template, prefix=True)
    batch = prompts(template)
    answers = wrapper.greedy(batch, 6)
    for prompt, (ids, _) in zip(batch, answers, strict=True):
        assert ids, "the prefix should not end the answer at once"
        full = torch.tensor([prompt + ids])
        with torch.no_grad():
            logits = model(input_ids=full).logits[0]  # peft's training forward: the prefix as the cache
        chosen = logits[len(prompt) - 1 : len(prompt) - 1 + len(ids)].argmax(-1).tolist()
        assert chosen == ids


def test_peft_generate_drops_the_prefix_which_the_bench_works_around(peft_prefix):
    model, template = peft_prefix
    prompt = prompts(template)[0]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        peft_answer = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                     do_sample=False)[0, len(prompt):].tolist()
        with model.disable_adapter():
            base_answer = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                                         do_sample=False)[0, len(prompt):].tolist()
    (ours, _), = bench_module().Peft(model, template, prefix=True).greedy([prompt], 6)
    assert peft_answer == base_answer  # peft 0.21 + transformers 5.25: the prefix is lost at prefill
    assert ours != base_answer[: len(ours)]
