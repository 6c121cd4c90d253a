"""``benchmarks/bench_6b_cpu.py`` at reduced sizes: the checkpoint it writes (the original layout), one full run
of the script, its refusals, its cleanup on Ctrl-C, and the property it checks at full size: loading a sharded
checkpoint holds the weights once (the peak RSS of a fresh process rises by the weights and one shard)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from .common import ROOT

SCRIPT = ROOT / "benchmarks" / "bench_6b_cpu.py"
TINY = ["--layers", "1", "--hidden", "64", "--heads", "4", "--inner", "256", "--vocab", "1000"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_6b_cpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("chatglm6b-bench-"))


def test_real_shape_sizes_and_shards(bench):
    shape = dict(bench.REAL)
    assert bench.checkpoint_bytes(shape) == pytest.approx(12.49 * 2**30, rel=1e-3)  # "about 12.5 GB"
    plan = bench.shard_plan(shape)
    assert len(plan) == 8
    sizes = [sum(2 * bench.numel(d) for _, d in group) for group in plan]
    assert max(sizes) < 2 * 2**30 and min(sizes) > 1.4 * 2**30
    keys = [k for group in plan for k, _ in group]
    assert keys[0] == "transformer.word_embeddings.weight" and keys[-1] == "lm_head.weight"
    assert len(keys) == 2 + 28 * 13 + 2 and len(set(keys)) == len(keys)


def test_written_checkpoint_has_the_original_layout_and_loads(bench, tmp_path):
    from ptuning.build import load
    from ptuning.config import ModelConfig
    from ptuning.weights import read_weights

    shape = dict(num_layers=2, hidden_size=64, num_attention_heads=4, inner_hidden_size=256, vocab_size=1000)
    total = bench.write_checkpoint(tmp_path, shape)
    names = sorted(p.name for p in tmp_path.glob("pytorch_model-*.bin"))
    assert names == [f"pytorch_model-{i:05d}-of-00008.bin" for i in range(1, 9)]
    index = json.loads((tmp_path / "pytorch_model.bin.index.json").read_text())
    assert index["metadata"]["total_size"] == total == bench.checkpoint_bytes(shape)
    assert set(index["weight_map"]) == {k for k, _ in bench.checkpoint_keys(shape)}
    shard = read_weights(tmp_path / names[0])
    assert all(t.dtype == torch.float16 for t in shard.values())
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["ChatGLMModel"] and "auto_map" in config  # as published; never run

    loaded = load(ModelConfig(path=str(tmp_path), dtype="bfloat16", pre_seq_len=4))
    tok = loaded.tokenizer
    assert (tok.gmask_token_id, tok.bos_token_id, tok.eos_token_id) == (
        config["gmask_token_id"], config["bos_token_id"], config["eos_token_id"])
    assert len(tok) <= shape["vocab_size"]
    weight = loaded.model.transformer.layers[1].mlp.dense_h_to_4h.weight
    source = read_weights(tmp_path / index["weight_map"]["transformer.layers.1.mlp.dense_h_to_4h.weight"])
    assert weight.dtype == torch.bfloat16
    assert torch.equal(weight, source["transformer.layers.1.mlp.dense_h_to_4h.weight"].to(torch.bfloat16))


def test_real_vocabulary_puts_the_specials_at_the_real_ids(bench, tmp_path):
    from ptuning.models.chatglm.tokenizer import ChatGLMTokenizer

    bench.write_tokenizer(tmp_path, 130528)
    tok = ChatGLMTokenizer.from_pretrained(str(tmp_path))
    assert (tok.mask_token_id, tok.gmask_token_id, tok.bos_token_id, tok.eos_token_id) == (130000, 130001, 130004, 130005)
    assert len(tok) == 130008
    ids = tok.convert_tokens_to_ids(tok.tokenize("这件白色纯棉毛衣，七分袖露出手腕。"))
    assert ids and max(ids) < 990  # text comes from the learned pieces; the fillers are never produced


def test_reduced_size_run_measures_both_settings_and_removes_its_folder(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--tmpdir", str(tmp_path), "--json", str(out)],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert leftovers(tmp_path) == []
    result = json.loads(out.read_text())
    assert [r["bits"] for r in result["runs"]] == [0, 4]
    for run in result["runs"]:
        assert run["train_row"] == {"tokens": 128, "prompt_tokens": 64, "targets": 64}
        assert len(run["step_s"]) == 2 and all(s > 0 for s in run["step_s"])
        assert run["new_tokens"] == 16 and run["prompt_tokens"] == 64
        assert 0 < run["prefill_s"] < run["generate_s"] and run["decode_tokens_per_s"] > 0
        assert run["peak_rss"] >= run["peak_rss_train"] >= run["peak_rss_load"] > 0
        assert run["peak_rss"] <= result["rss_bound"]
    assert result["runs"][1]["weight_bytes"] < result["runs"][0]["weight_bytes"]  # NF4 block linears
    assert "| 4 (NF4) |" in proc.stdout and "| 0 (bfloat16) |" in proc.stdout


def test_ctrl_c_removes_the_temporary_checkpoint(tmp_path):
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *TINY, "--tmpdir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT,
                            # Ctrl-C reaches it as a user's would, also when the suite itself runs in the
                            # background of a shell (which starts background jobs with SIGINT ignored)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in proc.stderr:
            if line.startswith("measuring model.quantization_bit=0"):
                break
        assert len(leftovers(tmp_path)) == 1  # the checkpoint is there while a run measures
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert leftovers(tmp_path) == []


def test_too_little_disk_or_memory_is_refused_before_writing(bench, tmp_path, monkeypatch, capsys):
    class Usage:
        free = 5 * 10**9

    monkeypatch.setattr(bench.shutil, "disk_usage", lambda path: Usage)
    assert bench.main(["--tmpdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "5.0 GB free, the checkpoint needs 13.4 GB" in err and "--tmpdir" in err
    Usage.free = 10**12
    monkeypatch.setattr(bench, "available_memory", lambda: 4 * 2**30)
    assert bench.main(["--tmpdir", str(tmp_path)]) == 2
    assert "4.0 GiB of memory available" in capsys.readouterr().err
    assert leftovers(tmp_path) == []


LOAD_CHILD = textwrap.dedent(
    """
    import json, sys, torch
    sys.path.insert(0, sys.argv[2])
    import bench_6b_cpu as bench
    from ptuning.models.chatglm import ChatGLMForConditionalGeneration

    before, _ = bench.rss_now()
    exact = bench.reset_peak_rss()
    model = ChatGLMForConditionalGeneration.from_pretrained(sys.argv[1], dtype=torch.bfloat16, pre_seq_len=4)
    after, peak = bench.rss_now()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"exact": exact, "before": before, "after": after, "peak": peak, "weights": weights}))
    """
)


def test_loading_a_sharded_checkpoint_holds_the_weights_once(bench, tmp_path):
    """The no-double-copy property of the full-size run, at 320 MB: float16 shards read as bfloat16. The
    embedding and lm_head shards (134 MB each) are large next to the weights, as at full size (up to 1.9 GB)."""
    from ptuning.weights import CONVERT_SLICE_BYTES

    shape = dict(num_layers=2, hidden_size=1024, num_attention_heads=8, inner_hidden_size=4096, vocab_size=65536)
    bench.write_checkpoint(tmp_path, shape)
    largest_shard = max(p.stat().st_size for p in tmp_path.glob("pytorch_model-*.bin"))
    proc = subprocess.run([sys.executable, "-c", LOAD_CHILD, str(tmp_path), str(SCRIPT.parent)],
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    if not r["exact"]:
        pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
    rise = r["peak"] - r["before"]
    # the bfloat16 weights, a slice being converted and 5% for the runtime: neither a second copy of the
    # weights nor a whole shard's file pages next to their converted copy
    assert largest_shard > 0.3 * r["weights"]
    assert r["weights"] * 0.9 < rise <= r["weights"] * 1.05 + 2 * CONVERT_SLICE_BYTES
    assert r["after"] - r["before"] <= r["weights"] * 1.05
