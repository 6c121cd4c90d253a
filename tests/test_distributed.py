"""Several processes give the same prefix as one process with the same global batch (gloo on CPU):
data parallel, two nodes on loopback, DeepSpeed ZeRO-2 and ZeRO-3, FSDP2, packed rows; every launch file in
launch/accelerate starts the processes it says (those that can run on a CPU are launched here)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from .common import ROOT, small_disk
from .test_run_folder import holder

pytestmark = pytest.mark.multiproc

FAST = [
    "data.max_train_samples=64", "train.max_steps=4", "train.eval_generation=false",
    "train.eval_before_training=false", "train.plot=false", "train.logging_steps=1", "train.save_steps=2",
    "train.eval_steps=null", "model.prefix_dropout=0", "train.save_total_limit=null",
]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env():
    out = dict(os.environ)
    out["OMP_NUM_THREADS"] = "1"
    return out


def launch(args, out_dir, *overrides, check=True):
    cmd = [*args, "train.py", *FAST, f"train.output_dir={out_dir}", f"data.cache_dir={out_dir}/.cache", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env())
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def prefix(out_dir, step=4):
    return load_file(str(out_dir / f"checkpoint-{step}" / "prefix.safetensors"))


def losses(out_dir) -> list[float]:
    """The logged loss of every step (train.logging_steps=1), in order."""
    rows = [json.loads(line) for line in (out_dir / "train_log.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in rows if "loss" in r]


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    launch([sys.executable], out, "train.per_device_batch_size=8")
    return out


def launch_file(name: str, *flags: str) -> list[str]:
    return [*ACCELERATE, "--config_file", str(ROOT / "launch" / "accelerate" / name), *flags,
            "--main_process_port", str(free_port())]


def test_the_multi_gpu_launch_file_with_two_processes_equals_one(single, tmp_path):
    proc = launch(launch_file("multi_gpu.yaml", "--num_processes", "2"), tmp_path, "train.per_device_batch_size=4")
    assert "on 2 process(es)" in proc.stdout
    assert max_diff(prefix(single), prefix(tmp_path)) <= 1e-5
    # only the main process writes files
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "checkpoint-2", "checkpoint-4", "run_config.json", "train_log.jsonl"]


def test_the_cpu_launch_file_starts_two_processes_equal_to_one(single, tmp_path):
    proc = launch(launch_file("cpu_2proc.yaml"), tmp_path, "train.per_device_batch_size=4")
    assert "on 2 process(es)" in proc.stdout
    assert max_diff(prefix(single), prefix(tmp_path)) <= 1e-5


def test_the_single_gpu_launch_file_on_a_cpu_is_one_process_equal_to_python_train(single, tmp_path):
    proc = launch(launch_file("single_gpu.yaml"), tmp_path, "train.per_device_batch_size=8")
    assert "on 1 process(es)" in proc.stdout
    a, b = prefix(single), prefix(tmp_path)
    assert all(torch.equal(a[k], b[k]) for k in a)


PACKED = ["data.packing=true", "data.pack_length=256"]


def test_packed_rows_on_two_processes_equal_one_process_with_ddp_and_fsdp2(tmp_path):
    launch([sys.executable], tmp_path / "one", "train.per_device_batch_size=2", *PACKED)
    proc = launch(launch_file("cpu_2proc.yaml"), tmp_path / "two", "train.per_device_batch_size=1", *PACKED)
    assert "on 2 process(es)" in proc.stdout and "packed sequences of 256 tokens" in proc.stdout
    assert max_diff(prefix(tmp_path / "one"), prefix(tmp_path / "two")) <= 1e-5
    proc = launch(launch_file("fsdp2.yaml"), tmp_path / "fsdp2", "train.per_device_batch_size=1", *PACKED,
                  "model.gradient_checkpointing=true")
    assert "FSDP2 shards the model" in proc.stdout and "packed sequences of 256 tokens" in proc.stdout
    assert max_diff(prefix(tmp_path / "one"), prefix(tmp_path / "fsdp2")) <= 1e-5


def test_fsdp2_shards_the_backbone_equals_one_process_and_resumes_exactly(single, tmp_path):
    """accelerate's FSDP2 shards each GLMBlock; the float32 prefix encoder is its own unit; gradient checkpointing
    on. The checkpoint holds the whole prefix and the whole optimizer state, as one process writes them."""
    args = launch_file("fsdp2.yaml")
    proc = launch(args, tmp_path / "full", "train.per_device_batch_size=4", "model.gradient_checkpointing=true")
    assert "on 2 process(es)" in proc.stdout
    assert ("FSDP2 shards the model over 2 process(es) in these units: ChatGLMForConditionalGeneration, Embedding, "
            "4 GLMBlock, LayerNorm, PrefixEncoder, Linear") in proc.stdout
    # float32 reduction order: 2.2e-6 from one process (measured)
    assert max_diff(prefix(single), prefix(tmp_path / "full")) <= 1e-5
    one, two = losses(single), losses(tmp_path / "full")
    assert len(one) == 4 and max(abs(a - b) for a, b in zip(one, two, strict=True)) <= 1e-5, (one, two)
    assert {k: tuple(v.shape) for k, v in prefix(tmp_path / "full").items()} == {
        "transformer.prefix_encoder.embedding.weight": (16, 1024)}
    # the whole optimizer state, as one process holds it (not a shard)
    state, alone = (torch.load(out / "checkpoint-4" / "training_state.pt", weights_only=True)
                    for out in (tmp_path / "full", single))
    assert state["world_size"] == 2 and state["optimizer"]["state"].keys() == {0}
    for name, value in alone["optimizer"]["state"][0].items():
        assert value.shape == state["optimizer"]["state"][0][name].shape, name
        assert torch.allclose(state["optimizer"]["state"][0][name], value, rtol=1e-3, atol=1e-9), name
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "cut" / "checkpoint-2")
    proc = launch(args, tmp_path / "cut", "train.per_device_batch_size=4", "model.gradient_checkpointing=true",
                  "train.resume_from=latest")
    assert "resumed from" in proc.stdout
    a, b = prefix(tmp_path / "full"), prefix(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")[2:]  # steps 3 and 4, bit for bit


def test_two_nodes_on_loopback_equal_one(single, tmp_path):
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [*ACCELERATE, "--multi_gpu", "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
             "--main_process_ip", "127.0.0.1", "--main_process_port", port, "train.py", *FAST,
             f"train.output_dir={tmp_path}", f"data.cache_dir={tmp_path}/.cache{rank}",
             "train.per_device_batch_size=4"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
        )
        for rank in (0, 1)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    assert max_diff(prefix(single), prefix(tmp_path)) <= 1e-5


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_equals_one_process_and_resumes_exactly(single, tmp_path, stage):
    args = launch_file(f"deepspeed_zero{stage}.yaml")
    proc = launch(args, tmp_path / "full", "train.per_device_batch_size=4")
    assert "on 2 process(es)" in proc.stdout
    # float32 reduction order: two processes and ZeRO-2 end 1.0e-6 from one process; ZeRO-3 gathers and
    # reduce-scatters partitioned parameters in its own order and ends 1.5e-5 away (4.5e-6 before the
    # 16-bit train-step work changed the block's rounding; the loss is not the cause, measured both ways)
    assert max_diff(prefix(single), prefix(tmp_path / "full")) <= (1e-5 if stage == 2 else 2e-5)
    # resume from checkpoint-2 of the same run: bitwise the same final prefix
    shutil.copytree(tmp_path / "full" / "checkpoint-2", tmp_path / "cut" / "checkpoint-2")
    proc = launch(args, tmp_path / "cut", "train.per_device_batch_size=4", "train.resume_from=latest")
    assert "resumed from" in proc.stdout
    a, b = prefix(tmp_path / "full"), prefix(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_deepspeed_config_conflicting_with_training_keys_is_named(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 2, '
                  '"gradient_accumulation_steps": "auto", "train_batch_size": "auto", "gradient_clipping": "auto"}')
    cfg = tmp_path / "acc.yaml"
    cfg.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\n"
        f"deepspeed_config:\n  deepspeed_config_file: {ds}\n  zero3_init_flag: false\n"
        "num_processes: 2\nnum_machines: 1\nmachine_rank: 0\nuse_cpu: false\n"
    )
    proc = launch([*ACCELERATE, "--config_file", str(cfg), "--main_process_port", str(free_port())],
                  tmp_path / "out", "train.per_device_batch_size=4", check=False)
    assert proc.returncode != 0
    assert "train_micro_batch_size_per_gpu=2 conflicts with train.per_device_batch_size (4)" in proc.stderr


# ---- errors under accelerate launch: one line, one exit status ----


def assert_every_process_stopped_with_one_line(proc, line: str) -> None:
    """The error line once (the main process's), and every process exited 2 (the launcher's report lists each:
    none was stopped by its SIGTERM, none left waiting). The launcher then reports the failure in its own lines
    and exits 1: it does not pass its processes' status on."""
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert errors == [line], proc.stderr[-3000:]
    assert sorted(re.findall(r"^\s*exitcode\s*:\s*(-?\d+)", proc.stderr, re.M)) == ["2", "2"], proc.stderr[-3000:]
    # no traceback of the toolkit's code (the launcher's own, from a virtualenv inside the checkout, is its own)
    assert not re.search(r'File "' + re.escape(str(ROOT)) + r'/(?!\.venv/)', proc.stderr), proc.stderr[-3000:]
    assert proc.returncode == 1


