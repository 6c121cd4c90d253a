"""Preprocessing throughput: generated ADGEN-format lines through read, check, load, tokenize, features.

Writes N lines (default 100,000) with the generator of ``data/make_adgen_sample.py`` to a temporary
folder and times the whole ``build_datasets`` path from a cold cache, once per worker count, plus
its first stage (reading and checking the rows) alone. Prints a markdown table and the machine.

    python benchmarks/bench_preprocess.py [--lines 100000] [--workers 1 2] [--tokenizer data/tokenizer]

Not a test: pytest collects ``tests/`` only.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import datasets
import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ptuning.data import DataConfig, build_datasets, read_rows  # noqa: E402
from ptuning.models.chatglm.tokenizer import ChatGLMTokenizer  # noqa: E402
from ptuning.perf import cpu_model  # noqa: E402


def load_generator():
    """The sample generator module (``data/`` is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("make_adgen_sample", ROOT / "data" / "make_adgen_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_lines(path: Path, count: int, seed: int) -> float:
    """Write ``count`` ADGEN-format lines; returns the mean characters per line (content + summary)."""
    generator = load_generator()
    rng = random.Random(seed)
    chars = 0
    with path.open("w", encoding="utf-8") as out:
        for _ in range(count):
            record = generator.make_record(rng)
            chars += len(record["content"]) + len(record["summary"])
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    return chars / count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    parser.add_argument("--tokenizer", type=Path, default=ROOT / "data" / "tokenizer")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    datasets.disable_progress_bars()
    tokenizer = ChatGLMTokenizer.from_pretrained(args.tokenizer)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "train.json"
        mean_chars = write_lines(source, args.lines, args.seed)

        start = time.perf_counter()
        read_rows(source, DataConfig())
        results.append(("read + check rows", 1, time.perf_counter() - start))

        for workers in sorted(set(args.workers)):
            cfg = DataConfig(
                train_file=str(source),
                preprocessing_num_workers=workers if workers > 1 else None,
                cache_dir=str(Path(tmp) / f"cache-{workers}"),  # cold cache for every run
            )
            start = time.perf_counter()
            dataset = build_datasets(cfg, tokenizer, "train")
            elapsed = time.perf_counter() - start
            assert dataset.num_rows == args.lines
            results.append(("full path: read, check, load, tokenize, features", workers, elapsed))

    print(f"{args.lines:,} ADGEN-format lines, {mean_chars:.1f} characters per line (content + summary)")
    print(f"tokenizer {args.tokenizer} (vocabulary {len(tokenizer):,})\n")
    print("| stage | processes | seconds | lines/s |")
    print("| --- | --- | --- | --- |")
    for stage, workers, seconds in results:
        print(f"| {stage} | {workers} | {seconds:.2f} | {args.lines / seconds:,.0f} |")
    print(
        f"\nmachine: {cpu_model()}, {os.cpu_count()} hardware threads, torch {torch.__version__} "
        f"({torch.get_num_threads()} intra-op threads), transformers {transformers.__version__}, "
        f"datasets {datasets.__version__}, Python {platform.python_version()}"
    )


if __name__ == "__main__":
    main()
