"""Prefix attention of a batch without padding: the materialized ``[1, 1, S, P + S]`` mask (every batch, before)
against no mask (:func:`ptuning.models.hf.attention.no_mask_form`: on a CPU from 1024 tokens P zero queries and
SDPA's ``is_causal``; ``causal_lower_right`` on a GPU): step time and peak memory of a training step.

    python benchmarks/bench_prefix_mask.py                   # S = 2048 and 4096, CPU
    python benchmarks/bench_prefix_mask.py --seq 1024 2048 --device cuda
    python benchmarks/bench_prefix_mask.py --attention-only   # the attention alone: where no mask starts to pay

The model: a Llama-shaped decoder at the bench shape (``ptuning.perf.BENCH_SHAPE``: hidden 512, 8 heads, 2
key/value heads of 64, 4 layers, intermediate 2048, vocab 32000), random weights, frozen, with a prefix of
``--prefix`` (128) tokens. A step: forward + backward + AdamW on the prefix for one row of S tokens (half of
them targets), as the training loop runs it. Each (S, form) runs in its own process, so that its peak memory
(peak RSS on a CPU, the allocator's peak on a GPU, minus what the process held before the first step) is its
own; the processes alternate before / after ``--rounds`` times, and the table gives the median step time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FORMS = {"before": "mask", "after": None}  # None: what no_mask_form picks for the device


def rss_mib() -> float:
    """Resident memory of this process now (Linux ``/proc/self/statm``)."""
    import os

    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(seq: int, form: str | None, prefix: int, steps: int, device: str) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import ptuning.models.hf.attention as attention
    from ptuning.models.hf import attach_prefix, prefix_shape
    from ptuning.perf import BENCH_SHAPE, peak_memory_mib
    from ptuning.prefix import mark_only_prefix_trainable

    if form is not None:
        attention.no_mask_form = lambda *_: form
    config = LlamaConfig(vocab_size=BENCH_SHAPE["vocab_size"], hidden_size=BENCH_SHAPE["hidden_size"],
                         num_attention_heads=BENCH_SHAPE["num_attention_heads"], num_key_value_heads=2, head_dim=64,
                         num_hidden_layers=BENCH_SHAPE["num_layers"], intermediate_size=BENCH_SHAPE["inner_hidden_size"],
                         max_position_embeddings=max(seq, 4096), pad_token_id=0, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    attach_prefix(model, prefix_shape(config, prefix))
    mark_only_prefix_trainable(model)
    model.train()
    optimizer = torch.optim.AdamW(model.prefix_encoder.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, config.vocab_size, (1, seq), generator=g).to(device)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    held = torch.cuda.memory_allocated() / 2**20 if cuda else rss_mib()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps + 1):
        sync()
        start = time.perf_counter()
        model(input_ids=ids, labels=labels, loss_reduction="sum", return_logits=False, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if i:  # the first step warms up
            times.append(time.perf_counter() - start)
    used = attention.no_mask_form(torch.device(device), seq, prefix)
    return {"step_s": statistics.median(times), "peak_mib": peak_memory_mib(device) - held, "form": used}


def attention_only(seqs: list[int], prefixes: list[int]) -> None:
    """Forward + backward of the attention alone (B 2, 8 heads of 64, one thread): the materialized mask against
    P zero queries with ``is_causal``, the best of several repeats each."""
    from types import SimpleNamespace

    import torch

    from ptuning.models.hf.attention import causal_prefix_attention
    from ptuning.perf import cpu_model

    torch.set_num_threads(1)
    module = SimpleNamespace(layer_idx=0, is_causal=True, num_key_value_groups=1, training=True)
    g = torch.Generator().manual_seed(0)
    print(f"{cpu_model()}, torch {torch.__version__}, 1 thread, attention forward + backward, batch 2, 8 heads of 64")
    print("| P | S | mask (ms) | zero queries (ms) | zero queries speed-up |")
    print("|---|---|---|---|---|")
    for prefix in prefixes:
        for seq in seqs:
            q = torch.randn(2, 8, seq, 64, generator=g)
            kv = [torch.randn(2, 8, prefix + seq, 64, generator=g) for _ in range(2)]
            best = {}
            for form in ("mask", "zero_queries"):
                times = []
                for _ in range(max(3, 2000 // seq)):
                    args = [t.clone().requires_grad_() for t in (q, *kv)]
                    start = time.perf_counter()
                    out, _ = causal_prefix_attention(module, *args, prefix_length=prefix, form=form)
                    out.sum().backward()
                    times.append(time.perf_counter() - start)
                best[form] = min(times)
            print(f"| {prefix} | {seq} | {1e3 * best['mask']:.2f} | {1e3 * best['zero_queries']:.2f} | "
                  f"{best['mask'] / best['zero_queries']:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, nargs="*", default=[2048, 4096])
    parser.add_argument("--prefix", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--attention-only", action="store_true",
                        help="time the attention alone over S = 16..1024 and P = 16, 128")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.attention_only:
        attention_only([16, 64, 128, 256, 512, 1024], [16, 128])
        return
    if args.child:
        seq, form = json.loads(args.child)
        print(json.dumps(child(seq, form, args.prefix, args.steps, args.device)))
        return

    import torch

    from ptuning.perf import cpu_model

    results: dict = {}
    for _ in range(args.rounds):
        for seq in args.seq:
            for name, form in FORMS.items():
                proc = subprocess.run(
                    [sys.executable, __file__, "--child", json.dumps([seq, form]), "--prefix", str(args.prefix),
                     "--steps", str(args.steps), "--device", args.device],
                    capture_output=True, text=True, check=True,
                )
                results.setdefault((seq, name), []).append(json.loads(proc.stdout.strip().splitlines()[-1]))
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_model()
    print(f"{where}, torch {torch.__version__}, {torch.get_num_threads()} threads, Llama-shaped bench model "
          f"(hidden 512, 4 layers), P={args.prefix}, batch 1, median of {args.steps} steps x {args.rounds} "
          "alternating processes")
    print("| S | before: mask | after: no mask | step time before (s) | after (s) | speed-up | "
          "peak memory before (MiB) | after (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for seq in args.seq:
        before, after = results[(seq, "before")], results[(seq, "after")]
        t0 = statistics.median(r["step_s"] for r in before)
        t1 = statistics.median(r["step_s"] for r in after)
        m0 = statistics.median(r["peak_mib"] for r in before)
        m1 = statistics.median(r["peak_mib"] for r in after)
        print(f"| {seq} | {before[0]['form']} | {after[0]['form']} | {t0:.3f} | {t1:.3f} | {t0 / t1:.2f}x | "
              f"{m0:.0f} | {m1:.0f} |")


if __name__ == "__main__":
    main()
