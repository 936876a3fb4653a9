"""Iteration-level scheduler in the num_computed_tokens style (vLLM v1, Orca, Sarathi-Serve).

There is no prefill phase and no decode phase: every request has `num_tokens` (prompt plus
output so far) and `num_computed_tokens` (tokens whose KV is in the cache). Each step the
scheduler hands out "compute the next k tokens of request r" under a token budget:
running requests first (their decodes, or the next chunk of a long prompt), then waiting
ones. A long prompt is therefore chunked and shares steps with other requests' decodes.

When the KV pool runs dry the most recently admitted running request is preempted by
recompute: its blocks are freed, `num_computed_tokens` goes back to 0, and it returns to
the front of the waiting queue with its output so far, to be recomputed later. Greedy
outputs are unchanged by this, and no request is ever lost or duplicated.

Speculative decoding: a decoding request may carry draft tokens (`Request.spec_token_ids`,
set by a proposer after the previous step). It is then scheduled for 1 + k tokens, its last
token plus the drafts, with KV slots for all of them; the runner scores them in one forward
and returns the accepted drafts plus one token of its own, and `update` advances
`num_computed_tokens` past the accepted ones only: the rejected drafts' slots are simply
overwritten later (nothing is registered in the prefix cache beyond the computed tokens).
The drafts may form a token tree (`Request.spec_parents`, heron.spec.tree): 1 + n slots for
n nodes, and the runner moves the accepted path's KV into place.
"""
from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

from heron.core.kv_cache_manager import KVCacheManager, cdiv
from heron.request import Request, RequestStatus
from heron.spec import tree

ORDER_WINDOW = 256        # waiting requests considered for cache-aware ordering each step
MAX_TIMES_PASSED = 16     # overtakes after which a waiting request goes to the front


@dataclass
class SchedulerOutput:
    """One step's work: requests in batch order with their number of new tokens."""

    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)  # (src, dst), before the forward
    blocks_to_load: list[tuple[int, object]] = field(default_factory=list)  # (dst, payload from a KV tier)
    preempted: list[Request] = field(default_factory=list)
    spec_tokens: dict[str, list[int]] = field(default_factory=dict)  # request id -> drafts scheduled with it
    spec_parents: dict[str, list[int]] = field(default_factory=dict)  # request id -> its drafts' tree (not for chains)
    # request ids whose few new tokens run as decode rows (one per token, reading the cache in
    # place) rather than as a prefill chunk; only the last is sampled (a draft model's catch-up)
    decode_rows: set[str] = field(default_factory=set)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class SchedulerStats:
    num_running: int = 0
    num_waiting: int = 0
    num_preemptions_total: int = 0
    kv_cache_usage: float = 0.0


