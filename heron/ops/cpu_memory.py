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

`KVPrefaulter` then maps the pool's pages in ahead of use, on a background thread of the lowest
CPU priority (SCHED_IDLE: it runs only on a core nothing else wants), in the order the block
pool hands blocks out. A first write to a fresh page costs ~18x a warm one here (kernel page
fault + zeroing: 2.5 against 0.14 ms for a 2,048-token K/V write), which an engine otherwise
pays inside its first steps; vLLM pays it at start-up (it zero-fills its pool). It uses
madvise(MADV_POPULATE_WRITE) (Linux 5.14+), which maps pages without changing their contents, so
it never races with the engine's own writes; where that is refused it does nothing. The whole
pool then becomes resident, as --kv-cache-memory says it may.

HERON_NO_MALLOC_TUNING=1 / HERON_NO_HUGE_PAGES=1 / HERON_NO_KV_PREFAULT=1 turn each off.
"""
from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import logging
import os
import sys
import threading

import torch

logger = logging.getLogger(__name__)

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20          # glibc's ceiling on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 2 ** 31 - 1           # mallopt takes an int: ~2 GiB free at the top before trimming
MADV_HUGEPAGE = 14
MADV_POPULATE_WRITE = 23
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


class KVPrefaulter:
    """Maps the pages of a CPU KV pool in ahead of use on a SCHED_IDLE thread (module docstring).
    `tensors`: the per-layer caches [2, num_blocks, ...]; pages are populated a chunk of
    `chunk_blocks` blocks at a time across all layers and K/V halves, lowest block ids first (the
    block pool hands those out first). `wait()` blocks until done; `stop()` ends it early."""

    def __init__(self, tensors: list[torch.Tensor], chunk_blocks: int = 256) -> None:
        self.done = threading.Event()
        self.bytes_done = 0
        self._stop = threading.Event()
        self._thread = None
        libc = _libc()
        if (not tensors or libc is None or tensors[0].device.type != "cpu"
                or os.environ.get("HERON_NO_KV_PREFAULT", "") not in ("", "0")):
            self.done.set()
            return
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self._libc = libc
        self._tensors = tensors   # kept alive while their pages are being mapped
        # the (address, length) ranges, in order: the thread then makes no torch calls
        page = os.sysconf("SC_PAGE_SIZE")
        num_blocks = tensors[0].shape[1]
        block_bytes = tensors[0][0, 0].numel() * tensors[0].element_size()
        self._ranges = []
        for b0 in range(0, num_blocks, chunk_blocks):
            n = min(chunk_blocks, num_blocks - b0) * block_bytes
            for cache in tensors:
                for half in (0, 1):
                    start = cache[half, b0].data_ptr()
                    lo = start & ~(page - 1)
                    self._ranges.append((lo, start + n - lo))
        atexit.register(self.stop)   # never left inside a system call while the interpreter exits
        self._thread = threading.Thread(target=self._run, name="heron-kv-prefault", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))   # this thread only
        except (AttributeError, OSError):
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
            except (AttributeError, OSError):
                pass
        try:
            for addr, length in self._ranges:
                if self._stop.is_set():
                    return
                if self._libc.madvise(addr, length, MADV_POPULATE_WRITE) != 0:
                    logger.debug("madvise(MADV_POPULATE_WRITE) refused (errno %d): no KV prefault",
                                 ctypes.get_errno())
                    return
                self.bytes_done += length
        finally:
            self._tensors = self._ranges = None   # the pool's memory is the engine's again
            atexit.unregister(self.stop)
            self.done.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
