"""The decode thread: admits waiting requests between steps, runs :meth:`Decoder.step`, and turns each row's
tokens into text for its request's asyncio queue.

Requests arrive from the event loop (HTTP handlers, the web page) as :class:`Job` s, one per choice; the
scheduler thread owns the decoder (nothing else touches it). Between two steps it takes cancellations and new
jobs, admits as many waiting jobs as there are free slots (first come, first served), and delivers every new
token: incremental detokenisation (:class:`~ptuning.generation.Detokenizer`: a character spelled by several
byte pieces is sent whole; at the end the answer is the tokenizer's decoding of all its ids, as evaluation
decodes it, less control tokens and an incomplete character at its very end), stop strings (text is held back
while it could still be the start of one; the answer ends before the first one found, and the row is cancelled
at once), and leading / trailing whitespace (dropped, as the toolkit's evaluation strips answers). Events reach
the job's :class:`Stream` through ``loop.call_soon_threadsafe``.

A request whose settings the decoder refuses fails alone (400), and so does one whose cache does not fit in the
free memory (503, the running rows go on) and a row whose token cannot be drawn (the decoder's finish reason
``error``); a step whose forward raises fails the rows of that step (``server_error``: a batched forward cannot
tell which row made it fail) and the decoder starts over empty, while waiting and later requests are served as
usual. A CUDA error is different: the device's context may be broken (a device-side assert is sticky), so every
request in flight fails, the thread ends (``/health`` answers 503 with the error) and new requests are refused.
The thread makes the decoder's device its current CUDA device before it runs anything.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..generation import ERROR, STOP, CacheMemoryError, Decoder, Detokenizer, Request

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


@dataclass(eq=False)
class Job:
    """One choice of one request.

    Attributes:
        request: what to generate.
        stream: where its events go.
        index: the choice index in its request.
        stop: stop strings.
    """

    request: Request
    stream: Stream
    index: int = 0
    stop: list[str] = field(default_factory=list)
    handle: int | None = None  # the decoder's, while the job runs
    tokens: int = 0
    done: bool = False
    detokenizer: Detokenizer | None = None
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


def is_device_fault(err: BaseException) -> bool:
    """A CUDA error after which the device's context cannot be trusted (a device-side assert, an illegal memory
    access, ...): ``torch.AcceleratorError``, or an older torch's RuntimeError naming a CUDA error. Running out
    of memory is not one (the allocator recovers)."""
    if isinstance(err, torch.OutOfMemoryError):
        return False
    accelerator = getattr(torch, "AcceleratorError", None)
    if accelerator is not None and isinstance(err, accelerator):
        return True
    return isinstance(err, RuntimeError) and ("CUDA error" in str(err) or "device-side assert" in str(err))


class Scheduler:
    """Runs the decoder in its own thread.

    Args:
        decoder: the server's :class:`~ptuning.generation.Decoder` (owned by the scheduler thread from
            :meth:`start` on).
        tokenizer: decodes the answers (``decode(ids, skip_special_tokens=True)``).
        idle_wait: seconds the thread sleeps when there is no work, between checks for new jobs.
        skip_ids: ids left out of the answers' text (see :class:`~ptuning.generation.Detokenizer`).

    Attributes:
        fault: after a CUDA error, what it was (one line): the thread has ended and requests are refused.
    """

    def __init__(self, decoder: Decoder, tokenizer, *, idle_wait: float = 0.5,
                 skip_ids: frozenset[int] | set[int] = frozenset()):
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.skip_ids = frozenset(skip_ids)
        self.idle_wait = idle_wait
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._new: list[Job] = []
        self._cancelled: list[Job] = []
        self._waiting: deque[Job] = deque()
        self._running: dict[int, Job] = {}  # the decoder's handle -> job
        self._stopping = False
        self._drain = True
        self._thread: threading.Thread | None = None
        self.fault: str | None = None
        self.steps = 0
        self.generated_tokens = 0

    # ---- called from any thread ----

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ptuning-serve-decode", daemon=True)
        self._thread.start()

    def submit(self, jobs: list[Job]) -> None:
        """Queues jobs; refused with a 503 :class:`Failure` once the scheduler is stopping or has failed."""
        with self._lock:
            refusal = None
            if self.fault is not None:
                refusal = f"the server's device failed and it takes no more requests: {self.fault}"
            elif self._stopping:
                refusal = "the server is shutting down"
            if refusal is not None:
                for job in jobs:
                    job.done = True
                    job.stream.put(Failure(job.index, 503, refusal, SHUTTING_DOWN if self.fault is None else None))
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
        return {"active": self.decoder.active, "waiting": waiting, "free_slots": self.decoder.free_slots,
                "max_batch_size": self.decoder.max_batch_size, "steps": self.steps,
                "generated_tokens": self.generated_tokens}

    # ---- the thread ----

    @property
    def alive(self) -> bool:
        """The decode thread is running (False after a CUDA error)."""
        return self._thread is not None and self._thread.is_alive() and self.fault is None

    def _run(self) -> None:
        device = getattr(self.decoder, "device", None)
        if device is not None and torch.device(device).type == "cuda":
            # the thread's current device: anything that uses "the current device" lands on the decoder's
            torch.cuda.set_device(device)
        while True:
            try:
                if self._iteration():
                    return
            except Exception as err:  # noqa: BLE001 - a bug here must fail the requests in flight, not hang them
                if self._device_failed(err):
                    return
                log.exception("the decode loop failed; failing the requests in flight")
                self._fail_all(500, "internal error in the decode loop")

    def _device_failed(self, err: BaseException) -> bool:
        """After a CUDA error: records it, fails every request in flight or waiting, and says the thread ends."""
        if not is_device_fault(err):
            return False
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        log.error("the device failed, the server takes no more requests (restart it): %s", first)
        with self._lock:
            self.fault = f"{type(err).__name__}: {first}"
            new, self._new = self._new, []
        self._waiting.extend(new)
        jobs = list(self._running.values()) + list(self._waiting)
        self._running.clear()
        self._waiting.clear()
        for job in jobs:
            if not job.done:
                self._finish_with(job, Failure(job.index, 503, f"generation failed: the server's device failed "
                                                               f"({self.fault}); restart the server"))
        return True

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
        if self.decoder.active == 0:
            if stopping and not self._waiting:
                return True
            self._wake.wait(self.idle_wait)
            self._wake.clear()
            return False
        try:
            outputs = self.decoder.step()
        except Exception as err:  # noqa: BLE001 - one bad step must not stop the server
            if self._device_failed(err):
                return True
            log.exception("decode step failed")
            failed = list(self._running.values())
            self.decoder.cancel_all()
            self._running.clear()
            for job in failed:
                self._finish_with(job, Failure(job.index, 500, f"generation failed: {type(err).__name__}: {err}"))
            return False
        self.steps += 1
        self.generated_tokens += len(outputs)
        for out in outputs:
            job = self._running.get(out.handle)
            if job is None:
                continue
            if out.finish_reason == ERROR:  # this row alone: the decoder has freed its slot
                del self._running[out.handle]
                self._finish_with(job, Failure(job.index, 500, f"generation failed: {out.error or 'no token'}"))
                continue
            try:
                self._deliver(job, out.token_id, out.finish_reason)
            except Exception as err:  # noqa: BLE001 - a failure in one answer's text fails that answer only
                log.exception("delivering a token failed")
                self._end_row(job)
                self._finish_with(job, Failure(job.index, 500, f"decoding the answer failed: {err}"))
        return False

    def _admit(self) -> None:
        while self._waiting and self.decoder.free_slots:
            job = self._waiting.popleft()
            if job.done:
                continue
            try:
                job.handle = self.decoder.add(job.request)
            except ValueError as err:
                self._finish_with(job, Failure(job.index, 400, str(err)))
                continue
            except CacheMemoryError as err:  # this request's cache does not fit; the running rows go on
                self._finish_with(job, Failure(job.index, 503, f"not enough memory for this request now: {err}"))
                continue
            except Exception as err:  # noqa: BLE001 - this request fails, the others go on
                if is_device_fault(err):
                    raise  # the thread's handler fails everything and ends
                log.exception("admitting a request failed")
                self._finish_with(job, Failure(job.index, 500, f"admitting the request failed: {err}"))
                continue
            job.detokenizer = Detokenizer(self.tokenizer, self.skip_ids)
            self._running[job.handle] = job

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
        if job.handle is not None and self._running.get(job.handle) is job:
            del self._running[job.handle]
            self.decoder.cancel(job.handle)

    def _finish_with(self, job: Job, event: Event) -> None:
        job.done = True
        job.stream.put(event)

    def _fail_all(self, status: int, message: str, code: str | None = None) -> None:
        jobs = list(self._running.values()) + list(self._waiting)
        self.decoder.cancel_all()
        self._running.clear()
        self._waiting.clear()
        for job in jobs:
            if not job.done:
                self._finish_with(job, Failure(job.index, status, message, code))

    def _deliver(self, job: Job, token: int, reason: str | None) -> None:
        """Sends the text ``token`` completes; ends the job on a stop id, a stop string or its length."""
        job.tokens += 1
        if reason != STOP:
            job.text += job.detokenizer.push(token)
        if reason is not None:
            del self._running[job.handle]  # the decoder freed the slot itself
            # the whole answer decoded at once, as evaluation decodes it (what was held back comes out; a byte
            # sequence the model never completed stays U+FFFD)
            job.text += job.detokenizer.finish()
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
            self._end_row(job)  # frees the slot now (a no-op when the decoder already ended the row)
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
