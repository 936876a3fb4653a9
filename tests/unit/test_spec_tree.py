"""Token trees without a model: building, trimming, the attention mask, acceptance along a
path, the n-gram proposer's candidate continuations, and the scheduler's handling of trees."""
from __future__ import annotations

import pytest
import torch

from heron.config import EngineConfig
from heron.core.kv_cache_manager import KVCacheManager
from heron.core.scheduler import Scheduler
from heron.request import Request
from heron.sampling_params import SamplingParams
from heron.spec import Speculator, tree
from heron.spec.ngram import NgramProposer

#   root ─ 10 ─ 11 ─ 12          nodes 0, 1, 2
#        │    └ 21 ─ 22          nodes 3, 4
#        └ 30                    node 5
BRANCHES = [[10, 11, 12], [10, 21, 22], [30]]
TOKENS = [10, 11, 12, 21, 22, 30]
PARENTS = [-1, 0, 1, 0, 3, -1]


def test_build_merges_shared_prefixes_first_branch_first():
    assert tree.build(BRANCHES) == (TOKENS, PARENTS)
    assert tree.build([[1, 2, 3]]) == ([1, 2, 3], [-1, 0, 1])
    assert tree.build([[1, 2], [1, 2]]) == ([1, 2], [-1, 0])      # duplicates collapse
    assert tree.is_chain([-1, 0, 1]) and tree.is_chain([]) and not tree.is_chain(PARENTS)
    assert tree.depths(PARENTS) == [1, 2, 3, 2, 3, 1]
    assert tree.path_to(PARENTS, 4) == [0, 3, 4] and tree.path_to(PARENTS, -1) == []


def test_check_tree_rejects_bad_parents():
    tree.check_tree(TOKENS, PARENTS)
    with pytest.raises(ValueError, match="one parent per token"):
        tree.check_tree([1, 2], [-1])
    with pytest.raises(ValueError, match="earlier node"):
        tree.check_tree([1, 2], [-1, 1])


def test_attention_mask_is_ancestors_and_self():
    m = tree.attention_mask(PARENTS)
    assert m.shape == (7, 7) and m.dtype == torch.bool
    visible = {i: set(torch.nonzero(m[i]).flatten().tolist()) for i in range(7)}
    # column 0 is the root; node j is column 1 + j
    assert visible == {0: {0}, 1: {0, 1}, 2: {0, 1, 2}, 3: {0, 1, 2, 3}, 4: {0, 1, 4}, 5: {0, 1, 4, 5}, 6: {0, 6}}


def test_accept_follows_the_targets_tokens_down_the_tree():
    # sampled[0] at the root, sampled[1 + j] at node j
    assert tree.accept(TOKENS, PARENTS, [10, 11, 12, 99, 0, 0, 0]) == [0, 1, 2]   # whole first branch
    assert tree.accept(TOKENS, PARENTS, [10, 21, 0, 0, 22, 7, 0]) == [0, 3, 4]    # the second branch
    assert tree.accept(TOKENS, PARENTS, [10, 21, 0, 0, 5, 0, 0]) == [0, 3]
    assert tree.accept(TOKENS, PARENTS, [30, 0, 0, 0, 0, 0, 1]) == [5]
    assert tree.accept(TOKENS, PARENTS, [44, 10, 11, 12, 21, 22, 30]) == []        # nothing matches the root


def test_trim_keeps_a_prefix_closed_tree():
    assert tree.trim(TOKENS, PARENTS, 6, 3) == (TOKENS, PARENTS)
    assert tree.trim(TOKENS, PARENTS, 4, 3) == ([10, 11, 12, 21], [-1, 0, 1, 0])
    # depth 2: nodes 2 and 4 go, the rest renumbered
    assert tree.trim(TOKENS, PARENTS, 6, 2) == ([10, 11, 21, 30], [-1, 0, 0, -1])
    assert tree.trim(TOKENS, PARENTS, 0, 3) == ([], [])
    assert tree.trim(TOKENS, PARENTS, 6, 0) == ([], [])


