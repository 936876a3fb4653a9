"""`--quantization`: swap the weights of a loaded model's linear layers (and its LM head) for
quantized ones, as a transform after loading; the model files do not change.

Weight-only methods (heron.quant.weight_only): `int8` (symmetric, per output channel, or
group-wise with `--quantization-group-size`: float32 sums in heron's gemv_q8g) and
`int4` (asymmetric, group-wise along the input, round-to-nearest on the grid with the smallest
squared error per group: weight_only.mse_int4_codes; `--quantization-group-size`, default 64).
The layers keep only the packed weight, and run heron's GEMV kernels on it for few rows
(gemv_q8 / gemv_q4, where built) or torch's packed CPU kernels (`_weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu`): activations stay in the model dtype.
When the LM head is tied to the token embedding (Gemma), the embedding looks its rows up in
the LM head's quantized weight (dequantizing only the rows it needs), so the 262k x 640 table
is kept once, quantized. `--quantization-lm-head int8|int4` gives the LM head a format of its own.

`gguf` (heron.quant.gguf_native) keeps a GGUF file's own quantized weights instead: each layer
gets the closest of these formats, decoded from the file's blocks (Q4_0/Q4_1/Q4_K exactly into
int4 group 32; 5-bit and up re-quantized to int8 per channel).

The rule per batch size: those kernels stream the packed weight once per pass (a pass takes up
to 4-16 rows; on AVX2, int4 from 16 rows and group-wise int8 from 8 work GEMM-style on
dequantized tiles in cache instead, in one call), which wins while a step has few rows (1 row:
int4 4.7x and int8 2x faster than bf16 on the LM head); with many rows the other way,
dequantizing the weight to the model dtype and running the ordinary matmul, wins once the
matmul's speed pays for the dequantization. So a call with at most `kernel_max_rows()` rows
runs the kernel, and a larger one (prefill chunks, big decode batches) dequantizes; nothing but
the quantized weight stays resident. Where the limit lies depends on the CPU:
- AVX512-BF16 / AMX (oneDNN's bf16 matmul is fast): 4 rows for the linear layers, where the
  packed kernels were measured 3-5x slower than bf16's blocked matmul at 64 rows.
- CPUs without (AVX2): float32 matmuls run at about the kernels' own rate, so the kernel
  wins up to 256 rows for int4 and 64 for int8 (measured on a Zen 3 VM, int4 GEMM-style,
  against dequantize + float32 matmul, the four Gemma 3 270M layer shapes summed: 128 rows
  18.3 vs 28.8 ms, 256 rows 36.3 vs 46.4 ms, 512 rows 66.4 vs 69.2 ms, 1024 rows 137 vs 129 ms;
  in passes of 4 rows before, 128 rows of 4096 x 640 took 8.7 ms against 15.5 ms).
- The LM head (262k x 640 for Gemma 3), on every CPU: up to 256 rows. Dequantizing its 168M
  weights costs ~1.1 s (int4) / 0.6 s (int8) a call on the Zen 3 VM, against 85 ms for 16 rows
  in kernel passes (measured there; on the AVX-512 VMs the same order of costs is expected, not
  timed). Only decode and verification rows reach it.
A self-draft (heron.spec) borrows full-precision layers for its calls above the limit. Blocked
int4 weights (heron's GEMV layout) dequantize in C++ (`dequant_q4`), the others with torch ops.

`w8a8` (heron.quant.w8a8) is for the large calls instead: int8 weights per output channel and
activations quantized per token at run time, multiplied as integers by oneDNN (VNNI/AMX-INT8);
its small calls use the int8 weight-only kernel as above.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

from heron.quant.weight_only import INT4_GROUP_SIZES, INT8_GROUP_SIZES, METHODS

KERNEL_MAX_ROWS = 4            # linear layers, CPUs with fast bf16 matmuls (and w8a8 everywhere)
STREAM_MAX_ROWS = {"int4": 256, "int8": 64}   # linear layers, CPUs without (see the rule above)
LM_HEAD_KERNEL_MAX_ROWS = 256  # the LM head, every CPU
W8A8_LM_HEAD_MAX_ROWS = 8      # a w8a8 LM head: the integer matmul above this


def kernel_max_rows(qweight, lm_head: bool = False) -> int:
    """The most rows a call on `qweight` runs on the quantized kernel (the rule above)."""
    if getattr(qweight, "matmul_large", None) is not None:    # w8a8: its integer matmul above 4 (8)
        return W8A8_LM_HEAD_MAX_ROWS if lm_head else KERNEL_MAX_ROWS
    if lm_head:
        return LM_HEAD_KERNEL_MAX_ROWS
    if _fast_bf16_matmul():
        return KERNEL_MAX_ROWS
    return STREAM_MAX_ROWS.get(getattr(qweight, "method", ""), KERNEL_MAX_ROWS)


_FAST_BF16: list[bool] = []


def _fast_bf16_matmul() -> bool:
    if not _FAST_BF16:
        from heron.config import cpu_has_fast_bf16
        _FAST_BF16.append(cpu_has_fast_bf16())
    return _FAST_BF16[0]


def quantized_linear(qweight, x: torch.Tensor, lm_head: bool = False) -> torch.Tensor:
    """x @ W^T for a quantized W, by the rule above."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows <= kernel_max_rows(qweight, lm_head):
        return qweight.matmul(x)
    large = getattr(qweight, "matmul_large", None)       # w8a8: an integer matmul
    if large is not None:
        return large(x)
    return torch.nn.functional.linear(x, qweight.dequantize(x.dtype))


