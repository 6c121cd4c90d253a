"""What the HTTP API and the web page share: model names, prompts through the family's template, and
requests handed to the scheduler.

A :class:`Service` is the server minus HTTP: it knows the base model's name and the prefixes' names (each
is a ``model`` of the OpenAI API), renders conversations with the family's prompt template (the code
training, evaluation and chat use), checks that prompt + answer fit the model's positions, and turns one
request with ``n`` choices into scheduler jobs whose events a :class:`Generation` reads.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from ..models.base import Conversation, PromptTemplate
from .engine import EngineRequest
from .protocol import APIError, Sampling, bad_request
from .scheduler import Delta, Failure, Finish, Job, Scheduler, Stream

UNBOUNDED = 1 << 30


@dataclass
class Choice:
    """One finished (or failed) choice: its text, why it ended, and how many tokens it took."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    tokens: int = 0
    error: Failure | None = None


@dataclass
class Generation:
    """The choices of one request in flight.

    Attributes:
        prompt_tokens: the prompt's length (every choice of a prompt shares it), summed over prompts.
        choices: per choice, what has arrived so far.
    """

    service: Service
    stream: Stream
    jobs: list[Job]
    prompt_tokens: int
    choices: list[Choice] = field(default_factory=list)

    async def events(self) -> AsyncIterator[Delta | Finish | Failure]:
        """Every event until each choice has finished or failed; the choices' records are updated on the way.
        Leaving early (the client went away) cancels the unfinished choices."""
        left = len(self.jobs)
        try:
            while left:
                event = await self.stream.queue.get()
                choice = self.choices[event.index]
                if isinstance(event, Delta):
                    choice.text += event.text
                elif isinstance(event, Finish):
                    choice.finish_reason, choice.tokens = event.reason, event.tokens
                    left -= 1
                else:
                    choice.error = event
                    left -= 1
                yield event
        finally:
            if left:
                self.cancel()

    async def wait(self) -> list[Choice]:
        """Runs to the end; raises the first failure as an :class:`APIError`."""
        async for event in self.events():
            if isinstance(event, Failure):
                self.cancel()
                raise failure_error(event)
        return self.choices

    def cancel(self) -> None:
        """Ends every unfinished choice and frees its slot."""
        self.service.scheduler.cancel(self.jobs)

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices)


def failure_error(event: Failure) -> APIError:
    if event.status >= 500:
        kind = "server_error" if event.status != 503 else "service_unavailable"
        return APIError(event.status, event.message, type=kind, code=kind)
    return bad_request(None, event.message)


class Service:
    """The served model and its prefixes.

    Args:
        scheduler: runs the engine.
        template: the family's prompt template (its tokenizer is the one the scheduler decodes with).
        base_name: the ``model`` name of the bare base model.
        prefixes: the prefix names (each a ``model`` name as well).
        max_length: positions of the model (prompt + answer).
        default_max_tokens: answer length when a request gives no ``max_tokens`` (less if the context is
            shorter).
    """

    def __init__(self, scheduler: Scheduler, template: PromptTemplate, *, base_name: str, prefixes: list[str],
                 max_length: int, default_max_tokens: int = 256):
        self.scheduler = scheduler
        self.template = template
        self.base_name = base_name
        self.prefixes = list(prefixes)
        self.max_length = max_length
        self.default_max_tokens = default_max_tokens
        self.created = int(time.time())

    @property
    def model_names(self) -> list[str]:
        """The base model first, then every prefix."""
        return [self.base_name, *self.prefixes]

    def resolve(self, model: str) -> str | None:
        """The prefix name a ``model`` field asks for (None = the bare base model).

        Raises:
            APIError: 404 ``model_not_found`` listing the served names.
        """
        if model == self.base_name:
            return None
        if model in self.prefixes:
            return model
        raise APIError(404, f"model={model!r}: no such model; this server has {', '.join(self.model_names)}",
                       param="model", code="model_not_found")

    def prompt(self, conversation: Conversation, max_tokens: int | None, *, param: str = "messages",
               max_tokens_name: str = "max_tokens", fit: bool = False) -> tuple[list[int], int]:
        """Prompt ids and the answer's token budget.

        Args:
            conversation: the request's conversation (a completion's prompt is a query without history).
            max_tokens: the request's ``max_tokens`` (None: :attr:`default_max_tokens`, less if it does not fit).
            param: the request field the prompt came from, for errors.
            max_tokens_name: the request field ``max_tokens`` came from, for errors.
            fit: drop the oldest turns (and cut the query) to fit, as chat does; otherwise refuse.

        Raises:
            APIError: 400 ``context_length_exceeded`` saying how many tokens the prompt and the answer take.
        """
        wanted = max_tokens or 1
        if wanted >= self.max_length:
            raise bad_request(max_tokens_name, f"{max_tokens_name}={max_tokens}: the model takes {self.max_length} "
                              "positions in all (prompt + answer)", "context_length_exceeded")
        prompt = self.template.prompt(conversation, self.max_length - wanted)
        if not fit and (prompt.dropped_turns or prompt.truncated_tokens):
            full = len(self.template.prompt(conversation, UNBOUNDED).ids)
            asked = f"{full + wanted} tokens ({full} in the {param}, {wanted} in the answer)" if max_tokens else \
                f"{full} tokens in the {param}, and at least one for the answer"
            raise bad_request(param, f"{param}: this model's context is {self.max_length} tokens, but the request "
                              f"needs {asked}; shorten the {param} or {max_tokens_name}", "context_length_exceeded")
        ids = list(prompt.ids)
        room = self.max_length - len(ids)
        return ids, min(max_tokens, room) if max_tokens else min(self.default_max_tokens, room)

    def start(self, prompts: list[tuple[list[int], int]], prefix: str | None, sampling: Sampling,
              loop: asyncio.AbstractEventLoop | None = None) -> Generation:
        """Submits ``sampling.n`` choices for each ``(prompt ids, max new tokens)``; choice ``p·n + i`` is
        prompt p's i-th, seeded ``seed + p·n + i`` when the request has a seed."""
        stream = Stream(loop)
        jobs = []
        stop_ids = () if sampling.ignore_eos else tuple(self.template.stop_token_ids)
        for p, (ids, max_new) in enumerate(prompts):
            for i in range(sampling.n):
                index = p * sampling.n + i
                seed = None if sampling.seed is None else sampling.seed + index
                request = EngineRequest(ids, prefix, max_new, sampling.temperature, sampling.top_p, seed, stop_ids)
                jobs.append(Job(request, stream, index, list(sampling.stop)))
        generation = Generation(self, stream, jobs, sum(len(ids) for ids, _ in prompts),
                                [Choice(j.index) for j in jobs])
        self.scheduler.submit(jobs)
        return generation
