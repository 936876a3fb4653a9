"""Weight-only quantization of linear layers on CPU: int8 per output channel, int4 group-wise.

The matmuls run on PyTorch's packed CPU kernels (torch 2.13 schemas):

    aten::_weight_int8pack_mm(Tensor self, Tensor mat2, Tensor scales) -> Tensor
        self  x      [M, K]    bf16 | f16 | f32, contiguous, 2-D
        mat2  q      [N, K]    int8 (plain row-major, no packing)
        scales       [N]       same dtype as x (a mismatch is an error)
        out          [M, N]    x.dtype;  out = x @ (q * scales[:, None]).T
      Only bf16 is vectorised on x86 (AVX512/AVX2): it loads x with *aligned* 32-byte loads and
      steps K by 16, so K % 16 != 0 reads past rows (garbage, inf, or a segfault) and an x whose
      data pointer is not 32-byte aligned segfaults. f32/f16 take a scalar loop (~25-30x slower
      than F.linear at 64 rows). Accumulates in fp32, rounds the output to x.dtype once.

    aten::_convert_weight_to_int4pack_for_cpu(Tensor self, int innerKTiles) -> Tensor
        self  codes  [N, K]    int32, values 0..15
        out   packed [N, K/2]  uint8, in an ISA-dependent blocked layout (see _unpack_int4)
      N must be a multiple of 16 ("expect N to be dividable by 16"); innerKTiles is ignored on CPU.

    aten::_weight_int4pack_mm_for_cpu(Tensor self, Tensor mat2, int qGroupSize,
                                      Tensor qScaleAndZeros) -> Tensor
        self  x      [M, K]    bf16 | f16 | f32, contiguous, 2-D
        mat2  packed [N, K/2]  uint8 from the op above
        qGroupSize             32, 64, 128 or 256, and K % qGroupSize == 0 (both checked)
        qScaleAndZeros [K/qGroupSize, N, 2]  same dtype as x; [..., 0] scale, [..., 1] zero.
                               Its first dimension is NOT checked: too few groups reads
                               out of bounds -- validated here instead.
        out   [M, N] x.dtype, with   w[n, k] = (q[n, k] - 8) * scale[k//g, n] + zero[k//g, n]
      (measured against a reference dequantization; `q * scale + zero` is off by 8*scale.)
      Again only bf16 is vectorised (x read as scalars, so no alignment needs); f32/f16 are a
      scalar loop (~60x slower than F.linear at 64 rows).

What heron stores and computes
  * int8: q [N, K'] int8 (K' = K rounded up to 16 with zero columns), scales [N] bf16.
    quantize_int8: symmetric per output channel, scale = absmax/127 computed in fp32 and rounded
    UP to the next bf16 value (so |w/scale| <= 127 and no code clips), q = round(w/scale) in
    [-127, 127]. |w - q*scale| <= scale/2.
  * int8, group-wise (`group_size` g set; --quantization int8 --quantization-group-size g):
    q [N, K] int8, scales [N, K/g] float32, one per g input columns (absmax/127, not rounded);
    matmul runs heron's gemv_q8g (float32 sums; portable C++, or AVX2 where the AVX-512 GEMVs
    are not built, which from 8 rows on multiplies dequantized float32 tiles GEMM-style) for any
    number of rows.
  * int4: packed [N', K/2] uint8 (N' = N rounded up to 16; the extra rows have scale = zero = 0
    and are sliced off the output), scales_and_zeros [K/g, N', 2] bf16 in the kernel's form.
    Zero-point convention (also what `from_int4` takes, as GPTQ/AWQ store it):
        w = (q - zero) * scale,   q in 0..15, zero usually an integer in 0..15
    converted to the kernel's form as  scale_k = bf16(scale),  zero_k = bf16((8 - zero) * scale_k).
    from_int4_affine takes ggml's form w = q * scale + offset (a float offset, as Q4_K's
    -dmin*m), stored as scale_k = bf16(scale), zero_k = bf16(8 * scale + offset).
    quantize_int4 ("RTN"): per group of g input columns, range [min(wmin, 0), max(wmax, 0)]
    (zero is always on the grid, as GPTQ does), scale = range/15 rounded up to bf16,
    zero = round(-min/scale), q = clamp(round(w/scale) + zero, 0, 15). All-zero groups get
    scale 0 (and zero 8). |w - dequant| <= scale/2 + scale/32 (the second term: zero_k is
    stored in bf16, whose rounding costs up to |8 - zero| * scale * 2^-8).
    quantize_int4(grid="mse") (what `--quantization int4` runs): per group, the scale and float
    offset with the smallest squared error, searched from shrunk min/max ranges with
    least-squares refits (mse_int4_codes), stored by from_int4_affine. Default model, full
    perplexity text: +44% against bf16, where the min/max grid gives +62%.
  * heron's own GEMV kernels (heron/ops/csrc/cpu_kernels.cpp, gemv_q8 / gemv_q4) take the
    small calls when they are built, in one of two variants:
    - AVX512-BF16 (int4 also needs AVX512-VBMI): at most 16 (int8) or 8 (int4) rows; the codes
      are widened to bf16 in registers and multiplied with VDPBF16PS, at close to the memory
      bandwidth (Gemma 3's LM head, 1 row: int8 4.6-5.0 ms vs torch's 6.5-7.2, int4 g64
      ~2.3-3.6 vs 4.3);
    - AVX2 with FMA (no AVX-512): at most 8 rows each; the codes are widened to float32 and
      multiplied with float32 FMAs (int8: the row's sum times its scale; int4, per group:
      scale * sum(x q) + (zero - 8 scale) * sum(x)) -- LM head, 1 row: int8 ~12.5 ms, int4 g64
      ~7-8 ms against torch's 63 / 33 on a 2-core Zen 3 VM.
    Both read torch's int4 layout of their ISA (blocks of 64 / 32 rows). For them the int4
    scales are stored block by block, `scales` [N'/B, K/g, B, 2] (`block_rows` = B), since
    torch's [K/g, N', 2] order spreads a block's scales over K/g streams; torch's kernel, used
    for larger calls or without the build, gets the [K/g, N', 2] form back by a transpose.
  * matmul computes in bf16: float32/float16 inputs are rounded to bf16, run through the bf16
    kernel, and the result is cast back to x.dtype (the non-bf16 kernel paths are scalar loops,
    see above). The rounding of x adds a relative error <= 2^-8 per element, small next to the
    4/8-bit weight error.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "INT4_GROUP_SIZES",
    "INT8_GROUP_SIZES",
    "METHODS",
    "QuantizedWeight",
    "quantize",
    "quantize_int4",
    "quantize_int8",
]

METHODS = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what _weight_int4pack_mm_for_cpu accepts
INT8_GROUP_SIZES = (16, 32, 64, 128, 256)  # group-wise int8 (heron's gemv_q8g takes any divisor of K)

_KERNEL_DTYPE = torch.bfloat16
_FLOAT_DTYPES = (torch.bfloat16, torch.float32, torch.float16)
_FAST_DTYPES = (torch.bfloat16, torch.float32)   # matmul's shortcut (float32: rounded to bf16 in the kernel)
_INT8_K_MULTIPLE = 16   # the bf16 int8 kernel steps K by 16 with aligned loads
_INT8_X_ALIGN = 32      # bytes: _mm256_load_si256 on x rows
_INT4_N_MULTIPLE = 16   # _convert_weight_to_int4pack_for_cpu: "expect N to be dividable by 16"
_INNER_K_TILES = 2      # ignored by the CPU kernel; 2, 4 and 8 are the CUDA values
# rows quantized / packed / dequantized per step, to bound fp32 temporaries (an LM head of
# 262144 x 640 is 671 MB in fp32). A multiple of 64 so chunks start on a packing block.
_ROW_CHUNK = 8192


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def _bf16_round_up(s: torch.Tensor) -> torch.Tensor:
    """The smallest bf16 value >= s, as float32 (s: float32, finite, >= 0)."""
    bits = s.contiguous().view(torch.int32)
    return ((bits + 0xFFFF) & -0x10000).view(torch.float32)


def _check_weight(weight: torch.Tensor, who: str) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{who}: weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{who}: weight must be float32, bfloat16 or float16, got {weight.dtype}")
    if weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"{who}: weight must be a non-empty 2-D [out_features, in_features] tensor, "
                         f"got shape {tuple(weight.shape)}")
    if weight.device.type != "cpu":
        raise ValueError(f"{who}: weight must be on the CPU (these are CPU kernels), got {weight.device}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{who}: weight has NaN or inf values")
    return weight.detach()


def _check_group_size(group_size, in_features: int, who: str) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"{who}: int4 group size must be one of {INT4_GROUP_SIZES} "
                         f"(what the CPU int4 kernel supports), got {group_size!r}")
    if in_features % group_size:
        fits = [g for g in INT4_GROUP_SIZES if in_features % g == 0]
        hint = f"group sizes that divide it: {fits}" if fits else \
            f"no allowed group size {INT4_GROUP_SIZES} divides it"
        raise ValueError(f"{who}: in_features={in_features} is not divisible by group_size={group_size} "
                         f"({hint})")


# ---- the int4 packed layout -------------------------------------------------------------------
# _convert_weight_to_int4pack_for_cpu cuts N into blocks of BLOCK_N rows (64 with AVX512, 32 with
# AVX2 or no vector ISA); block b occupies bytes [b*BLOCK_N*K/2, (b+1)*BLOCK_N*K/2) as [K, BLOCK_N/2]:
#   "halves" (full AVX512/AVX2 blocks): byte j of row k holds n=j (low nibble), n=j+BLOCK_N/2 (high)
#   "pairs"  (tail blocks of 16/32/48 rows, and the scalar build): n=2j (low), n=2j+1 (high).
# Which one the running build uses is found once by packing a probe (`_int4_layout`); if no known
# layout matches, codes are read back through the matmul kernel itself (exact, slower).
_LAYOUT_CANDIDATES = ((64, "halves"), (32, "halves"), (64, "pairs"), (32, "pairs"), (16, "pairs"))
_layout: tuple[int, str] | str | None = None


def _unpack_with(flat: torch.Tensor, rows: int, k: int, layout: tuple[int, str]) -> torch.Tensor:
    """Codes [rows, k] uint8 from the packed bytes `flat` of `rows` rows starting on a block."""
    block, style = layout
    nfull, tail = divmod(rows, block)
    parts = []
    if nfull:
        b = flat[: nfull * block * k // 2].view(nfull, k, block // 2)
        lo, hi = b & 15, b >> 4
        cols = torch.cat([lo, hi], -1) if style == "halves" else torch.stack([lo, hi], -1).view(nfull, k, block)
        parts.append(cols.transpose(1, 2).reshape(nfull * block, k))
    if tail:
        b = flat[nfull * block * k // 2: rows * k // 2].view(k, tail // 2)
        parts.append(torch.stack([b & 15, b >> 4], -1).view(k, tail).t())
    return torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()


def _int4_layout() -> tuple[int, str] | str:
    global _layout
    if _layout is None:
        rows, k = 176, 32  # 176 = 2*64 + 48 = 5*32 + 16: full blocks and a tail for every candidate
        g = torch.Generator().manual_seed(1234)
        codes = torch.randint(0, 16, (rows, k), generator=g, dtype=torch.int32)
        flat = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, _INNER_K_TILES).reshape(-1)
        _layout = "kernel"
        for cand in _LAYOUT_CANDIDATES:
            if torch.equal(_unpack_with(flat, rows, k, cand).to(torch.int32), codes):
                _layout = cand
                break
    return _layout


def _unpack_via_kernel(packed: torch.Tensor, n: int, k: int, group_size: int) -> torch.Tensor:
    """Codes [n, k] uint8 by multiplying identity rows through the kernel with scale 1, zero 8:
    (q - 8) * 1 + 8 = q, exact in bf16. Layout-independent; costs k*k*n multiply-adds."""
    sz = torch.empty(k // group_size, n, 2, dtype=_KERNEL_DTYPE)
    sz[..., 0] = 1
    sz[..., 1] = 8
    out = torch.empty(n, k, dtype=torch.uint8)
    step = 256
    for k0 in range(0, k, step):
        k1 = min(k, k0 + step)
        eye = torch.zeros(k1 - k0, k, dtype=_KERNEL_DTYPE)
        eye[:, k0:k1] = torch.eye(k1 - k0, dtype=_KERNEL_DTYPE)
        qt = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, packed, group_size, sz)  # [k1-k0, n]
        out[:, k0:k1] = qt.t().to(torch.uint8)
    return out


def _pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes [N', K] (any integer dtype, 0..15, N' % 16 == 0) -> packed [N', K/2] uint8."""
    n = codes.shape[0]
    chunks = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        codes[r0: r0 + _ROW_CHUNK].to(torch.int32).contiguous(), _INNER_K_TILES) for r0 in range(0, n, _ROW_CHUNK)]
    packed = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
    return packed.reshape(n, -1)


