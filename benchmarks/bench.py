"""Speed and memory of the P-Tuning v2 train step and of generation, each measured in a fresh process.

    python benchmarks/bench.py                 # CPU, the bench configuration; prints a table, writes JSON
    python benchmarks/bench.py --quick         # fewer repeats and a smaller scaling grid
    python benchmarks/bench.py --only generate --profile --compile   # generation alone, profiled, compiled too
    python benchmarks/bench.py --device cuda --gpu-shape   # the real shapes (see benchmarks/gpu.sh)
    python benchmarks/bench.py --smoke        # the --gpu-shape plan at a tiny shape on the CPU, FSDP2 on 2 processes

The bench configuration: ChatGLM-6B architecture with hidden 512, 8 heads, 4 layers, inner 2048, vocab
32000, pre_seq_len 32, random weights, frozen backbone. A train step is forward + backward + AdamW on the
prefix for a batch of 4 x 256 tokens (128 prompt tokens ending in [gMASK], 128 target tokens from <sop> to
<eop>, labels -100 on the prompt), run exactly as the training loop runs it.

Train rows report tokens/s, the achieved FLOP/s by the shared formula (``ptuning.perf``:
``4·N + 12·L·d·(S + P)`` per token) and its fraction of a large matmul's FLOP/s measured in the same
process with the same dtype and threads.

Generation (greedy, 64 new tokens after a 64-token prompt) is measured per dtype in one process: transformers'
``generate()`` and our decode loop (``ptuning.generation``, with the pre-packed linears that evaluation and chat
use), at batch 1 and 8, in turns, the best of the rounds each. Rates are new tokens / time of the whole call
(prefill included) and, for our loop, of the decode steps alone. The bound is streaming the weights once per
token: a large copy's bandwidth (measured in the same rounds) / weight bytes. ``--profile`` splits a decode
step into its linears alone, the bound and the rest, with torch.profiler's top operators.

``--gpu-shape`` measures two families at their real shapes, bf16 weights, P 128: ChatGLM-6B (our own model code)
and a transformers decoder shaped as Qwen3-8B (``Qwen3ForCausalLM`` with the prefix attention): the train step
at batch 16 x 128 and its memory at batch 1; rows of varied lengths (seeded, 32-128 tokens) padded to the
batch's longest against the same rows packed (``ptuning.data.packing``), at equal row tokens per step; greedy
decoding; and with several GPUs the train step under FSDP2 (``launch/accelerate/fsdp2.yaml``, all GPUs). Each
train row names the SDPA backend that ran (the ``aten::_scaled_dot_product_*`` ops torch.profiler recorded).

The float32 and bf16 train steps are measured side by side: ``--rounds`` alternating pairs of fresh
processes (float32, bf16, float32, ...), each the median of its own steps; the table gives the best and
the median round of each and their ratios, and the ratio to the original implementation's float32 step
(:data:`ORIGINAL_FP32_STEP_S`). The machine is shared, so single rounds are noisy: compare best with best.
A profile of the bf16 step on one thread (torch.profiler, op self-times; one thread, because two threads on
a busy machine mostly profile their waits for each other) splits it into matmuls, attention, the loss and
the rest, and gives the time its matmuls would take at the measured bf16 matmul peak.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ptuning.perf import BENCH_SHAPE  # noqa: E402

BENCH = dict(BENCH_SHAPE, max_sequence_length=4096)
GPU_SHAPE = dict(hidden_size=4096, num_attention_heads=32, num_layers=28, inner_hidden_size=16384,
                 vocab_size=130528, pre_seq_len=128, max_sequence_length=2048)
# a transformers decoder: Qwen3-8B's shape (grouped-query attention, 8 key/value heads, head_dim 128)
QWEN3_GPU_SHAPE = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                       num_hidden_layers=36, intermediate_size=12288, vocab_size=151936, pre_seq_len=128,
                       max_position_embeddings=4096)
QWEN3_BENCH = dict(hidden_size=512, num_attention_heads=8, num_key_value_heads=2, head_dim=64, num_hidden_layers=4,
                   intermediate_size=2048, vocab_size=32000, pre_seq_len=32, max_position_embeddings=4096)
# --smoke: every part of the --gpu-shape plan at a size a CPU runs in seconds
SMOKE = {"chatglm": dict(BENCH, hidden_size=64, num_attention_heads=4, num_layers=2, inner_hidden_size=256,
                         vocab_size=1000, pre_seq_len=8),
         "qwen3": dict(QWEN3_BENCH, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       num_hidden_layers=2, intermediate_size=256, vocab_size=1000, pre_seq_len=8)}
FAMILIES = {"chatglm": "ChatGLM-6B", "qwen3": "Qwen3-8B-shaped decoder"}
# The original ChatGLM-6B implementation's float32 train step on the bench configuration, from its own
# measurement on this 2-core machine (its remote code is never run here, so it is not re-measured).
ORIGINAL_FP32_STEP_S = (0.90, 0.94)
TARGET_SPEEDUP = 4.0  # bf16 step vs the original's float32 step


# ---------------------------------------------------------------- measurements (run in a child process)


def shape_of(args) -> dict:
    """The model shape a child measures: its family's at the bench size, the real one (``--gpu-shape``) or the
    smoke one (``--smoke``)."""
    if getattr(args, "smoke", False):
        return SMOKE[args.family]
    if args.family == "qwen3":
        return QWEN3_GPU_SHAPE if args.gpu_shape else QWEN3_BENCH
    return GPU_SHAPE if args.gpu_shape else BENCH


def build(shape: dict, device: str, dtype: str, prefix: int | None, family: str = "chatglm"):
    """A random model of ``family`` and ``shape`` (ChatGLM-6B's architecture, or Qwen3's through transformers with
    the prefix attention), made on ``device`` directly in ``dtype`` (the real shape in float32 first would take
    ~27 GB on the GPU for a moment), the prefix float32 and alone trainable."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from ptuning.models.chatglm import ChatGLMForConditionalGeneration, tiny_config
    from ptuning.models.hf import attach_prefix, prefix_shape
    from ptuning.prefix import cast_backbone, mark_only_prefix_trainable

    torch.manual_seed(0)
    if family == "qwen3":
        cfg = Qwen3Config(**{k: v for k, v in shape.items() if k != "pre_seq_len"}, tie_word_embeddings=False)
        cfg._attn_implementation = "sdpa"
    else:
        cfg = tiny_config(**{**shape, "pre_seq_len": prefix or None})
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            model = (Qwen3ForCausalLM if family == "qwen3" else ChatGLMForConditionalGeneration)(cfg)
    finally:
        torch.set_default_dtype(previous)
    if family == "qwen3":
        attach_prefix(model, prefix_shape(cfg, prefix or 0))
        cfg.pre_seq_len = prefix or 0
    cast_backbone(model, getattr(torch, dtype))  # the prefix encoder (made in dtype too) back to float32
    if prefix:
        mark_only_prefix_trainable(model)
    else:
        model.requires_grad_(False)
    return model, cfg


