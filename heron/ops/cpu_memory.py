"""Host-memory settings for CPU inference: keep freed tensor memory in the process, and back the
KV pool with transparent huge pages.

Why: on the VMs heron is measured on a page fault costs ~2-13 us (4 KiB), and glibc's defaults
turn every step's big temporaries into fresh pages:
- allocations of 32 MiB and more (the dynamic mmap threshold's ceiling) are mmaps of their own,
  unmapped again when freed;
- freed memory at the top of the heap is returned to the kernel once more than twice the mmap
  threshold lies free there (M_TRIM_THRESHOLD), so the next step's 16 MB MLP activation faults
  its pages in again. A bf16 MLP of 2048 tokens (gate/up 640 -> 2 x 2048, GELU, down) took 86 ms
  that way against 27 ms with trimming off (same process, 2 GiB resident).
`tune_malloc()` fixes the mmap threshold at its ceiling (no dynamic lowering) and turns trimming
off, so a steady-state step allocates from memory the process already holds. Peak resident memory
is unchanged (it is what the largest step needs); memory freed after a peak stays with the
process, as with PyTorch's own caching allocators on GPUs.

The KV pool is calloc'd (fresh zero pages, resident only once written); `advise_huge_pages()`
asks for 2 MiB pages on it (the system's THP mode is usually "madvise"), so writing new KV slots
costs one fault per 2 MiB instead of one per 4 KiB.

HERON_NO_MALLOC_TUNING=1 / HERON_NO_HUGE_PAGES=1 turn either off.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

import torch

logger = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20          # glibc's ceiling on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 2 ** 31 - 1           # mallopt takes an int: ~2 GiB free at the top before trimming
MADV_HUGEPAGE = 14
HUGE_PAGE = 2 << 20

_malloc_tuned: bool | None = None


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def tune_malloc() -> bool:
    """Once per process: glibc keeps freed memory instead of unmapping/trimming it (see the module
    docstring). True when the settings are in effect."""
    global _malloc_tuned
    if _malloc_tuned is not None:
        return _malloc_tuned
    _malloc_tuned = False
    if os.environ.get("HERON_NO_MALLOC_TUNING", "") not in ("", "0"):
        return False
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX) == 1
    ok = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    _malloc_tuned = ok
    if not ok:
        logger.debug("mallopt was refused; glibc's default mmap/trim thresholds stay")
    return ok


def thp_mode() -> str | None:
    """The system's transparent-huge-page mode ("always", "madvise", "never"), None if unknown."""
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def advise_huge_pages(tensor: torch.Tensor) -> int:
    """madvise(MADV_HUGEPAGE) over the 2 MiB-aligned part of a CPU tensor's memory. Returns the
    bytes advised (0 when off, not applicable or refused; nothing about the tensor changes)."""
    if tensor.device.type != "cpu" or os.environ.get("HERON_NO_HUGE_PAGES", "") not in ("", "0"):
        return 0
    if thp_mode() != "madvise":        # "always": already huge; "never"/unknown: nothing to ask
        return 0
    libc = _libc()
    if libc is None:
        return 0
    ptr = tensor.data_ptr()
    nbytes = tensor.untyped_storage().nbytes() - (ptr - tensor.untyped_storage().data_ptr())
    start = (ptr + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1)
    end = (ptr + nbytes) & ~(HUGE_PAGE - 1)
    if end <= start:
        return 0
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.madvise(start, end - start, MADV_HUGEPAGE) != 0:
        logger.debug("madvise(MADV_HUGEPAGE) failed: errno %d", ctypes.get_errno())
        return 0
    return end - start
