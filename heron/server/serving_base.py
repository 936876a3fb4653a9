"""What the completion and chat handlers share: the server context, OpenAI-shaped errors,
request -> SamplingParams, length checks, submitting to the AsyncEngine, merging the streams of
several prompts, watching for a client that goes away, and logprobs in both wire formats."""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi.responses import JSONResponse
from starlette.requests import Request

from heron.engine.async_engine import (AsyncEngine, EngineDeadError, EngineNotReadyError, QueueFullError,
                                       RequestError, RequestStream)
from heron.outputs import PositionLogprobs, RequestOutput
from heron.sampling_params import SamplingParams
from heron.server.protocol import (ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, ErrorInfo, ErrorResponse,
                                   SamplingFields, TopLogprob)

if TYPE_CHECKING:
    from heron.server.metrics import ServerMetrics

T = TypeVar("T")

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                413: "invalid_request_error", 429: "rate_limit_error", 500: "internal_error",
                503: "service_unavailable"}


class APIError(Exception):
    """An error answered in OpenAI's error JSON shape with its HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _ERROR_TYPES.get(status, "error")

    def body(self) -> dict:
        return ErrorResponse(error=ErrorInfo(message=self.message, type=self.type, param=self.param,
                                             code=self.code)).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def error_response(status: int, message: str, **kw) -> JSONResponse:
    return APIError(status, message, **kw).response()


@dataclass
class ServerContext:
    """State shared by the route handlers. `engine.engine` is only read from here (tokenizer,
    limits), never stepped."""

    engine: AsyncEngine
    served_model_names: list[str]
    metrics: ServerMetrics
    chat_template: str | None = None
    max_num_seqs: int = 128
    max_prompts_per_request: int = 256
    draining: bool = False

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    def ready_engine(self):
        """The loaded Engine, or an APIError (503 while loading, 500 when the engine is dead)."""
        state = self.engine.state
        if state == "loading":
            raise APIError(503, "the model is still loading; retry in a few seconds", code="model_loading")
        if state != "ready" or self.engine.engine is None:
            raise APIError(500, f"the engine is not running ({self.engine.error!r}); restart the server",
                           code="engine_dead")
        return self.engine.engine

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.served_model_names:
            raise APIError(404, f"The model `{model}` does not exist; this server serves "
                                f"{', '.join(repr(n) for n in self.served_model_names)}",
                           param="model", code="model_not_found")


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# ---------------------------------------------------------------------------- sampling params
def split_stop(stop: str | list | None) -> tuple[list[str], list[int]]:
    """`stop` may mix strings and token ids; returns (strings, token ids)."""
    if stop is None:
        return [], []
    if isinstance(stop, str):
        return [stop], []
    strings = [s for s in stop if isinstance(s, str)]
    ids = [s for s in stop if isinstance(s, int) and not isinstance(s, bool)]
    return strings, ids


def resolve_max_tokens(max_model_len: int, num_prompt_tokens: int, requested: int | None,
                       name: str = "max_tokens") -> int:
    """The number of tokens to generate: `requested`, or what is left of the context. A prompt
    plus `requested` beyond the model's length is an error (never truncated)."""
    if num_prompt_tokens >= max_model_len:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
                            f"{num_prompt_tokens} tokens (the prompt plus at least one generated token must fit); "
                            f"shorten the prompt", param="prompt", code="context_length_exceeded")
    if requested is None:
        return max_model_len - num_prompt_tokens
    if requested < 1:
        raise APIError(400, f"{name} must be >= 1, got {requested}", param=name)
    if num_prompt_tokens + requested > max_model_len:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens, but you requested "
                            f"{num_prompt_tokens + requested} tokens ({num_prompt_tokens} in the prompt + "
                            f"{requested} for {name}); reduce the prompt or {name}",
                       param=name, code="context_length_exceeded")
    return requested


def build_sampling_params(ctx: ServerContext, req: SamplingFields, max_tokens: int, logprobs: int | None,
                          prompt_logprobs: int | None = None) -> SamplingParams:
    if req.n > ctx.max_num_seqs:
        raise APIError(400, f"n must be in [1, {ctx.max_num_seqs}] (the server's --max-num-seqs), got {req.n}",
                       param="n")
    stop, stop_ids = split_stop(req.stop)
    try:
        params = SamplingParams(
            n=req.n, temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=0 if req.top_k is None else req.top_k,
            min_p=0.0 if req.min_p is None else req.min_p,
            presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            logit_bias=req.logit_bias, seed=req.seed, stop=stop, stop_token_ids=list(req.stop_token_ids or []) + stop_ids,
            ignore_eos=req.ignore_eos, max_tokens=max_tokens, min_tokens=req.min_tokens, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs, skip_special_tokens=req.skip_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output)
        params.verify_vocab_size(ctx.ready_engine().runner.vocab_size)
    except ValueError as e:
        raise APIError(400, str(e)) from None
    return params


_INLINE_TOKENIZE_CHARS = 20_000


