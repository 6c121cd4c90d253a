"""Batched generation shared by evaluation, training-time evaluation and chat."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass
class GenerationSettings:
    """``generation.*``: greedy by default so metrics are reproducible. The original's sampling settings
    are ``do_sample=true top_p=0.7 temperature=0.95``."""

    max_new_tokens: int = 64
    do_sample: bool = False
    top_p: float = 0.7
    temperature: float = 0.95
    num_beams: int = 1

    def validate(self, prefix: str = "generation.") -> GenerationSettings:
        """Checks the values before any model is loaded.

        Args:
            prefix: how the keys are named in messages (``generation.`` for the Hydra job, ``--`` for
                command-line flags).

        Raises:
            ConfigError: naming the key, the value and what is allowed.
        """
        from ..config import ConfigError

        def need(ok: bool, key: str, allowed: str) -> None:
            if not ok:
                # flags spell the field names with hyphens
                name = key.replace("_", "-") if prefix.startswith("-") else key
                raise ConfigError(f"{prefix}{name}={getattr(self, key)!r}: expected {allowed}")

        need(isinstance(self.max_new_tokens, int) and self.max_new_tokens > 0, "max_new_tokens", "a positive integer")
        need(isinstance(self.num_beams, int) and self.num_beams >= 1, "num_beams", "an integer >= 1")
        need(0.0 < self.top_p <= 1.0, "top_p", "a number in (0, 1]")
        need(self.temperature > 0.0, "temperature", "a positive number")
        return self

    def kwargs(self) -> dict:
        out = dict(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample, num_beams=self.num_beams)
        if self.do_sample:
            out.update(top_p=self.top_p, temperature=self.temperature)
        return out


def left_pad(rows: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and the HF padding mask ``[B, S]`` (1 = real token), padded on the left."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def strip_generated(ids: list[int], stop_ids, pad_id: int) -> list[int]:
    """The generated ids up to (not including) the first stop id (e.g. ``<eop>``), pads dropped."""
    stop = {stop_ids} if isinstance(stop_ids, int) else set(stop_ids)
    out = []
    for t in ids:
        if t in stop:
            break
        if t != pad_id:
            out.append(t)
    return out


@torch.no_grad()
def generate_ids(
    model, prompts: list[list[int]], settings: GenerationSettings, *, pad_id: int, stop_ids: list[int]
) -> list[list[int]]:
    """Generates for prompt ids (each ending where the answer starts, e.g. ``[gMASK] <sop>``), left-padded
    into one batch; returns the new ids of each row up to its first stop id."""
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id, device)
    out = model.generate(
        ids, attention_mask=mask, eos_token_id=list(stop_ids), pad_token_id=pad_id, **settings.kwargs()
    )
    return [strip_generated(row[ids.shape[1] :].tolist(), stop_ids, pad_id) for row in out]


def batched(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def stream_ids(
    model, prompt: list[int], settings: GenerationSettings, *, pad_id: int, stop_ids: list[int]
) -> Iterator[int]:
    """Yields new token ids one by one for a single prompt (for chat), using the KV cache.

    Closing the generator early (``break``, an exception, Ctrl-C in the consumer) stops the generation
    thread at its next step instead of letting it run on to ``max_new_tokens``.
    """
    from threading import Event, Thread

    from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    stop = Event()

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), stop.is_set(), dtype=torch.bool, device=input_ids.device)

    class _Queue(BaseStreamer):
        def __init__(self):
            import queue

            self.queue = queue.Queue()
            self.first = True

        def put(self, value):
            if self.first:  # the prompt
                self.first = False
                return
            for t in value.flatten().tolist():
                self.queue.put(t)

        def end(self):
            self.queue.put(None)

    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    streamer = _Queue()
    errors: list[BaseException] = []

    def work():
        try:
            model.generate(
                ids,
                streamer=streamer,
                eos_token_id=list(stop_ids),
                pad_token_id=pad_id,
                stopping_criteria=StoppingCriteriaList([_Stop()]),
                **settings.kwargs(),
            )
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(err)
            streamer.end()

    thread = Thread(target=work, daemon=True)
    thread.start()
    try:
        while (token := streamer.queue.get()) is not None:
            if token in stop_ids:
                break
            yield token
    finally:
        stop.set()
        thread.join()
    if errors:
        raise errors[0]
