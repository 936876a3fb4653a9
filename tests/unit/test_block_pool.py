import pytest

from heron.core.block_pool import BlockPool
from heron.core.kv_cache_manager import KVCacheManager
from heron.request import Request
from heron.sampling_params import SamplingParams


def _req(rid: str, n: int) -> Request:
    return Request(rid, list(range(n)), SamplingParams(max_tokens=4), frozenset(), max_tokens=4)


def test_allocation_takes_from_head_and_null_block_is_reserved():
    pool = BlockPool(6)
    assert pool.num_free_blocks == 5
    assert pool.allocate(2) == [1, 2]
    assert pool.free_queue.block_ids() == [3, 4, 5]
    assert all(pool.blocks[b].ref_cnt == 1 for b in (1, 2))
    assert 0 not in pool.allocate(3)
    assert pool.num_free_blocks == 0


def test_exhaustion_raises_and_changes_nothing():
    pool = BlockPool(4)
    pool.allocate(2)
    with pytest.raises(RuntimeError, match="only 1 are free"):
        pool.allocate(2)
    assert pool.num_free_blocks == 1


def test_free_appends_in_given_order_and_ref_counts():
    pool = BlockPool(6)
    a = pool.allocate(3)          # [1, 2, 3]
    pool.share([2])               # block 2 now read by two requests
    pool.free(list(reversed(a)))  # 3, 2, 1 -> 2 keeps one reference
    assert pool.blocks[2].ref_cnt == 1
    assert pool.free_queue.block_ids() == [4, 5, 3, 1]
    pool.free([2])
    assert pool.free_queue.block_ids() == [4, 5, 3, 1, 2]
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([2])


def test_usage():
    pool = BlockPool(5)
    assert pool.usage() == 0.0
    pool.allocate(2)
    assert pool.usage() == 0.5


def test_free_queue_remove_from_middle_is_o1_and_consistent():
    pool = BlockPool(6)
    q = pool.free_queue
    q.remove(pool.blocks[3])
    assert q.block_ids() == [1, 2, 4, 5] and q.num_free == 4
    q.append(pool.blocks[3])
    assert q.block_ids() == [1, 2, 4, 5, 3]


def test_kv_manager_allocates_by_block_and_refuses_atomically():
    kv = KVCacheManager(num_blocks=5, block_size=4)    # 4 usable blocks = 16 tokens
    r = _req("a", 10)
    assert kv.allocate_slots(r, 10) and r.block_ids == [1, 2, 3]
    r.num_computed_tokens = 10
    assert kv.allocate_slots(r, 2) and r.block_ids == [1, 2, 3]   # fits in the third block
    r2 = _req("b", 8)
    assert not kv.allocate_slots(r2, 8)                           # needs 2, only 1 free
    assert r2.block_ids == [] and kv.num_free_blocks == 1
    kv.free(r)
    assert kv.num_free_blocks == 4 and r.block_ids == []


def test_fork_shares_full_blocks_and_copies_partial():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    src = _req("a", 10)
    kv.allocate_slots(src, 10)
    src.num_computed_tokens = 10
    child = _req("b", 10)
    copy = kv.fork(src, child, 9)          # 2 full blocks shared, 1 token in the third
    assert child.block_ids[:2] == src.block_ids[:2]
    assert copy == (src.block_ids[2], child.block_ids[2])
    assert kv.pool.blocks[src.block_ids[0]].ref_cnt == 2
    assert child.num_computed_tokens == 9
    kv.free(src)
    assert kv.pool.blocks[child.block_ids[0]].ref_cnt == 1   # still held by the child
    kv.free(child)
    assert kv.num_free_blocks == 7