class Scheduler:
    def __init__(self, kv_cache_manager: KVCacheManager, max_num_batched_tokens: int, max_num_seqs: int,
                 max_model_len: int) -> None:
        self.kv = kv_cache_manager
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions_total = 0

    # ---- public API -------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        need = cdiv(min(request.num_prompt_tokens + request.max_tokens, self.max_model_len), self.kv.block_size)
        if need > self.kv.pool.num_usable_blocks:
            raise ValueError(
                f"request {request.request_id!r} needs up to {need} KV blocks ({request.num_prompt_tokens} prompt "
                f"tokens + max_tokens {request.max_tokens}) but the KV cache holds only {self.kv.pool.num_usable_blocks}"
                f" blocks of {self.kv.block_size} tokens; raise kv_cache_memory or lower max_tokens")
        self.requests[request.request_id] = request
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(len(self.running), len(self.waiting), self.num_preemptions_total, self.kv.usage())

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        now = time.monotonic()

        # 1. Running requests: their next tokens (a decode, or the next chunk of a prompt).
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            assert num_new > 0, f"running request {request.request_id} has nothing to compute"
            drafts, parents = self._drafts(request, num_new, budget)
            num_new += len(drafts)
            while not self.kv.allocate_slots(request, num_new):
                if drafts:              # memory is short: verify no drafts before preempting anyone
                    num_new -= len(drafts)
                    drafts, parents = [], None
                    continue
                victim = self.running.pop()  # the most recently admitted
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    break
            else:
                out.scheduled.append((request, num_new))
                if drafts:
                    out.spec_tokens[request.request_id] = drafts
                    if parents is not None:
                        out.spec_parents[request.request_id] = parents
                budget -= num_new
                i += 1
                continue
            break  # the request itself was preempted: nothing more fits

        # 2. Waiting requests, in order, while budget, sequence slots and blocks last.
        # Nothing is admitted in a step that had to preempt: memory is short.
        if not out.preempted:
            budget = self._admit_waiting(out, budget)

        for request, _ in out.scheduled:
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
        return out

    def update(self, out: SchedulerOutput, sampled: dict[str, list[int]]) -> list[tuple[Request, int]]:
        """Advance num_computed_tokens, append sampled tokens, finish requests that stop.

        `sampled[request_id]` holds the step's new tokens: one, or with drafts the accepted
        drafts plus the target's own next token. Returns (request, tokens appended) for the
        requests that received tokens; a stop condition met inside a run ends it there."""
        got_token = []
        now = time.monotonic()
        for request, num_new in out.scheduled:
            if request.status != RequestStatus.RUNNING:
                continue
            tokens = sampled.get(request.request_id)
            drafts = out.spec_tokens.get(request.request_id)
            if drafts:
                accepted = len(tokens) - 1
                request.num_computed_tokens += num_new - len(drafts) + accepted
                request.num_spec_proposed += len(drafts)
                request.num_spec_accepted += accepted
            else:
                request.num_computed_tokens += num_new
            if not tokens:
                self.kv.cache_computed_blocks(request)
                continue  # a prompt chunk that did not reach the end of the prompt
            count = 0
            status = None
            for token in tokens:
                request.append_token(token)
                count += 1
                status = self._check_stop(request, token)
                if status is not None:
                    break
            # a stop inside an accepted run: the KV past the last kept token is not the request's
            request.num_computed_tokens = min(request.num_computed_tokens, request.num_tokens - 1)
            self.kv.cache_computed_blocks(request)
            if request.first_token_time is None:
                request.first_token_time = now
            request.last_token_time = now
            got_token.append((request, count))
            if status is not None:
                self.finish_request(request, status)
        return got_token

    def finish_request(self, request: Request, status: RequestStatus) -> None:
        """Finish (or abort) a request wherever it is, freeing its blocks. Idempotent."""
        if request.is_finished:
            return
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            try:
                self.waiting.remove(request)
            except ValueError:
                pass
        self.kv.free(request)
        request.status = status
        request.finished_time = time.monotonic()
        self.requests.pop(request.request_id, None)

    # ---- helpers ----------------------------------------------------------------------
    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> int:
        order = self._admission_order()
        admitted: set[int] = set()
        inflight: set[bytes] | None = None      # hashes of blocks running requests are computing
        caching = self.kv.enable_prefix_caching
        for request in order:
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            src = request.fork_source
            if src is not None:
                ready = self._fork_ready(request)
                if ready is None:
                    continue  # its source has not computed the prompt yet: let others pass
                if not ready:
                    request.fork_source = None  # source gone: compute the prompt normally
            if request.fork_source is not None:
                # sharing the prompt needs at most one copied block plus one for the new token
                if self.kv.num_free_blocks < 2:
                    break
                copy = self.kv.fork(request.fork_source, request, request.num_prompt_tokens - 1)
                if copy is not None:
                    out.blocks_to_copy.append(copy)
                request.fork_source = None
                if request.num_cached_tokens is None:
                    request.num_cached_tokens = 0
            elif caching and self.kv.can_use_cache(request):
                found = self.kv.find_cached_prefix(request)
                nxt = found.num_blocks()
                if nxt < self.kv.max_cached_blocks(request):
                    if inflight is None:
                        inflight = self._inflight_hashes()
                    if request.block_hashes[nxt] in inflight:
                        continue  # a running request is computing this prefix now: reuse it next step
                num_new = min(request.num_tokens - nxt * self.kv.block_size, budget)
                if self.kv.blocks_to_admit(request, found, num_new) > self.kv.num_free_blocks:
                    break
                out.blocks_to_load.extend(self.kv.take_cached_prefix(request, found))
                if request.num_cached_tokens is None:
                    request.num_cached_tokens = request.num_computed_tokens
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self.kv.allocate_slots(request, num_new):
                # cannot happen after the checks above; undo a cache hit so that nothing leaks
                self.kv.free(request)
                request.num_computed_tokens = 0
                break
            if request.num_cached_tokens is None:
                request.num_cached_tokens = 0
            admitted.add(id(request))
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            if caching and inflight is not None:   # later arrivals can wait for what it computes
                inflight.update(self.kv.block_hashes(request)[request.num_computed_tokens // self.kv.block_size:])
            out.scheduled.append((request, num_new))
            budget -= num_new
        if admitted:
            if caching:
                self._count_passed(admitted)
            self.waiting = deque(r for r in self.waiting if id(r) not in admitted)
        return budget

    def _admission_order(self) -> list[Request]:
        """FCFS; with prefix caching, cache-aware (SGLang's longest-prefix-match): within the
        first ORDER_WINDOW waiting requests of equal priority, the longest cached prefix goes
        first. Preempted requests keep their place at the front, and a request that later
        arrivals have overtaken MAX_TIMES_PASSED times goes to the front too, so none starves."""
        if not self.kv.enable_prefix_caching or len(self.waiting) < 2:
            return list(self.waiting)
        window = list(itertools.islice(self.waiting, ORDER_WINDOW))
        front = [r for r in window if r.status == RequestStatus.PREEMPTED or r.num_times_passed >= MAX_TIMES_PASSED]
        front_ids = {id(r) for r in front}
        rest = [(pos, r) for pos, r in enumerate(window) if id(r) not in front_ids]
        rest.sort(key=lambda t: (t[1].priority, -self.kv.count_cached_blocks(t[1]), t[0]))
        return front + [r for _, r in rest] + list(itertools.islice(self.waiting, ORDER_WINDOW, None))

    def _count_passed(self, admitted: set[int]) -> None:
        """A waiting request that arrived before an admitted one has been passed over once more."""
        last_admitted = max(pos for pos, r in enumerate(self.waiting) if id(r) in admitted)
        for pos, r in enumerate(self.waiting):
            if pos >= last_admitted:
                break
            if id(r) not in admitted:
                r.num_times_passed += 1

    def _inflight_hashes(self) -> set[bytes]:
        """Hashes of the full prompt blocks running requests have not computed yet."""
        bs = self.kv.block_size
        out: set[bytes] = set()
        for r in self.running:
            done = r.num_computed_tokens // bs
            hashes = self.kv.block_hashes(r)
            if done < len(hashes):
                out.update(hashes[done:])
        return out

    def _fork_ready(self, request: Request) -> bool | None:
        """True: fork now. None: wait for the source. False: the source cannot be forked."""
        src = request.fork_source
        need = request.num_prompt_tokens - 1
        if need <= 0 or src.is_finished:
            return False
        if src.status == RequestStatus.RUNNING and src.num_computed_tokens >= need:
            return True
        return None

    def _drafts(self, request: Request, num_new: int, budget: int) -> tuple[list[int], list[int] | None]:
        """The request's drafts that fit this step, with their tree's parents (None for a
        chain): only while decoding, within the token budget, the model's length and the
        request's max_tokens (the step yields at most depth + 1 tokens)."""
        drafts, request.spec_token_ids = request.spec_token_ids, []
        parents, request.spec_parents = request.spec_parents, None
        if not drafts or num_new != 1 or request.num_tokens - request.num_computed_tokens != 1:
            return [], None
        room = max(min(budget - 1, self.max_model_len - request.num_tokens), 0)
        depth = max(request.max_tokens - request.num_output_tokens - 1, 0)
        if parents is None:
            return drafts[:min(room, depth)], None
        drafts, parents = tree.trim(drafts, parents, room, depth)
        return drafts, (None if tree.is_chain(parents) else parents)

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.spec_token_ids = []
        request.spec_parents = None
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions_total += 1
        self.waiting.appendleft(request)

    def _check_stop(self, request: Request, token: int) -> RequestStatus | None:
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token in request.eos_token_ids:
                request.stop_reason = None
                return RequestStatus.FINISHED_STOPPED
            if token in params.stop_token_ids:
                request.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= request.max_tokens or request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
