"""Reading, checking and loading data files: JSON lines, JSON arrays and CSV, through ``datasets``.

Every file goes through one pass in Python that checks each row and names the exact line of any
problem (``datasets``' own readers fail on a bad line without saying where). The rows that pass are
written once to a normalized JSON-lines file (only the configured columns, history as a list of
pairs) keyed by the source's content, and ``datasets.load_dataset`` reads that file: Arrow caching,
``map`` caching and ``num_proc`` then work as usual, and a changed source gets a new key.

Problems are :class:`DataError`\\ s whose message names the file, the 1-based line and the problem.
With ``skip_bad_rows`` the row-level ones are skipped instead, counted, and reported once per file.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import datasets

from ..models.base import Conversation, conversation_from_messages
from .config import DataConfig
from .features import preprocess_eval, preprocess_train

logger = logging.getLogger(__name__)

JSON_SUFFIXES = (".json", ".jsonl")
CSV_SUFFIXES = (".csv",)
# Bumped when the normalized file's layout changes, so that old cached copies are not reused.
NORMALIZED_VERSION = 1
# Undecodable bytes become U+DC80..U+DCFF under "surrogateescape"; a JSON "\ud800" escape becomes a
# lone surrogate too. Neither is text that can be tokenized or written back as UTF-8.
_NOT_UTF8 = re.compile("[\ud800-\udfff]")


class DataError(Exception):
    """A problem with the user's data; the message names the file, the line and the problem."""


@dataclass
class ReadReport:
    """What :func:`read_rows` kept and skipped in one file.

    Attributes:
        path: the file.
        sha256: hex digest of the file's bytes.
        rows: the kept rows, each with the configured columns only (history as a list of pairs).
        skipped: number of bad rows skipped (only with ``skip_bad_rows``).
        first_problem: ``"line N: problem"`` of the first skipped row, if any.
    """

    path: str
    sha256: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0
    first_problem: str | None = None


# ---- reading raw records with their line numbers ----


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a .json, .jsonl or .csv file") from None


def _json_line_records(text: str) -> Iterator[tuple[int, Any, str | None]]:
    """``(line, record, problem)`` for each non-blank line of a JSON-lines text."""
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        bad = _NOT_UTF8.search(line)
        if bad is not None:
            yield number, None, f"undecodable bytes at column {bad.start() + 1} (the file must be UTF-8)"
            continue
        try:
            yield number, json.loads(line), None
        except json.JSONDecodeError as err:
            yield number, None, f"malformed JSON: {_json_reason(err)} at column {err.colno}"


def _json_reason(err: json.JSONDecodeError) -> str:
    # some of json's messages end in "at" ("Invalid control character at"), followed by its own position
    return err.msg.removesuffix(" at")


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _json_array_records(path: Path, text: str) -> Iterator[tuple[int, Any, str | None]]:
    """``(line, record, problem)`` for each element of a JSON array text (line where it starts).

    A syntax error ends the array for good (there is no next line to resume at): it raises.
    """
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")
    pos = ws.match(text, text.index("[") + 1).end()
    line, counted_to = 1, 0
    if text.startswith("]", pos):
        return
    while True:
        line += text.count("\n", counted_to, pos)
        counted_to = pos
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}, line {err.lineno}: malformed JSON array: {_json_reason(err)} at column {err.colno}"
            ) from None
        yield line, record, None
        pos = ws.match(text, end).end()
        if text.startswith("]", pos):
            return
        if not text.startswith(",", pos):
            lineno = text.count("\n", 0, pos) + 1
            raise DataError(
                f"{path}, line {lineno}: malformed JSON array: expected ',' or ']' after an element"
            )
        pos = ws.match(text, pos + 1).end()