async def tokenize(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    """Token ids of `text`. Long texts are encoded on a worker thread (the Rust tokenizer
    releases the GIL), so that a huge prompt does not stall the other streams."""
    if len(text) <= _INLINE_TOKENIZE_CHARS:
        return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    ids = await asyncio.to_thread(lambda: tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    return list(ids)


def check_prompt_ids(ctx: ServerContext, token_ids: list[int]) -> None:
    if not token_ids:
        raise APIError(400, "the prompt is empty; give at least one token", param="prompt")
    vocab = ctx.ready_engine().runner.vocab_size
    bad = [t for t in token_ids if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"prompt token ids must be in [0, {vocab}); got {bad[:5]}", param="prompt")


# ---------------------------------------------------------------------------- engine calls
async def submit(ctx: ServerContext, request_ids: list[str], prompts: list[list[int]],
                 params: list[SamplingParams], arrival_time: float, cache_salt: str | None = None
                 ) -> list[RequestStream]:
    """Add one engine request per prompt, all in the same engine iteration; all or nothing (if
    one is refused, the others are aborted and its error is raised as an APIError)."""
    results = await asyncio.gather(*(ctx.engine.add_request(rid, ids, p, arrival_time, cache_salt=cache_salt)
                                     for rid, ids, p in zip(request_ids, prompts, params)), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        for r in results:
            if isinstance(r, RequestStream):
                r.abort()
        if not isinstance(errors[0], Exception):
            raise errors[0]
        raise engine_error(errors[0]) from None
    return list(results)


def engine_error(e: BaseException) -> BaseException:
    """Map an AsyncEngine exception to the APIError the client sees."""
    if isinstance(e, APIError | asyncio.CancelledError):
        return e
    if isinstance(e, QueueFullError):
        return APIError(429, str(e), code="queue_full")
    if isinstance(e, EngineNotReadyError):
        return APIError(503, str(e), code="model_loading")
    if isinstance(e, ValueError):
        return APIError(400, str(e))
    if isinstance(e, EngineDeadError):
        return APIError(500, str(e), code="engine_dead")
    if isinstance(e, RequestError):
        return APIError(500, str(e), code="internal_error")
    return APIError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error")


async def merge_streams(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from several streams as they arrive."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    pending = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                try:
                    out = task.result()
                except StopAsyncIteration:
                    continue
                yield i, out
                if not out.finished:
                    pending[asyncio.ensure_future(anext(streams[i]))] = i
    finally:
        for task in pending:
            task.cancel()


async def collect_final(streams: list[RequestStream]) -> list[RequestOutput]:
    """The final output of each stream (non-streaming requests); aborts all on any failure."""
    async def last(stream: RequestStream) -> RequestOutput:
        final = None
        async for out in stream:
            final = out
        assert final is not None and final.finished
        return final
    try:
        return list(await asyncio.gather(*(last(s) for s in streams)))
    finally:
        for s in streams:
            s.abort()


class ClientDisconnected(Exception):
    pass


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work`, cancelling it (so that it aborts its engine requests) if the client hangs up
    first; then raises ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    try:
        await task
    except BaseException:  # noqa: BLE001 - it was cancelled on purpose
        pass
    raise ClientDisconnected()


# ---------------------------------------------------------------------------- logprobs
def _chosen(position: PositionLogprobs, token_id: int):
    lp = position.get(token_id)
    if lp is None:  # (cannot happen: the engine always records the chosen token)
        lp = next(iter(position.values()))
    return lp


def _top(position: PositionLogprobs, k: int) -> list[tuple[int, Any]]:
    """The top-k entries by rank (the chosen token is included only if it ranks within k)."""
    ranked = sorted(((tid, lp) for tid, lp in position.items() if lp.rank is not None and lp.rank <= k),
                    key=lambda e: e[1].rank)
    return ranked[:k]


def completion_logprobs(token_ids: list[int], positions: list[PositionLogprobs | None], num_top: int,
                        text_offset: int, tokenizer) -> tuple[CompletionLogprobs, int]:
    """Logprobs in the completions format for `token_ids`; returns (logprobs, next text offset).
    A position without logprobs (the first prompt token) gets None."""
    out = CompletionLogprobs()
    for tid, position in zip(token_ids, positions):
        if position is None:
            token = tokenizer.decode([tid])
            out.tokens.append(token)
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
        else:
            chosen = _chosen(position, tid)
            token = chosen.decoded_token if chosen.decoded_token is not None else tokenizer.decode([tid])
            out.tokens.append(token)
            out.token_logprobs.append(_finite(chosen.logprob))
            top = {token: _finite(chosen.logprob)}
            for _, lp in _top(position, num_top):
                top.setdefault(lp.decoded_token or "", _finite(lp.logprob))
            out.top_logprobs.append(top)
        out.text_offset.append(text_offset)
        text_offset += len(token)
    return out, text_offset


def chat_logprobs(token_ids: list[int], positions: list[PositionLogprobs], num_top: int) -> ChatLogprobs:
    content = []
    for tid, position in zip(token_ids, positions):
        chosen = _chosen(position, tid)
        token = chosen.decoded_token or ""
        content.append(ChatTokenLogprob(
            token=token, logprob=_finite(chosen.logprob), bytes=list(token.encode("utf-8")),
            top_logprobs=[TopLogprob(token=lp.decoded_token or "", logprob=_finite(lp.logprob),
                                     bytes=list((lp.decoded_token or "").encode("utf-8")))
                          for _, lp in _top(position, num_top)]))
    return ChatLogprobs(content=content)


def _finite(x: float) -> float:
    # JSON has no -inf; OpenAI clients expect a number (vLLM sends -9999.0 too)
    return max(float(x), -9999.0)


def now() -> float:
    return time.monotonic()
