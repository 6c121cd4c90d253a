"""Quantized frozen backbone: weight bytes, train-step peak memory and step time at fp32 / bf16 / int8 / int4,
and the loss after 50 steps on the bundled sample, each setting measured in a fresh process.

* **Bench configuration** (the performance issue's): ChatGLM-6B architecture with hidden 512, 8 heads, 4
  layers, inner 2048, vocab 32000, pre_seq_len 32 without projection, random weights; one train step =
  forward + backward + AdamW on the prefix, batch 4 x 256 tokens (128 prompt ending in ``[gMASK]``, 128
  target from ``<sop>`` to ``<eop>``, labels -100 on the prompt), the loss of ``model(ids, labels=...)``. Reported:
  weight bytes of the model, peak RSS of the process and its rise over the RSS before the model was built,
  the tensor peak that ``ptuning.memory`` estimates for the same shape (the rise also holds the allocator's
  and the runtime's own memory), and the step time (fastest and median over the rounds).
* **Loss**: the built-in tiny model trained 50 steps on ``data/adgen_sample`` with the training loop
  (batch 8, the default recipe otherwise): the mean train loss of steps 41-50 and the dev loss after step 50.
  int8 must land within 3% and int4 within 8% of the bf16 run.

    python benchmarks/bench_quantization.py [--steps 6] [--rounds 2] [--loss-steps 50] [--checkpointing] [--json out.json]

Not a test: pytest collects ``tests/`` only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ptuning.perf import BENCH_SHAPE  # noqa: E402

SETTINGS = ("fp32", "bf16", "int8", "int4")
BENCH = dict(
    BENCH_SHAPE,
    max_sequence_length=2048,
    bos_token_id=31994,
    eos_token_id=31995,
    mask_token_id=31990,
    gmask_token_id=31991,
    prefix_projection=False,
)
LOSS_TOLERANCE = {"int8": 0.03, "int4": 0.08}


def current_rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """Peak RSS of this process's own address space (``VmHWM``). ``getrusage``'s ``ru_maxrss`` is no good
    here: Linux folds the launching process's high-water mark into it at exec, so a child started from a
    large process (pytest, say) reports at least that process's RSS."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def bench_batch(batch: int, seq: int, config, generator):
    """Prompt ``[0, seq/2)`` ending in ``[gMASK]``, target ``<sop> ... <eop>``; labels only on the target."""
    import torch

    half = seq // 2
    ids = torch.randint(0, config.mask_token_id, (batch, seq), generator=generator)
    ids[:, half - 1] = config.gmask_token_id
    ids[:, half] = config.bos_token_id
    ids[:, -1] = config.eos_token_id
    labels = ids.clone()
    labels[:, :half] = -100
    return ids, labels


def child_train(setting: str, batch: int, seq: int, steps: int, checkpointing: bool) -> dict:
    """One setting on the bench configuration: build, quantize, train ``steps`` steps."""
    import torch

    from ptuning.memory import ModelShape, estimate
    from ptuning.models.chatglm import ChatGLMForConditionalGeneration, tiny_config
    from ptuning.prefix import mark_only_prefix_trainable
    from ptuning.quantization import _torchao, quantize_backbone, weight_bytes

    # The RSS rise is compared with the estimate of the tensors: first load what every setting loads anyway
    # (torchao's modules, and the kernels' code pages, touched by one step of a small model of this dtype)
    _torchao()
    warm = ChatGLMForConditionalGeneration(tiny_config(pre_seq_len=4)).to(
        torch.float32 if setting == "fp32" else torch.bfloat16
    )
    warm_ids, warm_labels = bench_batch(2, 16, warm.config, torch.Generator().manual_seed(0))
    warm(input_ids=warm_ids, labels=warm_labels).loss.backward()
    del warm, warm_ids, warm_labels
    start_rss = current_rss_mib()
    config = tiny_config(**BENCH)
    # build straight in the backbone dtype, so no float32 copy inflates the peak of the 16-bit settings
    torch.set_default_dtype(torch.float32 if setting == "fp32" else torch.bfloat16)
    torch.manual_seed(0)
    model = ChatGLMForConditionalGeneration(config)
    torch.set_default_dtype(torch.float32)
    model.transformer.prefix_encoder.float()
    if setting in ("int8", "int4"):
        quantize_backbone(model, 8 if setting == "int8" else 4)
    mark_only_prefix_trainable(model)
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids, labels = bench_batch(batch, seq, config, torch.Generator().manual_seed(0))
    times = []
    for _ in range(steps):
        begin = time.perf_counter()
        out = model(input_ids=ids, labels=labels)  # its logits stay referenced until the step ends
        loss = out.loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - begin)
        del out
    shape = ModelShape.from_config(config, batch=batch, seq=seq, checkpointing=checkpointing)
    est = estimate(shape, setting)
    return {
        "setting": setting,
        "checkpointing": checkpointing,
        "weight_bytes": weight_bytes(model),
        "start_rss_mib": start_rss,
        "peak_rss_mib": peak_rss_mib(),
        "step_times_s": times[1:] if len(times) > 1 else times,
        "estimate_weight_bytes": est.weights,
        "estimate_train_bytes": est.total,
        "loss": float(loss),
    }


