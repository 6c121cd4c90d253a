"""Training throughput with packed rows (``data.packing=true``) against padded batches, at equal tokens per step,
on the real row lengths of a data set.

    python benchmarks/bench_packing.py                                   # the bundled ADGEN sample, tiny ChatGLM-6B
    python benchmarks/bench_packing.py data=adgen_sample model=tiny_chatglm3
    python benchmarks/bench_packing.py --pack-length 256 512 1024 -- model=smollm2 data.train_file=<file>

The rows are the training features of the composed config (``key=value`` overrides as ``train.py`` takes them,
after ``--``): the family's template, ``data.max_source_length`` / ``data.max_target_length`` and all. The
timed model is that family's architecture at the bench shape (``ptuning.perf.BENCH_SHAPE``: hidden 512, 8
heads, 4 layers, intermediate 2048; the tokenizer's vocabulary), random weights, frozen, with the config's
prefix length; ``--model-size config`` times the configured model itself. A step is forward + backward + AdamW
on the prefix, as the training loop runs it:

* padded: ``--tokens-per-step`` / (mean row length) rows in the batch plan's order (a seeded shuffle),
  right-padded to the batch's longest (``train.per_device_batch_size`` rows);
* packed: ``--tokens-per-step`` / (pack_length x fill) packs of ``data.packing`` (best fit in a seeded order,
  see ``ptuning.data.packing``), padded to ``pack_length``;

so both hold the same number of row tokens per step on average (the table shows the measured ones).

The steps alternate padded / packed (each pack length) in one process, so a busy machine slows all alike;
the table gives row tokens per second (padding excluded) over all timed steps, and each packed ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BENCH = dict(hidden_size=512, num_attention_heads=8, num_layers=4, inner_hidden_size=2048)


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from hydra_entry import CONF_DIR, to_object

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra_compose("train", overrides=["train.output_dir=outputs/unused", *overrides])
    return to_object(cfg)


def bench_model(model, vocab: int, pre_seq_len: int):
    """The family's architecture at the bench shape (``model``'s own class and config with the sizes replaced)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ptuning.models.chatglm import ChatGLMForConditionalGeneration
    from ptuning.models.hf import attach_prefix, prefix_shape
    from ptuning.prefix import mark_only_prefix_trainable

    torch.manual_seed(0)
    config = model.config
    if isinstance(model, ChatGLMForConditionalGeneration):
        values = {**config.to_dict(), **BENCH, "vocab_size": vocab, "pre_seq_len": pre_seq_len, "prefix_dropout": 0.0}
        made = ChatGLMForConditionalGeneration(type(config)(**values))
    else:
        values = {**config.to_dict(), "hidden_size": BENCH["hidden_size"],
                  "num_attention_heads": BENCH["num_attention_heads"], "num_key_value_heads": 2, "head_dim": 64,
                  "num_hidden_layers": BENCH["num_layers"], "intermediate_size": BENCH["inner_hidden_size"],
                  "vocab_size": vocab}
        bench_config = type(config)(**values)
        bench_config._attn_implementation = "sdpa"
        made = AutoModelForCausalLM.from_config(bench_config)
        if hasattr(model.model, "rotary_emb"):
            made.model.rotary_emb = type(model.model.rotary_emb)(bench_config)
        attach_prefix(made, prefix_shape(bench_config, pre_seq_len))
    mark_only_prefix_trainable(made)
    return made.float().train()


