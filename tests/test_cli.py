"""Command lines as a user types them: what the console shows, and how a run starts, fails and stops.

Each test is named after the kind of fault it guards against (``itemNN``: misspelled keys added with ``+``,
a tracker that cannot log in, Ctrl-C, runs from another working folder, console noise, ...). The command
lines run once, as processes forked from one driver that has already imported the libraries
(``tests/forkrun.py``, the same program, argv, working folder and exit status as ``python train.py``);
the tests then read their exit status, output and files.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hydra_entry import CONF_DIR

from .common import ROOT

BAD_DATA = ROOT / "tests" / "bad_inputs" / "data" / "missing_column.json"
SMALL = ["data.max_train_samples=32", "data.max_eval_samples=4", "train.per_device_batch_size=4",
         "train.max_new_tokens=4", "train.eval_batch_size=4", "train.plot=false"]
# the kill run of tests/test_reliability.py: checkpoints at 3, 6, 9 (two kept)
CUT = ["data.max_train_samples=64", "train.max_steps=10", "train.per_device_batch_size=4", "train.save_steps=3",
       "train.save_total_limit=2", "train.eval_generation=false", "train.eval_before_training=false",
       "train.plot=false", "train.logging_steps=1"]
SIGINT_AT = {"PTUNING_TEST_KILL_SIGNAL": "SIGINT"}


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """Runs every command line once; returns ``{name: {"code", "out", "err"}}`` and the folders used."""
    root = tmp_path_factory.mktemp("cli")
    cache = root / "cache"
    elsewhere = root / "elsewhere"  # a working folder outside the project
    elsewhere.mkdir()
    shutil.copy(ROOT / "data" / "adgen_sample" / "dev.json", elsewhere / "my_dev.json")
    existing = root / "existing"  # an earlier run's outputs (no checkpoint yet)
    existing.mkdir()
    (existing / "train_log.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    (existing / "run_config.json").write_text('{"run_id": "earlier"}\n')
    (root / "home").mkdir()  # no ~/.netrc: no wandb API key
    cut = root / "cut"
    stated = root / "stated-prefix"  # a ChatGLM2 folder whose config.json sets pre_seq_len, with no prefix weights
    shutil.copytree(ROOT / "data" / "tiny-chatglm2", stated)
    config = json.loads((stated / "config.json").read_text())
    (stated / "config.json").write_text(json.dumps({**config, "pre_seq_len": 128, "prefix_projection": False}))
    jobs = {
        "plus_key": ("train.py", ["+train.max_stepz=3", f"train.output_dir={root / 'never'}"], {}, ROOT),
        "plus_key_evaluate": ("evaluate.py", ["+generation.max_new_tokenz=4"], {}, ROOT),
        "wandb_online": ("train.py", ["logger=wandb", "logger.mode=online", f"train.output_dir={existing}"],
                         {"HOME": str(root / "home"), "WANDB_API_KEY": ""}, ROOT),
        "missing_train_file": ("train.py", ["data.train_file=missing.json", f"train.output_dir={root / 'never'}"],
                               {}, ROOT),
        "failed_start_elsewhere": ("train.py", [f"data.train_file={BAD_DATA}", f"data.cache_dir={cache}", *SMALL],
                                   {}, elsewhere / "failed"),
        "elsewhere": ("train.py", ["data.validation_file=my_dev.json", f"data.cache_dir={cache}", *SMALL,
                                   "train.max_steps=4", "train.save_steps=2", "train.eval_steps=2",
                                   "train.logging_steps=2"], {}, elsewhere),
        "interrupt_train": ("train.py", [*CUT, f"train.output_dir={cut}", f"data.cache_dir={cache}"],
                            {"PTUNING_TEST_KILL_AT": "step@5", **SIGINT_AT}, ROOT),
        "interrupt_evaluate": ("evaluate.py", [f"prefix_checkpoint={cut / 'checkpoint-3'}", f"output_dir={root / 'ev'}",
                                               "data.max_eval_samples=8", "batch_size=2", "generation.max_new_tokens=4",
                                               f"data.cache_dir={cache}"],
                               {"PTUNING_TEST_KILL_AT": "generate@1", **SIGINT_AT}, ROOT),
        "evaluate_pre_seq_len": ("evaluate.py", [f"prefix_checkpoint={cut / 'checkpoint-3'}", "model.pre_seq_len=8",
                                                 f"output_dir={root / 'ev2'}", f"data.cache_dir={cache}"], {}, ROOT),
        "help": ("train.py", ["--help"], {}, ROOT),
        "stated_prefix": ("train.py", [f"model.path={stated}", f"train.output_dir={root / 'stated-run'}",
                                       f"data.cache_dir={cache}", *SMALL, "train.max_steps=2", "train.eval_steps=null",
                                       "train.eval_before_training=false", "train.eval_generation=false"], {}, ROOT),
    }
    (elsewhere / "failed").mkdir()
    before = {"existing": digests(existing)}
    specs = []
    for name, (script, args, env, cwd) in jobs.items():
        specs.append({"script": script, "args": args, "env": env, "cwd": str(cwd), "timeout": 300,
                      "stdout": str(root / f"{name}.out"), "stderr": str(root / f"{name}.err")})
    (root / "jobs.json").write_text(json.dumps(specs))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "forkrun.py"), str(root / "jobs.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    codes = json.loads(proc.stdout.strip().splitlines()[-1])
    results = {
        name: {"code": code, "out": Path(spec["stdout"]).read_text(errors="replace"),
               "err": Path(spec["stderr"]).read_text(errors="replace")}
        for name, spec, code in zip(jobs, specs, codes, strict=True)
    }
    return {"results": results, "root": root, "elsewhere": elsewhere, "existing": existing, "cut": cut,
            "before": before, "stated": stated}


def last_error(result: dict) -> str:
    assert "Traceback" not in result["err"], result["err"][-3000:]
    return result["err"].strip().splitlines()[-1]


def test_a_key_added_with_plus_must_exist(cli):
    train, evaluate = cli["results"]["plus_key"], cli["results"]["plus_key_evaluate"]
    assert train["code"] == evaluate["code"] == 2
    assert last_error(train) == "error: train.max_stepz: no such key (did you mean train.max_steps?)"
    assert last_error(evaluate) == ("error: generation.max_new_tokenz: no such key "
                                    "(did you mean generation.max_new_tokens?)")
    assert not (cli["root"] / "never").exists()


def test_wandb_online_without_a_key_fails_first_in_one_line(cli):
    result = cli["results"]["wandb_online"]
    assert result["code"] == 2
    assert last_error(result) == (
        "error: logger.mode=online: no wandb API key is configured; log in with `wandb login` (or set "
        "WANDB_API_KEY), or use logger.mode=offline and upload later with `wandb sync`")
    assert result["err"].strip().count("\n") == 0  # nothing else was said: no model was loaded
    assert digests(cli["existing"]) == cli["before"]["existing"]  # the earlier run's log and config stay


def test_ctrl_c_in_training_says_where_to_resume_and_exits_130(cli):
    result = cli["results"]["interrupt_train"]
    assert result["code"] == 130, result["err"][-3000:]
    assert last_error(result) == (f"interrupted at step 4; last checkpoint {cli['cut'] / 'checkpoint-3'}; "
                                  "continue with train.resume_from=latest")
    assert sorted(p.name for p in cli["cut"].glob("checkpoint-*")) == ["checkpoint-3"]


def test_ctrl_c_in_evaluation_writes_nothing_and_exits_130(cli):
    result = cli["results"]["interrupt_evaluate"]
    assert result["code"] == 130, result["err"][-3000:]
    assert last_error(result) == "interrupted: nothing was written"
    assert not (cli["root"] / "ev").exists()  # the output folder is made only when the results are written


def test_evaluation_refuses_another_pre_seq_len_as_training_does(cli):
    result = cli["results"]["evaluate_pre_seq_len"]
    assert result["code"] == 2
    checkpoint = cli["cut"] / "checkpoint-3"
    assert last_error(result) == (f"error: {checkpoint}: the prefix was trained with pre_seq_len=16 but the model "
                                  "has pre_seq_len=8 (leave model.pre_seq_len unset to take the checkpoint's)")


def test_help_lists_only_selectable_groups(cli):
    from hydra import compose, initialize_config_dir

    result = cli["results"]["help"]
    assert result["code"] == 0
    section = result["out"].split("== Configuration groups ==", 1)[1].split("==", 1)[0]
    groups = dict(re.findall(r"^(\w+): (.+)$", section, re.M))
    assert sorted(groups) == ["conf", "data", "logger", "model", "train"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for group, options in groups.items():
            for option in options.split(", "):
                compose("train", overrides=[f"{group}={option}", "model.path=/tmp", "data.train_file=a.json"])


def test_a_missing_training_file_names_its_key(cli):
    result = cli["results"]["missing_train_file"]
    assert result["code"] == 2
    assert last_error(result) == "error: data.train_file=missing.json: no such file"


def test_a_failed_start_leaves_no_output_folder(cli):
    result = cli["results"]["failed_start_elsewhere"]
    assert result["code"] == 2
    assert "no column 'summary'" in last_error(result)
    assert list((cli["elsewhere"] / "failed").iterdir()) == []  # no outputs/default, not even empty
    assert not (cli["root"] / "never").exists()


def test_bundled_defaults_resolve_from_another_working_folder(cli):
    result = cli["results"]["elsewhere"]
    assert result["code"] == 0, result["err"][-3000:]
    out = cli["elsewhere"] / "outputs" / "default"  # outputs stay relative to the working folder
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    config = json.loads((out / "run_config.json").read_text())
    assert config["data"]["train_file"] == str(ROOT / "data" / "adgen_sample" / "train.json")
    assert config["data"]["validation_file"] == "my_dev.json"  # a path given by the user: the working folder's
    assert "base model (no prefix) -> tuned prefix on my_dev.json" in result["out"]


def test_a_plain_run_prints_no_noise_and_tokenizes_each_set_once(cli):
    result = cli["results"]["elsewhere"]
    assert "Setting accelerator" not in result["out"] + result["err"]  # DeepSpeed is not even imported
    assert "Warning" not in result["err"], result["err"]
    bars = re.findall(r"(Tokenizing [^:]+):\s+0%", result["err"])
    assert sorted(bars) == sorted(set(bars)) and len(bars) == 3, bars  # train, eval-loss and generation features


def test_the_console_shows_eval_loss_and_throughput(cli):
    result = cli["results"]["elsewhere"]
    lines = result["out"].splitlines()
    assert re.fullmatch(r"base model \(no prefix\): eval loss \d+\.\d{4}, bleu-4 .*", lines[1]), lines
    assert [line.split(":")[0] for line in lines if re.fullmatch(r"step \d+: eval loss \d+\.\d{4}", line)] == ["step 2"]
    assert re.search(r"done: step 4, checkpoint .*checkpoint-4, eval loss \d+\.\d{4}", result["out"])
    bar = result["err"].replace("\r", "\n")
    assert re.search(r"train: 100%.*loss=\d.*lr=.*grad_norm=\d.*tokens_per_s=\d", bar), bar[-2000:]


STOP_IMPORT = """
import os, sys
class Stop:
    def find_spec(self, name, path=None, target=None):
        if name == os.environ["STOP_AT_IMPORT"]:
            raise KeyboardInterrupt
