"""``python evaluate.py`` end to end on a briefly trained prefix: files, input order, one vs two processes,
the original checkpoint format, where outputs may go, user mistakes, wandb."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
from accelerate.state import AcceleratorState, GradientState, PartialState
from hydra import compose, initialize_config_dir

from hydra_entry import CONF_DIR, to_object
from ptuning.checkpoint import export_original, resolve_checkpoint
from ptuning.config import ConfigError
from ptuning.evaluation.metrics import METRIC_NAMES
from ptuning.evaluation.run import resolve_output_dir, run
from ptuning.training import run as train_run

from .common import ROOT, read_wandb_history
from .test_configs import compose_train

DEV = ROOT / "data" / "adgen_sample" / "dev.json"
# Few rows and short answers keep every run at a few seconds; 21 rows split unevenly over 2 processes
# and over batches of 4, so gathering and batching are both exercised.
SMALL = ["data.max_eval_samples=21", "generation.max_new_tokens=24", "batch_size=4"]
SCORES = (*METRIC_NAMES, "num_samples", "num_empty_predictions", "new_tokens")


def reset_accelerate() -> None:
    # accelerate keeps process-wide singletons; each in-process job must start from scratch
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def subprocess_env() -> dict:
    env = dict(os.environ)
    # CPU only, one thread per process: identical numbers everywhere, and no thread oversubscription on
    # the small shared CI machines (two processes x several threads each is many times slower)
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    return env


def evaluate_py(*overrides, launcher=(sys.executable,)) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*launcher, "evaluate.py", *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=subprocess_env(),
    )


def compose_evaluate(overrides) -> object:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_object(compose("evaluate", overrides=list(overrides)))


def folder_digest(folder) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_module):
    """In-process model runs of this module use one intra-op thread (see ``one_thread_module``)."""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A prefix trained for 6 steps: ``run/checkpoint-3`` and ``run/checkpoint-6``."""
    base = tmp_path_factory.mktemp("eval")
    overrides = [
        f"train.output_dir={base / 'run'}",
        f"data.cache_dir={base / 'cache'}",
        "data.max_train_samples=64",
        "data.max_eval_samples=8",
        "train.max_steps=6",
        "train.per_device_batch_size=4",
        "train.save_steps=3",
        "train.save_total_limit=null",
        "train.eval_generation=false",
        "train.eval_before_training=false",
        "train.eval_steps=null",
        "train.plot=false",
    ]
    reset_accelerate()
    result = train_run(to_object(compose_train(overrides)))
    assert result.checkpoint == base / "run" / "checkpoint-6"
    return base


