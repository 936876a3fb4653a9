"""Prefix cache bookkeeping: chained hashes, confirmation of hits, LRU eviction through the free
queue, reference counts, cache-aware admission order and its starvation bound."""
from __future__ import annotations

from heron.core.block_pool import BlockPool
from heron.core.kv_cache_manager import KVCacheManager, hash_block
from heron.core.scheduler import MAX_TIMES_PASSED, Scheduler
from heron.request import Request, RequestStatus
from heron.sampling_params import SamplingParams

BS = 4


def _req(rid: str, tokens: list[int], max_tokens: int = 4, salt: str | None = None) -> Request:
    return Request(rid, list(tokens), SamplingParams(max_tokens=max_tokens), frozenset({0}), max_tokens=max_tokens,
                   cache_salt=salt)


def _computed(kv: KVCacheManager, r: Request) -> None:
    """Pretend the whole prompt was computed and register its full blocks."""
    assert kv.allocate_slots(r, r.num_tokens - r.num_computed_tokens)
    r.num_computed_tokens = r.num_tokens
    kv.cache_computed_blocks(r)


def test_hash_chain_depends_on_parent_tokens_and_salt():
    a = hash_block(None, [1, 2, 3, 4])
    assert a == hash_block(None, [1, 2, 3, 4]) and len(a) == 16
    assert hash_block(a, [5, 6, 7, 8]) != hash_block(hash_block(None, [1, 2, 3, 5]), [5, 6, 7, 8])
    assert hash_block(None, [1, 2, 3, 4], b"tenant") != a
    r1, r2 = _req("a", range(1, 10)), _req("b", range(1, 10), salt="x")
    kv = KVCacheManager(16, BS, enable_prefix_caching=True)
    assert len(kv.block_hashes(r1)) == 2                    # 9 tokens = 2 full blocks
    assert kv.block_hashes(r1)[0] != kv.block_hashes(r2)[0]


def test_lookup_confirms_tokens_and_parent():
    pool = BlockPool(8, enable_caching=True)
    [bid] = pool.allocate(1)
    assert pool.register(bid, b"h" * 16, None, (1, 2, 3, 4))
    assert pool.lookup(b"h" * 16, None, (1, 2, 3, 4)).block_id == bid
    assert pool.lookup(b"h" * 16, None, (1, 2, 3, 5)) is None          # same hash, other tokens
    assert pool.lookup(b"h" * 16, b"p" * 16, (1, 2, 3, 4)) is None     # same hash, other parent
    [other] = pool.allocate(1)
    assert not pool.register(other, b"h" * 16, None, (9, 9, 9, 9))     # the first holder keeps the hash
    assert not pool.register(bid, b"i" * 16, None, (1, 2, 3, 4))       # a block is registered once


def test_hits_share_blocks_and_reference_counts():
    kv = KVCacheManager(16, BS, enable_prefix_caching=True)
    a = _req("a", range(1, 11))                             # 10 tokens: 2 full blocks
    _computed(kv, a)
    b = _req("b", list(range(1, 9)) + [50, 51, 52])          # shares both full blocks
    found = kv.find_cached_prefix(b)
    assert found.block_ids == a.block_ids[:2]
    assert kv.blocks_to_admit(b, found, 3) == 1             # 8 cached + 3 new tokens: one new block
    kv.take_cached_prefix(b, found)
    assert b.num_computed_tokens == 8
    a_blocks = list(a.block_ids)
    assert [kv.pool.blocks[i].ref_cnt for i in a_blocks[:2]] == [2, 2]
    kv.free(a)
    assert [kv.pool.blocks[i].ref_cnt for i in b.block_ids] == [1, 1]
    assert kv.pool.free_queue.block_ids()[0] == a_blocks[2]   # a's partial block: no hash, reused first
    # a request whose prompt is entirely cached still computes its last token
    c = _req("c", range(1, 9))
    assert kv.find_cached_prefix(c).block_ids == a_blocks[:1]


