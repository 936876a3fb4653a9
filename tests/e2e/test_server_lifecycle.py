"""Start-up, failures and shutdown: /health while loading and after the engine died, an internal
error failing one request with 500 (not the server), and SIGTERM draining requests in flight."""
from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest
import uvicorn

from tests.e2e.server_helpers import TINY_SERVER_ARGS, ServerProcess, byte_token, free_port, greedy_text


# ---------------------------------------------------------------------------- in-process server
class InProcessServer:
    """build_app() served by uvicorn on a thread, with an engine factory the test controls."""

    def __init__(self, factory) -> None:
        from heron.engine.async_engine import AsyncEngine
        from heron.server.api_server import build_app
        from heron.server.metrics import ServerMetrics
        from heron.server.serving_base import ServerContext
        metrics = ServerMetrics("tiny")
        self.engine = AsyncEngine(factory, on_iteration=metrics.on_iteration)
        self.ctx = ServerContext(engine=self.engine, served_model_names=["tiny"], metrics=metrics)
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(build_app(self.ctx), host="127.0.0.1", port=port, log_level="warning",
                                lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> httpx.Client:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        self.client = httpx.Client(base_url=self.base_url, trust_env=False, timeout=30)
        return self.client

    def __exit__(self, *exc) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=30)


def tiny_engine(path):
    from heron.config import EngineConfig
    from heron.engine.engine import Engine
    return Engine(EngineConfig(model=str(path), dtype="float32", kv_cache_memory=0.01, load_progress=False))


def wait_status(c: httpx.Client, path: str, status: int, timeout: float = 30) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while (r := c.get(path)).status_code != status:
        assert time.monotonic() < deadline, f"{path} stayed {r.status_code}: {r.text}"
        time.sleep(0.02)
    return r


BANG = byte_token(ord("!"))


def test_health_is_503_while_loading_then_200(cycle_model):
    release = threading.Event()

    def slow_factory():
        assert release.wait(30)
        return tiny_engine(cycle_model)

    with InProcessServer(slow_factory) as c:
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = c.post("/v1/completions", json={"prompt": "T", "max_tokens": 2})
        assert r.status_code == 503 and "loading" in r.json()["error"]["message"]
        release.set()
        wait_status(c, "/health", 200)
        assert c.post("/v1/completions", json={"prompt": "T", "max_tokens": 2, "temperature": 0}).status_code == 200


def test_model_that_fails_to_load_is_503(cycle_model):
    def broken():
        raise RuntimeError("weights are corrupt")

    with InProcessServer(broken) as c:
        r = wait_status(c, "/health", 503)
        wait_status(c, "/health", 503)
        deadline = time.monotonic() + 10
        while c.get("/health").json()["status"] != "dead":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = c.post("/v1/completions", json={"prompt": "T"})
        assert r.status_code == 500 and "weights are corrupt" in r.json()["error"]["message"]


def test_internal_error_fails_that_request_with_500_only(cycle_model):
    """step() raising (here: whenever a prompt starts with '!') fails the requests in flight with
    500; the server goes on serving, healthy."""
    def factory():
        engine = tiny_engine(cycle_model)
        real_step = engine.step

        def step():
            if any(g.prompt_token_ids[0] == BANG for g in engine.groups.values()):
                raise RuntimeError("boom in the forward pass")
            return real_step()
        engine.step = step
        return engine

    with InProcessServer(factory) as c:
        wait_status(c, "/health", 200)
        r = c.post("/v1/completions", json={"prompt": "!", "max_tokens": 5})
        assert r.status_code == 500
        err = r.json()["error"]
        assert "boom in the forward pass" in err["message"] and err["type"] == "internal_error"
        with c.stream("POST", "/v1/completions", json={"prompt": "!", "max_tokens": 5, "stream": True}) as s:
            assert s.status_code == 200  # the error comes after the headers: in the stream
            events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
        assert "boom" in json.loads(events[0])["error"]["message"] and events[-1] == "[DONE]"
        assert c.get("/health").status_code == 200
        ok = c.post("/v1/completions", json={"prompt": "T", "max_tokens": 9, "temperature": 0})
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "h😀e é"
        m = c.get("/metrics").text
        assert 'heron:num_requests_running{model_name="tiny"} 0.0' in m


