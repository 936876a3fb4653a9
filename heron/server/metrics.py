"""Prometheus metrics for `GET /metrics` (names prefixed `heron:`, shaped like vLLM's `vllm:` ones).

`ServerMetrics.on_iteration` is the AsyncEngine's iteration hook: it runs on the engine thread
after every loop iteration, reads the scheduler and KV-cache state (which only that thread may
touch) into gauges, and observes per-request timings when requests finish. prometheus_client
metrics are thread-safe, so `/metrics` renders them from the event loop at any time.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401 - re-exported for the server
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from heron.outputs import RequestOutput
from heron.request import RequestStatus

if TYPE_CHECKING:
    from heron.engine.engine import Engine

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_TOKEN_LATENCY_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                          0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_TOKEN_COUNT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        disable_created_metrics()  # no `*_created` series: they only add noise here
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=r).labels(model_name)

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(model_name)

        self.num_running = gauge("heron:num_requests_running", "Sequences running (scheduled in the last step).")
        self.num_waiting = gauge("heron:num_requests_waiting", "Sequences waiting to be scheduled.")
        self.num_preempted = gauge("heron:num_requests_preempted",
                                   "Waiting sequences that were preempted and will be recomputed.")
        self.kv_usage = gauge("heron:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).")
        self.kv_used_blocks = gauge("heron:kv_cache_used_blocks", "KV-cache blocks in use.")
        self.kv_total_blocks = gauge("heron:kv_cache_total_blocks", "Usable KV-cache blocks.")
        self.preemptions = counter("heron:num_preemptions", "Preemptions (by recompute) since start.")
        self.prompt_tokens = counter("heron:prompt_tokens", "Prompt tokens prefilled.")
        self.generation_tokens = counter("heron:generation_tokens", "Tokens generated.")
        self.steps = counter("heron:engine_steps", "Engine steps run.")
        self._success = Counter("heron:request_success", "Requests finished, by finish reason.",
                                ["model_name", "finished_reason"], registry=r)
        self.prefix_queries = counter("heron:prefix_cache_queries",
                                      "Prompt tokens looked up in the prefix cache (requests that may use it).")
        self._prefix_hits = Counter("heron:prefix_cache_hits",
                                    "Prompt tokens served from the prefix cache, by tier (pool = the KV pool, "
                                    "cpu / disk = the offload tiers).", ["model_name", "tier"], registry=r)
        self.offload_stored = counter("heron:kv_offload_stored_blocks", "KV blocks written through to the tiers.")
        self._prefix_hits.labels(model_name, "pool")   # shown from the start, at 0
        self.spec_drafts = counter("heron:spec_decode_num_drafts",
                                   "Speculative decoding: request-steps that verified draft tokens.")
        self.spec_draft_tokens = counter("heron:spec_decode_num_draft_tokens", "Draft tokens proposed and verified.")
        self.spec_accepted = counter("heron:spec_decode_num_accepted_tokens", "Draft tokens accepted.")
        self.spec_rate = gauge("heron:spec_decode_acceptance_rate", "Accepted / proposed draft tokens since start.")
        self.spec_mean_len = gauge("heron:spec_decode_mean_accepted_length",
                                   "Tokens produced per verifying request-step (accepted drafts + 1) since start.")
        self._prefix_seen: dict[str, int] = {}
        self._model = model_name
        self.ttft = histogram("heron:time_to_first_token_seconds", "Time to first token (arrival to first token).",
                              _LATENCY_BUCKETS)
        self.tpot = histogram("heron:time_per_output_token_seconds",
                              "Mean time per output token after the first, per request.", _TOKEN_LATENCY_BUCKETS)
        self.itl = histogram("heron:inter_token_latency_seconds", "Time between successive output tokens.",
                             _TOKEN_LATENCY_BUCKETS)
        self.e2e = histogram("heron:e2e_request_latency_seconds", "End-to-end request latency (arrival to finish).",
                             _LATENCY_BUCKETS)
        self.queue_time = histogram("heron:request_queue_time_seconds", "Time from arrival to first scheduled.",
                                    _LATENCY_BUCKETS)
        self.request_prompt_tokens = histogram("heron:request_prompt_tokens", "Prompt tokens per request.",
                                               _TOKEN_COUNT_BUCKETS)
        self.request_generation_tokens = histogram("heron:request_generation_tokens",
                                                   "Generated tokens per request (all samples).", _TOKEN_COUNT_BUCKETS)
        # request id -> (tokens generated so far, last token time); engine thread only
        self._progress: dict[str, tuple[int, float | None]] = {}
        self._preemptions_seen = 0
        self._steps_seen = 0

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ---- the engine thread ------------------------------------------------------------
    def on_iteration(self, engine: Engine, outputs: list[RequestOutput], aborted: list[str]) -> None:
        for request_id in aborted:
            self._progress.pop(request_id, None)
            self._success.labels(self._model, "abort").inc()
        for out in outputs:
            self._observe_output(out)
        scheduler = engine.scheduler
        self.num_running.set(len(scheduler.running))
        self.num_waiting.set(len(scheduler.waiting))
        self.num_preempted.set(sum(1 for r in scheduler.waiting if r.status == RequestStatus.PREEMPTED))
        pool = engine.kv_cache_manager.pool
        used = pool.num_usable_blocks - pool.num_free_blocks
        self.kv_used_blocks.set(used)
        self.kv_total_blocks.set(pool.num_usable_blocks)
        self.kv_usage.set(used / pool.num_usable_blocks)
        total = scheduler.num_preemptions_total
        if total > self._preemptions_seen:
            self.preemptions.inc(total - self._preemptions_seen)
            self._preemptions_seen = total
        stats = engine.kv_cache_manager.stats
        for key, value, metric in [("queries", stats.queries, self.prefix_queries),
                                   ("stored", stats.stored_blocks, self.offload_stored),
                                   ("pool", stats.hits, self._prefix_hits.labels(self._model, "pool")),
                                   *[(name, v, self._prefix_hits.labels(self._model, name))
                                     for name, v in stats.tier_hits.items()]]:
            if value > self._prefix_seen.get(key, 0):
                metric.inc(value - self._prefix_seen.get(key, 0))
                self._prefix_seen[key] = value
        spec = engine.spec
        if spec is not None:
            st = spec.stats
            for key, value, metric in [("drafts", st.num_steps, self.spec_drafts),
                                       ("draft_tokens", st.num_proposed, self.spec_draft_tokens),
                                       ("accepted", st.num_accepted, self.spec_accepted)]:
                if value > self._prefix_seen.get(key, 0):
                    metric.inc(value - self._prefix_seen.get(key, 0))
                    self._prefix_seen[key] = value
            self.spec_rate.set(st.acceptance_rate)
            self.spec_mean_len.set(st.mean_accepted_length)
        if engine.num_steps > self._steps_seen:
            self.steps.inc(engine.num_steps - self._steps_seen)
            self._steps_seen = engine.num_steps

    def _observe_output(self, out: RequestOutput) -> None:
        m = out.metrics
        num_tokens = sum(len(c.token_ids) for c in out.outputs)
        seen = self._progress.get(out.request_id)
        if seen is None:
            seen = (0, None)
            self.prompt_tokens.inc(len(out.prompt_token_ids))
            if m is not None and m.time_to_first_token is not None:
                self.ttft.observe(m.time_to_first_token)
        prev_tokens, prev_time = seen
        if num_tokens > prev_tokens:
            self.generation_tokens.inc(num_tokens - prev_tokens)
        last = m.last_token_time if m is not None else None
        if prev_time is not None and last is not None and last > prev_time:
            self.itl.observe(last - prev_time)
        if not out.finished:
            self._progress[out.request_id] = (num_tokens, last)
            return
        self._progress.pop(out.request_id, None)
        self._success.labels(self._model, out.outputs[0].finish_reason or "unknown").inc()
        self.request_prompt_tokens.observe(len(out.prompt_token_ids))
        self.request_generation_tokens.observe(num_tokens)
        if m is None:
            return
        for value, hist in ((m.time_per_output_token, self.tpot), (m.e2e_latency, self.e2e),
                            (m.queue_time, self.queue_time)):
            if value is not None:
                hist.observe(value)
