"""A static key/value cache with one slot per batch row, for decode loops of our own.

Every layer has two preallocated buffers ``[R, G, A + C, D]`` (keys, values). Row ``r``'s tokens sit left-aligned
in columns ``A ..``: token ``t`` of the row (its ``t``-th real token, pads never stored) in column ``A + t``; each
row has its own length, so rows of different prompt lengths need no padding and new tokens are written at each
row's own column. The ``A`` columns in front are room for the prefix: a decode step copies the prefix it is
given (a separate, read-only input of every layer) there, so attention reads ``[prefix | tokens]`` as one view
of the buffer without concatenating the cached tokens. The prefix is never counted, moved or kept as tokens:
the copy is refreshed from the input whenever the input changes, and :attr:`lengths` never include it.

The rows in use are always ``0 .. rows-1``: a row that leaves is replaced by the last one (:meth:`move`), so a
step attends over ``buffer[:rows]``, a view.

How attention uses it (the same in every family, see :meth:`SlotCache.update`):

* **prefill** (:meth:`begin_prefill`): a forward over a left-padded prompt batch for rows ``first .. first+n-1``.
  The layer attends as it always does (its own masks, the prefix in front); :meth:`update` only stores the
  real tokens' keys and values in the rows and returns None.
* **decode** (:meth:`begin_decode`): a forward of one new token per row ``0 .. rows-1``. :meth:`update` writes
  each row's key and value at its own column and returns the keys and values ``[rows, G, A + T, D]`` (T the
  longest row) and the mask ``[rows, 1, 1, A + T]`` (True = attend: the row's prefix columns and tokens;
  None when every column is visible to every row).

Shapes: R slots (rows at most), G key/value heads, A prefix room (the longest prefix passed), C capacity in
tokens per row, D head size, S tokens per row in a prefill, T the longest row after a step.
"""

from __future__ import annotations

import torch

from .memory import CacheMemoryError, CacheShape, check_fits, gib

PREFILL, DECODE = "prefill", "decode"