sys.meta_path.insert(0, Stop())
"""


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    from ptuning.build import load_model
    from ptuning.checkpoint import prefix_metadata, save_checkpoint
    from ptuning.config import ModelConfig

    model = load_model(ModelConfig(pre_seq_len=4))
    return save_checkpoint(tmp_path_factory.mktemp("ctrl-c") / "run", 1, model,
                           prefix_metadata(model, ModelConfig().base_model_name))


@pytest.mark.parametrize("stop_at", ["torch", "ptuning.build"])  # the libraries' imports, then loading the model
@pytest.mark.parametrize("command", ["-m ptuning.chat", "-m ptuning.serve --port 0", "-m ptuning.export full",
                                     "ptuning-chat", "ptuning-serve"])
def test_ctrl_c_in_the_first_seconds_of_chat_serve_and_export_is_one_line_and_exit_130(tmp_path, small_checkpoint,
                                                                                      stop_at, command):
    # Ctrl-C arrives as a KeyboardInterrupt wherever the process is; here, deterministically, when it imports
    # ``stop_at`` (sitecustomize)
    (tmp_path / "sitecustomize.py").write_text(STOP_IMPORT)
    if command.startswith("ptuning-"):  # the console scripts pyproject.toml installs
        entry = command.removeprefix("ptuning-")
        argv = ["-c", f"import sys; from ptuning.console import {entry}; sys.exit({entry}())"]
    else:
        argv = command.split()
    out = tmp_path / "export"
    if "export" in command:
        argv += ["--checkpoint", str(small_checkpoint), "--out", str(out)]
    else:
        argv += ["--prefix-checkpoint" if "chat" in command else "--prefix", f"p={small_checkpoint}"
                 if "serve" in command else str(small_checkpoint)]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{tmp_path}:{ROOT}", "OMP_NUM_THREADS": "1",
           "STOP_AT_IMPORT": stop_at, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=env, stdin=subprocess.DEVNULL)
    assert proc.returncode == 130, proc.stderr[-3000:]
    line = "interrupted: nothing was written" if "export" in command else "interrupted"
    assert proc.stderr.strip() == line, proc.stderr[-3000:]
    assert not out.exists()


def test_a_config_pre_seq_len_without_prefix_weights_is_named_once_and_the_summary_names_the_prefix(cli, capsys):
    from ptuning.chat import load as chat_load
    from ptuning.chat import parse_args as chat_args
    from ptuning.serve.cli import load as serve_load
    from ptuning.serve.cli import parse_args as serve_args

    stated, result = cli["stated"], cli["results"]["stated_prefix"]
    assert result["code"] == 0, result["err"][-3000:]
    note = (f"note: {stated / 'config.json'} sets pre_seq_len 128 but the folder's weights hold no prefix; the "
            "setting is ignored ")
    assert [line for line in result["err"].splitlines() if line.startswith("note:")] == [
        note + "(the prefix is model.pre_seq_len=16)"]
    assert re.search(r"^training [\d,]+ of [\d,]+ parameters \([\d.]+%, a 16-token prefix\) on 1 process\(es\)",
                     result["out"], re.M), result["out"]
    checkpoint = cli["root"] / "stated-run" / "checkpoint-2"
    capsys.readouterr()
    chat_load(chat_args(["--model-path", str(stated), "--prefix-checkpoint", str(checkpoint)]))
    assert capsys.readouterr().err.splitlines() == [note + "(the prefix is --prefix-checkpoint's, P=16)"]
    serve_load(serve_args(["--model-path", str(stated)]), [("p", str(checkpoint))])
    assert capsys.readouterr().err.splitlines() == [note + "(each prefix is its --prefix's)"]


def test_the_console_shows_no_split_generation_bar_for_user_files(cli):
    # datasets' "Generating train split: 0 examples" named a split of its own for every file (a validation file
    # too) and showed 0 rows on a terminal; the tokenizing bar counts the rows
    result = cli["results"]["elsewhere"]
    assert "Generating" not in result["err"] and "split" not in result["err"], result["err"][-2000:]
    assert re.search(r"Tokenizing validation \(my_dev.json\) for the eval loss: 100%.* 4/4", result["err"])