@pytest.fixture(scope="module")
def single(trained):
    """``python evaluate.py`` in one process, default output folder."""
    checkpoint = trained / "run" / "checkpoint-6"
    before = folder_digest(checkpoint)
    proc = evaluate_py(f"prefix_checkpoint={checkpoint}", f"data.cache_dir={trained / 'cache'}", *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert folder_digest(checkpoint) == before  # the checkpoint is read, never written
    return proc, trained / "run" / "eval-checkpoint-6"


def test_files_in_input_order_beside_the_checkpoint(single, trained):
    proc, out = single
    assert sorted(p.name for p in out.iterdir()) == ["generated_predictions.jsonl", "metrics.json"]
    assert not (trained / "run" / "checkpoint-6" / "generated_predictions.jsonl").exists()
    raw = (out / "generated_predictions.jsonl").read_text(encoding="utf-8")
    assert "\\u" not in raw and "类型#" in raw  # UTF-8, not escaped
    rows = [json.loads(line) for line in raw.splitlines()]
    source = [json.loads(line) for line in DEV.read_text(encoding="utf-8").splitlines()[:21]]
    assert [list(r) for r in rows] == [["prompt", "labels", "predict"]] * 21
    assert [r["prompt"] for r in rows] == [s["content"] for s in source]
    assert [r["labels"] for r in rows] == [s["summary"] for s in source]
    assert all(isinstance(r["predict"], str) for r in rows)
    assert sum(1 for r in rows if r["predict"].strip()) > 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in METRIC_NAMES:
        assert 0.0 <= metrics[key] <= 100.0, key
    assert metrics["num_samples"] == 21 and metrics["num_processes"] == 1
    assert metrics["new_tokens"] > 0 and metrics["new_tokens_per_s"] > 0
    assert metrics["checkpoint"].endswith("checkpoint-6")
    # the short table on stdout
    assert "| bleu-4 | rouge-1 | rouge-2 | rouge-l |" in proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.multiproc
def test_two_processes_give_the_same_predictions_and_metrics(single, trained):
    _, out = single
    two = trained / "two"
    # On a machine without GPUs, `--cpu` / MULTI_CPU configs start one process (accelerate's simple launcher);
    # torchrun through --multi_gpu starts two, and the job syncs them over gloo.
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    proc = evaluate_py(
        f"prefix_checkpoint={trained / 'run'}",  # a run folder: its latest checkpoint
        f"data.cache_dir={trained / 'cache'}",
        f"output_dir={two}",
        *SMALL,
        launcher=launcher,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_jsonl(two / "generated_predictions.jsonl") == read_jsonl(out / "generated_predictions.jsonl")
    one_metrics = json.loads((out / "metrics.json").read_text())
    two_metrics = json.loads((two / "metrics.json").read_text())
    assert two_metrics["num_processes"] == 2
    assert {k: two_metrics[k] for k in SCORES} == {k: one_metrics[k] for k in SCORES}
    assert proc.stdout.count("| bleu-4 |") == 1  # only the main process reports and writes


def test_original_format_checkpoint_gives_identical_predictions(single, trained):
    _, out = single
    orig = trained / "orig"
    export_original(trained / "run" / "checkpoint-6", orig)
    (orig / "prefix_config.json").unlink()  # as the original script left it: pytorch_model.bin only
    cfg = compose_evaluate([f"prefix_checkpoint={orig}", f"data.cache_dir={trained / 'cache'}", *SMALL])
    reset_accelerate()
    metrics = run(cfg)
    assert metrics["output_dir"] == str(trained / "eval-orig")
    assert read_jsonl(trained / "eval-orig" / "generated_predictions.jsonl") == read_jsonl(
        out / "generated_predictions.jsonl"
    )
    assert sorted(p.name for p in orig.iterdir()) == ["pytorch_model.bin"]


def test_output_dir_is_never_a_checkpoint_or_training_folder(trained):
    run_dir = trained / "run"
    checkpoint = run_dir / "checkpoint-6"
    assert resolve_output_dir(checkpoint, None) == run_dir / "eval-checkpoint-6"
    assert resolve_output_dir(checkpoint, str(trained / "new")) == trained / "new"
    refused = {
        str(checkpoint): "inside the checkpoint being evaluated",
        str(checkpoint / "eval"): "inside the checkpoint being evaluated",
        str(run_dir / "checkpoint-3"): "it is a checkpoint folder",
        str(run_dir / "checkpoint-3" / "sub"): "inside the checkpoint folder",
        str(run_dir): "training output folder",
        str(ROOT / "data" / "tiny-chatglm"): "training outputs or model files",
        str(run_dir / "train_log.jsonl"): "not a folder",
        # inside a training output folder, other than the checkpoint's own eval-checkpoint-N
        str(run_dir / "my_stuff"): f"it is inside the training output folder {run_dir};",
        str(run_dir / "eval-checkpoint-3"): f"it is inside the training output folder {run_dir};",
        str(run_dir / "eval-checkpoint-6" / "sub"): f"it is inside the training output folder {run_dir};",
    }
    for output_dir, why in refused.items():
        with pytest.raises(ConfigError, match=why):
            resolve_output_dir(checkpoint, output_dir)
    assert not (checkpoint / "eval").exists() and not (run_dir / "checkpoint-3" / "sub").exists()


def test_default_checkpoint_is_the_latest_of_outputs_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"outputs/default holds no checkpoint: run `python train.py`"):
        resolve_checkpoint(None)
    for step in (3, 10, 6):
        (tmp_path / "outputs" / "default" / f"checkpoint-{step}").mkdir(parents=True)
    assert resolve_checkpoint(None).name == "checkpoint-10"
    assert resolve_checkpoint("outputs/default").name == "checkpoint-10"
    with pytest.raises(ConfigError, match="no such folder"):
        resolve_checkpoint("outputs/other")


def test_missing_checkpoint_exits_with_one_line(trained):
    proc = evaluate_py("prefix_checkpoint=/no/such/checkpoint", f"output_dir={trained / 'mistake'}")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: prefix_checkpoint=/no/such/checkpoint: no such folder"], proc.stderr
    assert not (trained / "mistake").exists()


def test_data_mistakes_name_the_key_or_line(trained):
    from ptuning.data import DataError

    base = [f"prefix_checkpoint={trained / 'run'}", f"output_dir={trained / 'mistake'}"]
    with pytest.raises(ConfigError, match="data.test_file=missing.json: no such file"):
        run(compose_evaluate([*base, "data.test_file=missing.json"]))
    with pytest.raises(ConfigError, match="data.test_file is not set"):
        run(compose_evaluate([*base, "data.test_file=null"]))
    with pytest.raises(ConfigError, match=r"generation.top_p=0.0: expected a number in \(0, 1\]"):
        run(compose_evaluate([*base, "generation.top_p=0"]))
    reset_accelerate()
    with pytest.raises(DataError, match="dev.json, line 1: no column 'question'"):
        run(compose_evaluate([*base, f"data.cache_dir={trained / 'cache'}", "data.prompt_column=question"]))


def test_wandb_offline_logs_metrics_and_predictions_table(trained, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc key: offline
    from ptuning.training.tracking import make_tracker

    cfg = compose_evaluate(
        [
            f"prefix_checkpoint={trained / 'run' / 'checkpoint-3'}",
            f"data.cache_dir={trained / 'cache'}",
            f"output_dir={tmp_path / 'out'}",
            "data.max_eval_samples=4",
            "generation.max_new_tokens=8",
            "logger=wandb",
        ]
    )
    reset_accelerate()
    metrics = run(cfg, tracker=make_tracker(cfg))
    runs = list((tmp_path / "out" / "wandb").glob("offline-run-*/*.wandb"))
    assert len(runs) == 1
    # wandb's service process may still be appending the records when finish() has returned
    deadline = time.monotonic() + 30
    while True:
        try:
            history = read_wandb_history(runs[0])
        except Exception:  # a record cut in the middle of being written: read again
            history = []
        logged = {k: v for row in history for k, v in row.items()}
        if "bleu-4" in logged or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert logged["bleu-4"] == pytest.approx(metrics["bleu-4"]), history
    assert logged["predictions/_type"] == "table-file" and logged["predictions/nrows"] == 4


# ---- faults found by trying the toolkit as a user would (one test per kind, named by item) ----


def test_evaluation_warns_in_one_line_when_the_prefix_was_trained_on_another_model(trained, tmp_path, capsys):
    import shutil

    from ptuning.config import BUILTIN_MODEL

    other = tmp_path / "other-model"  # the same model in another folder: another base model to the checkpoint
    shutil.copytree(BUILTIN_MODEL, other)
    checkpoint = trained / "run" / "checkpoint-6"
    capsys.readouterr()
    reset_accelerate()
    run(compose_evaluate([f"prefix_checkpoint={checkpoint}", f"model.path={other}", f"output_dir={tmp_path / 'out'}",
                          f"data.cache_dir={trained / 'cache'}", "data.max_eval_samples=2",
                          "generation.max_new_tokens=2"]))
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"warning: {checkpoint} was trained on builtin:tiny-chatglm (config fingerprint ")
    assert f"but the model is {other.resolve()} (config fingerprint " in warnings[0]


def test_the_prefix_shape_is_the_checkpoints_and_another_given_value_is_an_error(trained, tmp_path):
    from ptuning.weights import CheckpointError

    checkpoint = trained / "run" / "checkpoint-6"
    cfg = compose_evaluate([f"prefix_checkpoint={checkpoint}", f"output_dir={tmp_path / 'out'}"])
    assert (cfg.model.pre_seq_len, cfg.model.prefix_projection) == (None, None)  # unset: the checkpoint's
    for override, message in [("model.pre_seq_len=8", "pre_seq_len=16 but the model has pre_seq_len=8"),
                              ("model.prefix_projection=true",
                               "prefix_projection=false but the model has prefix_projection=true")]:
        with pytest.raises(CheckpointError, match=rf"^{checkpoint}: the prefix was trained with {message} "):
            run(compose_evaluate([f"prefix_checkpoint={checkpoint}", f"output_dir={tmp_path / 'out'}", override]))
    # training says the same about the same checkpoint
    from ptuning.build import load_model
    from ptuning.checkpoint import load_prefix
    from ptuning.config import ModelConfig

    with pytest.raises(CheckpointError, match=rf"^{checkpoint}: the prefix was trained with pre_seq_len=16 but the "
                                              r"model has pre_seq_len=8 \(set model.pre_seq_len=16 to load it\)$"):
        load_prefix(load_model(ModelConfig(pre_seq_len=8)), checkpoint)
    assert not (tmp_path / "out").exists()


def test_a_refused_evaluation_leaves_no_output_folder(trained, tmp_path):
    from ptuning.data import DataError
    from ptuning.weights import CheckpointError

    checkpoint = trained / "run" / "checkpoint-3"
    default_out = trained / "run" / "eval-checkpoint-3"
    reset_accelerate()
    with pytest.raises(DataError, match="dev.json, line 1: no column 'question'"):
        run(compose_evaluate([f"prefix_checkpoint={checkpoint}", f"data.cache_dir={trained / 'cache'}",
                              "data.prompt_column=question"]))
    assert not default_out.exists()
    other = tmp_path / "other-model"  # a model whose weights do not fit its config: refused while loading
    import shutil

    from ptuning.config import BUILTIN_MODEL

    shutil.copytree(BUILTIN_MODEL, other)
    config = json.loads((other / "config.json").read_text())
    config["num_layers"] = config["num_layers"] + 1
    (other / "config.json").write_text(json.dumps(config))
    reset_accelerate()
    with pytest.raises(CheckpointError):
        run(compose_evaluate([f"prefix_checkpoint={checkpoint}", f"model.path={other}",
                              f"output_dir={tmp_path / 'a' / 'b'}", f"data.cache_dir={trained / 'cache'}"]))
    assert not default_out.exists() and not (tmp_path / "a").exists()
    # an output folder that cannot be made is still refused before any work
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=f"output_dir={blocker / 'out'}: {blocker} is a file, not a folder"):
        run(compose_evaluate([f"prefix_checkpoint={checkpoint}", f"output_dir={blocker / 'out'}"]))


