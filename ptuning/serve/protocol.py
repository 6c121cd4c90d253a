"""The OpenAI HTTP API's request bodies, checked, and its error body.

Requests are parsed with pydantic in strict mode (``"max_tokens": "10"``, ``"n": true`` or ``"stream": "yes"``
are refused, not coerced; an integer is a number) and then checked field by field; every problem becomes an
:class:`APIError` whose body is OpenAI's ``{"error": {"message", "type", "param", "code"}}``, with ``param``
naming the field as OpenAI does (``messages[2].role``, ``stream_options.include_usage``, ``max_tokens``).
Fields OpenAI defines that this server cannot honour (tools, logprobs, penalties ...) are refused when set to
anything but their neutral value, and fields it does not know at all (at the top, in a message, in a content
part, in ``stream_options``) are refused as OpenAI refuses them ("Unrecognized request argument supplied"),
rather than silently ignored. The body must be JSON without ``NaN`` / ``Infinity``, nested at most
:data:`MAX_DEPTH` deep, and its strings valid Unicode (no lone surrogates such as ``"\ud800"``).

Reference: https://platform.openai.com/docs/api-reference/chat/create and .../completions/create.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from ..models.base import Conversation

#: OpenAI allows up to 4 stop sequences
MAX_STOP = 4
#: choices per prompt (``n``); each is one batch row
MAX_N = 16
#: choices of one request in all (prompts × ``n``)
MAX_CHOICES = 64
#: JSON nesting a request body may have (the deepest a valid request needs is 4: messages, a message, content
#: parts, a part)
MAX_DEPTH = 32


class APIError(Exception):
    """A request the server refuses or could not serve, as OpenAI's error body.

    Args:
        status: the HTTP status (400 bad request, 401 unauthorised, 404 unknown model, 500 server fault ...).
        message: one line naming the field and what was expected.
        type: OpenAI's error type (``invalid_request_error``, ``authentication_error``, ``server_error``).
        param: the field (``messages[1].role``), or None.
        code: a machine-readable code (``model_not_found``, ``context_length_exceeded``, ``invalid_json``).
    """

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",  # noqa: A002
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(param: str | None, message: str, code: str | None = None) -> APIError:
    """The 400 ``invalid_request_error`` for a request field the server refuses (returned, for the caller to
    raise).

    Args:
        param: the field as OpenAI names it (``messages[1].role``), or None for the request as a whole.
        message: one line naming the field, the value and what was expected.
        code: a machine-readable code (``context_length_exceeded``, ``invalid_json``), or None.
    """
    return APIError(400, message, param=param, code=code)


def param_name(loc: tuple) -> str:
    """pydantic's location ``('messages', 2, 'role')`` as OpenAI names it: ``messages[2].role``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not out:
            out = str(part)
        else:
            out += f".{part}"
    return out


class _Body(BaseModel):
    # strict: no coercion of "10" to 10 or of 1 to True (an int still counts as a float); extras are kept to be
    # refused by name (see _refuse_extra)
    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(_Body):
    include_usage: bool | None = False


class ContentPart(_Body):
    type: str
    text: str | None = None


class Message(_Body):
    role: str
    content: str | list[ContentPart] | None = None


class _Sampling(_Body):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # vLLM's extension: keep generating past the end-of-answer ids (benchmarks, tests of long answers)
    ignore_eos: bool = False


class ChatCompletionBody(_Sampling):
    messages: list[Message]
    max_completion_tokens: int | None = None


class CompletionBody(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]


# fields OpenAI defines that change what it does, with the neutral values this server can honour (anything
# else is refused as unsupported)
UNSUPPORTED = {
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none"),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None,),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "response_format": (None, {"type": "text"}),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    "service_tier": (None, "auto", "default"),
    "store": (None, False),
    "metadata": (None, {}),
}
# ... of /v1/completions only
UNSUPPORTED_COMPLETION = {"echo": (None, False), "suffix": (None, ""), "best_of": (None, 1)}
# fields OpenAI defines that change nothing in the answer: accepted (``user`` identifies the end user to
# OpenAI's abuse monitoring)
NO_EFFECT = ("user",)
# keys of a message OpenAI defines beyond role and content, with the neutral values this server can honour (an
# assistant message sent back as the API returned it carries some of them empty)
UNSUPPORTED_MESSAGE = {
    "name": (None,),
    "tool_calls": (None, []),
    "tool_call_id": (None,),
    "function_call": (None,),
    "refusal": (None,),
    "audio": (None,),
    "annotations": (None, []),
}


