"""The OpenAI-compatible HTTP server: `build_app(ctx)` (FastAPI) and `run_server(args)` (uvicorn).

Startup binds the socket first, then loads the model on the engine thread while the server
already answers (`/health` is 503 until the model is ready), and prints one line with the URL
when it is. SIGTERM/SIGINT: stop accepting, let requests in flight finish for up to
`--shutdown-timeout` seconds, stop the engine, exit 0.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request

from heron import __version__
from heron.server.metrics import CONTENT_TYPE_LATEST
from heron.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest, DetokenizeResponse,
                                   ModelCard, ModelList, TokenizeRequest, TokenizeResponse)
from heron.server.serving_base import APIError, ServerContext, check_prompt_ids, error_response
from heron.server.serving_base import tokenize as tokenize_text
from heron.server.serving_chat import ChatHandler, render_chat
from heron.server.serving_completions import CompletionsHandler

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 16 * 2**20
OPEN_PATHS = frozenset({"/health"})  # reachable without the API key


# ---------------------------------------------------------------------------- ASGI guard
async def _send_error(send, status: int, message: str, code: str | None = None,
                      extra_headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(APIError(status, message, code=code).body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra_headers or [])})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """Plain ASGI (so streaming and disconnects pass through untouched): refuses requests while
    draining (503), without the API key (401, every route but /health), and with bodies over
    `max_body_bytes` (413, from Content-Length or while the body streams in)."""

    def __init__(self, app, ctx: ServerContext, api_key: str | None, max_body_bytes: int) -> None:
        self.app = app
        self.ctx = ctx
        self.api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if self.ctx.draining and path not in OPEN_PATHS:
            return await _send_error(send, 503, "the server is shutting down", code="shutting_down")
        headers = dict(scope.get("headers") or [])
        if self.api_key is not None and path not in OPEN_PATHS:
            auth = headers.get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                return await _send_error(send, 401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                                         code="invalid_api_key", extra_headers=[(b"www-authenticate", b"Bearer")])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_body_bytes
            except ValueError:
                return await _send_error(send, 400, "invalid Content-Length header")
            if too_big:
                return await _send_error(send, 413, f"request body of {int(length)} bytes is larger than the server's "
                                                    f"limit of {self.max_body_bytes} bytes", code="body_too_large")
        limit = self.max_body_bytes
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise StarletteHTTPException(413, f"request body is larger than the server's limit of {limit} "
                                                      f"bytes")
            return message

        try:
            await self.app(scope, limited_receive, send)
        except asyncio.CancelledError:
            if not self.ctx.draining:
                raise
            # uvicorn cancels what is left when --shutdown-timeout runs out: one line, not a traceback
            logger.warning("cut off %s %s at shutdown (--shutdown-timeout exceeded)", scope.get("method"), path)


# ---------------------------------------------------------------------------- the app
def build_app(ctx: ServerContext, api_key: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
              on_startup: Callable[[], Awaitable[None]] | None = None) -> FastAPI:
    """The FastAPI app. Its lifespan starts the AsyncEngine (the model loads in the background)
    and stops it at shutdown; `on_startup` runs as a task alongside (e.g. to announce readiness)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        ctx.engine.start()
        task = asyncio.create_task(on_startup()) if on_startup else None
        try:
            yield
        finally:
            ctx.draining = True
            if task is not None:
                task.cancel()
            await ctx.engine.shutdown(timeout=1.0 if ctx.engine.state == "loading" else 10.0)

    app = FastAPI(title="heron", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible LLM server (heron)")
    app.state.ctx = ctx
    completions = CompletionsHandler(ctx)
    chat = ChatHandler(ctx)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return error_response(400, _validation_message(exc), code="invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return error_response(exc.status_code, message)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        logger.exception("internal error in %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error")

    @app.get("/health")
    async def health() -> Response:
        state = ctx.engine.state
        if state == "ready" and not ctx.draining:
            return JSONResponse({"status": "ok"})
        status = "shutting_down" if ctx.draining else state
        return JSONResponse({"status": status}, status_code=503)

    @app.get("/version")
    async def version() -> Response:
        return JSONResponse({"version": __version__})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> Response:
        engine = ctx.ready_engine()
        cards = [ModelCard(id=name, root=str(engine.source.path), max_model_len=engine.max_model_len,
                           vocab_size=engine.runner.vocab_size) for name in ctx.served_model_names]
        return JSONResponse(ModelList(data=cards).model_dump())

    @app.post("/v1/completions")
    async def create_completion(req: CompletionRequest, raw: Request) -> Response:
        return await completions.create(req, raw)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(req: ChatCompletionRequest, raw: Request) -> Response:
        return await chat.create(req, raw)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> Response:
        ctx.check_model(req.model)
        engine = ctx.ready_engine()
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give either `prompt` or `messages`", param="prompt")
        if req.prompt is not None:
            add_special = True if req.add_special_tokens is None else req.add_special_tokens
            tokens = await tokenize_text(engine.tokenizer, req.prompt, add_special)
        else:
            text = render_chat(ctx, engine, req.messages, req.chat_template, req.add_generation_prompt)
            tokens = await tokenize_text(engine.tokenizer, text, bool(req.add_special_tokens))
        return JSONResponse(TokenizeResponse(count=len(tokens), max_model_len=engine.max_model_len,
                                             tokens=tokens).model_dump())

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> Response:
        ctx.check_model(req.model)
        engine = ctx.ready_engine()
        if req.tokens:
            check_prompt_ids(ctx, req.tokens)
        return JSONResponse(DetokenizeResponse(prompt=engine.tokenizer.decode(req.tokens)).model_dump())

    return GuardMiddleware(app, ctx, api_key, max_body_bytes)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        msg = err.get("msg", "invalid")
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "")
            parts.append(f"the body is not valid JSON ({detail} at position {err.get('loc', ('', '?'))[-1]})")
        else:
            parts.append(f"{loc or 'body'}: {msg}")
    return "invalid request: " + "; ".join(parts)


# ---------------------------------------------------------------------------- running it
def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port or stop the other "
                         f"server") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _read_chat_template(value: str | None) -> str | None:
    if value is None:
        return None
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    if "{{" in value or "{%" in value:
        return value  # an inline Jinja template
    raise ValueError(f"--chat-template {value!r}: no such file (give a Jinja template file or the template itself)")


