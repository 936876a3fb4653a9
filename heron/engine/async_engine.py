"""AsyncEngine: the synchronous Engine on a thread of its own, feeding per-request asyncio streams.

The Engine is not thread-safe, so exactly one thread (the engine thread) builds it and calls it.
That thread loops:

    drain the inbox of add/abort commands  ->  engine.step()  ->  hand the outputs to the event loop

and blocks on the inbox when no request is in flight, so an idle server uses no CPU. The event
loop never touches the Engine: it puts commands in a thread-safe inbox and receives each step's
outputs in one `call_soon_threadsafe` callback. On a 2-core CPU this matters: torch runs its
OpenMP threads on both cores, and any busy Python thread beside them slows every step down.

Failures: an `add_request` that raises (bad input, full queue) fails only that request; an
exception inside `step()` fails the requests in flight with `RequestError` (HTTP 500) and the
loop goes on; if the loop itself cannot go on (or the model failed to load) the engine is
"dead", every stream ends with `EngineDeadError` and `/health` says 503.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from heron.outputs import RequestOutput
from heron.sampling_params import SamplingParams

if TYPE_CHECKING:
    from heron.engine.engine import Engine

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop is not running (the model failed to load, or the loop crashed)."""


class EngineNotReadyError(RuntimeError):
    """The model is still loading."""


class QueueFullError(RuntimeError):
    """The waiting queue holds `max_queued_requests` requests already (HTTP 429)."""


class RequestError(RuntimeError):
    """An internal error failed this request (HTTP 500); the server goes on."""


# Stream items besides RequestOutputs.
_ACCEPTED = "accepted"
_STOP = ("stop",)


class RequestStream:
    """The outputs of one request, as an async iterator of cumulative RequestOutputs.

    Outputs are cumulative (text and token ids so far), so when the consumer falls behind only
    the newest one matters: `__anext__` skips to it. Iteration ends after the finished output;
    an error is raised from `__anext__`. Call `abort()` if you stop iterating early (a client
    that went away); it is a no-op once the request has finished.
    """

    def __init__(self, request_id: str, engine: AsyncEngine) -> None:
        self.request_id = request_id
        self.finished = False
        self._engine = engine
        self._queue: asyncio.Queue = asyncio.Queue()

    def _put(self, item) -> None:  # event loop thread
        self._queue.put_nowait(item)

    async def _wait_accepted(self) -> None:
        while True:
            try:
                item = await asyncio.wait_for(self._queue.get(), timeout=1.0)
                break
            except TimeoutError:
                # (an add that raced with the engine thread's death would never be answered)
                if self._engine.state not in ("ready", "loading"):
                    item = EngineDeadError("the engine is not running")
                    break
        if isinstance(item, BaseException):
            self.finished = True
            raise item

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        while not self._queue.empty() and isinstance(item, RequestOutput) and not item.finished:
            item = self._queue.get_nowait()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)


# on_iteration(engine, outputs, aborted_request_ids): called on the engine thread after every
# loop iteration (metrics); it must be quick and must not raise.
IterationHook = Callable[["Engine", list[RequestOutput], list[str]], None]


