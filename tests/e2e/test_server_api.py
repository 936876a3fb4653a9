"""The OpenAI API of `heron serve`, through the official `openai` client and raw HTTP, on the tiny
cycle model (greedy output is known exactly: see server_helpers)."""
from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import SERVED_NAME
from tests.e2e.server_helpers import CHAT_TEMPLATE, CYCLE_TEXT, byte_token, greedy_text

GREEDY = dict(model=SERVED_NAME, temperature=0.0)
TEMPLATE = {"chat_template": CHAT_TEMPLATE}
MESSAGES = [{"role": "user", "content": "hi"}]


def greedy(n: int, after: str = "T") -> str:
    return greedy_text(after, n).decode("utf-8", errors="replace")


def stream_completion(client, **kw) -> tuple[list[str], list]:
    chunks = list(client.completions.create(stream=True, **kw))
    return [c.choices[0].text for c in chunks if c.choices], chunks


# ---------------------------------------------------------------------------- completions
def test_completion_greedy_text_and_usage(client):
    out = client.completions.create(prompt="T", max_tokens=9, **GREEDY)
    assert out.object == "text_completion" and out.model == SERVED_NAME and out.id.startswith("cmpl-")
    assert out.choices[0].text == "h😀e é" == greedy(9)
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (1, 9, 10)


def test_stream_equals_non_stream_with_split_characters(client):
    """😀 is 4 byte tokens and 中 3: the stream holds partial characters back, never sends U+FFFD,
    and the chunks add up to the non-streaming text."""
    full = client.completions.create(prompt="T", max_tokens=44, **GREEDY).choices[0].text
    assert full == greedy(44) and "\ufffd" not in full
    texts, chunks = stream_completion(client, prompt="T", max_tokens=44, **GREEDY)
    assert "".join(texts) == full
    assert all("\ufffd" not in t for t in texts)
    assert any("😀" in t for t in texts) and any("中" in t for t in texts)
    assert len([t for t in texts if t]) < 44  # bytes of one character were sent together
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stream_equals_non_stream_for_seeded_sampling(client):
    kw = dict(model=SERVED_NAME, prompt="T", max_tokens=48, temperature=1.0, seed=1234)
    full = client.completions.create(**kw).choices[0].text
    texts, _ = stream_completion(client, **kw)
    assert "".join(texts) == full


