"""heron's C++ CPU kernels (heron/ops/csrc/cpu_kernels.cpp): paged-attention decode (over a KV
cache in the model dtype or in 8-bit codes + per-row scales, --kv-cache-dtype int8|fp8) and a
row argmax over bf16/float32 logits.

Compiled on first use with torch's C++ extension tooling (about 30 s, once per machine;
cached under $HERON_CACHE_DIR/kernels, default ~/.cache/heron/kernels, keyed by the source,
torch version and CPU flags). Callers fall back to plain torch when no compiler is available.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)
_SRC = Path(__file__).with_name("csrc") / "cpu_kernels.cpp"
_lock = threading.Lock()
_module = None
_error: str | None = None


def _cache_root() -> Path:
    return Path(os.environ.get("HERON_CACHE_DIR", Path.home() / ".cache" / "heron"))


def cpu_flags() -> str:
    """The `flags` line of /proc/cpuinfo (empty where there is none)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


_FUNCTIONS = ["paged_decode", "paged_part", "paged_part_supported", "merge_part", "argmax_rows", "rms_norm",
              "act_and_mul", "rope", "qk_norm_rope", "gemv", "gemv_supported", "gemv_q8", "gemv_q4",
              "gemv_q4_supported", "gemv_q8g", "gemv_q8_max_rows", "gemv_q4_block", "gemv_q4_max_rows",
              "dequant_q4", "dequant_q4_rows", "int4_mse_grid"]


def load_kernel():
    """Build (once) and return the extension module, or None if it cannot be built."""
    global _module, _error
    if _module is not None:   # built: no lock (the per-op fast path of every fused call)
        return _module
    with _lock:
        if _module is not None or _error is not None:
            return _module
        try:
            src = _SRC.read_text()
            key = hashlib.sha256((src + torch.__version__ + cpu_flags()).encode()).hexdigest()[:16]
            name = f"heron_cpu_kernels_{key}"
            build_dir = _cache_root() / "kernels" / name
            build_dir.mkdir(parents=True, exist_ok=True)
            _module = _load_or_build(name, src, build_dir)
        except Exception as e:  # no compiler, no ninja, unsupported platform ...
            _error = f"{type(e).__name__}: {e}"
            logger.warning("CPU kernels unavailable (%s); using plain torch", _error[:300])
        return _module


def _load_or_build(name: str, src: str, build_dir: Path):
    """The module from build_dir, built first if needed, one process at a time.

    torch's build (load_inline) guards a build directory with a lock *file* that a process killed
    mid-call (Ctrl-C at start-up, a killed test run) leaves behind, after which every later
    load_inline of that directory waits for it forever. So heron serialises on a flock(2) lock of
    its own, which the kernel drops when its holder dies; under it, a built library is imported
    directly, and torch's lock file, if one is there, can only be stale and is removed."""
    import fcntl
    so = build_dir / f"{name}.so"
    with open(build_dir / "heron.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if so.exists():
            try:
                return _import_built(name, so)
            except ImportError as e:   # a library cut short by a killed link step: build it again
                logger.warning("rebuilding heron's CPU kernels: %s", e)
                so.unlink()
        (build_dir / "lock").unlink(missing_ok=True)
        from torch.utils.cpp_extension import load_inline
        logger.info("compiling heron's CPU kernels (one-off, ~30 s) in %s", build_dir)
        return load_inline(name=name, cpp_sources=[src], functions=_FUNCTIONS,
                           extra_cflags=["-O3", "-march=native", "-fopenmp"],
                           build_directory=str(build_dir), verbose=False)


def _import_built(name: str, path: Path):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def kernel_error() -> str | None:
    """Why the kernels could not be built (None if they were, or were not tried yet)."""
    return _error


def argmax_rows(logits: torch.Tensor) -> torch.Tensor | None:
    """Index of the first maximum of each row of a [R, V] float32/bf16 CPU tensor (rows or
    columns contiguous), or None when the kernel is unavailable for this input."""
    if logits.device.type != "cpu" or logits.dtype not in (torch.bfloat16, torch.float32) or logits.dim() != 2:
        return None
    if logits.stride(1) != 1 and logits.stride(0) != 1:
        return None
    mod = load_kernel()
    return None if mod is None else mod.argmax_rows(logits)


def fused_ops(x: torch.Tensor, float32: bool = False):
    """The kernels module when `x` can take the fused CPU ops, else None: bf16 x (rms_norm,
    act_and_mul, rope, reproducing torch's bf16 rounding steps), or float32 x when `float32` is
    set (rms_norm, rope, act_and_mul, and Gemma's q/k norms with rope in one call, qk_norm_rope).
    float32 models keep the plain torch expressions, which match HF's bit for bit; quantized
    ones, which have no such reference, set `float32` (a decode step of the default model then
    makes ~300 fewer small torch calls)."""
    if not x.is_cpu or _disabled or not (x.dtype == torch.bfloat16 or float32 and x.dtype == torch.float32):
        return None
    return load_kernel()


_disabled = os.environ.get("HERON_NO_FUSED_OPS", "") not in ("", "0")


def quant_gemv_kernels():
    """The kernels module when its int8/int4 GEMVs (heron.quant.weight_only) can run here (built,
    AVX512-BF16 or AVX2 with FMA, not disabled by HERON_NO_FUSED_OPS), else None."""
    if _disabled:
        return None
    ops = load_kernel()
    return ops if ops is not None and ops.gemv_q8_max_rows() > 0 else None


def small_batch_gemv(x: torch.Tensor, weight: torch.Tensor, max_rows: int = 4):
    """The kernels module when `x @ weight.T` can run on the streaming bf16 GEMV kernel
    (1-max_rows rows of a 2-D bf16 CPU input, max_rows <= 16, contiguous weight, K a multiple
    of 32, AVX512-BF16), else None."""
    if (x.dim() != 2 or not 1 <= x.shape[0] <= max_rows or x.dtype != torch.bfloat16 or x.device.type != "cpu"
            or weight.dtype != torch.bfloat16 or not weight.is_contiguous() or x.shape[1] % 32 or _disabled):
        return None
    ops = load_kernel()
    return ops if ops is not None and ops.gemv_supported() else None
