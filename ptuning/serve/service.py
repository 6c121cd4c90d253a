"""What the HTTP API and the web page share: model names, prompts through the family's template, and
requests handed to the scheduler.

A :class:`Service` is the server minus HTTP: it knows the base model's name and the prefixes' names (each
is a ``model`` of the OpenAI API), renders conversations with the family's prompt template (the code
training, evaluation and chat use), checks that prompt + answer fit the model's positions (a prompt far too
long in characters is refused before it is tokenized), and turns one request with ``n`` choices into scheduler
jobs whose events a :class:`Generation` reads.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from ..generation import Request
from ..generation import Sampling as RowSampling
from ..models.base import Conversation, PromptTemplate
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
    """A choice's failure as OpenAI's error: 4xx ``invalid_request_error``, 5xx ``server_error`` (503 while the
    server stops: code ``server_shutting_down``)."""
    if event.status >= 500:
        code = event.code or ("server_error" if event.status != 503 else "service_unavailable")
        return APIError(event.status, event.message, type="server_error", code=code)
    return bad_request(None, event.message, event.code)


#: a prompt of more than this many times (the longest vocabulary piece × the model's positions) characters is
#: refused without tokenizing it; the margin covers normalisers that compose several characters into one
#: (NFKC turns up to four into one)
CHARS_MARGIN = 4


class Service:
    """The served model and its prefixes.

    Args:
        scheduler: runs the engine.
        template: the family's prompt template (its tokenizer is the one the scheduler decodes with).
        base_name: the ``model`` name of the bare base model.
        prefixes: the prefix names (each a ``model`` name as well), in the order of the decoder's prefix table
            (the base model's empty prefix is index 0, ``prefixes[i]`` index ``i + 1``: a
            :class:`~ptuning.serve.engine.PrefixBank`'s order).
        max_length: positions of the model (prompt + answer).
        default_max_tokens: answer length when a request gives no ``max_tokens`` (less if the context is
            shorter).
        family_label: what the model family is called in errors (``ChatGLM-6B``).
    """

    def __init__(self, scheduler: Scheduler, template: PromptTemplate, *, base_name: str, prefixes: list[str],
                 max_length: int, default_max_tokens: int = 256, family_label: str = "this model"):
        self.scheduler = scheduler
        self.template = template
        self.base_name = base_name
        self.prefixes = list(prefixes)
        self.max_length = max_length
        self.default_max_tokens = default_max_tokens
        self.family_label = family_label
        self.created = int(time.time())
        per_token = template.max_chars_per_token()
        #: no prompt of more characters can fit (None: no such bound is known for the tokenizer)
        self.max_prompt_chars = None if not per_token else CHARS_MARGIN * per_token * max_length
        self._per_token = per_token

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

    def prefix_index(self, prefix: str | None) -> int:
        """The decoder's prefix-table index of a name :meth:`resolve` returned (None, the base model: 0)."""
        return 0 if prefix is None else 1 + self.prefixes.index(prefix)

    def check_system(self, conversation: Conversation, index: int | None) -> None:
        """Refuses a system message the family's template has no place for (rather than dropping it).

        Args:
            index: the first system message's index in ``messages``.

        Raises:
            APIError: 400 ``invalid_value`` naming ``messages[index].role``.
        """
        if conversation.system is not None and not self.template.renders_system:
            param = f"messages[{index if index is not None else 0}].role"
            raise bad_request(param, f"{param}: {self.family_label}'s prompt template has no system message (so "
                              "no system or developer role); leave it out or put its text into the first user "
                              "message", "invalid_value")

    def prompt(self, conversation: Conversation, max_tokens: int | None, *, param: str = "messages",
               max_tokens_name: str = "max_tokens", fit: bool = False) -> tuple[list[int], int]:
        """Prompt ids and the answer's token budget. Tokenizes: call it off the event loop.

        Which field a prompt that does not fit is blamed on: the prompt (``param``) when it cannot fit even
        with a one-token answer, else ``max_tokens`` (the prompt fits, the answer asked for does not).

        Args:
            conversation: the request's conversation (a completion's prompt is a query without history).
            max_tokens: the request's ``max_tokens`` (None: :attr:`default_max_tokens`, less if it does not fit).
            param: the request field the prompt came from, for errors.
            max_tokens_name: the request field ``max_tokens`` came from, for errors.
            fit: drop the oldest turns (and cut the query) to fit, as chat does; otherwise refuse.

        Raises:
            APIError: 400 ``context_length_exceeded`` naming ``param`` or ``max_tokens_name`` and saying how
                many tokens the prompt takes and how many the answer may have.
        """
        n_max = self.max_length
        if fit:
            wanted = max_tokens or 1
            if wanted >= n_max:
                raise bad_request(max_tokens_name, f"{max_tokens_name}={max_tokens}: the model takes {n_max} "
                                  "positions in all (prompt + answer)", "context_length_exceeded")
            ids = list(self.template.prompt(self._drop_by_chars(conversation, param), n_max - wanted).ids)
        else:
            self._check_chars(conversation, param)
            ids = list(self.template.prompt(conversation, UNBOUNDED).ids)
            if len(ids) + 1 > n_max:
                raise bad_request(param, f"{param}: this model's context is {n_max} tokens, but {len(ids)} are in the "
                                  f"{param} alone (and the answer needs at least one more); shorten the {param}",
                                  "context_length_exceeded")
            if max_tokens is not None and len(ids) + max_tokens > n_max:
                raise bad_request(max_tokens_name, f"{max_tokens_name}={max_tokens}: {len(ids)} of this model's {n_max} "
                                  f"tokens are in the {param}, which leaves at most {n_max - len(ids)} for the "
                                  f"answer; lower {max_tokens_name} (or shorten the {param})",
                                  "context_length_exceeded")
        room = n_max - len(ids)
        return ids, min(max_tokens, room) if max_tokens else min(self.default_max_tokens, room)

    @staticmethod
    def _chars(conversation: Conversation) -> tuple[int, list[int]]:
        """Characters of the fixed parts (query, system, source prefix) and of each earlier turn."""
        fixed = len(conversation.query) + len(conversation.system or "") + len(conversation.source_prefix)
        return fixed, [len(q) + len(a) for q, a in conversation.history]

    def _check_chars(self, conversation: Conversation, param: str) -> None:
        if self.max_prompt_chars is None:
            return
        fixed, turns = self._chars(conversation)
        if fixed + sum(turns) > self.max_prompt_chars:
            raise bad_request(param, f"{param}: {fixed + sum(turns)} characters cannot fit this model's context of "
                              f"{self.max_length} tokens (no token of its vocabulary stands for more than "
                              f"{self._per_token} characters); shorten the {param}", "context_length_exceeded")

    def _drop_by_chars(self, conversation: Conversation, param: str) -> Conversation:
        """For ``fit``: the oldest turns that make the text too long in characters to fit are left out before
        tokenizing (the template would leave them out too); a query that alone is that long is refused."""
        if self.max_prompt_chars is None:
            return conversation
        fixed, turns = self._chars(conversation)
        if fixed > self.max_prompt_chars:
            raise bad_request(param, f"{param}: {fixed} characters in the message cannot fit this model's context "
                              f"of {self.max_length} tokens; shorten it", "context_length_exceeded")
        drop, total = 0, fixed + sum(turns)
        while total > self.max_prompt_chars:
            total -= turns[drop]
            drop += 1
        return replace(conversation, history=list(conversation.history)[drop:]) if drop else conversation

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
                row = RowSampling(temperature=sampling.temperature, top_p=sampling.top_p, seed=seed)
                request = Request(ids, max_new, row, stop_token_ids=stop_ids, prefix=self.prefix_index(prefix))
                jobs.append(Job(request, stream, index, list(sampling.stop)))
        generation = Generation(self, stream, jobs, sum(len(ids) for ids, _ in prompts),
                                [Choice(j.index) for j in jobs])
        self.scheduler.submit(jobs)
        return generation