@dataclass
class Sampling:
    """The decoding settings of one request, checked.

    Attributes:
        max_tokens: new tokens at most; None = as many as the server's default allows.
        temperature: 0 = greedy; otherwise logits are divided by it before sampling.
        top_p: nucleus mass in (0, 1].
        n: choices per prompt.
        stop: stop strings (the answer ends before the first one).
        seed: seeds each choice's own random stream (choice i uses ``seed + i``); None = fresh entropy.
        stream: answer as server-sent events.
        include_usage: with ``stream``, a last chunk carries ``usage``.
        max_tokens_param: the field ``max_tokens`` came from (``max_completion_tokens`` in chat), for errors.
        ignore_eos: do not end at the family's stop ids (the extension vLLM names so); stop strings and
            ``max_tokens`` still end the answer.
    """

    max_tokens: int | None
    temperature: float
    top_p: float
    n: int
    stop: list[str]
    seed: int | None
    stream: bool
    include_usage: bool
    max_tokens_param: str = "max_tokens"
    ignore_eos: bool = False


@dataclass
class ChatRequest:
    """A checked chat request; ``system_index``: the first system (or developer) message's index, or None."""

    model: str
    conversation: Conversation
    sampling: Sampling
    system_index: int | None = None


@dataclass
class CompletionRequest:
    model: str
    prompts: list[str]
    sampling: Sampling


def _no_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


_SURROGATE = re.compile("[\ud800-\udfff]")


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object.

    Raises:
        APIError: 400 ``invalid_json``: not JSON (naming the line and column; ``NaN`` and ``Infinity`` are
            not JSON), not an object, or nested more than :data:`MAX_DEPTH` deep; 400 ``invalid_value``
            naming the field of a string with a lone surrogate (``"\\ud800"``: no character, so no text to
            tokenize).
    """
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        where = f" at line {err.lineno} column {err.colno}" if isinstance(err, json.JSONDecodeError) else ""
        raise bad_request(None, f"the request body is not valid JSON{where}: {getattr(err, 'msg', err)}",
                          "invalid_json") from None
    except ValueError as err:  # NaN, Infinity
        raise bad_request(None, f"the request body is not valid JSON: {err}", "invalid_json") from None
    except RecursionError:
        raise bad_request(None, f"the request body is nested too deeply (at most {MAX_DEPTH} levels)",
                          "invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request(None, f"the request body must be a JSON object, got {type(body).__name__}", "invalid_json")
    _check_tree(body)
    return body


def _check_tree(body: dict) -> None:
    """Nesting depth and lone surrogates, without recursion (the body may be nested up to json's limit)."""
    stack: list[tuple[Any, tuple, int]] = [(body, (), 1)]
    while stack:
        value, loc, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise bad_request(None, f"the request body is nested too deeply (at most {MAX_DEPTH} levels; "
                              f"{param_name(loc[:3])}... goes deeper)", "invalid_json")
        if isinstance(value, str):
            if _SURROGATE.search(value):
                name = param_name(loc) or None
                raise bad_request(name, f"{name}: holds a lone UTF-16 surrogate (e.g. \"\\ud800\"), which is no "
                                  "character; send valid Unicode text", "invalid_value")
        elif isinstance(value, dict):
            for key, item in value.items():
                if _SURROGATE.search(key):
                    name = param_name(loc) or None
                    raise bad_request(name, f"{name or 'the request body'}: a key holds a lone UTF-16 surrogate; "
                                      "send valid Unicode text", "invalid_value")
                stack.append((item, (*loc, key), depth + 1))
        elif isinstance(value, list):
            stack.extend((item, (*loc, i), depth + 1) for i, item in enumerate(value))


# the part of pydantic's error location that names a union's branch (``str``, ``list[ContentPart]``) rather
# than a field: field names are lowercase, branch names are type names
_BRANCH = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|[A-Z]\w*|[a-z-]+\[.*\])$")