def _csv_records(path: Path, text: str) -> Iterator[tuple[int, Any, str | None]]:
    """``(line, record, problem)`` for each data row of a CSV text with a header row."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header = _next_csv_row(reader, path, 1, "CSV header")
    if header is None:
        return
    start = reader.line_num + 1
    while (row := _next_csv_row(reader, path, start)) is not None:
        if row:  # csv yields [] for a blank line
            if len(row) != len(header):
                yield start, None, f"{_plural(len(row), 'field')}, but the header has {len(header)}"
            else:
                yield start, dict(zip(header, row, strict=True)), None
        start = reader.line_num + 1


def _next_csv_row(reader, path: Path, line: int, what: str = "CSV") -> list[str] | None:
    """The reader's next row (starting at ``line``), None at the end of the text.

    Raises:
        DataError: the row is malformed CSV (``what``: ``CSV``, ``CSV header``), naming the file and line.
    """
    try:
        return next(reader)
    except StopIteration:
        return None
    except csv.Error as err:
        raise DataError(f"{path}, line {line}: malformed {what}: {err}") from None


def _records(path: Path, raw: bytes) -> tuple[Iterator[tuple[int, Any, str | None]], bool]:
    """The records of file ``path`` (content ``raw``) and whether they come from CSV (all strings)."""
    # undecodable bytes stay visible as surrogates, so the row checks can point at their line
    text = raw.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    if path.suffix.lower() in CSV_SUFFIXES:
        return _csv_records(path, text), True
    if text.lstrip().startswith("["):
        return _json_array_records(path, text), False
    return _json_line_records(text), False


# ---- row checks ----


def _check_text(value: Any, column: str) -> str | None:
    """Problem with a prompt or response value, or None."""
    if value is None:
        return f"{column!r} is null, expected a string"
    if not isinstance(value, str):
        return f"{column!r} is a {type(value).__name__} ({json.dumps(value, ensure_ascii=False)[:40]}), expected a string"
    if _NOT_UTF8.search(value):
        return f"{column!r} holds undecodable bytes (the file must be UTF-8)"
    if not value.strip():
        return f"{column!r} is empty"
    return None


def _parse_history(value: Any, column: str, from_csv: bool) -> tuple[list[list[str]] | None, str | None]:
    """``(pairs, None)`` for a valid history (null and empty mean no turns), else ``(None, problem)``."""
    if from_csv:
        if not value.strip():
            return [], None
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None, f"{column!r} must be a JSON list of [query, response] pairs, got {value[:40]!r}"
    if value is None:
        return [], None
    if not isinstance(value, list):
        return None, f"{column!r} must be a list of [query, response] pairs, got a {type(value).__name__}"
    for i, turn in enumerate(value):
        if not (
            isinstance(turn, list | tuple) and len(turn) == 2 and all(isinstance(text, str) for text in turn)
        ):
            shown = json.dumps(turn, ensure_ascii=False)[:40]
            return None, f"{column!r} must be a list of [query, response] pairs; turn {i} is {shown}"
        if any(_NOT_UTF8.search(text) for text in turn):
            return None, f"{column!r} turn {i} holds undecodable bytes (the file must be UTF-8)"
    return [list(turn) for turn in value], None


# the normalized columns of chat-format rows (``conversation_column``), besides prompt and response
CHAT_COLUMNS = ("history", "system", "extra", "tools")


def _check_conversation(record: dict, cfg: DataConfig, from_csv: bool) -> tuple[dict[str, Any] | None, str | None]:
    """A chat-format row (``conversation_column`` [+ ``tools_column``]) normalized to the prompt, response,
    history, system, extra and tools columns (the last three as JSON text), or the problem with it."""
    column = cfg.conversation_column
    if column not in record:
        return None, f"no column {column!r} (columns: {', '.join(map(repr, record)) or 'none'})"
    # a row without the tools column offers no tools (as finetune_demo's batch.get('tools'))
    messages, tools = record[column], record.get(cfg.tools_column) if cfg.tools_column else None
    if from_csv:
        try:
            messages = json.loads(messages)
            tools = json.loads(tools) if tools and tools.strip() else None
        except json.JSONDecodeError as err:
            return None, f"{column!r} / {cfg.tools_column!r} must be JSON ({err})"
    try:
        conversation, answer = conversation_from_messages(messages, tools)
    except ValueError as err:
        return None, f"{column!r}: {err}"
    for name, text in ((cfg.prompt_column, conversation.query), (cfg.response_column, answer)):
        problem = _check_text(text, f"{column}: {'query' if name == cfg.prompt_column else 'answer'}")
        if problem is not None:
            return None, problem
    return {
        cfg.prompt_column: conversation.query,
        cfg.response_column: answer,
        "history": [list(turn) for turn in conversation.history],
        "system": conversation.system or "",
        "extra": json.dumps(conversation.extra, ensure_ascii=False),
        "tools": json.dumps(tools, ensure_ascii=False) if tools is not None else "",
    }, None


def _check_record(record: Any, cfg: DataConfig, from_csv: bool) -> tuple[dict[str, Any] | None, str | None]:
    """The normalized row (configured columns only), or the problem with it."""
    if not isinstance(record, dict):
        return None, f"expected a JSON object, got a {type(record).__name__}"
    if cfg.conversation_column:
        return _check_conversation(record, cfg, from_csv)
    wanted = [cfg.prompt_column, cfg.response_column] + ([cfg.history_column] if cfg.history_column else [])
    for column in wanted:
        if column not in record:
            return None, f"no column {column!r} (columns: {', '.join(map(repr, record)) or 'none'})"
    row = {}
    for column in (cfg.prompt_column, cfg.response_column):
        problem = _check_text(record[column], column)
        if problem is not None:
            return None, problem
        row[column] = record[column]
    if cfg.history_column:
        history, problem = _parse_history(record[cfg.history_column], cfg.history_column, from_csv)
        if problem is not None:
            return None, problem
        row[cfg.history_column] = history
    return row, None


def _column_hint(column: str, cfg: DataConfig, key: str | None) -> str:
    """What to set when no row of a file has ``column``: the key that names it, and that one key serves
    every data file."""
    setting = next(
        f"data.{name}" for name in ("prompt_column", "response_column", "history_column")
        if getattr(cfg, name) == column
    )
    which = f"this file ({key})" if key else "this file"
    return (
        f"no row has it: set {setting} to {which}'s column. {setting} applies to data.train_file, "
        "data.validation_file and data.test_file alike, so they must use the same column names"
    )


def _row_conversation(row: dict[str, Any], cfg: DataConfig):
    """A normalized chat-format row as the :class:`~ptuning.models.base.Conversation` the template sees."""
    return Conversation(query=row[cfg.prompt_column], history=[tuple(t) for t in row["history"]],
                        system=row["system"] or None, source_prefix=cfg.source_prefix,
                        extra=json.loads(row["extra"]), tools=json.loads(row["tools"]) if row["tools"] else None)


def read_rows(path: str | os.PathLike, cfg: DataConfig, key: str | None = None,
              template=None) -> ReadReport:
    """Read and check every row of a ``.json`` / ``.jsonl`` / ``.csv`` file.

    Args:
        path: the file. JSON files hold one object per line, or one array of objects.
        cfg: columns to keep and ``skip_bad_rows``.
        key: the setting that names the file (``data.validation_file``), for messages.
        template: the model family's prompt template: each chat-format row must be one it can render
            (:meth:`~ptuning.models.base.PromptTemplate.check`; e.g. tool turns on a family without tools).

    Returns:
        The kept rows and what was skipped (reported once, as a warning, when anything was).

    Raises:
        DataError: the file cannot be read, a row is bad (without ``skip_bad_rows``), or no row is left.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in JSON_SUFFIXES + CSV_SUFFIXES:
        raise DataError(
            f"{path}: unsupported file type {suffix or '(none)'!r}: expected .json, .jsonl or .csv"
        )
    raw = _read_bytes(path)
    records, from_csv = _records(path, raw)
    report = ReadReport(path=str(path), sha256=hashlib.sha256(raw).hexdigest())
    problems: list[tuple[int, str]] = []
    columns_seen: set[str] = set()  # columns that at least one row has
    objects = 0  # rows that are objects (have columns at all)
    for line, record, problem in records:
        row = None
        if problem is None:
            if isinstance(record, dict):
                objects += 1
                columns_seen.update(record)
            row, problem = _check_record(record, cfg, from_csv)
            if problem is None and template is not None and cfg.conversation_column:
                problem = template.check(_row_conversation(row, cfg))
        if problem is not None:
            problems.append((line, problem))
        else:
            report.rows.append(row)
    # a column that no row has is a setting to fix, not rows to skip
    wanted = [cfg.prompt_column, cfg.response_column] + ([cfg.history_column] if cfg.history_column else [])
    absent = next((c for c in wanted if c not in columns_seen), None) if objects and not report.rows else None
    if problems and (absent is not None or not cfg.skip_bad_rows):
        line, problem = problems[0]
        if absent is not None:
            hint = _column_hint(absent, cfg, key)
            if not problem.startswith(f"no column {absent!r}"):
                line, problem = next((n, p) for n, p in problems if p.startswith(f"no column {absent!r}"))
            raise DataError(f"{path}, line {line}: {problem}; {hint}")
        more = len(problems) - 1
        more = f" ({_plural(more, 'more bad row')} follow{'s' if more == 1 else ''})" if more else ""
        raise DataError(
            f"{path}, line {line}: {problem}{more}. Fix the data, or set data.skip_bad_rows=true to skip bad rows."
        )
    if problems:
        report.skipped = len(problems)
        report.first_problem = "line {}: {}".format(*problems[0])
    if not report.rows:
        detail = f" ({_plural(report.skipped, 'bad row')} skipped, first at {report.first_problem})" if problems else ""
        raise DataError(f"{path}: no usable rows{detail}")
    if problems:
        logger.warning(
            "%s: skipped %s of %d (first at %s)",
            path,
            _plural(report.skipped, "bad row"),
            report.skipped + len(report.rows),
            report.first_problem,
        )
    return report