def batches(rows, packed, rows_per_step: int, packs_per_step: int, steps: int, seed: int):
    """``steps`` padded batches (rows in a seeded order) and packed batches (packs in a seeded order)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(rows), generator=g).tolist()
    padded = [[rows[i] for i in order[k * rows_per_step:(k + 1) * rows_per_step]] for k in range(steps)]
    order = torch.randperm(len(packed), generator=g).tolist()
    packs = [[packed[i] for i in order[k * packs_per_step:(k + 1) * packs_per_step]] for k in range(steps)]
    return padded, packs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="config overrides (key=value), as train.py takes them")
    parser.add_argument("--pack-length", type=int, nargs="*", default=[512])
    parser.add_argument("--tokens-per-step", type=int, default=2048, help="row tokens per step (on average)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps of each kind (after one warm-up)")
    parser.add_argument("--model-size", choices=["bench", "config"], default="bench")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: torch's, or 1 for a small model)")
    args = parser.parse_args()

    import torch

    from ptuning.build import load
    from ptuning.data import PackedRows, TrainingCollator, build_datasets
    from ptuning.perf import cpu_model, set_cpu_threads

    job = compose(args.overrides)
    loaded = load(job.model)
    template = loaded.template
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in build_datasets(job.data, template, "train")]
    lengths = [len(r["input_ids"]) for r in rows]
    vocab = max(len(template.tokenizer), max(max(r["input_ids"]) for r in rows) + 1)
    model = loaded.model.float().train() if args.model_size == "config" else bench_model(loaded.model, vocab, job.model.pre_seq_len)
    if args.model_size == "config":
        from ptuning.prefix import mark_only_prefix_trainable

        mark_only_prefix_trainable(model)
    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        set_cpu_threads(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    mean = statistics.mean(lengths)
    rows_per_step = max(1, round(args.tokens_per_step / mean))
    plans = {}
    for length in args.pack_length:
        packed = PackedRows(rows, lengths, length, seed=job.train.seed)
        per_step = max(1, round(args.tokens_per_step / (length * packed.fill())))
        padded, packs = batches(rows, packed, rows_per_step, per_step, args.steps + 1, job.train.seed)
        plans[length] = (packed, per_step, packs)
    collate_rows = TrainingCollator(pad_token_id=template.pad_token_id)

    def step(batch) -> None:
        model(**batch, loss_reduction="sum", return_logits=False, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    totals = {name: [0.0, 0, 0] for name in ["padded", *args.pack_length]}  # seconds, row tokens, slots
    for k in range(args.steps + 1):
        runs = [("padded", collate_rows(padded[k]), sum(len(r["input_ids"]) for r in padded[k]))]
        for length, (_, _, packs) in plans.items():
            collate = TrainingCollator(pad_token_id=template.pad_token_id, pack_length=length)
            runs.append((length, collate(packs[k]), sum(len(p["input_ids"]) for p in packs[k])))
        for name, batch, tokens in runs:
            start = time.perf_counter()
            step(batch)
            seconds = time.perf_counter() - start
            if k:  # the first round warms up
                totals[name][0] += seconds
                totals[name][1] += tokens
                totals[name][2] += batch["input_ids"].numel()

    padded_fill = totals["padded"][1] / totals["padded"][2]
    shape = ", ".join(f"{key} {getattr(model.config, key)}" for key in
                      ("hidden_size", "num_layers", "num_hidden_layers", "vocab_size") if hasattr(model.config, key))
    print(f"{cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s); model {type(model).__name__} "
          f"({shape}), P={job.model.pre_seq_len}; data {job.data.train_file}: {len(rows)} rows of {min(lengths)}-"
          f"{max(lengths)} tokens (mean {mean:.1f}, median {statistics.median(lengths)}), max_source_length "
          f"{job.data.max_source_length}, max_target_length {job.data.max_target_length}; {args.steps} timed steps "
          "of each kind, alternating")
    print("| batches | per step | row tokens per step | filled | row tokens/s | packed / padded |")
    print("|---|---|---|---|---|---|")
    base = totals["padded"][1] / totals["padded"][0]
    print(f"| padded | {rows_per_step} rows | {totals['padded'][1] / args.steps:.0f} | {100 * padded_fill:.1f}% | "
          f"{base:,.0f} | 1.00x |")
    for length, (_, per_step, _) in plans.items():
        seconds, tokens, slots = totals[length]
        rate = tokens / seconds
        print(f"| packed, pack_length {length} | {per_step} pack(s) | {tokens / args.steps:.0f} | "
              f"{100 * tokens / slots:.1f}% | {rate:,.0f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