# `--quantization int8` (per output channel) gives the LM head, and a tied embedding, one scale per
# this many input columns instead: per-row scales on the default model's 262k-row head moved the
# logits enough that greedy decoding left bf16's on 45 of 64 `heron eval agreement` prompts
# (19/64 agreed; groups of 64: 40/64, +6% bytes for the head; on an AVX2 VM the same single-row
# speed, ~1.25x the head's time at 4 rows, and from 8 rows on, where gemv_q8g runs GEMM-style, ~0.9x
# at 64). --quantization-lm-head int8 keeps it per channel.
INT8_LM_HEAD_GROUP_SIZE = 64

# Bumped when a method's weights change for the same options (the int4 grid, w8a8's activation
# codes and alpha search, int8's LM head groups: revision 2): the disk KV tier keys on it, so
# blocks a different revision wrote are not reused.
QUANT_REVISION = 2

QUANTIZATION_METHODS = METHODS + ("w8a8", "gguf", "gptq", "awq")   # gptq / awq: a checkpoint's own (heron.quant.checkpoint)
LM_HEAD_CHOICES = ("auto",) + METHODS


def check_quantization(method: str | None, group_size: int, device: torch.device, model=None,
                       lm_head: str = "auto") -> None:
    """Validate the options; `model` (the engine's model argument) matters for `gguf` only, which
    needs a GGUF file (it keeps that file's own quantized weights)."""
    if lm_head not in LM_HEAD_CHOICES:
        raise ValueError(f"quantization_lm_head must be one of {', '.join(LM_HEAD_CHOICES)}; got {lm_head!r}")
    from heron.quant.checkpoint import check_checkpoint_options
    if check_checkpoint_options(method, model, device):   # a GPTQ / AWQ checkpoint: loads quantized
        if lm_head == "int4" and group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"quantization_group_size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}; "
                             f"got {group_size}")
        return
    if method is None:
        if lm_head != "auto":
            raise ValueError(f"quantization_lm_head={lm_head} needs --quantization (int8, int4, w8a8 or gguf)")
        return
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)} (or none); got {method!r}")
    if method == "int4" and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"quantization_group_size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}; "
                         f"got {group_size}")
    if method == "int8" and group_size is not None and group_size not in INT8_GROUP_SIZES:
        raise ValueError(f"quantization_group_size for int8 must be one of {', '.join(map(str, INT8_GROUP_SIZES))} "
                         f"(or unset: one scale per output channel); got {group_size}")
    if device.type != "cpu":
        raise ValueError(f"--quantization {method} runs torch's packed CPU kernels; use --device cpu")
    if method == "gguf":
        from heron.models.loader import resolve_model
        source = resolve_model(model)
        if source.kind != "gguf":
            raise ValueError(f"--quantization gguf keeps a GGUF file's own quantized weights, but model "
                             f"{source.name!r} is an HF folder of safetensors; pass a .gguf file (or the default "
                             f"model), or use --quantization int8 / int4 to quantize this one")