# ---- the output folder, earlier results and empty keys ----


def test_earlier_results_are_replaced_only_when_asked_and_a_users_file_never(trained, tmp_path, capsys):
    checkpoint = trained / "run" / "checkpoint-3"
    out = tmp_path / "out"
    base = [f"prefix_checkpoint={checkpoint}", f"output_dir={out}", f"data.cache_dir={trained / 'cache'}",
            "data.max_eval_samples=2", "generation.max_new_tokens=2"]
    reset_accelerate()
    first = run(compose_evaluate(base))
    # the training run that wrote the checkpoint: train.overwrite tells its evaluations from others by it
    assert first["run_id"] == json.loads((checkpoint / "prefix_config.json").read_text())["run_id"]
    assert json.loads((out / "metrics.json").read_text())["run_id"] == first["run_id"]
    before = folder_digest(out)
    with pytest.raises(ConfigError) as refused:
        run(compose_evaluate(base))
    assert str(refused.value) == (
        f"output_dir={out} already holds an earlier evaluation's generated_predictions.jsonl, metrics.json: set "
        "overwrite=true to replace them, or choose another output_dir")
    assert folder_digest(out) == before
    capsys.readouterr()
    reset_accelerate()
    run(compose_evaluate([*base, "overwrite=true", "data.max_eval_samples=3"]))
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("overwrite=true")]
    assert said == [f"overwrite=true: replacing the earlier generated_predictions.jsonl, metrics.json in {out}"]
    assert json.loads((out / "metrics.json").read_text())["num_samples"] == 3
    # a file of the same name that evaluate.py did not write stays, asked or not
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.json").write_text('{"my": "numbers"}\n')
    for extra in ([], ["overwrite=true"]):
        with pytest.raises(ConfigError) as refused:
            run(compose_evaluate([*base[:1], f"output_dir={mine}", *base[2:], *extra]))
        assert str(refused.value) == (f"output_dir={mine}: metrics.json there was not written by evaluate.py and is "
                                      "never replaced; move it or choose another output_dir")
    assert [(p.name, p.read_text()) for p in mine.iterdir()] == [("metrics.json", '{"my": "numbers"}\n')]