def test_stream_usage_and_done(http):
    body = {"model": SERVED_NAME, "prompt": "T", "max_tokens": 7, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    usage = payloads[-1]["usage"]
    assert payloads[-1]["choices"] == []
    assert usage == {"prompt_tokens": 1, "completion_tokens": 7, "total_tokens": 8,
                     "prompt_tokens_details": {"cached_tokens": 0}}
    assert all(p["usage"] is None for p in payloads[:-1])


def test_n2_seeded_samples(client):
    kw = dict(model=SERVED_NAME, prompt="T", max_tokens=24, temperature=1.0, seed=5, n=2)
    out = client.completions.create(**kw)
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert out.usage.completion_tokens == 48
    assert out.choices[0].text != out.choices[1].text  # sample i uses seed + i
    again = client.completions.create(**kw)
    assert [c.text for c in again.choices] == [c.text for c in out.choices]
    texts = {0: "", 1: ""}
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == {c.index: c.text for c in out.choices}


def test_seed_reproducibility(client):
    kw = dict(model=SERVED_NAME, prompt="T", max_tokens=40, temperature=1.0)
    a = client.completions.create(seed=7, **kw).choices[0].text
    b = client.completions.create(seed=7, **kw).choices[0].text
    c = client.completions.create(seed=8, **kw).choices[0].text
    assert a == b
    assert a != c


def test_completion_logprobs(client):
    out = client.completions.create(prompt="T", max_tokens=6, logprobs=2, **GREEDY)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    assert lp.tokens[0] == "h" and lp.text_offset[0] == 0
    assert all(x <= 0.0 for x in lp.token_logprobs)
    for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        # (tokens are keyed by their text, so byte tokens that all read "\ufffd" share one entry)
        assert 1 <= len(top) <= 3 and top[token] == pytest.approx(chosen, abs=1e-4)
        assert max(top.values()) == pytest.approx(chosen, abs=1e-4)  # greedy: the chosen token ranks first
    assert len(lp.top_logprobs[0]) == 2


def test_echo_with_token_id_prompt(client):
    out = client.completions.create(prompt=[byte_token(ord("T"))], max_tokens=5, echo=True, logprobs=1, **GREEDY)
    choice = out.choices[0]
    assert choice.text == "T" + greedy(5) == "Th😀"
    assert len(choice.logprobs.tokens) == 6 and choice.logprobs.token_logprobs[0] is None
    assert out.usage.prompt_tokens == 1 and out.usage.completion_tokens == 5


def test_batch_of_prompts(client):
    out = client.completions.create(prompt=["T", "!"], max_tokens=3, **GREEDY)
    by_index = {c.index: c.text for c in out.choices}
    assert by_index == {0: greedy(3, "T"), 1: greedy(3, "!")}
    assert out.usage.prompt_tokens == 2 and out.usage.completion_tokens == 6


def test_stop_strings(client):
    out = client.completions.create(prompt="T", max_tokens=50, stop=["中", "zz"], **GREEDY)
    choice = out.choices[0]
    assert choice.text == "h😀e é" and choice.finish_reason == "stop"
    assert choice.model_extra.get("stop_reason") == "中"
    assert out.usage.completion_tokens == len("h😀e é中".encode())  # the stop string's tokens were generated
    texts, chunks = stream_completion(client, prompt="T", max_tokens=50, stop=["中"], **GREEDY)
    assert "".join(texts) == "h😀e é" and chunks[-1].choices[0].finish_reason == "stop"


def test_stop_token_ids(client):
    stop_id = byte_token(ord("e"))
    out = client.completions.create(prompt="T", max_tokens=50, extra_body={"stop_token_ids": [stop_id]}, **GREEDY)
    assert out.choices[0].text == "h😀" and out.choices[0].finish_reason == "stop"
    assert out.choices[0].model_extra.get("stop_reason") == stop_id


def test_sampling_options_are_applied(client):
    z = byte_token(ord("Z"))
    out = client.completions.create(prompt="T", max_tokens=4, logit_bias={str(z): 100}, user="u1", **GREEDY)
    assert out.choices[0].text == "ZZZZ"
    out = client.completions.create(
        prompt="T", max_tokens=8, top_p=0.9, presence_penalty=0.5, frequency_penalty=0.5, seed=1, temperature=0.7,
        model=SERVED_NAME, extra_body={"top_k": 5, "min_p": 0.01, "repetition_penalty": 1.1, "min_tokens": 8,
                                       "ignore_eos": True})
    assert out.usage.completion_tokens == 8
    out = client.completions.create(prompt="T", extra_body={"max_completion_tokens": 3}, **GREEDY)
    assert out.usage.completion_tokens == 3


# ---------------------------------------------------------------------------- chat
def test_chat_with_request_template(client):
    out = client.chat.completions.create(model=SERVED_NAME, messages=MESSAGES, max_tokens=9, temperature=0,
                                         extra_body=TEMPLATE)
    # the template ends the prompt with "T", so the reply continues the cycle from there
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == greedy(9)
    n_prompt = len("user: hi\nT".encode())
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (n_prompt, 9)


def test_chat_stream_equals_non_stream(client):
    kw = dict(model=SERVED_NAME, messages=MESSAGES, max_completion_tokens=30, temperature=1.0, seed=3,
              extra_body=TEMPLATE)
    full = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    assert chunks[-1].usage.completion_tokens == 30 and chunks[-1].choices == []
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]


def test_chat_n2_and_logprobs(client):
    out = client.chat.completions.create(model=SERVED_NAME, messages=MESSAGES, max_tokens=5, temperature=0, n=2,
                                         logprobs=True, top_logprobs=2, extra_body=TEMPLATE)
    assert [c.index for c in out.choices] == [0, 1]
    for c in out.choices:
        assert c.message.content == greedy(5)
        content = c.logprobs.content
        assert len(content) == 5 and content[0].token == "h" and content[0].bytes == [ord("h")]
        assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-4)
                   for t in content)
    assert out.usage.completion_tokens == 10