def training_rows(cfg, lengths: list[int], seed: int = 0) -> list[dict]:
    """Random training rows of ``lengths`` tokens: a prompt (the first half; ChatGLM-6B's ends in ``[gMASK]
    <sop>``) whose labels are -100, and a target ending in the end token."""
    import torch

    g = torch.Generator().manual_seed(seed)
    chatglm = hasattr(cfg, "gmask_token_id")
    rows = []
    for length in lengths:
        prompt = length // 2
        ids = torch.randint(5, min(cfg.vocab_size, 30000) - 10, (length,), generator=g)
        if chatglm:
            ids[prompt - 1], ids[prompt] = cfg.gmask_token_id, cfg.bos_token_id
        ids[-1] = cfg.eos_token_id if chatglm else 2
        labels = ids.clone()
        labels[:prompt] = -100
        rows.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    return rows


def batch(cfg, batch_size: int, seq: int, device: str):
    import torch

    rows = training_rows(cfg, [seq] * batch_size)
    ids = torch.tensor([r["input_ids"] for r in rows])
    labels = torch.tensor([r["labels"] for r in rows])
    return ids.to(device), labels.to(device)


def varied_lengths(batch_size: int, seq: int, seed: int = 0) -> list[int]:
    """``batch_size`` row lengths, seeded, uniform over ``seq // 4 .. seq``."""
    import random

    draw = random.Random(seed)
    return [draw.randint(seq // 4, seq) for _ in range(batch_size)]


def varied_batch(cfg, args) -> tuple[dict, int]:
    """``args.batch`` rows of varied lengths (:func:`varied_lengths`) as the training loop batches them: right-padded
    to the longest, or (``args.pack``) packed into rows of ``args.pack`` tokens. Returns the batch and its row
    tokens (padding excluded)."""
    from ptuning.data import PackedRows, TrainingCollator

    lengths = varied_lengths(args.batch, args.seq)
    rows = training_rows(cfg, lengths)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    if args.pack:
        packed = PackedRows(rows, lengths, args.pack, seed=0)
        out = TrainingCollator(pad_token_id=pad, pack_length=args.pack)([packed[i] for i in range(len(packed))])
    else:
        out = TrainingCollator(pad_token_id=pad)(rows)
    return {k: v.to(args.device) for k, v in out.items()}, sum(lengths)


def sync(device: str):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_step(args, model=None, cfg=None, backward=None, optimizer=None):
    """The model, its config, one train step (forward + backward + AdamW on the prefix) as a closure, and the row
    tokens of its batch (padding excluded). ``model`` (with ``cfg``), ``backward`` and ``optimizer``: a model
    already prepared, and how its loss is backpropagated and its optimizer made (FSDP2: accelerate's)."""
    import torch

    from ptuning.training.loop import model_inputs, token_loss_sum

    shape = shape_of(args)
    prefix = shape["pre_seq_len"] if args.prefix is None else args.prefix
    if model is None:
        model, cfg = build(shape, args.device, args.dtype, prefix, args.family)
    model.train()
    if args.checkpointing:
        model.activation_checkpointing_enable()
    if args.varied:
        inputs, tokens = varied_batch(cfg, args)
        ids, labels = inputs["input_ids"], inputs["labels"]
        inputs = model_inputs(inputs, args.device)
    else:
        (ids, labels), inputs, tokens = batch(cfg, args.batch, args.seq, args.device), {}, args.batch * args.seq
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer is None:
        optimizer = torch.optim.AdamW(params, lr=1e-3) if params else None
    backward = backward or (lambda loss: loss.backward())
    autocast = torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.autocast)

    def step():
        with autocast:
            if prefix:
                loss = token_loss_sum(model, ids, labels, **inputs)  # the training loop's own call
            else:  # no prefix: backward to the activations only, the same work the formula counts
                embeds = model.transformer.word_embeddings(ids).detach().requires_grad_()
                loss = model(inputs_embeds=embeds, input_ids=ids, labels=labels, loss_reduction="sum",
                             return_logits=False, use_cache=False).loss
        backward(loss)
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return model, cfg, step, tokens


def attention_kernels(step, device: str) -> list[str]:
    """The SDPA backends one call of ``step`` ran: the ``aten::_scaled_dot_product_*`` ops torch.profiler records
    (``..._flash_attention``, ``..._efficient_attention``, ``..._cudnn_attention``, ``..._attention_math``; on a CPU
    ``..._flash_attention_for_cpu``), by name, with how many calls."""
    from collections import Counter

    from torch.profiler import profile

    with profile(activities=profile_activities(device)) as prof:
        step()
        sync(device)
    calls = Counter(e.name for e in prof.events() if e.name.startswith("aten::_scaled_dot_product"))
    return [f"{name.removeprefix('aten::_scaled_dot_product_')} x{n}" for name, n in sorted(calls.items())]


def time_steps(step, args) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of ``args.repeats`` calls of ``step`` after ``args.warmup``; peak memory counted from
    the first timed one."""
    import torch

    for _ in range(args.warmup):
        step()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times, cpu_times = [], []
    for _ in range(args.repeats):
        sync(args.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        sync(args.device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return times, cpu_times


def measure_train(args) -> dict:
    """One train step's time, row tokens/s, achieved FLOP/s (of the row tokens, at their mean length) against the
    measured matmul peak of the compute dtype, peak memory, and the SDPA backends it ran."""
    import torch

    from ptuning.perf import matmul_peak_flops, peak_memory_mib, train_flops_per_token

    model, cfg, step, tokens = train_step(args)
    prefix = cfg.pre_seq_len or 0
    times, cpu_times = time_steps(step, args)
    step_s = statistics.median(times)
    flops = train_flops_per_token(cfg, round(tokens / args.batch), prefix) * tokens / step_s
    peak_dtype = torch.bfloat16 if (args.autocast or args.dtype == "bfloat16") else torch.float32
    peak = matmul_peak_flops(peak_dtype, device=args.device)
    return {"step_s": step_s, "best_step_s": min(times), "cpu_s": statistics.median(cpu_times),
            "threads": torch.get_num_threads(), "tokens_per_s": tokens / step_s, "achieved_flops": flops,
            "peak_flops": peak, "peak_fraction": flops / peak, "peak_memory_mib": peak_memory_mib(args.device),
            "row_tokens": tokens, "attention": attention_kernels(step, args.device)}


def measure_train_fsdp2(args) -> dict:
    """The train step under FSDP2 on every process of an ``accelerate launch --config_file
    launch/accelerate/fsdp2.yaml`` (the toolkit's own set-up: ``ptuning.distributed``); each process its own
    batch. The main process prints global tokens/s, the fraction of the processes' summed matmul peak, and the
    largest process's peak memory."""
    import torch

    from ptuning.distributed import shard_apart, start
    from ptuning.perf import matmul_peak_flops, peak_memory_mib, train_flops_per_token
    from ptuning.prefix import prefix_module_name

    accelerator, comm = start(mixed_precision="no")
    args.device = str(accelerator.device)
    shape = shape_of(args)
    model, cfg = build(shape, args.device, args.dtype, shape["pre_seq_len"], args.family)
    if args.checkpointing:
        model.activation_checkpointing_enable()
    shard_apart(accelerator, model.get_submodule(prefix_module_name(model)))
    params = [p for p in model.parameters() if p.requires_grad]
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(params, lr=1e-3))
    _, _, step, tokens = train_step(args, model, cfg, accelerator.backward, optimizer)
    times, _ = time_steps(step, args)
    step_s = max(comm.gather_objects([statistics.median(times)]))  # the slowest process sets the pace
    memory = max(comm.gather_objects([peak_memory_mib(args.device)]))
    kernels = attention_kernels(step, args.device)  # a sharded step: every process runs it
    world = comm.num_processes
    flops = train_flops_per_token(cfg, round(tokens / args.batch), cfg.pre_seq_len) * tokens * world / step_s
    peak = matmul_peak_flops(torch.bfloat16 if args.dtype == "bfloat16" else torch.float32, device=args.device)
    if not comm.is_main_process:
        return None  # only the main process reports
    return {"step_s": step_s, "processes": world, "tokens_per_s": tokens * world / step_s, "achieved_flops": flops,
            "peak_flops": peak * world, "peak_fraction": flops / (peak * world), "peak_memory_mib": memory,
            "row_tokens": tokens * world, "attention": kernels}


MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addbmm"}


def _category(event) -> str:
    """Which part of the step a profiled op belongs to: the op itself or the nearest range above it decides."""
    node = event
    while node is not None:
        name = node.name
        if name in MATMUL_OPS:
            return "matmul"
        if "scaled_dot_product" in name:
            return "attention"
        if name.startswith("FusedCrossEntropy") or "cross_entropy" in name or "log_softmax" in name:
            return "loss"
        node = node.cpu_parent
    return "other"


def profile_activities(device: str) -> list:
    """What the profiler records: CPU ops, and on a GPU the kernels they launch (the step's time is there)."""
    from torch.profiler import ProfilerActivity

    return [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if device.startswith("cuda") else [])]


