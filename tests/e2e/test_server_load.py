"""Many concurrent streams, clients that hang up (streaming or not): the others complete exactly,
the abandoned requests are aborted promptly, and running requests and KV blocks return to zero."""
from __future__ import annotations

import asyncio
import json
import time

import httpx

from tests.e2e.conftest import SERVED_NAME
from tests.e2e.server_helpers import greedy_text

LONG = 3500  # tokens a hung-up request would have generated: many seconds, if it were not aborted


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.02)


def idle(server) -> bool:
    m = server.metrics()
    return (m["heron:num_requests_running"] == 0 and m["heron:num_requests_waiting"] == 0
            and m["heron:kv_cache_used_blocks"] == 0)


async def _client(base_url: str, i: int, hang_up: bool) -> tuple[int, str, str | None]:
    body = {"model": SERVED_NAME, "prompt": "T", "temperature": 0, "stream": True,
            "max_tokens": LONG if hang_up else 120}
    text, finish = "", None
    async with httpx.AsyncClient(base_url=base_url, trust_env=False, timeout=120) as c:
        async with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            chunks = 0
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choice = json.loads(line[6:])["choices"][0]
                text += choice["text"]
                finish = choice["finish_reason"] or finish
                chunks += 1
                if hang_up and chunks == 5 + i % 7:
                    break  # leaving the block closes the connection mid-stream
    return i, text, finish


def test_32_streams_a_third_hang_up(server):
    wait_for(lambda: idle(server), 30, "an idle server")
    aborts_before = _aborts(server)

    async def main():
        return await asyncio.gather(*(_client(server.base_url, i, hang_up=i % 3 == 0) for i in range(32)))

    t0 = time.monotonic()
    results = asyncio.run(asyncio.wait_for(main(), 120))
    expected = greedy_text("T", 120).decode()
    for i, text, finish in results:
        if i % 3 == 0:
            assert expected.startswith(text[:20])
        else:
            assert (text, finish) == (expected, "length"), i
    # the 11 hung-up requests asked for 3500 tokens each: they are gone long before that
    wait_for(lambda: idle(server), 10, "running requests and KV blocks back to zero")
    assert _aborts(server) - aborts_before == 11
    assert time.monotonic() - t0 < 60


def test_non_streaming_client_that_hangs_up_is_aborted(server):
    wait_for(lambda: idle(server), 30, "an idle server")
    aborts_before = _aborts(server)
    body = {"model": SERVED_NAME, "prompt": "T", "temperature": 0, "max_tokens": LONG}
    with httpx.Client(base_url=server.base_url, trust_env=False) as c:
        try:
            c.post("/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
            raise AssertionError("the request should still be running")
        except httpx.ReadTimeout:
            pass  # the client gives up and closes the connection
    t_gone = time.monotonic()
    wait_for(lambda: _aborts(server) - aborts_before == 1, 5, "the abort")
    wait_for(lambda: idle(server), 5, "running requests and KV blocks back to zero")
    assert time.monotonic() - t_gone < 5


def test_client_hangs_up_while_queued(server):
    """Requests that never got to run (waiting) are dropped too."""
    wait_for(lambda: idle(server), 30, "an idle server")

    async def main():
        async with httpx.AsyncClient(base_url=server.base_url, trust_env=False, timeout=60) as c:
            body = {"model": SERVED_NAME, "prompt": "T", "temperature": 0, "max_tokens": 50, "n": 60}
            tasks = [asyncio.create_task(c.post("/v1/completions", json=body)) for _ in range(3)]
            await asyncio.sleep(0.3)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
    wait_for(lambda: idle(server), 10, "running requests and KV blocks back to zero")


def _aborts(server) -> float:
    text = httpx.get(f"{server.base_url}/metrics", trust_env=False).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("heron:request_success_total") and 'finished_reason="abort"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total
