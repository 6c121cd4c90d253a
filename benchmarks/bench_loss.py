"""The train step with the fused float32 loss (``ptuning.models.loss``) against the same step with the plain
one, for a transformers decoder (Llama) and ChatGLM2 (its original layout on ``GlmForCausalLM``).

    python benchmarks/bench_loss.py                          # CPU, the bench shape, bfloat16 and float32
    python benchmarks/bench_loss.py --dtype bfloat16 --steps 9

The bench shape (``ptuning.perf.BENCH_SHAPE``, as benchmarks/bench_hf_prefix.py: hidden 512, 8 heads of 64,
2 key/value heads, 4 layers, intermediate 2048, vocab 32000, prefix 32), random weights, frozen backbone. A
step is forward + backward + AdamW on the prefix for a batch of 4 x 256 tokens (128 prompt, 128 targets).

* **plain**: the loss these families had before the loss module was shared: the model's own prefix and
  backbone, then the output projection at the target positions and ``F.cross_entropy`` on a float32 copy of
  those logits;
* **fused**: the training loop's call, ``model(ids, labels=..., loss_reduction="sum", return_logits=False)``,
  whose loss is :class:`~ptuning.models.loss.FusedCrossEntropy`.

The two steps alternate in one process (the first of each pair swaps every round) so that a busy machine
slows both alike; the table gives the median wall time and the median CPU time of this process (all its
threads; other processes' load barely moves it) of each, their ratios (plain / fused: above 1 = the fused step
is faster) and the largest loss difference seen between the two paths. ``--threads 1`` runs on one thread.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_hf_prefix import BENCH, build  # noqa: E402

from ptuning.models.chatglm2.config import OriginalConfig  # noqa: E402
from ptuning.models.chatglm2.family import prefix_shape, rotary_for  # noqa: E402
from ptuning.models.hf import attach_prefix  # noqa: E402
from ptuning.perf import BENCH_SHAPE, cpu_model  # noqa: E402
from ptuning.prefix import mark_only_prefix_trainable  # noqa: E402

PREFIX = BENCH_SHAPE["pre_seq_len"]


def chatglm2(dtype):
    """ChatGLM2 at the bench shape: the original config mapped onto ``GlmForCausalLM`` with its rotary."""
    from transformers import GlmForCausalLM

    original = OriginalConfig(
        num_layers=BENCH["num_hidden_layers"], hidden_size=BENCH["hidden_size"], ffn_hidden_size=BENCH["intermediate_size"],
        kv_channels=BENCH["head_dim"], num_attention_heads=BENCH["num_attention_heads"], multi_query_attention=True,
        multi_query_group_num=BENCH["num_key_value_heads"], padded_vocab_size=BENCH["vocab_size"], seq_length=4096,
        add_qkv_bias=True, chatglm_version=2,
    )
    config = original.glm_config()
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = GlmForCausalLM(config).to(dtype)
    model.model.rotary_emb = rotary_for(config)
    attach_prefix(model, prefix_shape(config, PREFIX))
    mark_only_prefix_trainable(model)
    return model.train()


def plain_loss(model, ids, labels):
    """The summed loss as before: float32 ``F.cross_entropy`` on the target positions' logits."""
    prefix = model.prefix_key_values(ids.shape[0], model.get_input_embeddings().weight.dtype)
    hidden = model.base_model(input_ids=ids, prefix=prefix, use_cache=False).last_hidden_state  # (B, S, H)
    targets = labels[:, 1:]
    keep = targets != -100
    logits = model.lm_head(hidden[:, :-1][keep]).float()  # (T, V)
    return F.cross_entropy(logits, targets[keep], reduction="sum")


def fused_loss(model, ids, labels):
    return model(input_ids=ids, labels=labels, loss_reduction="sum", return_logits=False, use_cache=False).loss


def measure(name: str, model, steps: int, batch: int, seq: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, BENCH["vocab_size"], (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    model.prefix_dropout.eval()  # both paths see the same prefix
    optimizer = torch.optim.AdamW(model.prefix_encoder.parameters(), lr=0.0)  # lr 0: every step the same
    times = {"plain": [], "fused": []}
    cpu = {"plain": [], "fused": []}
    losses = {}

    def step(kind):
        loss = (plain_loss if kind == "plain" else fused_loss)(model, ids, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses[kind] = loss.item()

    worst = 0.0
    for i in range(steps + 1):
        for kind in (("plain", "fused") if i % 2 else ("fused", "plain")):
            start, start_cpu = time.perf_counter(), time.process_time()
            step(kind)
            if i:  # the first round warms up
                times[kind].append(time.perf_counter() - start)
                cpu[kind].append(time.process_time() - start_cpu)
        worst = max(worst, abs(losses["plain"] - losses["fused"]) / abs(losses["plain"]))
    plain, fused = statistics.median(times["plain"]), statistics.median(times["fused"])
    plain_cpu, fused_cpu = statistics.median(cpu["plain"]), statistics.median(cpu["fused"])
    return {"model": name, "plain_s": plain, "fused_s": fused, "ratio": plain / fused, "plain_cpu_s": plain_cpu,
            "fused_cpu_s": fused_cpu, "cpu_ratio": plain_cpu / fused_cpu, "loss_rel_diff": worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", nargs="*", default=["bfloat16", "float32"], choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, help="intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = []
    for dtype_name in args.dtype:
        dtype = getattr(torch, dtype_name)
        models = {
            "LlamaForCausalLM": lambda dtype=dtype: build("LlamaForCausalLM", BENCH, PREFIX, "cpu", dtype),
            "ChatGLM2 (GlmForCausalLM)": lambda dtype=dtype: chatglm2(dtype),
        }
        for name, make in models.items():
            rows.append({"dtype": dtype_name, **measure(name, make(), args.steps, args.batch, args.seq)})
    print(f"{cpu_model()}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at the end; "
          f"bench shape, P={PREFIX}, batch {args.batch} x {args.seq} ({args.seq // 2} targets per row), median of "
          f"{args.steps} alternating steps, torch {torch.__version__}")
    print("| model | dtype | wall s, plain loss | wall s, fused loss | plain / fused | CPU s, plain | CPU s, fused "
          "| plain / fused (CPU) | loss rel. diff |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['dtype']} | {r['plain_s']:.4f} | {r['fused_s']:.4f} | {r['ratio']:.3f} | "
              f"{r['plain_cpu_s']:.4f} | {r['fused_cpu_s']:.4f} | {r['cpu_ratio']:.3f} | {r['loss_rel_diff']:.1e} |")


if __name__ == "__main__":
    main()