class AsyncEngine:
    """Owns an Engine built by `engine_factory` on its own thread; see the module docstring.

    `max_queued_requests`: an add is refused with QueueFullError when this many sequences are
    already waiting to be scheduled (None: no limit).
    """

    def __init__(self, engine_factory: Callable[[], Engine], max_queued_requests: int | None = None,
                 on_iteration: IterationHook | None = None) -> None:
        self._factory = engine_factory
        self.max_queued_requests = max_queued_requests
        self._on_iteration = on_iteration
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._carried: list = []           # commands taken from the inbox early (engine thread only)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._state = "created"          # created | loading | ready | dead | stopped
        self.error: BaseException | None = None
        self.engine: Engine | None = None  # read-only use outside the engine thread (tokenizer, limits)
        self.load_time: float | None = None
        self.num_step_failures = 0

    # ---- lifecycle --------------------------------------------------------------------
    @property
    def state(self) -> str:
        if self._state == "ready" and (self._thread is None or not self._thread.is_alive()):
            return "dead"
        return self._state

    @property
    def is_ready(self) -> bool:
        return self.state == "ready"

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start the engine thread (it builds the Engine, then serves). Call from the event loop."""
        if self._thread is not None:
            raise RuntimeError("AsyncEngine.start() called twice")
        self._loop = loop or asyncio.get_running_loop()
        self._state = "loading"
        self._thread = threading.Thread(target=self._thread_main, name="heron-engine", daemon=True)
        self._thread.start()

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the model is loaded; raises EngineDeadError if loading failed."""
        ok = await asyncio.get_running_loop().run_in_executor(None, self._ready.wait, timeout)
        if not ok:
            raise TimeoutError(f"the engine did not become ready within {timeout} s")
        if self._state != "ready":
            raise EngineDeadError(f"the engine failed to start: {self.error}")

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread; requests still in flight end with EngineDeadError."""
        if self._thread is None:
            return
        self._inbox.put(_STOP)
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join, timeout)
        if self._state in ("ready", "loading"):
            self._state = "stopped"

    # ---- requests (event loop thread) -------------------------------------------------
    async def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                          arrival_time: float | None = None, cache_salt: str | None = None) -> RequestStream:
        """Queue a request and wait until the engine has accepted it (one loop iteration at
        most). Raises ValueError (invalid request), QueueFullError, EngineNotReadyError or
        EngineDeadError; afterwards the returned stream yields its outputs."""
        self._check_alive()
        stream = RequestStream(request_id, self)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        self._inbox.put(("add", request_id, prompt, params, arrival, stream, cache_salt))
        try:
            await stream._wait_accepted()
        except asyncio.CancelledError:
            self.abort(request_id)  # processed after the add: nothing is left behind
            raise
        return stream

    def abort(self, request_id: str) -> None:
        """Abort a request (thread-safe, non-blocking): its KV blocks are freed before the next step."""
        self._inbox.put(("abort", request_id))

    def _check_alive(self) -> None:
        state = self.state
        if state == "loading":
            raise EngineNotReadyError("the model is still loading; retry in a few seconds")
        if state != "ready":
            raise EngineDeadError("the engine is not running" + (f": {self.error!r}" if self.error else ""))

    # ---- the engine thread ------------------------------------------------------------
    def _thread_main(self) -> None:
        t0 = time.monotonic()
        try:
            engine = self._factory()
        except BaseException as e:  # noqa: BLE001 - reported through /health and the logs
            if not isinstance(e, ValueError):  # (a ValueError is a user error with a clear message)
                logger.exception("the engine failed to load")
            self.error = e
            self._state = "dead"
            self._ready.set()
            return
        self.engine = engine
        self.load_time = time.monotonic() - t0
        self._state = "ready"
        self._ready.set()
        streams: dict[str, RequestStream] = {}
        try:
            self._serve(engine, streams)
        except BaseException as e:  # noqa: BLE001
            logger.exception("the engine loop crashed; the server can no longer generate")
            self.error = e
            self._state = "dead"
            self._deliver([(s, EngineDeadError(f"the engine loop crashed: {e!r}")) for s in streams.values()])
            self._fail_pending()
            return
        finally:
            try:
                engine.shutdown()   # queued KV-offload writes reach the disk
            except Exception:  # noqa: BLE001
                logger.exception("engine shutdown failed")
        self._state = "stopped"
        self._deliver([(s, EngineDeadError("the server is shutting down")) for s in streams.values()])
        self._fail_pending()

    def _serve(self, engine: Engine, streams: dict[str, RequestStream]) -> None:
        while True:
            commands = self._take_commands(block=not engine.has_unfinished_requests())
            deliveries: list[tuple[RequestStream, object]] = []
            aborted: list[str] = []
            for i, cmd in enumerate(commands):
                if cmd is _STOP:
                    self._carried = commands[i + 1:]  # failed by _fail_pending
                    self._deliver(deliveries)
                    return
                if cmd[0] == "add":
                    _, request_id, prompt, params, arrival, stream, salt = cmd
                    deliveries.append((stream, self._add(engine, streams, request_id, prompt, params, arrival,
                                                         stream, salt)))
                else:  # abort
                    if streams.pop(cmd[1], None) is not None:
                        engine.abort_request(cmd[1])
                        aborted.append(cmd[1])
            if deliveries:
                self._deliver(deliveries)
            if not engine.has_unfinished_requests():
                self._hook(engine, [], aborted)
                continue
            steps_before = engine.num_steps
            try:
                outputs = engine.step()
            except Exception as e:  # noqa: BLE001 - fail these requests, keep serving the others
                self._fail_in_flight(engine, streams, e)
                self._hook(engine, [], aborted)
                continue
            deliveries = []
            for out in outputs:
                stream = streams.pop(out.request_id) if out.finished else streams.get(out.request_id)
                if stream is not None:
                    deliveries.append((stream, out))
            if deliveries:
                self._deliver(deliveries)
            self._hook(engine, outputs, aborted)
            if engine.num_steps == steps_before and not outputs:
                # nothing could be scheduled this time (e.g. samples waiting for their prompt's
                # KV): wait a moment for commands instead of spinning
                self._wait_for_command(timeout=0.002)

    def _add(self, engine: Engine, streams: dict[str, RequestStream], request_id: str, prompt, params,
             arrival: float, stream: RequestStream, cache_salt: str | None = None) -> object:
        limit = self.max_queued_requests
        if limit is not None and len(engine.scheduler.waiting) >= limit:
            return QueueFullError(f"the server's waiting queue is full ({limit} requests waiting, "
                                  f"--max-queued-requests); retry later")
        try:
            if cache_salt is None:
                engine.add_request(request_id, prompt, params, arrival)
            else:
                engine.add_request(request_id, prompt, params, arrival, cache_salt=cache_salt)
        except ValueError as e:
            return e
        except Exception as e:  # noqa: BLE001
            logger.exception("add_request(%s) failed", request_id)
            return RequestError(f"internal error while adding the request: {type(e).__name__}: {e}")
        streams[request_id] = stream
        return _ACCEPTED

    def _fail_in_flight(self, engine: Engine, streams: dict[str, RequestStream], exc: Exception) -> None:
        """step() raised: the state of the requests in it is unknown, so fail and free them all."""
        self.num_step_failures += 1
        logger.exception("engine step failed; failing the %d requests in flight", len(streams))
        error = RequestError(f"internal error while generating: {type(exc).__name__}: {exc}")
        deliveries = []
        for request_id, stream in list(streams.items()):
            engine.abort_request(request_id)  # if this raises too, the loop is broken: dead
            deliveries.append((stream, error))
        streams.clear()
        for request_id in list(engine.groups):  # requests without a stream (should not exist)
            engine.abort_request(request_id)
        self._deliver(deliveries)

    def _take_commands(self, block: bool) -> list:
        commands, self._carried = self._carried, []
        if block and not commands:
            commands.append(self._inbox.get())
        while True:
            try:
                commands.append(self._inbox.get_nowait())
            except queue.Empty:
                return commands

    def _wait_for_command(self, timeout: float) -> None:
        try:
            self._carried.append(self._inbox.get(timeout=timeout))
        except queue.Empty:
            pass

    def _deliver(self, deliveries: list[tuple[RequestStream, object]]) -> None:
        if not deliveries or self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(_deliver_all, deliveries)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _fail_pending(self) -> None:
        """Fail adds still in the inbox (after a stop or a crash)."""
        deliveries = []
        for cmd in self._take_commands(block=False):
            if cmd is not _STOP and cmd[0] == "add":
                deliveries.append((cmd[5], EngineDeadError("the engine is not running")))
        self._deliver(deliveries)

    def _hook(self, engine: Engine, outputs: list[RequestOutput], aborted: list[str]) -> None:
        if self._on_iteration is None:
            return
        try:
            self._on_iteration(engine, outputs, aborted)
        except Exception:  # noqa: BLE001 - metrics must never take the engine down
            logger.exception("the iteration hook failed")


def _deliver_all(deliveries: list[tuple[RequestStream, object]]) -> None:
    for stream, item in deliveries:
        stream._put(item)
