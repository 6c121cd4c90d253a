"""The training recipe: accelerate for devices and processes, a deterministic batch plan, prefix-only
checkpoints with exact resume.

A run is a :class:`Recipe` read in the order it happens (as torchtune's recipes and litgpt's ``fit``):

* :meth:`Recipe.setup`: check everything (config, output folder, resume), with the output folder held for
  this run (:func:`~ptuning.training.run_folder.hold_run_folder`), load the model with its prefix, the data,
  the optimizer, restore the training state of a resumed run, then make the run's first writes;
* :meth:`Recipe.evaluate_before_training`: score the base model, no prefix (``train.eval_before_training``);
* :meth:`Recipe.train`: optimizer steps (:meth:`Recipe.step_gradients`), each followed by logging, an evaluation
  (:meth:`Recipe.evaluate_loss`) and a checkpoint (:meth:`Recipe.save`) when they are due;
* :meth:`Recipe.finish`: the end-of-run evaluation, the loss plot, the result.

The loss of an optimizer step is the mean over every target token of its global batch (all processes,
all accumulation micro-steps), so one process and several give the same update for the same global batch.
The output folder's rules are in :mod:`ptuning.training.run_folder`.
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
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..build import model_family
from ..checkpoint import (
    base_metadata,
    capture_rng,
    checkpoint_in,
    ignored_config_prefix,
    latest_checkpoint,
    load_model_with_prefix,
    load_training_state,
    prune_checkpoints,
    restore_rng,
    save_checkpoint,
)
from ..config import ConfigError, TrainJobConfig
from ..data import DataError, PackedRows, TrainingCollator, build_datasets
from ..data.loading import check_positions
from ..distributed import (
    Collectives,
    LaunchError,
    full_state,
    gathered_for_generation,
    on_every_process,
    shard_apart,
    sharded_state,
    sharding_summary,
    start,
)
from ..evaluation.metrics import METRIC_NAMES
from ..evaluation.run import predict
from ..faults import kill_point
from ..perf import matmul_peak_flops, model_train_flops_per_token, peak_memory_mib, set_cpu_threads
from ..prefix import PrefixKV, mark_only_prefix_trainable, no_prefix, prefix_module_name
from ..weights import CheckpointError
from .errors import TrainingError, TrainingInterrupted
from .plot import plot_losses
from .run_folder import (
    PLOT_FILE,
    FolderLock,
    check_output_dir,
    check_resumable,
    hold_run_folder,
    open_run_folder,
    past_the_end,
    resolve_resume,
    update_settings,
    warn_changed_settings,
    write_failure,
)

# the one-line errors of a run that cannot start or go on: every process of a run stops with the same one
USER_ERRORS = (ConfigError, DataError, CheckpointError, TrainingError)


def check_fsdp_settings(accelerator, cfg: TrainJobConfig) -> None:
    """Refuses FSDP2's own activation checkpointing (``fsdp_activation_checkpointing: true`` in the accelerate
    config) together with ``model.gradient_checkpointing=true``: both would checkpoint every layer.

    Raises:
        TrainingError: both are on (every process raises it alike, before the model is loaded).
    """
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if (accelerator.is_fsdp2 and plugin is not None and plugin.activation_checkpointing
            and cfg.model.gradient_checkpointing):
        raise TrainingError("fsdp_activation_checkpointing and model.gradient_checkpointing both checkpoint every "
                            "layer: keep model.gradient_checkpointing and set fsdp_activation_checkpointing: false "
                            "in the accelerate config")


def check_one_global_batch(cfg: TrainJobConfig, units: int, world: int) -> None:
    """Refuses a training set of fewer ``units`` (examples, or packed sequences with ``data.packing``) than
    one global batch (``train.per_device_batch_size`` x ``world`` processes), saying which keys to change.

    Raises:
        TrainingError: one line with the counts, the keys as the command line writes them and what to do.
    """
    per_device = cfg.train.per_device_batch_size
    if units >= per_device * world:
        return
    if cfg.data.packing:
        what = (f"{_count(units, 'packed sequence')} of {cfg.data.pack_length} tokens (data.pack_length="
                f"{cfg.data.pack_length})")
        fix = "lower data.pack_length or train.per_device_batch_size, or train on more rows"
    else:
        what, fix = _count(units, "example"), "lower train.per_device_batch_size, or train on more rows"
    raise TrainingError(
        f"the training set has {what}, fewer than one global batch of {per_device * world} "
        f"(train.per_device_batch_size={per_device} x {_count(world, 'process')}): {fix}"
    )


@dataclass
class TrainResult:
    """What :func:`run` returns.

    Attributes:
        output_dir: the run's output folder.
        step: the optimizer steps done (``train.max_steps`` when it ran to the end).
        checkpoint: the last checkpoint folder written (None: none was).
        train_loss: the last optimizer step's loss (mean next-token cross-entropy over its global batch, in
            nats), None before any step.
        eval_loss: the final validation loss (mean over every target token of the validation set, nats), None
            without a validation set.
        metrics: the final BLEU-4 / ROUGE-1/2/L (percent) of the validation set's generated answers (empty
            without ``train.eval_generation`` or a validation set).
        baseline_metrics: the same metrics of the base model with no prefix (``train.eval_before_training``),
            or empty.
        main_process: False on the other processes of a run: only the main one reports.
    """

    output_dir: Path
    step: int
    checkpoint: Path | None
    train_loss: float | None = None
    eval_loss: float | None = None
    metrics: dict = field(default_factory=dict)
    baseline_metrics: dict = field(default_factory=dict)  # the base model, no prefix (eval_before_training)
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
        if self.per_epoch == 0:  # a run checks this first, naming its keys (check_one_global_batch)
            raise TrainingError(f"the training set has {num_examples} examples, fewer than one global batch of "
                                f"{global_batch}")
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


def token_loss_sum(model, ids: torch.Tensor, labels: torch.Tensor, **inputs) -> torch.Tensor:
    """Summed next-token cross-entropy (float32) over the batch's target tokens: the model's loss times
    its target count. Logits are formed only where a target is predicted, and no generation cache is built
    (writing every layer's keys and values into one, and its backward, cost ~5% of a CPU step). ``inputs``:
    further model inputs of the batch (``sequence_ids`` of packed rows)."""
    return model(input_ids=ids, labels=labels, loss_reduction="sum", return_logits=False, use_cache=False,
                 **inputs).loss


def model_inputs(batch: dict, device) -> dict:
    """The collated batch's model inputs besides ``input_ids`` and ``labels`` (e.g. ``sequence_ids``), on ``device``."""
    return {key: value.to(device) for key, value in batch.items() if key not in ("input_ids", "labels")}


def make_accelerator(cfg: TrainJobConfig) -> tuple[Accelerator, Collectives]:
    """This process's ``Accelerator`` (``train.mixed_precision``) and the run's collectives
    (:func:`ptuning.distributed.start`).

    Raises:
        TrainingError: the processes were launched in a way that cannot synchronise (raised alike on every
            process).
    """
    try:
        return start(mixed_precision=cfg.train.mixed_precision)
    except LaunchError as err:  # how the processes were started: every one of them sees it
        raise on_every_process(TrainingError(str(err))) from None


def gathered(params, deepspeed: bool):
    """Full values of ``params`` inside the block, also when ZeRO-3 partitions them (a collective)."""
    if deepspeed:
        import deepspeed as ds

        return ds.zero.GatheredParameters(list(params), modifier_rank=None)
    return nullcontext()


def check_generation_under_zero3(accelerator: Accelerator, cfg: TrainJobConfig) -> None:
    """Refuses generation during training (``train.eval_generation``, ``train.eval_before_training``) under
    DeepSpeed ZeRO-3, before anything is loaded: each process decodes its own rows, for as many steps as its
    answers need, while every ZeRO-3 forward gathers each layer's weights with all processes (a process that
    stops decoding first leaves the others waiting, or gloo fails on mismatched sizes).

    Raises:
        TrainingError: the keys that are on and what to do instead.
    """
    if accelerator.distributed_type != DistributedType.DEEPSPEED or accelerator.state.deepspeed_plugin.zero_stage != 3:
        return
    keys = [k for k in ("eval_generation", "eval_before_training") if getattr(cfg.train, k)]
    if not keys or not cfg.data.validation_file:
        return
    raise TrainingError(
        f"{' and '.join(f'train.{k}=true' for k in keys)}: generation during training does not run under DeepSpeed "
        "ZeRO-3 (each process decodes its own number of steps; ZeRO-3 gathers every layer with all processes); "
        f"set {' '.join(f'train.{k}=false' for k in keys)} and score the checkpoints with evaluate.py, or use "
        "ZeRO-2 or FSDP2 (launch/accelerate/fsdp2.yaml)"
    )


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
    been checked, but the lock file by which the main process holds the folder for the run (made first, and
    removed when the run ends). With several processes an error stops every process with the same one. A
    small model on a CPU runs with one intra-op thread unless ``OMP_NUM_THREADS`` is set
    (:func:`ptuning.perf.set_cpu_threads`); the thread count is restored on return.

    Raises:
        ConfigError, DataError, CheckpointError, TrainingError: a run that cannot start or go on.
        TrainingInterrupted: Ctrl-C; says at which step it stopped and what to resume.
    """
    where = _Progress()
    threads = torch.get_num_threads()
    recipe = Recipe(cfg, trackers, where)
    try:
        recipe.setup()
        recipe.evaluate_before_training()
        recipe.train()
        return recipe.finish()
    except KeyboardInterrupt:
        raise TrainingInterrupted(where.step, where.checkpoint) from None
    finally:
        if where.bar is not None:
            where.bar.close()
        if recipe.lock is not None:  # the folder is free for the next run (a killed run's lock goes with it)
            recipe.lock.release(wrote=recipe.log is not None)
        torch.set_num_threads(threads)


@dataclass
class _Window:
    """The steps since the last log line: their mean loss and throughput."""

    loss: float = 0.0
    steps: int = 0
    tokens: int = 0
    samples: int = 0
    start: float = field(default_factory=time.perf_counter)


class Recipe:
    """One training run, phase by phase (see the module's docstring). Each phase reads and sets the run's
    state on ``self``: the step and micro-batch counters, the model (``model`` as accelerate prepared it,
    ``raw`` the model itself), the optimizer and scheduler, the data and the log."""

    def __init__(self, cfg: TrainJobConfig, trackers, where: _Progress):
        self.cfg, self.trackers, self.where = cfg, trackers, where
        self.step = self.micro = self.skipped = 0
        self.last_checkpoint: Path | None = None
        self.train_loss: float | None = None
        self.eval_loss: float | None = None
        self.baseline: dict = {}
        self.progress = None
        self.lock: FolderLock | None = None  # the main process's hold on the output folder
        self.log = None  # the run's log, once the run has written its first files

    # ---- set-up ----

    def setup(self) -> None:
        """Everything before the first step; nothing is written before the last check has passed."""
        self._check()
        # every process loads and checks the same inputs; any error stops every process with one message
        self.comm.together(self._load_model, USER_ERRORS)
        self.comm.together(self._load_data, USER_ERRORS)
        self._build_optimizer()
        self.comm.together(self._restore, USER_ERRORS)
        # everything is checked: from here on the run writes (the main process only)
        self.log = self.comm.together(
            lambda: open_run_folder(self.cfg, self.run_id, self.resume, self.step, self.trackers, self.main,
                                    defer_failures=self.world > 1),
            USER_ERRORS,
        )
        self.peak = matmul_peak_flops(
            torch.bfloat16 if self.cfg.train.mixed_precision == "bf16" else torch.float32, device=self.device
        )
        if self.main:
            self._announce()

    def _announce(self) -> None:
        """The start-up lines: what trains, on how many processes, for how long."""
        meta = self.meta
        note = ignored_config_prefix(self.cfg.model.resolved_path,
                                     f"the prefix is model.pre_seq_len={meta['pre_seq_len']}")
        if note:
            print(note, file=sys.stderr)
        print(
            f"training {self.trainable:,} of {self.total:,} parameters ({100 * self.trainable / self.total:.3f}%, a "
            f"{meta['pre_seq_len']}-token prefix{' with projection' if meta['prefix_projection'] else ''}) on "
            f"{self.world} process(es), {len(self.train_ds)} examples"
            + (f" in {len(self.units)} {self.unit} ({100 * self.units.fill():.1f}% filled)" if self.cfg.data.packing
               else "")
            + f", {_count(self.cfg.train.max_steps, 'step')}"
        )
        if self.fsdp:
            print(f"FSDP2 shards the model over {self.world} process(es) in these units: {sharding_summary(self.raw)}")

    def _check(self) -> None:
        """The config, the output folder (taken for this run by the main process) and the checkpoint to resume
        or start from, before any loading."""
        cfg = self.cfg
        try:
            cfg.validate()
        except ConfigError as err:  # the same config on every process
            raise on_every_process(err) from None
        self.out = Path(cfg.train.output_dir)
        self.accelerator, self.comm = make_accelerator(cfg)
        self.device = self.accelerator.device
        self.main = self.comm.is_main_process
        self.world, self.rank = self.comm.num_processes, self.comm.process_index
        self.comm.together(lambda: (check_fsdp_settings(self.accelerator, cfg),
                                    check_generation_under_zero3(self.accelerator, cfg)), USER_ERRORS)
        # a folder no family handles fails here, before anything is written
        self.comm.together(lambda: (check_output_dir(self.out), model_family(cfg.model)), USER_ERRORS)
        # the main process holds the folder and decides what to resume, for every process
        self.resume = self.comm.from_main(self._hold_and_resolve, USER_ERRORS)
        # a training output folder starts from its latest checkpoint, as prefix_checkpoint= takes it
        self.init_from = checkpoint_in(cfg.train.init_prefix_from) if cfg.train.init_prefix_from else None
        if self.resume is not None and self.main:
            changed = warn_changed_settings(cfg, self.resume)
            if changed:
                print(changed, file=sys.stderr)
        set_seed(cfg.train.seed)

    def _hold_and_resolve(self) -> Path | None:
        """(Main process.) Takes the output folder for this run, before anything in it is read, written or
        removed; then the checkpoint to resume (None: a fresh run)."""
        self.lock = hold_run_folder(self.out)
        kill_point("locked", 0)  # test-only: a SIGKILL with the folder held, nothing written yet
        resume = resolve_resume(self.cfg)
        if resume is not None:
            check_resumable(resume)
        return resume

    def _load_model(self) -> None:
        """The model with the prefix to train: the checkpoint's (resume, ``train.init_prefix_from``) or a new
        one initialised as ``model.prefix_init`` says; only the prefix trainable. Also the metadata its
        checkpoints record, with the run's id."""
        cfg, resume = self.cfg, self.resume
        # loaded before accelerate.prepare: ZeRO-3 partitions the parameters there
        loaded = load_model_with_prefix(cfg.model, resume or self.init_from, sizes="config")
        self.loaded, self.model, self.template = loaded, loaded.model, loaded.template
        set_cpu_threads(self.model, self.device)
        self.trainable, self.total = mark_only_prefix_trainable(self.model)
        if cfg.model.gradient_checkpointing:
            self.model.activation_checkpointing_enable()
        changed = loaded.base_change
        if changed and resume is not None and not cfg.train.allow_base_model_change:
            raise TrainingError(
                f"{resume} {changed}: resume on the model it was trained on, or set "
                "train.allow_base_model_change=true to go on with this one on purpose"
            )
        if changed and self.main:
            print(f"warning: {resume or self.init_from} {changed}", file=sys.stderr)
        self.meta = base_metadata(cfg.model, self.model)
        # the run's id marks its checkpoints as its own: a resumed run keeps the id of the run it continues
        run_id = (loaded.prefix_meta or {}).get("run_id") if resume is not None else None
        self.meta["run_id"] = self.run_id = run_id or uuid.uuid4().hex[:12]
        # how the prompts were rendered: chat (history / conversations, the chat template) or plain (ADGEN rows)
        chat = cfg.data.history_column or cfg.data.conversation_column
        self.meta["prompt_format"] = "chat" if chat else "plain"
        # the settings that shape the updates, which a resume of this checkpoint is compared with
        self.meta["update_settings"] = update_settings(cfg)

    def _load_data(self) -> None:
        """The training set (and its batch plan), the validation set for the loss and its generation
        features, each checked against the model's positions."""
        cfg, template = self.cfg, self.template
        failure = None
        with self.accelerator.main_process_first():  # the main process fills the datasets cache first
            try:
                self.train_ds = build_datasets(cfg.data, template, "train")
                self.eval_ds = (build_datasets(cfg.data, template, "validation", features="train")
                                if cfg.data.validation_file else None)
                # generation features, built once for the evaluations before and after training
                generate = cfg.data.validation_file and (cfg.train.eval_generation or cfg.train.eval_before_training)
                self.gen_examples = build_datasets(cfg.data, template, "validation").to_list() if generate else None
            except USER_ERRORS as err:  # raised once every process has left the block (it ends in a barrier)
                failure = err
        if failure is not None:
            raise failure
        # every process checks the same rows, so all stop with the same message
        limit = self.loaded.max_positions
        shorten = "lower data.max_source_length / data.max_target_length (rows are cut to them)"
        check_positions([len(x) for x in self.train_ds["input_ids"]], limit, cfg.data.train_file, shorten)
        if self.eval_ds is not None:
            check_positions([len(x) for x in self.eval_ds["input_ids"]], limit, cfg.data.validation_file, shorten)
        if self.gen_examples is not None:
            check_positions([len(x["input_ids"]) for x in self.gen_examples], limit, cfg.data.validation_file,
                            "lower data.max_source_length or train.max_new_tokens", extra=cfg.train.max_new_tokens,
                            what="prompts")
        self.collate = TrainingCollator.from_config(template, cfg.data)
        self.targets = [target_count(lab) for lab in self.train_ds["labels"]]
        # the batch plan draws rows, or packs of rows (made once from the row lengths and the seed)
        self.units, self.unit = self.train_ds, "examples"
        if cfg.data.packing:
            try:
                self.units = PackedRows.from_rows(self.train_ds, cfg.data.pack_length, cfg.train.seed)
            except ValueError as err:
                raise TrainingError(f"{cfg.data.train_file}: {err}") from None
            self.targets = self.units.per_pack(self.targets)
            self.unit = f"packed sequences of {cfg.data.pack_length} tokens"
        check_one_global_batch(cfg, len(self.units), self.world)
        self.plan = BatchPlan(len(self.units), cfg.train.per_device_batch_size * self.world, cfg.train.seed)

    def _build_optimizer(self) -> None:
        """AdamW over the prefix and the learning-rate schedule; accelerate (DDP, DeepSpeed, FSDP2) wraps the
        model and the optimizer. Under FSDP2 the prefix encoder is its own float32 unit
        (:func:`~ptuning.distributed.shard_apart`), sharded before the optimizer takes its parameters."""
        train = self.cfg.train
        self.fsdp = self.accelerator.is_fsdp2
        if self.fsdp:
            shard_apart(self.accelerator, self.model.get_submodule(prefix_module_name(self.model)))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.params, lr=train.learning_rate, weight_decay=train.weight_decay)
        self.scheduler = get_scheduler(
            train.lr_scheduler,
            optimizer,
            num_warmup_steps=train.warmup_steps,
            num_training_steps=train.max_steps,
        )
        self.deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED
        if self.deepspeed:
            self.comm.together(lambda: configure_deepspeed(self.accelerator, self.cfg, self.world), USER_ERRORS)
        self.model, self.optimizer = self.accelerator.prepare(self.model, optimizer)
        # accelerate's unwrap_model imports DeepSpeed whenever it is installed (seconds, and a warning on stdout)
        if self.deepspeed:
            self.raw = self.accelerator.unwrap_model(self.model)
        else:
            self.raw = getattr(self.model, "module", self.model)  # DDP's module; FSDP2 shards the model in place

    def _restore(self) -> None:
        """A resumed run's optimizer, scheduler, counters and RNG states, as its checkpoint saved them."""
        resume = self.resume
        self.last_checkpoint = resume
        if resume is not None:
            state = load_training_state(resume)
            if state.get("world_size", 1) != self.world:
                raise TrainingError(
                    f"{resume} was written by {state.get('world_size', 1)} process(es); resume it with the same "
                    f"number (now {self.world}) so the data order and optimizer state line up"
                )
            if self.deepspeed:
                self.optimizer.optimizer.load_state_dict(state["optimizer"])  # the ZeRO optimizer picks its own part
            elif self.fsdp:  # the whole state, as one process has it: each process takes its shards
                params = [p for group in self.optimizer.param_groups for p in group["params"]]
                self.optimizer.load_state_dict(sharded_state(state["optimizer"], params))
            else:
                self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.step, self.micro = state["step"], state["micro_batch"]
            if self.step > self.cfg.train.max_steps:
                raise past_the_end(resume, self.step, self.cfg)
            note = restore_rng(state["rng"][self.rank] if self.rank < len(state["rng"]) else state["rng"][0])
            if note and self.main:
                print(f"warning: {resume}: {note}", file=sys.stderr)
            # a resumed run goes on counting: the metric covers the whole run
            self.skipped = state.get("skipped_nonfinite_steps", 0)
            if self.main:
                print(f"resumed from {resume} at step {self.step}")
                if self.step == self.cfg.train.max_steps:
                    print(f"{resume} is at train.max_steps={self.step}: nothing left to train; running the "
                          "end-of-run evaluation only (raise train.max_steps to train on)")
        self.where.step, self.where.checkpoint = self.step, resume

    # ---- evaluate ----

    def evaluate_before_training(self) -> None:
        """``train.eval_before_training``: the base model's loss and generation metrics (the model as published,
        no prefix: the baseline, not the prefix before training), logged at step 0."""
        cfg = self.cfg
        if not (cfg.train.eval_before_training and cfg.data.validation_file and self.resume is None):
            return
        base = no_prefix(self.raw)
        self.baseline = self.generation_metrics(prefix=base)
        record = {"eval_loss": self.evaluate_loss(base), **{f"eval_{k}": v for k, v in self.baseline.items()}}
        self.log.write({"step": 0, **record})
        if self.trackers is not None and self.main:
            self.trackers.log(record, 0)
        if self.main:
            print(f"base model (no prefix): eval loss {record['eval_loss']:.4f}, "
                  + ", ".join(f"{k} {self.baseline[k]:.2f}" for k in METRIC_NAMES))

    def generation_metrics(self, prefix: PrefixKV | None = None) -> dict:
        """BLEU/ROUGE of the validation set's answers through the decode loop (all processes; the metrics of
        :func:`~ptuning.evaluation.run.predict`); ``prefix`` replaces the model's own
        (:func:`~ptuning.prefix.no_prefix`: the base model). Under FSDP2 on the model gathered whole on every
        process (:func:`~ptuning.distributed.gathered_for_generation`: each decodes its own rows)."""
        with gathered_for_generation(self.raw):
            metrics, _ = predict(self.raw, self.template, self.cfg.data, self.cfg.train, self.comm,
                                 examples=self.gen_examples, prefix=prefix)
        return metrics

    def evaluate_loss(self, prefix: PrefixKV | None = None) -> float | None:
        """The validation loss: the mean over every target token of the validation set (all processes);
        None without a validation set. ``prefix`` replaces the model's own (:func:`~ptuning.prefix.no_prefix`:
        the base model)."""
        if self.eval_ds is None:
            return None
        self.model.eval()
        loss_sum = torch.zeros((), device=self.device)
        count = torch.zeros((), device=self.device)
        mine = list(range(self.rank, len(self.eval_ds), self.world))
        size = self.cfg.train.eval_batch_size
        # a sharded forward is a collective: under FSDP2 / ZeRO-3 every process runs as many as the first (which
        # has the most rows); one that has run out scores its first row again and counts nothing
        sharded = self.fsdp or (self.deepspeed and self.accelerator.state.deepspeed_plugin.zero_stage == 3)
        batches = math.ceil(len(range(0, len(self.eval_ds), self.world)) / size) if sharded else None
        with torch.no_grad():
            for start in range(0, len(mine) if batches is None else batches * size, size):
                rows, weight = mine[start : start + size], 1.0
                if not rows:
                    rows, weight = mine[:1] or [0], 0.0
                batch = self.collate([self.eval_ds[i] for i in rows])
                ids, labels = batch["input_ids"].to(self.device), batch["labels"].to(self.device)
                with self.accelerator.autocast():
                    loss_sum += weight * token_loss_sum(self.model, ids, labels, prefix=prefix)
                count += weight * (labels[:, 1:] != -100).sum()
                kill_point("eval", self.step)  # test-only: SIGKILL during an evaluation
        stats = self.comm.sum(torch.stack([loss_sum, count.float()]))
        self.model.train()
        return (stats[0] / stats[1]).item()

    # ---- train ----

    def train(self) -> None:
        """Optimizer steps up to ``train.max_steps``; after each, the log line, the evaluation and the
        checkpoint that are due."""
        max_steps = self.cfg.train.max_steps
        if self.main:
            self.progress = self.where.bar = tqdm(total=max_steps, initial=self.step, desc="train",
                                                  dynamic_ncols=True)
        self.window = _Window()
        self.shown: dict[str, str] = {}  # the progress bar's postfix
        self.model.train()
        while self.step < max_steps:
            self.step += 1
            loss, grad_norm, tokens, samples = self.step_gradients()
            if math.isfinite(loss) and math.isfinite(grad_norm):
                self._update()
                self.where.step = self.step  # Ctrl-C from here on: this step is done (its update applied)
                self._log_step(loss, grad_norm, tokens, samples)
                self._evaluate_if_due()
                if self._save_if_due():
                    kill_point("saved", self.step)  # test-only: SIGKILL right after a checkpoint
            else:
                self._skip_nonfinite_step(loss, grad_norm)
            self.where.step, self.where.checkpoint = self.step, self.last_checkpoint
        if self.progress is not None:
            self.progress.close()

    def step_gradients(self) -> tuple[float, float, int, int]:
        """The gradients of one optimizer step over its global batch (every accumulation micro-batch of every
        process), scaled so that the update follows the mean loss over the global batch's target tokens.

        Returns:
            The step's loss (that mean), the gradient norm (clipped to ``train.max_grad_norm`` when set), and
            the tokens and examples of the global batch.
        """
        bs = self.cfg.train.per_device_batch_size
        batches = [self.plan(self.micro + a) for a in range(self.cfg.train.gradient_accumulation_steps)]
        self.micro += len(batches)
        global_targets = sum(self.targets[i] for b in batches for i in b)
        # DDP and DeepSpeed average gradients over processes: scale so the update is the global token mean
        scale = self.world / max(global_targets, 1)
        local_loss = torch.zeros((), device=self.device)
        local_tokens = 0
        for a, indices in enumerate(batches):
            batch = self.collate([self.units[i] for i in indices[self.rank * bs : (self.rank + 1) * bs]])
            ids, labels = batch["input_ids"].to(self.device), batch["labels"].to(self.device)
            inputs = model_inputs(batch, self.device)
            local_loss += self._backward(ids, labels, inputs, scale, sync=a == len(batches) - 1).detach()
            local_tokens += ids.numel()
        self.comm.average_gradients(self.params)  # no-op unless accelerate could not set up DDP itself
        kill_point("step", self.step)  # test-only: SIGKILL with the gradients computed, the update not applied
        grad_norm = self._grad_norm()
        stats = self.comm.sum(torch.tensor([local_loss.item(), float(local_tokens)], device=self.device))
        loss = stats[0].item() / max(global_targets, 1)
        return loss, grad_norm, int(stats[1].item()), bs * self.world * len(batches)

    def _backward(self, ids: torch.Tensor, labels: torch.Tensor, inputs: dict, scale: float,
                  sync: bool) -> torch.Tensor:
        """Forward and backward of one micro-batch (``inputs``: its further model inputs, ``sequence_ids`` of
        packed rows); ``sync``: the last of the step (gradients are reduced over processes, and DeepSpeed steps
        its optimizer). Returns the summed loss."""
        if self.deepspeed:
            with self.accelerator.autocast():
                loss_sum = token_loss_sum(self.model, ids, labels, **inputs)
            self.model.set_gradient_accumulation_boundary(sync)
            self.model.backward(loss_sum * scale, scale_wrt_gas=False)
            if sync:
                self.model.step()  # clips with the config's gradient_clipping, then the optimizer step
            return loss_sum
        with nullcontext() if sync else self.accelerator.no_sync(self.model):
            with self.accelerator.autocast():
                loss_sum = token_loss_sum(self.model, ids, labels, **inputs)
            self.accelerator.backward(loss_sum * scale)
        return loss_sum

    def _grad_norm(self) -> float:
        """The global gradient norm of the step, of the gradients as the update sees them: after the fp16 loss
        scaler's factor is taken out (``accelerator.unscale_gradients``, once per step: the scaler's own step
        then skips an overflow and lowers its scale), over every shard of a sharded prefix. Clips to
        ``train.max_grad_norm`` when set (``torch.nn.utils.clip_grad_norm_``'s arithmetic)."""
        if self.deepspeed:
            grad_norm = self.model.get_global_grad_norm()
            return float("nan") if grad_norm is None else float(grad_norm)
        self.accelerator.unscale_gradients()
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if isinstance(norm, DTensor):  # the norm of this process's shards: combine them
            norm = norm.full_tensor()
        if self.cfg.train.max_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.cfg.train.max_grad_norm, norm)
        return float(norm)

    def _update(self) -> None:
        if not self.deepspeed:  # DeepSpeed stepped inside its engine
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def _skip_nonfinite_step(self, loss: float, grad_norm: float) -> None:
        """A non-finite loss or gradient norm: with fp16 the step is skipped and counted; otherwise the run
        stops, naming its last good checkpoint."""
        if self.cfg.train.mixed_precision != "fp16":
            last = latest_checkpoint(self.out)
            raise TrainingError(
                f"step {self.step}: non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} "
                f"(loss={loss}, grad_norm={grad_norm}); last good checkpoint: {last or 'none'}"
            )
        # A loss scaler (fp16 on a GPU) must see the overflow: its step skips the update and lowers the scale.
        # Without one (accelerate has none on a CPU; DeepSpeed scales inside model.step()) a step would apply
        # the non-finite gradients: drop them.
        if self.accelerator.scaler is not None:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped += 1
        self.log.write({"step": self.step, "skipped_nonfinite_steps": self.skipped})
        # the checkpoint schedule holds whether or not this step updated (else a skipped last step would
        # leave the run without its final checkpoint)
        self._save_if_due()

    def _log_step(self, loss: float, grad_norm: float, tokens: int, samples: int) -> None:
        """The progress bar after every step; every ``train.logging_steps`` a log record of the window's mean
        loss and throughput (tokens/s is the window's: a single step's timing jitters too much to read)."""
        window = self.window
        window.loss += loss
        window.steps += 1
        window.tokens += tokens
        window.samples += samples
        self.train_loss = loss
        lr = self.scheduler.get_last_lr()[0]
        if self.progress is not None:
            self.progress.update(1)
            self.shown.update(loss=f"{loss:.4f}", lr=f"{lr:.2e}", grad_norm=f"{grad_norm:.3f}")
            self.progress.set_postfix(self.shown)
        if self.step % self.cfg.train.logging_steps != 0 and self.step != self.cfg.train.max_steps:
            return
        elapsed = time.perf_counter() - window.start
        tokens_per_s = window.tokens / elapsed
        seq = window.tokens / max(window.samples, 1)
        achieved = model_train_flops_per_token(self.raw, int(round(seq))) * tokens_per_s
        record = {
            "step": self.step,
            "loss": window.loss / window.steps,
            "learning_rate": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s,
            "samples_per_s": window.samples / elapsed,
            "peak_memory_mib": peak_memory_mib(self.device),
            "matmul_peak_fraction": achieved / self.peak,
            "skipped_nonfinite_steps": self.skipped,
        }
        self.log.write(record)
        if self.trackers is not None and self.main:
            self.trackers.log(record, self.step)
        if self.progress is not None:
            self.shown["tokens_per_s"] = f"{tokens_per_s:,.0f}"
            self.progress.set_postfix(self.shown)
        self.window = _Window()

    def _evaluate_if_due(self) -> None:
        """The validation loss every ``train.eval_steps`` (the last step's comes with :meth:`finish`)."""
        every = self.cfg.train.eval_steps
        if not every or self.step % every != 0 or self.step == self.cfg.train.max_steps:
            return
        self.eval_loss = self.evaluate_loss()
        if self.eval_loss is not None:
            self.log.write({"step": self.step, "eval_loss": self.eval_loss})
            if self.trackers is not None and self.main:
                self.trackers.log({"eval_loss": self.eval_loss}, self.step)
            if self.progress is not None:
                self.progress.write(f"step {self.step}: eval loss {self.eval_loss:.4f}")

    # ---- save ----

    def _save_if_due(self) -> bool:
        """A checkpoint every ``train.save_steps`` and at the last step; True when one was saved."""
        if self.step % self.cfg.train.save_steps != 0 and self.step != self.cfg.train.max_steps:
            return False
        try:
            self.last_checkpoint = self.save()
            self.where.checkpoint = self.last_checkpoint  # Ctrl-C from here on names it
        except CheckpointError as err:
            raise TrainingError(str(err)) from None
        return True

    def save(self) -> Path | None:
        """Writes ``checkpoint-{step}`` (the main process; the others take part in the gathers): the prefix,
        its metadata and the training state to resume from. Returns the folder (None on the other
        processes). Every gather brings tensors to the CPU: each process's random state, and the optimizer
        state ZeRO partitions (every rank's part) or FSDP2 shards (whole, as one process has it)."""
        rng = self.comm.gather_to_cpu(capture_rng())
        if self.deepspeed:
            optimizer = self.comm.gather_to_cpu(self.optimizer.state_dict())
        elif self.fsdp:
            optimizer = full_state(self.optimizer.state_dict())
        else:
            optimizer = self.optimizer.state_dict()
        prefix = self._full_prefix() if self.fsdp else None
        path, failure = None, None
        with gathered(self.raw.get_submodule(prefix_module_name(self.raw)).parameters(), self.deepspeed):
            if self.main:
                state = {
                    "optimizer": optimizer,
                    "scheduler": self.scheduler.state_dict(),
                    "step": self.step,
                    "micro_batch": self.micro,
                    "rng": rng,
                    "world_size": self.world,
                    "skipped_nonfinite_steps": self.skipped,
                }
                try:
                    self.log.raise_failure()  # a log line was lost (a full disk): no later checkpoint
                    path = save_checkpoint(self.out, self.step, self.raw, self.meta, state,
                                           self.cfg.train.save_total_limit, prefix=prefix)
                except CheckpointError as err:
                    failure = TrainingError(str(err))
                except TrainingError as err:
                    failure = err
        self.comm.raise_together(failure)  # every process goes on, or stops with the main process's error
        return path

    def _full_prefix(self) -> dict[str, torch.Tensor]:
        """FSDP2: the prefix encoder's weights whole on the CPU, under their full keys (a collective)."""
        name = prefix_module_name(self.raw)
        encoder = self.raw.get_submodule(name).state_dict(prefix=f"{name}.")
        return {key: tensor.full_tensor().cpu() for key, tensor in encoder.items()}

    # ---- finish ----

    def finish(self) -> TrainResult:
        """The end-of-run evaluation (loss, and generation metrics with ``train.eval_generation``), the loss
        plot, the tracker's end; the run's result."""
        cfg = self.cfg
        if self.main:  # a resumed run with nothing left to train saved nothing: its limit holds all the same
            prune_checkpoints(self.out, self.run_id, cfg.train.save_total_limit)
        self.eval_loss = self.evaluate_loss()
        metrics: dict = {}
        if self.eval_loss is not None:
            self.log.write({"step": self.step, "eval_loss": self.eval_loss})
        if cfg.train.eval_generation and cfg.data.validation_file:
            metrics = self.generation_metrics()
            self.log.write({"step": self.step, **{f"eval_{k}": v for k, v in metrics.items()}})
        if self.trackers is not None and self.main:
            self.trackers.log({"eval_loss": self.eval_loss, **{f"eval_{k}": v for k, v in metrics.items()}},
                              self.step)
        failure = None
        if self.main:
            try:
                self.log.raise_failure()
                if cfg.train.plot:
                    self._plot()
            except TrainingError as err:
                failure = err
            if self.trackers is not None:
                self.trackers.finish()
        self.comm.raise_together(failure)
        return TrainResult(self.out, self.step, self.last_checkpoint, self.train_loss, self.eval_loss, metrics,
                           self.baseline, self.main)

    def _plot(self) -> None:
        path = self.out / PLOT_FILE
        try:
            plot_losses(self.log.records(), path)
        except OSError as err:
            raise write_failure(path, self.out, err) from None


def _count(n: int, noun: str) -> str:
    """``1 step``, ``2 steps``, ``2 processes``."""
    return f"{n} {noun}{'' if n == 1 else 'es' if noun.endswith('s') else 's'}"
