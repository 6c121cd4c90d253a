"""Continuous batching of many prefixes on one frozen backbone.

The :class:`Engine` is the whole decoding side of the server behind a small API that a faster implementation
(a static-slot decode loop) can replace without touching the server:

* ``add(request) -> slot``: queue a prompt for a named prefix (or the bare base model) with its own decoding
  settings and random stream;
* ``step() -> [StepOutput(slot, token_id, finish_reason)]``: every active row gets exactly one new token (or,
  when its token cannot be drawn, finish reason ``error`` for that row alone);
* ``cancel(slot)``: the row leaves at once and its slot is free.

Rows of different prefixes share one batch. The :class:`PrefixBank` holds every prefix's keys and values,
computed once from its encoder, stacked ``[N, P_max, K]`` and left-aligned with a visibility mask ``[N, P_max]``
(shorter prefixes, and the base model with none, hide their unused columns); a step gathers the rows' prefixes
into one :class:`~ptuning.prefix.PrefixKV` that the model takes in place of its own (the model contract in
:mod:`ptuning.models.base`). So a row never attends to another row's prefix.

The :class:`Engine` is a thin layer over the decode loop of :mod:`ptuning.generation` (a static slot cache, one
slot per row, each its own length, the prefix a separate read-only input of every layer): rows join between
steps (prefilled into a free slot) and leave at once (the slot freed). Position ids come from the model
(``prompt_position_ids`` / ``next_position_ids``), so each family keeps its own scheme (ChatGLM-6B's 2D
positions, rotary positions of other decoders).

Shapes: B rows, S prompt tokens, T cached tokens (with left pads), P prefix columns, K = 2·L·G·D.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from ..generation import ERROR, LENGTH, STOP, Decoder, PrefixTable, Request, Sampling
from ..prefix import PrefixKV, PrefixShape, split_key_values

__all__ = ["ERROR", "LENGTH", "STOP", "DecodeEngine", "Engine", "EngineFull", "EngineRequest", "PrefixBank",
           "StepOutput"]


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
    ``length`` (``max_new_tokens`` reached), ``error`` (this row's token could not be drawn: ``error`` says why,
    ``token_id`` is meaningless; the other rows are not affected) or None (the row goes on). A finished row's
    slot is free."""

    slot: int
    token_id: int
    finish_reason: str | None
    error: str | None = None


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


class Engine:
    """Decodes many requests together on one frozen model (a :class:`DecodeEngine`): a thin layer over the decode
    loop of :mod:`ptuning.generation` (a slot cache with one row per request, each its own length; one decode
    forward per step over the running rows and one prefill forward over the rows added since; a row that ends
    leaves at once and its slot is free).

    What it asks of the model is the family contract of :mod:`ptuning.models.base` only: ``forward`` with
    ``prefix=`` and ``slot_cache=``, ``prompt_position_ids`` / ``next_position_ids``.

    Args:
        model: a model of any family keeping the contract of :mod:`ptuning.models.base`, in eval mode, without a
            prefix encoder of its own.
        bank: the prefixes requests may name.
        max_batch_size: rows decoded together at most; ``add`` beyond it raises :class:`EngineFull`.
        max_length: prompt + new tokens at most (the family's ``max_positions``).
        pad_token_id: the id left pads carry in a prefill (never attended to).
        vocab_limit: ids from here on are never chosen: output rows the tokenizer has no piece for (real
            checkpoints pad their vocabulary, e.g. ChatGLM-6B has 130528 rows for 130344 pieces); None = all.
        capacity: tokens per row the cache holds before it grows (doubling; default 256, at most
            ``max_length``).
    """

    def __init__(self, model, bank: PrefixBank, *, max_batch_size: int = 8, max_length: int = 2048,
                 pad_token_id: int = 0, vocab_limit: int | None = None, capacity: int = 256):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size}: expected a positive integer")
        self.bank = bank
        self.max_batch_size = max_batch_size
        self.max_length = max_length
        keys, values = split_key_values(bank.kv, bank.shape)  # per layer (N, G, P_max, D)
        table = PrefixTable(PrefixKV(keys, values, bank.mask))
        self._decoder = Decoder(model, max_batch_size=max_batch_size, max_length=max_length, prefixes=table,
                                capacity=min(capacity, max_length), pad_token_id=pad_token_id,
                                vocab_limit=vocab_limit)
        self._free = list(range(max_batch_size - 1, -1, -1))  # slot ids, the lowest taken first
        self._slot_of: dict[int, int] = {}  # the decoder's handle -> slot
        self._handle_of: dict[int, int] = {}  # slot -> handle

    # ---- the API ----

    @property
    def active(self) -> int:
        """Rows added and not yet finished or cancelled."""
        return self._decoder.active

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
        handle = self._decoder.add(Request(
            list(request.prompt_ids), request.max_new_tokens,
            Sampling(temperature=request.temperature, top_p=request.top_p, seed=request.seed),
            stop_token_ids=list(request.stop_token_ids), prefix=index,
        ))
        slot = self._free.pop()
        self._slot_of[handle], self._handle_of[slot] = slot, handle
        return slot

    def cancel(self, slot: int) -> bool:
        """Ends a row now and frees its slot. Returns False when the slot was not active."""
        handle = self._handle_of.get(slot)
        if handle is None:
            return False
        self._decoder.cancel(handle)
        self._release(handle)
        return True

    def cancel_all(self) -> list[int]:
        """Ends every row (e.g. after a failed step). Returns the slots freed."""
        slots = [self._slot_of[h] for h in self._decoder.cancel_all()]
        for slot in slots:
            self._release(self._handle_of[slot])
        return slots

    def step(self) -> list[StepOutput]:
        """One new token for every active row: one decode forward over the running rows, and one prefill
        forward over the rows added since the last step. Finished rows leave the batch and free their slot."""
        out = []
        for token in self._decoder.step():
            slot = self._slot_of[token.handle]
            out.append(StepOutput(slot, token.token_id, token.finish_reason, token.error))
            if token.finish_reason is not None:
                self._release(token.handle)
        return out

    def _release(self, handle: int) -> None:
        slot = self._slot_of.pop(handle)
        del self._handle_of[slot]
        self._free.append(slot)