def test_errors_under_accelerate_launch_are_one_line_and_every_process_exits_2(single, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "train_log.jsonl").write_text("my notes\n")
    # as docs/distributed.md launches: --quiet, and the launcher adds its table of failed processes, no traceback
    proc = launch(launch_file("cpu_2proc.yaml", "--quiet"), taken, "train.per_device_batch_size=4", check=False)
    assert_every_process_stopped_with_one_line(
        proc, f"error: train.output_dir={taken}: this run writes train_log.jsonl, but {taken}/train_log.jsonl is "
              "already there (no run recorded it) and a run replaces only its own files: move it, or choose "
              "another train.output_dir")
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # a folder another run holds: only the main process takes the lock, and every process stops with its line
    held = tmp_path / "held"
    other = holder(held)
    try:
        proc = launch(launch_file("cpu_2proc.yaml"), held, "train.per_device_batch_size=4", check=False)
    finally:
        other.kill()
        other.wait()
    line = [x for x in proc.stderr.splitlines() if x.startswith("error:")][:1]
    assert line and line[0].startswith(f"error: train.output_dir={held} is in use by another run (pid {other.pid} "), \
        proc.stderr[-3000:]
    assert_every_process_stopped_with_one_line(proc, line[0])
    assert sorted(p.name for p in held.iterdir()) == [".ptuning.lock"]  # the holder's; nothing written
    # evaluation alike: a metrics.json it did not write is never replaced
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.json").write_text("{}\n")
    proc = subprocess.run([*launch_file("cpu_2proc.yaml"), "evaluate.py", f"prefix_checkpoint={single / 'checkpoint-4'}",
                           f"output_dir={mine}", f"data.cache_dir={tmp_path / 'cache'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env())
    assert_every_process_stopped_with_one_line(
        proc, f"error: output_dir={mine}: metrics.json there was not written by evaluate.py and is never replaced; "
              "move it or choose another output_dir")


def test_fsdp_activation_checkpointing_with_gradient_checkpointing_is_one_line_under_accelerate_launch(tmp_path):
    config = tmp_path / "fsdp2_ac.yaml"
    text = (ROOT / "launch" / "accelerate" / "fsdp2.yaml").read_text()
    config.write_text(text.replace("fsdp_activation_checkpointing: false", "fsdp_activation_checkpointing: true"))
    args = [*ACCELERATE, "--config_file", str(config), "--quiet", "--main_process_port", str(free_port())]
    proc = launch(args, tmp_path / "run", "model.gradient_checkpointing=true", check=False)
    assert_every_process_stopped_with_one_line(
        proc, "error: fsdp_activation_checkpointing and model.gradient_checkpointing both checkpoint every layer: "
              "keep model.gradient_checkpointing and set fsdp_activation_checkpointing: false in the accelerate config")
    assert not (tmp_path / "run" / "run_config.json").exists()


def test_a_full_disk_under_accelerate_launch_stops_every_process_with_one_line(tmp_path):
    with small_disk(tmp_path / "disk", "300k") as disk:  # one checkpoint of the built-in model fits, not two
        out = disk / "run"
        cmd = [*launch_file("cpu_2proc.yaml"), "train.py", *FAST, "train.per_device_batch_size=4",
               f"train.output_dir={out}", f"data.cache_dir={tmp_path / 'cache'}"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env())
        assert_every_process_stopped_with_one_line(
            proc, f"error: no space left on device writing {out / 'checkpoint-4'}; the last complete checkpoint is "
                  f"{out / 'checkpoint-2'}; free space and continue with train.resume_from=auto")
        assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "run_config.json", "train_log.jsonl"]


# ---- faults found by trying the toolkit as a user would (one test per kind, named by item) ----

REPORTING = ["data.max_eval_samples=4", "train.eval_before_training=true", "train.eval_generation=true",
             "train.max_new_tokens=4", "train.eval_batch_size=4", "train.eval_steps=2", "train.logging_steps=2"]


def assert_only_the_main_process_reports(proc):
    out, bars = proc.stdout, proc.stderr.replace("\r", "\n")
    assert out.count("done: step 4, checkpoint ") == 1 and "checkpoint None" not in out, out
    assert out.count("base model (no prefix) -> tuned prefix on ") == 1 and out.count("base model (no prefix): eval loss ") == 1, out
    assert out.count("step 2: eval loss ") == 1, out
    assert out.count("training 16,384 of ") == 1, out
    # each progress bar is drawn once: the base model's and the tuned generation, and the training steps
    assert len(re.findall(r"^generate:\s+0%", bars, re.M)) == 2, bars[-3000:]
    assert len(re.findall(r"^train:\s+0%", bars, re.M)) == 1, bars[-3000:]


def test_two_processes_report_once(tmp_path):
    proc = launch([*ACCELERATE, "--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port())],
                  tmp_path, "train.per_device_batch_size=4", *REPORTING)
    assert "on 2 process(es)" in proc.stdout
    assert_only_the_main_process_reports(proc)


def test_zero3_reports_once_without_known_noise_and_refuses_generation_in_one_line(tmp_path):
    config = ROOT / "launch" / "accelerate" / "deepspeed_zero3.yaml"
    args = [*ACCELERATE, "--config_file", str(config), "--main_process_port", str(free_port())]
    # generation during training: each process decodes its own number of steps, which ZeRO-3's gathers cannot
    # follow (gloo failed on mismatched sizes, or a process waited for ever); refused before anything loads
    refused = launch(args, tmp_path / "generate", "train.per_device_batch_size=4", *REPORTING, check=False)
    assert_every_process_stopped_with_one_line(
        refused, "error: train.eval_generation=true and train.eval_before_training=true: generation during training "
                 "does not run under DeepSpeed ZeRO-3 (each process decodes its own number of steps; ZeRO-3 gathers "
                 "every layer with all processes); set train.eval_generation=false train.eval_before_training=false "
                 "and score the checkpoints with evaluate.py, or use ZeRO-2 or FSDP2 (launch/accelerate/fsdp2.yaml)")
    assert not (tmp_path / "generate" / "run_config.json").exists()
    args[-1] = str(free_port())
    proc = launch(args, tmp_path / "run", "train.per_device_batch_size=4", *REPORTING,
                  "train.eval_before_training=false", "train.eval_generation=false")
    out = proc.stdout
    assert out.count("done: step 4, checkpoint ") == 1 and out.count("step 2: eval loss ") == 1, out
    assert out.count("training 16,384 of ") == 1 and "base model" not in out, out
    assert len(re.findall(r"^train:\s+0%", proc.stderr.replace("\r", "\n"), re.M)) == 1, proc.stderr[-3000:]
    assert "FutureWarning" not in proc.stderr, proc.stderr[-3000:]
    # the processes of the run say nothing about the accelerator; `accelerate launch` itself imports DeepSpeed
    # before any of our code runs and may say it once
    assert (proc.stdout + proc.stderr).count("Setting accelerator to CPU") <= 1, proc.stdout
    # nor that DeepSpeed built its communication op (it printed that to stdout, where the results go, in every process)
    assert "built successfully" not in proc.stdout + proc.stderr, proc.stdout



def test_a_sweep_of_two_jobs_under_accelerate_launch_runs_both(tmp_path):
    # each job of a Hydra sweep runs in the same launched processes: the first must leave the process group usable
    cmd = [*launch_file("cpu_2proc.yaml"), str(ROOT / "train.py"), "-m", *FAST, "train.per_device_batch_size=4",
           f"data.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={tmp_path / 'sweep'}", "model.pre_seq_len=8,16"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: step 4, checkpoint ") == 2, proc.stdout
    shapes = [load_file(str(tmp_path / "sweep" / str(job) / "checkpoint-4" / "prefix.safetensors")) for job in (0, 1)]
    assert [next(iter(s.values())).shape[0] for s in shapes] == [8, 16]
