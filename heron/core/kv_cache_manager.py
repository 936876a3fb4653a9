"""Per-request block tables on top of the block pool, and the prefix cache.

The scheduler asks "can request r get slots for k more tokens?" and, with prefix caching on,
"which leading blocks of r's prompt are cached already?"; it never sees KV data.

Prefix caching (vLLM's automatic prefix caching, SGLang's RadixAttention at block
granularity): every full block of a request's tokens gets a chained hash,
``h_i = blake2b(h_{i-1} | tokens of block i | extra key)``, the extra key (a cache salt, an
adapter id) folded into the first block. A block is registered under its hash once its KV is
computed, and stays findable after its request finishes until the pool needs the block (the
free queue is the LRU order, see block_pool). A lookup walks a new request's hashes from the
first block and stops at the first miss; each hit is confirmed against the block's own token
ids and its parent's hash, so a hash collision turns into a miss, not into wrong KV (a false
hit would need a 128-bit blake2b collision on the earlier blocks). At least one prompt token
is always computed, so the step has logits to sample from.

Lower tiers (heron.core.kv_tiers: CPU memory, disk) continue the lookup where the pool
misses: a block found there is copied back into a fresh block instead of being recomputed.
Blocks are written through to the tiers as soon as they are computed (`pending_offload`,
drained by the engine after each step), so a block evicted from the pool, or a server
restart, costs nothing more.
"""
from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass, field

from heron.core.block_pool import BlockPool
from heron.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def hash_block(parent: bytes | None, token_ids, extra: bytes = b"") -> bytes:
    """16-byte chained hash of one block (stable across processes: the disk tier relies on it)."""
    h = hashlib.blake2b(parent or b"\0" * 16, digest_size=16)
    h.update(array("q", token_ids).tobytes())
    if extra:
        h.update(extra)
    return h.digest()


@dataclass
class PrefixCacheStats:
    """Counters in tokens (like vLLM's prefix_cache_queries / prefix_cache_hits)."""

    queries: int = 0                                      # prompt tokens looked up
    hits: int = 0                                         # found in the KV pool
    tier_hits: dict[str, int] = field(default_factory=dict)  # found in a lower tier, by tier name
    stored_blocks: int = 0                                # blocks written through to the tiers


@dataclass
class CachedPrefix:
    """What a lookup found for a request: pool blocks, then blocks loadable from a tier."""

    block_ids: list[int]
    tier_blocks: list[tuple[int, object]] = field(default_factory=list)   # (block index, tier)

    def num_blocks(self) -> int:
        return len(self.block_ids) + len(self.tier_blocks)


