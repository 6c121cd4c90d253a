"""benchmarks/bench_real_model.py's fair decoding of peft's prefix tuning, on the built-in tiny GLM-4: peft's own
``generate()`` drops the prefix at prefill (its answers are the base model's), the bench's greedy loop answers
what peft's training forward computes, row by row, also in a left-padded batch."""

from __future__ import annotations

import importlib.util
import json

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


def measured(rouge: float, loss: float, ended: float, setup: dict | None = None) -> dict:
    result = {"trainable_params": 1, "peak_rss_mib": 1.0, "dev_loss": loss, "rouge-l": rouge, "bleu-4": rouge,
              "ended_by_themselves": ended, "empty": 0,
              "examples": [{"reference": "Return x.", "prediction": f"answer | {rouge}"}]}
    return {"methods": {"m": result}, "setup": setup or {"steps": 200}, "machine": {"cpu": "cpu", "cores": 2}}


def test_merged_results_are_held_to_the_targets_and_keep_their_machine(tmp_path):
    bench = bench_module()
    files = {}
    for name, (rouge, loss, ended) in {"base": (10.0, 3.8, 0.3), "ours": (21.0, 3.0, 0.95),
                                       "peft-prefix": (22.0, 3.1, 0.9), "lora": (25.0, 2.9, 1.0)}.items():
        data = measured(rouge, loss, ended)
        data["methods"] = {name: data["methods"]["m"]}
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps(data))
    results = {"methods": {}}
    bench.merge(results, [str(files[k]) for k in ("base", "ours", "peft-prefix")])
    assert results["methods"]["ours"]["machine"] == {"cpu": "cpu", "cores": 2}
    held = {target: ok for target, ok, _ in bench.targets(results)}
    assert held["ROUGE-L at least 10 points over the base model's, and a lower dev loss"] is True
    assert held["at least 90 % of the answers end by themselves"] is True
    assert held["ROUGE-L at least peft prefix tuning's"] is False  # 21 < 22
    assert held["peft LoRA r=8 (q, v)"] is None and held["the timing round"] is None  # not merged: not measured
    bench.merge(results, [str(files["lora"])])
    timing = {"timing": {"steps": 10, "s_per_step_median": {"ours": 1.0, "peft-prefix": 1.25, "lora": 1.5},
                         "ours_over_peft_prefix": 0.8, "ours_over_lora": 0.667}, "setup": {"steps": 200}}
    (tmp_path / "timing.json").write_text(json.dumps(timing))
    bench.merge(results, [str(tmp_path / "timing.json")])
    held = {target: ok for target, ok, _ in bench.targets(results)}
    assert held["ROUGE-L within 3 points of peft LoRA r=8's"] is False  # 25 - 21 > 3
    assert held["step time at most peft prefix tuning's (same process, same batches)"] is True
    assert None not in held.values()
    text = bench.report(results)
    assert "| ours: P-Tuning v2 | 1 | 1.00 |" in text and "ours / peft prefix tuning = 0.80" in text
    assert "answer \\| 21.0" in text  # a prediction's "|" does not break the table


def test_results_measured_at_another_budget_are_not_merged(tmp_path):
    bench = bench_module()
    (tmp_path / "a.json").write_text(json.dumps(measured(10.0, 3.0, 1.0, {"steps": 200})))
    (tmp_path / "b.json").write_text(json.dumps(measured(10.0, 3.0, 1.0, {"steps": 30})))
    with pytest.raises(SystemExit, match="b.json: measured with {'steps': 30}, not {'steps': 200}"):
        bench.merge({"methods": {}}, [str(tmp_path / "a.json"), str(tmp_path / "b.json")])