# ---- loading through datasets ----


def _cache_root(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else Path(datasets.config.HF_DATASETS_CACHE) / "ptuning"


def _features(cfg: DataConfig) -> datasets.Features:
    columns = {cfg.prompt_column: datasets.Value("string"), cfg.response_column: datasets.Value("string")}
    if cfg.history_column:
        columns[cfg.history_column] = datasets.List(datasets.List(datasets.Value("string")))
    if cfg.conversation_column:
        columns["history"] = datasets.List(datasets.List(datasets.Value("string")))
        columns.update({name: datasets.Value("string") for name in CHAT_COLUMNS[1:]})
    return datasets.Features(columns)


def load_rows(path: str | os.PathLike, cfg: DataConfig, key: str | None = None, template=None) -> datasets.Dataset:
    """Check ``path`` and load its good rows as a ``datasets.Dataset`` (configured columns only).

    The normalized copy lives in ``<cache>/normalized/<key>.jsonl``, with the key a hash of the file's
    bytes and the columns; it is written once (atomically, so parallel ranks may race safely).

    Raises:
        DataError: see :func:`read_rows`.
    """
    report = read_rows(path, cfg, key, template)
    # the rows kept can depend on the template (chat-format rows it cannot render are skipped)
    checked_by = type(template).__qualname__ if template is not None and cfg.conversation_column else None
    parts = [NORMALIZED_VERSION, report.sha256, *_features(cfg)] + ([checked_by] if checked_by else [])
    digest = hashlib.sha256(json.dumps(parts).encode())
    normalized = _cache_root(cfg) / "normalized" / f"{digest.hexdigest()[:32]}.jsonl"
    if not normalized.exists():
        normalized.parent.mkdir(parents=True, exist_ok=True)
        partial_file = normalized.with_suffix(f".{os.getpid()}.tmp")
        with partial_file.open("w", encoding="utf-8") as out:
            for row in report.rows:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(partial_file, normalized)
    # datasets' own "Generating train split: N examples" bar names a split of its own making (every file is
    # read as "train") and counts rows that this pass already counted: it stays off (the tokenizing bar says)
    quiet = datasets.is_progress_bar_enabled()
    if quiet:
        datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(
            "json",
            data_files=str(normalized),
            split="train",
            features=_features(cfg),
            cache_dir=str(_cache_root(cfg) / "datasets"),
        )
    finally:
        if quiet:
            datasets.enable_progress_bars()


def build_datasets(cfg: DataConfig, template, split: str, features: str | None = None) -> datasets.Dataset:
    """Load, check and featurize one split.

    Args:
        cfg: the data configuration.
        template: the model family's :class:`~ptuning.models.base.PromptTemplate`.
        split: ``"train"`` (training features: ``input_ids``, ``labels``) or ``"validation"`` /
            ``"test"`` (generation features: ``input_ids``, ``reference``, ``prompt``).
        features: ``"train"`` or ``"eval"`` to choose the features regardless of the split (e.g. the
            validation loss during training needs training features of the validation file).

    Returns:
        The featurized split; the first ``max_train_samples`` / ``max_eval_samples`` rows only when set.
        Features are cached by ``datasets`` (``overwrite_cache`` recomputes them) and computed in
        ``preprocessing_num_workers`` processes.

    Raises:
        DataError: a problem with the file (see :func:`read_rows`).
        ValueError: unknown split or no file configured for it.
    """
    path = cfg.file_for(split)
    dataset = load_rows(path, cfg, key=f"data.{split}_file", template=template)
    limit = cfg.max_train_samples if split == "train" else cfg.max_eval_samples
    if limit is not None and limit < len(dataset):
        dataset = dataset.select(range(limit))
    if features not in (None, "train", "eval"):
        raise ValueError(f"unknown features {features!r}: expected 'train' or 'eval'")
    kind = features or ("train" if split == "train" else "eval")
    featurize = preprocess_train if kind == "train" else preprocess_eval
    # a validation file is tokenized twice during training (loss and generation features): say which
    purpose = "generation" if kind == "eval" else ("training" if split == "train" else "the eval loss")
    featurized = dataset.map(
        partial(featurize, template=template, cfg=cfg),
        batched=True,
        num_proc=cfg.preprocessing_num_workers,
        remove_columns=dataset.column_names,
        load_from_cache_file=not cfg.overwrite_cache,
        desc=f"Tokenizing {split} ({Path(path).name}) for {purpose}",
    )
    report_truncation(featurized, path, cfg, f"data.{split}_file ({Path(path).name}, for {purpose})")
    return featurized


def check_positions(lengths: list[int], limit: int, path, hint: str, *, extra: int = 0, what: str = "rows") -> None:
    """Refuses rows that would run past the positions the model was built for.

    One behaviour for training and evaluation (chat and the server cut the prompt to fit instead, and say
    so): a row longer than ``limit`` would use positions the model never saw, so its loss or its answer
    would be silently wrong.

    Args:
        lengths: tokens of each row (training: prompt + response; generation: the prompt).
        limit: the model's positions (``max_sequence_length`` / ``max_position_embeddings``).
        path: the data file, for the message.
        hint: which keys shorten the rows.
        extra: tokens each row needs beyond its length (generation: ``max_new_tokens``).

    Raises:
        DataError: ``"<file>: N of M rows need more than the model's L positions (longest K ...); <hint>"``.
    """
    over = [n + extra for n in lengths if n + extra > limit]
    if over:
        plus = f", prompt + {extra} new tokens" if extra else ""
        raise DataError(
            f"{path}: {len(over)} of {len(lengths)} {what} need more than the model's {limit} positions "
            f"(longest {max(over)} tokens{plus}); {hint}"
        )


def report_truncation(dataset: datasets.Dataset, path, cfg: DataConfig, label: str | None = None) -> tuple[int, int, int]:
    """Says once, in one line, how many rows lost tokens to the length budgets: earlier turns left out and
    queries cut to fit ``max_source_length``, responses cut to ``max_target_length`` (training features).

    Args:
        label: how the line names the data (``data.validation_file (dev.json, for generation)``: the same file
            can be read for several purposes); default: the path.

    Returns:
        ``(rows that lost turns, rows whose query itself was cut, rows whose response was cut)``.
    """
    lost_turns = sum(1 for n in dataset["dropped_turns"] if n)
    cut = sum(1 for n in dataset["truncated_tokens"] if n)
    answers = (sum(1 for n in dataset["truncated_answer_tokens"] if n)
               if "truncated_answer_tokens" in dataset.column_names else 0)
    parts = []
    if lost_turns:
        parts.append(f"{lost_turns} left out their oldest turns (the current question is always kept)")
    if cut:
        parts.append(f"{cut} had the {'question' if lost_turns else 'prompt'} cut")
    if lost_turns or cut:
        parts[-1] += f" to fit data.max_source_length={cfg.max_source_length}"
    if answers:
        parts.append(f"{answers} had the response cut to data.max_target_length={cfg.max_target_length}")
    if parts:
        logger.warning("%s: of %d rows, %s", label or path, len(dataset), "; ".join(parts))
    return lost_turns, cut, answers


# ---- user-facing exit ----


@contextmanager
def exit_on_data_error(code: int = 2) -> Iterator[None]:
    """Turn a :class:`DataError` into ``error: <message>`` on stderr and exit ``code``, no traceback."""
    try:
        yield
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(code) from None