def _validate(cls: type[BaseModel], body: dict) -> Any:
    try:
        return cls.model_validate(body)
    except ValidationError as err:
        def fields(error: dict) -> tuple:
            return tuple(p for p in error["loc"] if not (isinstance(p, str) and _BRANCH.match(p)))

        # of a union's branches, the one that got furthest into the value names the field best
        # (``stop: ["a", 5]`` is ``stop[1]``), else the first
        errors = [e for e in err.errors() if e["loc"][:1] == err.errors()[0]["loc"][:1]]  # the first field's
        first = max(errors, key=lambda e: (len(fields(e)), -errors.index(e)))
        field_loc = fields(first)
        name = param_name(field_loc) or None
        what = "is required" if first["type"] == "missing" else f"{first['msg'][:1].lower()}{first['msg'][1:]}"
        got = "" if first["type"] == "missing" else f" (got {json.dumps(first.get('input'), default=str)[:80]})"
        raise bad_request(name, f"{name}: {what}{got}", "invalid_type" if first["type"] != "missing" else
                          "missing_required_parameter") from None


def _refuse_extra(extra: dict, where: str, unsupported: dict, accepted: tuple = ()) -> None:
    """Refuses every extra key of a parsed object: OpenAI fields not at their neutral value (``unsupported``)
    and fields no one defines; ``accepted`` ones pass."""
    for key, value in extra.items():
        name = f"{where}.{key}" if where else key
        if key in accepted:
            continue
        if key in unsupported:
            if value not in unsupported[key]:
                raise bad_request(name, f"{name}={json.dumps(value)[:80]}: not supported by this server "
                                        "(leave it unset)", "unsupported_parameter")
            continue
        raise bad_request(name, f"Unrecognized request argument supplied: {name}", "unknown_parameter")


def _refuse_unsupported(body: _Sampling, unsupported: dict) -> None:
    _refuse_extra(body.model_extra or {}, "", unsupported, NO_EFFECT)
    if body.stream_options is not None:
        _refuse_extra(body.stream_options.model_extra or {}, "stream_options", {})


def _sampling(body: _Sampling, max_tokens: int | None, max_tokens_name: str = "max_tokens") -> Sampling:
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(max_tokens_name, f"{max_tokens_name}={max_tokens}: expected a positive integer",
                          "invalid_value")
    temperature = 1.0 if body.temperature is None else body.temperature
    if not 0.0 <= temperature <= 2.0:
        raise bad_request("temperature", f"temperature={temperature}: expected a number in [0, 2]", "invalid_value")
    top_p = 1.0 if body.top_p is None else body.top_p
    if not 0.0 < top_p <= 1.0:
        raise bad_request("top_p", f"top_p={top_p}: expected a number in (0, 1]", "invalid_value")
    n = 1 if body.n is None else body.n
    if not 1 <= n <= MAX_N:
        raise bad_request("n", f"n={n}: expected an integer in [1, {MAX_N}]", "invalid_value")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > MAX_STOP:
        raise bad_request("stop", f"stop: {len(stop)} sequences; at most {MAX_STOP}", "invalid_value")
    for i, text in enumerate(stop):
        if not text:
            raise bad_request(f"stop[{i}]", f"stop[{i}]: an empty stop sequence", "invalid_value")
    if body.seed is not None and not 0 <= body.seed < 2**63:
        raise bad_request("seed", f"seed={body.seed}: expected an integer in [0, 2^63)", "invalid_value")
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options", "stream_options: only allowed with stream=true", "invalid_value")
    return Sampling(
        max_tokens=max_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
        n=n,
        stop=stop,
        seed=body.seed,
        stream=bool(body.stream),
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        max_tokens_param=max_tokens_name,
        ignore_eos=body.ignore_eos,
    )


SYSTEM_ROLES = ("system", "developer")
ROLES = ("system", "developer", "user", "assistant")


def _text(message: Message, index: int) -> str:
    _refuse_extra(message.model_extra or {}, f"messages[{index}]", UNSUPPORTED_MESSAGE)
    content = message.content
    if content is None:
        raise bad_request(f"messages[{index}].content", f"messages[{index}].content: is required (a string)",
                          "missing_required_parameter")
    if isinstance(content, str):
        return content
    parts = []
    for j, part in enumerate(content):
        _refuse_extra(part.model_extra or {}, f"messages[{index}].content[{j}]", {})
        if part.type != "text" or part.text is None:
            raise bad_request(f"messages[{index}].content[{j}].type",
                              f"messages[{index}].content[{j}]: type {part.type!r} is not supported (text only)",
                              "invalid_value")
        parts.append(part.text)
    return "".join(parts)


