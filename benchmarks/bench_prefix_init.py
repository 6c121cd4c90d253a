"""The prefix-initialisation table: the default run (``python train.py``, its steps and data) once per
``model.prefix_init`` — random (the original), zeros, text — and the dev loss and scores it ends with.

    python benchmarks/bench_prefix_init.py [--model builtin:tiny-chatglm] [--text "..."] [extra overrides ...]

Each run goes to its own folder under a temporary directory (removed afterwards); the runs share the seed,
the data and the step count, so the rows differ only in how the prefix started. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TEXT = "用简洁的广告文案描述这件商品。"  # "describe this product in concise ad copy"


def run(init: str, out: Path, model: str | None, text: str, extra: list[str]) -> dict:
    args = [sys.executable, str(ROOT / "train.py"), f"train.output_dir={out}", f"model.prefix_init={init}",
            "train.eval_before_training=false", "logger=none", *extra]
    if model:
        args.append(f"model.path={model}")
    if init == "text":
        args.append(f"model.prefix_init_text='{text}'")  # quoted: Hydra's override grammar
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"prefix_init={init} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line.strip()]
    last = {}
    for record in records:
        last.update(record)
    first_loss = next(r["loss"] for r in records if "loss" in r)
    return {"init": init, "first_logged_loss": first_loss, "eval_loss": last.get("eval_loss"),
            "rouge-l": last.get("eval_rouge-l"), "bleu-4": last.get("eval_bleu-4"), "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model.path (default: the built-in tiny ChatGLM-6B)")
    parser.add_argument("--text", default=DEFAULT_TEXT, help="model.prefix_init_text for the text row")
    parser.add_argument("overrides", nargs="*", help="more train.py overrides, e.g. train.max_steps=400")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for init in ("random", "zeros", "text"):
            rows.append(run(init, Path(tmp) / init, args.model, args.text, args.overrides))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; model: "
          f"{args.model or 'builtin:tiny-chatglm'}; overrides: {' '.join(args.overrides) or '(the default run)'}")
    print(f"text: {args.text!r}")
    print("| prefix_init | first logged train loss | dev loss | dev ROUGE-L | dev BLEU-4 | wall s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['init']} | {r['first_logged_loss']:.4f} | {r['eval_loss']:.4f} | {r['rouge-l']:.2f} | "
              f"{r['bleu-4']:.2f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
