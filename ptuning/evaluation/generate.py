"""Batched generation shared by evaluation, training-time evaluation and chat."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..config import ConfigError
from ..generation import Decoder, PrefixTable, Request, Sampling, run_to_end, stream
from ..prefix import PrefixKV


@dataclass
class GenerationSettings:
    """``generation.*``: greedy by default so metrics are reproducible. The original's sampling settings
    are ``do_sample=true top_p=0.7 temperature=0.95``."""

    max_new_tokens: int = 64
    do_sample: bool = False
    top_p: float = 0.7
    temperature: float = 0.95
    num_beams: int = 1
    #: run the decode step through torch.compile: the first step waits for the compile (tens of seconds on a
    #: small CPU; the compiled step is reused by later batches of the process). Off by default: on the project's
    #: CPU it does not pay for its compile time (benchmarks/bench.py --compile)
    compile: bool = False

    def validate(self, prefix: str = "generation.") -> GenerationSettings:
        """Checks the values before any model is loaded.

        Args:
            prefix: how the keys are named in messages (``generation.`` for the Hydra job, ``--`` for
                command-line flags).

        Raises:
            ConfigError: naming the key, the value and what is allowed.
        """
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
        """``generate()``'s keyword arguments (beam search)."""
        out = dict(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample, num_beams=self.num_beams)
        if self.do_sample:
            out.update(top_p=self.top_p, temperature=self.temperature)
        return out


def left_pad(rows: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and the HF padding mask ``[B, S]`` (1 = real token), padded on the left (built on the host,
    then moved to ``device``)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device="cpu")
    mask = torch.zeros((len(rows), width), dtype=torch.long, device="cpu")
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long, device="cpu")
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


def _requests(prompts: list[list[int]], settings: GenerationSettings, stop_ids, prefixed: bool) -> list[Request]:
    """One request per prompt; sampled rows draw their seeds from torch's global generator, so a seeded run
    repeats."""
    requests = []
    for i, prompt in enumerate(prompts):
        sampling = Sampling()
        if settings.do_sample:
            seed = int(torch.randint(0, 2**62, (1,), device="cpu"))
            sampling = Sampling(temperature=settings.temperature, top_p=settings.top_p, seed=seed)
        requests.append(Request(list(prompt), settings.max_new_tokens, sampling, stop_token_ids=list(stop_ids),
                                prefix=i if prefixed else 0))
    return requests


def make_decoder(model, settings: GenerationSettings, *, max_batch_size: int, max_length: int, pad_id: int,
                 vocab_limit: int | None = None, prefix: PrefixKV | None = None) -> Decoder:
    """A decode loop for greedy / sampled generation that can be reused batch after batch (its cache, grown to
    what the requests need, and its compiled step with ``settings.compile`` are kept).

    Args:
        max_batch_size: prompts decoded together at most.
        max_length: prompt + new tokens of a row at most.
        vocab_limit: ids from here on are never chosen (:func:`ptuning.generation.vocab_limit`).
        prefix: one prefix for every row, or per-row prefixes, instead of the model's own.
    """
    table = PrefixTable(prefix) if prefix is not None else None
    return Decoder(model, max_batch_size=max_batch_size, max_length=max_length, prefixes=table, pad_token_id=pad_id,
                   compile=settings.compile, vocab_limit=vocab_limit)


@torch.no_grad()
def generate_ids(
    model, prompts: list[list[int]], settings: GenerationSettings, *, pad_id: int, stop_ids: list[int],
    prefix: PrefixKV | None = None, vocab_limit: int | None = None, decoder: Decoder | None = None,
) -> list[list[int]]:
    """Generates for prompt ids (each ending where the answer starts, e.g. ``[gMASK] <sop>``), all rows in one
    batch; returns the new ids of each row up to its first stop id (pads dropped).

    Greedy and sampled decoding run our decode loop (:mod:`ptuning.generation`: every row its own slot, so no
    padding; a row that stops leaves the batch); beam search (``num_beams`` > 1) runs transformers'
    ``generate()`` on the left-padded batch.

    Args:
        prefix: per-row prefixes instead of the model's own (per-layer keys/values ``[len(prompts), G, P, D]``
            with an optional ``[len(prompts), P]`` visibility mask; batch 1: one prefix for every row).
        vocab_limit: ids from here on are never chosen, greedy, sampled or in beam search (output rows the
            tokenizer has no piece for, see :func:`ptuning.generation.vocab_limit`); None = every id.
        decoder: a decoder of :func:`make_decoder` to reuse (without ``prefix``); default a new one.
    """
    if settings.num_beams > 1:
        device = next(model.parameters()).device
        ids, mask = left_pad(prompts, pad_id, device)
        extra = {"prefix": prefix} if prefix is not None else {}
        vocab = model.get_output_embeddings().weight.shape[0]
        if vocab_limit is not None and vocab_limit < vocab:
            extra["suppress_tokens"] = list(range(vocab_limit, vocab))
        out = model.generate(
            ids, attention_mask=mask, eos_token_id=list(stop_ids), pad_token_id=pad_id, **settings.kwargs(), **extra
        )
        return [strip_generated(row[ids.shape[1] :].tolist(), stop_ids, pad_id) for row in out]
    prefixed = prefix is not None and prefix.length > 0 and prefix.keys[0].shape[0] > 1
    if prefixed and prefix.keys[0].shape[0] != len(prompts):
        raise ValueError(f"a prefix of batch {prefix.keys[0].shape[0]} for {len(prompts)} prompts: expected 1 or "
                         f"{len(prompts)}")
    if decoder is None:
        decoder = make_decoder(model, settings, max_batch_size=len(prompts),
                               max_length=max(len(p) for p in prompts) + settings.max_new_tokens, pad_id=pad_id,
                               vocab_limit=vocab_limit, prefix=prefix)
    results = run_to_end(decoder, _requests(prompts, settings, stop_ids, prefixed))
    return [strip_generated(ids, stop_ids, pad_id) for ids, _ in results]


def batched(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def stream_ids(
    model, prompt: list[int], settings: GenerationSettings, *, pad_id: int, stop_ids: list[int],
    vocab_limit: int | None = None, decoder: Decoder | None = None,
) -> Iterator[int]:
    """Yields new token ids one by one for a single prompt (for chat), from our decode loop.

    The loop runs in the consumer's thread, one forward per token taken: closing the generator early
    (``break``, an exception, Ctrl-C in the consumer) stops the generation at once.

    Args:
        vocab_limit: ids from here on are never chosen (see :func:`generate_ids`).
        decoder: a decoder of :func:`make_decoder` to reuse (chat keeps one for its session); default a new one.
    """
    if decoder is None:
        decoder = make_decoder(model, settings, max_batch_size=1, max_length=len(prompt) + settings.max_new_tokens,
                               pad_id=pad_id, vocab_limit=vocab_limit)
    (request,) = _requests([prompt], settings, stop_ids, False)
    with torch.no_grad():
        yield from stream(decoder, request)
