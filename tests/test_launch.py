"""Every launch file says how to start it and starts what it says (the CPU-runnable ones are launched in
test_distributed.py); a launch that would start another number of processes than it asks for stops at once."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from ptuning.distributed import LaunchError, check_launch

from .common import ROOT

LAUNCH = ROOT / "launch" / "accelerate"
# what each file's comment promises: its process count (without --num_processes) and where they run
PROMISES = {
    "cpu_2proc.yaml": (2, "Two processes on the CPU"),
    "single_gpu.yaml": (1, "One process on GPU 0"),
    "multi_gpu.yaml": (8, "one process per GPU"),
    "deepspeed_zero2.yaml": (2, "DeepSpeed ZeRO-2, one process per GPU (2 here"),
    "deepspeed_zero3.yaml": (2, "DeepSpeed ZeRO-3, one process per GPU (2 here"),
    "fsdp2.yaml": (2, "FSDP2 (PyTorch's fully_shard), one process per GPU (2 here"),
}


def test_every_launch_file_is_known_and_shows_its_own_command():
    assert sorted(p.name for p in LAUNCH.glob("*.yaml")) == sorted(PROMISES)
    for name, (processes, promise) in PROMISES.items():
        text = (LAUNCH / name).read_text()
        assert promise in text.splitlines()[0], name
        assert f"accelerate launch --config_file launch/accelerate/{name}" in text, name
        config = yaml.safe_load(text)
        assert config["num_processes"] == processes, name
        if config["distributed_type"] == "DEEPSPEED":
            assert (ROOT / config["deepspeed_config"]["deepspeed_config_file"]).is_file(), name


def test_the_cpu_launch_file_starts_its_processes_through_torchrun_with_the_gpus_hidden():
    config = yaml.safe_load((LAUNCH / "cpu_2proc.yaml").read_text())
    # accelerate's MULTI_CPU (and use_cpu) start one process without mpirun; a multi-GPU launch starts them all
    assert (config["distributed_type"], config["use_cpu"], config["gpu_ids"]) == ("MULTI_GPU", False, "-1,-1")


def test_a_cpu_launch_that_starts_one_of_several_processes_is_refused():
    # what `accelerate launch` with distributed_type MULTI_CPU, num_processes 2 and no mpirun hands its one process
    alone = {"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    with pytest.raises(LaunchError, match=r"^accelerate started 1 process although its config asks for several: "
                                          r"a CPU config \(distributed_type: MULTI_CPU, or --cpu\) starts them only "
                                          r"through mpirun .*launch/accelerate/cpu_2proc.yaml"):
        check_launch(alone)
    check_launch({**alone, "PMI_SIZE": "2"})  # started by mpirun: fine
    check_launch({"ACCELERATE_USE_CPU": "True"})  # one process asked for
    check_launch({})  # python train.py


def test_a_multi_cpu_config_without_mpirun_stops_before_training(tmp_path):
    config = tmp_path / "multi_cpu.yaml"
    config.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_CPU\nnum_processes: 2\n"
                      "num_machines: 1\nmachine_rank: 0\nmixed_precision: 'no'\nuse_cpu: true\n")
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "train.py",
         f"train.output_dir={tmp_path / 'out'}", "train.max_steps=1"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    assert "accelerate started 1 process although its config asks for several" in proc.stderr, proc.stderr[-2000:]
    assert "training " not in proc.stdout and not (tmp_path / "out").exists()


def test_the_fsdp2_launch_file_shards_each_layer_and_leaves_checkpointing_to_the_model():
    config = yaml.safe_load((LAUNCH / "fsdp2.yaml").read_text())
    fsdp = config["fsdp_config"]
    assert (config["distributed_type"], fsdp["fsdp_version"], fsdp["fsdp_auto_wrap_policy"]) == (
        "FSDP", 2, "TRANSFORMER_BASED_WRAP")
    # no class names: each family's own _no_split_modules (its decoder layer) are the units
    assert "fsdp_transformer_layer_cls_to_wrap" not in fsdp
    assert fsdp["fsdp_activation_checkpointing"] is False  # model.gradient_checkpointing does it


def test_fsdp_version_1_is_refused_before_anything_runs():
    with pytest.raises(LaunchError, match=r"^FSDP version 1 is not supported: set fsdp_version: 2 in the accelerate "
                                          r"config \(launch/accelerate/fsdp2.yaml\)$"):
        check_launch({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"})
    check_launch({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"})
