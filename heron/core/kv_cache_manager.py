"""Per-request block tables on top of the block pool. The scheduler asks only
"can request r get slots for k more tokens?" and never sees blocks directly."""
from __future__ import annotations

from heron.core.block_pool import BlockPool
from heron.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Every block of a request stays allocated until the request finishes or is preempted.
    Sliding-window layers share the block table with full-attention layers (one table per
    request), so out-of-window blocks are kept too; the window only limits what attention
    reads. Models whose layers are all sliding-window could free them; that is future work."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def usage(self) -> float:
        return self.pool.usage()

    def num_blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        total = cdiv(request.num_computed_tokens + num_new_tokens, self.block_size)
        return max(0, total - len(request.block_ids))

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Make room for `num_new_tokens` more KV entries; False (and no change) if the pool
        cannot."""
        need = self.num_blocks_needed(request, num_new_tokens)
        if need > self.pool.num_free_blocks:
            return False
        if need:
            request.block_ids.extend(self.pool.allocate(need))
        return True

    def fork(self, source: Request, child: Request, num_tokens: int) -> tuple[int, int] | None:
        """Give `child` the KV of `source`'s first `num_tokens` tokens: full blocks are shared by
        reference; a partly filled last block is copied into a fresh block (copy-on-write done
        eagerly). Returns the (src, dst) block pair the runner must copy, or None.
        The caller has checked that one block is free when a copy is needed."""
        assert not child.block_ids and num_tokens <= source.num_computed_tokens
        num_full, rem = divmod(num_tokens, self.block_size)
        shared = source.block_ids[:num_full]
        self.pool.share(shared)
        child.block_ids = list(shared)
        copy = None
        if rem:
            dst = self.pool.allocate(1)[0]
            child.block_ids.append(dst)
            copy = (source.block_ids[num_full], dst)
        child.num_computed_tokens = num_tokens
        return copy

    def free(self, request: Request) -> None:
        self.pool.free(list(reversed(request.block_ids)))
        request.block_ids = []