def _seconds_since_process_start(fallback_t0: float) -> float:
    """Wall time since this process started (Linux /proc), else since `fallback_t0`."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.monotonic() - fallback_t0


def run_server(args) -> int:
    """`heron serve`: returns the process exit code."""
    from heron.cli import engine_kwargs
    from heron.config import EngineConfig
    from heron.engine.async_engine import AsyncEngine
    from heron.engine.engine import Engine
    from heron.models.loader import resolve_model
    from heron.server.metrics import ServerMetrics

    t_start = time.monotonic()
    logging.getLogger("heron").setLevel(args.log_level.upper())  # default: only the line saying it is ready
    model = args.model
    source = resolve_model(model)  # a bad path fails now, before anything starts
    names = args.served_model_name or [source.name if model is None else model]
    chat_template = _read_chat_template(args.chat_template)
    config = EngineConfig(model=model, load_progress=False, **engine_kwargs(args))
    sock = _bind(args.host, args.port)

    metrics = ServerMetrics(names[0])
    engine = AsyncEngine(lambda: _load_engine(Engine, config), max_queued_requests=args.max_queued_requests,
                         on_iteration=metrics.on_iteration)
    ctx = ServerContext(engine=engine, served_model_names=names, metrics=metrics, chat_template=chat_template,
                        max_num_seqs=args.max_num_seqs)
    exit_code = 0
    server: _Server

    async def announce() -> None:
        nonlocal exit_code
        try:
            await engine.wait_ready()
        except Exception as e:  # noqa: BLE001
            print(f"heron: error: the model failed to load: {e}", file=sys.stderr, flush=True)
            exit_code = 1
            server.should_exit = True
            return
        while not server.started:
            await asyncio.sleep(0.01)
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"heron: serving {names[0]} on http://{host}:{args.port} (ready in "
              f"{_seconds_since_process_start(t_start):.1f} s; OpenAI API under /v1)", flush=True)

    app = build_app(ctx, api_key=args.api_key, max_body_bytes=args.max_request_body_mib * 2**20,
                    on_startup=announce)
    uv_config = uvicorn.Config(app, log_level=args.log_level, access_log=args.access_log,
                               timeout_graceful_shutdown=args.shutdown_timeout, timeout_keep_alive=30,
                               lifespan="on", server_header=False)
    server = _Server(uv_config, ctx)
    server.run(sockets=[sock])
    return exit_code


def _load_engine(engine_cls, config):
    engine = engine_cls(config)
    engine.tokenize("warm up")  # first use settles the tokenizer's state before other threads read it
    return engine


class _Server(uvicorn.Server):
    """uvicorn.Server that marks the server as draining as soon as SIGTERM/SIGINT arrives, and
    exits 0 after the graceful shutdown (uvicorn would re-raise the signal)."""

    def __init__(self, config: uvicorn.Config, ctx: ServerContext) -> None:
        super().__init__(config)
        self.ctx = ctx

    def handle_exit(self, sig, frame) -> None:
        self.ctx.draining = True
        super().handle_exit(sig, frame)
        self._captured_signals.clear()
