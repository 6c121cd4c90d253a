"""The decode loop: rows join (prefill into a free slot), every step gives each row one token, rows leave.

:class:`Decoder` drives any model that keeps the contract of :mod:`ptuning.models.base`: it calls
``model(input_ids, attention_mask, position_ids, prefix=PrefixKV, slot_cache=SlotCache, use_cache=False,
logits_to_keep=1)`` and the model's attention layers store keys and values in the :class:`~.cache.SlotCache`
(and in a decode step read them back from it) instead of a transformers ``Cache``. Positions come from the
model (``prompt_position_ids`` / ``next_position_ids``), so each family keeps its own scheme.

A step is one decode forward over the running rows (one new token each) and, when rows were added since the
last step, one prefill forward over those (their first token). Nothing of ``generate()``'s per-token work
(logits processors, stopping criteria, growing ``input_ids`` and masks, cache bookkeeping) runs: the host only
keeps counters, checks stop ids / stop strings, and moves the last row into the place of a row that finished.

Shapes: R slots, B running rows, S prompt tokens, V vocabulary.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..prefix import PrefixKV
from .cache import SlotCache
from .memory import cache_dtype
from .sampling import NOT_FINITE, Sampling, draw_tokens

STOP, LENGTH, ERROR = "stop", "length", "error"


class DecoderFull(RuntimeError):
    """``add`` found every slot taken."""


class PrefixTable:
    """The prefixes rows may use, by index: the rows of one :class:`~ptuning.prefix.PrefixKV`.

    A table of batch 1 (e.g. the model's own prefix) gives every row that prefix; a table of N rows (several
    prefixes padded to the longest, with a ``[N, P]`` visibility mask; a row of the bare model hides every
    column) gives row i of the batch the prefix its request names.

    Args:
        prefix: per-layer keys/values ``[N, G, P, D]`` and optional mask ``[N, P]``, or None (no prefix).
    """

    def __init__(self, prefix: PrefixKV | None):
        self.prefix = prefix if prefix is not None and prefix.length else None
        self.choices = self.prefix.keys[0].shape[0] if self.prefix is not None else 1
        self._visible = None
        if self.prefix is not None and self.prefix.mask is not None:
            self._visible = self.prefix.mask.to(torch.bool).all(dim=1).tolist()  # (N,) rows that see every column

    @property
    def length(self) -> int:
        """P, the prefix columns (0 without a prefix)."""
        return self.prefix.length if self.prefix is not None else 0

    def check(self, index: int) -> None:
        if not 0 <= index < self.choices:
            raise ValueError(f"prefix index {index}: expected 0 .. {self.choices - 1}")

    def gather(self, indices: list[int]) -> PrefixKV | None:
        """The prefixes of rows that use ``indices``: per-layer ``[B, G, P, D]`` (views when the table has one
        prefix) and a ``[B, P]`` mask (None when every row sees every column)."""
        p = self.prefix
        if p is None:
            return None
        n = len(indices)
        if self.choices == 1:
            mask = None if p.mask is None or self._visible[0] else p.mask.expand(n, -1)
            return PrefixKV([k.expand(n, -1, -1, -1) for k in p.keys], [v.expand(n, -1, -1, -1) for v in p.values],
                            mask)
        index = torch.tensor(indices, device=p.keys[0].device)
        mask = None
        if p.mask is not None and not all(self._visible[i] for i in indices):
            mask = p.mask.index_select(0, index)
        return PrefixKV([k.index_select(0, index) for k in p.keys], [v.index_select(0, index) for v in p.values], mask)


def model_prefix(model) -> PrefixKV | None:
    """The model's own prefix for one row (``model.prefix_key_values``), computed once in the model's compute
    dtype (no dropout: the model must be in eval mode), or None without a prefix encoder."""
    make = getattr(model, "prefix_key_values", None)
    if make is None:
        return None
    with torch.no_grad():
        return make(1, compute_dtype(model))


def default_cache_dtype(model, device) -> torch.dtype:
    """The cache's dtype: the model's compute dtype, except float32 for a 16-bit model on a CPU.

    A decode step's attention reads the whole cache once per token. On a CPU, PyTorch's bfloat16 attention is
    several times slower than its float32 one (measured on the project's AMD EPYC, one new token over 160 cached:
    136 vs 24 us at 1 row, 1083 vs 203 us at 8 rows), so the keys and values are kept in float32 there (twice
    the cache memory; the new keys and values are widened as they are stored, the query as it attends, and the
    attention output narrowed back: the attention itself is then exact float32).
    """
    return cache_dtype(compute_dtype(model), device)


def vocab_limit(tokenizer) -> int:
    """The ids a decoder may choose for this tokenizer: ``0 .. len(tokenizer) - 1``.

    Real checkpoints pad their output layer beyond the tokenizer's pieces (ChatGLM-6B: 130528 rows for 130344
    pieces; ChatGLM2/3, Qwen likewise, to a multiple of 64 or 128). An id without a piece decodes to nothing (or
    to an error), so evaluation, chat and the server all never choose one: greedy decoding takes the best id
    that has a piece, and sampling draws among those.
    """
    return len(tokenizer)


def compute_dtype(model) -> torch.dtype:
    """The dtype of the model's activations: its input embedding's (float32 when that is not a float)."""
    weight = model.get_input_embeddings().weight
    return weight.dtype if weight.is_floating_point() else torch.float32


@dataclass
class Request:
    """One answer to generate.

    Attributes:
        prompt_ids: the prompt as the family's template built it (ending where the answer starts).
        max_new_tokens: new tokens at most (a stop id included).
        sampling: greedy (default) or temperature / top-p with a seed.
        stop_token_ids: ids that end the answer (finish reason ``stop``; the id is reported, not part of it).
        stop_strings: texts that end the answer once the decoded answer contains one (finish reason ``stop``);
            needs the decoder's ``tokenizer``.
        prefix: the index of the row's prefix in the decoder's :class:`PrefixTable`.
    """

    prompt_ids: Sequence[int]
    max_new_tokens: int = 64
    sampling: Sampling = field(default_factory=Sampling)
    stop_token_ids: Sequence[int] = ()
    stop_strings: Sequence[str] = ()
    prefix: int = 0


@dataclass(frozen=True)
class StepOutput:
    """One new token of one row.

    Attributes:
        handle: what :meth:`Decoder.add` returned for the row.
        token_id: the new token.
        finish_reason: ``stop`` (a stop id — then ``token_id`` is that id — or a stop string), ``length``
            (``max_new_tokens`` reached), ``error`` (this row's token could not be drawn, see ``error``; the
            token is meaningless), or None (the row goes on). A finished row has left.
        stop_string: the stop string found, if that ended the row.
        text_end: with a stop string, where it starts in the decoded answer (the answer is ``text[:text_end]``).
        error: with finish reason ``error``, why (one line).
    """

    handle: int
    token_id: int
    finish_reason: str | None
    stop_string: str | None = None
    text_end: int | None = None
    error: str | None = None


@dataclass
class _Row:
    handle: int
    request: Request
    generator: torch.Generator | None
    stop_ids: frozenset[int]
    generated: list[int] = field(default_factory=list)


class Decoder:
    """Decodes many rows together on one model with a :class:`~.cache.SlotCache`.

    Args:
        model: a model of any family keeping the contract of :mod:`ptuning.models.base`, in eval mode.
        max_batch_size: rows at most (the cache's slots).
        max_length: prompt + new tokens of a row at most (the family's ``max_positions``).
        prefixes: the prefixes rows may use (default: the model's own prefix for every row).
        capacity: tokens per row to allocate up front (default: none; :meth:`add` grows the cache to what each
            request needs, prompt + ``max_new_tokens``, checking the free memory first).
        tokenizer: decodes answers for stop strings.
        pad_token_id: the id left pads carry in a prefill (never attended to).
        compile: run the decode step through ``torch.compile`` (one compiled step for every batch size above
            1 and every length: the per-step values are tensors); the first step then takes the compile time
            (tens of seconds on a small CPU). If compiling or running the compiled step fails, a warning says so
            and the step runs eagerly from then on. One decoder reuses its compiled step for every batch it runs
            (evaluation keeps one decoder for all its batches).
        compile_options: keyword arguments of ``torch.compile`` (e.g. ``backend``, ``mode``). CUDA graphs
            (``mode="reduce-overhead"``, ``"max-autotune"``, ``options={"triton.cudagraphs": True}``) are
            refused: the step writes the cache in place and reads per-step host values, which a replayed graph
            would not see.
        cache_dtype: the keys' and values' dtype in the cache (default :func:`default_cache_dtype`).
        vocab_limit: ids from here on are never chosen (output rows the tokenizer has no piece for: real
            checkpoints pad their vocabulary, see :func:`tokenizer_vocab_limit`); None = every id.

    Raises:
        ValueError: ``max_batch_size`` < 1, or a CUDA-graph compile mode.
        CacheMemoryError: ``capacity`` tokens per row do not fit in the device's free memory.
    """

    def __init__(self, model, *, max_batch_size: int = 8, max_length: int = 2048, prefixes: PrefixTable | None = None,
                 capacity: int | None = None, tokenizer=None, pad_token_id: int = 0, compile: bool = False,
                 compile_options: dict | None = None, cache_dtype: torch.dtype | None = None,
                 vocab_limit: int | None = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size}: expected a positive integer")
        if compile:
            refuse_cuda_graphs(compile_options or {})
        self.model = model
        self.max_batch_size, self.max_length = max_batch_size, max_length
        self.tokenizer, self.pad_token_id, self.vocab_limit = tokenizer, pad_token_id, vocab_limit
        own = model_prefix(model)
        self.prefixes = prefixes if prefixes is not None else PrefixTable(own)
        self.device = next(model.parameters()).device
        model.store_lm_head_column_major()  # a CPU layout; the model leaves a weight on any other device as it is
        groups, head_dim, layers = model.cache_shape()
        self.cache = SlotCache(
            num_layers=layers, slots=max_batch_size, num_key_value_heads=groups, head_dim=head_dim,
            capacity=min(capacity or 0, max_length), prefix_room=self.prefixes.length,
            dtype=cache_dtype or default_cache_dtype(model, self.device), device=self.device,
            static_buffers=compile, max_capacity=max_length,
        )
        # rows without a prefix must say so explicitly to a model that has its own
        self._empty_prefix = _empty_prefix(self.cache) if own is not None else None
        self._compiled = torch.compile(self._traced_step, dynamic=True, **(compile_options or {})) if compile else None
        self._rows: list[_Row] = []  # running rows, in cache row order
        self._pending: list[_Row] = []
        self._next_handle = 0
        self._tokens = torch.zeros(max_batch_size, 1, dtype=torch.long, device=self.device)  # (R, 1) last tokens
        self._positions: torch.Tensor | None = None  # (R, ..., 1) positions of the last tokens
        self._prefix: PrefixKV | None = None  # the running rows' prefixes (rebuilt when rows change)
        self._prefix_stale = True

    # ---- the API ----

    @property
    def active(self) -> int:
        """Rows added and not finished or cancelled."""
        return len(self._rows) + len(self._pending)

    @property
    def free_slots(self) -> int:
        return self.max_batch_size - self.active

    def add(self, request: Request) -> int:
        """Queues a row; its prompt is prefilled at the next :meth:`step`. Returns its handle.

        The cache grows here, before the row is queued, to hold the prompt and ``max_new_tokens`` (so a step
        never has to); when that does not fit, this request is refused and the running rows go on untouched.

        Raises:
            DecoderFull: every slot is taken.
            ValueError: an empty prompt, ``max_new_tokens`` < 1, prompt + ``max_new_tokens`` over
                ``max_length``, sampling out of range, an unknown prefix index, or stop strings without a
                tokenizer.
            CacheMemoryError: the cache cannot grow to hold this request (the message says what fits).
        """
        if not self.free_slots:
            raise DecoderFull(f"all {self.max_batch_size} slots are taken")
        n = len(request.prompt_ids)
        if n == 0:
            raise ValueError("an empty prompt")
        if not isinstance(request.max_new_tokens, int) or request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={request.max_new_tokens!r}: expected a positive integer")
        if n + request.max_new_tokens > self.max_length:
            raise ValueError(f"{n} prompt tokens + max_new_tokens={request.max_new_tokens} exceed the model's "
                             f"{self.max_length} positions")
        request.sampling.check()
        self.prefixes.check(request.prefix)
        if request.stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need the decoder's tokenizer")
        self.cache.reserve(n + request.max_new_tokens)
        handle = self._next_handle
        self._next_handle += 1
        self._pending.append(_Row(handle, request, request.sampling.generator(self.device),
                                  frozenset(request.stop_token_ids)))
        return handle

    @torch.inference_mode()
    def cancel(self, handle: int) -> bool:
        """Ends a row now and frees its slot. Returns False when no such row is active."""
        for i, row in enumerate(self._pending):
            if row.handle == handle:
                del self._pending[i]
                return True
        for i, row in enumerate(self._rows):
            if row.handle == handle:
                self._leave([i])
                return True
        return False

    @torch.inference_mode()
    def cancel_all(self) -> list[int]:
        """Ends every row. Returns their handles."""
        handles = [r.handle for r in self._rows + self._pending]
        self._pending = []
        self._leave(list(range(len(self._rows))))
        return handles

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """One new token for every active row (a decode forward over the running rows, then a prefill forward
        over the rows added since the last step). Finished rows leave and free their slot."""
        out: list[StepOutput] = []
        if self._rows:
            out += self._decode()
        if self._pending:
            out += self._prefill()
        return out

    # ---- internals ----

    def _forward(self, ids, mask, positions, prefix):
        result = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, prefix=prefix,
                            slot_cache=self.cache, use_cache=False, logits_to_keep=1)
        return result.logits[:, -1]  # (B, V)

    def _prefix_of(self, rows: list[_Row]) -> PrefixKV | None:
        prefix = self.prefixes.gather([r.request.prefix for r in rows])
        return prefix if prefix is not None else self._empty_prefix

    def _prefill(self) -> list[StepOutput]:
        rows, self._pending = self._pending, []
        first = len(self._rows)
        width = max(len(r.request.prompt_ids) for r in rows)
        # built on the host, sent to the device once
        host_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long, device="cpu")
        host_mask = torch.zeros((len(rows), width), dtype=torch.long, device="cpu")
        for i, row in enumerate(rows):
            prompt = torch.tensor(list(row.request.prompt_ids), dtype=torch.long, device="cpu")
            host_ids[i, width - len(prompt):] = prompt
            host_mask[i, width - len(prompt):] = 1
        ids = host_ids.to(self.device, non_blocking=True)
        mask = host_mask.to(self.device, non_blocking=True)
        positions = self.model.prompt_position_ids(ids, mask)  # (n, ..., S), family-specific
        if self._positions is None:
            self._positions = positions.new_zeros(self.max_batch_size, *positions.shape[1:-1], 1)
        self.cache.begin_prefill(first, host_mask)
        try:
            logits = self._forward(ids, mask, positions, self._prefix_of(rows))
        finally:
            self.cache.end_step()
        self.cache.rows = first + len(rows)
        self._positions[first:first + len(rows)] = positions[..., -1:]
        self._rows += rows
        self._prefix_stale = True
        return self._advance(logits, first)

    def _decode(self) -> list[StepOutput]:
        n = len(self._rows)
        if self._prefix_stale:
            self._prefix = self._prefix_of(self._rows)
            self._prefix_stale = False
        prefix = self._prefix
        positions = self.model.next_position_ids(self._positions[:n])
        self._positions[:n] = positions
        length = prefix.length if prefix is not None else 0
        compiled = self._compiled is not None
        self.cache.begin_decode(length, prefix.mask if prefix is not None else None, traceable=compiled)
        tokens = self._tokens[:n]
        try:
            logits = None
            if compiled:
                self.cache.fill_rooms(prefix)
                plan = self.cache._plan
                # fresh tensors, not views of the slot-sized buffers: a view's base size would be a guard
                inputs = (tokens.clone(), positions, prefix, plan["write"], plan["mask"], plan["rows_index"].clone())
                try:
                    logits = self._compiled(*inputs)
                except Exception as err:  # noqa: BLE001 - the eager step below is the fallback
                    warnings.warn(f"the compiled decode step failed, decoding eagerly from now on: "
                                  f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}",
                                  RuntimeWarning, stacklevel=2)
                    self._compiled = None
            if logits is None:  # the same step eagerly (writing a step's keys twice writes the same values)
                logits = self._forward(tokens, None, positions, prefix)
        finally:
            self.cache.end_step()
        return self._advance(logits, 0)

    def _traced_step(self, tokens, positions, prefix, write, mask, rows_index):
        """The decode forward as ``torch.compile`` sees it: the step's per-row values come in as tensors."""
        plan = self.cache._plan
        plan["write"], plan["mask"], plan["rows_index"] = write, mask, rows_index
        return self._forward(tokens, None, positions, prefix)

    def _advance(self, logits: torch.Tensor, first: int) -> list[StepOutput]:
        """Picks the tokens of rows ``first ..`` from their logits ``[n, V]``; finished rows leave."""
        rows = self._rows[first:]
        if self.vocab_limit is not None and logits.shape[-1] > self.vocab_limit:
            logits = logits[:, : self.vocab_limit]  # the ids beyond never chosen, greedy or sampled
        samplings = [r.request.sampling for r in rows]
        failures: dict[int, str] = {}  # a row whose draw failed leaves with its own error; the others go on
        tokens, finite = draw_tokens(logits, samplings, [r.generator for r in rows],
                                     all(s.greedy for s in samplings), failures)
        self._tokens[first:first + len(rows), 0] = tokens
        # the step's one device read: the tokens, and which sampled rows had logits that are not finite
        read = (tokens if finite is None else torch.cat([tokens, finite.long()])).tolist()
        for i, ok in enumerate(read[len(rows):]):
            if not ok:
                failures.setdefault(i, NOT_FINITE)
        out, done = [], []
        for i, (row, token) in enumerate(zip(rows, read[:len(rows)], strict=True)):
            reason = stop_string = text_end = None
            if i in failures:
                out.append(StepOutput(row.handle, token, ERROR, error=failures[i]))
                done.append(first + i)
                continue
            if token in row.stop_ids:
                reason = STOP
            else:
                row.generated.append(token)
                if row.request.stop_strings:
                    stop_string, text_end = self._find_stop_string(row)
                    reason = STOP if stop_string is not None else None
                if reason is None and len(row.generated) >= row.request.max_new_tokens:
                    reason = LENGTH
            out.append(StepOutput(row.handle, token, reason, stop_string, text_end))
            if reason is not None:
                done.append(first + i)
        if done:
            self._leave(done)
        return out

    def _find_stop_string(self, row: _Row) -> tuple[str | None, int | None]:
        text = self.tokenizer.decode(row.generated, skip_special_tokens=True)
        hits = [(text.find(s), s) for s in row.request.stop_strings if s and s in text]
        if not hits:
            return None, None
        start, string = min(hits)
        return string, start

    def _leave(self, indices: list[int]) -> None:
        """Running rows (cache row indices) leave; the last rows move into their places."""
        for i in sorted(set(indices), reverse=True):
            last = len(self._rows) - 1
            if i != last:
                self.cache.move(last, i)
                self._tokens[i] = self._tokens[last]
                self._positions[i] = self._positions[last]
                self._rows[i] = self._rows[last]
            self._rows.pop()
            self.cache.release(last)
            self.cache.rows = len(self._rows)
        self._prefix_stale = True


#: compile modes and options that capture CUDA graphs
_CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def refuse_cuda_graphs(options: dict) -> None:
    """Raises ValueError for ``torch.compile`` options that would capture the decode step in CUDA graphs.

    The step is not graph-safe: it writes the slot cache in place at columns that change every step, reads
    the step's plan from Python state, and the rows' count changes as rows join and leave; a replayed graph would
    write where the recording wrote. (The step is compiled with ``dynamic=True``; a graph per shape would not
    help either.)
    """
    mode = options.get("mode")
    graphs = (options.get("options") or {}).get("triton.cudagraphs")
    if mode in _CUDA_GRAPH_MODES or graphs:
        what = f"mode={mode!r}" if mode in _CUDA_GRAPH_MODES else "options={'triton.cudagraphs': True}"
        raise ValueError(f"compile {what} captures CUDA graphs, which the decode step does not support (it writes the "
                         "cache in place at per-step columns); use the default mode or 'max-autotune-no-cudagraphs'")


def _empty_prefix(cache: SlotCache) -> PrefixKV:
    """A prefix of no columns: stands for "no prefix" with a model that would otherwise use its own."""
    empty = torch.zeros(1, cache.heads, 0, cache.head_dim, dtype=cache.dtype, device=cache.device)
    return PrefixKV([empty] * cache.num_layers, [empty] * cache.num_layers)


def run_to_end(decoder: Decoder, requests: Sequence[Request]) -> list[tuple[list[int], str]]:
    """Adds every request (at most ``max_batch_size``) and steps until all are done.

    Returns:
        Per request, in order: the new ids (without the stop id) and the finish reason.

    Raises:
        RuntimeError: a row's token could not be drawn (finish reason ``error``); the other rows are cancelled.
    """
    handles = [decoder.add(r) for r in requests]
    ids: dict[int, list[int]] = {h: [] for h in handles}
    reasons: dict[int, str] = {}
    while len(reasons) < len(handles):
        for token in decoder.step():
            if token.finish_reason == ERROR:
                decoder.cancel_all()
                raise RuntimeError(f"request {handles.index(token.handle)}: {token.error}")
            if token.finish_reason != STOP or token.stop_string is not None:
                ids[token.handle].append(token.token_id)
            if token.finish_reason is not None:
                reasons[token.handle] = token.finish_reason
    return [(ids[h], reasons[h]) for h in handles]


def stream(decoder: Decoder, request: Request) -> Iterator[int]:
    """Yields a request's new ids one by one (a stop id ends it and is not yielded) from a decoder that runs no
    other rows. Closing the generator cancels the row at once: no further forward runs.

    Raises:
        RuntimeError: the row's token could not be drawn (finish reason ``error``).
    """
    handle = decoder.add(request)
    try:
        while True:
            for token in decoder.step():
                if token.handle != handle:
                    continue
                if token.finish_reason == ERROR:
                    raise RuntimeError(token.error)
                if token.finish_reason == STOP and token.stop_string is None:
                    return
                yield token.token_id
                if token.finish_reason is not None:
                    return
    finally:
        decoder.cancel(handle)
