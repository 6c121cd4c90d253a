"""The decode thread: admits waiting requests between steps, runs :meth:`Engine.step`, and turns each row's
tokens into text for its request's asyncio queue.

Requests arrive from the event loop (HTTP handlers, the web page) as :class:`Job` s, one per choice; the
scheduler thread owns the engine (nothing else touches it). Between two steps it takes cancellations and new
jobs, admits as many waiting jobs as there are free slots (first come, first served), and delivers every new
token: incremental detokenisation (:class:`Detokenizer`: a character spelled by several byte pieces is sent
whole; at the end the answer is the tokenizer's decoding of all its ids, as evaluation decodes it, less control
tokens and an incomplete character at its very end), stop strings (text is held back while it could still be
the start of one; the answer ends before the first one found, and the row is cancelled at once), and leading /
trailing whitespace (dropped, as the toolkit's evaluation strips answers). Events reach the job's :class:`Stream` through
``loop.call_soon_threadsafe``.

A request whose settings the engine refuses fails alone, and so does a row whose token cannot be drawn (the
engine's finish reason ``error``); a step whose forward raises fails the rows of that step (``server_error``: a
batched forward cannot tell which row made it fail) and the engine starts over empty, while waiting and later
requests are served as usual.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from ..models.base import drop_incomplete_end
from .engine import ERROR, STOP, DecodeEngine, EngineRequest

log = logging.getLogger("ptuning.serve")


@dataclass(frozen=True)
class Delta:
    """New answer text of choice ``index``."""

    index: int
    text: str


@dataclass(frozen=True)
class Finish:
    """Choice ``index`` ended: ``reason`` is ``stop`` or ``length``; ``tokens`` generated (stop id included)."""

    index: int
    reason: str
    tokens: int


@dataclass(frozen=True)
class Failure:
    """Choice ``index`` could not be served: ``status`` 4xx (its settings) or 5xx (the server), why, and
    OpenAI's error ``code`` (None: from the status)."""

    index: int
    status: int
    message: str
    code: str | None = None


#: the code of the 503 that requests still unfinished when the server stops get
SHUTTING_DOWN = "server_shutting_down"


Event = Delta | Finish | Failure


class Stream:
    """The events of one request's choices, read on the event loop that created it."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None):
        self.loop = loop or asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()

    def put(self, event: Event) -> None:
        """Thread-safe; a stream whose loop has closed drops the event."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:
            pass


class Detokenizer:
    """Text of ids arriving one at a time, each piece final, in time linear in the answer's length.

    Each new id is decoded together with a few ids before it (``prefix_offset``): SentencePiece drops a leading
    space at the start of what it decodes, so a window that starts a few ids back decodes the new text as the
    whole answer would. Text ending in U+FFFD (a character whose byte pieces have not all arrived) is held
    back until the next id completes it or shows it never will; such a byte sequence inside the answer stays
    U+FFFD, as ``tokenizer.decode`` of the whole answer has it, while one left incomplete at the very end (the
    answer was cut by ``max_tokens``) is dropped (:meth:`whole`), as evaluation and the chat command drop it.

    Args:
        tokenizer: ``decode(ids, skip_special_tokens=True)``.
        skip_ids: ids that are never answer text (control tokens such as ChatGLM-6B's ``[gMASK]``, which its
            tokenizer decodes as text): left out of the answer (they show up mostly with ``ignore_eos``).
    """

    def __init__(self, tokenizer, skip_ids: frozenset[int] = frozenset()):
        self.tokenizer = tokenizer
        self.skip_ids = skip_ids
        self.ids: list[int] = []
        self.prefix_offset = 0  # the window's start
        self.read_offset = 0  # ids up to here are in the text given out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        """Adds an id; returns the new final text (possibly empty)."""
        if token in self.skip_ids:
            return ""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if len(after) <= len(before) or after.endswith("\ufffd") or not after.startswith(before):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return after[len(before) :]

    def whole(self) -> str:
        """The answer decoded at once, as evaluation decodes it, without an incomplete character at its end."""
        return drop_incomplete_end(self._decode(self.ids))


