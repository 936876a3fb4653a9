"""Every error case of the server returns OpenAI's error JSON with the right status and a message
a user can act on; bad requests never disturb the others."""
from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from tests.e2e.conftest import SERVED_NAME
from tests.e2e.server_helpers import CHAT_TEMPLATE, TINY_SERVER_ARGS, ServerProcess, byte_token, greedy_text

API_KEY = "sk-test-123"


def assert_error(r: httpx.Response, status: int, *needles: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    for needle in needles:
        assert needle in err["message"], err["message"]
    return err


def completion(http: httpx.Client, **body) -> httpx.Response:
    return http.post("/v1/completions", json={"model": SERVED_NAME, "prompt": "T", **body})


# ---------------------------------------------------------------------------- 400
@pytest.mark.parametrize("body, needle", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n must be"),
    ({"n": 1000}, "n must be"),
    ({"logprobs": 21}, "logprobs"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"presence_penalty": 5}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"logit_bias": {"100000": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 500}}, "logit_bias"),
    ({"stop": [""]}, "stop"),
    ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, 99999]}, "token ids"),
    ({"best_of": 3}, "best_of"),
    ({"seed": 2**70}, "seed"),
    ({"temperature": "hot"}, "temperature"),
    ({"prompt": None}, "prompt"),
    ({"cache_salt": ""}, "cache_salt"),
])
def test_invalid_parameters_are_400(http, body, needle):
    err = assert_error(completion(http, **body), 400, needle)
    assert err["type"] == "invalid_request_error"


def test_chat_invalid_parameters_are_400(http):
    def chat(**body):
        return http.post("/v1/chat/completions", json={"model": SERVED_NAME, "chat_template": CHAT_TEMPLATE,
                                                       "messages": [{"role": "user", "content": "hi"}], **body})
    assert_error(chat(top_logprobs=3), 400, "logprobs")
    assert_error(chat(logprobs=True, top_logprobs=50), 400, "top_logprobs")
    assert_error(chat(messages=[]), 400, "messages")
    assert_error(chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]), 400, "text")
    assert_error(chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tool")
    assert_error(chat(chat_template="{{ raise_exception('roles must alternate') }}"), 400, "roles must alternate")


def test_prompt_plus_max_tokens_beyond_the_model_length(http):
    prompt = [byte_token(ord("a"))] * 100
    err = assert_error(completion(http, prompt=prompt, max_tokens=4000), 400, "4096", "100", "4000", "4100")
    assert err["code"] == "context_length_exceeded" and err["param"] == "max_tokens"
    assert_error(completion(http, prompt=[byte_token(ord("a"))] * 4096, max_tokens=1), 400, "4096", "prompt")
    r = http.post("/v1/chat/completions", json={"model": SERVED_NAME, "chat_template": CHAT_TEMPLATE,
                                                "messages": [{"role": "user", "content": "x" * 5000}]})
    assert_error(r, 400, "4096")
    assert completion(http, prompt=prompt, max_tokens=3996).status_code == 200  # exactly the limit is fine


def test_no_chat_template_is_a_clear_400(http):
    r = http.post("/v1/chat/completions", json={"model": SERVED_NAME, "messages": [{"role": "user", "content": "hi"}]})
    assert_error(r, 400, "chat template", "--chat-template")


# ---------------------------------------------------------------------------- 404 / malformed
def test_unknown_model_is_404(http, client):
    err = assert_error(completion(http, model="gpt-17"), 404, "gpt-17")
    assert err["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert_error(http.get("/v1/nothing-here"), 404, "/v1/nothing-here")


@pytest.mark.parametrize("content", [b'{"prompt": "T", "max_tokens": ', b"not json at all", b"[1, 2, 3]", b""])
def test_malformed_json_is_400(http, content):
    r = http.post("/v1/completions", content=content, headers={"Content-Type": "application/json"})
    assert_error(r, 400, "invalid request")


def test_missing_required_field_is_400(http):
    assert_error(http.post("/v1/completions", json={"model": SERVED_NAME}), 400, "prompt")
    assert_error(http.post("/v1/chat/completions", json={"model": SERVED_NAME}), 400, "messages")


def test_openai_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=SERVED_NAME, prompt="T", temperature=-2)
    assert "temperature" in str(e.value)


# ---------------------------------------------------------------------------- isolation
def test_bad_requests_do_not_disturb_a_running_stream(server, http):
    """A stream runs while malformed, invalid and oversized requests hit the server."""
    result = {}

    def run_stream():
        with httpx.Client(base_url=server.base_url, trust_env=False, timeout=60) as c:
            body = {"model": SERVED_NAME, "prompt": "T", "max_tokens": 600, "temperature": 0, "stream": True}
            with c.stream("POST", "/v1/completions", json=body) as r:
                text = ""
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        text += "".join(ch["text"] for ch in json.loads(line[6:])["choices"])
                result["text"] = text

    t = threading.Thread(target=run_stream)
    t.start()
    assert_error(completion(http, prompt="many words " * 100_000), 400, "4096")  # tokenized off the event loop
    for _ in range(5):
        http.post("/v1/completions", content=b"{{{", headers={"Content-Type": "application/json"})
        completion(http, temperature=-5)
        completion(http, prompt=[byte_token(0)] * 5000)
        completion(http, model="unknown")
        http.post("/v1/completions", content=b"x" * 100, headers={"Content-Type": "text/plain"})
    t.join(timeout=60)
    assert result["text"] == greedy_text("T", 600).decode("utf-8", errors="replace")
    assert completion(http, max_tokens=2, temperature=0).json()["choices"][0]["text"] == "h\ufffd"


# ---------------------------------------------------------------------------- a second server
@pytest.fixture(scope="module")
def strict_server(cycle_model, tmp_path_factory):
    """--api-key, --chat-template FILE, one running sequence, one waiting, 1 MiB bodies."""
    d = tmp_path_factory.mktemp("strict")
    template = d / "template.jinja"
    template.write_text(CHAT_TEMPLATE)
    proc = ServerProcess([str(cycle_model), *TINY_SERVER_ARGS, "--served-model-name", "strict", "--chat-template",
                          str(template), "--max-num-seqs", "1", "--max-queued-requests", "1",
                          "--max-request-body-mib", "1"], api_key=API_KEY, log_path=d / "server.log")
    try:
        yield proc.start()
    finally:
        proc.stop()


def test_api_key_required_except_health(strict_server):
    url = strict_server.base_url
    with httpx.Client(base_url=url, trust_env=False, timeout=30) as c:
        assert c.get("/health").status_code == 200
        for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                             ("GET", "/metrics"), ("POST", "/tokenize"), ("GET", "/version")]:
            assert_error(c.request(method, path, json={}), 401, "API key")
            assert_error(c.request(method, path, json={}, headers={"Authorization": "Bearer wrong"}), 401)
        ok = c.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
        assert ok.status_code == 200 and ok.json()["data"][0]["id"] == "strict"
    bad = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0,
                        http_client=httpx.Client(trust_env=False))
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_chat_template_file(strict_server):
    c = openai.OpenAI(base_url=f"{strict_server.base_url}/v1", api_key=API_KEY, max_retries=0,
                      http_client=httpx.Client(trust_env=False))
    out = c.chat.completions.create(model="strict", messages=[{"role": "user", "content": "hi"}], max_tokens=9,
                                    temperature=0)
    assert out.choices[0].message.content == "h😀e é"