class KVCacheManager:
    """Every block of a request stays allocated until the request finishes or is preempted.
    Sliding-window layers share the block table with full-attention layers (one table per
    request), so out-of-window blocks are kept too; the window only limits what attention
    reads. Models whose layers are all sliding-window could free them; that is future work."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False,
                 tiers: list | tuple = ()) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self.tiers = list(tiers) if enable_prefix_caching else []
        self.stats = PrefixCacheStats(tier_hits={t.name: 0 for t in self.tiers})
        # (block id, hash, prefix token ids, extra key) computed this step, to write to the tiers
        self.pending_offload: list[tuple[int, bytes, list[int], bytes]] = []

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
        request.num_registered_blocks = 0

    # ---- prefix cache -----------------------------------------------------------------
    def block_hashes(self, request: Request) -> list[bytes]:
        """The request's chained block hashes over its full blocks so far (extended lazily)."""
        hashes, bs, tokens = request.block_hashes, self.block_size, request.all_token_ids
        for i in range(len(hashes), len(tokens) // bs):
            parent = hashes[i - 1] if i else None
            hashes.append(hash_block(parent, tokens[i * bs:(i + 1) * bs], request.cache_key if i == 0 else b""))
        return hashes

    def can_use_cache(self, request: Request) -> bool:
        """Cached KV is usable unless the request still needs prompt logprobs (they need the
        logits of every prompt position) or it is a fork that shares its source's prompt."""
        if not self.enable_prefix_caching or request.num_computed_tokens or request.block_ids:
            return False
        if request.fork_source is not None:
            return False
        plp = request.sampling_params.prompt_logprobs
        return plp is None or request.num_prompt_logprobs_done >= request.num_prompt_tokens - 1

    def max_cached_blocks(self, request: Request) -> int:
        # at least one token is computed, so that the step produces logits to sample from
        return (request.num_tokens - 1) // self.block_size

    def count_cached_blocks(self, request: Request) -> int:
        """Leading blocks found in the pool by hash alone (cheap; used to order the queue)."""
        if not self.can_use_cache(request):
            return 0
        cached = self.pool.cached
        n = 0
        for h in self.block_hashes(request)[:self.max_cached_blocks(request)]:
            if h not in cached:
                break
            n += 1
        return n

    def find_cached_prefix(self, request: Request) -> CachedPrefix:
        """Confirmed leading blocks of the request in the pool, then in the lower tiers
        (`contains` only; the tier data is read in `take_cached_prefix`)."""
        found = CachedPrefix([])
        if not self.can_use_cache(request):
            return found
        hashes = self.block_hashes(request)
        limit = self.max_cached_blocks(request)
        tokens, bs = request.all_token_ids, self.block_size
        i = 0
        while i < limit:
            block = self.pool.lookup(hashes[i], hashes[i - 1] if i else None, tuple(tokens[i * bs:(i + 1) * bs]))
            if block is None:
                break
            found.block_ids.append(block.block_id)
            i += 1
        while i < limit and self.tiers:
            tier = next((t for t in self.tiers if t.contains(hashes[i])), None)
            if tier is None:
                break
            found.tier_blocks.append((i, tier))
            i += 1
        return found

    def blocks_to_admit(self, request: Request, found: CachedPrefix, num_new_tokens: int) -> int:
        """Free blocks an admission takes: new blocks for the tier loads and the computed tokens,
        plus cached pool blocks that sit in the free queue now."""
        num_cached_tokens = found.num_blocks() * self.block_size
        new = cdiv(num_cached_tokens + num_new_tokens, self.block_size) - len(found.block_ids)
        revived = sum(1 for b in found.block_ids if self.pool.blocks[b].ref_cnt == 0)
        return new + revived

    def take_cached_prefix(self, request: Request, found: CachedPrefix) -> list[tuple[int, object]]:
        """Give `request` the found blocks: pool blocks by reference, tier blocks loaded into new
        blocks (verified on load; the first failed load ends the prefix there). Sets
        num_computed_tokens and returns (block id, payload) pairs the runner copies in before
        the forward. The caller has checked blocks_to_admit() against the free blocks."""
        bs = self.block_size
        self.pool.touch(found.block_ids)
        request.block_ids = list(found.block_ids)
        num_pool = len(found.block_ids)
        loads: list[tuple[int, object]] = []
        hashes, tokens = request.block_hashes, request.all_token_ids
        for i, tier in found.tier_blocks:
            payload = tier.load(hashes[i], tokens[:(i + 1) * bs], request.cache_key)
            if payload is None:
                break
            bid = self.pool.allocate(1)[0]
            self.pool.register(bid, hashes[i], hashes[i - 1] if i else None, tuple(tokens[i * bs:(i + 1) * bs]))
            request.block_ids.append(bid)
            loads.append((bid, payload))
            self.stats.tier_hits[tier.name] += bs
        request.num_computed_tokens = len(request.block_ids) * bs
        request.num_registered_blocks = len(request.block_ids)
        self.stats.queries += request.num_tokens
        self.stats.hits += num_pool * bs
        return loads

    def note_uncached_admission(self, request: Request) -> None:
        """Count a lookup that found nothing (for the hit-rate metrics)."""
        if self.can_use_cache(request):
            self.stats.queries += request.num_tokens

    def cache_computed_blocks(self, request: Request) -> None:
        """Register the request's blocks whose KV is now computed, and queue them for the tiers."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(request.num_computed_tokens // bs, len(request.block_ids))
        if num_full <= request.num_registered_blocks:
            return
        hashes, tokens = self.block_hashes(request), request.all_token_ids
        for i in range(request.num_registered_blocks, num_full):
            bid = request.block_ids[i]
            block_tokens = tuple(tokens[i * bs:(i + 1) * bs])
            if self.pool.register(bid, hashes[i], hashes[i - 1] if i else None, block_tokens) and self.tiers:
                if not all(t.contains(hashes[i]) for t in self.tiers):
                    self.pending_offload.append((bid, hashes[i], tokens[:(i + 1) * bs], request.cache_key))
        request.num_registered_blocks = num_full

    def take_pending_offload(self) -> list[tuple[int, bytes, list[int], bytes]]:
        out, self.pending_offload = self.pending_offload, []
        self.stats.stored_blocks += len(out)
        return out

    def reset_prefix_cache(self) -> int:
        return self.pool.reset_cache()