def test_ngram_proposes_the_best_distinct_continuations():
    prop = NgramProposer(1, 3)
    #        0  1  2  3  4  5  6  7  8  9 10 11 12
    seq = [5, 6, 7, 1, 2, 6, 7, 3, 4, 9, 6, 7, 3, 5, 6, 7]
    # suffix (5, 6, 7): 3 tokens match at 0..2; 2 tokens at 5..6 and 10..11 (the later first)
    assert prop.continuations(seq, 2, 3) == [[1, 2], [3, 5], [3, 4]]
    assert prop.continuations(seq, 2, 1) == [[1, 2]] and prop.lookup(seq, 2) == [1, 2]
    r = Request("a", seq, SamplingParams(max_tokens=8), frozenset(), max_tokens=8)
    assert prop.propose_tree(r, 2, 3) == ([1, 2, 3, 5, 4], [-1, 0, -1, 2, 2])
    # distinct continuations only; fewer than asked when the sequence has no more
    assert prop.continuations([1, 2, 1, 2, 1, 2], 2, 3) == [[1, 2]]


def test_tree_width_is_checked():
    with pytest.raises(ValueError, match=r"speculative_tree_width must be in \[1, 8\]"):
        EngineConfig(speculative="ngram", speculative_tree_width=0)
    with pytest.raises(ValueError, match="needs speculative='ngram'"):
        EngineConfig(speculative="self-int4", speculative_tree_width=2)


BS = 4


def _decoding(s, rid, n, max_tokens=16):
    r = Request(rid, list(range(1, n + 1)), SamplingParams(max_tokens=max_tokens), frozenset({0}),
                max_tokens=max_tokens)
    s.add_request(r)
    out = s.schedule()
    s.update(out, {x.request_id: [50] for x, k in out.scheduled if x.num_computed_tokens + k >= x.num_tokens})
    return r


def test_scheduler_gives_a_tree_a_slot_per_node_and_trims_it():
    s = Scheduler(KVCacheManager(32, BS), 64, 8, 1024)
    r = _decoding(s, "a", 6)                      # 7 tokens, 6 computed
    r.spec_token_ids, r.spec_parents = list(TOKENS), list(PARENTS)
    out = s.schedule()
    assert out.scheduled == [(r, 7)] and out.spec_tokens == {"a": TOKENS} and out.spec_parents == {"a": PARENTS}
    assert r.spec_parents is None and r.spec_token_ids == []
    got = s.update(out, {"a": [10, 21, 22, 8]})   # the second branch accepted whole
    assert got == [(r, 4)] and r.output_token_ids == [50, 10, 21, 22, 8]
    assert r.num_computed_tokens == r.num_tokens - 1 == 10

    s = Scheduler(KVCacheManager(32, BS), 5, 8, 1024)     # budget: the token + 4 nodes
    r = _decoding(s, "b", 2, max_tokens=3)                # and at most 2 more tokens: depth 1
    r.spec_token_ids, r.spec_parents = list(TOKENS), list(PARENTS)
    out = s.schedule()
    assert out.spec_tokens == {"b": [10, 30]} and out.spec_parents == {"b": [-1, -1]}
    # a tree trimmed down to a chain is scheduled as a chain
    s = Scheduler(KVCacheManager(32, BS), 3, 8, 1024)
    r = _decoding(s, "c", 2)
    r.spec_token_ids, r.spec_parents = list(TOKENS), list(PARENTS)
    out = s.schedule()
    assert out.spec_tokens == {"c": [10, 11]} and out.spec_parents == {}


class _Trees:
    name = "trees"

    def propose_tree(self, request, k, width):
        return tree.build([[3] * k, [4] * k][:width])


def test_speculator_proposes_trees_only_for_tree_proposers():
    s = Scheduler(KVCacheManager(64, BS), 64, 8, 1024)
    r = _decoding(s, "a", 4, max_tokens=100)
    spec = Speculator(_Trees(), num_speculative_tokens=3, max_batch=2, tree_width=2)
    spec.propose(s.running)
    assert r.spec_token_ids == [3, 3, 3, 4, 4, 4] and r.spec_parents == [-1, 0, 1, -1, 3, 4]
    chains = _Trees()
    chains.propose = lambda request, k: [7] * k
    r.spec_parents = None
    Speculator(chains, num_speculative_tokens=3, max_batch=2, tree_width=1).propose(s.running)
    assert r.spec_token_ids == [7, 7, 7] and r.spec_parents is None