def self_time_s(event, device: str) -> float:
    """An op's own time in seconds: its kernels' device time on a GPU (the CPU only queues them), else its CPU
    time."""
    if device.startswith("cuda"):
        us = getattr(event, "self_device_time_total", None)
        return (us if us is not None else event.self_cuda_time_total) / 1e6
    return event.self_cpu_time_total / 1e6


def measure_train_profile(args) -> dict:
    """Self-times of every op of ``--repeats`` train steps (torch.profiler; on a GPU the device time of the
    kernels each op launched) summed into matmul / attention / loss / other, per step; plus the matmuls' FLOPs
    and the time they would take at the measured peak."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import profile

    from ptuning.perf import matmul_peak_flops

    model, cfg, step, _ = train_step(args)
    for _ in range(args.warmup):
        step()
    sync(args.device)
    with profile(activities=profile_activities(args.device), with_flops=True) as prof:
        for _ in range(args.repeats):
            step()
        sync(args.device)
    parts = {"matmul": 0.0, "attention": 0.0, "loss": 0.0, "other": 0.0}
    matmul_flops = 0.0
    for event in prof.events():
        if event.device_type != DeviceType.CPU:
            continue  # kernels: counted through the op that launched them
        parts[_category(event)] += self_time_s(event, args.device) / args.repeats
        if event.name in MATMUL_OPS:
            matmul_flops += (event.flops or 0) / args.repeats
    peak_dtype = torch.bfloat16 if (args.autocast or args.dtype == "bfloat16") else torch.float32
    peak = matmul_peak_flops(peak_dtype, device=args.device)
    return {"parts_s": parts, "total_s": sum(parts.values()), "matmul_flops": matmul_flops, "peak_flops": peak,
            "matmul_at_peak_s": matmul_flops / peak, "time": "device" if args.device.startswith("cuda") else "cpu"}


def copy_bandwidth(device: str, mib: int = 512) -> float:
    """Bytes read + written per second by a large tensor copy."""
    import torch

    src = torch.empty(mib * 2**18, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best


GEN_PROMPT, GEN_NEW = 64, 64  # prompt tokens (62 + [gMASK] <sop>) and new tokens of a generation row


def generation_prompt(cfg, batch_size: int, device: str):
    ids, _ = batch(cfg, batch_size, 2 * GEN_PROMPT, device)
    prompt = ids[:, :GEN_PROMPT].clone()
    if hasattr(cfg, "gmask_token_id"):  # ChatGLM-6B's prompts end in [gMASK] <sop>
        prompt[:, GEN_PROMPT - 2], prompt[:, GEN_PROMPT - 1] = cfg.gmask_token_id, cfg.bos_token_id
    return prompt


def weight_bytes(model) -> int:
    """Bytes a token streams: every weight but the embedding table (a token reads one row of it)."""
    embedding = model.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not embedding)


def measure_generate(args) -> dict:
    """transformers' ``generate()`` and our decode loop side by side, at batch 1 and ``args.batch``, in turns.

    Every round times each way once (greedy, 64 new tokens after a 64-token prompt, no stop id), and a large
    copy; the best round of each counts. Rates: new tokens / time of the whole call (prefill included, as the
    issue's numbers), and for our loop also the decode steps alone (after the first token). The bound: copy
    bandwidth / weight bytes, tokens per second of one row.
    """
    import contextlib

    import torch

    from ptuning.generation import Decoder, Request, packed_linears

    shape = shape_of(args)
    model, cfg = build(shape, args.device, args.dtype, shape["pre_seq_len"], args.family)
    model.eval()
    model.requires_grad_(False)
    eos, pad = cfg.eos_token_id if cfg.eos_token_id is not None else 2, cfg.pad_token_id or 0
    new = GEN_NEW if not args.smoke else 8  # the smoke run: every way once, briefly
    sizes = sorted({1, args.batch})
    prompts = {b: generation_prompt(cfg, b, args.device) for b in sizes}

    def run_generate(b):
        with torch.no_grad():
            out = model.generate(prompts[b], max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 eos_token_id=eos, pad_token_id=pad)
        assert out.shape[1] == GEN_PROMPT + new

    def run_ours(b, packed: bool, compiled: bool = False):
        """Returns (whole call s, decode steps s)."""
        packing = packed_linears(model, rows=b) if packed else contextlib.nullcontext()
        with packing:
            # the cache allocated here, outside the timed call (evaluation, chat and the server keep theirs)
            decoder = Decoder(model, max_batch_size=b, max_length=GEN_PROMPT + new, capacity=GEN_PROMPT + new,
                              compile=compiled)
            start = time.perf_counter()
            for row in prompts[b].tolist():
                decoder.add(Request(row, new))
            decoder.step()  # prefill: the first token of every row
            sync(args.device)
            first = time.perf_counter()
            steps = 1
            while decoder.active:
                decoder.step()
                steps += 1
            sync(args.device)
            end = time.perf_counter()
        assert steps == new
        return end - start, end - first

    ways = {}
    for b in sizes:
        ways[f"generate() b{b}"] = lambda b=b: (run_generate(b), None)[1]
        ways[f"ours b{b}"] = lambda b=b: run_ours(b, packed=True)
        if args.dense:
            ways[f"ours dense b{b}"] = lambda b=b: run_ours(b, packed=False)
    compile_s = None
    if args.compile:
        # the first call of each batch size compiles (one graph for batch 1, one for larger batches), apart
        start = time.perf_counter()
        for b in sizes:
            run_ours(b, packed=False, compiled=True)
        compile_s = time.perf_counter() - start
        for b in sizes:
            ways[f"ours compiled b{b}"] = lambda b=b: run_ours(b, packed=False, compiled=True)
    for fn in ways.values():  # warm-up
        fn()
    best = {name: float("inf") for name in ways}
    best_decode = {name: float("inf") for name in ways}
    bandwidth = 0.0
    for _ in range(args.repeats):
        for name, fn in ways.items():
            sync(args.device)
            start = time.perf_counter()
            decode = fn()
            sync(args.device)
            took = time.perf_counter() - start
            if decode is not None:
                # our loop's call, from the first request added to the last token: packing the linears and
                # allocating the cache happen once per process in evaluation, chat and the server, not per call
                took = decode[0]
                best_decode[name] = min(best_decode[name], decode[1])
            best[name] = min(best[name], took)
        bandwidth = max(bandwidth, copy_bandwidth(args.device, 512 if not args.smoke else 64))
    weights = weight_bytes(model)
    bound = bandwidth / weights
    result = {"weight_bytes": weights, "copy_bandwidth": bandwidth, "bound_tokens_per_s": bound,
              "compile_s": compile_s, "threads": torch.get_num_threads(), "ways": {}}
    for name in ways:
        b = int(name.rsplit("b", 1)[1])
        row = {"batch": b, "tokens_per_s": b * new / best[name]}
        if best_decode[name] < float("inf"):
            row["decode_tokens_per_s"] = b * (new - 1) / best_decode[name]
        row["bound_fraction"] = row["tokens_per_s"] / b / bound
        if "decode_tokens_per_s" in row:
            row["decode_bound_fraction"] = row["decode_tokens_per_s"] / b / bound
        result["ways"][name] = row
    return result


def measure_profile(args) -> dict:
    """Where a decode step of our loop goes (batch ``args.batch``): the step, the same linears alone (the same
    kernels, the same input sizes), the bound, and torch.profiler's top operators over 20 steps."""
    import torch
    from torch.profiler import profile

    from ptuning.generation import Decoder, Request, packed_linears

    shape = shape_of(args)
    model, cfg = build(shape, args.device, args.dtype, shape["pre_seq_len"], args.family)
    model.eval()
    model.requires_grad_(False)
    b = args.batch
    prompt = generation_prompt(cfg, b, args.device)
    linears = [(m, n) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and "prefix_encoder" not in name for n in [m.in_features]]
    dtype = getattr(torch, args.dtype)
    inputs = {n: torch.randn(b, 1, n, dtype=dtype, device=args.device) for _, n in linears}
    bandwidth = copy_bandwidth(args.device)
    weights = weight_bytes(model)
    with packed_linears(model, rows=b), torch.no_grad():
        decoder = Decoder(model, max_batch_size=b, max_length=GEN_PROMPT + 4 * GEN_NEW)
        for row in prompt.tolist():
            decoder.add(Request(row, 3 * GEN_NEW))
        decoder.step()
        for _ in range(5):
            decoder.step()
        step = linear = float("inf")
        for _ in range(args.repeats * 5):
            sync(args.device)
            start = time.perf_counter()
            decoder.step()
            sync(args.device)
            step = min(step, time.perf_counter() - start)
            start = time.perf_counter()
            for module, n in linears:
                module(inputs[n])
            sync(args.device)
            linear = min(linear, time.perf_counter() - start)
        with profile(activities=profile_activities(args.device)) as prof:
            for _ in range(20):
                decoder.step()
        ops = sum(1 for e in prof.events() if e.cpu_parent is None) / 20
    order = "self_device_time_total" if args.device.startswith("cuda") else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=order, row_limit=15)
    return {"batch": b, "step_s": step, "linears_s": linear, "bound_s": weights / bandwidth,
            "top_level_ops_per_step": ops, "copy_bandwidth": bandwidth, "profile": table}