def _pair(out):
    return {name: (out / name).read_text() for name in ("generated_predictions.jsonl", "metrics.json")}


@pytest.mark.parametrize("disk", ["injected", "tmpfs"])
def test_a_full_disk_writing_the_results_is_one_line_and_keeps_the_earlier_ones(tmp_path, monkeypatch, disk):
    from contextlib import nullcontext
    from pathlib import Path

    from ptuning.evaluation.run import write_outputs

    from .common import small_disk

    with small_disk(tmp_path / "disk", "64k") if disk == "tmpfs" else nullcontext(tmp_path / "disk") as folder:
        out = folder / "eval"
        write_outputs(out, [{"predict": "a"}], {"bleu-4": 1.0})
        earlier = _pair(out)
        rows = [{"predict": "x" * 1000}] * 100  # 100 KB: more than the disk holds
        if disk == "injected":
            real = Path.write_text

            def metrics_find_no_space(path, *args, **kwargs):
                if "metrics.json" in path.name:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real(path, *args, **kwargs)

            monkeypatch.setattr(Path, "write_text", metrics_find_no_space)
        with pytest.raises(ConfigError) as stopped:
            write_outputs(out, rows, {"bleu-4": 2.0})
        writing = out / ("metrics.json" if disk == "injected" else "generated_predictions.jsonl")
        assert str(stopped.value) == (f"no space left on device writing {writing}; no results were written ({out} "
                                      "is as it was); free space and run the evaluation again")
        with pytest.raises(ConfigError, match="^no space left on device writing "):
            write_outputs(folder / "new", rows, {})
        monkeypatch.undo()
        assert not (folder / "new").exists()  # a folder made for the results goes again
        assert _pair(out) == earlier  # the new predictions never sit beside the old metrics
        assert sorted(p.name for p in out.iterdir()) == ["generated_predictions.jsonl", "metrics.json"]


