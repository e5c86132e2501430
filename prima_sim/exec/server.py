"""``prima-sim serve``'s HTTP side: an OpenAI-compatible API (Starlette) over an :class:`~prima_sim.exec.engine.Engine`.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (streaming as
server-sent events with ``"stream": true``), and ``GET /health`` (the engine's state, no key needed).
Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 a malformed request,
401 a missing or wrong API key, 404 an unknown path, 429 the queue is full, 503 the ring is not ready, 500 a
worker was lost (an error event, then the end of the stream, once a stream has started). docs/serve.md.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from prima_sim.exec.engine import Engine, Event, Job, NotReady, QueueFull
from prima_sim.exec.head import SamplingParams

DISCONNECT_POLL_S = 0.25  # how often a waiting request checks whether its client is still there
MAX_STOPS = 4  # as OpenAI
DEFAULT_COMPLETION_TOKENS = 16  # /v1/completions' max_tokens default (OpenAI's)
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}  # fmt: skip


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": _ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": status}}  # fmt: skip


def error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    """An OpenAI-shaped error response (503 and 429 say when to retry)."""
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


# --- requests ----------------------------------------------------------------------------------------------------
class _Params(BaseModel):
    """What both endpoints accept (unknown fields are ignored, as OpenAI's clients send some)."""

    model_config = ConfigDict(extra="ignore")

    model: str = ""
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=40, ge=0)  # llama.cpp's extension; 0 = every token
    seed: int | None = Field(default=None, ge=0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(default=1, ge=1, le=1)
    ignore_eos: bool = False  # llama.cpp's extension: generate max_tokens even past end-of-generation tokens
    logprobs: Any = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must not be empty")
        return v

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def sampling(self) -> SamplingParams:
        seed = self.seed if self.seed is not None else secrets.randbits(32)
        return SamplingParams(self.temperature, self.top_k, self.top_p, seed)

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_TextPart] | None = None

    def plain(self) -> dict[str, Any]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatParams(_Params):
    """``POST /v1/chat/completions``."""

    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


class CompletionParams(_Params):
    """``POST /v1/completions``."""

    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: Any) -> str | list[int]:
        if isinstance(v, list) and v and isinstance(v[0], (str, list)):
            if len(v) != 1:
                raise ValueError("one prompt per request (this server generates one sequence at a time)")
            v = v[0]
        if not v:
            raise ValueError("the prompt is empty")
        return v


def _first_error(exc: ValidationError) -> tuple[str, str | None]:
    e = exc.errors()[0]
    loc = ".".join(str(x) for x in e["loc"] if not isinstance(x, int) or len(e["loc"]) > 1)
    return (f"{loc}: {e['msg']}" if loc else str(e["msg"])), (str(e["loc"][0]) if e["loc"] else None)


