"""Speculative decoding pieces without a model: the n-gram proposer, the scheduler's handling
of drafts (slots, budget, limits, rollback of rejected drafts, preemption) and the speculator's
adaptive length."""
from __future__ import annotations

import pytest

from heron.config import EngineConfig
from heron.core.kv_cache_manager import KVCacheManager
from heron.core.scheduler import Scheduler
from heron.request import Request
from heron.sampling_params import SamplingParams
from heron.spec import Speculator
from heron.spec.ngram import NgramProposer


def test_ngram_prefers_the_longest_then_the_most_recent_match():
    prop = NgramProposer(1, 3)
    #        0  1  2  3  4  5  6  7  8  9 10 11
    seq = [5, 6, 7, 1, 2, 6, 7, 3, 4, 5, 6, 7]
    # suffix (5, 6, 7): the occurrence at 5..6 matches 2 tokens, the one at 0..2 all 3
    assert prop.lookup(seq, 3) == [1, 2, 6]
    seq2 = [8, 6, 7, 1, 2, 9, 6, 7, 3, 4, 0, 6, 7]
    assert prop.lookup(seq2, 2) == [3, 4]       # equal length 2: the most recent one
    assert NgramProposer(3, 3).lookup(seq2, 2) == []   # no earlier 3-token match
    assert prop.lookup([1, 2, 3, 4], 3) == []   # the last token never occurred before
    assert prop.lookup([4], 3) == []


def test_ngram_continues_a_period_past_the_end():
    prop = NgramProposer(1, 4)
    assert prop.lookup([9, 1, 2, 1, 2, 1, 2], 5) == [1, 2, 1, 2, 1]
    assert prop.lookup([3, 3, 3], 4) == [3, 3, 3, 3]


def test_ngram_index_is_extended_incrementally_and_rebuilt_after_a_truncation():
    prop = NgramProposer(1, 2)
    r = Request("a", [1, 2, 3, 1], SamplingParams(max_tokens=8), frozenset(), max_tokens=8)
    assert prop.propose(r, 2) == [2, 3]
    r.append_token(2)
    assert prop.propose(r, 2) == [3, 1]
    r.append_token(5)
    assert prop.propose(r, 2) == []
    r.truncate_output(0)                         # fewer tokens than indexed: rebuilt, not stale
    assert prop.propose(r, 2) == [2, 3]


def test_ngram_sizes_are_checked():
    with pytest.raises(ValueError, match="1 <= min <= max"):
        NgramProposer(3, 2)
    with pytest.raises(ValueError, match="speculative must be one of ngram"):
        EngineConfig(speculative="medusa")
    with pytest.raises(ValueError, match=r"num_speculative_tokens must be in \[1, 16\]"):
        EngineConfig(speculative="ngram", num_speculative_tokens=0)
    with pytest.raises(ValueError, match="speculative_ngram_min"):
        EngineConfig(speculative="ngram", speculative_ngram_min=4, speculative_ngram_max=2)
    with pytest.raises(ValueError, match="speculative_max_batch"):
        EngineConfig(speculative="ngram", speculative_max_batch=0)
    with pytest.raises(ValueError, match="speculative must be one of"):
        EngineConfig(speculative="draft:")
    # every draft token of a draft model costs a forward: a shorter default
    assert EngineConfig(speculative="ngram").num_speculative_tokens == 8
    assert EngineConfig(speculative="self-int4").num_speculative_tokens == 5
    assert EngineConfig(speculative="draft:/some/model").num_speculative_tokens == 3


BS = 4


def _req(rid, n, max_tokens=16):
    return Request(rid, list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens), frozenset({0}),
                   max_tokens=max_tokens)


def _decoding(s, r):
    """Admit r and run its prefill; it is then decoding with one token to compute."""
    s.add_request(r)
    out = s.schedule()
    s.update(out, {x.request_id: [50] for x, n in out.scheduled if x.num_computed_tokens + n >= x.num_tokens})
    assert r.num_tokens - r.num_computed_tokens == 1


def test_drafts_get_slots_and_rejected_ones_roll_back():
    s = Scheduler(KVCacheManager(32, BS), 64, 8, 1024)
    r = _req("a", 6)
    _decoding(s, r)                              # 7 tokens, 6 computed
    r.spec_token_ids = [11, 12, 13]
    out = s.schedule()
    assert out.scheduled == [(r, 4)] and out.spec_tokens == {"a": [11, 12, 13]}
    assert len(r.block_ids) == 3                 # slots for positions 6..9: blocks of 4 -> 3
    assert r.spec_token_ids == []                # drafts are consumed by the schedule
    got = s.update(out, {"a": [11, 40]})         # 1 draft accepted, then the target's own token
    assert got == [(r, 2)]
    assert r.output_token_ids == [50, 11, 40]
    assert r.num_computed_tokens == 8 == r.num_tokens - 1   # positions 8, 9 (rejected) not computed
    assert r.num_spec_proposed == 3 and r.num_spec_accepted == 1
    out = s.schedule()                           # a plain decode recomputes position 8 over the stale slot
    assert out.scheduled == [(r, 1)] and not out.spec_tokens