def test_an_empty_prefix_checkpoint_names_the_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for value in ("", " "):
        with pytest.raises(ConfigError) as err:
            resolve_checkpoint(value)
        assert str(err.value) == ("prefix_checkpoint is empty; expected a checkpoint-N folder or a run folder (its "
                                  "latest checkpoint)")
    with pytest.raises(ConfigError, match=r"^--prefix-checkpoint is empty; "):
        resolve_checkpoint("", key="--prefix-checkpoint")
    proc = evaluate_py("prefix_checkpoint=")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("error: prefix_checkpoint is empty; expected a checkpoint-N folder "
                                                    "or a run folder (its latest checkpoint)")


def test_a_folder_or_empty_test_file_is_named_as_such(trained, monkeypatch):
    monkeypatch.chdir(ROOT)
    base = [f"prefix_checkpoint={trained / 'run'}", f"output_dir={trained / 'not-made'}"]
    with pytest.raises(ConfigError, match=r"^data.test_file=data: is a folder, expected a .json, .jsonl or .csv file$"):
        run(compose_evaluate([*base, "data.test_file=data"]))
    with pytest.raises(ConfigError, match=r"^data.test_file is empty: expected a .json, .jsonl or .csv file$"):
        run(compose_evaluate([*base, "data.test_file="]))
    assert not (trained / "not-made").exists()  # refused before the output folder is made