# --- the app -----------------------------------------------------------------------------------------------------
class _Stream:
    """A job's events as an asyncio queue fed from the engine's thread."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.checked = self.loop.time()

    def deliver(self, ev: Event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, ev)

    async def next(self, request: Request) -> Event | None:
        """The next event, or None when the client has gone away (checked at least every
        :data:`DISCONNECT_POLL_S`, also while events keep coming)."""
        while True:
            if self.loop.time() - self.checked >= DISCONNECT_POLL_S:
                self.checked = self.loop.time()
                if await request.is_disconnected():
                    return None
            try:
                return await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
            except TimeoutError:
                continue


def create_app(engine: Engine, model_id: str, api_key: str | None = None) -> Starlette:
    """The ASGI application serving ``engine`` as ``model_id``; ``api_key``: required as a Bearer token."""
    created = int(time.time())

    def authorized(request: Request) -> bool:
        if not api_key:
            return True
        auth = request.headers.get("authorization", "")
        return auth.startswith("Bearer ") and hmac.compare_digest(auth[7:].encode(), api_key.encode())

    async def models(request: Request) -> Response:
        if not authorized(request):
            return error_response(401, "missing or wrong API key (Authorization: Bearer KEY)")
        return JSONResponse({"object": "list", "data": [
            {"id": model_id, "object": "model", "created": created, "owned_by": "prima-sim"}]})  # fmt: skip

    async def health(request: Request) -> Response:
        st = engine.status()
        return JSONResponse(st, status_code=200 if st["state"] == "ready" else 503)

    async def completions(request: Request) -> Response:
        return await _generate(request, chat=False)

    async def chat_completions(request: Request) -> Response:
        return await _generate(request, chat=True)

    async def _generate(request: Request, chat: bool) -> Response:
        if not authorized(request):
            return error_response(401, "missing or wrong API key (Authorization: Bearer KEY)")
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error_response(400, "the request body is not valid JSON")
        if not isinstance(body, dict):
            return error_response(400, "the request body must be a JSON object")
        try:
            params: ChatParams | CompletionParams = (ChatParams if chat else CompletionParams).model_validate(
                body
            )
        except ValidationError as exc:
            msg, param = _first_error(exc)
            return error_response(400, msg, param)
        if params.logprobs not in (None, False, 0):
            return error_response(400, "logprobs are not supported", "logprobs")
        if isinstance(params, CompletionParams) and params.echo:
            return error_response(400, "echo is not supported", "echo")
        max_tokens = params.max_tokens
        if isinstance(params, ChatParams):
            max_tokens = params.max_completion_tokens or max_tokens
            prompt: Any = [m.plain() for m in params.messages]
        else:
            prompt = params.prompt
            max_tokens = max_tokens or DEFAULT_COMPLETION_TOKENS
        stream = _Stream()
        job = Job(
            prompt,
            max_tokens,
            params.sampling(),
            params.stops(),
            stream.deliver,
            chat=chat,
            ignore_eos=params.ignore_eos,
        )
        try:
            engine.submit(job)
        except QueueFull as exc:
            return error_response(429, str(exc))
        except NotReady as exc:
            return error_response(503, str(exc))
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        first = await stream.next(request)
        if first is None:  # the client left while its request waited
            job.cancel()
            return Response(status_code=499)
        if first.kind == "error":
            return error_response(first.status, first.message)
        if params.stream:
            return StreamingResponse(_sse(request, job, stream, first, rid, chat, params.include_usage()),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        text, ev = [], first
        while ev.kind == "text":
            text.append(ev.text)
            nxt = await stream.next(request)
            if nxt is None:
                job.cancel()
                return Response(status_code=499)
            ev = nxt
        if ev.kind == "error":
            return error_response(ev.status, ev.message)
        content = "".join(text)
        choice: dict[str, Any] = (
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": ev.finish_reason,
             "logprobs": None}
            if chat else {"index": 0, "text": content, "finish_reason": ev.finish_reason, "logprobs": None}
        )  # fmt: skip
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": model_id, "choices": [choice],
                             "usage": ev.usage})  # fmt: skip

    async def _sse(request: Request, job: Job, stream: _Stream, first: Event, rid: str, chat: bool,
                   include_usage: bool) -> AsyncIterator[bytes]:  # fmt: skip
        obj = "chat.completion.chunk" if chat else "text_completion"
        t = int(time.time())

        def chunk(text: str | None, finish: str | None, role: bool = False) -> bytes:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
                if text is not None:
                    delta["content"] = text
                c: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                c = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            return _event({"id": rid, "object": obj, "created": t, "model": model_id, "choices": [c]})

        ev: Event | None = first
        try:
            if chat:
                yield chunk(None, None, role=True)
            while ev is not None:
                if ev.kind == "text":
                    yield chunk(ev.text, None)
                elif ev.kind == "error":
                    yield _event(error_body(ev.status, ev.message))
                    return
                else:
                    yield chunk(None if chat else "", ev.finish_reason)
                    if include_usage:
                        yield _event({"id": rid, "object": obj, "created": t, "model": model_id, "choices": [],
                                      "usage": ev.usage})  # fmt: skip
                    yield b"data: [DONE]\n\n"
                    return
                ev = await stream.next(request)
        finally:
            job.cancel()  # the client left (or the stream ended): the engine stops at the next token

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        what = "method not allowed" if status == 405 else "no such endpoint"
        return error_response(status, f"{what}: {request.method} {request.url.path}")

    routes = [
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
    ]
    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})


def _event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` exposes the server to this machine only."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_key_from_env() -> str | None:
    """``PRIMA_SIM_API_KEY``, when set."""
    return os.environ.get("PRIMA_SIM_API_KEY") or None