def test_engine_loop_death_makes_health_503(cycle_model):
    def factory():
        engine = tiny_engine(cycle_model)

        def step():
            raise RuntimeError("step failed")

        def abort_request(request_id):
            raise RuntimeError("abort failed too: the loop cannot go on")
        engine.step, engine.abort_request = step, abort_request
        return engine

    with InProcessServer(factory) as c:
        wait_status(c, "/health", 200)
        r = c.post("/v1/completions", json={"prompt": "T", "max_tokens": 5})
        assert r.status_code == 500
        r = wait_status(c, "/health", 503)
        assert r.json()["status"] == "dead"
        r = c.post("/v1/completions", json={"prompt": "T", "max_tokens": 5})
        assert r.status_code == 500 and "not running" in r.json()["error"]["message"]


# ---------------------------------------------------------------------------- SIGTERM
def _stream_in_thread(url: str, body: dict, result: dict, first_chunk: threading.Event) -> threading.Thread:
    def run():
        try:
            with httpx.Client(trust_env=False, timeout=60) as c:
                with c.stream("POST", f"{url}/v1/completions", json=body) as r:
                    text, finish, done = "", None, False
                    for line in r.iter_lines():
                        if line == "data: [DONE]":
                            done = True
                        elif line.startswith("data: "):
                            ch = json.loads(line[6:])["choices"][0]
                            text += ch["text"]
                            finish = ch["finish_reason"] or finish
                            first_chunk.set()
                    result.update(text=text, finish=finish, done=done)
        except Exception as e:  # noqa: BLE001
            result["error"] = repr(e)
        first_chunk.set()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_sigterm_drains_requests_in_flight_then_exits_0(cycle_model, tmp_path):
    proc = ServerProcess([str(cycle_model), *TINY_SERVER_ARGS, "--shutdown-timeout", "30"],
                         log_path=tmp_path / "server.log").start()
    try:
        result, first = {}, threading.Event()
        tokens = 2000
        t = _stream_in_thread(proc.base_url, {"prompt": "T", "max_tokens": tokens, "temperature": 0,
                                              "stream": True}, result, first)
        assert first.wait(30)
        proc.signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.HTTPError):  # no new connections (or a 503 while closing)
            r = httpx.post(f"{proc.base_url}/v1/completions", json={"prompt": "T", "max_tokens": 2},
                           timeout=5, trust_env=False)
            r.raise_for_status()
        t.join(timeout=60)
        assert result.get("done"), result
        assert result["text"] == greedy_text("T", tokens).decode("utf-8", errors="replace")
        assert result["finish"] == "length"
        assert proc.proc.wait(timeout=30) == 0
    finally:
        proc.stop()


def test_sigterm_gives_up_after_the_shutdown_timeout(cycle_model, tmp_path):
    proc = ServerProcess([str(cycle_model), *TINY_SERVER_ARGS, "--shutdown-timeout", "1"],
                         log_path=tmp_path / "server.log").start()
    try:
        result, first = {}, threading.Event()
        t = _stream_in_thread(proc.base_url, {"prompt": "T", "max_tokens": 4000, "temperature": 0, "stream": True,
                                              "ignore_eos": True}, result, first)
        assert first.wait(30)
        t0 = time.monotonic()
        proc.signal(signal.SIGTERM)
        assert proc.proc.wait(timeout=30) == 0
        assert time.monotonic() - t0 < 10
        t.join(timeout=30)
        assert not result.get("done")  # cut off
    finally:
        proc.stop()