@dataclass(eq=False)
class Job:
    """One choice of one request.

    Attributes:
        request: what to generate.
        stream: where its events go.
        index: the choice index in its request.
        stop: stop strings.
    """

    request: EngineRequest
    stream: Stream
    index: int = 0
    stop: list[str] = field(default_factory=list)
    slot: int | None = None
    tokens: int = 0
    done: bool = False
    decoder: Detokenizer | None = None
    text: str = ""  # the answer's final text so far
    sent: int = 0  # characters of ``text`` already sent (after the leading whitespace)
    start: int | None = None  # where the answer starts (leading whitespace skipped)
    submitted: float = field(default_factory=time.monotonic)


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of ``text`` could be the start of a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


class Scheduler:
    """Runs the engine in its own thread.

    Args:
        engine: an :class:`~ptuning.serve.engine.Engine` or anything else with its API (owned by the scheduler
            thread from :meth:`start` on).
        tokenizer: decodes the answers (``decode(ids, skip_special_tokens=True)``).
        idle_wait: seconds the thread sleeps when there is no work, between checks for new jobs.
        skip_ids: ids left out of the answers' text (see :class:`Detokenizer`).
    """

    def __init__(self, engine: DecodeEngine, tokenizer, *, idle_wait: float = 0.5,
                 skip_ids: frozenset[int] | set[int] = frozenset()):
        self.engine = engine
        self.tokenizer = tokenizer
        self.skip_ids = frozenset(skip_ids)
        self.idle_wait = idle_wait
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._new: list[Job] = []
        self._cancelled: list[Job] = []
        self._waiting: deque[Job] = deque()
        self._by_slot: dict[int, Job] = {}
        self._stopping = False
        self._drain = True
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.generated_tokens = 0

    # ---- called from any thread ----

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ptuning-serve-decode", daemon=True)
        self._thread.start()

    def submit(self, jobs: list[Job]) -> None:
        """Queues jobs; refused with a 503 :class:`Failure` once the scheduler is stopping."""
        with self._lock:
            if self._stopping:
                for job in jobs:
                    job.done = True
                    job.stream.put(Failure(job.index, 503, "the server is shutting down", SHUTTING_DOWN))
                return
            self._new.extend(jobs)
        self._wake.set()

    def cancel(self, jobs: list[Job]) -> None:
        """Ends jobs early (a client went away); their slots are freed before the next step."""
        with self._lock:
            self._cancelled.extend(j for j in jobs if not j.done)
        self._wake.set()

    def stop(self, drain: bool = False, timeout: float | None = None) -> None:
        """Stops the thread: after finishing every job (``drain``), or failing the unfinished ones with 503
        (code ``server_shutting_down``). Waits up to ``timeout`` seconds for the thread (None: until it ends;
        0: not at all, e.g. on the event loop)."""
        with self._lock:
            self._stopping, self._drain = True, drain
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def stats(self) -> dict:
        """``active`` rows, ``waiting`` jobs, ``free_slots``, and totals (``steps``, ``generated_tokens``)."""
        with self._lock:
            waiting = len(self._waiting) + len(self._new)
        return {"active": self.engine.active, "waiting": waiting, "free_slots": self.engine.free_slots,
                "max_batch_size": self.engine.max_batch_size, "steps": self.steps,
                "generated_tokens": self.generated_tokens}

    # ---- the thread ----

    @property
    def alive(self) -> bool:
        """The decode thread is running."""
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        while True:
            try:
                if self._iteration():
                    return
            except Exception:  # noqa: BLE001 - a bug here must fail the requests in flight, not hang them
                log.exception("the decode loop failed; failing the requests in flight")
                self._fail_all(500, "internal error in the decode loop")

    def _iteration(self) -> bool:
        """One round: take new and cancelled jobs, admit, step, deliver. Returns True when the thread ends."""
        with self._lock:
            new, self._new = self._new, []
            cancelled, self._cancelled = self._cancelled, []
            stopping, drain = self._stopping, self._drain
        self._waiting.extend(new)
        for job in cancelled:
            self._forget(job)
        if stopping and not drain:
            self._fail_all(503, "the server is shutting down", SHUTTING_DOWN)
            return True
        self._admit()
        if self.engine.active == 0:
            if stopping and not self._waiting:
                return True
            self._wake.wait(self.idle_wait)
            self._wake.clear()
            return False
        try:
            outputs = self.engine.step()
        except Exception as err:  # noqa: BLE001 - one bad step must not stop the server
            log.exception("decode step failed")
            failed = list(self._by_slot.values())
            self.engine.cancel_all()
            self._by_slot.clear()
            for job in failed:
                self._finish_with(job, Failure(job.index, 500, f"generation failed: {type(err).__name__}: {err}"))
            return False
        self.steps += 1
        self.generated_tokens += len(outputs)
        for out in outputs:
            job = self._by_slot.get(out.slot)
            if job is None:
                continue
            if out.finish_reason == ERROR:  # this row alone: the engine has freed its slot
                del self._by_slot[out.slot]
                self._finish_with(job, Failure(job.index, 500, f"generation failed: {getattr(out, 'error', None) or 'no token'}"))
                continue
            try:
                self._deliver(job, out.token_id, out.finish_reason)
            except Exception as err:  # noqa: BLE001 - a failure in one answer's text fails that answer only
                log.exception("delivering a token failed")
                self._end_row(job)
                self._finish_with(job, Failure(job.index, 500, f"decoding the answer failed: {err}"))
        return False

    def _admit(self) -> None:
        while self._waiting and self.engine.free_slots:
            job = self._waiting.popleft()
            if job.done:
                continue
            try:
                job.slot = self.engine.add(job.request)
            except (KeyError, ValueError) as err:
                self._finish_with(job, Failure(job.index, 400, str(err)))
                continue
            except Exception as err:  # noqa: BLE001 - this request fails, the others go on
                log.exception("admitting a request failed")
                self._finish_with(job, Failure(job.index, 500, f"admitting the request failed: {err}"))
                continue
            job.decoder = Detokenizer(self.tokenizer, self.skip_ids)
            self._by_slot[job.slot] = job

    def _forget(self, job: Job) -> None:
        if job.done:
            return
        job.done = True
        try:
            self._waiting.remove(job)
        except ValueError:
            pass
        self._end_row(job)

    def _end_row(self, job: Job) -> None:
        if job.slot is not None and self._by_slot.get(job.slot) is job:
            del self._by_slot[job.slot]
            self.engine.cancel(job.slot)

    def _finish_with(self, job: Job, event: Event) -> None:
        job.done = True
        job.stream.put(event)

    def _fail_all(self, status: int, message: str, code: str | None = None) -> None:
        jobs = list(self._by_slot.values()) + list(self._waiting)
        self.engine.cancel_all()
        self._by_slot.clear()
        self._waiting.clear()
        for job in jobs:
            if not job.done:
                self._finish_with(job, Failure(job.index, status, message, code))

    def _deliver(self, job: Job, token: int, reason: str | None) -> None:
        """Sends the text ``token`` completes; ends the job on a stop id, a stop string or its length."""
        job.tokens += 1
        if reason != STOP:
            job.text += job.decoder.push(token)
        if reason is not None:
            del self._by_slot[job.slot]  # the engine freed the slot itself
            # the whole answer decoded at once, as evaluation decodes it (what was held back comes out; a byte
            # sequence the model never completed stays U+FFFD)
            whole = job.decoder.whole()
            if whole.startswith(job.text):
                job.text = whole
        text = job.text
        if job.start is None:
            stripped = len(text) - len(text.lstrip())
            if stripped == len(text):
                if reason is not None:
                    self._finish_with(job, Finish(job.index, reason, job.tokens))
                return
            job.start = job.sent = stripped
        # a stop string may end in this token's text: search from where the earliest one could begin
        longest = max((len(s) for s in job.stop), default=0)
        search_from = max(job.start, job.sent - longest + 1)
        hits = [k for s in job.stop if (k := text.find(s, search_from)) >= 0]
        if hits:
            self._send(job, text[job.sent : min(hits)].rstrip())
            self._end_row(job)  # frees the slot now (a no-op when the engine already ended the row)
            self._finish_with(job, Finish(job.index, STOP, job.tokens))
            return
        if reason is not None:
            self._send(job, text[job.sent :].rstrip())
            self._finish_with(job, Finish(job.index, reason, job.tokens))
            return
        # hold back what could start a stop string, and trailing whitespace (the answer is stripped at its end)
        end = len(text) - _held_back(text, job.stop)
        end = job.sent + len(text[job.sent : end].rstrip())
        if end > job.sent:
            self._send(job, text[job.sent : end])
            job.sent = end

    def _send(self, job: Job, text: str) -> None:
        if text:
            job.stream.put(Delta(job.index, text))
