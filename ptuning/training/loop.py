"""The training loop: accelerate for devices and processes, a deterministic batch plan, prefix-only
checkpoints with exact resume.

The loss of an optimizer step is the mean over every target token of its global batch (all processes,
all accumulation micro-steps), so one process and several give the same update for the same global batch.
"""

from __future__ import annotations

import math
import os
import sys
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from transformers import get_scheduler

from ..build import model_family
from ..checkpoint import (
    base_metadata,
    capture_rng,
    checkpoint_in,
    latest_checkpoint,
    load_model_with_prefix,
    load_training_state,
    restore_rng,
    save_checkpoint,
)
from ..config import TrainJobConfig
from ..distributed import Collectives, LaunchError, start
from ..evaluation.metrics import METRIC_NAMES
from ..faults import kill_point
from ..perf import matmul_peak_flops, model_train_flops_per_token, peak_memory_mib, set_cpu_threads
from ..prefix import mark_only_prefix_trainable, prefix_module_name
from ..weights import CheckpointError
from .errors import TrainingError, TrainingInterrupted
from .run_folder import (
    PLOT_FILE,
    check_output_dir,
    check_resumable,
    open_run_folder,
    past_the_end,
    resolve_resume,
    warn_changed_settings,
)


@dataclass
class TrainResult:
    output_dir: Path
    step: int
    checkpoint: Path | None
    train_loss: float | None = None
    eval_loss: float | None = None
    metrics: dict = field(default_factory=dict)
    baseline_metrics: dict = field(default_factory=dict)  # the untuned prefix (eval_before_training)
    main_process: bool = True  # False on the other processes of a run: only the main one reports


@dataclass
class _Progress:
    """How far a run got: what an interruption reports."""

    step: int = 0
    checkpoint: Path | None = None
    bar: object = None  # the progress bar, closed however the run ends


class BatchPlan:
    """Which examples form global micro-batch ``k``: epoch ``k // per_epoch`` shuffles all examples with
    ``seed + epoch`` and cuts them into global micro-batches (the incomplete last one is dropped).
    Resuming needs only ``k``."""

    def __init__(self, num_examples: int, global_batch: int, seed: int):
        self.per_epoch = num_examples // global_batch
        if self.per_epoch == 0:
            raise TrainingError(
                f"the training set has {num_examples} examples, fewer than one global batch "
                f"({global_batch} = per_device_batch_size x processes)"
            )
        self.num_examples, self.global_batch, self.seed = num_examples, global_batch, seed
        self._epoch, self._perm = -1, None

    def __call__(self, k: int) -> list[int]:
        epoch, pos = divmod(k, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.num_examples, generator=g).tolist()
        return self._perm[pos * self.global_batch : (pos + 1) * self.global_batch]


def target_count(labels: list[int]) -> int:
    """Tokens that the loss scores: labels at positions 1.. that are not -100."""
    return sum(1 for t in labels[1:] if t != -100)