def test_chat_stop_and_seed(client):
    out = client.chat.completions.create(model=SERVED_NAME, messages=MESSAGES, max_tokens=40, temperature=0,
                                         stop="é", extra_body=TEMPLATE)
    assert out.choices[0].message.content == "h😀e " and out.choices[0].finish_reason == "stop"
    kw = dict(model=SERVED_NAME, messages=MESSAGES, max_tokens=30, temperature=1.0, extra_body=TEMPLATE)
    assert (client.chat.completions.create(seed=11, **kw).choices[0].message.content
            == client.chat.completions.create(seed=11, **kw).choices[0].message.content)


def test_chat_content_parts(client):
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    out = client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=2, temperature=0,
                                         extra_body=TEMPLATE)
    assert out.usage.prompt_tokens == len("user: hi\nT".encode())


# ---------------------------------------------------------------------------- other routes
def test_models_health_version(client, http):
    models = client.models.list()
    assert [m.id for m in models.data] == [SERVED_NAME]
    assert models.data[0].model_extra["max_model_len"] == 4096
    assert http.get("/health").status_code == 200
    assert http.get("/version").json()["version"]


def test_tokenize_detokenize(http):
    r = http.post("/tokenize", json={"prompt": "Th😀"})
    assert r.status_code == 200
    tokens = r.json()["tokens"]
    assert tokens == [byte_token(b) for b in "Th😀".encode()] and r.json()["count"] == 6
    assert r.json()["max_model_len"] == 4096
    assert http.post("/detokenize", json={"tokens": tokens}).json() == {"prompt": "Th😀"}
    r = http.post("/tokenize", json={"messages": MESSAGES, "chat_template": CHAT_TEMPLATE})
    assert r.json()["count"] == len("user: hi\nT".encode())


def test_metrics_exposition(server, client):
    client.completions.create(prompt="T", max_tokens=3, **GREEDY)
    m = server.metrics()
    for name in ("heron:num_requests_running", "heron:num_requests_waiting", "heron:num_requests_preempted",
                 "heron:kv_cache_usage_perc", "heron:kv_cache_used_blocks", "heron:prompt_tokens_total",
                 "heron:generation_tokens_total", "heron:time_to_first_token_seconds_count",
                 "heron:time_per_output_token_seconds_count", "heron:e2e_request_latency_seconds_count",
                 "heron:request_queue_time_seconds_count", "heron:num_preemptions_total"):
        assert name in m, name
    assert m["heron:generation_tokens_total"] >= 3 and m["heron:e2e_request_latency_seconds_count"] >= 1


def test_prefix_cache_hits_in_usage_and_metrics(server, client):
    prompt = [1] + [3 + (7 * i + 100) % 256 for i in range(39)]   # 40 tokens no other test sends
    before = server.metrics()
    first = client.completions.create(prompt=prompt, max_tokens=2, **GREEDY)
    second = client.completions.create(prompt=prompt, max_tokens=2, **GREEDY)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == 32   # 2 full blocks of 16; the rest is computed
    assert second.choices[0].text == first.choices[0].text
    m = server.metrics()
    assert m["heron:prefix_cache_queries_total"] - before.get("heron:prefix_cache_queries_total", 0) == 80
    assert m["heron:prefix_cache_hits_total"] - before.get("heron:prefix_cache_hits_total", 0) == 32
    # a cache salt keeps tenants apart: the same prompt under another salt computes everything
    salted = [client.completions.create(prompt=prompt, max_tokens=2, extra_body={"cache_salt": salt}, **GREEDY)
              for salt in ("tenant-a", "tenant-a", "tenant-b")]
    assert [r.usage.prompt_tokens_details.cached_tokens for r in salted] == [0, 32, 0]
    assert all(r.choices[0].text == first.choices[0].text for r in salted)
    # streamed chat reports it too (this prompt is shorter than one block: nothing to reuse)
    chunks = list(client.chat.completions.create(messages=MESSAGES, max_tokens=2, stream=True,
                                                 stream_options={"include_usage": True}, extra_body=TEMPLATE,
                                                 **GREEDY))
    usage = chunks[-1].usage
    assert usage.prompt_tokens < 16 and usage.prompt_tokens_details.cached_tokens == 0


def test_cycle_text_is_what_the_tests_assume():
    assert greedy(len(CYCLE_TEXT.encode())) == "h😀e é中!\nT"
