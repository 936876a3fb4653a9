"""POST /v1/completions: text or token-id prompts (one or a batch), streaming or not."""
from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import Request

from heron.outputs import RequestOutput
from heron.server.protocol import (CompletionChoice, CompletionChunk, CompletionLogprobs, CompletionRequest,
                                   CompletionResponse, usage_info)
from heron.server.serving_base import (APIError, ClientDisconnected, ServerContext, build_sampling_params,
                                      check_prompt_ids, collect_final, completion_logprobs, engine_error,
                                      merge_streams, now, random_id, resolve_max_tokens, submit, tokenize,
                                      unless_disconnected)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class Prompt:
    text: str | None
    token_ids: list[int]


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


class CompletionsHandler:
    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx

    async def create(self, req: CompletionRequest, raw: Request) -> Response:
        arrival = now()
        ctx = self.ctx
        ctx.check_model(req.model)
        engine = ctx.ready_engine()
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, f"best_of={req.best_of} is not supported; heron returns all n samples "
                                f"(omit best_of or set it equal to n)", param="best_of")
        if req.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if req.logprobs is not None and req.logprobs < 0:
            raise APIError(400, f"logprobs must be in [0, 20], got {req.logprobs}", param="logprobs")
        prompts = await self._prompts(req, engine.tokenizer)
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        params_by_len = {}
        params = []
        for p in prompts:
            max_tokens = resolve_max_tokens(engine.max_model_len, len(p.token_ids), requested, name)
            check_prompt_ids(ctx, p.token_ids)
            if max_tokens not in params_by_len:
                params_by_len[max_tokens] = build_sampling_params(
                    ctx, req, max_tokens, req.logprobs, prompt_logprobs=req.logprobs if req.echo else None)
            params.append(params_by_len[max_tokens])
        request_id = random_id("cmpl")
        streams = await submit(ctx, [f"{request_id}-{i}" for i in range(len(prompts))],
                               [p.token_ids for p in prompts], params, arrival, cache_salt=req.cache_salt)
        created = int(time.time())
        model = req.model or ctx.model_name
        if req.stream:
            return StreamingResponse(self._stream(req, request_id, created, model, prompts, streams),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        try:
            finals = await unless_disconnected(raw, collect_final(streams))
        except ClientDisconnected:
            return Response(status_code=499)
        except Exception as e:  # noqa: BLE001
            raise engine_error(e) from None
        response = self._response(req, request_id, created, model, prompts, finals, engine.tokenizer)
        return JSONResponse(response.model_dump())

    # ---- helpers ------------------------------------------------------------------------
    async def _prompts(self, req: CompletionRequest, tokenizer) -> list[Prompt]:
        raw = req.prompt
        if isinstance(raw, str):
            items: list = [raw]
        elif raw and all(isinstance(t, int) for t in raw):
            items = [list(raw)]
        else:
            items = list(raw)
        if not items:
            raise APIError(400, "prompt is empty; give a string, a list of strings, or token ids", param="prompt")
        if len(items) > self.ctx.max_prompts_per_request:
            raise APIError(400, f"at most {self.ctx.max_prompts_per_request} prompts per request, got {len(items)}",
                           param="prompt")
        prompts = []
        for item in items:
            if isinstance(item, str):
                prompts.append(Prompt(item, await tokenize(tokenizer, item, req.add_special_tokens)))
            else:
                prompts.append(Prompt(None, list(item)))
        return prompts

    def _prompt_text(self, prompt: Prompt) -> str:
        if prompt.text is not None:
            return prompt.text
        return self.ctx.ready_engine().tokenizer.decode(prompt.token_ids)

    def _echo_logprobs(self, req: CompletionRequest, prompt: Prompt, out: RequestOutput) -> tuple[CompletionLogprobs, int]:
        tokenizer = self.ctx.ready_engine().tokenizer
        positions = list(out.prompt_logprobs or [])
        positions += [None] * (len(prompt.token_ids) - len(positions))
        return completion_logprobs(prompt.token_ids, positions, req.logprobs or 0, 0, tokenizer)

    def _response(self, req: CompletionRequest, request_id: str, created: int, model: str, prompts: list[Prompt],
                  finals: list[RequestOutput], tokenizer) -> CompletionResponse:
        choices = []
        completion_tokens = 0
        for pi, (prompt, final) in enumerate(zip(prompts, finals)):
            prompt_text = self._prompt_text(prompt) if req.echo else ""
            for c in final.outputs:
                completion_tokens += len(c.token_ids)
                logprobs = None
                if req.logprobs is not None:
                    offset = 0
                    if req.echo:
                        logprobs, offset = self._echo_logprobs(req, prompt, final)
                    part, _ = completion_logprobs(c.token_ids, c.logprobs or [], req.logprobs, offset, tokenizer)
                    logprobs = _concat(logprobs, part)
                choices.append(CompletionChoice(index=pi * req.n + c.index, text=prompt_text + c.text,
                                                logprobs=logprobs, finish_reason=c.finish_reason,
                                                stop_reason=c.stop_reason))
        prompt_tokens = sum(len(p.token_ids) for p in prompts)
        return CompletionResponse(id=request_id, created=created, model=model, choices=choices,
                                  usage=usage_info(prompt_tokens, completion_tokens,
                                                   sum(f.num_cached_tokens for f in finals)))

    async def _stream(self, req: CompletionRequest, request_id: str, created: int, model: str,
                      prompts: list[Prompt], streams) -> AsyncIterator[str]:
        n = req.n
        total = len(prompts) * n
        text_sent, tokens_sent, offsets = [0] * total, [0] * total, [0] * total
        started, done = [False] * total, [False] * total
        num_tokens = [0] * total
        cached = [0] * len(prompts)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        tokenizer = self.ctx.ready_engine().tokenizer
        try:
            async for pi, out in merge_streams(streams):
                cached[pi] = out.num_cached_tokens
                for c in out.outputs:
                    i = pi * n + c.index
                    if done[i]:
                        continue
                    prefix, logprobs = "", None
                    if not started[i]:
                        started[i] = True
                        if req.echo:
                            prefix = self._prompt_text(prompts[pi])
                            if req.logprobs is not None:
                                logprobs, offsets[i] = self._echo_logprobs(req, prompts[pi], out)
                    new_ids = c.token_ids[tokens_sent[i]:]
                    if req.logprobs is not None and new_ids:
                        part, offsets[i] = completion_logprobs(new_ids, (c.logprobs or [])[tokens_sent[i]:],
                                                               req.logprobs, offsets[i], tokenizer)
                        logprobs = _concat(logprobs, part)
                    delta = prefix + c.text[text_sent[i]:]
                    text_sent[i], tokens_sent[i] = len(c.text), len(c.token_ids)
                    num_tokens[i] = len(c.token_ids)
                    if c.finish_reason is not None:
                        done[i] = True
                    if not delta and logprobs is None and c.finish_reason is None:
                        continue  # (text held back: a split character or a possible stop string)
                    chunk = CompletionChunk(id=request_id, created=created, model=model, choices=[CompletionChoice(
                        index=i, text=delta, logprobs=logprobs, finish_reason=c.finish_reason,
                        stop_reason=c.stop_reason)])
                    yield sse(chunk.model_dump_json())
            if include_usage:
                prompt_tokens = sum(len(p.token_ids) for p in prompts)
                usage = usage_info(prompt_tokens, sum(num_tokens), sum(cached))
                yield sse(CompletionChunk(id=request_id, created=created, model=model, choices=[],
                                          usage=usage).model_dump_json())
            yield sse("[DONE]")
        except Exception as e:  # noqa: BLE001 - the status is sent already: report in the stream
            yield sse(json.dumps(engine_error(e).body()))
            yield sse("[DONE]")
        finally:
            for s in streams:
                s.abort()


def _concat(a: CompletionLogprobs | None, b: CompletionLogprobs) -> CompletionLogprobs:
    if a is None:
        return b
    return CompletionLogprobs(text_offset=a.text_offset + b.text_offset, token_logprobs=a.token_logprobs + b.token_logprobs,
                              tokens=a.tokens + b.tokens, top_logprobs=a.top_logprobs + b.top_logprobs)
