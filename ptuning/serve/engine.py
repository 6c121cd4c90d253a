"""Continuous batching of many prefixes on one frozen backbone.

The :class:`Engine` is the whole decoding side of the server behind a small API that a faster implementation
(a static-slot decode loop) can replace without touching the server:

* ``add(request) -> slot``: queue a prompt for a named prefix (or the bare base model) with its own decoding
  settings and random stream;
* ``step() -> [StepOutput(slot, token_id, finish_reason)]``: every active row gets exactly one new token;
* ``cancel(slot)``: the row leaves at once and its slot is free.

Rows of different prefixes share one batch. The :class:`PrefixBank` holds every prefix's keys and values,
computed once from its encoder, stacked ``[N, P_max, K]`` and left-aligned with a visibility mask ``[N, P_max]``
(shorter prefixes, and the base model with none, hide their unused columns); a step gathers the rows' prefixes
into one :class:`~ptuning.prefix.PrefixKV` that the model takes in place of its own (the model contract in
:mod:`ptuning.models.base`). So a row never attends to another row's prefix.

This first implementation keeps one transformers ``Cache`` for the running rows, left-padded to a common length
with a padding mask; rows joining are prefilled together in one forward and their cache is padded and appended,
rows leaving are dropped from it (and columns that only pads still hold are trimmed). A step is therefore one
decode forward over the running rows, plus one prefill forward when rows joined since the last step. Position
ids come from the model (``prompt_position_ids`` / ``next_position_ids``), so each family keeps its own
scheme (ChatGLM-6B's 2D positions, rotary positions of other decoders); pads never shift them.

Shapes: B rows, S prompt tokens, T cached tokens (with left pads), P prefix columns, K = 2·L·G·D.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from ..prefix import PrefixKV, PrefixShape, split_key_values

STOP, LENGTH = "stop", "length"


class DecodeEngine(Protocol):
    """What the scheduler needs of an engine: any class with these members can replace :class:`Engine`
    (e.g. a static-slot decode loop) without touching the scheduler or the server."""

    max_batch_size: int

    @property
    def active(self) -> int: ...

    @property
    def free_slots(self) -> int: ...

    def add(self, request: EngineRequest) -> int: ...

    def step(self) -> list[StepOutput]: ...

    def cancel(self, slot: int) -> bool: ...

    def cancel_all(self) -> list[int]: ...


class EngineFull(RuntimeError):
    """``add`` found every slot taken (``max_batch_size`` rows active)."""


@dataclass
class EngineRequest:
    """One answer to generate.

    Attributes:
        prompt_ids: the prompt as the family's template built it (ending where the answer starts).
        prefix: a name in the engine's :class:`PrefixBank`, or None for the bare base model.
        max_new_tokens: new tokens at most (the stop token included).
        temperature: 0 = greedy (argmax); otherwise logits / temperature are sampled.
        top_p: nucleus sampling: the smallest set of tokens whose probability reaches ``top_p``.
        seed: seeds this row's own random stream (None: fresh entropy), so a seeded answer does not depend on
            what else is in the batch.
        stop_token_ids: ids that end the answer (reported with finish reason ``stop``).
    """

    prompt_ids: Sequence[int]
    prefix: str | None = None
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: Sequence[int] = ()


@dataclass(frozen=True)
class StepOutput:
    """One new token of one row. ``finish_reason`` is ``stop`` (a stop id: ``token_id`` is that id),
    ``length`` (``max_new_tokens`` reached) or None (the row goes on). A finished row's slot is free."""

    slot: int
    token_id: int
    finish_reason: str | None