def test_a_prefix_that_does_not_fit_names_every_mismatched_key_in_the_first_line(tmp_path):
    from ptuning.build import load_model
    from ptuning.checkpoint import export_original, load_prefix, prefix_metadata, save_checkpoint
    from ptuning.config import ModelConfig
    from ptuning.weights import CheckpointError

    projected = load_model(ModelConfig(pre_seq_len=16, prefix_projection=True))
    ours = save_checkpoint(tmp_path / "run", 1, projected, prefix_metadata(projected, "builtin:tiny-chatglm"))
    original = tmp_path / "original"
    export_original(ours, original)
    (original / "prefix_config.json").unlink()  # the original script's checkpoints record nothing: read the tensors
    plain = load_model(ModelConfig(pre_seq_len=8))
    for checkpoint in (ours, original):
        with pytest.raises(CheckpointError) as err:
            load_prefix(plain, checkpoint)
        assert str(err.value) == (
            f"{checkpoint}: the prefix was trained with pre_seq_len=16, prefix_projection=true but the model has "
            "pre_seq_len=8, prefix_projection=false (set model.pre_seq_len=16 model.prefix_projection=true to load it)")
    # and the other way round
    checkpoint = save_checkpoint(tmp_path / "plain", 1, plain, prefix_metadata(plain, "builtin:tiny-chatglm"))
    with pytest.raises(CheckpointError, match=r"trained with pre_seq_len=8, prefix_projection=false but the model has "
                                              r"pre_seq_len=16, prefix_projection=true \(set model.pre_seq_len=8 "
                                              r"model.prefix_projection=false to load it\)$"):
        load_prefix(projected, checkpoint)


def test_evaluation_renders_prompts_as_the_checkpoint_records_or_refuses_naming_the_key(trained, tmp_path):
    rows = [json.loads(line) for line in DEV.read_text(encoding="utf-8").splitlines()[:16]]
    chat = tmp_path / "chat.json"
    chat.write_text("".join(json.dumps({"prompt": r["content"], "response": r["summary"],
                                        "history": [["你好", "你好！"]] if i % 2 else []}, ensure_ascii=False) + "\n"
                            for i, r in enumerate(rows)), encoding="utf-8")
    reset_accelerate()
    with_history = train_run(to_object(compose_train([
        "data=chat", f"data.train_file={chat}", f"data.validation_file={chat}", f"data.cache_dir={tmp_path / 'cache'}",
        f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.save_steps=2", "train.eval_steps=null",
        "train.eval_generation=false", "train.eval_before_training=false", "train.plot=false"]))).checkpoint
    columns = [f"data.test_file={chat}", "data.prompt_column=prompt", "data.response_column=response",
               f"data.cache_dir={tmp_path / 'cache'}", "data.max_eval_samples=2", "generation.max_new_tokens=2"]
    with pytest.raises(ConfigError) as err:  # the history would be dropped without a word
        run(compose_evaluate([f"prefix_checkpoint={with_history}", f"output_dir={tmp_path / 'a'}", *columns]))
    assert str(err.value) == (
        f"{with_history} was trained on chat prompts with earlier turns (prompt_format chat in its prefix_config.json) "
        "but data.history_column is not set, so evaluation would leave the rows' earlier turns out: set "
        "data.history_column=history (what its run used)")
    reset_accelerate()
    metrics = run(compose_evaluate([f"prefix_checkpoint={with_history}", f"output_dir={tmp_path / 'b'}", *columns,
                                    "data.history_column=history"]))
    assert metrics["num_samples"] == 2
    # a prefix trained on plain rows is not evaluated on chat prompts either
    plain = trained / "run" / "checkpoint-6"
    with pytest.raises(ConfigError) as err:
        run(compose_evaluate([f"prefix_checkpoint={plain}", f"output_dir={tmp_path / 'c'}", *columns,
                              "data.history_column=history"]))
    assert str(err.value) == (
        f"{plain} was trained on plain prompt -> response rows (prompt_format plain in its prefix_config.json) but "
        "data.history_column=history renders chat prompts: leave data.history_column unset")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()
