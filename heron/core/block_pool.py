"""The pool of KV-cache blocks: reference counts, a free queue with O(1) removal, and the
prefix cache's map from block hash to block.

The free queue is an intrusive doubly linked list (as in vLLM v1): blocks are taken from
the head, freed blocks are appended at the tail, and any block can be unlinked in O(1),
which the prefix cache needs to revive a freed-but-cached block. A freed block keeps its
hash and stays findable until it reaches the head and is handed out again, so the free
queue is also the LRU eviction order of the cache. With caching on, a freed block that
holds nothing reusable (no hash) goes to the head instead, to be reused before any
cached one.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True, eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    prev_free: KVBlock | None = None
    next_free: KVBlock | None = None
    in_free_queue: bool = False
    # prefix cache: set while the block is registered under `block_hash`
    block_hash: bytes | None = None
    parent_hash: bytes | None = None        # the previous block's hash (None for a first block)
    token_ids: tuple[int, ...] | None = None  # this block's tokens, to confirm a hash hit


class FreeBlockQueue:
    """Doubly linked list of free blocks; head = next to hand out (least recently freed)."""

    def __init__(self, blocks: list[KVBlock]) -> None:
        self._head = KVBlock(-1)  # sentinels keep the link code branch-free
        self._tail = KVBlock(-2)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self.num_free = 0
        for block in blocks:
            self.append(block)

    def popleft(self) -> KVBlock:
        block = self._head.next_free
        if block is self._tail:
            raise IndexError("no free blocks")
        self.remove(block)
        return block

    def appendleft(self, block: KVBlock) -> None:
        assert not block.in_free_queue, f"block {block.block_id} is already free"
        first = self._head.next_free
        self._head.next_free = block
        block.prev_free = self._head
        block.next_free = first
        first.prev_free = block
        block.in_free_queue = True
        self.num_free += 1

    def append(self, block: KVBlock) -> None:
        assert not block.in_free_queue, f"block {block.block_id} is already free"
        last = self._tail.prev_free
        last.next_free = block
        block.prev_free = last
        block.next_free = self._tail
        self._tail.prev_free = block
        block.in_free_queue = True
        self.num_free += 1

    def remove(self, block: KVBlock) -> None:
        assert block.in_free_queue, f"block {block.block_id} is not in the free queue"
        block.prev_free.next_free = block.next_free
        block.next_free.prev_free = block.prev_free
        block.prev_free = block.next_free = None
        block.in_free_queue = False
        self.num_free -= 1

    def block_ids(self) -> list[int]:
        """Free block ids in hand-out order (for tests and debugging)."""
        out, node = [], self._head.next_free
        while node is not self._tail:
            out.append(node.block_id)
            node = node.next_free
        return out


class BlockPool:
    """Owns `num_blocks` blocks. Block 0 is reserved as the null block: block tables are padded
    with it, so it is never handed out."""

    def __init__(self, num_blocks: int, enable_caching: bool = False) -> None:
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.null_block = self.blocks[0]
        self.null_block.ref_cnt = 1
        self.free_queue = FreeBlockQueue(self.blocks[1:])
        self.cached: dict[bytes, KVBlock] = {}   # block hash -> the block registered under it
        self.num_evictions = 0

    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    def usage(self) -> float:
        """Fraction of usable blocks in use (0.0 - 1.0)."""
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def allocate(self, n: int) -> list[int]:
        """Take `n` blocks (ref count 1 each). Raises if fewer are free; callers check first."""
        if n > self.num_free_blocks:
            raise RuntimeError(f"asked for {n} KV blocks but only {self.num_free_blocks} are free")
        out = []
        for _ in range(n):
            block = self.free_queue.popleft()
            assert block.ref_cnt == 0
            if block.block_hash is not None:
                self._evict(block)
            block.ref_cnt = 1
            out.append(block.block_id)
        return out

    # ---- prefix cache -----------------------------------------------------------------
    def lookup(self, block_hash: bytes, parent_hash: bytes | None, token_ids: tuple[int, ...]) -> KVBlock | None:
        """The cached block for this hash if it really holds `token_ids` after `parent_hash`
        (a hash hit is confirmed, so a collision is a miss, never wrong KV)."""
        block = self.cached.get(block_hash)
        if block is None or block.token_ids != token_ids or block.parent_hash != parent_hash:
            return None
        return block

    def register(self, block_id: int, block_hash: bytes, parent_hash: bytes | None,
                 token_ids: tuple[int, ...]) -> bool:
        """Make a computed block findable under `block_hash`. False if the block is already
        registered or another block holds that hash (a duplicate computed concurrently)."""
        block = self.blocks[block_id]
        if block.block_hash is not None or block_hash in self.cached:
            return False
        block.block_hash, block.parent_hash, block.token_ids = block_hash, parent_hash, token_ids
        self.cached[block_hash] = block
        return True

    def touch(self, block_ids: list[int]) -> None:
        """Take a reference to cached blocks a new request reuses; free ones leave the free
        queue (the caller has counted them against the free blocks)."""
        for bid in block_ids:
            block = self.blocks[bid]
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def reset_cache(self) -> int:
        """Forget every cached block that no request holds (benchmarks, tests). Returns how many."""
        n = 0
        for block in list(self.cached.values()):
            if block.ref_cnt == 0:
                self._evict(block)
                n += 1
        return n

    def _evict(self, block: KVBlock) -> None:
        if self.cached.get(block.block_hash) is block:
            del self.cached[block.block_hash]
        block.block_hash = block.parent_hash = block.token_ids = None
        self.num_evictions += 1

    def share(self, block_ids: list[int]) -> None:
        """Add a reference to blocks already in use (another request reads them too)."""
        for bid in block_ids:
            block = self.blocks[bid]
            assert block.ref_cnt > 0, f"cannot share free block {bid}"
            block.ref_cnt += 1

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference from each block; blocks reaching zero go to the free queue tail,
        in the order given (callers pass a request's blocks tail-first so that, once prefix
        caching keeps them, a prompt's last blocks are evicted before its first)."""
        for bid in block_ids:
            block = self.blocks[bid]
            if block.ref_cnt <= 0:
                raise RuntimeError(f"double free of KV block {bid}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if self.enable_caching and block.block_hash is None:
                    self.free_queue.appendleft(block)   # nothing to keep: reuse it first
                else:
                    self.free_queue.append(block)
