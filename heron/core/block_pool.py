"""The pool of KV-cache blocks: reference counts and a free queue with O(1) removal.

The free queue is an intrusive doubly linked list (as in vLLM v1): blocks are taken from
the head, freed blocks are appended at the tail, and any block can be unlinked in O(1),
which the prefix cache needs to revive a freed-but-cached block (LRU eviction order).
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

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks, got {num_blocks}")
        self.num_blocks = num_blocks
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.null_block = self.blocks[0]
        self.null_block.ref_cnt = 1
        self.free_queue = FreeBlockQueue(self.blocks[1:])

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
            block.ref_cnt = 1
            out.append(block.block_id)
        return out

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
                self.free_queue.append(block)