def quantize_model(model: nn.Module, method: str, group_size: int | None = None, source=None,
                   lm_head: str = "auto", smooth: dict | None = None) -> dict:
    """Quantize every linear layer and the LM head in place; returns a summary (bytes before/after).

    `group_size`: int4's columns per group (None: 64), int8's (None: one scale per output channel).

    `lm_head` ("auto": as the other layers, except that int8 per channel gives the LM head groups
    of INT8_LM_HEAD_GROUP_SIZE) gives the LM head, and a tied embedding, a format of its own (int4
    with `group_size`; int8 per output channel). `gguf` decodes the weights from the GGUF file's blocks
    instead (heron.quant.gguf_native); `source` is then the model argument (a .gguf path, or None
    for the default model)."""
    if method == "gguf":
        from heron.models.loader import resolve_model
        from heron.quant.gguf_native import quantize_gguf_model
        resolved = resolve_model(source)
        if resolved.kind != "gguf":
            raise ValueError(f"--quantization gguf needs a GGUF model; {resolved.name!r} is an HF folder")
        summary = quantize_gguf_model(model, resolved.path, lm_head=lm_head)
        _release_freed_memory()
        return summary
    from heron.layers.embedding import ParallelLMHead, VocabParallelEmbedding
    from heron.layers.linear import LinearBase
    from heron.quant.weight_only import quantize

    embeddings = [m for m in model.modules() if isinstance(m, VocabParallelEmbedding)]
    before = after = layers = 0
    for name, module in model.named_modules():
        if not isinstance(module, (LinearBase, ParallelLMHead)):
            continue
        w = module.weight.detach()
        fmt = lm_head if isinstance(module, ParallelLMHead) and lm_head != "auto" else method
        if fmt == "w8a8":   # `smooth`: SmoothQuant scales per module name (heron.quant.w8a8)
            from heron.quant.w8a8 import W8A8Weight
            qw = W8A8Weight.quantize(w, (smooth or {}).get(name))
        else:
            # int8's group size is None (per channel) unless one was given, except for the LM head
            # (INT8_LM_HEAD_GROUP_SIZE when it divides the columns); an LM head given int8 with
            # --quantization-lm-head stays per channel
            gs = group_size if fmt == method or fmt == "int4" else None
            if (fmt == "int8" and gs is None and lm_head == "auto" and isinstance(module, ParallelLMHead)
                    and w.shape[1] % INT8_LM_HEAD_GROUP_SIZE == 0):
                gs = INT8_LM_HEAD_GROUP_SIZE
            qw = quantize(w, fmt, gs, grid="mse")
        before += w.numel() * w.element_size()
        after += qw.nbytes()
        tied = [e for e in embeddings if isinstance(module, ParallelLMHead) and e.weight is module.weight]
        module.set_quantized(qw)
        for emb in tied:
            emb.set_quantized(qw)
        layers += 1
    logger.info("quantized %d layers to %s: %.0f MB -> %.0f MB", layers, method, before / 1e6, after / 1e6)
    _release_freed_memory()
    return dict(layers=layers, bytes_before=before, bytes_after=after)


def use_fused_float32(model: nn.Module) -> int:
    """Let a quantized model's norms, rotary embeddings (Gemma: q/k norms and rope in one call)
    and gated activations run heron's fused C++ ops on float32 activations too (the default dtype
    on CPUs without fast bf16): their float32 results are not bit-identical to torch's
    expressions, which only matters where HF's float32 outputs are the reference, and a quantized
    model has none. Returns the number of modules switched."""
    from heron.layers.linear import QUANT_EPOCH
    n = 0
    for module in model.modules():
        if hasattr(type(module), "fused_float32"):
            module.fused_float32 = True
            n += 1
    QUANT_EPOCH[0] += 1
    return n


def _release_freed_memory() -> None:
    """Hand the dropped bf16 weights and the quantizers' temporaries back to the OS. glibc keeps
    freed blocks below its (adaptive, up to 32 MB) mmap threshold in the heap, so without this
    the process stays ~250-500 MB larger than the quantized model (default model, measured)."""
    import ctypes
    import sys
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
