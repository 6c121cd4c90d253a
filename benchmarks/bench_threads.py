"""Intra-op thread counts for the built-in default run (tiny model) on this CPU, side by side.

    python benchmarks/bench_threads.py                      # threads 1 and all cores, 5 rounds
    python benchmarks/bench_threads.py --threads 1 2 --rounds 5 --steps 40

The default run's work is measured as the run does it: training steps (forward + backward + AdamW on the
prefix, batch 8 of the bundled sample, ``train.max_steps`` 800 in the run) and generation (batch 32, 64 new
tokens, greedy, the untuned and the tuned evaluation on the bundled dev set). Each round times every thread
count in turn in this one process, so all counts see the same load from whatever else runs on the machine;
the table gives the median and the spread over rounds and the default run's time they imply.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=sorted({1, os.cpu_count() or 1}))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40, help="training steps timed per round and thread count")
    parser.add_argument("--generate", type=int, default=1, help="generation batches (32 x 64 tokens) per round")
    args = parser.parse_args()

    import torch

    from ptuning.build import load
    from ptuning.config import ModelConfig
    from ptuning.data import DataConfig, TrainingCollator, build_datasets
    from ptuning.evaluation.generate import GenerationSettings, generate_ids
    from ptuning.prefix import mark_only_prefix_trainable
    from ptuning.training.loop import token_loss_sum

    data = DataConfig(train_file=str(ROOT / "data/adgen_sample/train.json"),
                      validation_file=str(ROOT / "data/adgen_sample/dev.json"))
    loaded = load(ModelConfig())
    model, template = loaded.model, loaded.template
    mark_only_prefix_trainable(model)
    train = build_datasets(data, template, "train")
    dev = build_datasets(data, template, "validation").to_list()
    collate = TrainingCollator.from_config(template, data)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-2)
    settings = GenerationSettings(max_new_tokens=64)
    batches = [collate([train[i] for i in range(k * 8, k * 8 + 8)]) for k in range(args.steps)]
    prompts = [row["input_ids"] for row in dev[:32]]

    def steps() -> float:
        model.train()
        start = time.perf_counter()
        for batch in batches:
            loss = token_loss_sum(model, batch["input_ids"], batch["labels"])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return (time.perf_counter() - start) / len(batches)

    def generation() -> float:
        model.eval()
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(args.generate):
                generate_ids(model, prompts, settings, pad_id=template.pad_token_id, stop_ids=template.stop_token_ids)
        return (time.perf_counter() - start) / args.generate

    for threads in args.threads:  # warm-up: first calls allocate and pick kernels
        torch.set_num_threads(threads)
        steps()
        generation()
    step_s: dict[int, list[float]] = {t: [] for t in args.threads}
    gen_s: dict[int, list[float]] = {t: [] for t in args.threads}
    for round_ in range(args.rounds):
        for threads in args.threads:
            torch.set_num_threads(threads)
            step_s[threads].append(steps())
            gen_s[threads].append(generation())
        print(f"round {round_ + 1}: " + ", ".join(
            f"{t} thread(s) {step_s[t][-1] * 1000:.1f} ms/step, {gen_s[t][-1]:.2f} s/generation batch"
            for t in args.threads), flush=True)
    # the default run: 800 steps, and 200 dev rows generated twice (untuned and tuned) in batches of 32
    gen_batches = 2 * -(-200 // 32)
    print(f"\nload average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} cores")
    print("| threads | train step ms (median, min-max) | generation batch s (median, min-max) | default run s |")
    print("|---:|---:|---:|---:|")
    for t in args.threads:
        med_step, med_gen = statistics.median(step_s[t]), statistics.median(gen_s[t])
        total = 800 * med_step + gen_batches * med_gen
        print(f"| {t} | {med_step * 1000:.1f} ({min(step_s[t]) * 1000:.1f}-{max(step_s[t]) * 1000:.1f}) | "
              f"{med_gen:.2f} ({min(gen_s[t]):.2f}-{max(gen_s[t]):.2f}) | {total:.0f} |")


if __name__ == "__main__":
    main()
