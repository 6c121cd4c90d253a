"""ChatGLM2/3 (GlmForCausalLM with the prefix attention) under DeepSpeed ZeRO-3 and FSDP2 on 2 processes gives
the same prefix as one process with the same global batch (gloo on CPU), and resumes exactly."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch

from .common import ROOT
from .test_distributed import ACCELERATE, free_port, launch, max_diff, prefix

pytestmark = pytest.mark.multiproc

MODEL = ["model=tiny_chatglm2", "model.pre_seq_len=8"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single-glm2")
    launch([sys.executable], out, *MODEL, "train.per_device_batch_size=8")
    return out


def test_deepspeed_zero3_equals_one_process_and_resumes_exactly(single, tmp_path):
    config = ROOT / "launch" / "accelerate" / "deepspeed_zero3.yaml"
    args = [*ACCELERATE, "--config_file", str(config), "--main_process_port", str(free_port())]
    proc = launch(args, tmp_path / "zero3", *MODEL, "train.per_device_batch_size=4")
    assert "on 2 process(es)" in proc.stdout
    one, zero3 = prefix(single), prefix(tmp_path / "zero3")
    assert set(one) == {"prefix_encoder.embedding.weight"}
    assert max_diff(one, zero3) <= 1e-5
    # the prefix did move: the comparison is not between two untouched initialisations
    assert max_diff(prefix(single, step=2), one) > 1e-4
    shutil.copytree(tmp_path / "zero3" / "checkpoint-2", tmp_path / "cut" / "checkpoint-2")
    proc = launch(args, tmp_path / "cut", *MODEL, "train.per_device_batch_size=4", "train.resume_from=latest")
    assert "resumed from" in proc.stdout
    a, b = prefix(tmp_path / "zero3"), prefix(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp2_with_gradient_checkpointing_equals_one_process(single, tmp_path):
    config = ROOT / "launch" / "accelerate" / "fsdp2.yaml"
    args = [*ACCELERATE, "--config_file", str(config), "--main_process_port", str(free_port())]
    proc = launch(args, tmp_path, *MODEL, "train.per_device_batch_size=4", "model.gradient_checkpointing=true")
    assert "in these units: GlmForCausalLMWithPrefix, Embedding, 4 GlmDecoderLayer, GlmRMSNorm, Linear, " \
           "PrefixEncoder" in proc.stdout
    # float32 reduction order: 6.9e-6 from one process (measured)
    assert max_diff(prefix(single), prefix(tmp_path)) <= 1e-5