def test_oversized_body_is_413(strict_server):
    headers = strict_server.headers()
    with httpx.Client(base_url=strict_server.base_url, trust_env=False, timeout=30, headers=headers) as c:
        big = json.dumps({"model": "strict", "prompt": "a" * (2 * 2**20)}).encode()
        assert_error(c.post("/v1/completions", content=big, headers={"Content-Type": "application/json"}), 413,
                     "limit")

        def chunks():  # no Content-Length: the limit applies while the body streams in
            for _ in range(40):
                yield b" " * 65536
        r = c.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
        assert_error(r, 413, "limit")
        assert c.get("/health").status_code == 200


def test_full_queue_is_429(strict_server):
    """One sequence may run and one wait: a third request is refused with 429."""
    base = dict(model="strict", prompt="T", max_tokens=4000, temperature=0, stream=True, ignore_eos=True)
    headers = strict_server.headers()
    with httpx.Client(base_url=strict_server.base_url, trust_env=False, timeout=60, headers=headers) as c:
        with c.stream("POST", "/v1/completions", json=base) as running:
            assert running.status_code == 200
            lines = running.iter_lines()
            next(line for line in lines if line.startswith("data: "))  # it is running now
            with c.stream("POST", "/v1/completions", json=base) as waiting:
                assert waiting.status_code == 200
                r = c.post("/v1/completions", json=dict(base, stream=False))
                err = assert_error(r, 429, "queue")
                assert err["type"] == "rate_limit_error"
        # both streams were closed: their requests are aborted and the server takes new ones
        deadline = time.monotonic() + 10
        while (ok := c.post("/v1/completions", json=dict(base, stream=False, max_tokens=3))).status_code == 429:
            assert time.monotonic() < deadline, "the aborted requests still occupy the queue"
            time.sleep(0.05)
        assert ok.status_code == 200
