"""The FastAPI app: OpenAI's ``/v1/models``, ``/v1/chat/completions`` and ``/v1/completions``, ``/health``, and
the web page mounted at ``/ui``.

Every error is OpenAI's body (:class:`~ptuning.serve.protocol.APIError`), also for unknown routes and faults.
``stream: true`` answers with server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``; a
client that goes away (streaming or not) has its choices cancelled and their batch slots freed at once.

A request body over ``max_request_bytes`` is refused (413) before it is parsed; parsing, checking and
tokenizing run in a worker thread, so a huge prompt never holds up the event loop (``/health``, streams).
When the server stops, requests still unfinished after the shutdown timeout get a 503 body (code
``server_shutting_down``), or, streaming, that error as their last event before ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..models.base import Conversation
from .protocol import APIError, parse_chat, parse_completion, parse_json
from .scheduler import Delta, Failure, Finish
from .service import Generation, Service, failure_error
from .web import mount_web

log = logging.getLogger("ptuning.serve")
WEB_PATH = "/ui"
#: the default of ``--max-request-bytes``
MAX_REQUEST_BYTES = 4 << 20
# a body announced or found to be over the limit is read on and dropped up to this much, so that the client
# gets the 413 rather than a broken connection; beyond it the connection is closed
_DRAIN_BYTES = 64 << 20


def create_app(service: Service, *, api_key: str | None = None, web: bool = True,
               on_startup=None, max_request_bytes: int = MAX_REQUEST_BYTES) -> FastAPI:
    """The server's ASGI app.

    Args:
        service: the model, its prefixes and the scheduler (started and stopped with the app's lifespan).
        api_key: when set, ``/v1/*`` needs ``Authorization: Bearer <api_key>`` (else 401) and the web page asks
            for it as its password.
        web: mount the chat page at ``/ui`` (``/`` redirects there).
        on_startup: called once the scheduler runs (the command prints where it listens).
        max_request_bytes: larger request bodies of the API get 413 ``request_too_large``.
    """
    app = FastAPI(title="ptuning", lifespan=_lifespan(service, on_startup), docs_url=None, redoc_url=None,
                  openapi_url=None)
    _add_error_handlers(app)
    if api_key is not None:
        app.add_middleware(BearerAuth, api_key=api_key)
    _add_status_routes(app, service)
    _add_completion_routes(app, service, max_request_bytes)
    if web:
        @app.get("/", include_in_schema=False)
        async def root():
            return RedirectResponse(f"{WEB_PATH}/")

        app = mount_web(app, service, WEB_PATH, api_key=api_key)
    return app


def _lifespan(service: Service, on_startup):
    """The app's lifespan: the scheduler runs from start-up (then ``on_startup`` is called) to shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.scheduler.start()
        if on_startup is not None:
            on_startup()
        try:
            yield
        finally:
            # uvicorn has let in-flight requests finish (or cancelled them after its graceful timeout)
            service.scheduler.stop(drain=False, timeout=30)

    return lifespan


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's body: ours (:class:`APIError`), unknown routes and methods, and faults (500)."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        code = "not_found" if err.status_code == 404 else "method_not_allowed" if err.status_code == 405 else None
        message = f"{request.method} {request.url.path}: {err.detail}"
        return JSONResponse(APIError(err.status_code, message, code=code).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _fault(request: Request, err: Exception):
        log.exception("request failed")
        body = APIError(500, f"internal error: {type(err).__name__}: {err}", type="server_error").body()
        return JSONResponse(body, status_code=500)


def _add_status_routes(app: FastAPI, service: Service) -> None:
    """``/health`` and the model list ``/v1/models`` (the base model and every prefix)."""

    @app.get("/health")
    async def health():
        """``status`` ok (200) while the decode thread runs, else error (503, with the ``error`` that stopped it,
        e.g. a CUDA error); the model, the prefixes and the scheduler's counts (``active`` rows, ``waiting``
        requests, ``steps``, ``generated_tokens`` ...)."""
        alive = service.scheduler.alive
        body = {"status": "ok" if alive else "error", "model": service.base_name, "prefixes": service.prefixes,
                **service.scheduler.stats()}
        if service.scheduler.fault is not None:
            body["error"] = service.scheduler.fault
        return JSONResponse(body, status_code=200 if alive else 503)

    def card(name: str) -> dict:
        entry = {"id": name, "object": "model", "created": service.created, "owned_by": "ptuning"}
        if name != service.base_name:
            entry.update(root=service.base_name, parent=service.base_name)
        return entry

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card(name) for name in service.model_names]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        service.resolve(name)
        return card(name)


def _add_completion_routes(app: FastAPI, service: Service, max_request_bytes: int) -> None:
    """``/v1/chat/completions`` and ``/v1/completions``: a body is read (at most ``max_request_bytes``), then
    parsed, checked and tokenized in a worker thread; the answer is one JSON body or, with ``stream``, SSE."""

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        raw = await read_body(request, max_request_bytes)
        req, prefix, prompts = await run_in_threadpool(_prepare_chat, service, raw)  # JSON, checks, tokenizing
        generation = service.start(prompts, prefix, req.sampling)
        ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.sampling.stream:
            return _sse(_chat_chunks(generation, ident, created, req.model, req.sampling.include_usage), generation)
        choices = await _collect(generation, request)
        if choices is None:
            return Response(status_code=499)
        return {
            "id": ident, "object": "chat.completion", "created": created, "model": req.model,
            "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                         "finish_reason": c.finish_reason, "logprobs": None} for c in choices],
            "usage": _usage(generation), "system_fingerprint": None,
        }

    @app.post("/v1/completions")
    async def completions(request: Request):
        raw = await read_body(request, max_request_bytes)
        req, prefix, prompts = await run_in_threadpool(_prepare_completion, service, raw)
        generation = service.start(prompts, prefix, req.sampling)
        ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if req.sampling.stream:
            return _sse(_completion_chunks(generation, ident, created, req.model, req.sampling.include_usage),
                        generation)
        choices = await _collect(generation, request)
        if choices is None:
            return Response(status_code=499)
        return {
            "id": ident, "object": "text_completion", "created": created, "model": req.model,
            "choices": [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
                        for c in choices],
            "usage": _usage(generation), "system_fingerprint": None,
        }


def _prepare_chat(service: Service, raw: bytes):
    """A chat request's body -> the request, its prefix and its one prompt (rendered by the chat template)."""
    req = parse_chat(parse_json(raw))
    prefix = service.resolve(req.model)
    service.check_system(req.conversation, req.system_index)
    prompt = service.prompt(req.conversation, req.sampling.max_tokens, max_tokens_name=req.sampling.max_tokens_param)
    return req, prefix, [prompt]


def _prepare_completion(service: Service, raw: bytes):
    """A completion request's body -> the request, its prefix and a prompt per text."""
    req = parse_completion(parse_json(raw))
    prefix = service.resolve(req.model)
    # a completion prompt is plain text (families with a chat template leave it out, as for data rows
    # without history); /v1/chat/completions goes through the chat template
    prompts = [service.prompt(Conversation(query=text, plain=True), req.sampling.max_tokens,
                              param="prompt" if len(req.prompts) == 1 else f"prompt[{i}]")
               for i, text in enumerate(req.prompts)]
    return req, prefix, prompts


class GracefulServer(uvicorn.Server):
    """uvicorn's server, whose graceful shutdown calls ``on_timeout`` after ``drain_timeout`` seconds.

    uvicorn cancels the requests still running when its own ``timeout_graceful_shutdown`` expires: a
    non-streaming one then gets a plain-text 500, a stream is cut without an error, and each leaves a
    traceback. ``on_timeout`` (the command passes the scheduler's ``stop``) fails them first, with a 503 their
    handlers answer as OpenAI's error body or a last SSE error event; uvicorn's timeout, set longer, is only the
    last resort.
    """

    def __init__(self, config: uvicorn.Config, *, drain_timeout: float, on_timeout):
        super().__init__(config)
        self.drain_timeout, self.on_timeout = drain_timeout, on_timeout

    async def shutdown(self, sockets=None) -> None:
        timer = asyncio.get_running_loop().call_later(self.drain_timeout, self.on_timeout)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()


class BearerAuth:
    """ASGI middleware: ``/v1/*`` requests need ``Authorization: Bearer <api_key>``; others get OpenAI's 401."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self.key):
                what = "no API key given (send Authorization: Bearer <key>)" if not header else "incorrect API key"
                err = APIError(401, what, code="invalid_api_key")
                response = JSONResponse(err.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes.

    Raises:
        APIError: 413 ``request_too_large`` for a longer body (announced by ``Content-Length`` or found while
            reading); what the client still sends is read and dropped, up to a bound, so that it gets the answer.
    """

    def too_large(size: str) -> APIError:
        return APIError(413, f"the request body is {size} bytes; this server takes at most {limit} "
                        "(--max-request-bytes)", code="request_too_large")

    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        await _drain(request, int(declared))
        raise too_large(declared)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            size += await _drain(request, size)
            raise too_large(f"more than {limit}" if size > _DRAIN_BYTES else str(size))
        chunks.append(chunk)
    return b"".join(chunks)


async def _drain(request: Request, already: int) -> int:
    """Reads and drops the rest of a body refused for its size (up to :data:`_DRAIN_BYTES`); the bytes read."""
    if already > _DRAIN_BYTES:
        return 0
    read = 0
    async for chunk in request.stream():
        read += len(chunk)
        if already + read > _DRAIN_BYTES:
            break
    return read


def _usage(generation: Generation) -> dict:
    completion = generation.completion_tokens
    return {"prompt_tokens": generation.prompt_tokens, "completion_tokens": completion,
            "total_tokens": generation.prompt_tokens + completion}


async def _collect(generation: Generation, request: Request):
    """Waits for every choice; a client that disconnects first has them cancelled."""

    async def disconnected():
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    work = asyncio.ensure_future(generation.wait())
    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
            generation.cancel()
    if not work.done() or work.cancelled():
        return None  # the client is gone: nothing to answer
    return work.result()


def _sse(chunks: AsyncIterator[dict], generation: Generation) -> StreamingResponse:
    async def body():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            generation.cancel()  # the client went away mid-stream: free its slots now (finished ones are left)

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _chat_chunks(generation: Generation, ident: str, created: int, model: str, include_usage: bool):
    def chunk(index: int, delta: dict, finish: str | None = None) -> dict:
        return {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                "system_fingerprint": None,
                "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}]}

    for job in generation.jobs:
        yield chunk(job.index, {"role": "assistant", "content": ""})
    async for event in generation.events():
        if isinstance(event, Delta):
            yield chunk(event.index, {"content": event.text})
        elif isinstance(event, Finish):
            yield chunk(event.index, {}, event.reason)
        else:
            yield failure_error(event).body()
            return
    if include_usage:
        yield {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": [], "usage": _usage(generation)}


async def _completion_chunks(generation: Generation, ident: str, created: int, model: str, include_usage: bool):
    def chunk(index: int, text: str, finish: str | None = None) -> dict:
        return {"id": ident, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": index, "text": text, "finish_reason": finish, "logprobs": None}]}

    async for event in generation.events():
        if isinstance(event, Delta):
            yield chunk(event.index, event.text)
        elif isinstance(event, Finish):
            yield chunk(event.index, "", event.reason)
        elif isinstance(event, Failure):
            yield failure_error(event).body()
            return
    if include_usage:
        yield {"id": ident, "object": "text_completion", "created": created, "model": model, "choices": [],
               "usage": _usage(generation)}
