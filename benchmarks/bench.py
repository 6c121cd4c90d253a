"""Speed and memory of the P-Tuning v2 train step and of generation, each measured in a fresh process.

    python benchmarks/bench.py                 # CPU, the bench configuration; prints a table, writes JSON
    python benchmarks/bench.py --quick         # fewer repeats and a smaller scaling grid
    python benchmarks/bench.py --device cuda --gpu-shape   # the real ChatGLM-6B shape (see benchmarks/gpu.sh)

The bench configuration: ChatGLM-6B architecture with hidden 512, 8 heads, 4 layers, inner 2048, vocab
32000, pre_seq_len 32, random weights, frozen backbone. A train step is forward + backward + AdamW on the
prefix for a batch of 4 x 256 tokens (128 prompt tokens ending in [gMASK], 128 target tokens from <sop> to
<eop>, labels -100 on the prompt), run exactly as the training loop runs it.

Train rows report tokens/s, the achieved FLOP/s by the shared formula (``ptuning.perf``:
``4·N + 12·L·d·(S + P)`` per token) and its fraction of a large matmul's FLOP/s measured in the same
process with the same dtype and threads. Generation rows report new tokens/s and, for batch 1, the bound
set by streaming the weights once per token: measured copy bandwidth / weight bytes.
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


# ---------------------------------------------------------------- measurements (run in a child process)


def build(shape: dict, device: str, dtype: str, prefix: int | None):
    import torch

    from ptuning.models.chatglm import ChatGLMForConditionalGeneration, tiny_config
    from ptuning.prefix import cast_backbone, mark_only_prefix_trainable

    torch.manual_seed(0)
    cfg = tiny_config(**{**shape, "pre_seq_len": prefix or None})
    with torch.device(device):
        model = ChatGLMForConditionalGeneration(cfg)
    cast_backbone(model, getattr(torch, dtype))
    if prefix:
        mark_only_prefix_trainable(model)
    else:
        model.requires_grad_(False)
    return model, cfg


def batch(cfg, batch_size: int, seq: int, device: str):
    import torch

    g = torch.Generator().manual_seed(0)
    prompt = seq // 2
    ids = torch.randint(5, min(cfg.vocab_size, 30000) - 10, (batch_size, seq), generator=g)
    ids[:, prompt - 1] = cfg.gmask_token_id
    ids[:, prompt] = cfg.bos_token_id
    ids[:, -1] = cfg.eos_token_id
    labels = ids.clone()
    labels[:, :prompt] = -100
    return ids.to(device), labels.to(device)


def sync(device: str):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_train(args) -> dict:
    import torch

    from ptuning.perf import matmul_peak_flops, peak_memory_mib, train_flops_per_token

    shape = GPU_SHAPE if args.gpu_shape else BENCH
    prefix = shape["pre_seq_len"] if args.prefix is None else args.prefix
    model, cfg = build(shape, args.device, args.dtype, prefix)
    model.train()
    if args.checkpointing:
        model.activation_checkpointing_enable()
    ids, labels = batch(cfg, args.batch, args.seq, args.device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3) if params else None
    autocast = torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.autocast)

    def step():
        with autocast:
            if prefix:
                loss = model(input_ids=ids, labels=labels, loss_reduction="sum", return_logits=False).loss
            else:  # no prefix: backward to the activations only, the same work the formula counts
                embeds = model.transformer.word_embeddings(ids).detach().requires_grad_()
                loss = model(inputs_embeds=embeds, input_ids=ids, labels=labels, loss_reduction="sum",
                             return_logits=False).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        sync(args.device)
        start = time.perf_counter()
        step()
        sync(args.device)
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    tokens = args.batch * args.seq
    flops = train_flops_per_token(cfg, args.seq, prefix) * tokens / step_s
    peak_dtype = torch.bfloat16 if (args.autocast or args.dtype == "bfloat16") else torch.float32
    peak = matmul_peak_flops(peak_dtype, device=args.device)
    return {"step_s": step_s, "tokens_per_s": tokens / step_s, "achieved_flops": flops, "peak_flops": peak,
            "peak_fraction": flops / peak, "peak_memory_mib": peak_memory_mib(args.device)}


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


def measure_generate(args) -> dict:
    import torch

    shape = GPU_SHAPE if args.gpu_shape else BENCH
    model, cfg = build(shape, args.device, args.dtype, shape["pre_seq_len"])
    model.eval()
    ids, _ = batch(cfg, args.batch, 2 * 64, args.device)
    prompt = ids[:, :64].clone()  # 62 tokens, [gMASK], <sop>
    prompt[:, 62], prompt[:, 63] = cfg.gmask_token_id, cfg.bos_token_id
    new = 64

    def run():
        with torch.no_grad():
            return model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                  eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)

    run()
    times = []
    for _ in range(args.repeats):
        sync(args.device)
        start = time.perf_counter()
        out = run()
        sync(args.device)
        times.append(time.perf_counter() - start)
    assert out.shape[1] == 64 + new
    # decoding rate: the whole generate() (prefill included) over the new tokens
    tokens_per_s = args.batch * new / statistics.median(times)
    weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                       if "word_embeddings" not in n)  # a token reads one embedding row, every other weight
    bandwidth = copy_bandwidth(args.device)
    bound = bandwidth / weight_bytes
    return {"tokens_per_s": tokens_per_s, "weight_bytes": weight_bytes, "copy_bandwidth": bandwidth,
            "bound_tokens_per_s": bound, "bound_fraction": tokens_per_s / bound / args.batch}


# ---------------------------------------------------------------- the driver (runs each measurement alone)


def child(extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine(device: str) -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__, "device": device,
            "python": platform.python_version()}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gpu-shape", action="store_true", help="the real ChatGLM-6B shape, bf16 weights")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results.json"))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kind", default="train", choices=["train", "generate"], help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--autocast", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, default=256, help=argparse.SUPPRESS)
    parser.add_argument("--prefix", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = measure_train(args) if args.kind == "train" else measure_generate(args)
        print(json.dumps(result))
        return

    rep = ["--repeats", "3" if args.quick else "7"]
    common = ["--device", args.device, *(["--gpu-shape"] if args.gpu_shape else []), *rep]
    half = "bfloat16"
    rows: dict[str, dict] = {}
    if args.gpu_shape:
        plan = {
            "train bf16, batch 16 x 128": ["--dtype", half, "--batch", "16", "--seq", "128"],
            "train bf16, batch 1 x 128": ["--dtype", half, "--batch", "1", "--seq", "128"],
            "train bf16 + checkpointing, batch 16 x 128": ["--dtype", half, "--batch", "16", "--seq", "128",
                                                           "--checkpointing"],
            "generate bf16, batch 1": ["--kind", "generate", "--dtype", half, "--batch", "1"],
            "generate bf16, batch 8": ["--kind", "generate", "--dtype", half, "--batch", "8"],
        }
    else:
        plan = {
            "train float32": [],
            "train float32 + checkpointing": ["--checkpointing"],
            "train bf16 autocast (bf16 backbone)": ["--dtype", half, "--autocast"],
            "train bf16 autocast + checkpointing": ["--dtype", half, "--autocast", "--checkpointing"],
            "generate float32, batch 1": ["--kind", "generate", "--batch", "1"],
            "generate bf16, batch 1": ["--kind", "generate", "--dtype", half, "--batch", "1"],
            "generate float32, batch 8": ["--kind", "generate", "--batch", "8"],
        }
        seqs = [128, 512, 1024] if args.quick else [128, 256, 512, 1024]
        for prefix in ([0, 32] if args.quick else [0, 32, 128]):
            for seq in seqs:
                plan[f"scaling S={seq} P={prefix}"] = ["--seq", str(seq), "--batch", str(1024 // seq),
                                                       "--prefix", str(prefix), "--repeats", "3"]
    for name, extra in plan.items():
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        rows[name] = child([*common, *extra])

    info = machine(args.device)
    print(f"\nmachine: {info}\n")
    print("| measurement | step s | tokens/s | achieved GFLOP/s | peak GFLOP/s | fraction of peak | peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        if "error" in r:
            print(f"| {name} | error: {r['error']} |||||")
        elif "step_s" in r:
            print(f"| {name} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | {r['achieved_flops'] / 1e9:.1f} | "
                  f"{r['peak_flops'] / 1e9:.1f} | {r['peak_fraction']:.2f} | {r['peak_memory_mib']:.0f} |")
    print("\n| generation | new tokens/s | weight MiB | copy GB/s | bound tokens/s (batch 1) | fraction of bound |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        if "bound_tokens_per_s" in r:
            print(f"| {name} | {r['tokens_per_s']:.1f} | {r['weight_bytes'] / 2**20:.1f} | "
                  f"{r['copy_bandwidth'] / 1e9:.1f} | {r['bound_tokens_per_s']:.1f} | {r['bound_fraction']:.2f} |")
    Path(args.json).write_text(json.dumps({"machine": info, "results": rows}, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