def child_loss(setting: str, steps: int) -> dict:
    """The training loop on the bundled sample with the built-in tiny model, ``steps`` steps."""
    from hydra import compose, initialize_config_dir

    from hydra_entry import CONF_DIR, to_object
    from ptuning.training import run

    dtype = "float32" if setting == "fp32" else "bfloat16"
    bits = {"int8": 8, "int4": 4}.get(setting, 0)
    with tempfile.TemporaryDirectory() as out:
        overrides = [
            f"train.output_dir={out}",
            f"data.cache_dir={out}/.cache",
            f"train.max_steps={steps}",
            "train.logging_steps=1",
            f"train.save_steps={steps}",
            "train.eval_steps=null",
            "train.eval_generation=false",
            "train.eval_before_training=false",
            "train.plot=false",
            f"model.dtype={dtype}",
            f"model.quantization_bit={bits}",
        ]
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = to_object(compose("train", overrides=overrides))
        begin = time.perf_counter()
        result = run(cfg)
        elapsed = time.perf_counter() - begin
        rows = [json.loads(x) for x in (Path(out) / "train_log.jsonl").read_text().splitlines() if x.strip()]
    losses = [r["loss"] for r in rows if "loss" in r]
    return {
        "setting": setting,
        "train_loss_last10": statistics.fmean(losses[-10:]),
        "train_loss_step": losses[-1],
        "eval_loss": result.eval_loss,
        "seconds": elapsed,
    }


# glibc keeps freed large blocks for reuse and raises its mmap threshold as it goes, so the peak RSS of a
# process also holds memory that no tensor uses any more, by an amount that varies from run to run (up to
# hundreds of MiB here). A fixed threshold returns every large block to the system when it is freed: the
# RSS then follows the live tensors, which is what the estimate counts.
EXACT_RSS_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def run_child(*args: str, env: dict | None = None) -> dict:
    """Runs this script in a fresh process (so its peak RSS is its own) and returns its JSON line."""
    proc = subprocess.run(
        [sys.executable, __file__, "--child", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--steps", type=int, default=6, help="train steps per setting (the first is not timed)"
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--loss-steps", type=int, default=50)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS)
    parser.add_argument(
        "--checkpointing", action="store_true", help="also measure each setting with gradient checkpointing"
    )
    parser.add_argument("--rounds", type=int, default=2, help="timing runs per setting, taken in turn")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        kind, setting, *rest = args.child
        if kind == "train":
            batch, seq, steps, ckpt = (int(x) for x in rest)
            print(json.dumps(child_train(setting, batch, seq, steps, bool(ckpt))))
        else:
            print(json.dumps(child_loss(setting, int(rest[0]))))
        return

    import torch

    # Timing rounds go over the settings in turn, so that load from other processes on a shared machine
    # touches them alike; a setting's step time is its fastest step over the rounds (the least disturbed).
    cases = [
        (setting, ckpt) for setting in args.settings for ckpt in ((0, 1) if args.checkpointing else (0,))
    ]
    train_rows = {}
    for _ in range(args.rounds):
        for setting, ckpt in cases:
            row = run_child("train", setting, str(args.batch), str(args.seq), str(args.steps), str(ckpt))
            if (setting, ckpt) in train_rows:
                train_rows[setting, ckpt]["step_times_s"] += row["step_times_s"]
                row = train_rows[setting, ckpt]
            train_rows[setting, ckpt] = row
    for (setting, ckpt), row in train_rows.items():
        exact = run_child("train", setting, str(args.batch), str(args.seq), "2", str(ckpt), env=EXACT_RSS_ENV)
        row["exact_rise_mib"] = exact["peak_rss_mib"] - exact["start_rss_mib"]
        row["step_s"] = min(row["step_times_s"])
        row["median_step_s"] = statistics.median(row["step_times_s"])
        row["tokens_per_s"] = args.batch * args.seq / row["step_s"]
    train_rows = list(train_rows.values())
    loss_rows = {}
    for setting in args.settings if args.loss_steps else ():
        loss_rows[setting] = run_child("loss", setting, str(args.loss_steps))

    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, CPU\n"
    )
    print(
        f"Bench configuration, train step batch {args.batch} x {args.seq} (step s: fastest of {args.rounds} x "
        f"{args.steps - 1} steps; median beside it):\n"
    )
    print(
        "| setting | ckpt | weight MiB | est. weight MiB | peak RSS MiB | RSS rise MiB | exact-malloc rise MiB "
        "| est. tensor peak MiB | step s | median s | tokens/s |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in train_rows:
        print(
            f"| {r['setting']} | {'yes' if r['checkpointing'] else 'no'} | {mib(r['weight_bytes'])} | "
            f"{mib(r['estimate_weight_bytes'])} | {r['peak_rss_mib']:,.0f} | {r['peak_rss_mib'] - r['start_rss_mib']:,.0f} | "
            f"{r['exact_rise_mib']:,.0f} | {mib(r['estimate_train_bytes'])} | {r['step_s']:.3f} | {r['median_step_s']:.3f} | "
            f"{r['tokens_per_s']:,.0f} |"
        )
    print(
        "\nRSS rise: over the RSS before the model was built (default allocator); exact-malloc: the same in a run "
        f"with {' '.join(f'{k}={v}' for k, v in EXACT_RSS_ENV.items())}, where the RSS follows the live tensors."
    )
    if loss_rows:
        ref = loss_rows.get("bf16")
        print(f"\nTiny built-in model, {args.loss_steps} steps on data/adgen_sample (batch 8):\n")
        print("| setting | train loss (last 10 steps) | dev loss | dev loss vs bf16 | allowed | run s |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for setting, r in loss_rows.items():
            rel = (r["eval_loss"] / ref["eval_loss"] - 1) if ref else float("nan")
            allowed = f"{LOSS_TOLERANCE[setting]:.0%}" if setting in LOSS_TOLERANCE else ""
            print(
                f"| {setting} | {r['train_loss_last10']:.4f} | {r['eval_loss']:.4f} | {rel:+.2%} | {allowed} | {r['seconds']:.1f} |"
            )
    if args.json:
        args.json.write_text(json.dumps({"train": train_rows, "loss": loss_rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
