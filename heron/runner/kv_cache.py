"""Allocation of the paged KV cache: one tensor per layer, [2, num_blocks, block_size, Hkv, D]."""
from __future__ import annotations

import math

import numpy as np
import torch


def kv_bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return num_layers * 2 * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def num_blocks_for_memory(gib: float, bytes_per_block: int) -> int:
    return int(gib * 2**30) // bytes_per_block


def allocate_kv_caches(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                       dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    # zeros, not empty: padded reads of never-written slots must be finite (masked, but 0 * NaN = NaN)
    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    if torch.device(device).type != "cpu":
        return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
    # On CPU the pool comes from calloc (numpy.zeros), whose large allocations are fresh zero
    # pages mapped on first write: resident memory grows with the blocks actually used instead
    # of the whole --kv-cache-memory up front (torch.zeros would write every page now).
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return [torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape) for _ in range(num_layers)]
