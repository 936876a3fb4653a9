"""AsyncEngine on a fake Engine: one thread owns the engine, outputs reach per-request streams,
errors reach the right requests, aborts free them, and an idle engine blocks instead of spinning."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from heron.engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError, RequestError
from heron.outputs import CompletionOutput, RequestMetrics, RequestOutput
from heron.sampling_params import SamplingParams


class FakeScheduler:
    def __init__(self):
        self.waiting = []


class FakeEngine:
    """Each step appends one token to every request; a request finishes at max_tokens."""

    def __init__(self, fail_on: int | None = None):
        self.groups: dict[str, list] = {}
        self.limits: dict[str, int] = {}
        self.scheduler = FakeScheduler()
        self.num_steps = 0
        self.threads: set[str] = set()
        self.fail_on = fail_on
        self.aborted: list[str] = []
        self.shut_down = False

    def shutdown(self):
        self.shut_down = True

    def add_request(self, request_id, prompt, params, arrival_time=None):
        self.threads.add(threading.current_thread().name)
        if not prompt:
            raise ValueError("prompt is empty")
        self.groups[request_id] = []
        self.limits[request_id] = params.max_tokens
        return request_id

    def abort_request(self, request_id):
        self.threads.add(threading.current_thread().name)
        if self.groups.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    def has_unfinished_requests(self):
        return bool(self.groups)

    def step(self):
        self.threads.add(threading.current_thread().name)
        self.num_steps += 1
        time.sleep(0.001)
        outs = []
        for rid, tokens in list(self.groups.items()):
            if self.fail_on is not None and tokens and tokens[0] == self.fail_on:
                raise RuntimeError("kaboom")
            tokens.append(len(tokens) if rid != "bad" else self.fail_on)
            done = len(tokens) >= self.limits[rid]
            outs.append(RequestOutput(rid, None, [1], [CompletionOutput(0, " x" * len(tokens), list(tokens),
                                                                        finish_reason="length" if done else None)],
                                      finished=done, metrics=RequestMetrics(arrival_time=0.0)))
            if done:
                del self.groups[rid]
        return outs


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


async def started(engine: FakeEngine, **kw) -> AsyncEngine:
    ae = AsyncEngine(lambda: engine, **kw)
    ae.start()
    await ae.wait_ready(10)
    return ae


def test_outputs_reach_their_streams_and_only_the_engine_thread_touches_the_engine():
    fake = FakeEngine()

    async def main():
        ae = await started(fake)
        streams = [await ae.add_request(f"r{i}", [1, 2], SamplingParams(max_tokens=3 + i)) for i in range(4)]

        async def drain(s):
            outs = [o async for o in s]
            return outs[-1]
        finals = await asyncio.gather(*(drain(s) for s in streams))
        await ae.shutdown()
        return finals

    finals = run(main())
    assert [len(f.outputs[0].token_ids) for f in finals] == [3, 4, 5, 6]
    assert all(f.finished for f in finals)
    assert fake.threads == {"heron-engine"}


def test_invalid_request_fails_alone_and_full_queue_is_refused():
    fake = FakeEngine()

    async def main():
        ae = await started(fake, max_queued_requests=1)
        with pytest.raises(ValueError, match="empty"):
            await ae.add_request("bad", [], SamplingParams())
        fake.scheduler.waiting = ["someone"]
        with pytest.raises(QueueFullError):
            await ae.add_request("r", [1], SamplingParams())
        fake.scheduler.waiting = []
        s = await ae.add_request("ok", [1], SamplingParams(max_tokens=2))
        final = [o async for o in s][-1]
        await ae.shutdown()
        return final

    assert run(main()).finished


def test_step_error_fails_requests_in_flight_and_the_loop_goes_on():
    fake = FakeEngine(fail_on=99)

    async def main():
        ae = await started(fake)
        bad = await ae.add_request("bad", [1], SamplingParams(max_tokens=50))
        with pytest.raises(RequestError, match="kaboom"):
            async for _ in bad:
                pass
        ok = await ae.add_request("ok", [1], SamplingParams(max_tokens=3))
        final = [o async for o in ok][-1]
        assert ae.state == "ready" and ae.num_step_failures == 1
        await ae.shutdown()
        return final

    assert run(main()).finished
    assert "bad" in fake.aborted


def test_abort_frees_the_request_before_the_next_step():
    fake = FakeEngine()

    async def main():
        ae = await started(fake)
        s = await ae.add_request("long", [1], SamplingParams(max_tokens=10_000))
        await anext(s)
        s.abort()
        for _ in range(200):
            if "long" in fake.aborted:
                break
            await asyncio.sleep(0.005)
        steps = fake.num_steps
        await asyncio.sleep(0.05)
        assert fake.num_steps == steps  # idle: nothing left to step, and no spinning
        await ae.shutdown()

    run(main())
    assert fake.aborted == ["long"] and not fake.groups


def test_slow_consumer_gets_the_newest_output():
    fake = FakeEngine()

    async def main():
        ae = await started(fake)
        s = await ae.add_request("r", [1], SamplingParams(max_tokens=30))
        await asyncio.sleep(0.3)  # the engine finishes meanwhile
        outs = [o async for o in s]
        await ae.shutdown()
        return outs

    outs = run(main())
    assert len(outs) == 1 and outs[0].finished and len(outs[0].outputs[0].token_ids) == 30


def test_load_failure_and_shutdown_states():
    def broken():
        raise OSError("no weights")

    async def main():
        ae = AsyncEngine(broken)
        ae.start()
        with pytest.raises(EngineDeadError, match="no weights"):
            await ae.wait_ready(10)
        assert ae.state == "dead"
        with pytest.raises(EngineDeadError):
            await ae.add_request("r", [1], SamplingParams())

        ae2 = await started(FakeEngine())
        s = await ae2.add_request("r", [1], SamplingParams(max_tokens=10**6))
        await anext(s)
        await ae2.shutdown()
        assert ae2.state == "stopped"
        assert ae2.engine.shut_down   # the engine's KV tiers get flushed on the way out
        with pytest.raises(EngineDeadError):
            async for _ in s:
                pass

    run(main())