def system_index(messages: list[Message]) -> int | None:
    """The index of the first system (or developer) message, or None."""
    return next((i for i, m in enumerate(messages) if m.role in SYSTEM_ROLES), None)


def conversation_of(messages: list[Message]) -> Conversation:
    """OpenAI messages as a :class:`~ptuning.models.base.Conversation`.

    System (or developer) messages may open the list and are joined by newlines; then user and assistant
    messages alternate and the last one is the user's query.

    Raises:
        APIError: 400 naming the message (``messages[i].role`` / ``.content``) and what was expected.
    """
    if not messages:
        raise bad_request("messages", "messages: expected at least one message", "invalid_value")
    system: list[str] = []
    turns: list[str] = []
    for i, message in enumerate(messages):
        role = message.role
        if role not in ROLES:
            raise bad_request(f"messages[{i}].role", f"messages[{i}].role={role!r}: expected one of "
                              f"{', '.join(ROLES)}", "invalid_value")
        text = _text(message, i)
        if role in SYSTEM_ROLES:
            if turns:
                raise bad_request(f"messages[{i}].role", f"messages[{i}].role={role!r}: a {role} message may "
                                  "only come before the first user message", "invalid_value")
            system.append(text)
            continue
        want = "user" if len(turns) % 2 == 0 else "assistant"
        if role != want:
            raise bad_request(f"messages[{i}].role", f"messages[{i}].role={role!r}: expected {want!r} (after any "
                              "system messages, user and assistant messages alternate)", "invalid_value")
        turns.append(text)
    if len(turns) % 2 == 0:
        last = len(messages) - 1
        raise bad_request(f"messages[{last}].role", f"messages[{last}]: the last message must be the user's "
                          "(the one to answer)", "invalid_value")
    history = [(turns[k], turns[k + 1]) for k in range(0, len(turns) - 1, 2)]
    return Conversation(query=turns[-1], history=history, system="\n".join(system) if system else None)


def parse_chat(body: dict) -> ChatRequest:
    """``POST /v1/chat/completions``'s body, checked. Raises :class:`APIError`."""
    parsed = _validate(ChatCompletionBody, body)
    _refuse_unsupported(parsed, UNSUPPORTED)
    if parsed.max_tokens is not None and parsed.max_completion_tokens is not None:
        raise bad_request("max_completion_tokens", "max_completion_tokens: give it or max_tokens, not both",
                          "invalid_value")
    if parsed.max_completion_tokens is not None:
        sampling = _sampling(parsed, parsed.max_completion_tokens, "max_completion_tokens")
    else:
        sampling = _sampling(parsed, parsed.max_tokens)
    return ChatRequest(parsed.model, conversation_of(parsed.messages), sampling, system_index(parsed.messages))


def parse_completion(body: dict) -> CompletionRequest:
    """``POST /v1/completions``'s body, checked. A list of prompts gives ``n`` choices for each. Raises
    :class:`APIError`."""
    parsed = _validate(CompletionBody, body)
    _refuse_unsupported(parsed, {**UNSUPPORTED, **UNSUPPORTED_COMPLETION,
                                 "best_of": (None, 1, 1 if parsed.n is None else parsed.n)})
    prompt = parsed.prompt
    if isinstance(prompt, str):
        prompts = [prompt]
    elif prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif not prompt:
        raise bad_request("prompt", "prompt: expected a string or a non-empty list of strings", "invalid_value")
    else:
        raise bad_request("prompt", "prompt: token-id prompts are not supported; send text (a string or a list "
                          "of strings)", "invalid_value")
    sampling = _sampling(parsed, parsed.max_tokens)
    if len(prompts) * sampling.n > MAX_CHOICES:
        raise bad_request("n", f"n={sampling.n} for {len(prompts)} prompts: {len(prompts) * sampling.n} choices; at "
                          f"most {MAX_CHOICES} in one request", "invalid_value")
    return CompletionRequest(parsed.model, prompts, sampling)