def test_freed_cached_blocks_are_evicted_lru_and_revived_in_o1():
    kv = KVCacheManager(7, BS, enable_prefix_caching=True)  # 6 usable blocks
    a, b = _req("a", range(1, 9)), _req("b", range(101, 109))
    _computed(kv, a)
    _computed(kv, b)
    kv.free(a)                                              # a's blocks go to the tail, last block first
    kv.free(b)
    # a (blocks 1, 2) was freed first, and each request's blocks tail-first: a's 2nd, a's 1st,
    # b's 2nd, b's 1st; the never-used blocks 5 and 6 stay ahead of them
    assert kv.pool.free_queue.block_ids() == [5, 6, 2, 1, 4, 3]
    # revive b's first block: it leaves the free queue, and the next allocation evicts the
    # least recently freed cached block (a's second one) after the two never-used blocks
    b2 = _req("b2", list(range(101, 105)) + [7, 7])
    found = kv.find_cached_prefix(b2)
    assert found.block_ids == [3]
    kv.take_cached_prefix(b2, found)
    assert 3 not in kv.pool.free_queue.block_ids()
    got = kv.pool.allocate(3)
    assert got == [5, 6, 2]
    assert kv.pool.num_evictions == 1
    assert kv.find_cached_prefix(_req("a2", range(1, 9))).block_ids == [1]   # a's 2nd block is gone


def test_prompt_logprobs_and_forks_bypass_the_cache():
    kv = KVCacheManager(16, BS, enable_prefix_caching=True)
    _computed(kv, _req("a", range(1, 10)))
    plp = Request("p", list(range(1, 10)), SamplingParams(max_tokens=2, prompt_logprobs=1), frozenset(), 2)
    assert not kv.can_use_cache(plp) and kv.find_cached_prefix(plp).num_blocks() == 0
    plp.num_prompt_logprobs_done = 8                        # after a preemption, nothing is left to report
    assert kv.can_use_cache(plp)


def _sched(num_blocks=64, budget=64, max_seqs=8):
    return Scheduler(KVCacheManager(num_blocks, BS, enable_prefix_caching=True), budget, max_seqs, 1024)


def _step(s, token=7):
    out = s.schedule()
    sampled = {r.request_id: [token] for r, n in out.scheduled if r.num_computed_tokens + n == r.num_tokens}
    s.update(out, sampled)
    return out


def _finish(s):
    while s.has_unfinished_requests():
        _step(s)


def test_second_request_waits_for_the_prefix_being_computed():
    s = _sched()
    a, b = _req("a", range(1, 14)), _req("b", list(range(1, 13)) + [99])
    s.add_request(a)
    s.add_request(b)
    out = _step(s)
    assert [(r.request_id, n) for r, n in out.scheduled] == [("a", 13)]   # b waits for a's 3 blocks
    out = _step(s)
    assert [(r.request_id, n) for r, n in out.scheduled] == [("a", 1), ("b", 1)]
    assert b.num_cached_tokens == 12


def test_cache_aware_order_prefers_longest_hit_and_does_not_starve():
    s = _sched(budget=9, max_seqs=1)
    warm = _req("warm", range(1, 9), max_tokens=1)
    s.add_request(warm)
    _finish(s)                                              # blocks of 1..8 are cached now
    cold = _req("cold", range(200, 209), max_tokens=1)
    hot = _req("hot", list(range(1, 9)) + [5], max_tokens=1)
    s.add_request(cold)
    s.add_request(hot)
    out = _step(s)
    assert [r.request_id for r, _ in out.scheduled] == ["hot"]     # arrived later, longer cached prefix
    assert hot.num_cached_tokens == 8 and cold.num_times_passed == 1
    _finish(s)
    # starvation bound: a request overtaken MAX_TIMES_PASSED times goes first
    s2 = _sched(budget=9, max_seqs=1)
    s2.add_request(_req("warm", range(1, 9), max_tokens=1))
    _finish(s2)
    cold = _req("cold", range(200, 209), max_tokens=1)
    cold.num_times_passed = MAX_TIMES_PASSED
    s2.add_request(cold)
    s2.add_request(_req("hot", list(range(1, 9)) + [5], max_tokens=1))
    out = _step(s2)
    assert [r.request_id for r, _ in out.scheduled] == ["cold"]


def test_preempted_request_gets_its_blocks_back_from_the_cache():
    s = _sched(num_blocks=7, budget=64)                     # 6 usable blocks of 4
    a, b = _req("a", range(1, 9), max_tokens=12), _req("b", range(101, 109), max_tokens=12)
    s.add_request(a)
    s.add_request(b)
    while not b.num_preemptions:
        _step(s)
    assert b.status == RequestStatus.PREEMPTED
    _finish(s)
    assert a.num_output_tokens == b.num_output_tokens == 12
    assert s.kv.stats.hits > 0                              # b's recompute reused its own cached blocks
    assert s.kv.num_free_blocks == 6
