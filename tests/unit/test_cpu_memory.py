"""heron.ops.cpu_memory: glibc keeps freed memory (mallopt) and the KV pool asks for huge pages."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from heron.ops import cpu_memory
from heron.runner.kv_cache import allocate_kv_caches

glibc = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt / madvise are Linux-only")

_PROBE = ("import heron.ops.cpu_memory as m; print(m.tune_malloc(), m.tune_malloc())")


@glibc
def test_tune_malloc_applies_once_and_can_be_turned_off():
    on = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True)
    assert on.stdout.split() == ["True", "True"]
    off = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True,
                         env={"HERON_NO_MALLOC_TUNING": "1", "PATH": ""})
    assert off.stdout.split() == ["False", "False"]


def test_thp_mode_parses_the_bracketed_choice(tmp_path, monkeypatch):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: real_open(f if "transparent_hugepage" in str(p) else p,
                                                                        *a, **k))
    assert cpu_memory.thp_mode() == "madvise"
    f.write_text("[never]\n")
    assert cpu_memory.thp_mode() == "never"


@glibc
def test_advise_huge_pages_covers_the_aligned_interior_and_keeps_the_data(monkeypatch):
    monkeypatch.setattr(cpu_memory, "thp_mode", lambda: "madvise")
    t = torch.from_numpy(np.zeros(9 << 20, dtype=np.uint8))
    t[::4096] = 7
    advised = cpu_memory.advise_huge_pages(t)
    assert advised % cpu_memory.HUGE_PAGE == 0 and 3 * cpu_memory.HUGE_PAGE <= advised <= t.numel()
    assert int(t[::4096].sum()) == 7 * (t.numel() // 4096) and int(t.sum()) == 7 * (t.numel() // 4096)
    assert cpu_memory.advise_huge_pages(torch.zeros(1000, dtype=torch.uint8)) == 0    # smaller than a huge page
    monkeypatch.setenv("HERON_NO_HUGE_PAGES", "1")
    assert cpu_memory.advise_huge_pages(t) == 0
    monkeypatch.delenv("HERON_NO_HUGE_PAGES")
    monkeypatch.setattr(cpu_memory, "thp_mode", lambda: "never")
    assert cpu_memory.advise_huge_pages(t) == 0


def test_kv_pool_is_advised_and_zero(monkeypatch):
    advised = []
    monkeypatch.setattr(cpu_memory, "advise_huge_pages", lambda t: advised.append(t.data_ptr()) or 0)
    caches = allocate_kv_caches(3, 64, 16, 1, 256, torch.bfloat16, torch.device("cpu"))
    assert advised == [c.data_ptr() for c in caches]
    assert all(c.shape == (2, 64, 16, 1, 256) and not c.any() for c in caches)


def _resident_fraction(t: torch.Tensor) -> float:
    """Fraction of the tensor's pages that are resident, from mincore(2) (exact, unlike VmRSS,
    whose per-CPU counters can lag by many faults)."""
    import ctypes
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    page = 4096
    start = t.data_ptr() & ~(page - 1)
    length = t.data_ptr() + t.numel() * t.element_size() - start
    vec = (ctypes.c_ubyte * (-(-length // page)))()
    assert libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(length), vec) == 0, ctypes.get_errno()
    return sum(b & 1 for b in vec) / len(vec)


@glibc
def test_kv_prefaulter_maps_the_pool_in_and_keeps_its_contents(monkeypatch):
    """The prefault thread makes the pool resident without writing to it: KV written before
    and while it runs stays as written, never-written slots stay zero."""
    monkeypatch.delenv("HERON_NO_KV_PREFAULT", raising=False)
    import ctypes
    import mmap
    probe = mmap.mmap(-1, 4096)
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(probe))
    if libc.madvise(ctypes.c_void_p(addr), ctypes.c_size_t(4096), cpu_memory.MADV_POPULATE_WRITE) != 0:
        pytest.skip("madvise(MADV_POPULATE_WRITE) is refused by this kernel (Linux < 5.14): no prefault")
    # caches on fresh anonymous mappings (a calloc'd pool can come from heap memory the process
    # already holds, resident from the start), 2 x 16 MiB
    maps = [mmap.mmap(-1, 2 * 1024 * 16 * 256 * 2) for _ in range(2)]
    caches = [torch.frombuffer(m, dtype=torch.bfloat16).view(2, 1024, 16, 1, 256) for m in maps]
    caches[1][1, 300].fill_(1.5)
    assert _resident_fraction(caches[0]) < 0.5
    pf = cpu_memory.KVPrefaulter(caches, chunk_blocks=256)
    caches[0][0, 7].fill_(-2.0)
    assert pf.wait(timeout=60)
    assert pf.bytes_done >= sum(c.numel() * c.element_size() for c in caches) - 2 * 2 * 4096
    assert all(_resident_fraction(c) > 0.99 for c in caches)
    assert bool((caches[1][1, 300] == 1.5).all()) and bool((caches[0][0, 7] == -2.0).all())
    caches[1][1, 300].zero_()
    caches[0][0, 7].zero_()
    assert not any(bool(c.any()) for c in caches)


def test_kv_prefaulter_can_be_turned_off_and_stopped(monkeypatch):
    caches = allocate_kv_caches(2, 64, 16, 1, 256, torch.bfloat16, torch.device("cpu"))
    monkeypatch.setenv("HERON_NO_KV_PREFAULT", "1")
    off = cpu_memory.KVPrefaulter(caches)
    assert off.done.is_set() and off.bytes_done == 0
    monkeypatch.delenv("HERON_NO_KV_PREFAULT")
    pf = cpu_memory.KVPrefaulter(caches)
    pf.stop()                     # joins the thread, early or after the last range
    assert not pf._thread.is_alive() and pf.done.is_set()