class PrefixBank:
    """Named prefixes' keys and values, computed once, stacked and padded to the longest.

    Args:
        shape: the model's prefix shape (layers, key/value heads, head size); ``pre_seq_len`` is ignored.
        prefixes: name -> the encoder's output ``[P_i, K]`` (any float dtype).
        dtype: the backbone's dtype (the keys and values are cast once, as training casts them per step).
        device: where the bank lives.

    Index 0 is the bare base model (no visible column); prefix ``i`` of ``names`` has index ``i``.
    """

    def __init__(self, shape: PrefixShape, prefixes: Mapping[str, torch.Tensor], dtype: torch.dtype, device=None):
        self.shape = shape
        self.names: list[str | None] = [None, *prefixes]
        self.lengths = [0] + [int(t.shape[0]) for t in prefixes.values()]
        width = max(self.lengths)
        kv = torch.zeros(len(self.names), width, shape.kv_width, dtype=dtype, device=device)  # (N, P_max, K)
        for i, tensor in enumerate(prefixes.values(), start=1):
            if tensor.dim() != 2 or tensor.shape[1] != shape.kv_width:
                raise ValueError(f"prefix {self.names[i]!r}: shape {list(tensor.shape)}, expected [P, {shape.kv_width}]")
            kv[i, : tensor.shape[0]] = tensor.detach().to(device=device, dtype=dtype)
        self.kv = kv
        self.mask = torch.arange(width, device=device)[None] < torch.tensor(self.lengths, device=device)[:, None]

    def index(self, name: str | None) -> int:
        """The bank index of ``name``. Raises KeyError for an unknown name."""
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(name) from None

    def gather(self, indices: list[int]) -> PrefixKV | None:
        """The prefixes of a batch's rows: ``PrefixKV`` with per-layer ``[B, G, P, D]`` over the longest prefix
        among them (None when no row has one) and a ``[B, P]`` mask (None when every column is visible)."""
        width = max(self.lengths[i] for i in indices)
        if width == 0:
            return None
        idx = torch.tensor(indices, device=self.kv.device)
        kv = self.kv.index_select(0, idx)[:, :width]  # (B, P, K)
        keys, values = split_key_values(kv, self.shape)
        if all(self.lengths[i] == width for i in indices):
            return PrefixKV(keys, values, None)  # every column visible to every row
        return PrefixKV(keys, values, self.mask.index_select(0, idx)[:, :width])  # (B, P)


@dataclass
class _Row:
    slot: int
    request: EngineRequest
    prefix_index: int
    generator: torch.Generator | None
    stop_ids: frozenset[int]
    generated: int = 0
    last_token: int = 0
    position: torch.Tensor | None = None  # the position ids of the last token fed, batch dim 1