def token_loss_sum(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy (float32) over the batch's target tokens: the model's loss times
    its target count. Logits are formed only where a target is predicted, and no generation cache is built
    (writing every layer's keys and values into one, and its backward, cost ~5% of a CPU step)."""
    return model(input_ids=ids, labels=labels, loss_reduction="sum", return_logits=False, use_cache=False).loss


def make_accelerator(cfg: TrainJobConfig) -> tuple[Accelerator, Collectives]:
    try:
        return start(mixed_precision=cfg.train.mixed_precision)
    except LaunchError as err:
        raise TrainingError(str(err)) from None


def gathered(params, deepspeed: bool):
    """Full values of ``params`` inside the block, also when ZeRO-3 partitions them (a collective)."""
    if deepspeed:
        import deepspeed as ds

        return ds.zero.GatheredParameters(list(params), modifier_rank=None)
    return nullcontext()


def configure_deepspeed(accelerator: Accelerator, cfg: TrainJobConfig, world: int) -> None:
    """Fills the DeepSpeed config's batch / accumulation / clipping from the training keys; a value the user
    set that contradicts them is an error naming both."""
    plugin = accelerator.state.deepspeed_plugin
    ds = plugin.deepspeed_config
    wanted = {
        "train_micro_batch_size_per_gpu": cfg.train.per_device_batch_size,
        "gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
        "train_batch_size": cfg.train.per_device_batch_size * cfg.train.gradient_accumulation_steps * world,
        "gradient_clipping": cfg.train.max_grad_norm or 0.0,
    }
    keys = {"train_micro_batch_size_per_gpu": "train.per_device_batch_size",
            "gradient_accumulation_steps": "train.gradient_accumulation_steps",
            "train_batch_size": "train.per_device_batch_size x gradient_accumulation_steps x processes",
            "gradient_clipping": "train.max_grad_norm"}
    for key, value in wanted.items():
        have = ds.get(key, "auto")
        if have != "auto" and float(have) != float(value):
            raise TrainingError(
                f"DeepSpeed config {getattr(plugin, 'hf_ds_config_file', None) or os.environ.get('ACCELERATE_DEEPSPEED_CONFIG_FILE', '')}: "
                f"{key}={have} conflicts with {keys[key]} ({value}); set it to \"auto\" or make them agree"
            )
        ds[key] = value
    for precision in ("fp16", "bf16"):
        section = ds.get(precision, {})
        if section.get("enabled") == "auto":
            section["enabled"] = cfg.train.mixed_precision == precision


def run(cfg: TrainJobConfig, *, trackers=None) -> TrainResult:
    """Trains the prefix as ``cfg`` says. ``trackers``: an optional :class:`ptuning.training.tracking.Tracker`.

    Nothing in ``train.output_dir`` is written or removed before the config, the model and the data have
    been checked. A small model on a CPU runs with one intra-op thread unless ``OMP_NUM_THREADS`` is set
    (:func:`ptuning.perf.set_cpu_threads`); the thread count is restored on return.

    Raises:
        ConfigError, DataError, CheckpointError, TrainingError: a run that cannot start or go on.
        TrainingInterrupted: Ctrl-C; says at which step it stopped and what to resume.
    """
    where = _Progress()
    threads = torch.get_num_threads()
    try:
        return _train(cfg, trackers, where)
    except KeyboardInterrupt:
        raise TrainingInterrupted(where.step, where.checkpoint) from None
    finally:
        if where.bar is not None:
            where.bar.close()
        torch.set_num_threads(threads)


def _train(cfg: TrainJobConfig, trackers, where: _Progress) -> TrainResult:
    from ..data import TrainingCollator, build_datasets  # imported here: it pulls in datasets
    from ..data.loading import check_positions

    cfg.validate()
    out = Path(cfg.train.output_dir)
    check_output_dir(out)
    model_family(cfg.model)  # a folder no family handles fails here, before anything is written
    accelerator, comm = make_accelerator(cfg)
    resume = resolve_resume(cfg)
    # a training output folder starts from its latest checkpoint, as prefix_checkpoint= takes it
    init_from = checkpoint_in(cfg.train.init_prefix_from) if cfg.train.init_prefix_from else None
    if resume is not None:
        check_resumable(resume)
    main = comm.is_main_process
    if resume is not None and main:
        changed = warn_changed_settings(cfg, resume)
        if changed:
            print(changed, file=sys.stderr)
    set_seed(cfg.train.seed)

    # the prefix starts as model.prefix_init says unless a checkpoint's prefix replaces it; loaded before
    # accelerate.prepare: ZeRO-3 partitions the parameters there
    loaded = load_model_with_prefix(cfg.model, resume or init_from, sizes="config")
    model, template, trained_meta = loaded.model, loaded.template, loaded.prefix_meta
    set_cpu_threads(model, accelerator.device)
    trainable, total = mark_only_prefix_trainable(model)
    if cfg.model.gradient_checkpointing:
        model.activation_checkpointing_enable()
    meta = base_metadata(cfg.model, model)
    changed = loaded.base_change
    if changed and resume is not None and not cfg.train.allow_base_model_change:
        raise TrainingError(
            f"{resume} {changed}: resume on the model it was trained on, or set "
            "train.allow_base_model_change=true to go on with this one on purpose"
        )
    if changed and main:
        print(f"warning: {resume or init_from} {changed}", file=sys.stderr)
    # the run's id marks its checkpoints as its own: a resumed run keeps the id of the run it continues
    run_id = (trained_meta or {}).get("run_id") if resume is not None else None
    meta["run_id"] = run_id = run_id or uuid.uuid4().hex[:12]
    # how the prompts were rendered: chat (history / conversations, the chat template) or plain (ADGEN rows)
    meta["prompt_format"] = "chat" if cfg.data.history_column or cfg.data.conversation_column else "plain"
    with accelerator.main_process_first():
        train_ds = build_datasets(cfg.data, template, "train")
        eval_ds = (build_datasets(cfg.data, template, "validation", features="train")
                   if cfg.data.validation_file else None)
        # generation features, built once for the evaluations before and after training
        gen_examples = (build_datasets(cfg.data, template, "validation").to_list()
                        if cfg.data.validation_file and (cfg.train.eval_generation or cfg.train.eval_before_training)
                        else None)
    # every process checks the same rows, so all stop with the same message
    limit = loaded.max_positions
    shorten = "lower data.max_source_length / data.max_target_length (rows are cut to them)"
    check_positions([len(x) for x in train_ds["input_ids"]], limit, cfg.data.train_file, shorten)
    if eval_ds is not None:
        check_positions([len(x) for x in eval_ds["input_ids"]], limit, cfg.data.validation_file, shorten)
    if gen_examples is not None:
        check_positions([len(x["input_ids"]) for x in gen_examples], limit, cfg.data.validation_file,
                        "lower data.max_source_length or train.max_new_tokens", extra=cfg.train.max_new_tokens,
                        what="prompts")
    collate = TrainingCollator.from_config(template, cfg.data)
    targets = [target_count(lab) for lab in train_ds["labels"]]
    world, rank, bs = comm.num_processes, comm.process_index, cfg.train.per_device_batch_size
    plan = BatchPlan(len(train_ds), bs * world, cfg.train.seed)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
    scheduler = get_scheduler(
        cfg.train.lr_scheduler,
        optimizer,
        num_warmup_steps=cfg.train.warmup_steps,
        num_training_steps=cfg.train.max_steps,
    )
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if deepspeed:
        configure_deepspeed(accelerator, cfg, world)
    model, optimizer = accelerator.prepare(model, optimizer)
    # accelerate's unwrap_model imports DeepSpeed whenever it is installed (seconds, and a warning on stdout)
    raw = accelerator.unwrap_model(model) if deepspeed else getattr(model, "module", model)

    step, micro = 0, 0
    if resume is not None:
        state = load_training_state(resume)
        if state.get("world_size", 1) != world:
            raise TrainingError(
                f"{resume} was written by {state.get('world_size', 1)} process(es); resume it with the same number "
                f"(now {world}) so the data order and optimizer state line up"
            )
        if deepspeed:
            optimizer.optimizer.load_state_dict(state["optimizer"])  # the ZeRO optimizer picks its own part
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, micro = state["step"], state["micro_batch"]
        if step > cfg.train.max_steps:
            raise past_the_end(resume, step, cfg)
        restore_rng(state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
        if main:
            print(f"resumed from {resume} at step {step}")
            if step == cfg.train.max_steps:
                print(f"{resume} is at train.max_steps={step}: nothing left to train; running the end-of-run "
                      "evaluation only (raise train.max_steps to train on)")
    where.step, where.checkpoint = step, resume
    # everything is checked: from here on the run writes (the main process only)
    log = open_run_folder(cfg, run_id, resume, step, trackers, main)

    device = accelerator.device
    peak = matmul_peak_flops(
        torch.bfloat16 if cfg.train.mixed_precision == "bf16" else torch.float32, device=device
    )
    if main:
        print(
            f"training {trainable:,} of {total:,} parameters ({100 * trainable / total:.3f}%) on {world} "
            f"process(es), {len(train_ds)} examples, {_count(cfg.train.max_steps, 'step')}"
        )

    def save(at_step: int) -> Path | None:
        rng = comm.gather_objects([capture_rng()])
        # ZeRO partitions the optimizer state: keep every rank's part
        shards = comm.gather_objects([optimizer.state_dict()]) if deepspeed else None
        path = None
        with gathered(raw.get_submodule(prefix_module_name(raw)).parameters(), deepspeed):
            if main:
                state = {
                    "optimizer": shards if deepspeed else optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "step": at_step,
                    "micro_batch": micro,
                    "rng": rng,
                    "world_size": world,
                    "skipped_nonfinite_steps": skipped,
                }
                path = save_checkpoint(out, at_step, raw, meta, state, cfg.train.save_total_limit)
        comm.barrier()
        return path

    def evaluate_loss() -> float | None:
        if eval_ds is None:
            return None
        model.eval()
        loss_sum = torch.zeros((), device=device)
        count = torch.zeros((), device=device)
        n = len(eval_ds)
        mine = list(range(rank, n, world))
        with torch.no_grad():
            for start in range(0, len(mine), cfg.train.eval_batch_size):
                batch = collate([eval_ds[i] for i in mine[start : start + cfg.train.eval_batch_size]])
                ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
                with accelerator.autocast():
                    loss_sum += token_loss_sum(model, ids, labels)
                count += (labels[:, 1:] != -100).sum()
                kill_point("eval", step)  # test-only: SIGKILL during an evaluation
        stats = comm.sum(torch.stack([loss_sum, count.float()]))
        model.train()
        return (stats[0] / stats[1]).item()

    baseline: dict = {}
    if cfg.train.eval_before_training and cfg.data.validation_file and resume is None:
        from ..evaluation.run import evaluate_model

        baseline = evaluate_model(raw, template, cfg.data, cfg.train, comm, examples=gen_examples)
        record = {"eval_loss": evaluate_loss(), **{f"eval_{k}": v for k, v in baseline.items()}}
        log.write({"step": 0, **record})
        if trackers is not None and main:
            trackers.log(record, 0)
        if main:
            print(f"untuned prefix: eval loss {record['eval_loss']:.4f}, "
                  + ", ".join(f"{k} {baseline[k]:.2f}" for k in METRIC_NAMES))

    progress = None
    if main:
        from tqdm.auto import tqdm

        progress = where.bar = tqdm(total=cfg.train.max_steps, initial=step, desc="train", dynamic_ncols=True)
    window_loss, window_steps, window_tokens, window_samples = 0.0, 0, 0, 0
    window_start = time.perf_counter()
    shown: dict[str, str] = {}  # the progress bar's postfix
    last_checkpoint = resume
    train_loss = eval_loss = None
    # a resumed run goes on counting: the metric covers the whole run
    skipped = state.get("skipped_nonfinite_steps", 0) if resume is not None else 0
    model.train()
    while step < cfg.train.max_steps:
        step += 1
        batches = [plan(micro + a) for a in range(cfg.train.gradient_accumulation_steps)]
        micro += len(batches)
        global_targets = sum(targets[i] for b in batches for i in b)
        local_loss = torch.zeros((), device=device)
        local_tokens = 0
        for a, indices in enumerate(batches):
            batch = collate([train_ds[i] for i in indices[rank * bs : (rank + 1) * bs]])
            ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
            sync = a == len(batches) - 1
            # DDP and DeepSpeed average gradients over processes: scale so the update is the global token mean
            scale = world / max(global_targets, 1)
            if deepspeed:
                with accelerator.autocast():
                    loss_sum = token_loss_sum(model, ids, labels)
                model.set_gradient_accumulation_boundary(sync)
                model.backward(loss_sum * scale, scale_wrt_gas=False)
                if sync:
                    model.step()  # clips with the config's gradient_clipping, then the optimizer step
            else:
                with nullcontext() if sync else accelerator.no_sync(model):
                    with accelerator.autocast():
                        loss_sum = token_loss_sum(model, ids, labels)
                    accelerator.backward(loss_sum * scale)
            local_loss += loss_sum.detach()
            local_tokens += ids.numel()
        comm.average_gradients(params)  # no-op unless accelerate could not set up DDP itself
        kill_point("step", step)  # test-only: SIGKILL with the gradients computed, the update not applied
        if deepspeed:
            grad_norm = model.get_global_grad_norm()
            grad_norm = float("nan") if grad_norm is None else grad_norm
        elif cfg.train.max_grad_norm is not None:
            grad_norm = accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm)
        else:
            grad_norm = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in params if p.grad is not None])
            )
        grad_norm = float(grad_norm)
        stats = comm.sum(torch.tensor([local_loss.item(), float(local_tokens)], device=device))
        step_loss = stats[0].item() / max(global_targets, 1)
        if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
            if cfg.train.mixed_precision == "fp16":
                # skipped and counted. A loss scaler (fp16 on a GPU) must see the overflow: its step skips
                # the update and lowers the scale. Without one (accelerate has none on a CPU; DeepSpeed
                # scales inside model.step()) a step would apply the non-finite gradients: drop them.
                if accelerator.scaler is not None:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                log.write({"step": step, "skipped_nonfinite_steps": skipped})
                if step % cfg.train.save_steps == 0 or step == cfg.train.max_steps:
                    # the checkpoint schedule holds whether or not this step updated (else a skipped last
                    # step would leave the run without its final checkpoint)
                    try:
                        last_checkpoint = save(step)
                    except CheckpointError as err:
                        raise TrainingError(str(err)) from None
                where.step, where.checkpoint = step, last_checkpoint
                continue
            last = latest_checkpoint(out)
            raise TrainingError(
                f"step {step}: non-finite {'loss' if not math.isfinite(step_loss) else 'gradient norm'} "
                f"(loss={step_loss}, grad_norm={grad_norm}); last good checkpoint: {last or 'none'}"
            )
        if not deepspeed:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        scheduler.step()

        window_loss += step_loss
        window_steps += 1
        window_tokens += int(stats[1].item())
        window_samples += bs * world * len(batches)
        train_loss = step_loss
        if progress is not None:
            progress.update(1)
            # tokens/s is the last logging window's (a single step's timing jitters too much to read)
            shown.update(loss=f"{step_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}", grad_norm=f"{grad_norm:.3f}")
            progress.set_postfix(shown)
        if step % cfg.train.logging_steps == 0 or step == cfg.train.max_steps:
            elapsed = time.perf_counter() - window_start
            tokens_per_s = window_tokens / elapsed
            seq = window_tokens / max(window_samples, 1)
            achieved = model_train_flops_per_token(raw, int(round(seq))) * tokens_per_s
            record = {
                "step": step,
                "loss": window_loss / window_steps,
                "learning_rate": scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "tokens_per_s": tokens_per_s,
                "samples_per_s": window_samples / elapsed,
                "peak_memory_mib": peak_memory_mib(device),
                "matmul_peak_fraction": achieved / peak,
                "skipped_nonfinite_steps": skipped,
            }
            log.write(record)
            if trackers is not None and main:
                trackers.log(record, step)
            if progress is not None:
                shown["tokens_per_s"] = f"{tokens_per_s:,.0f}"
                progress.set_postfix(shown)
            window_loss, window_steps, window_tokens, window_samples = 0.0, 0, 0, 0
            window_start = time.perf_counter()
        if cfg.train.eval_steps and step % cfg.train.eval_steps == 0 and step != cfg.train.max_steps:
            eval_loss = evaluate_loss()
            if eval_loss is not None:
                log.write({"step": step, "eval_loss": eval_loss})
                if trackers is not None and main:
                    trackers.log({"eval_loss": eval_loss}, step)
                if progress is not None:
                    progress.write(f"step {step}: eval loss {eval_loss:.4f}")
        if step % cfg.train.save_steps == 0 or step == cfg.train.max_steps:
            try:
                last_checkpoint = save(step)
            except CheckpointError as err:
                raise TrainingError(str(err)) from None
            kill_point("saved", step)  # test-only: SIGKILL right after a checkpoint
        where.step, where.checkpoint = step, last_checkpoint
    if progress is not None:
        progress.close()

    eval_loss = evaluate_loss()
    metrics: dict = {}
    if eval_loss is not None:
        log.write({"step": step, "eval_loss": eval_loss})
    if cfg.train.eval_generation and cfg.data.validation_file:
        from ..evaluation.run import evaluate_model

        metrics = evaluate_model(raw, template, cfg.data, cfg.train, comm, examples=gen_examples)
        log.write({"step": step, **{f"eval_{k}": v for k, v in metrics.items()}})
    if trackers is not None and main:
        trackers.log({"eval_loss": eval_loss, **{f"eval_{k}": v for k, v in metrics.items()}}, step)
    if main:
        if cfg.train.plot:
            from .plot import plot_losses

            plot_losses(log.records(), out / PLOT_FILE)
        if trackers is not None:
            trackers.finish()
    comm.barrier()
    return TrainResult(out, step, last_checkpoint, train_loss, eval_loss, metrics, baseline, main)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
