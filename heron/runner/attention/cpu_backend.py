"""CPU backend: decode rows through a C++ paged-attention kernel that reads the KV blocks in
place (no gathered copy of the context); prefill chunks as in the torch backend.

The kernel is compiled on first use with torch's C++ extension tooling (about 30 s, once per
machine; cached under $HERON_CACHE_DIR/kernels, default ~/.cache/heron/kernels, keyed by the
source, torch version and CPU flags). If no compiler is available the engine falls back to
the portable torch backend.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

import torch

from heron.runner.attention.base import AttentionMetadata, AttentionSpec
from heron.runner.attention.torch_backend import TorchAttentionBackend

logger = logging.getLogger(__name__)
_SRC = Path(__file__).with_name("csrc") / "paged_attention_cpu.cpp"
_lock = threading.Lock()
_module = None
_error: str | None = None


def _cache_root() -> Path:
    return Path(os.environ.get("HERON_CACHE_DIR", Path.home() / ".cache" / "heron"))


def _cpu_flags() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def load_kernel():
    """Build (once) and return the extension module, or None if it cannot be built."""
    global _module, _error
    with _lock:
        if _module is not None or _error is not None:
            return _module
        try:
            from torch.utils.cpp_extension import load_inline
            src = _SRC.read_text()
            key = hashlib.sha256((src + torch.__version__ + _cpu_flags()).encode()).hexdigest()[:16]
            name = f"heron_paged_attention_{key}"
            build_dir = _cache_root() / "kernels" / name
            build_dir.mkdir(parents=True, exist_ok=True)
            if not (build_dir / f"{name}.so").exists():
                logger.info("compiling the CPU paged-attention kernel (one-off, ~30 s) in %s", build_dir)
            _module = load_inline(name=name, cpp_sources=[src], functions=["paged_decode"],
                                  extra_cflags=["-O3", "-march=native", "-fopenmp"],
                                  build_directory=str(build_dir), verbose=False)
        except Exception as e:  # no compiler, no ninja, unsupported platform ...
            _error = f"{type(e).__name__}: {e}"
            logger.warning("CPU paged-attention kernel unavailable (%s); using the torch backend", _error[:300])
        return _module


class CpuAttentionBackend(TorchAttentionBackend):
    name = "cpu"

    def __init__(self) -> None:
        self.kernel = load_kernel()
        if self.kernel is None:
            raise RuntimeError(f"the CPU attention kernel could not be built: {_error}")

    def _decode(self, spec: AttentionSpec, q: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        if spec.logit_softcap is not None or q.device.type != "cpu":
            return super()._decode(spec, q, kv_cache, meta)
        return self.kernel.paged_decode(q.contiguous(), kv_cache, meta.decode_block_tables, meta.decode_seq_lens,
                                        spec.sliding_window or 0, spec.scale)
