"""ChatGLM2/3 (GlmForCausalLM with the prefix attention) under DeepSpeed ZeRO-3 on 2 processes gives the same
prefix as one process with the same global batch (gloo on CPU), and resumes exactly."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch

from .common import ROOT
from .test_distributed import ACCELERATE, free_port, launch, max_diff, prefix

pytestmark = pytest.mark.multiproc

MODEL = ["model=tiny_chatglm2", "model.pre_seq_len=8"]


def test_deepspeed_zero3_equals_one_process_and_resumes_exactly(tmp_path):
    launch([sys.executable], tmp_path / "single", *MODEL, "train.per_device_batch_size=8")
    config = ROOT / "launch" / "accelerate" / "deepspeed_zero3.yaml"
    args = [*ACCELERATE, "--config_file", str(config), "--main_process_port", str(free_port())]
    proc = launch(args, tmp_path / "zero3", *MODEL, "train.per_device_batch_size=4")
    assert "on 2 process(es)" in proc.stdout
    single, zero3 = prefix(tmp_path / "single"), prefix(tmp_path / "zero3")
    assert set(single) == {"prefix_encoder.embedding.weight"}
    assert max_diff(single, zero3) <= 1e-5
    # the prefix did move: the comparison is not between two untouched initialisations
    assert max_diff(prefix(tmp_path / "single", step=2), single) > 1e-4
    shutil.copytree(tmp_path / "zero3" / "checkpoint-2", tmp_path / "cut" / "checkpoint-2")
    proc = launch(args, tmp_path / "cut", *MODEL, "train.per_device_batch_size=4", "train.resume_from=latest")
    assert "resumed from" in proc.stdout
    a, b = prefix(tmp_path / "zero3"), prefix(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