# ---------------------------------------------------------------- the driver (runs each measurement alone)


def fsdp2_launcher(processes: int) -> list[str]:
    """``accelerate launch`` with the toolkit's FSDP2 launch file, ``processes`` processes (one per GPU; on a machine
    without GPUs, on the CPU over gloo)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "launch" / "accelerate" / "fsdp2.yaml"), "--num_processes", str(processes),
            "--main_process_port", str(port)]


def child(extra: list[str], launcher: list[str] | None = None) -> dict:
    """One measurement in a fresh process (or the processes ``launcher`` starts). A failed one is ``{"error": its
    last line}``; its last lines of stderr are printed at once (an unattended run's log then says why, not only the
    table's one line)."""
    cmd = [*(launcher or [sys.executable]), __file__, "--child", *extra]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        print(f"measurement failed (exit {proc.returncode}): {' '.join(extra)}", file=sys.stderr)
        for line in lines[-20:]:
            print(f"    {line}", file=sys.stderr)
        return {"error": lines[-1] if lines else f"exit status {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine(device: str) -> dict:
    import torch

    from ptuning.perf import cpu_model

    cpu = cpu_model()
    info = {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__, "device": device,
            "python": platform.python_version()}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def print_generation(rows: dict) -> None:
    """The generation table (both ways, both batches, per dtype) and the targets of the performance issue."""
    gens = {name: r for name, r in rows.items() if "ways" in r}
    if not gens:
        return
    print("\n| generation | way | new tokens/s (whole call) | decode tokens/s | x generate() | "
          "fraction of bound (whole / decode) |")
    print("|---|---|---|---|---|---|")
    for name, r in gens.items():
        ways = r["ways"]
        for way, w in ways.items():
            base = ways.get(f"generate() b{w['batch']}")
            speedup = f"{w['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else ""
            decode = f"{w['decode_tokens_per_s']:.1f}" if "decode_tokens_per_s" in w else ""
            fraction = f"{w['bound_fraction']:.2f}" + (f" / {w['decode_bound_fraction']:.2f}"
                                                       if "decode_bound_fraction" in w else "")
            print(f"| {name} | {way} | {w['tokens_per_s']:.1f} | {decode} | {speedup} | {fraction} |")
        extra = f", compile {r['compile_s']:.1f} s" if r.get("compile_s") else ""
        print(f"| {name} | bound (batch 1): {r['bound_tokens_per_s']:.1f} tokens/s = {r['copy_bandwidth'] / 1e9:.1f} "
              f"GB/s copy / {r['weight_bytes'] / 2**20:.1f} MiB weights, {r['threads']} threads{extra} |||||")
    print("\ntargets (our loop, whole call): batch 1 >= 0.7 of the bound; batch 8 >= 5x batch 1")
    for name, r in gens.items():
        ways = r["ways"]
        one, eight = ways.get("ours b1"), ways.get("ours b8")
        if one:
            print(f"  {name}: batch 1 at {one['bound_fraction']:.2f} of the bound "
                  f"(decode steps alone {one.get('decode_bound_fraction', 0):.2f})"
                  + (f"; batch 8 = {eight['tokens_per_s'] / one['tokens_per_s']:.2f}x batch 1" if eight else ""))


def print_profiles(rows: dict) -> None:
    """Where a decode step goes: the step, its linears alone, the weight-streaming bound, operators."""
    profiles = {name: r for name, r in rows.items() if "linears_s" in r}
    if not profiles:
        return
    print("\n| profile | step ms | linears alone ms | bound ms | linears / bound | rest of the step ms | "
          "top-level ops per step |")
    print("|---|---|---|---|---|---|---|")
    for name, r in profiles.items():
        print(f"| {name} | {r['step_s'] * 1e3:.2f} | {r['linears_s'] * 1e3:.2f} | {r['bound_s'] * 1e3:.2f} | "
              f"{r['linears_s'] / r['bound_s']:.2f} | {(r['step_s'] - r['linears_s']) * 1e3:.2f} | "
              f"{r['top_level_ops_per_step']:.0f} |")
    for name, r in profiles.items():
        print(f"\n{name}: torch.profiler, 20 decode steps\n{r['profile']}")


SIDE_BY_SIDE = {"train float32": [], "train bf16 autocast (bf16 backbone)": ["--dtype", "bfloat16", "--autocast"]}
# the same pair on one thread, compared by CPU seconds: the work itself, nearly free of other processes' load
ONE_THREAD = {"train float32, 1 thread": ["--threads", "1"],
              "train bf16 autocast, 1 thread": ["--dtype", "bfloat16", "--autocast", "--threads", "1"]}


def side_by_side(common: list[str], rounds: int) -> dict[str, dict]:
    """The float32 and bf16 train steps in ``rounds`` alternating pairs of fresh processes. Each row is its best
    round (the median of that round's steps), with every round's median and their median."""
    pairs = {**SIDE_BY_SIDE, **ONE_THREAD}
    runs: dict[str, list[dict]] = {name: [] for name in pairs}
    for r in range(rounds):
        for name, extra in pairs.items():
            print(f"measuring {name}, round {r + 1}/{rounds} ...", file=sys.stderr, flush=True)
            runs[name].append(child([*common, *extra]))
    rows = {}
    for name, results in runs.items():
        good = [r for r in results if "error" not in r]
        if not good:
            rows[name] = results[0]
            continue
        rounds_s = [r["step_s"] for r in good]
        rounds_cpu = [r["cpu_s"] for r in good]
        rows[name] = {**min(good, key=lambda r: r["step_s"]), "rounds_step_s": rounds_s,
                      "median_step_s": statistics.median(rounds_s), "rounds_cpu_s": rounds_cpu,
                      "best_cpu_s": min(rounds_cpu), "median_cpu_s": statistics.median(rounds_cpu)}
    return rows


def speedups(rows: dict[str, dict]) -> dict | None:
    """bf16 vs float32 (best vs best, median vs median) and vs the original's float32 step."""
    fp32, bf16 = (rows.get(name, {}) for name in SIDE_BY_SIDE)
    if "rounds_step_s" not in fp32 or "rounds_step_s" not in bf16:
        return None
    out = {
        "bf16_vs_fp32_best": fp32["step_s"] / bf16["step_s"],
        "bf16_vs_fp32_median": fp32["median_step_s"] / bf16["median_step_s"],
        "bf16_vs_original_fp32": [t / bf16["step_s"] for t in ORIGINAL_FP32_STEP_S],
        "target": TARGET_SPEEDUP,
        "rounds": len(bf16["rounds_step_s"]),
    }
    fp32_1, bf16_1 = (rows.get(name, {}) for name in ONE_THREAD)
    if "rounds_cpu_s" in fp32_1 and "rounds_cpu_s" in bf16_1:
        out["bf16_vs_fp32_cpu_1_thread_best"] = fp32_1["best_cpu_s"] / bf16_1["best_cpu_s"]
        out["bf16_vs_fp32_cpu_1_thread_median"] = fp32_1["median_cpu_s"] / bf16_1["median_cpu_s"]
    return out


def print_speedups(rows: dict[str, dict], summary: dict | None, repeats: str) -> None:
    if summary is None:
        return
    fp32, bf16 = (rows[name] for name in SIDE_BY_SIDE)
    lo, hi = summary["bf16_vs_original_fp32"]
    print(f"\nbf16 vs float32 train step, side by side ({summary['rounds']} alternating rounds of fresh processes, "
          f"each the median of {repeats} steps): float32 best {fp32['step_s']:.3f} s / median "
          f"{fp32['median_step_s']:.3f} s, bf16 best {bf16['step_s']:.3f} s / median {bf16['median_step_s']:.3f} s: "
          f"{summary['bf16_vs_fp32_best']:.2f}x (best), {summary['bf16_vs_fp32_median']:.2f}x (median).")
    if "bf16_vs_fp32_cpu_1_thread_best" in summary:
        fp32_1, bf16_1 = (rows[name] for name in ONE_THREAD)
        print(f"On one thread, by CPU seconds per step (the work, nearly free of other processes' load): float32 "
              f"best {fp32_1['best_cpu_s']:.3f} s, bf16 best {bf16_1['best_cpu_s']:.3f} s: "
              f"{summary['bf16_vs_fp32_cpu_1_thread_best']:.2f}x (best), "
              f"{summary['bf16_vs_fp32_cpu_1_thread_median']:.2f}x (median).")
    verdict = "met" if lo >= summary["target"] else "missed"
    print(f"bf16 best vs the original's float32 step ({ORIGINAL_FP32_STEP_S[0]:.2f}-{ORIGINAL_FP32_STEP_S[1]:.2f} s, "
          f"its own measurement): {lo:.2f}-{hi:.2f}x; target {summary['target']:.0f}x: {verdict}.")


def print_profile(profile: dict | None) -> None:
    if not profile or "parts_s" not in profile:
        if profile:
            print(f"\nprofile: error: {profile.get('error')}")
        return
    parts, total = profile["parts_s"], profile["total_s"]
    cells = " | ".join(f"{parts[k]:.3f} s ({parts[k] / total:.0%})" for k in ("matmul", "attention", "loss", "other"))
    if profile.get("time") == "device":
        print("\n| bf16 step on the GPU, profiled (kernel time per step, by the op that launched it) | matmul | "
              "attention | loss | other | total |")
        print("|---|---|---|---|---|---|")
        print(f"| batch 16 x 128, bf16 backbone | {cells} | {total:.3f} s |")
        print(f"Its matmuls ({profile['matmul_flops'] / 1e12:.2f} TFLOP) take {parts['matmul']:.3f} s of kernel time, "
              f"{profile['matmul_at_peak_s']:.3f} s at the measured bf16 matmul peak "
              f"({profile['peak_flops'] / 1e12:.0f} TFLOP/s).")
        return
    print("\n| bf16 step on one thread, profiled (op self-time per step) | matmul | attention | loss | other | total |")
    print("|---|---|---|---|---|---|")
    print(f"| batch 4 x 256, bf16 autocast, bf16 backbone | {cells} | {total:.3f} s |")
    floor = profile["matmul_at_peak_s"] + parts["attention"]
    print(f"Its matmuls ({profile['matmul_flops'] / 1e9:.1f} GFLOP) take {parts['matmul']:.3f} s, "
          f"{profile['matmul_at_peak_s']:.3f} s at this thread's measured bf16 matmul peak "
          f"({profile['peak_flops'] / 1e9:.0f} GFLOP/s). Matmuls at that peak plus the attention as measured: "
          f"{floor:.3f} s of one thread's work, {floor / 2:.3f} s on two threads at perfect scaling; 4x the "
          f"original's float32 step needs {ORIGINAL_FP32_STEP_S[0] / TARGET_SPEEDUP:.3f}-"
          f"{ORIGINAL_FP32_STEP_S[1] / TARGET_SPEEDUP:.3f} s.")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gpu-shape", action="store_true",
                        help="the real shapes (ChatGLM-6B and a Qwen3-8B-shaped decoder), bf16 weights, FSDP2 on "
                             "several GPUs")
    parser.add_argument("--smoke", action="store_true",
                        help="every part of the --gpu-shape plan at a tiny shape, once each (FSDP2 on 2 processes)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results.json"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kind", default="train", help=argparse.SUPPRESS,
                        choices=["train", "generate", "profile", "train-profile", "train-fsdp2"])
    parser.add_argument("--compile", action="store_true",
                        help="also time our decode loop with torch.compile (its compile time is reported apart)")
    parser.add_argument("--dense", action="store_true", help="also time our decode loop on the dense linears")
    parser.add_argument("--profile", action="store_true", help="profile a decode step of our loop (batch 1 and 8)")
    parser.add_argument("--only", choices=["train", "generate"], default=None,
                        help="measure only the train step (and its scaling) or only generation")
    parser.add_argument("--rounds", type=int, default=None,
                        help="alternating float32 / bf16 train-step rounds (default 3, --quick 2)")
    parser.add_argument("--family", choices=sorted(FAMILIES), default="chatglm", help=argparse.SUPPRESS)
    parser.add_argument("--varied", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pack", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--autocast", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, default=256, help=argparse.SUPPRESS)
    parser.add_argument("--prefix", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=7, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args()


def gpu_plan(args, gpus: int) -> dict[str, tuple[list[str], list[str] | None]]:
    """The measurements of ``--gpu-shape`` (and, at the tiny shape on the CPU, of ``--smoke``): per family the
    train step at batch 16 x 128 and 1 x 128, padded against packed rows of varied lengths, greedy decoding; the
    train step under FSDP2 over ``gpus`` processes when there are several. Name -> (child flags, launcher)."""
    half = "bfloat16"
    batch, seq, pack = ("16", "128", "512") if not args.smoke else ("4", "32", "64")
    plan: dict[str, tuple[list[str], list[str] | None]] = {}
    for family, label in FAMILIES.items():
        train = ["--family", family, "--dtype", half, "--seq", seq]
        plan[f"{label}: train bf16, batch {batch} x {seq}"] = ([*train, "--batch", batch], None)
        plan[f"{label}: train bf16, batch 1 x {seq}"] = ([*train, "--batch", "1"], None)
        rows = f"{batch} rows of {int(seq) // 4}-{seq} tokens"
        plan[f"{label}: train bf16, {rows}, padded"] = ([*train, "--batch", batch, "--varied"], None)
        plan[f"{label}: train bf16, {rows}, packed in {pack}"] = (
            [*train, "--batch", batch, "--varied", "--pack", pack], None)
        if gpus > 1:
            plan[f"{label}: FSDP2 on {gpus} processes, train bf16 + checkpointing, batch {batch} x {seq} each"] = (
                ["--kind", "train-fsdp2", *train, "--batch", batch, "--checkpointing"], fsdp2_launcher(gpus))
        plan[f"{label}: generate bf16"] = (["--kind", "generate", "--family", family, "--dtype", half, "--batch",
                                            "8" if not args.smoke else "2"], None)
    if args.smoke:  # each kind of measurement once: both batchings, both families, FSDP2, decoding
        keep = ("ChatGLM-6B: train bf16, 4 rows of 8-32 tokens, packed", "Qwen3-8B-shaped decoder: train bf16, 4 rows",
                "Qwen3-8B-shaped decoder: FSDP2", "Qwen3-8B-shaped decoder: generate")
        return {name: v for name, v in plan.items() if name.startswith(keep)}
    plan["ChatGLM-6B: train bf16 + checkpointing, batch 16 x 128"] = (
        ["--dtype", half, "--batch", "16", "--seq", "128", "--checkpointing"], None)
    plan["train bf16 step profiled"] = (["--kind", "train-profile", "--dtype", half, "--batch", "16", "--seq", "128",
                                         "--repeats", "3"], None)
    return plan


def cpu_plan(args, common: list[str]) -> tuple[dict[str, dict], dict[str, tuple[list[str], None]]]:
    """The bench configuration's measurements on a CPU: the side-by-side rows measured here, and the plan."""
    half = "bfloat16"
    gen_flags = [*(["--compile"] if args.compile else []), *(["--dense"] if args.dense else [])]
    rows = side_by_side(common, args.rounds or (2 if args.quick else 3)) if args.only != "generate" else {}
    plan = {
        "train float32 + checkpointing": ["--checkpointing"],
        "train bf16 autocast + checkpointing": ["--dtype", half, "--autocast", "--checkpointing"],
        "train bf16 step profiled, 1 thread": ["--kind", "train-profile", "--dtype", half, "--autocast", "--repeats",
                                               "3", "--threads", "1"],
        "generate float32": ["--kind", "generate", "--batch", "8", *gen_flags],
        "generate bf16": ["--kind", "generate", "--dtype", half, "--batch", "8", *gen_flags],
    }
    seqs = [128, 512, 1024] if args.quick else [128, 256, 512, 1024]
    for prefix in ([0, 32] if args.quick else [0, 32, 128]):
        for seq in seqs:
            plan[f"scaling S={seq} P={prefix}"] = ["--seq", str(seq), "--batch", str(1024 // seq),
                                                   "--prefix", str(prefix), "--repeats", "3"]
    return rows, {name: (extra, None) for name, extra in plan.items()}


def print_train_table(rows: dict) -> None:
    """The train rows: time, row tokens/s, achieved and peak FLOP/s, memory, the SDPA backends; then each
    family's packed / padded ratio."""
    print("| measurement | step s | row tokens/s | achieved GFLOP/s | peak GFLOP/s | fraction of peak | peak MiB | "
          "attention (SDPA backend x calls per step) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        if "error" in r:
            print(f"| {name} | error: {r['error']} |||||||")
        elif "achieved_flops" in r:
            print(f"| {name} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['achieved_flops'] / 1e9:.1f} | "
                  f"{r['peak_flops'] / 1e9:.1f} | {r['peak_fraction']:.3g} | {r['peak_memory_mib']:.0f} | "
                  f"{', '.join(r.get('attention') or []) or 'none'} |")
    for label in FAMILIES.values():
        padded = next((r for n, r in rows.items() if n.startswith(f"{label}:") and n.endswith("padded")), None)
        packed = next((r for n, r in rows.items() if n.startswith(f"{label}:") and "packed in" in n), None)
        if padded and packed and "tokens_per_s" in padded and "tokens_per_s" in packed:
            print(f"{label}: packed / padded row tokens/s at equal row tokens per step: "
                  f"{packed['tokens_per_s'] / padded['tokens_per_s']:.2f}x")


def write_results(args, info: dict, rows: dict, summary: dict | None) -> None:
    info["load_average"] = [round(x, 2) for x in os.getloadavg()]  # the machine is shared: how busy it was
    info["command"] = " ".join(["python", "benchmarks/bench.py", *sys.argv[1:]])
    out = {"machine": info, "speedups": summary, "results": rows}
    path = Path(args.json)
    if args.only and path.is_file():
        # a partial run replaces its own kind of rows in an existing file and keeps the others as they were
        old = json.loads(path.read_text())
        mine = ("generate", "profile") if args.only == "generate" else ("train", "scaling")
        kept = {k: v for k, v in old.get("results", {}).items() if not k.startswith(mine)}
        runs = {**old.get("runs", {}), args.only: info}
        out = {"machine": old.get("machine", info), "runs": runs, "results": {**kept, **rows},
               "speedups": summary if args.only == "train" else old.get("speedups")}
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.json}")


def run_child(args) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    measure = {"train": measure_train, "generate": measure_generate, "profile": measure_profile,
               "train-profile": measure_train_profile, "train-fsdp2": measure_train_fsdp2}[args.kind]
    result = measure(args)
    if result is not None:  # None: another process of a launch, which the main one reports for
        print(json.dumps(result))


def main() -> None:
    args = parse_args()
    if args.child:
        run_child(args)
        return
    if args.smoke:
        args.device, args.quick = "cpu", True
    rep = ["--repeats", "1" if args.smoke else "3" if args.quick else "7"]
    common = ["--device", args.device, *(["--gpu-shape"] if args.gpu_shape else []),
              *(["--smoke", "--warmup", "1"] if args.smoke else []), *rep]
    rows: dict[str, dict] = {}
    if args.gpu_shape or args.smoke:
        import torch

        gpus = 2 if args.smoke else torch.cuda.device_count()
        plan = gpu_plan(args, gpus)
    else:
        rows, plan = cpu_plan(args, common)
    if args.only:
        plan = {name: v for name, v in plan.items() if (args.only == "generate") == ("generate" in name)}
    if args.profile:
        for dtype, b in (("float32", 1), ("float32", 8), ("bfloat16", 1), ("bfloat16", 8)):
            plan[f"profile {dtype}, batch {b}"] = (["--kind", "profile", "--dtype", dtype, "--batch", str(b)], None)
    for name, (extra, launcher) in plan.items():
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        rows[name] = child([*common, *extra], launcher)

    info = machine(args.device)
    print(f"\nmachine: {info}\n")
    print_train_table(rows)
    summary = speedups(rows)
    print_speedups(rows, summary, rep[1])
    print_profile(rows.get("train bf16 step profiled, 1 thread") or rows.get("train bf16 step profiled"))
    print_generation(rows)
    print_profiles(rows)
    write_results(args, info, rows, summary)
    failed = [name for name, r in rows.items() if "error" in r]
    if failed:
        sys.exit(f"{len(failed)} measurement(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
