"""POST /v1/chat/completions: the model's chat template (or --chat-template, or the request's
`chat_template`) turns the messages into a prompt; the rest is the completion path."""
from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.requests import Request

from heron.engine.chat_templates import fallback_chat_template
from heron.server.protocol import (ChatChoice, ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse,
                                   ChatMessage, ChatResponseMessage, ChatStreamChoice, DeltaMessage, usage_info)
from heron.server.serving_base import (APIError, ClientDisconnected, ServerContext, build_sampling_params,
                                      chat_logprobs, check_prompt_ids, collect_final, engine_error, merge_streams,
                                      now, random_id, resolve_max_tokens, submit, tokenize, unless_disconnected)
from heron.server.serving_completions import SSE_HEADERS, sse

_MAX_TOP_LOGPROBS = 20


def message_dicts(messages: list[ChatMessage]) -> list[dict]:
    """Messages as the template expects them: content flattened to a string (text parts only)."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise APIError(400, f"messages[{i}].content: only text parts are supported, got a part of type "
                                        f"{part.get('type')!r}", param="messages")
                texts.append(part["text"])
            content = "\n".join(texts)
        d = {"role": m.role, "content": content if content is not None else ""}
        if m.name is not None:
            d["name"] = m.name
        out.append(d)
    return out


def resolve_chat_template(ctx: ServerContext, engine, request_template: str | None) -> str:
    template = (request_template or ctx.chat_template or getattr(engine.tokenizer, "chat_template", None)
                or fallback_chat_template(getattr(engine.hf_config, "model_type", None)))
    if not template:
        raise APIError(400, "this model has no chat template: start the server with --chat-template FILE "
                            "(a Jinja template), pass `chat_template` in the request, or use /v1/completions",
                       param="messages", code="no_chat_template")
    return template


def render_chat(ctx: ServerContext, engine, messages: list[ChatMessage], request_template: str | None,
                add_generation_prompt: bool, continue_final_message: bool = False,
                template_kwargs: dict | None = None) -> str:
    if not messages:
        raise APIError(400, "messages must hold at least one message", param="messages")
    template = resolve_chat_template(ctx, engine, request_template)
    kwargs = dict(template_kwargs or {})
    if continue_final_message:
        kwargs["continue_final_message"] = True
        add_generation_prompt = False
    try:
        text = engine.tokenizer.apply_chat_template(message_dicts(messages), chat_template=template, tokenize=False,
                                                    add_generation_prompt=add_generation_prompt, **kwargs)
    except APIError:
        raise
    except Exception as e:  # noqa: BLE001 - template errors (e.g. roles must alternate) are the client's
        raise APIError(400, f"could not apply the chat template: {type(e).__name__}: {e}", param="messages") from None
    if not isinstance(text, str):
        raise APIError(500, "the chat template did not render to a string")
    return text


class ChatHandler:
    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx

    async def create(self, req: ChatCompletionRequest, raw: Request) -> Response:
        arrival = now()
        ctx = self.ctx
        ctx.check_model(req.model)
        engine = ctx.ready_engine()
        if req.tools and req.tool_choice != "none":
            raise APIError(400, "tool calling is not supported by this server", param="tools")
        if req.response_format and req.response_format.get("type") not in (None, "text"):
            raise APIError(400, f"response_format {req.response_format.get('type')!r} is not supported; only "
                                f"'text'", param="response_format")
        top = req.top_logprobs
        if top is not None and not 0 <= top <= _MAX_TOP_LOGPROBS:
            raise APIError(400, f"top_logprobs must be in [0, {_MAX_TOP_LOGPROBS}], got {top}", param="top_logprobs")
        if top and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        text = render_chat(ctx, engine, req.messages, req.chat_template, req.add_generation_prompt,
                           req.continue_final_message, req.chat_template_kwargs)
        token_ids = await tokenize(engine.tokenizer, text, req.add_special_tokens)
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = resolve_max_tokens(engine.max_model_len, len(token_ids), requested, name)
        check_prompt_ids(ctx, token_ids)
        num_top = (top or 0) if req.logprobs else None
        params = build_sampling_params(ctx, req, max_tokens, num_top)
        request_id = random_id("chatcmpl")
        streams = await submit(ctx, [request_id], [token_ids], [params], arrival, cache_salt=req.cache_salt)
        created = int(time.time())
        model = req.model or ctx.model_name
        if req.stream:
            return StreamingResponse(self._stream(req, request_id, created, model, len(token_ids), streams, num_top),
                                     media_type="text/event-stream", headers=SSE_HEADERS)
        try:
            (final,) = await unless_disconnected(raw, collect_final(streams))
        except ClientDisconnected:
            return Response(status_code=499)
        except Exception as e:  # noqa: BLE001
            raise engine_error(e) from None
        choices = []
        completion_tokens = 0
        for c in final.outputs:
            completion_tokens += len(c.token_ids)
            logprobs = chat_logprobs(c.token_ids, c.logprobs or [], num_top) if num_top is not None else None
            choices.append(ChatChoice(index=c.index, message=ChatResponseMessage(content=c.text), logprobs=logprobs,
                                      finish_reason=c.finish_reason, stop_reason=c.stop_reason))
        usage = usage_info(len(token_ids), completion_tokens, final.num_cached_tokens)
        response = ChatCompletionResponse(id=request_id, created=created, model=model, choices=choices, usage=usage)
        return JSONResponse(response.model_dump())

    async def _stream(self, req: ChatCompletionRequest, request_id: str, created: int, model: str,
                      num_prompt_tokens: int, streams, num_top: int | None) -> AsyncIterator[str]:
        n = req.n
        text_sent, tokens_sent, num_tokens = [0] * n, [0] * n, [0] * n
        done = [False] * n
        cached = 0
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choice: ChatStreamChoice) -> str:
            return sse(ChatCompletionChunk(id=request_id, created=created, model=model,
                                           choices=[choice]).model_dump_json())
        try:
            for i in range(n):
                yield chunk(ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content="")))
            async for _, out in merge_streams(streams):
                cached = out.num_cached_tokens
                for c in out.outputs:
                    i = c.index
                    if done[i]:
                        continue
                    new_ids = c.token_ids[tokens_sent[i]:]
                    logprobs = None
                    if num_top is not None and new_ids:
                        logprobs = chat_logprobs(new_ids, (c.logprobs or [])[tokens_sent[i]:], num_top)
                    delta = c.text[text_sent[i]:]
                    text_sent[i], tokens_sent[i] = len(c.text), len(c.token_ids)
                    num_tokens[i] = len(c.token_ids)
                    if c.finish_reason is not None:
                        done[i] = True
                    if not delta and logprobs is None and c.finish_reason is None:
                        continue
                    yield chunk(ChatStreamChoice(index=i, delta=DeltaMessage(content=delta if delta else None),
                                                 logprobs=logprobs, finish_reason=c.finish_reason,
                                                 stop_reason=c.stop_reason))
            if include_usage:
                usage = usage_info(num_prompt_tokens, sum(num_tokens), cached)
                yield sse(ChatCompletionChunk(id=request_id, created=created, model=model, choices=[],
                                              usage=usage).model_dump_json())
            yield sse("[DONE]")
        except Exception as e:  # noqa: BLE001
            yield sse(json.dumps(engine_error(e).body()))
            yield sse("[DONE]")
        finally:
            for s in streams:
                s.abort()
