"""The ASGI app behind `pixlocal serve` (Starlette): OpenAI's /v1/chat/completions (JSON or
server-sent events), /v1/models, and /health.

A request goes: API key (every path but /health) → body read up to a limit → JSON → checked
(openai_api.parse_request) → admitted, or 503 when the queue is full → images loaded and the
prompt encoded on a preparing thread → a Job for the worker (serve_worker.py) → the answer.
Errors are OpenAI's JSON error with a status; nothing a client sends prints a traceback.
A client that disconnects cancels its job: dropped if it waits, stopped at its next token.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from . import openai_api as api
from .serve_worker import Event, Job, Worker, log

if TYPE_CHECKING:
    from pixlocal.generate import Pixtral
    from pixlocal.prompt import Encoded

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class Server:
    """What the app serves: the worker, the names the model answers to, the limits."""
    worker: Worker
    model_ids: list[str]
    limits: api.Limits = field(default_factory=api.Limits)
    api_key: str | None = None
    max_body: int = 32 * 2**20
    created: int = field(default_factory=api.now)
    prep: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="pixlocal-prep"))


def error_response(e: api.ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def endpoint(fn: Callable[[Request, Server], Awaitable[Response]]
             ) -> Callable[[Request], Awaitable[Response]]:
    """A route whose ApiError is its JSON answer and whose bug is a one-line 500."""
    async def route(request: Request) -> Response:
        try:
            return await fn(request, request.app.state.server)
        except api.ApiError as e:
            return error_response(e)
        except Exception as e:  # a bug: one line, the server goes on
            log.error("%s %s failed: %s: %s", request.method, request.url.path,
                      type(e).__name__, " ".join(str(e).split()),
                      exc_info=bool(os.environ.get("PIXLOCAL_DEBUG")))
            return error_response(api.ApiError(500, f"internal error ({type(e).__name__})",
                                               code="internal_error"))
    return route


# ---- the endpoints -------------------------------------------------------------------------

async def health(request: Request, srv: Server) -> Response:
    h = srv.worker.health()
    if h["status"] == "loading":
        h["message"] = "the model is loading"
    elif h["status"] == "failed":
        h["message"] = srv.worker.error
    return JSONResponse(h, status_code=200 if h["status"] == "ok" else 503)


async def models(request: Request, srv: Server) -> Response:
    return JSONResponse(api.models_list(srv.model_ids, srv.created))


async def chat_completions(request: Request, srv: Server) -> Response:
    model = ready_model(srv)
    try:
        body = json.loads(await read_body(request, srv.max_body))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise api.bad(f"the request body is not valid JSON ({e})", code="invalid_json"
                      ) from None
    req = api.parse_request(body, srv.model_ids, srv.limits)
    if not srv.worker.admit():
        raise api.ApiError(503, f"the server is busy ({srv.worker.max_queue} requests "
                           "queued); retry later", code="queue_full",
                           headers={"Retry-After": str(srv.worker.retry_after())})
    handed_over, answer = False, None
    try:
        loop = asyncio.get_running_loop()
        enc, max_tokens = await loop.run_in_executor(srv.prep, prepare, model, req, srv.limits)
        job = Job(enc, {**req.sampling, "max_tokens": max_tokens}, loop)
        srv.worker.submit(job)
        answer = Answer(srv.worker, job, req, len(enc.tokens))
        answer.watch(request.receive)
        first = await answer.first()
        if req.stream:
            handed_over, a = True, answer
            return EventStream(a.sse(first), on_close=lambda: (a.close(), srv.worker.release()),
                               headers={**SSE_HEADERS, **a.headers()})
        text = await answer.text(first)
        return JSONResponse(api.completion(answer.id, answer.created, req.model, text,
                                           answer.finish, answer.usage()),
                            headers=answer.headers())
    finally:
        if not handed_over:
            if answer is not None:
                answer.close()
            srv.worker.release()


def ready_model(srv: Server) -> Pixtral:
    w = srv.worker
    if w.state == "ready" and w.model is not None:
        return w.model
    if w.state == "loading":
        raise api.ApiError(503, "the model is loading; retry shortly", code="model_loading",
                           headers={"Retry-After": "5"})
    raise api.ApiError(503, f"the server is {w.state}" + (f": {w.error}" if w.error else ""),
                       code="unavailable")


async def read_body(request: Request, limit: int) -> bytes:
    too_large = api.ApiError(413, f"the request body is larger than this server's limit "
                             f"({limit / 2**20:g} MiB)", code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise too_large
    return bytes(body)


def prepare(model: Pixtral, req: api.ChatRequest, limits: api.Limits) -> tuple[Encoded, int]:
    """On the preparing thread: load the images, encode the prompt, fit it in the context.
    Returns (encoded prompt, max_tokens)."""
    from pixlocal.errors import ContextOverflow, ImageError, ImageTooLarge, PixlocalError
    from pixlocal.images import load_image

    loaded: dict[int, Any] = {}
    for ref in req.images:
        try:
            loaded[id(ref)] = load_image(ref.url, timeout=limits.url_timeout,
                                         max_bytes=limits.max_image_bytes,
                                         max_pixels=limits.max_image_pixels)
        except ImageTooLarge as e:
            raise api.ApiError(413, str(e), param=ref.param, code="image_too_large") from None
        except ImageError as e:
            raise api.bad(str(e), ref.param, "invalid_image") from None
    messages = [{**m, "content": [{"type": "image", "image": loaded[id(p["image"])]}
                                  if p["type"] == "image" else p for p in m["content"]]}
                if isinstance(m["content"], list) else m for m in req.messages]
    try:
        enc = model.encode(messages)
    except PixlocalError as e:
        raise api.bad(str(e), "messages") from None
    n, limit = len(enc.tokens), model.context_limit
    max_tokens = req.max_tokens or min(limits.max_tokens, limit - n)
    if n + max_tokens > limit or max_tokens < 1:
        raise api.bad(f"this model's context window is {limit} tokens; the messages hold {n} "
                      f"and {max_tokens} more were asked for the answer (max_tokens); "
                      "shorten the messages or lower max_tokens", "messages",
                      "context_length_exceeded")
    try:
        model.check_context(n, max_tokens)  # and the RAM for its KV cache
    except ContextOverflow as e:
        raise api.bad(str(e), "messages", "context_length_exceeded") from None
    return enc, max_tokens


# ---- an answer: the job's events as text -----------------------------------------------------

class Answer:
    """Reads one job's events: text pieces (up to a stop string), finish reason, usage."""

    def __init__(self, worker: Worker, job: Job, req: api.ChatRequest, prompt_tokens: int):
        self.worker, self.job, self.req = worker, job, req
        self.id, self.created = api.new_id(), api.now()
        self.prompt_tokens, self.tokens, self.cached, self.images_encoded = prompt_tokens, 0, 0, 0
        self.finish = "stop"
        self.stops = api.StopText(req.stop)
        self._watcher: asyncio.Task[None] | None = None

    def watch(self, receive: Receive) -> None:
        """Cancel the job when the client disconnects."""
        async def wait() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.worker.cancel(self.job, "client")
        self._watcher = asyncio.ensure_future(wait())

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        if not self.job.done:  # e.g. the response could not be sent
            self.worker.cancel(self.job, "client")

    async def first(self) -> Event:
        """The first event, before any response is sent: an error then has its status."""
        ev = await self.job.events.get()
        if ev.kind == "error":
            raise self._error(ev.error)
        if ev.kind == "end" and self.job.why == "shutdown":
            raise self._shutdown()
        if ev.step is not None:
            self.cached = ev.step.prompt_tokens - ev.step.prefilled_tokens
            self.images_encoded = ev.images_encoded
        return ev

    def headers(self) -> dict[str, str]:
        return {"x-pixlocal-cached-tokens": str(self.cached),
                "x-pixlocal-images-encoded": str(self.images_encoded)}

    def usage(self) -> dict[str, Any]:
        return api.usage(self.prompt_tokens, self.tokens, self.cached)

    async def pieces(self, ev: Event) -> AsyncIterator[str]:
        """Text pieces from `ev` on; sets finish. ApiError for a failure or shutdown."""
        while True:
            if ev.kind == "error":
                raise self._error(ev.error)
            if ev.kind == "end":
                if self.job.why == "shutdown":
                    raise self._shutdown()
                break
            step = ev.step
            assert step is not None
            self.tokens += 1
            text, stopped = self.stops.feed(step.text)
            if text:
                yield text
            if stopped:
                self.finish = "stop"
                self.worker.cancel(self.job, "stop")
                return  # the worker ends the job after this token; its events are dropped
            if step.finish_reason:
                self.finish = step.finish_reason
            ev = await self.job.events.get()
        if rest := self.stops.flush():
            yield rest

    async def text(self, first: Event) -> str:
        return "".join([t async for t in self.pieces(first)])

    async def sse(self, first: Event) -> AsyncIterator[bytes]:
        a, model = self, self.req.model
        u = a.req.include_usage

        def data(d: dict[str, Any]) -> bytes:
            return b"data: " + json.dumps(d, ensure_ascii=False).encode() + b"\n\n"

        yield data(api.chunk(a.id, a.created, model, {"role": "assistant", "content": ""},
                             with_usage=u))
        try:
            async for piece in a.pieces(first):
                yield data(api.chunk(a.id, a.created, model, {"content": piece}, with_usage=u))
        except api.ApiError as e:  # mid-answer: an error event, as OpenAI sends
            yield data(e.body())
            return
        yield data(api.chunk(a.id, a.created, model, {}, a.finish, with_usage=u))
        if u:
            yield data(api.chunk(a.id, a.created, model, None, use=a.usage(), with_usage=True))
        yield b"data: [DONE]\n\n"

    def _error(self, e: BaseException | None) -> api.ApiError:
        from pixlocal.errors import NonFiniteLogits, PixlocalError
        if isinstance(e, PixlocalError) and not isinstance(e, NonFiniteLogits):
            return api.bad(str(e), "messages")
        what = str(e) if isinstance(e, PixlocalError) else f"internal error ({type(e).__name__})"
        return api.ApiError(500, what, code="generation_failed")

    def _shutdown(self) -> api.ApiError:
        return api.ApiError(503, "the server is shutting down", code="shutting_down")


