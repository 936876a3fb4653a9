"""Allocation of the paged KV cache: one tensor per layer, [2, num_blocks, block_size, Hkv, D].

`--kv-cache-dtype auto` keeps K/V in the model dtype. `int8` and `fp8` store 8-bit codes with
one float32 scale per (token, kv head): each row of a layer's tensor is `D` codes followed by
the 4 bytes of its scale, so a layer is one tensor `[2, num_blocks, block_size, Hkv, D + 4]`
whose dtype (torch.int8 or torch.float8_e4m3fn) says how to read the codes. Everything that
moves whole blocks (copy-on-write, the prefix cache's tiers) moves codes and scales together.

int8: symmetric, scale = amax / 127, code = round(x / scale) in [-127, 127].
fp8:  float8_e4m3fn, scale = amax / 448, code = fp8(x / scale) (round to nearest even).
A row of zeros has scale 0 and codes 0. Rows are quantized when they are written, once: a
row's scale is that of its own values (no block-wide scale to revise as a block fills).
"""
from __future__ import annotations

import math

import numpy as np
import torch

KV_CACHE_DTYPES = ("auto", "int8", "fp8")
SCALE_BYTES = 4                         # float32 scale after the codes of every (token, head) row
_QMAX = {"int8": 127.0, "fp8": 448.0}


def kv_code_dtype(kv_cache_dtype: str) -> torch.dtype | None:
    """The storage dtype of the 8-bit codes, or None for `auto` (the model dtype)."""
    if kv_cache_dtype == "auto":
        return None
    if kv_cache_dtype == "int8":
        return torch.int8
    if kv_cache_dtype == "fp8":
        fp8 = getattr(torch, "float8_e4m3fn", None)
        if fp8 is None:
            raise ValueError(f"kv_cache_dtype 'fp8' needs torch.float8_e4m3fn (torch >= 2.1; this is "
                             f"torch {torch.__version__}); use 'int8' or 'auto'")
        return fp8
    raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {kv_cache_dtype!r}")


def is_quantized_cache(kv_cache: torch.Tensor) -> bool:
    """True for a per-layer cache of 8-bit codes + scales (see the module docstring)."""
    return kv_cache.element_size() == 1


def _qmax(code_dtype: torch.dtype) -> float:
    return _QMAX["int8"] if code_dtype == torch.int8 else _QMAX["fp8"]


def quantize_kv(x: torch.Tensor, code_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] (any float dtype) -> (codes [..., D] code_dtype, scales [..., 1] float32).
    The C++ writer (heron/ops/csrc/cpu_kernels.cpp, write_kv) does the same float32 operations,
    so both produce the same bytes."""
    xf = x.float()
    qmax = _qmax(code_dtype)
    scale = xf.abs().amax(dim=-1, keepdim=True) / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = (xf / safe).clamp_(-qmax, qmax)
    codes = y.round_().to(torch.int8) if code_dtype == torch.int8 else y.to(code_dtype)
    return codes, scale


def pack_kv_rows(x: torch.Tensor, code_dtype: torch.dtype) -> torch.Tensor:
    """x [T, H, D] -> rows [T, H, D + 4] as uint8: the codes, then the float32 scale's bytes."""
    codes, scale = quantize_kv(x, code_dtype)
    return torch.cat([codes.view(torch.uint8), scale.view(torch.uint8)], dim=-1)


def unpack_kv_rows(rows: torch.Tensor, code_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """rows [..., D + 4] (uint8 or the code dtype) -> (codes [..., D] code_dtype, scales [..., 1] float32).
    Views where possible (the scales need a 4-byte aligned row stride, which D % 4 == 0 gives)."""
    rows = rows.view(torch.uint8)
    d = rows.shape[-1] - SCALE_BYTES
    codes = rows[..., :d].view(code_dtype)
    scale_bytes = rows[..., d:]
    try:
        scales = scale_bytes.view(torch.float32)
    except RuntimeError:  # unaligned view: copy the few scale bytes
        scales = scale_bytes.contiguous().view(torch.float32)
    return codes, scales


def dequantize_kv_rows(rows: torch.Tensor, code_dtype: torch.dtype, dtype: torch.dtype) -> torch.Tensor:
    """rows [..., D + 4] -> values [..., D] in `dtype` (code * scale in float32, then rounded once)."""
    codes, scales = unpack_kv_rows(rows, code_dtype)
    out = codes.float().mul_(scales)
    return out if dtype == torch.float32 else out.to(dtype)


def kv_row_width(head_dim: int, code_dtype: torch.dtype | None) -> int:
    """Elements per (token, head) row of the cache tensor: D, or D codes + the scale's 4 bytes."""
    return head_dim if code_dtype is None else head_dim + SCALE_BYTES


def kv_bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                       code_dtype: torch.dtype | None = None) -> int:
    """Bytes of one block across all layers (keys and values; with 8-bit codes, their scales too)."""
    if code_dtype is not None:
        return num_layers * 2 * block_size * num_kv_heads * (head_dim + SCALE_BYTES)
    return num_layers * 2 * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def num_blocks_for_memory(gib: float, bytes_per_block: int) -> int:
    return int(gib * 2**30) // bytes_per_block


def allocate_kv_caches(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                       dtype: torch.dtype, device: torch.device,
                       code_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Per layer [2, num_blocks, block_size, Hkv, D] in `dtype`, or with `code_dtype` (8-bit codes)
    [2, num_blocks, block_size, Hkv, D + 4] in `code_dtype` (codes + float32 scale per row)."""
    if code_dtype is not None:
        if head_dim % SCALE_BYTES:
            raise ValueError(f"an 8-bit KV cache needs head_dim to be a multiple of {SCALE_BYTES} (the scales "
                             f"follow each row of codes); this model's head_dim is {head_dim}; use "
                             f"kv_cache_dtype 'auto'")
        dtype = code_dtype
    # zeros, not empty: padded reads of never-written slots must be finite (masked, but 0 * NaN = NaN)
    shape = (2, num_blocks, block_size, num_kv_heads, kv_row_width(head_dim, code_dtype))
    if torch.device(device).type != "cpu":
        return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
    # On CPU the pool comes from calloc (numpy.zeros), whose large allocations are fresh zero
    # pages mapped on first write: resident memory grows with the blocks actually used instead
    # of the whole --kv-cache-memory up front (torch.zeros would write every page now).
    # Its pages are asked to be 2 MiB ones (heron.ops.cpu_memory): writing new slots then faults
    # once per 2 MiB instead of once per 4 KiB.
    from heron.ops.cpu_memory import advise_huge_pages
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    caches = [torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape) for _ in range(num_layers)]
    for cache in caches:
        advise_huge_pages(cache)
    return caches
