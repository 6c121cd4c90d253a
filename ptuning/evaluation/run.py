"""``python evaluate.py``: generate over a data set with a prefix checkpoint and score BLEU-4 / ROUGE.

The job loads the base model and a prefix (ours or the original P-Tuning v2 format), generates for every
row of ``data.test_file`` in batches (left padding, KV cache), across processes when launched with
``accelerate launch``, and writes ``generated_predictions.jsonl`` and ``metrics.json`` into an output
folder that is never a training output or checkpoint folder.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm
from transformers.integrations import unset_hf_deepspeed_config

from ..build import load
from ..checkpoint import (
    META_FILE,
    ORIGINAL_FILE,
    PREFIX_FILE,
    STATE_FILE,
    PrefixCheckpoint,
    list_checkpoints,
    load_model_with_prefix,
    prefix_fit_mismatch,
    read_checkpoint,
    resolve_checkpoint,
)
from ..config import ConfigError, LoggerConfig, ModelConfig, check_data_file
from ..data import DataError, build_datasets
from ..data.config import DataConfig
from ..data.loading import check_positions
from ..distributed import LaunchError, on_every_process, start
from ..faults import kill_point
from ..generation import packed_linears, vocab_limit
from ..perf import set_cpu_threads
from ..prefix import PrefixKV
from ..weights import CheckpointError, is_disk_full
from .generate import GenerationSettings, batched, generate_ids, make_decoder
from .metrics import METRIC_NAMES, compute_metrics

PREDICTIONS_FILE = "generated_predictions.jsonl"
METRICS_FILE = "metrics.json"
EVAL_FILES = (PREDICTIONS_FILE, METRICS_FILE)
# the one-line errors of an evaluation that cannot run: every process of it stops with the same one
USER_ERRORS = (ConfigError, DataError, CheckpointError)
# Files that mark a folder as a checkpoint, a training run or a model: evaluation never writes there.
CHECKPOINT_MARKERS = (PREFIX_FILE, META_FILE, STATE_FILE, ORIGINAL_FILE)
RUN_MARKERS = ("train_log.jsonl", "run_config.json", "config.json", "model.safetensors")


@dataclass
class EvaluateModelConfig(ModelConfig):
    """``model.*`` of an evaluation. The prefix's shape is the checkpoint's: ``pre_seq_len`` and
    ``prefix_projection`` stay None unless given, and a given value that differs from the checkpoint's is
    the same error as in training."""

    pre_seq_len: int | None = None
    prefix_projection: bool | None = None


@dataclass
class EvaluateJobConfig:
    """Everything ``python evaluate.py`` needs.

    Attributes:
        model: the base model (``model.path``; null = the built-in tiny model). ``pre_seq_len`` and
            ``prefix_projection`` are taken from the checkpoint (see :class:`EvaluateModelConfig`).
        data: the data file (``data.test_file``, or ``data.validation_file`` with ``split=validation``)
            and its column keys.
        logger: ``logger=wandb`` logs the metrics and a predictions table.
        generation: decoding settings (greedy by default).
        prefix_checkpoint: a checkpoint folder of ours or of the original P-Tuning v2 script, or a
            training output folder (its latest checkpoint); null = the latest checkpoint of
            ``outputs/default``; ``none`` = no prefix: the base model as published (the baseline a prefix is
            measured against).
        batch_size: prompts decoded together on each process.
        output_dir: where the predictions and metrics go; null = ``eval-<checkpoint name>`` beside the
            checkpoint (``outputs/eval-base-<model.name>`` for ``prefix_checkpoint=none``).
        overwrite: replace the predictions and metrics of an earlier evaluation in ``output_dir`` (only files
            that evaluate.py wrote; without it, existing results are never replaced).
        split: ``test`` or ``validation``: which data file to evaluate.
        seed: seeds sampling (``generation.do_sample=true``); greedy decoding does not use it.
    """

    model: EvaluateModelConfig = field(default_factory=EvaluateModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    prefix_checkpoint: str | None = None
    batch_size: int = 16
    output_dir: str | None = None
    overwrite: bool = False
    split: str = "test"
    seed: int = 42

    def validate(self) -> EvaluateJobConfig:
        """Checks the values that the composed config cannot check by type.

        Raises:
            ConfigError: naming the key, the value and what is allowed.
        """
        if not isinstance(self.batch_size, int) or self.batch_size <= 0:
            raise ConfigError(f"batch_size={self.batch_size!r}: expected a positive integer")
        if self.split not in ("test", "validation"):
            raise ConfigError(f"split={self.split!r}: expected test / validation")
        data_file = getattr(self.data, f"{self.split}_file")
        if data_file is None:
            raise ConfigError(
                f"data.{self.split}_file is not set: set data.{self.split}_file=/path/to/dev.json"
            )
        check_data_file(f"data.{self.split}_file", data_file)  # here, so that the mistake costs no model loading
        self.generation.validate()
        self.logger.validate()
        return self


# ---- where to read and where to write ----

#: ``prefix_checkpoint=none``: evaluate the base model without any prefix
NO_PREFIX = "none"


def base_model_output_dir(model_name: str) -> Path:
    """Where ``prefix_checkpoint=none`` writes by default: ``outputs/eval-base-<model.name>``."""
    safe = "".join(c if c.isalnum() or c in "._-" else "-" for c in model_name) or "model"
    return Path("outputs") / f"eval-base-{safe}"


def check_prompt_format(checkpoint: Path, meta: dict | None, data: DataConfig) -> None:
    """That evaluation renders prompts as the prefix was trained on them: ``prompt_format`` in the checkpoint's
    ``prefix_config.json`` is ``chat`` (rows with earlier turns: ``data.history_column`` or
    ``data.conversation_column``) or ``plain`` (prompt -> response rows). Checkpoints that record none (the
    original script's, earlier versions') are not checked.

    Raises:
        ConfigError: the data settings render the other format (chat rows would lose their earlier turns,
            plain-trained prefixes would see chat templates); names the key to set or unset, and for a chat
            prefix the column its run used when the run's ``run_config.json`` beside it says.
    """
    recorded = (meta or {}).get("prompt_format")
    chat = bool(data.history_column or data.conversation_column)
    if recorded not in ("chat", "plain") or (recorded == "chat") == chat:
        return
    source = f"prompt_format {recorded} in its prefix_config.json"
    if recorded == "plain":
        key = "data.history_column" if data.history_column else "data.conversation_column"
        raise ConfigError(
            f"{checkpoint} was trained on plain prompt -> response rows ({source}) but {key}="
            f"{data.history_column or data.conversation_column} renders chat prompts: leave {key} unset"
        )
    key, column = _trained_chat_column(checkpoint, meta)
    raise ConfigError(
        f"{checkpoint} was trained on chat prompts with earlier turns ({source}) but {key} is not set, "
        f"so evaluation would leave the rows' earlier turns out: set "
        + (f"{key}={column} (what its run used)" if column else
           "data.history_column=<the column of earlier turns> (data.conversation_column for chat-format rows)")
    )


def _trained_chat_column(checkpoint: Path, meta: dict | None) -> tuple[str, str | None]:
    """``(key, column)`` of the chat data the checkpoint's run trained on, from the ``run_config.json`` of the run
    folder it sits in (``("data.history_column", None)`` when that record is not there or not its run's)."""
    try:
        record = json.loads((checkpoint.parent / "run_config.json").read_text(encoding="utf-8"))
        data = record["data"] if record.get("run_id") == (meta or {}).get("run_id") else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        data = {}
    for key in ("history_column", "conversation_column"):
        if isinstance(data, dict) and isinstance(data.get(key), str) and data[key]:
            return f"data.{key}", data[key]
    return "data.history_column", None


def _why_not_writable(folder: Path) -> str | None:
    """Why evaluation must not write into ``folder`` (an existing folder), or None when it may."""
    if any((folder / name).exists() for name in CHECKPOINT_MARKERS):
        return "it is a checkpoint folder"
    if list_checkpoints(folder):
        return "it is a training output folder (it holds checkpoint-N folders)"
    if any((folder / name).exists() for name in RUN_MARKERS):
        return "it holds training outputs or model files"
    return None


def _is_training_output(folder: Path) -> bool:
    """``folder`` holds a training run's outputs (its record, log or checkpoint-N folders)."""
    return any((folder / name).is_file() for name in ("train_log.jsonl", "run_config.json")) or bool(
        list_checkpoints(folder))


def evaluation_run_id(folder: str | os.PathLike) -> str | None:
    """The training run id that ``metrics.json`` in ``folder`` records for the checkpoint it evaluated (None:
    none, or no readable metrics.json)."""
    try:
        metrics = json.loads((Path(folder) / METRICS_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return metrics.get("run_id") if isinstance(metrics, dict) else None


def _written_by_evaluation(path: Path) -> bool:
    """``path`` (metrics.json or generated_predictions.jsonl) is what evaluate.py writes: a metrics object with
    its keys, or prediction rows of ``prompt``, ``labels`` and ``predict``."""
    try:
        with open(path, encoding="utf-8") as fh:
            if path.name == METRICS_FILE:
                record = json.load(fh)
                return isinstance(record, dict) and {"checkpoint", "data_file", "num_samples"} <= set(record)
            first = fh.readline()
            return not first or (isinstance(row := json.loads(first), dict)
                                 and set(row) == {"prompt", "labels", "predict"})
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False


def earlier_results(out: Path, overwrite: bool) -> list[str]:
    """The results of an earlier evaluation in ``out`` that this one would replace (empty when none).

    Raises:
        ConfigError: there are results and ``overwrite`` is false, or a file of those names that evaluate.py
            did not write (never replaced).
    """
    found = [out / name for name in EVAL_FILES if (out / name).exists()]
    if not found:
        return []
    names = ", ".join(p.name for p in found)
    foreign = [p.name for p in found if not p.is_file() or not _written_by_evaluation(p)]
    if foreign:
        raise ConfigError(
            f"output_dir={out}: {', '.join(foreign)} there was not written by evaluate.py and is never replaced; "
            "move it or choose another output_dir"
        )
    if not overwrite:
        raise ConfigError(
            f"output_dir={out} already holds an earlier evaluation's {names}: set overwrite=true to replace them, "
            "or choose another output_dir"
        )
    return [p.name for p in found]


def resolve_output_dir(checkpoint: Path | None, output_dir: str | None, default: Path | None = None) -> Path:
    """The evaluation's output folder: ``output_dir`` or ``default`` (``eval-<checkpoint name>`` beside the
    checkpoint unless given; ``checkpoint`` None: the base model's evaluation, which needs ``default``).

    Raises:
        ConfigError: the folder is, or lies inside, a checkpoint, or is (or lies inside) a training output or
            model folder, other than the checkpoint's own ``eval-<checkpoint name>``: evaluation files there
            could overwrite or be mistaken for training outputs.
    """
    default = default or checkpoint.parent / f"eval-{checkpoint.name}"
    out = Path(output_dir).expanduser() if output_dir else default
    resolved = out.resolve()
    why = None
    if resolved.exists() and not resolved.is_dir():
        why = "it exists and is not a folder"
    elif checkpoint is not None and (resolved == checkpoint.resolve() or checkpoint.resolve() in resolved.parents):
        why = "it is inside the checkpoint being evaluated"
    elif resolved.is_dir():
        why = _why_not_writable(resolved)
    if why is None:
        for parent in resolved.parents:
            if any((parent / name).is_file() for name in CHECKPOINT_MARKERS):
                why = f"it is inside the checkpoint folder {parent}"
                break
    if why is None and resolved != default.resolve():
        inside = next((parent for parent in resolved.parents if _is_training_output(parent)), None)
        if inside is not None:
            why = f"it is inside the training output folder {inside}"
    if why is not None:
        raise ConfigError(
            f"output_dir={out}: {why}; evaluation never writes into training outputs or checkpoints "
            f"(leave output_dir unset for {default}, or choose a new folder)"
        )
    return out


# ---- generation ----


def predict(
    model,
    template,
    data_cfg: DataConfig,
    settings,
    comm=None,
    *,
    split: str = "validation",
    batch_size: int | None = None,
    progress: bool = True,
    examples: list[dict] | None = None,
    prefix: PrefixKV | None = None,
) -> tuple[dict, list[dict]]:
    """Generates for every example of ``split`` and scores the predictions.

    Each process takes every ``num_processes``-th example; the predictions are gathered back in input
    order on every process, so every process returns the same result.

    Args:
        model: a model of any family with its prefix loaded.
        template: its family's prompt template (prompt ids, stop ids, decoding).
        data_cfg: where ``split`` is and how its rows become prompts.
        settings: a :class:`GenerationSettings`, or a training config (its ``max_new_tokens`` and
            ``eval_batch_size``, greedy).
        comm: the run's :class:`~ptuning.distributed.Collectives`; None = this process alone.
        split: the data split to read when ``examples`` is not given.
        batch_size: prompts decoded together (default: the training config's, else 16).
        progress: show a progress bar with ETA on the main process.
        examples: generation features (``prompt``, ``input_ids``, ``reference``) built beforehand.
        prefix: replaces the model's own prefix (:func:`~ptuning.prefix.no_prefix`: the base model).

    Returns:
        The metrics (the four scores, ``num_samples``, ``num_empty_predictions``, ``num_stopped_predictions``
        (answers that ended with a stop token within ``max_new_tokens``: the model ended them itself),
        ``new_tokens``, ``generation_s``, ``new_tokens_per_s``) and the predictions ``[{"prompt", "labels",
        "predict"}]`` in input order.
    """
    if not isinstance(settings, GenerationSettings):
        batch_size = batch_size or settings.eval_batch_size
        settings = GenerationSettings(max_new_tokens=settings.max_new_tokens)
    batch_size = batch_size or 16
    if examples is None:
        examples = build_datasets(data_cfg, template, split).to_list()
    world = comm.num_processes if comm is not None else 1
    rank = comm.process_index if comm is not None else 0
    mine = list(range(rank, len(examples), world))
    # longest prompts first: batches of similar length waste less on padding, and the ETA errs on the
    # safe side
    mine.sort(key=lambda i: -len(examples[i]["input_ids"]))
    start = time.perf_counter()
    outputs, new_tokens, stopped = _generate(model, template, examples, mine, settings, batch_size,
                                             progress and rank == 0, prefix)
    elapsed = time.perf_counter() - start
    if world > 1:
        outputs = comm.gather_objects(outputs)
        counts = comm.gather_objects([(new_tokens, elapsed, stopped)])
        new_tokens = sum(n for n, _, _ in counts)
        stopped = sum(s for _, _, s in counts)
        # the processes run side by side: the run took as long as the slowest one
        elapsed = max(t for _, t, _ in counts)
    by_index = dict(outputs)
    rows = [
        {"prompt": ex["prompt"], "labels": ex["reference"], "predict": by_index[i]}
        for i, ex in enumerate(examples)
    ]
    metrics = compute_metrics([r["predict"] for r in rows], [r["labels"] for r in rows])
    metrics["num_stopped_predictions"] = stopped
    metrics["new_tokens"] = new_tokens
    metrics["generation_s"] = elapsed
    metrics["new_tokens_per_s"] = new_tokens / elapsed if elapsed > 0 else 0.0
    return metrics, rows


def _generate(model, template, examples: list[dict], mine: list[int], settings: GenerationSettings,
              batch_size: int, progress: bool, prefix: PrefixKV | None = None) -> tuple[list[tuple[int, str]], int, int]:
    """Decodes the examples ``mine`` (indices into ``examples``) in batches of ``batch_size`` (``prefix``
    instead of the model's own, when given).

    Returns:
        ``(index, decoded answer)`` of each, the number of tokens generated and of answers a stop token ended.
    """
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(mine), desc="generate", unit="example", dynamic_ncols=True) if progress else None
    outputs: list[tuple[int, str]] = []
    new_tokens = stopped = 0
    start = time.perf_counter()
    stack = ExitStack()
    limit = vocab_limit(template.tokenizer)  # ids without a piece are never chosen, as chat and the server
    try:
        if not settings.compile:  # a CPU's faster linears while generating (a compiled step has its own kernels)
            stack.enter_context(packed_linears(model, rows=batch_size))
        # one decoder for every batch: its cache grows once (longest prompts come first) and a compiled step is
        # compiled once, not per batch
        decoder = None
        if settings.num_beams == 1 and mine:
            longest = max(len(examples[i]["input_ids"]) for i in mine) + settings.max_new_tokens
            decoder = make_decoder(model, settings, max_batch_size=min(batch_size, len(mine)), max_length=longest,
                                   pad_id=template.pad_token_id, vocab_limit=limit, prefix=prefix)
        for number, chunk in enumerate(batched(mine, batch_size)):
            kill_point("generate", number)  # test-only: a signal before generating batch ``number``
            ids = generate_ids(
                model,
                [examples[i]["input_ids"] for i in chunk],
                settings,
                pad_id=template.pad_token_id,
                stop_ids=template.stop_token_ids,
                prefix=prefix,
                vocab_limit=limit,
                decoder=decoder,
            )
            new_tokens += sum(len(x) for x in ids)
            # the ids end before the stop token: fewer than max_new_tokens means a stop token ended the answer
            stopped += sum(len(x) < settings.max_new_tokens for x in ids)
            outputs += [(i, template.decode(x)) for i, x in zip(chunk, ids, strict=True)]
            if bar is not None:
                bar.update(len(chunk))
                bar.set_postfix(tokens_per_s=f"{new_tokens / (time.perf_counter() - start):.1f}")
    finally:
        stack.close()
        if bar is not None:
            bar.close()
        model.train(was_training)
    return outputs, new_tokens, stopped


# ---- the job ----


def check_writable(out: Path) -> None:
    """That ``out`` can be made (or, when it exists, written to), without making it.

    Raises:
        ConfigError: a file is in the way, or the folder (or the nearest existing one above it) is not writable.
    """
    existing = out
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ConfigError(f"output_dir={out}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir={out}: {'not writable' if existing == out else f'cannot create it ({existing} is not writable)'}")


def write_outputs(out: Path, rows: list[dict], metrics: dict) -> None:
    """Writes ``generated_predictions.jsonl`` (UTF-8, not escaped, input order) and ``metrics.json``: both
    beside their names first, renamed into place once both are whole, so a crash, Ctrl-C or a full disk leaves
    the earlier pair (or none), never new predictions beside old metrics.

    Raises:
        ConfigError: the folder cannot be created or written (a full disk: one line naming the file; nothing
            is replaced, and a folder made for the results is removed again).
    """
    texts = {PREDICTIONS_FILE: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
             METRICS_FILE: json.dumps(metrics, indent=2, ensure_ascii=False) + "\n"}
    made = not out.exists()
    written: list[tuple[Path, Path]] = []
    writing = out
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name, text in texts.items():
            writing = out / name
            written.append((out / f".{name}.{os.getpid()}.tmp", writing))
            written[-1][0].write_text(text, encoding="utf-8")
        for tmp, path in written:
            os.replace(tmp, path)
    except OSError as err:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
        if made and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if is_disk_full(err):
            raise ConfigError(f"no space left on device writing {writing}; no results were written ({out} is as it "
                              "was); free space and run the evaluation again") from None
        raise ConfigError(f"output_dir={out}: cannot write ({err.strerror or err})") from None


def run(cfg: EvaluateJobConfig, *, tracker=None) -> dict:
    """Loads the model and the prefix, evaluates, writes the predictions and metrics (main process).

    A small model on a CPU runs with one intra-op thread unless ``OMP_NUM_THREADS`` is set
    (:func:`ptuning.perf.set_cpu_threads`); the thread count is restored on return.

    Args:
        cfg: the job.
        tracker: a :class:`~ptuning.training.tracking.WandbTracker` for the metrics and a predictions
            table, or None.

    Returns:
        ``metrics.json``'s content plus ``output_dir``.

    Raises:
        ConfigError, DataError, CheckpointError: user mistakes, with a one-line message.
    """
    threads = torch.get_num_threads()
    try:
        return _evaluate(cfg, tracker)
    finally:
        torch.set_num_threads(threads)


def _evaluate(cfg: EvaluateJobConfig, tracker) -> dict:
    try:
        accelerator, comm = start()
    except LaunchError as err:  # how the processes were started: every one of them sees it
        raise on_every_process(ConfigError(str(err))) from None
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # evaluation never hands the model to DeepSpeed: every process holds it whole. Under a ZeRO-3 launch
        # transformers would otherwise partition its weights at load, for an engine that never comes.
        unset_hf_deepspeed_config()
    # every process checks the same job; any error stops every process with one message
    checkpoint, out, replacing = comm.together(lambda: _check_job(cfg), USER_ERRORS)
    data_file = getattr(cfg.data, f"{cfg.split}_file")
    main = comm.is_main_process
    set_seed(cfg.seed + comm.process_index)  # sampling: a different stream on each process
    if checkpoint is None:  # prefix_checkpoint=none: the base model as published
        loaded = comm.together(lambda: load(cfg.model, device=accelerator.device, pre_seq_len=None, init=False),
                               USER_ERRORS)
    else:
        loaded = comm.together(lambda: load_model_with_prefix(cfg.model, checkpoint, device=accelerator.device),
                               USER_ERRORS)
    model, template = loaded.model, loaded.template
    set_cpu_threads(model, accelerator.device)
    if loaded.base_change and main:
        print(f"warning: {checkpoint.path} {loaded.base_change}", file=sys.stderr)
    examples = comm.together(lambda: _build_examples(cfg, comm, loaded), USER_ERRORS)
    if main:
        what = checkpoint.path if checkpoint is not None else f"the base model {cfg.model.base_model_name} (no prefix)"
        print(
            f"evaluating {what} on {data_file} ({len(examples)} examples) with {comm.num_processes} "
            f"process(es), batch_size={cfg.batch_size}, {'sampling' if cfg.generation.do_sample else 'greedy'}"
            + ("; generation.compile=true: the first decode step waits for torch.compile (tens of seconds on a CPU)"
               if cfg.generation.compile else "")
        )
    metrics, rows = predict(
        model, template, cfg.data, cfg.generation, comm, batch_size=cfg.batch_size, examples=examples
    )
    metrics.update(
        checkpoint=str(checkpoint.path) if checkpoint is not None else None,  # None: the base model, no prefix
        base_model=cfg.model.base_model_name,
        run_id=(checkpoint.meta or {}).get("run_id") if checkpoint is not None else None,  # the training run that wrote it: train.overwrite knows its evaluations
        data_file=str(data_file),
        batch_size=cfg.batch_size,
        num_processes=comm.num_processes,
        generation=asdict(cfg.generation),
    )
    failure = None
    if main:
        try:
            _report(cfg, out, replacing, rows, metrics, tracker)
        except USER_ERRORS as err:
            failure = err
    comm.raise_together(failure)  # every process stops with the main process's error, or goes on
    metrics["output_dir"] = str(out)
    return metrics


def _check_job(cfg: EvaluateJobConfig) -> tuple[PrefixCheckpoint | None, Path, list[str]]:
    """Everything checked before a model is loaded: the config, the checkpoint (read, and its prefix's sizes
    set as ``cfg.model``'s; None for ``prefix_checkpoint=none``), the output folder and the earlier results it
    would replace."""
    cfg.validate()
    if cfg.prefix_checkpoint == NO_PREFIX:
        out = resolve_output_dir(None, cfg.output_dir, base_model_output_dir(cfg.model.name))
        replacing = earlier_results(out, cfg.overwrite)
        check_no_prefix_shape(cfg.model)
        check_writable(out)
        return None, out, replacing
    path = resolve_checkpoint(cfg.prefix_checkpoint)
    out = resolve_output_dir(path, cfg.output_dir)
    replacing = earlier_results(out, cfg.overwrite)
    checkpoint = read_checkpoint(path)
    check_prompt_format(path, checkpoint.meta, cfg.data)
    # the prefix decides the model's prefix shape; an original-format checkpoint has no metadata
    trained = checkpoint.sizes
    given = {key: getattr(cfg.model, key) for key in trained if getattr(cfg.model, key) is not None}
    mismatch = prefix_fit_mismatch(trained, given, hint="leave {names} unset to take the checkpoint's")
    if mismatch:
        raise CheckpointError(f"{path}: {mismatch}")
    cfg.model.pre_seq_len, cfg.model.prefix_projection = trained["pre_seq_len"], trained["prefix_projection"]
    cfg.model.validate()
    # checked by every process before any work: an unwritable folder fails at once, and on all processes
    # alike; it is made only when the results are written, so a refused evaluation leaves no empty folder
    check_writable(out)
    return checkpoint, out, replacing


def check_no_prefix_shape(model_cfg: EvaluateModelConfig) -> None:
    """``prefix_checkpoint=none`` loads no prefix: a prefix size given in ``model.*`` is a contradiction.

    Raises:
        ConfigError: ``model.pre_seq_len`` / ``model.prefix_projection`` is set (names it).
    """
    for key in ("pre_seq_len", "prefix_projection"):
        if getattr(model_cfg, key) is not None:
            raise ConfigError(f"model.{key}={getattr(model_cfg, key)} with prefix_checkpoint=none: the base model "
                              f"is evaluated without a prefix (leave model.{key} unset)")
    # the model's other keys are checked as for any evaluation (a prefix size is needed only to check them)
    dataclasses.replace(model_cfg, pre_seq_len=1, prefix_projection=False).validate()


def _build_examples(cfg: EvaluateJobConfig, comm, loaded) -> list[dict]:
    """The generation features of the data file, checked against the model's positions.

    The main process fills the datasets cache first, the others then read it. A data error is raised only
    after the barrier, so that every process reaches it and then fails with the same message.
    """
    main = comm.is_main_process
    if not main:
        comm.barrier()
    examples, error = None, None
    try:
        examples = build_datasets(cfg.data, loaded.template, cfg.split).to_list()
        check_positions([len(x["input_ids"]) for x in examples], loaded.max_positions,
                        getattr(cfg.data, f"{cfg.split}_file"),
                        "lower data.max_source_length or generation.max_new_tokens",
                        extra=cfg.generation.max_new_tokens, what="prompts")
    except DataError as err:
        error = err
    if main:
        comm.barrier()
    if error is not None:
        raise error
    return examples


def _report(cfg: EvaluateJobConfig, out: Path, replacing: list[str], rows: list[dict], metrics: dict,
            tracker) -> None:
    """Writes the predictions and metrics, prints the table and logs to the tracker (main process)."""
    if replacing:
        print(f"overwrite=true: replacing the earlier {', '.join(replacing)} in {out}")
    write_outputs(out, rows, metrics)
    print(format_table(metrics))
    print(f"wrote {out / PREDICTIONS_FILE} and {out / METRICS_FILE}")
    if tracker is not None:
        tracker.start(asdict(cfg), out, job_type="evaluate")
        tracker.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, 0)
        tracker.log_table(
            "predictions",
            ["prompt", "labels", "predict"],
            [[r["prompt"], r["labels"], r["predict"]] for r in rows],
        )
        tracker.finish()


def format_table(metrics: dict) -> str:
    """The four scores, the sample counts (empty answers; answers a stop token ended) and the throughput as a
    one-row Markdown table."""
    head = "| " + " | ".join(METRIC_NAMES) + " | samples | empty | stopped | new tokens/s |"
    rule = "|" + "---|" * (len(METRIC_NAMES) + 4)
    row = "| " + " | ".join(f"{metrics[n]:.2f}" for n in METRIC_NAMES)
    row += (f" | {metrics['num_samples']} | {metrics['num_empty_predictions']} | {metrics['num_stopped_predictions']}"
            f" | {metrics['new_tokens_per_s']:.1f} |")
    return "\n".join([head, rule, row])