class Engine:
    """Decodes many requests together on one frozen model (a :class:`DecodeEngine`).

    What it asks of the model is the family contract of :mod:`ptuning.models.base` only: ``forward`` with
    ``prefix=``, ``cache=``, ``use_cache`` and ``logits_to_keep``, ``prompt_position_ids`` /
    ``next_position_ids``, and a transformers ``Cache`` whose ``layers`` hold ``keys`` / ``values``
    ``[B, G, T, D]`` (rows are appended, dropped and left-padded there).

    Args:
        model: a model of any family keeping the contract of :mod:`ptuning.models.base` (``prefix=`` per call,
            ``prompt_position_ids`` / ``next_position_ids``), in eval mode, without a prefix encoder of its own.
        bank: the prefixes requests may name.
        max_batch_size: rows decoded together at most; ``add`` beyond it raises :class:`EngineFull`.
        max_length: prompt + new tokens at most (the family's ``max_positions``).
        pad_token_id: the id left pads carry (never attended to).
        vocab_limit: ids from here on are never chosen: output rows the tokenizer has no piece for (real
            checkpoints pad their vocabulary, e.g. ChatGLM-6B has 130528 rows for 130344 pieces); None = all.
    """

    def __init__(self, model, bank: PrefixBank, *, max_batch_size: int = 8, max_length: int = 2048,
                 pad_token_id: int = 0, vocab_limit: int | None = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size}: expected a positive integer")
        self.model = model
        self.bank = bank
        self.max_batch_size = max_batch_size
        self.max_length = max_length
        self.pad_token_id = pad_token_id
        self.vocab_limit = vocab_limit
        self.device = next(model.parameters()).device
        self._free = list(range(max_batch_size - 1, -1, -1))  # slot ids, the lowest taken first
        self._pending: list[_Row] = []  # added, not yet prefilled
        self._running: list[_Row] = []  # in the cache, in batch order
        self._cache = None
        self._mask: torch.Tensor | None = None  # (B, T) 1 = real token

    # ---- the API ----

    @property
    def active(self) -> int:
        """Rows added and not yet finished or cancelled."""
        return len(self._pending) + len(self._running)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def add(self, request: EngineRequest) -> int:
        """Queues a request; its prompt is prefilled at the next :meth:`step`. Returns its slot.

        Raises:
            EngineFull: every slot is taken.
            KeyError: an unknown prefix name.
            ValueError: an empty prompt, ``max_new_tokens`` < 1, prompt + ``max_new_tokens`` over
                ``max_length``, or sampling settings out of range.
        """
        if not self._free:
            raise EngineFull(f"all {self.max_batch_size} slots are taken")
        index = self.bank.index(request.prefix)
        n = len(request.prompt_ids)
        if n == 0:
            raise ValueError("an empty prompt")
        if request.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={request.max_new_tokens}: expected a positive integer")
        if n + request.max_new_tokens > self.max_length:
            raise ValueError(f"{n} prompt tokens + max_new_tokens={request.max_new_tokens} exceed the model's "
                             f"{self.max_length} positions")
        if request.temperature < 0 or not 0 < request.top_p <= 1:
            raise ValueError(f"temperature={request.temperature}, top_p={request.top_p}: expected temperature >= 0 "
                             "and top_p in (0, 1]")
        generator = None
        if request.temperature > 0:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(request.seed if request.seed is not None else secrets.randbits(63))
        slot = self._free.pop()
        self._pending.append(_Row(slot, request, index, generator, frozenset(request.stop_token_ids)))
        return slot

    def cancel(self, slot: int) -> bool:
        """Ends a row now and frees its slot. Returns False when the slot was not active."""
        for i, row in enumerate(self._pending):
            if row.slot == slot:
                del self._pending[i]
                self._free.append(slot)
                return True
        for i, row in enumerate(self._running):
            if row.slot == slot:
                self._drop([i])
                return True
        return False

    def cancel_all(self) -> list[int]:
        """Ends every row (e.g. after a failed step). Returns the slots freed."""
        slots = [r.slot for r in self._pending + self._running]
        for row in self._pending + self._running:
            self._free.append(row.slot)
        self._pending, self._running = [], []
        self._cache = self._mask = None
        return slots

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """One new token for every active row: one decode forward over the running rows, and one prefill
        forward over the rows added since the last step. Finished rows leave the batch and free their slot."""
        out: list[StepOutput] = []
        if self._running:
            out += self._decode()
        if self._pending:
            out += self._prefill()
        return out

    # ---- internals ----

    def _forward(self, ids, mask, positions, rows, cache):
        prefix = self.bank.gather([r.prefix_index for r in rows])
        result = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                            use_cache=True, prefix=prefix, logits_to_keep=1)
        return result.logits[:, -1].float(), result.cache  # (B, V)

    def _prefill(self) -> list[StepOutput]:
        rows, self._pending = self._pending, []
        width = max(len(r.request.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            prompt = torch.as_tensor(list(row.request.prompt_ids), dtype=torch.long)
            ids[i, width - len(prompt):] = prompt
            mask[i, width - len(prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = self.model.prompt_position_ids(ids, mask)  # family-specific, batch first
        logits, cache = self._forward(ids, mask, positions, rows, None)
        for i, row in enumerate(rows):
            row.position = positions[i : i + 1, ..., -1:]
        self._join(rows, cache, mask)
        return self._advance(rows, logits, first=len(self._running) - len(rows))

    def _decode(self) -> list[StepOutput]:
        rows = self._running
        ids = torch.tensor([[r.last_token] for r in rows], dtype=torch.long, device=self.device)  # (B, 1)
        positions = torch.cat([self.model.next_position_ids(r.position) for r in rows], dim=0)
        mask = torch.cat([self._mask, self._mask.new_ones(len(rows), 1)], dim=1)  # (B, T + 1)
        logits, self._cache = self._forward(ids, mask, positions, rows, self._cache)
        self._mask = mask
        for i, row in enumerate(rows):
            row.position = positions[i : i + 1]
        return self._advance(rows, logits, first=0)

    def _advance(self, rows: list[_Row], logits: torch.Tensor, first: int) -> list[StepOutput]:
        """Picks each row's token; rows that finish leave the batch (``first``: the batch index of ``rows[0]``)."""
        tokens = self._choose(rows, logits)
        out, done = [], []
        for i, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            row.generated += 1
            row.last_token = token
            reason = STOP if token in row.stop_ids else LENGTH if row.generated >= row.request.max_new_tokens else None
            out.append(StepOutput(row.slot, token, reason))
            if reason is not None:
                done.append(first + i)
        if done:
            self._drop(done)
        return out

    def _choose(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
        """Greedy for rows with temperature 0, else top-p sampling with the row's own generator."""
        if self.vocab_limit is not None and logits.shape[-1] > self.vocab_limit:
            logits[:, self.vocab_limit :] = float("-inf")
        tokens = logits.argmax(dim=-1).tolist()
        for i, row in enumerate(rows):
            req = row.request
            if req.temperature <= 0:
                continue
            probs = torch.softmax(logits[i] / req.temperature, dim=-1)  # (V,)
            if req.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                # keep the smallest head whose mass reaches top_p (the first token always stays)
                drop = sorted_probs.cumsum(0) - sorted_probs >= req.top_p
                sorted_probs = sorted_probs.masked_fill(drop, 0.0)
                pick = torch.multinomial(sorted_probs, 1, generator=row.generator)
                tokens[i] = int(order[pick])
            else:
                tokens[i] = int(torch.multinomial(probs, 1, generator=row.generator))
        return tokens

    def _join(self, rows: list[_Row], cache, mask: torch.Tensor) -> None:
        """Appends prefilled rows (their cache and ``[n, S]`` mask) to the running batch."""
        if not self._running:
            self._running, self._cache, self._mask = list(rows), cache, mask
            return
        old, new = self._mask.shape[1], mask.shape[1]
        width = max(old, new)
        for layer, added in zip(self._cache.layers, cache.layers, strict=True):
            layer.keys = torch.cat([_left_pad(layer.keys, width), _left_pad(added.keys, width)], dim=0)
            layer.values = torch.cat([_left_pad(layer.values, width), _left_pad(added.values, width)], dim=0)
        self._mask = torch.cat([_left_pad(self._mask, width, dim=1), _left_pad(mask, width, dim=1)], dim=0)
        self._running += rows

    def _drop(self, indices: list[int]) -> None:
        """Removes running rows (batch indices) and frees their slots; trims columns only pads still hold."""
        gone = set(indices)
        for i in gone:
            self._free.append(self._running[i].slot)
        keep = [i for i in range(len(self._running)) if i not in gone]
        self._running = [self._running[i] for i in keep]
        if not keep:
            self._cache = self._mask = None
            return
        index = torch.tensor(keep, device=self.device)
        mask = self._mask.index_select(0, index)
        # the leftmost column some remaining row still uses
        start = int((mask.shape[1] - mask.sum(dim=1)).min()) if mask.shape[1] else 0
        self._mask = mask[:, start:]
        for layer in self._cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]


def _left_pad(t: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """``t`` with zeros in front along ``dim`` up to ``width``."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)