_OPS: list = []           # the kernels module, once found usable (matmul's shortcut reads it)


def _gemv_kernels():
    """heron's kernels module when its quantized GEMVs can run here (built, AVX512-BF16 or AVX2
    with FMA, not disabled by HERON_NO_FUSED_OPS), else None."""
    from heron.ops.cpu import quant_gemv_kernels
    ops = quant_gemv_kernels()
    if ops is not None and not _OPS:
        _OPS.append(ops)
    return ops


def _aligned(t: torch.Tensor, nbytes: int) -> torch.Tensor:
    t = t.contiguous()
    return t if t.data_ptr() % nbytes == 0 else t.clone()


@dataclass(eq=False, repr=False)
class QuantizedWeight:
    """A linear layer's weight [out_features, in_features], quantized and packed for the CPU kernels.

    int8: `qweight` [N, K'] int8 (K' = K rounded up to 16), `scales` [N] bf16.
    int4: `qweight` [N', K/2] uint8 in the kernel's packed layout (N' = N rounded up to 16),
          `scales` = scales_and_zeros [K/g, N', 2] bf16: w = (q - 8) * scales[..., 0] + scales[..., 1],
          or, when `blocked` (heron's int4 GEMV kernel is available), the same values as
          [N'/B, K/g, B, 2] (rows in blocks of B = block_rows: 64 on AVX-512, 32 on AVX2, the
          blocks of torch's packed layout there); `group_scales()` gives the first form.
    Build with quantize_int8 / quantize_int4 / from_int8 / from_int4, not directly."""
    method: str               # "int8" | "int4"
    out_features: int
    in_features: int
    group_size: int | None    # int4; int8 when group-wise (None: one scale per output channel)
    qweight: torch.Tensor
    scales: torch.Tensor
    block_rows: int = 0       # int4: scales stored [N'/B, K/g, B, 2] for heron's GEMV kernel (B > 0)
    _fast: tuple | None = None  # (kernel name, most rows): matmul's shortcut for 2-D bf16/float32 x

    @property
    def blocked(self) -> bool:
        return self.block_rows > 0

    def __repr__(self) -> str:
        g = f", group_size={self.group_size}" if self.group_size is not None else ""
        return (f"QuantizedWeight({self.method}, out_features={self.out_features}, "
                f"in_features={self.in_features}{g}, nbytes={self.nbytes()})")

    @property
    def padded_out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def padded_in_features(self) -> int:
        return self.qweight.shape[1] if self.method == "int8" else self.in_features

    # ---- constructors from integer codes (quantize_* and checkpoint loaders share these) -------
    @classmethod
    def from_int8(cls, qweight: torch.Tensor, scales: torch.Tensor) -> QuantizedWeight:
        """Symmetric int8: w[n, k] = qweight[n, k] * scales[n].

        qweight [N, K] int8; scales [N] (or [N, 1]) floating, stored as bf16 (the kernel wants the
        scale in x's dtype, and matmul runs in bf16). Group-wise: scales [N, K/g] (g in
        INT8_GROUP_SIZES), w[n, k] = qweight[n, k] * scales[n, k // g], kept in float32."""
        if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.int8:
            raise TypeError(f"from_int8: qweight must be an int8 tensor, got "
                            f"{getattr(qweight, 'dtype', type(qweight).__name__)}")
        if qweight.dim() != 2 or qweight.shape[0] == 0 or qweight.shape[1] == 0:
            raise ValueError(f"from_int8: qweight must be a non-empty 2-D [N, K] tensor, got {tuple(qweight.shape)}")
        n, k = qweight.shape
        if not isinstance(scales, torch.Tensor) or not scales.is_floating_point():
            raise TypeError(f"from_int8: scales must be a floating tensor, got "
                            f"{getattr(scales, 'dtype', type(scales).__name__)}")
        if scales.dim() == 2 and scales.shape[0] == n and scales.shape[1] > 1:
            groups = scales.shape[1]
            if k % groups or k // groups not in INT8_GROUP_SIZES:
                raise ValueError(f"from_int8: scales [{n}, {groups}] would give groups of {k}/{groups} input columns; "
                                 f"group-wise int8 takes groups of {INT8_GROUP_SIZES} columns")
            if qweight.device.type != "cpu" or scales.device.type != "cpu":
                raise ValueError("from_int8: tensors must be on the CPU")
            # group-wise: codes as they are, float32 scales (matmul computes in float32)
            return cls("int8", n, k, k // groups, qweight.detach().contiguous(), scales.detach().float().contiguous())
        if scales.shape not in ((n,), (n, 1)):
            raise ValueError(f"from_int8: scales must have shape [{n}] (one per output channel) or [{n}, K/g] "
                             f"(group-wise), got {tuple(scales.shape)}")
        if qweight.device.type != "cpu" or scales.device.type != "cpu":
            raise ValueError("from_int8: tensors must be on the CPU")
        q = qweight.detach()
        kp = _round_up(k, _INT8_K_MULTIPLE)
        q = F.pad(q, (0, kp - k)) if kp != k else _aligned(q, 64)
        s = scales.detach().reshape(n).to(_KERNEL_DTYPE).contiguous()
        return cls("int8", n, k, None, q, s)._kernel_layout()

    @classmethod
    def from_int4(cls, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None,
                  group_size: int = 64) -> QuantizedWeight:
        """Asymmetric group-wise int4:  w[n, k] = (qweight[n, k] - zeros[n, k//g]) * scales[n, k//g].

        qweight [N, K] any integer dtype with values 0..15 (one code per element, unpacked);
        scales, zeros [N, K/g] (zeros may be integers -- GPTQ/AWQ -- or floats; None means 8, i.e.
        symmetric int4). Converted to the kernel's form scale_k = bf16(scale),
        zero_k = bf16((8 - zero) * scale_k); see the module docstring for what that rounding costs."""
        if not isinstance(qweight, torch.Tensor) or qweight.is_floating_point() or qweight.is_complex() \
                or qweight.dtype == torch.bool:
            raise TypeError(f"from_int4: qweight must be an integer tensor of codes 0..15, got "
                            f"{getattr(qweight, 'dtype', type(qweight).__name__)}")
        if qweight.dim() != 2 or qweight.shape[0] == 0 or qweight.shape[1] == 0:
            raise ValueError(f"from_int4: qweight must be a non-empty 2-D [N, K] tensor of codes, "
                             f"got {tuple(qweight.shape)}")
        n, k = qweight.shape
        _check_group_size(group_size, k, "from_int4")
        groups = k // group_size
        if not isinstance(scales, torch.Tensor) or not scales.is_floating_point():
            raise TypeError(f"from_int4: scales must be a floating tensor, got "
                            f"{getattr(scales, 'dtype', type(scales).__name__)}")
        if tuple(scales.shape) != (n, groups):
            raise ValueError(f"from_int4: scales must have shape [N, K/group_size] = [{n}, {groups}], "
                             f"got {tuple(scales.shape)}")
        if zeros is not None:
            if not isinstance(zeros, torch.Tensor) or zeros.is_complex() or zeros.dtype == torch.bool:
                raise TypeError("from_int4: zeros must be a real tensor (integer or floating) or None")
            if tuple(zeros.shape) != (n, groups):
                raise ValueError(f"from_int4: zeros must have shape [{n}, {groups}], got {tuple(zeros.shape)}")
        if any(t is not None and t.device.type != "cpu" for t in (qweight, scales, zeros)):
            raise ValueError("from_int4: tensors must be on the CPU")
        lo, hi = int(qweight.min()), int(qweight.max())
        if lo < 0 or hi > 15:
            raise ValueError(f"from_int4: codes must be in 0..15, got values in [{lo}, {hi}]")

        npad = _round_up(n, _INT4_N_MULTIPLE)
        codes = qweight.detach()
        if npad != n:
            codes = torch.cat([codes, codes.new_zeros(npad - n, k)])
        packed = _pack_int4(codes)
        s = scales.detach().to(_KERNEL_DTYPE).float()  # the scale the kernel will see
        z = torch.full_like(s, 8.0) if zeros is None else zeros.detach().to(torch.float32)
        zk = (8.0 - z) * s
        sz = torch.zeros(groups, npad, 2, dtype=_KERNEL_DTYPE)
        sz[:, :n, 0] = s.t()
        sz[:, :n, 1] = zk.t()
        return cls("int4", n, k, group_size, packed, sz)._kernel_layout()

    @classmethod
    def from_int4_affine(cls, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                         group_size: int = 32) -> QuantizedWeight:
        """Group-wise int4 in ggml's form:  w[n, k] = qweight[n, k] * scales[n, k//g] + offsets[n, k//g]
        (Q4_0: scale d, offset -8d; Q4_1: d, m; Q4_K: d*sc, -dmin*m), with float offsets that need
        not be a whole number of steps.

        qweight [N, K] integer codes 0..15; scales, offsets [N, K/g] floating. Stored as
        scale_k = bf16(scale), zero_k = bf16(8*scale + offset), so the kernel's
        (q - 8)*scale_k + zero_k differs from w by (q - 8)(scale_k - scale) plus zero_k's rounding:
        at most 2^-8 * (8|scale| + |8*scale + offset|) (bf16 keeps 8 significant bits)."""
        if not isinstance(qweight, torch.Tensor) or qweight.is_floating_point() or qweight.is_complex() \
                or qweight.dtype == torch.bool:
            raise TypeError(f"from_int4_affine: qweight must be an integer tensor of codes 0..15, got "
                            f"{getattr(qweight, 'dtype', type(qweight).__name__)}")
        if qweight.dim() != 2 or qweight.shape[0] == 0 or qweight.shape[1] == 0:
            raise ValueError(f"from_int4_affine: qweight must be a non-empty 2-D [N, K] tensor of codes, "
                             f"got {tuple(qweight.shape)}")
        n, k = qweight.shape
        _check_group_size(group_size, k, "from_int4_affine")
        groups = k // group_size
        for what, t in (("scales", scales), ("offsets", offsets)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"from_int4_affine: {what} must be a floating tensor, got "
                                f"{getattr(t, 'dtype', type(t).__name__)}")
            if tuple(t.shape) != (n, groups):
                raise ValueError(f"from_int4_affine: {what} must have shape [N, K/group_size] = [{n}, {groups}], "
                                 f"got {tuple(t.shape)}")
        if any(t.device.type != "cpu" for t in (qweight, scales, offsets)):
            raise ValueError("from_int4_affine: tensors must be on the CPU")
        lo, hi = int(qweight.min()), int(qweight.max())
        if lo < 0 or hi > 15:
            raise ValueError(f"from_int4_affine: codes must be in 0..15, got values in [{lo}, {hi}]")
        npad = _round_up(n, _INT4_N_MULTIPLE)
        codes = qweight.detach()
        if npad != n:
            codes = torch.cat([codes, codes.new_zeros(npad - n, k)])
        packed = _pack_int4(codes)
        s = scales.detach().to(torch.float32)
        sz = torch.zeros(groups, npad, 2, dtype=_KERNEL_DTYPE)
        sz[:, :n, 0] = s.t()
        sz[:, :n, 1] = (8.0 * s + offsets.detach().to(torch.float32)).t()
        return cls("int4", n, k, group_size, packed, sz)._kernel_layout()

    def _kernel_layout(self) -> QuantizedWeight:
        """Prepare for heron's GEMV kernels when they can read this weight: int4 scales stored
        block by block, and matmul's shortcut for 2-D bf16 inputs needing no padding."""
        ops = _gemv_kernels()
        if ops is None:
            return self
        if self.method == "int8":
            if self.qweight.shape[1] == self.in_features and self.in_features % 32 == 0:
                self._fast = ("gemv_q8", ops.gemv_q8_max_rows())
            return self
        block = ops.gemv_q4_block()
        if (not self.blocked and block and self.padded_out_features % block == 0
                and _int4_layout() == (block, "halves")):
            groups, npad = self.scales.shape[0], self.padded_out_features
            self.scales = self.scales.view(groups, npad // block, block, 2).permute(1, 0, 2, 3).contiguous()
            self.block_rows = block
        if self.blocked and self.padded_out_features == self.out_features:
            self._fast = ("gemv_q4", ops.gemv_q4_max_rows())
        return self

    def group_scales(self, r0: int = 0, r1: int | None = None) -> torch.Tensor:
        """int4: scales_and_zeros of rows r0..r1 (default all N' rows) as [K/g, R, 2] bf16, torch's
        kernel form, whichever way they are stored."""
        r1 = self.padded_out_features if r1 is None else r1
        if not self.blocked:
            return self.scales[:, r0:r1]
        blk = self.block_rows
        b0, b1 = r0 // blk, -(-r1 // blk)
        sz = self.scales[b0:b1]                                          # [blocks, G, blk, 2]
        return sz.permute(1, 0, 2, 3).reshape(sz.shape[1], -1, 2)[:, r0 - b0 * blk: r1 - b0 * blk]

    # ---- use ------------------------------------------------------------------------------------
    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> x @ W.T [..., N] in x.dtype (no bias: the caller adds it).

        Computed in bf16 (fp32 accumulation, output rounded to bf16 once); float32/float16 x is
        rounded to bf16 first and the result cast back to x.dtype."""
        fast = self._fast
        if (fast is not None and type(x) is torch.Tensor and x.dim() == 2 and x.shape[1] == self.in_features
                and x.shape[0] > 0 and x.is_cpu and x.dtype in _FAST_DTYPES):
            # the common decode call, without the general path's checks and reshapes; more rows
            # than the kernel takes run as several passes over the weight (each output row is
            # computed the same way in any pass)
            # (the kernels round float32 x to bf16 themselves and return float32 then)
            rows, most = x.shape[0], fast[1]
            if rows <= most:
                return self._fast_call(fast[0], x)
            out = torch.empty(rows, self.out_features, dtype=x.dtype)
            for r0 in range(0, rows, most):
                out[r0: r0 + most] = self._fast_call(fast[0], x[r0: r0 + most])
            return out
        if not isinstance(x, torch.Tensor) or x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"QuantizedWeight.matmul: x must be bfloat16, float32 or float16, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"QuantizedWeight.matmul: x must be [..., {self.in_features}], got {tuple(x.shape)}")
        if x.device.type != "cpu":
            raise ValueError(f"QuantizedWeight.matmul: x must be on the CPU, got {x.device}")
        lead = x.shape[:-1]
        if self.method == "int8" and self.group_size is not None:
            return self._matmul_int8_groups(x.reshape(-1, self.in_features)).reshape(*lead, self.out_features)
        x2 = x.reshape(-1, self.in_features).to(_KERNEL_DTYPE)
        rows = x2.shape[0]
        if self.method == "int8":
            kp = self.qweight.shape[1]
            if kp != self.in_features:
                x2 = F.pad(x2, (0, kp - self.in_features))
            ops = _gemv_kernels() if kp % 32 == 0 else None
            if ops is not None and 1 <= rows <= ops.gemv_q8_max_rows():
                out = ops.gemv_q8(x2, self.qweight, self.scales)
            else:
                out = torch.ops.aten._weight_int8pack_mm(_aligned(x2, _INT8_X_ALIGN), self.qweight, self.scales)
        elif self.blocked and 1 <= rows <= _gemv_kernels().gemv_q4_max_rows():
            out = _gemv_kernels().gemv_q4(x2, self.qweight, self.scales, self.group_size)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.qweight, self.group_size,
                                                             self.group_scales().contiguous())
            if out.shape[1] != self.out_features:
                out = out[:, : self.out_features].contiguous()
        return out.to(x.dtype).reshape(*lead, self.out_features)

    __call__ = matmul

    def _fast_call(self, kernel: str, xb: torch.Tensor) -> torch.Tensor:
        if kernel == "gemv_q8":
            return _OPS[0].gemv_q8(xb, self.qweight, self.scales)
        return _OPS[0].gemv_q4(xb, self.qweight, self.scales, self.group_size)

    def _int8_group_values(self, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """Group-wise int8 rows: codes [R, K] times their scales [R, K/g], in float32."""
        g, k = self.group_size, self.in_features
        return (q.float().view(-1, k // g, g) * scales[..., None]).view(-1, k)

    def _matmul_int8_groups(self, x2: torch.Tensor) -> torch.Tensor:
        """Group-wise int8: heron's gemv_q8g (float32 sums, x's dtype out), or without the kernels
        the dequantized weight in x's dtype through F.linear."""
        from heron.ops.cpu import load_kernel
        ops = load_kernel()
        if ops is not None and x2.shape[0] > 0:
            return ops.gemv_q8g(x2.contiguous(), self.qweight, self.scales, self.group_size)
        return F.linear(x2, self.dequantize(x2.dtype))

    def _int4_codes(self):
        """Yield (r0, r1, codes [r1 - r0, K] uint8) over the real rows in chunks of _ROW_CHUNK."""
        n, k, npad = self.out_features, self.in_features, self.padded_out_features
        layout = _int4_layout()
        if layout == "kernel":
            codes = _unpack_via_kernel(self.qweight, npad, k, self.group_size)
            for r0 in range(0, n, _ROW_CHUNK):
                yield r0, min(n, r0 + _ROW_CHUNK), codes[r0: r0 + _ROW_CHUNK][: n - r0]
            return
        flat = self.qweight.reshape(-1)
        for r0 in range(0, n, _ROW_CHUNK):  # chunks start on a packing block; the last one ends at N'
            r1p = min(npad, r0 + _ROW_CHUNK)
            codes = _unpack_with(flat[r0 * k // 2: r1p * k // 2], r1p - r0, k, layout)
            r1 = min(n, r1p)
            yield r0, r1, codes[: r1 - r0]

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The weights [N, K] the kernel multiplies by (computed in fp32, then cast to `dtype`)."""
        n, k = self.out_features, self.in_features
        if self.blocked and dtype in (torch.float32, torch.bfloat16) and _OPS:
            # heron's C++ loop over the blocked int4 layout: the same values, several times
            # faster than the torch ops of _dequantize_int4_torch (which took a third of a
            # quantized prefill's time on AVX2)
            return _OPS[0].dequant_q4(self.qweight, self.scales, self.group_size, n, dtype == torch.bfloat16)
        out = torch.empty(n, k, dtype=dtype)
        if self.method == "int8" and self.group_size is not None:
            for r0 in range(0, n, _ROW_CHUNK):
                r1 = min(n, r0 + _ROW_CHUNK)
                out[r0:r1] = self._int8_group_values(self.qweight[r0:r1], self.scales[r0:r1])
            return out
        if self.method == "int8":
            if dtype == _KERNEL_DTYPE:
                # one pass, same values: int8 -> bf16 is exact and the bf16 multiply rounds the
                # (exact) float32 product once, as the float32 path below followed by the cast does
                return torch.mul(self.qweight[:, :k], self.scales[:, None], out=out)
            s = self.scales.float()
            for r0 in range(0, n, _ROW_CHUNK):
                r1 = min(n, r0 + _ROW_CHUNK)
                out[r0:r1] = self.qweight[r0:r1, :k].float() * s[r0:r1, None]
            return out
        return self._dequantize_int4_torch(out)

    def _dequantize_int4_torch(self, out: torch.Tensor) -> torch.Tensor:
        n, k, g = self.out_features, self.in_features, self.group_size
        for r0, r1, codes in self._int4_codes():
            sz = self.group_scales(r0, r1).float()                        # [G, R, 2]
            s, zk = sz[..., 0].t()[..., None], sz[..., 1].t()[..., None]  # [R, G, 1]
            # (q - 8) * s is exact in fp32, so this rounds once, like the kernel's fused multiply-add
            out[r0:r1] = ((codes.float().view(r1 - r0, k // g, g) - 8.0) * s + zk).view(r1 - r0, k)
        return out

    def dequantize_rows(self, rows: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """Dequantized weight rows [len(rows), K] (an embedding lookup from a tied, quantized LM
        head): only the bytes of those rows are read. Same values as dequantize()[rows]."""
        rows = rows.reshape(-1).to(torch.long)
        k = self.in_features
        if self.blocked and dtype in (torch.float32, torch.bfloat16) and _OPS:
            # heron's C++ loop (dequant_q4's values; it refuses rows beyond the weight's)
            return _OPS[0].dequant_q4_rows(self.qweight, self.scales, self.group_size, rows, dtype == torch.bfloat16)
        if self.method == "int8" and self.group_size is not None:
            return self._int8_group_values(self.qweight[rows], self.scales[rows]).to(dtype)
        if self.method == "int8":
            return (self.qweight[rows, :k].float() * self.scales.float()[rows, None]).to(dtype)
        layout = _int4_layout()
        g = self.group_size
        if layout == "kernel" or self.padded_out_features % layout[0]:
            return self.dequantize(dtype)[rows]
        block, style = layout
        half = block // 2
        blocks = self.qweight.reshape(-1).view(self.padded_out_features // block, k, half)
        j = rows % block
        if style == "halves":
            col, shift = j % half, (j >= half).to(torch.uint8) * 4
        else:
            col, shift = j // 2, (j % 2).to(torch.uint8) * 4
        packed = blocks[rows // block, :, col]                               # [R, K] bytes
        codes = (packed >> shift[:, None]) & 15
        if self.blocked:
            blk = self.block_rows
            sz = self.scales[rows // blk, :, rows % blk].transpose(0, 1).float()   # [G, R, 2]
        else:
            sz = self.scales[:, rows].float()                               # [G, R, 2]
        s, zk = sz[..., 0].t()[..., None], sz[..., 1].t()[..., None]        # [R, G, 1]
        return ((codes.float().view(-1, k // g, g) - 8.0) * s + zk).view(-1, k).to(dtype)

    def codes(self) -> tuple[torch.Tensor, ...]:
        """The integer form, the inverse of the from_* constructors:
        int8 -> (qweight [N, K] int8, scales [N] float32);
        int4 -> (qweight [N, K] uint8 codes 0..15, scales [N, K/g] float32, zeros [N, K/g] float32)
        with w = (q - zeros) * scales. Zeros are whole numbers whenever an integer zero point
        reproduces the stored kernel zero exactly (always after quantize_int4 / integer from_int4),
        else the fractional zero that does. from_*(*codes()) rebuilds identical packed tensors."""
        n, k = self.out_features, self.in_features
        if self.method == "int8":
            return self.qweight[:, :k].clone(), self.scales.float()
        q = torch.empty(n, k, dtype=torch.uint8)
        for r0, r1, codes in self._int4_codes():
            q[r0:r1] = codes
        sz = self.group_scales()
        s = sz[:, :n, 0].float().t().contiguous()
        zk_b = sz[:, :n, 1].t()
        zk = zk_b.float()
        safe = torch.where(s != 0, s, torch.ones_like(s))
        frac = torch.where(s != 0, 8.0 - zk / safe, torch.full_like(s, 8.0))
        whole = frac.round()
        exact = ((8.0 - whole) * s).to(_KERNEL_DTYPE) == zk_b
        return q, s, torch.where(exact, whole, frac).contiguous()

    def nbytes(self) -> int:
        """Resident bytes of the packed weight and its scales (and zeros)."""
        return self.qweight.numel() * self.qweight.element_size() + self.scales.numel() * self.scales.element_size()


# ---- quantizers (round to nearest) ------------------------------------------------------------
def quantize_int8(weight: torch.Tensor, group_size: int | None = None, qmax: int = 127) -> QuantizedWeight:
    """Symmetric per-output-channel int8: scale[n] = absmax(w[n]) / 127 (fp32, rounded up to bf16),
    q = round(w / scale) in [-127, 127]; |w - q*scale| <= scale/2.
    With `group_size` g: one float32 scale per g input columns of a row, absmax(group) / 127.
    `qmax` < 127 (per channel only) keeps the codes in [-qmax, qmax] (w8a8's 7-bit weights)."""
    w = _check_weight(weight, "quantize_int8")
    n, k = w.shape
    if isinstance(qmax, bool) or not isinstance(qmax, int) or not 1 <= qmax <= 127:
        raise ValueError(f"quantize_int8: qmax must be an integer in 1..127, got {qmax!r}")
    if group_size is not None and qmax != 127:
        raise ValueError("quantize_int8: qmax applies to per-channel scales only (group_size=None)")
    if group_size is not None:
        if isinstance(group_size, bool) or group_size not in INT8_GROUP_SIZES or k % group_size:
            raise ValueError(f"quantize_int8: group_size must be one of {INT8_GROUP_SIZES} and divide "
                             f"in_features={k}; got {group_size!r}")
        if group_size == k:   # one group a row: per output channel
            return quantize_int8(weight)
        q = torch.empty(n, k, dtype=torch.int8)
        scales = torch.empty(n, k // group_size, dtype=torch.float32)
        for r0 in range(0, n, _ROW_CHUNK):
            r1 = min(n, r0 + _ROW_CHUNK)
            codes, scales[r0:r1] = rtn_int8_codes(w[r0:r1].float().view(r1 - r0, k // group_size, group_size),
                                                  bf16_scales=False)
            q[r0:r1] = codes.view(r1 - r0, k)
        return QuantizedWeight.from_int8(q, scales)
    q = torch.empty(n, k, dtype=torch.int8)
    scales = torch.empty(n, dtype=torch.float32)
    for r0 in range(0, n, _ROW_CHUNK):
        r1 = min(n, r0 + _ROW_CHUNK)
        q[r0:r1], scales[r0:r1] = rtn_int8_codes(w[r0:r1].float(), qmax=qmax)
    return QuantizedWeight.from_int8(q, scales)


def rtn_int8_codes(w: torch.Tensor, bf16_scales: bool = True, qmax: int = 127) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_int8's rounding on float32 rows [..., K] (finite), one scale per row of the last
    dimension: (q [..., K] int8 in [-qmax, qmax], scales [...] float32, rounded up to bf16 unless
    bf16_scales=False)."""
    s = w.abs().amax(dim=-1) / float(qmax)
    if bf16_scales:
        s = _bf16_round_up(s)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    return torch.round(w / safe[..., None]).clamp_(-qmax, qmax).to(torch.int8), s


INT4_GRIDS = ("mse", "minmax")
MSE_SHRINKS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)   # mse_int4_codes' starting ranges
MSE_REFITS = 2


def quantize_int4(weight: torch.Tensor, group_size: int = 64, grid: str = "minmax") -> QuantizedWeight:
    """Asymmetric group-wise int4, round to nearest, on one of two grids per group:
    - "minmax" (GPTQ's and AWQ's RTN): range [min(wmin, 0), max(wmax, 0)], scale = range/15
      (rounded up to bf16), integer zero = round(-min/scale), q = clamp(round(w/scale) + zero,
      0, 15); w ~ (q - zero) * scale. Every weight is within scale/2 (+ the zero's bf16 rounding).
    - "mse" (what `--quantization int4` uses): the scale and a float offset that minimise the
      group's squared error (mse_int4_codes); w ~ q * scale + offset. Clips outliers when
      that costs less than the coarser grid would."""
    w = _check_weight(weight, "quantize_int4")
    n, k = w.shape
    _check_group_size(group_size, k, "quantize_int4")
    if grid not in INT4_GRIDS:
        raise ValueError(f"quantize_int4: grid must be one of {INT4_GRIDS}, got {grid!r}")
    groups = k // group_size
    q = torch.empty(n, k, dtype=torch.uint8)
    scales = torch.empty(n, groups, dtype=torch.float32)
    zeros = torch.empty(n, groups, dtype=torch.float32)
    codes = rtn_int4_codes if grid == "minmax" else mse_int4_codes
    for r0 in range(0, n, _ROW_CHUNK):
        r1 = min(n, r0 + _ROW_CHUNK)
        q[r0:r1], scales[r0:r1], zeros[r0:r1] = codes(w[r0:r1].float(), group_size)
    if grid == "mse":
        return QuantizedWeight.from_int4_affine(q, scales, zeros, group_size)
    return QuantizedWeight.from_int4(q, scales, zeros, group_size)


def _lsq_fit(wc: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group (last dim), the least-squares (scale, offset) of wc ~ q * scale + offset; the
    scale is 0 where the codes are all equal."""
    n = wc.shape[-1]
    sq, sw = q.sum(-1, keepdim=True), wc.sum(-1, keepdim=True)
    sqq, sqw = (q * q).sum(-1, keepdim=True), (q * wc).sum(-1, keepdim=True)
    det = n * sqq - sq * sq
    ok = det > 0
    s = torch.where(ok, (n * sqw - sq * sw) / torch.where(ok, det, torch.ones_like(det)), torch.zeros_like(det))
    return s, (sw - s * sq) / n


def mse_int4_codes(w: torch.Tensor, group_size: int, shrinks: tuple = MSE_SHRINKS, refits: int = MSE_REFITS,
                   use_kernel: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """quantize_int4's "mse" grid on float32 rows [R, K] (finite, K % group_size == 0): for each
    group, starting from its range [min, max] shrunk by each factor in `shrinks`, round to
    nearest on the 16-level grid, refit the scale and offset to those codes by least squares
    (`refits` times, re-rounding after each), and keep the candidate with the smallest squared
    error (the unshrunk min/max grid is the first candidate, so the result is never worse than
    it). Data-free: no calibration text. Returns (q [R, K] uint8 0..15, scales [R, K/g],
    offsets [R, K/g]) float32, w ~ q * scale + offset. heron's C++ kernel (`int4_mse_grid`, the
    same steps; ~50x faster) runs them where it is built, these torch ops elsewhere: the two
    sum in different orders, so a near-tie between candidates may go either way."""
    from heron.ops.cpu import load_kernel
    ops = load_kernel() if use_kernel else None
    if ops is not None:
        return tuple(ops.int4_mse_grid(w.contiguous(), group_size, torch.tensor(shrinks, dtype=torch.float32),
                                       refits))
    r, k = w.shape
    wc = w.view(r, k // group_size, group_size)
    lo0, hi0 = wc.amin(-1, keepdim=True), wc.amax(-1, keepdim=True)
    best_q = best_s = best_m = best_err = None
    for shrink in shrinks:
        s, m = (hi0 - lo0) * (shrink / 15.0), lo0 * shrink
        for step in range(refits + 1):
            inv = torch.where(s > 0, 1.0 / torch.where(s > 0, s, torch.ones_like(s)), torch.ones_like(s))
            qf = ((wc - m) * inv).round_().clamp_(0, 15)
            err = (qf * s + m - wc).square_().sum(-1, keepdim=True)
            if best_err is None:
                best_q, best_s, best_m, best_err = qf, s, m, err
            else:
                better = err < best_err
                best_q = torch.where(better, qf, best_q)
                best_s, best_m = torch.where(better, s, best_s), torch.where(better, m, best_m)
                best_err = torch.where(better, err, best_err)
            if step < refits:
                s2, m2 = _lsq_fit(wc, qf)
                keep = s2 > 0
                s, m = torch.where(keep, s2, s), torch.where(keep, m2, m)
    return best_q.view(r, k).to(torch.uint8), best_s.squeeze(-1), best_m.squeeze(-1)


def rtn_int4_codes(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """quantize_int4's rounding on float32 rows [R, K] (finite, K % group_size == 0):
    (q [R, K] uint8 0..15, scales [R, K/g] float32, integer zeros [R, K/g] float32)."""
    r, k = w.shape
    groups = k // group_size
    wc = w.view(r, groups, group_size)
    lo = wc.amin(dim=-1).clamp_(max=0.0)
    hi = wc.amax(dim=-1).clamp_(min=0.0)
    s = _bf16_round_up(hi / 15.0 - lo / 15.0)  # no overflow for |w| near the float max
    nz = s > 0
    safe = torch.where(nz, s, torch.ones_like(s))
    z = torch.where(nz, torch.round(-lo / safe).clamp_(0, 15), torch.full_like(s, 8.0))
    qc = (torch.round(wc / safe[..., None]) + z[..., None]).clamp_(0, 15)
    return qc.view(r, k).to(torch.uint8), s, z


def quantize(weight: torch.Tensor, method: str, group_size: int | None = None, grid: str = "minmax") -> QuantizedWeight:
    """quantize_int8 or quantize_int4 by name (group_size: int4 default 64; int8 default None =
    per output channel; `grid`: int4's, see quantize_int4)."""
    if method == "int8":
        return quantize_int8(weight, group_size)
    if method == "int4":
        return quantize_int4(weight, 64 if group_size is None else group_size, grid)
    raise ValueError(f"quantize: method must be one of {METHODS}, got {method!r}")
