"""``python evaluate.py``: generate over a data set with a prefix checkpoint and score BLEU-4 / ROUGE."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..config import ConfigError, LoggerConfig, ModelConfig
from ..data.config import DataConfig
from .generate import GenerationSettings, batched, generate_ids


@dataclass
class EvaluateJobConfig:
    """Everything ``python evaluate.py`` needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    # a checkpoint folder of ours or of the original P-Tuning v2 script; null = the latest checkpoint of
    # the built-in default training run (outputs/default)
    prefix_checkpoint: str | None = None
    batch_size: int = 16
    output_dir: str | None = None  # null = <checkpoint>/../eval-<checkpoint name>
    split: str = "test"  # test / validation: which data file to evaluate

    def validate(self) -> EvaluateJobConfig:
        if self.batch_size <= 0:
            raise ConfigError(f"batch_size={self.batch_size}: expected a positive integer")
        if self.generation.max_new_tokens <= 0:
            raise ConfigError(
                f"generation.max_new_tokens={self.generation.max_new_tokens}: expected a positive integer"
            )
        if self.split not in ("test", "validation"):
            raise ConfigError(f"split={self.split!r}: expected test / validation")
        self.logger.validate()
        return self


def evaluate_model(
    model,
    tokenizer,
    data_cfg: DataConfig,
    settings,
    accelerator=None,
    *,
    split: str = "validation",
    batch_size: int | None = None,
    progress: bool = True,
) -> dict:
    """Generates for every example of ``split`` and scores it. ``settings``: a :class:`GenerationSettings`
    or a training config (its ``max_new_tokens`` / ``eval_batch_size``, greedy). Work is split across the
    processes of ``accelerator``; predictions come back in input order. Returns the metrics; with
    ``return_predictions`` semantics provided by :func:`predict`."""
    metrics, _ = predict(
        model,
        tokenizer,
        data_cfg,
        settings,
        accelerator,
        split=split,
        batch_size=batch_size,
        progress=progress,
    )
    return metrics


def predict(
    model,
    tokenizer,
    data_cfg: DataConfig,
    settings,
    accelerator=None,
    *,
    split: str = "validation",
    batch_size: int | None = None,
    progress: bool = True,
) -> tuple[dict, list[dict]]:
    """Metrics and the predictions ``[{"prompt", "labels", "predict"}]`` in input order."""
    from ..data import build_datasets
    from .metrics import compute_metrics

    if not isinstance(settings, GenerationSettings):
        batch_size = batch_size or settings.eval_batch_size
        settings = GenerationSettings(max_new_tokens=settings.max_new_tokens)
    batch_size = batch_size or 16
    examples = build_datasets(data_cfg, tokenizer, split).to_list()
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    mine = list(range(rank, len(examples), world))
    # longest prompts first: less padding per batch, and the ETA errs on the safe side
    mine.sort(key=lambda i: -len(examples[i]["input_ids"]))
    was_training = model.training
    model.eval()
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), desc="generate", dynamic_ncols=True)
    outputs: list[tuple[int, str]] = []
    new_tokens = 0
    for chunk in batched(mine, batch_size):
        ids = generate_ids(
            model,
            [examples[i]["input_ids"] for i in chunk],
            settings,
            pad_id=tokenizer.pad_token_id,
            eos_id=tokenizer.eos_token_id,
        )
        new_tokens += sum(len(x) for x in ids)
        outputs += [(i, tokenizer.decode(x, skip_special_tokens=True).strip()) for i, x in zip(chunk, ids)]
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    model.train(was_training)
    if accelerator is not None and world > 1:
        from accelerate.utils import gather_object

        outputs = gather_object(outputs)
        new_tokens = sum(gather_object([new_tokens]))
    by_index = dict(outputs)
    rows = [
        {"prompt": ex["prompt"], "labels": ex["reference"], "predict": by_index[i]}
        for i, ex in enumerate(examples)
    ]
    metrics = compute_metrics([r["predict"] for r in rows], [r["labels"] for r in rows])
    metrics["new_tokens"] = new_tokens
    return metrics, rows


def default_checkpoint() -> Path:
    from ..training.checkpoint import latest_checkpoint

    found = latest_checkpoint(Path("outputs") / "default")
    if found is None:
        raise ConfigError(
            "prefix_checkpoint is not set and outputs/default holds no checkpoint: run `python train.py` "
            "first or set prefix_checkpoint=/path/to/checkpoint-N"
        )
    return found


def run(cfg: EvaluateJobConfig, *, tracker=None) -> dict:
    """Loads the model and the prefix, evaluates, writes ``generated_predictions.jsonl`` and ``metrics.json``."""
    import time

    from accelerate import Accelerator

    from ..build import load_model, load_tokenizer
    from ..training.loop import process_group_kwargs
    from ..training.checkpoint import infer_prefix_shape, load_prefix, read_prefix

    cfg.validate()
    checkpoint = Path(cfg.prefix_checkpoint) if cfg.prefix_checkpoint else default_checkpoint()
    prefix, meta = read_prefix(checkpoint)
    shape = {k: meta[k] for k in ("pre_seq_len", "prefix_projection")} if meta else infer_prefix_shape(prefix)
    cfg.model.pre_seq_len, cfg.model.prefix_projection = shape["pre_seq_len"], shape["prefix_projection"]
    cfg.model.validate()
    out = Path(cfg.output_dir) if cfg.output_dir else checkpoint.parent / f"eval-{checkpoint.name}"
    if out.resolve() == checkpoint.resolve():
        raise ConfigError(f"output_dir={out}: is the checkpoint folder; evaluation never writes into it")

    accelerator = Accelerator(kwargs_handlers=process_group_kwargs())
    model = load_model(cfg.model, device=accelerator.device)
    tokenizer = load_tokenizer(cfg.model, vocab_size=model.config.vocab_size)
    load_prefix(model, checkpoint)
    start = time.perf_counter()
    metrics, rows = predict(
        model, tokenizer, cfg.data, cfg.generation, accelerator, split=cfg.split, batch_size=cfg.batch_size
    )
    elapsed = time.perf_counter() - start
    metrics["new_tokens_per_s"] = metrics["new_tokens"] / elapsed
    metrics["checkpoint"] = str(checkpoint)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "generated_predictions.jsonl", "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
        print(format_table(metrics))
        print(f"wrote {out / 'generated_predictions.jsonl'} and {out / 'metrics.json'}")
        if tracker is not None:
            tracker.start(asdict(cfg), out, job_type="evaluate")
            tracker.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, 0)
            tracker.log_table(
                "predictions",
                ["prompt", "labels", "predict"],
                [[r["prompt"], r["labels"], r["predict"]] for r in rows],
            )
            tracker.finish()
    metrics["output_dir"] = str(out)
    return metrics


def format_table(metrics: dict) -> str:
    names = ["bleu-4", "rouge-1", "rouge-2", "rouge-l"]
    head = "| " + " | ".join(names) + " | samples | empty | new tokens/s |"
    rule = "|" + "---|" * (len(names) + 3)
    row = "| " + " | ".join(f"{metrics[n]:.2f}" for n in names)
    row += f" | {metrics['num_samples']} | {metrics['num_empty_predictions']} | {metrics['new_tokens_per_s']:.1f} |"
    return "\n".join([head, rule, row])