def test_drafts_are_trimmed_to_budget_max_tokens_and_model_length():
    s = Scheduler(KVCacheManager(32, BS), 3, 8, 1024)
    r = _req("a", 2)
    _decoding(s, r)
    r.spec_token_ids = [1, 2, 3, 4]
    assert s.schedule().spec_tokens == {"a": [1, 2]}        # budget 3 = the token + 2 drafts

    s = Scheduler(KVCacheManager(32, BS), 64, 8, 1024)
    r = _req("b", 2, max_tokens=3)
    _decoding(s, r)                                          # 1 of 3 output tokens
    r.spec_token_ids = [1, 2, 3, 4]
    out = s.schedule()
    assert out.spec_tokens == {"b": [1]}                     # a step yields at most drafts + 1 tokens
    got = s.update(out, {"b": [1, 9]})
    assert got == [(r, 2)] and r.is_finished and r.num_output_tokens == 3

    s = Scheduler(KVCacheManager(32, BS), 64, 8, 6)
    r = _req("c", 3)
    _decoding(s, r)                                          # 4 tokens, model length 6
    r.spec_token_ids = [1, 2, 3, 4]
    assert s.schedule().spec_tokens == {"c": [1, 2]}         # positions 4, 5


def test_a_stop_inside_an_accepted_run_ends_it_there():
    s = Scheduler(KVCacheManager(32, BS), 64, 8, 1024)
    r = _req("a", 5)
    _decoding(s, r)
    r.spec_token_ids = [7, 0, 8]                             # 0 is EOS
    out = s.schedule()
    got = s.update(out, {"a": [7, 0, 8, 9]})
    assert got == [(r, 2)] and r.output_token_ids == [50, 7, 0] and r.is_finished
    assert s.kv.num_free_blocks == 31                        # all its blocks returned


def test_short_memory_drops_drafts_before_preempting():
    s = Scheduler(KVCacheManager(4, BS), 64, 8, 1024)        # 3 usable blocks of 4 tokens
    a, b = _req("a", 3, max_tokens=8), _req("b", 3, max_tokens=8)
    _decoding(s, a)
    _decoding(s, b)                 # a: 5 tokens (4 computed), b: 4 (3 computed): a block each
    assert a.num_computed_tokens == 4 and b.num_computed_tokens == 3 and s.kv.num_free_blocks == 1
    a.spec_token_ids = [1, 2, 3, 4, 5, 6]                    # positions 4..9 would need 2 more blocks
    out = s.schedule()
    assert not out.spec_tokens and not out.preempted
    assert [(x.request_id, n) for x, n in out.scheduled] == [("a", 1), ("b", 1)]


def test_preemption_clears_drafts():
    s = Scheduler(KVCacheManager(32, BS), 64, 8, 1024)
    r = _req("a", 5)
    _decoding(s, r)
    r.spec_token_ids = [1, 2]
    s.running.remove(r)
    s._preempt(r)
    assert r.spec_token_ids == [] and r.num_computed_tokens == 0


class _Fixed:
    name = "fixed"

    def __init__(self):
        self.asked = []

    def propose(self, request, k):
        self.asked.append(k)
        return [3] * k


def test_speculator_adapts_length_to_acceptance_and_skips_large_batches():
    prop = _Fixed()
    spec = Speculator(prop, num_speculative_tokens=6, max_batch=2)
    s = Scheduler(KVCacheManager(64, BS), 64, 8, 1024)
    r = _req("a", 4, max_tokens=100)
    _decoding(s, r)
    spec.propose(s.running)
    assert prop.asked == [6] and r.spec_token_ids == [3] * 6    # no history: the maximum
    out = s.schedule()
    sampled = {"a": [3, 9]}                                     # 1 of 6 accepted
    s.update(out, sampled)
    spec.update_stats(out, sampled)
    spec.propose(s.running)
    assert prop.asked[-1] == 2                                   # ceil(1.0) + 1
    out = s.schedule()
    sampled = {"a": [3, 3, 9]}                                   # 2 of 2 accepted
    s.update(out, sampled)
    spec.update_stats(out, sampled)
    spec.propose(s.running)
    assert prop.asked[-1] == 3                                   # ceil(0.5 * 1 + 0.5 * 2) + 1
    assert spec.stats.num_proposed == 8 and spec.stats.num_accepted == 3
    assert spec.stats.mean_accepted_length == pytest.approx(2.5)
    # more decoding requests than max_batch: nothing is proposed
    for rid in ("b", "c"):
        _decoding(s, _req(rid, 4))
    asked = len(prop.asked)
    spec.propose(s.running)
    assert len(prop.asked) == asked and all(not x.spec_token_ids for x in s.running)