class EventStream(Response):
    """Server-sent events from an async iterator; `on_close` runs however it ends."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], Any],
                 headers: dict[str, str]) -> None:
        self.events, self.on_close = events, on_close
        self.status_code, self.background = 200, None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200,
                        "headers": self.raw_headers})
            async for data in self.events:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # the client is gone (ASGI 2.4 servers say so here)
            pass
        finally:
            self.on_close()


# ---- the app ---------------------------------------------------------------------------------

class KeyCheck:
    """`Authorization: Bearer KEY` on every path but /health (ASGI middleware)."""

    def __init__(self, app: Any, key: str | None) -> None:
        self.app, self.key = app, key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.key and scope["path"] != "/health":
            auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            scheme, _, given = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                     self.key.encode()):
                what = "missing" if not auth else "incorrect"
                e = api.ApiError(401, f"{what} API key: send 'Authorization: Bearer KEY' with "
                                 "the key given to `pixlocal serve --api-key`",
                                 code="invalid_api_key")
                await error_response(e)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _not_found(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 404)
    what = "method not allowed" if status == 405 else "no such endpoint"
    return error_response(api.ApiError(status, f"{what}: {request.method} {request.url.path}",
                                       code="not_found" if status == 404 else None))


def build_app(srv: Server) -> Any:
    app = Starlette(routes=[
        Route("/health", endpoint(health), methods=["GET"]),
        Route("/v1/models", endpoint(models), methods=["GET"]),
        Route("/v1/chat/completions", endpoint(chat_completions), methods=["POST"]),
    ], exception_handlers={404: _not_found, 405: _not_found})
    app.state.server = srv
    return KeyCheck(app, srv.api_key)
