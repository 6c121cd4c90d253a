"""The base model is the baseline a prefix is measured against: ``no_prefix(model)`` makes every family compute
as the model loaded without a prefix; training's step-0 evaluation and ``evaluate.py prefix_checkpoint=none``
score exactly that model, and agree with each other."""

from __future__ import annotations

import json

import pytest
import torch

from hydra_entry import to_object
from ptuning.build import load
from ptuning.config import ConfigError, ModelConfig
from ptuning.data import TrainingCollator
from ptuning.evaluation.generate import GenerationSettings, generate_ids
from ptuning.models import Conversation
from ptuning.prefix import no_prefix
from ptuning.training import run as train_run
from ptuning.training.loop import token_loss_sum

from .test_configs import compose_train
from .test_evaluate import compose_evaluate, reset_accelerate
from .test_evaluate import run as evaluate_run

BUILTINS = ["builtin:tiny-chatglm", "builtin:tiny-chatglm2", "builtin:tiny-chatglm3", "builtin:tiny-glm4"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_module):
    """In-process model runs of this module use one intra-op thread (see ``one_thread_module``)."""


@pytest.mark.parametrize("path", BUILTINS)
def test_no_prefix_computes_the_model_loaded_without_one(path):
    torch.manual_seed(0)
    with_prefix = load(ModelConfig(path=path, pre_seq_len=8, prefix_init="random")).model.eval()
    loaded_bare = load(ModelConfig(path=path), pre_seq_len=None, init=False)
    bare, template = loaded_bare.model.eval(), loaded_bare.template
    rows = [template.train_row(Conversation(query=q, plain=True), a, 32, 16)
            for q, a in (("类型#裙", "这条裙子"), ("类型#上衣*颜色#白色", "白色上衣，简洁大方"))]
    batch = TrainingCollator(template.pad_token_id)([{"input_ids": r.input_ids, "labels": r.labels} for r in rows])
    ids, labels = batch["input_ids"], batch["labels"]
    with torch.no_grad():
        base = token_loss_sum(bare, ids, labels)
        emptied = token_loss_sum(with_prefix, ids, labels, prefix=no_prefix(with_prefix))
        prefixed = token_loss_sum(with_prefix, ids, labels)
    torch.testing.assert_close(emptied, base, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(prefixed, base, rtol=1e-3)  # the (random) prefix itself changes the model


@pytest.mark.parametrize("path", BUILTINS)
def test_generation_with_no_prefix_answers_as_the_model_without_one(path):
    loaded = load(ModelConfig(path=path, pre_seq_len=8, prefix_init="random"))
    bare = load(ModelConfig(path=path), pre_seq_len=None, init=False)
    template = loaded.template
    prompts = [template.prompt(Conversation(query=q, plain=True), 32).ids for q in ("类型#裙", "类型#上衣*颜色#白色")]
    settings = GenerationSettings(max_new_tokens=12)
    kwargs = dict(pad_id=template.pad_token_id, stop_ids=template.stop_token_ids)
    model = loaded.model.eval()
    emptied = generate_ids(model, prompts, settings, prefix=no_prefix(model), **kwargs)
    assert emptied == generate_ids(bare.model.eval(), prompts, settings, **kwargs)


def test_no_prefix_needs_a_prefix_encoder():
    bare = load(ModelConfig(), pre_seq_len=None, init=False).model
    with pytest.raises(ValueError, match="no prefix encoder"):
        no_prefix(bare)


def test_training_step_zero_and_evaluate_none_score_the_same_base_model(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    common = ["data.max_eval_samples=6", f"data.cache_dir={tmp_path / 'cache'}"]
    reset_accelerate()
    result = train_run(to_object(compose_train([
        f"train.output_dir={tmp_path / 'run'}", "data.max_train_samples=16", "train.max_steps=2",
        "train.per_device_batch_size=4", "train.save_steps=2", "train.eval_before_training=true",
        "train.max_new_tokens=16", "train.plot=false", *common])))
    step0 = next(json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()
                 if json.loads(line)["step"] == 0)
    assert "base model (no prefix): eval loss" in capsys.readouterr().out
    reset_accelerate()
    metrics = evaluate_run(compose_evaluate(["prefix_checkpoint=none", "split=validation",
                                             "generation.max_new_tokens=16", *common]))
    out = tmp_path / "outputs" / "eval-base-tiny"
    assert metrics["output_dir"] == str(out.relative_to(tmp_path))
    written = json.loads((out / "metrics.json").read_text())
    assert written["checkpoint"] is None and written["base_model"] == "builtin:tiny-chatglm"
    for key in ("rouge-l", "bleu-4", "num_stopped_predictions"):
        assert written[key] == pytest.approx(step0[f"eval_{key}"]), key
    assert result.baseline_metrics["rouge-l"] == pytest.approx(written["rouge-l"])
    # the trained prefix is not what was scored at step 0
    assert result.metrics != result.baseline_metrics


def test_evaluate_none_refuses_a_prefix_size_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    reset_accelerate()
    with pytest.raises(ConfigError) as err:
        evaluate_run(compose_evaluate(["prefix_checkpoint=none", "model.pre_seq_len=8"]))
    assert str(err.value) == ("model.pre_seq_len=8 with prefix_checkpoint=none: the base model is evaluated without "
                              "a prefix (leave model.pre_seq_len unset)")
    assert not (tmp_path / "outputs").exists()
