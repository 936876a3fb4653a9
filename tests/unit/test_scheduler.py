import pytest

from heron.core.kv_cache_manager import KVCacheManager
from heron.core.scheduler import Scheduler
from heron.request import Request, RequestStatus
from heron.sampling_params import SamplingParams


def _req(rid, n, max_tokens=8, **kw):
    return Request(rid, list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens, **kw), frozenset({0}),
                   max_tokens=max_tokens)


def _sched(num_blocks=64, block_size=4, budget=16, max_seqs=8, max_len=1024):
    return Scheduler(KVCacheManager(num_blocks, block_size), budget, max_seqs, max_len)


def _step(s, token=7):
    out = s.schedule()
    sampled = {r.request_id: [token] for r, n in out.scheduled if r.num_computed_tokens + n == r.num_tokens}
    s.update(out, sampled)
    return out


def test_budget_chunks_long_prompt_and_mixes_with_decodes():
    s = _sched(budget=10)
    a, b = _req("a", 4), _req("b", 25)
    s.add_request(a)
    s.add_request(b)
    out = _step(s)
    assert [(r.request_id, n) for r, n in out.scheduled] == [("a", 4), ("b", 6)]
    out = _step(s)   # a decodes first, b gets the rest of the budget
    assert [(r.request_id, n) for r, n in out.scheduled] == [("a", 1), ("b", 9)]
    out = _step(s)
    assert [(r.request_id, n) for r, n in out.scheduled] == [("a", 1), ("b", 9)]
    assert b.num_computed_tokens == 24 and b.num_output_tokens == 0
    out = _step(s)
    assert [(r.request_id, n) for r, n in out.scheduled] == [("a", 1), ("b", 1)]
    assert b.num_output_tokens == 1


def test_max_num_seqs_limits_admission():
    s = _sched(max_seqs=2)
    for i in range(3):
        s.add_request(_req(str(i), 2))
    out = _step(s)
    assert [r.request_id for r, _ in out.scheduled] == ["0", "1"]
    assert len(s.waiting) == 1


def test_preempts_most_recent_and_requeues_at_front():
    # 6 usable blocks of 4 tokens = 24 tokens
    s = _sched(num_blocks=7, block_size=4, budget=64)
    a, b, c = _req("a", 8, max_tokens=16), _req("b", 8, max_tokens=16), _req("c", 4)
    for r in (a, b, c):
        s.add_request(r)
    _step(s)             # a, b: 2 blocks each; c: 1 block
    assert [r.request_id for r in s.running] == ["a", "b", "c"]
    # decodes need a new block for a and b (position 8) -> 7 blocks > 6: c (last admitted) goes
    out = _step(s)
    assert [r.request_id for r in out.preempted] == ["c"]
    assert c.status == RequestStatus.PREEMPTED and c.num_computed_tokens == 0 and c.block_ids == []
    assert s.waiting[0] is c and s.num_preemptions_total == 1
    assert c.num_output_tokens == 1   # its output so far is kept, to be recomputed


def test_no_request_lost_or_duplicated_under_pressure():
    s = _sched(num_blocks=9, block_size=4, budget=12, max_seqs=4)
    reqs = [_req(str(i), 3 + 2 * i, max_tokens=6) for i in range(6)]
    for r in reqs:
        s.add_request(r)
    for _ in range(200):
        if not s.has_unfinished_requests():
            break
        out = _step(s)
        ids = [r.request_id for r, _ in out.scheduled]
        assert len(ids) == len(set(ids))
        assert out.total_num_scheduled_tokens <= 12
    assert not s.has_unfinished_requests()
    assert all(r.status == RequestStatus.FINISHED_LENGTH and r.num_output_tokens == 6 for r in reqs)
    assert s.num_preemptions_total > 0
    assert s.kv.num_free_blocks == 8


def test_stop_conditions():
    s = _sched()
    eos = _req("eos", 3, max_tokens=5)
    s.add_request(eos)
    _step(s, token=0)
    assert eos.status == RequestStatus.FINISHED_STOPPED
    mt = _req("min", 3, max_tokens=5, min_tokens=2)
    s.add_request(mt)
    _step(s, token=0)     # EOS before min_tokens does not stop
    assert mt.status == RequestStatus.RUNNING
    st = _req("stopid", 3, max_tokens=5, stop_token_ids=[9])
    s.add_request(st)
    _step(s, token=9)
    assert st.status == RequestStatus.FINISHED_STOPPED and st.stop_reason == 9


def test_request_larger_than_cache_is_rejected():
    s = _sched(num_blocks=3, block_size=4)
    with pytest.raises(ValueError, match="KV blocks"):
        s.add_request(_req("big", 20))


def test_fork_waits_for_source_prompt_then_shares():
    s = _sched(block_size=4, budget=6)
    src = _req("a#0", 10)
    child = _req("a#1", 10)
    child.fork_source = src
    s.add_request(src)
    s.add_request(child)
    out = _step(s)
    assert [r.request_id for r, _ in out.scheduled] == ["a#0"]   # child waits for the prompt
    out = _step(s)
    assert [(r.request_id, n) for r, n in out.scheduled] == [("a#0", 4)]
    out = _step(s)   # source has 10 computed -> fork at 9 tokens, the child computes 1
    assert ("a#1", 1) in [(r.request_id, n) for r, n in out.scheduled]
    assert out.blocks_to_copy == [(src.block_ids[2], child.block_ids[2])]
    assert child.block_ids[:2] == src.block_ids[:2]