def _allocate(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One zeroed buffer (zeros, not garbage: a masked column still enters the scores, as -inf after masking,
    and a NaN or inf left in unused memory would turn them into NaN)."""
    return torch.zeros(shape, dtype=dtype, device=device)


class SlotCache:
    """Per-layer key/value buffers ``[R, G, A + C, D]`` with a length per row.

    Args:
        num_layers: L.
        slots: R, rows at most.
        num_key_value_heads: G.
        head_dim: D.
        capacity: C, tokens per row allocated now (0: nothing until the first :meth:`reserve`).
        prefix_room: A, the longest prefix the loop will pass (0: no prefix).
        dtype: the keys' dtype (the backbone's compute dtype).
        device: where the buffers live.
        static_buffers: mark the buffers' sizes static for ``torch.compile`` (a compiled step).
        max_capacity: C never grows beyond this (the model's positions); None = no bound.

    Attributes:
        lengths: ``[R]`` int64 on ``device``, tokens held per row.
        host_lengths: the same on the host (sizing a step needs no device sync).
        rows: the rows in use (``0 .. rows-1``).
        mode: ``"prefill"``, ``"decode"`` or None (between forwards).

    Raises:
        CacheMemoryError: ``capacity`` tokens per row do not fit in the device's free memory.
    """

    def __init__(self, *, num_layers: int, slots: int, num_key_value_heads: int, head_dim: int, capacity: int,
                 prefix_room: int = 0, dtype: torch.dtype = torch.float32, device=None, static_buffers: bool = False,
                 max_capacity: int | None = None):
        if slots < 1 or capacity < 0 or prefix_room < 0:
            raise ValueError(f"slots={slots}, capacity={capacity}, prefix_room={prefix_room}: expected slots >= 1, "
                             "capacity >= 0 and prefix_room >= 0")
        self.num_layers, self.slots = num_layers, slots
        self.heads, self.head_dim = num_key_value_heads, head_dim
        self.room, self.dtype = prefix_room, dtype
        self.static_buffers = static_buffers
        self.max_capacity = max_capacity
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.shape = CacheShape(num_layers, num_key_value_heads, head_dim, dtype)
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.host_lengths = [0] * slots  # the same, on the host: no device sync to size a step
        self.rows = 0
        self.mode: str | None = None
        self._plan: dict = {}
        self._room_source: list[tuple | None] = [None] * num_layers
        self._columns = torch.arange(prefix_room, device=self.device)
        self._all_rows = torch.arange(slots, device=self.device)
        #: ``[1, 1, 1, 1]`` True: the "build no mask" a model is given in a decode step (the slots' mask applies)
        self.all_visible = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.device)
        if capacity:
            self.reserve(capacity, grow=False)

    # ---- memory ----

    def bytes_for(self, capacity: int) -> int:
        """Bytes of every buffer at ``capacity`` tokens per row."""
        return self.shape.bytes(self.slots, self.room + capacity)

    def reserve(self, capacity: int, *, grow: bool = True) -> None:
        """Makes room for ``capacity`` tokens per row, keeping the rows.

        With ``grow`` the new capacity is a power of two (at least double the old one: few regrowths, and few
        distinct buffer sizes for a compiled step to specialise on), as far as ``max_capacity`` and the free
        memory allow; it never takes less than ``capacity``. Growing is atomic: every layer's new buffers are
        allocated (the free memory checked first) before any old one is given up, so a failure leaves the cache
        as it was.

        Raises:
            CacheMemoryError: ``capacity`` tokens per row do not fit (the free memory checked before allocating,
                or the allocator ran out); the cache is unchanged.
            ValueError: ``capacity`` is beyond ``max_capacity``.
        """
        if capacity <= self.capacity:
            return
        if self.max_capacity is not None and capacity > self.max_capacity:
            raise ValueError(f"{capacity} tokens per row in a cache of at most {self.max_capacity}")
        held = self.bytes_for(self.capacity)
        target = capacity
        if grow:
            rounded = 1 << (max(capacity, 2 * self.capacity) - 1).bit_length()
            target = min(rounded, self.max_capacity) if self.max_capacity is not None else rounded
            try:
                check_fits(self.bytes_for(target), self.device, what="")
            except CacheMemoryError:
                target = capacity  # no room to double: exactly what is asked for
        what = (f"a generation cache of {self.slots} rows x {self.room + target} columns ({self.num_layers} layers, "
                f"{self.heads} key/value heads of {self.head_dim}, {self.dtype})")
        per_row = self.shape.bytes(1, self.room + target)
        check_fits(self.bytes_for(target), self.device, what=what,
                   fits=f"{gib(held)} are held by the cache now, {gib(per_row)} per row")
        self._swap_in(self._grown(target), target)

    def _grown(self, capacity: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """New buffers for every layer holding the rows' columns, the old ones untouched (atomic growth)."""
        shape = (self.slots, self.heads, self.room + capacity, self.head_dim)
        keep = self.room + max(self.host_lengths, default=0)
        fresh: list[tuple[torch.Tensor, torch.Tensor]] = []
        try:
            for _ in range(self.num_layers):
                keys = _allocate(shape, self.dtype, self.device)
                values = _allocate(shape, self.dtype, self.device)
                fresh.append((keys, values))
        except torch.OutOfMemoryError as err:
            fresh.clear()  # what was allocated goes back before the error is raised
            first = str(err).strip().splitlines()[0] if str(err).strip() else "out of memory"
            raise CacheMemoryError(f"a generation cache of {self.slots} rows x {self.room + capacity} columns did not "
                                   f"fit on {self.device} ({first}); it keeps its {self.capacity} tokens per "
                                   "row") from None
        if self.keys:
            for (keys, values), old_keys, old_values in zip(fresh, self.keys, self.values, strict=True):
                keys[:, :, :keep] = old_keys[:, :, :keep]
                values[:, :, :keep] = old_values[:, :, :keep]
        return fresh

    def _swap_in(self, fresh: list[tuple[torch.Tensor, torch.Tensor]], capacity: int) -> None:
        self.keys = [k for k, _ in fresh]
        self.values = [v for _, v in fresh]
        if self.static_buffers:
            for t in [*self.keys, *self.values]:
                # for torch.compile: the buffers' sizes are constants, never tied to a batch that happens to match
                torch._dynamo.mark_static(t)
        self.capacity = capacity
        self._columns = torch.arange(self.room + capacity, device=self.device)
        self._room_source = [None] * self.num_layers

    @property
    def nbytes(self) -> int:
        """Bytes of all buffers."""
        return sum(t.numel() * t.element_size() for t in [*self.keys, *self.values])

    # ---- rows ----

    def move(self, source: int, target: int) -> None:
        """Row ``source`` (tokens and prefix room) takes the place of row ``target``."""
        if source == target:
            return
        end = self.room + self.host_lengths[source]
        for keys, values in zip(self.keys, self.values, strict=True):
            keys[target, :, :end] = keys[source, :, :end]
            values[target, :, :end] = values[source, :, :end]
        self.host_lengths[target] = self.host_lengths[source]
        self.lengths[target] = self.lengths[source]
        self._room_source = [None] * self.num_layers

    def release(self, row: int) -> None:
        """Forgets a row's tokens (its slot may be reused)."""
        self.host_lengths[row] = 0
        self.lengths[row] = 0
        self._room_source = [None] * self.num_layers

    # ---- steps ----

    def begin_prefill(self, first: int, attention_mask: torch.Tensor) -> None:
        """The next forward prefills rows ``first .. first+n-1`` (which must be empty) with a left-padded batch.

        Where each real token goes is worked out here, once, on the host (the mask is read from wherever it
        is, at most one device read), and sent to the device as one index tensor: the layers' stores then index
        with it, without a host sync per layer.

        Args:
            first: the first row.
            attention_mask: ``[n, S]``, 1 = real token (best on the host, where the decode loop builds it).

        Raises:
            ValueError: the rows are out of range, or a prompt is longer than ``max_capacity``.
            CacheMemoryError: the cache must grow for a prompt and that does not fit.
        """
        n, width = attention_mask.shape
        if first < 0 or first + n > self.slots:
            raise ValueError(f"rows {first}..{first + n - 1} of a cache with {self.slots} slots")
        real = attention_mask.detach().to("cpu").bool()  # (n, S), on the host
        counts = real.sum(dim=1).tolist()  # host
        self.reserve(max(counts))
        source = real.flatten().nonzero().flatten()  # (N,) into the flattened [n * S] tokens
        columns = self.room + (real.long().cumsum(dim=1) - 1).flatten()[source]  # (N,)
        index = torch.stack([first + source // width, columns, source]).to(self.device, non_blocking=True)  # (3, N)
        self._plan = {"first": first, "width": width, "rows": index[0], "columns": index[1], "source": index[2],
                      "counts": counts}
        self.mode = PREFILL

    def begin_decode(self, prefix_length: int = 0, prefix_mask: torch.Tensor | None = None, *,
                     traceable: bool = False) -> None:
        """The next forward feeds one token to each row ``0 .. rows-1``.

        Args:
            prefix_length: P of the prefix this step passes (at most the room).
            prefix_mask: ``[rows, P]`` bool (True = visible) or None (every prefix column visible).
            traceable: the step runs under ``torch.compile``: every per-step value is a tensor (the write
                columns ``[rows]``, the mask, whose last dimension is the width), nothing a Python number, so one
                compiled step serves every length.

        Raises:
            ValueError: a longer prefix than the room.
        """
        rows = self.rows
        if prefix_length > self.room:
            raise ValueError(f"a prefix of {prefix_length} columns in a cache with room for {self.room}")
        lengths = self.host_lengths[:rows]
        longest = max(lengths) + 1
        if longest > self.capacity:
            self.reserve(longest)
        width = self.room + longest
        equal = min(lengths) + 1 == longest and not traceable
        # rows of one length write into one column: a slice copy instead of a scatter
        write = self.room + lengths[0] if equal else self.lengths[:rows] + self.room  # int, or (B,)
        mask = None
        if traceable or not equal or prefix_length < self.room or prefix_mask is not None:
            columns = self._columns[:width][None]  # (1, A + T)
            ends = _per_row(write) + 1  # int, or (B, 1): no host-to-device copy
            mask = ((columns < ends) & (columns >= self.room)).expand(rows, width).clone()  # (B, A + T)
            if prefix_mask is not None:
                mask[:, :prefix_length] = prefix_mask.to(device=self.device, dtype=torch.bool)
            else:
                mask[:, :prefix_length] = True
            mask = mask[:, None, None, :]  # (B, 1, 1, A + T)
        self._plan = {"write": write, "width": None if traceable else width, "mask": mask,
                      "prefix_length": prefix_length, "rows_index": self._all_rows[:rows], "rooms_ready": False}
        self.mode = DECODE

    def fill_rooms(self, prefix) -> None:
        """Copies a decode step's prefix (a :class:`~ptuning.prefix.PrefixKV` or None) into every layer's room
        now, so that the step itself does not (a compiled step: the check whether the room already holds it is
        host logic)."""
        if prefix is not None and self._plan["prefix_length"]:
            for i, pair in enumerate(prefix):
                self._fill_room(i, self.rows, pair)
        self._plan["rooms_ready"] = True

    def end_step(self) -> None:
        """Counts the tokens of the forward that just ran."""
        plan = self._plan
        if self.mode == PREFILL:
            first, counts = plan["first"], plan["counts"]
            for i, c in enumerate(counts):
                self.host_lengths[first + i] = c
            self.lengths[first:first + len(counts)].copy_(torch.tensor(counts, device="cpu"), non_blocking=True)
            self._room_source = [None] * self.num_layers
        elif self.mode == DECODE:
            rows = self.rows
            self.lengths[:rows] += 1
            for i in range(rows):
                self.host_lengths[i] += 1
        self.mode = None

    def window_mask(self, window: int) -> torch.Tensor:
        """The decode step's mask for a layer with a sliding window of ``window`` tokens (transformers' rule: the
        new token sees the tokens less than ``window`` before it), prefix columns kept: ``[rows, 1, 1, A + T]``."""
        plan = self._plan
        key = ("window", window)
        if key not in plan:
            rows = plan["rows_index"].shape[0]
            width = plan["width"] if plan["width"] is not None else plan["mask"].shape[-1]
            columns = self._columns[:width][None]  # (1, A + T)
            write = _per_row(plan["write"])  # int, or (B, 1)
            keep = (columns > write - window) | (columns < self.room)
            mask = keep[:, None, None, :].expand(rows, 1, 1, width)
            plan[key] = mask if plan["mask"] is None else mask & plan["mask"]
        return plan[key]

    @property
    def mask(self) -> torch.Tensor | None:
        """The decode step's mask ``[rows, 1, 1, A + T]`` (True = attend), None when all columns are visible."""
        return self._plan.get("mask") if self.mode == DECODE else None

    def update(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor,
               prefix: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Stores a layer's new keys and values; in a decode step, returns what attention reads.

        Args:
            layer_idx: the layer.
            key: ``[n, G, S, D]`` rotated keys of the new tokens (prefill: left-padded; decode: S = 1).
            value: ``[n, G, S, D]``.
            prefix: this layer's prefix keys and values ``[rows or 1, G, P, D]`` (decode only; copied into the
                room when they differ from what the room holds).

        Returns:
            None in a prefill (attend over ``key`` / ``value`` as usual); in a decode step ``(keys, values, mask)``:
            keys and values ``[rows, G, A + T, D]`` (views of the buffers) and the mask
            ``[rows, 1, 1, A + T]`` or None.
        """
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        plan = self._plan
        if self.mode == PREFILL:
            rows, columns, source = plan["rows"], plan["columns"], plan["source"]
            # (n, G, S, D) -> (n * S, G, D), the real tokens picked by their precomputed places: no host sync
            keys[rows, :, columns] = key.transpose(1, 2).flatten(0, 1).index_select(0, source).to(keys.dtype)
            values[rows, :, columns] = value.transpose(1, 2).flatten(0, 1).index_select(0, source).to(values.dtype)
            return None
        if self.mode != DECODE:
            raise RuntimeError("SlotCache.update outside a step: call begin_prefill or begin_decode first")
        write, n = plan["write"], key.shape[0]
        if isinstance(write, int):
            keys[:n, :, write:write + 1] = key
            values[:n, :, write:write + 1] = value
        else:
            rows = plan["rows_index"]
            keys[rows, :, write] = key[:, :, 0].to(keys.dtype)  # (B, G, D) at each row's own column
            values[rows, :, write] = value[:, :, 0].to(values.dtype)
        if prefix is not None and plan["prefix_length"] and not plan["rooms_ready"]:
            self._fill_room(layer_idx, n, prefix)
        mask = plan["mask"]
        width = plan["width"] if plan["width"] is not None else mask.shape[-1]
        return keys[:n, :, :width], values[:n, :, :width], mask

    def _fill_room(self, layer_idx: int, rows: int, prefix: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Copies the prefix into the room unless the room already holds exactly this input: the same tensors
        (the references are kept, so their memory cannot pass to another tensor), not written since (their
        version counters; inference tensors have none and cannot be written outside inference mode)."""
        pk, pv = prefix
        versions = (_version(pk), _version(pv))
        held = self._room_source[layer_idx]
        if held is not None and held[0] is pk and held[1] is pv and held[2] == versions and held[3] == rows:
            return
        length = pk.shape[2]
        self.keys[layer_idx][:rows, :, :length] = pk
        self.values[layer_idx][:rows, :, :length] = pv
        self._room_source[layer_idx] = (pk, pv, versions, rows)


def _per_row(write):
    """A step's write column(s) as a bound per row: an int stays an int, a ``[B]`` tensor becomes ``[B, 1]``."""
    return write if isinstance(write, int) else write.reshape(-1, 1)


def _version(t: torch.Tensor) -> int | None:
    return None if t.is_inference() else t._version
