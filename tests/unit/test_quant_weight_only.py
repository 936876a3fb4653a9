"""Weight-only int8 / int4 quantization on PyTorch's packed CPU kernels (heron.quant.weight_only).

Matmul tolerance: the kernels dequantize each weight in fp32 exactly as `dequantize()` does,
accumulate in fp32 in their own order and round the output to bf16 once. Against an fp32
reference built from the same dequantized weight, the difference is therefore one bf16 rounding
of the output (relative <= 2^-8; we allow 2^-7) plus fp32 summation-order noise, bounded by a small
multiple of 2^-24 * K * sum|x*w| (we allow 2^-12 * sum|x*w|, still far below any convention
error such as an off-by-8 code or a swapped scale/zero, which are O(1) relative).
"""
from __future__ import annotations

import pytest
import torch

import heron.quant.weight_only as wo
from heron.quant import INT4_GROUP_SIZES, QuantizedWeight, quantize, quantize_int4, quantize_int8


def _weight(n: int, k: int, seed: int = 0, dtype=torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[:, :: max(1, k // 7)] *= 8  # some per-channel outliers, as real weights have
    return w.to(dtype)


def _x(shape, dtype=torch.bfloat16, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def _assert_matches_dequantized(qw: QuantizedWeight, x: torch.Tensor) -> None:
    y = qw.matmul(x)
    assert y.dtype == x.dtype
    assert y.shape == (*x.shape[:-1], qw.out_features)
    w = qw.dequantize(torch.float32)
    xr = x.reshape(-1, qw.in_features).to(torch.bfloat16).float()  # the kernel computes in bf16
    ref = xr @ w.t()
    mag = xr.abs() @ w.abs().t()
    err = (y.reshape(ref.shape).float() - ref).abs()
    bound = 2.0 ** -7 * ref.abs() + 2.0 ** -12 * mag + 1e-30
    assert torch.isfinite(y).all()
    worst = err.argmax()
    assert bool((err <= bound).all()), f"max err {err.max().item()} (bound there {bound.flatten()[worst].item()})"


# ---- int8 -----------------------------------------------------------------------------------
@pytest.mark.parametrize("n,k", [(64, 128), (100, 640)])  # Gemma shapes: test_gemma3_270m_shapes
@pytest.mark.parametrize("m", [1, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_matmul_matches_dequantized(n, k, m, dtype):
    qw = quantize_int8(_weight(n, k, seed=n + k))
    assert (qw.method, qw.out_features, qw.in_features, qw.group_size) == ("int8", n, k, None)
    _assert_matches_dequantized(qw, _x((m, k), dtype))


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32, torch.float16])
def test_int8_error_bounded_by_half_scale(wdtype):
    w = _weight(300, 256, dtype=wdtype)
    qw = quantize_int8(w)
    q, s = qw.codes()
    wf = w.float()
    absmax = wf.abs().amax(dim=1)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    # scale = absmax/127 rounded up to the next bf16 value
    assert bool((s >= absmax / 127 * (1 - 1e-6)).all()) and bool((s <= absmax / 127 * (1 + 2 ** -7)).all())
    assert torch.equal(s.to(torch.bfloat16).float(), s)
    err = (qw.dequantize(torch.float32) - wf).abs()
    assert bool((err <= s[:, None] / 2 * (1 + 1e-6)).all())
    assert torch.equal(qw.dequantize(torch.float32), q.float() * s[:, None])


@pytest.mark.parametrize("k", [40, 13, 1])
def test_int8_pads_k_to_a_multiple_of_16(k):
    # the bf16 kernel steps K by 16: K=40 would read past rows (inf/garbage), K=13 segfaults
    qw = quantize_int8(_weight(48, k))
    assert qw.padded_in_features % 16 == 0 and qw.in_features == k
    for m in (1, 5):
        _assert_matches_dequantized(qw, _x((m, k)))


def test_int8_misaligned_input_is_copied_not_crashing():
    # the bf16 kernel loads x with aligned 32-byte loads; a view 2 bytes into a buffer segfaults it
    qw = quantize_int8(_weight(64, 128))
    buf = _x((1 + 3 * 128,))
    x = buf[1:].view(3, 128)
    assert x.data_ptr() % 32 != 0
    _assert_matches_dequantized(qw, x)
    assert torch.equal(qw.matmul(x), qw.matmul(x.clone()))


# ---- int4 -----------------------------------------------------------------------------------
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("n,k", [(64, 256), (100, 640), (8, 128)])
@pytest.mark.parametrize("m", [1, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4_matmul_matches_dequantized(group_size, n, k, m, dtype):
    qw = quantize_int4(_weight(n, k, seed=n * k + group_size), group_size)
    assert (qw.method, qw.out_features, qw.in_features, qw.group_size) == ("int4", n, k, group_size)
    assert qw.padded_out_features % 16 == 0
    _assert_matches_dequantized(qw, _x((m, k), dtype))


# Gemma 3 270M: q (4 heads x 256), k/v, gate/up (each), o_proj, down_proj
@pytest.mark.parametrize("n,k", [(1024, 640), (256, 640), (2048, 640), (640, 1024), (640, 2048)])
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_gemma3_270m_shapes(n, k, method):
    qw = quantize(_weight(n, k, seed=n - k), method)
    for m in (1, 64):
        _assert_matches_dequantized(qw, _x((m, k), seed=m))


def test_int4_group_size_256():
    qw = quantize_int4(_weight(64, 512), 256)
    _assert_matches_dequantized(qw, _x((3, 512)))


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_error_bound_and_codes(group_size):
    w = _weight(100, 640, seed=group_size, dtype=torch.float32)
    qw = quantize_int4(w, group_size)
    q, s, z = qw.codes()
    assert q.dtype == torch.uint8 and q.shape == (100, 640) and int(q.max()) <= 15
    assert s.shape == z.shape == (100, 640 // group_size)
    assert torch.equal(z, z.round()) and bool(((z >= 0) & (z <= 15)).all())  # integer zero points
    se = s.repeat_interleave(group_size, dim=1)
    # |w - (q - z) * s| <= s/2 on the integer grid, + |8 - z| * s * 2^-8 <= s/32 for the kernel's
    # zero (8 - z) * s stored in bf16
    ze = z.repeat_interleave(group_size, dim=1)
    d = qw.dequantize(torch.float32)
    assert bool(((d - w).abs() <= se * (0.5 + (8 - ze).abs() * 2 ** -8) * (1 + 1e-5)).all())
    assert bool(((d - w).abs() <= se * (0.5 + 1 / 32) * (1 + 1e-5)).all())
    assert bool((((q.float() - ze) * se - w).abs() <= se * 0.5 * (1 + 1e-5)).all())
    # the grid covers [min(w, 0), max(w, 0)] of each group with 15 steps
    g = w.view(100, -1, group_size)
    rng = g.amax(-1).clamp(min=0) - g.amin(-1).clamp(max=0)
    assert bool((s * 15 >= rng * (1 - 1e-6)).all()) and bool((s * 15 <= rng * (1 + 2 ** -7)).all())


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_mse_grid_beats_minmax_and_the_kernel_equals_torch(group_size):
    """The "mse" grid (what --quantization int4 uses): per group, a squared error no larger than
    the plain min/max grid's (its first candidate); lower overall on weights with outliers; the
    C++ kernel and the torch ops give the same codes up to near-ties; the stored weight is
    the codes on that grid (up to bf16 scale / offset rounding); and matmuls match it."""
    from heron.ops.cpu import load_kernel
    from heron.quant.weight_only import mse_int4_codes
    w = _weight(100, 640, seed=group_size, dtype=torch.float32)
    w[3, :group_size] = 0.125                                   # a constant group: exact
    g = w.view(100, -1, group_size)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    s0 = ((hi - lo) / 15).clamp(min=1e-30)
    minmax_err = (((g - lo) / s0).round().clamp(0, 15) * s0 + lo - g).square().sum(-1)
    results = [mse_int4_codes(w, group_size, use_kernel=False)]
    if load_kernel() is not None:
        results.append(mse_int4_codes(w, group_size))
    for q, s, m in results:
        assert q.dtype == torch.uint8 and q.shape == (100, 640) and int(q.max()) <= 15
        assert s.shape == m.shape == (100, 640 // group_size) and bool((s >= 0).all())
        err = (q.view_as(g).float() * s[..., None] + m[..., None] - g).square().sum(-1)
        assert bool((err <= minmax_err * (1 + 1e-5) + 1e-12).all())
        assert err.sum() < 0.9 * minmax_err.sum()
        assert float(err[3, 0]) < 1e-12
    if len(results) == 2:
        (qa, sa, ma), (qb, sb, mb) = results
        assert (qa == qb).float().mean() > 0.999
        ea = (qa.view_as(g).float() * sa[..., None] + ma[..., None] - g).square().sum(-1)
        eb = (qb.view_as(g).float() * sb[..., None] + mb[..., None] - g).square().sum(-1)
        assert torch.allclose(ea, eb, rtol=0.05, atol=1e-9)
    qw = quantize_int4(w, group_size, grid="mse")
    q, s, m = results[-1]
    want = q.float() * s.repeat_interleave(group_size, 1) + m.repeat_interleave(group_size, 1)
    # bf16 scale and kernel zero (8 s + offset): at most 2^-8 (8 |s| + |8 s + m|) off
    bound = 2 ** -8 * (8 * s + (8 * s + m).abs()).repeat_interleave(group_size, 1) * (1 + 1e-5) + 1e-12
    assert bool(((qw.dequantize(torch.float32) - want).abs() <= bound).all())
    _assert_matches_dequantized(qw, _x((3, 640)))
    with pytest.raises(ValueError, match="grid must be one of"):
        quantize_int4(w, group_size, grid="nearest")


def test_int4_dequantize_matches_the_formula():
    # from_int4's convention: w = (q - zeros) * scales, stored as the kernel's
    # (q - 8) * scale + zero with zero = bf16((8 - zeros) * bf16(scale))
    n, k, gs = 48, 256, 64
    gen = torch.Generator().manual_seed(7)
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
    s = torch.rand(n, k // gs, generator=gen) * 0.02 + 1e-3
    z = torch.randint(0, 16, (n, k // gs), generator=gen).float()
    qw = QuantizedWeight.from_int4(q, s, z, gs)
    se = s.to(torch.bfloat16).float().repeat_interleave(gs, 1)
    ze = z.repeat_interleave(gs, 1)
    zk = ((8 - ze) * se).to(torch.bfloat16).float()
    d = qw.dequantize(torch.float32)
    assert torch.equal(d, (q.float() - 8) * se + zk)
    assert bool(((d - (q.float() - ze) * se).abs() <= (8 - ze).abs() * se * 2 ** -8 + 1e-12).all())
    # and the kernel multiplies by exactly these weights: one-hot rows read single weights
    eye = torch.eye(k, dtype=torch.bfloat16)[:16]
    assert torch.equal(qw.matmul(eye).float(), d[:, :16].t().to(torch.bfloat16).float())
    # zeros=None: symmetric, w = (q - 8) * scale
    assert torch.equal(QuantizedWeight.from_int4(q, s, None, gs).dequantize(torch.float32), (q.float() - 8) * se)


def test_int4_layout_probe_and_kernel_fallback_agree(monkeypatch):
    qw = quantize_int4(_weight(176, 256), 32)  # 176 = 2 full 64-row blocks + a 48-row tail
    layout = wo._int4_layout()
    assert layout != "kernel", "packed layout of this build not recognised (fallback is slow)"
    via_kernel = wo._unpack_via_kernel(qw.qweight, qw.padded_out_features, 256, 32)
    assert torch.equal(via_kernel, wo._unpack_with(qw.qweight.reshape(-1), 176, 256, layout))
    d, c = qw.dequantize(torch.float32), qw.codes()
    monkeypatch.setattr(wo, "_layout", "kernel")
    assert torch.equal(qw.dequantize(torch.float32), d)
    assert all(torch.equal(a, b) for a, b in zip(qw.codes(), c))


def test_row_chunking_gives_identical_results(monkeypatch):
    w = _weight(200, 128)
    ref4, ref8 = quantize_int4(w, 32), quantize_int8(w)
    monkeypatch.setattr(wo, "_ROW_CHUNK", 64)
    q4, q8 = quantize_int4(w, 32), quantize_int8(w)
    assert torch.equal(q4.qweight, ref4.qweight) and torch.equal(q4.scales, ref4.scales)
    assert torch.equal(q8.qweight, ref8.qweight) and torch.equal(q8.scales, ref8.scales)
    assert torch.equal(q4.dequantize(torch.float32), ref4.dequantize(torch.float32))
    assert torch.equal(q8.dequantize(torch.float32), ref8.dequantize(torch.float32))
    assert all(torch.equal(a, b) for a, b in zip(q4.codes(), ref4.codes()))


# ---- degenerate weights ---------------------------------------------------------------------
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_constant_zero_and_extreme_rows(method):
    k = 128
    w = _weight(32, k, dtype=torch.float32)
    w[0] = 0.0                                  # all-zero row
    w[1] = 0.37                                 # constant rows
    w[2] = -2.5
    w[3, :] = 1e30                              # huge
    w[4, :] = torch.linspace(-1e30, 1e30, k)
    w[5, :] = 1e-30                             # tiny (normal fp32 / bf16)
    w[6, 5] = 1e4                               # one outlier in a small row
    w[7, :64] = 3.0                             # a constant group next to an all-zero group
    w[7, 64:] = 0.0
    qw = quantize(w, method, 64 if method == "int4" else None)
    d = qw.dequantize(torch.float32)
    assert torch.isfinite(d).all()
    assert torch.equal(d[0], torch.zeros(k)) and torch.equal(d[7, 64:], torch.zeros(64))
    rel = 2 ** -6 if method == "int4" else 2 ** -7  # constants sit on the grid up to bf16 scale/zero rounding
    for row, c in ((1, 0.37), (2, -2.5), (3, 1e30), (5, 1e-30)):
        assert bool(((d[row] - c).abs() <= abs(c) * rel).all()), (row, d[row, :4])
    assert bool(((d[7, :64] - 3.0).abs() <= 3.0 * rel).all())
    x = _x((4, k))
    y = qw.matmul(x)
    assert torch.isfinite(y).all()
    assert torch.equal(y[:, 0], torch.zeros(4, dtype=y.dtype))
    _assert_matches_dequantized(qw, x)


def test_non_finite_weights_are_rejected():
    w = _weight(16, 64, dtype=torch.float32)
    w[3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_int8(w)
    w[3, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_int4(w, 32)


# ---- inputs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_input_shapes_and_dtypes(method):
    qw = quantize(_weight(100, 256), method)
    x3 = _x((2, 5, 256))
    y3 = qw.matmul(x3)
    assert y3.shape == (2, 5, 100) and y3.dtype == torch.bfloat16
    assert torch.equal(y3.reshape(10, 100), qw.matmul(x3.reshape(10, 256)))
    assert torch.equal(qw(x3), y3)
    _assert_matches_dequantized(qw, x3)
    # float32 / float16 run in bf16: the same as rounding x to bf16 first
    x32 = _x((7, 256), torch.float32)
    y32 = qw.matmul(x32)
    assert y32.dtype == torch.float32 and torch.equal(y32, qw.matmul(x32.to(torch.bfloat16)).float())
    assert qw.matmul(x32.half()).dtype == torch.float16
    # non-contiguous input, empty batch
    xt = _x((256, 3)).t()
    assert torch.equal(qw.matmul(xt), qw.matmul(xt.contiguous()))
    assert qw.matmul(_x((0, 256))).shape == (0, 100)
    assert qw.matmul(_x((256,))).shape == (100,)


# ---- integer constructors -------------------------------------------------------------------
@pytest.mark.parametrize("method,gs", [("int8", None), ("int4", 32), ("int4", 64), ("int4", 128)])
def test_codes_round_trip(method, gs):
    w = _weight(100, 640, seed=3)
    qw = quantize(w, method, gs)
    codes = qw.codes()
    if method == "int8":
        rebuilt = QuantizedWeight.from_int8(*codes)
    else:
        rebuilt = QuantizedWeight.from_int4(*codes, group_size=gs)
    assert torch.equal(rebuilt.qweight, qw.qweight) and torch.equal(rebuilt.scales, qw.scales)
    for m in (1, 64):
        x = _x((m, 640), seed=m)
        assert torch.equal(rebuilt.matmul(x), qw.matmul(x))
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.codes(), codes))


def test_from_int4_gptq_style_inputs():
    # int32 codes, fp16 scales, integer zeros: what a GPTQ/AWQ loader would hand over once unpacked
    n, k, gs = 64, 256, 128
    gen = torch.Generator().manual_seed(11)
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
    s = (torch.rand(n, k // gs, generator=gen) * 0.01 + 1e-3).half()
    z = torch.randint(0, 16, (n, k // gs), generator=gen, dtype=torch.int32)
    qw = QuantizedWeight.from_int4(q, s, z, gs)
    q2, s2, z2 = qw.codes()
    assert torch.equal(q2, q.to(torch.uint8)) and torch.equal(z2, z.float())
    assert torch.equal(s2, s.to(torch.bfloat16).float())
    # fractional zero points survive too (as the fraction that reproduces the kernel's zero)
    zf = z.float() + 0.3
    qf = QuantizedWeight.from_int4(q, s, zf, gs)
    assert torch.equal(QuantizedWeight.from_int4(*qf.codes(), group_size=gs).scales, qf.scales)


# ---- errors -----------------------------------------------------------------------------------
def test_errors():
    w = _weight(64, 192)
    for bad in (16, 48, 512, "64", True, None):
        with pytest.raises(ValueError, match=r"\(32, 64, 128, 256\)"):
            quantize_int4(w, bad)
    with pytest.raises(ValueError, match=r"in_features=192 is not divisible by group_size=128.*\[32, 64\]"):
        quantize_int4(w, 128)
    with pytest.raises(ValueError, match="no allowed group size"):
        quantize_int4(_weight(64, 48), 32)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        quantize_int8(torch.ones(4, 16, dtype=torch.int32))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        quantize_int4(torch.ones(4, 64, dtype=torch.float64), 32)
    with pytest.raises(ValueError, match="2-D"):
        quantize_int8(torch.ones(64))
    with pytest.raises(ValueError, match="method must be one of"):
        quantize(w, "int3")
    assert quantize(w, "int8", 64).group_size == 64     # int8 takes a group size too (group-wise)
    with pytest.raises(ValueError, match="group_size must be one of"):
        quantize(w, "int8", 48)
    qw = quantize_int4(w, 64)
    with pytest.raises(TypeError, match="bfloat16, float32 or float16"):
        qw.matmul(torch.ones(2, 192, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\[\.\.\., 192\]"):
        qw.matmul(torch.ones(2, 191, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="codes must be in 0..15"):
        QuantizedWeight.from_int4(torch.full((16, 64), 16), torch.ones(16, 2), None, 32)
    with pytest.raises(TypeError, match="integer tensor"):
        QuantizedWeight.from_int4(torch.ones(16, 64), torch.ones(16, 2), None, 32)
    with pytest.raises(ValueError, match=r"scales must have shape \[N, K/group_size\] = \[16, 2\]"):
        QuantizedWeight.from_int4(torch.ones(16, 64, dtype=torch.uint8), torch.ones(16, 1), None, 32)
    with pytest.raises(TypeError, match="int8 tensor"):
        QuantizedWeight.from_int8(torch.ones(16, 64, dtype=torch.int32), torch.ones(16))
    with pytest.raises(ValueError, match=r"scales must have shape \[16\]"):
        QuantizedWeight.from_int8(torch.ones(16, 64, dtype=torch.int8), torch.ones(8))


# ---- size -------------------------------------------------------------------------------------
def test_nbytes():
    n, k = 1024, 640
    w = _weight(n, k)
    bf16 = n * k * 2
    q8 = quantize_int8(w)
    assert q8.nbytes() == n * k + 2 * n
    assert 0.5 <= q8.nbytes() / bf16 < 0.51
    for gs in INT4_GROUP_SIZES[:3]:
        q4 = quantize_int4(w, gs)
        assert q4.nbytes() == n * k // 2 + (k // gs) * n * 2 * 2  # codes + bf16 (scale, zero) per group
        assert q4.nbytes() / bf16 == pytest.approx(0.25 + 2 / gs)
        assert q4.nbytes() / bf16 <= 0.40
    # padded N (100 -> 112) counts the padding it keeps
    assert quantize_int4(_weight(100, 640), 64).nbytes() == 112 * 320 + 10 * 112 * 4


@pytest.mark.slow
def test_lm_head_shape():
    # Gemma 3's tied LM head: N=262144, K=640 (packing is chunked by rows; check a few row blocks)
    n, k = 262144, 640
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0)).mul_(0.03).to(torch.bfloat16)
    x = _x((2, k))
    for qw in (quantize_int8(w), quantize_int4(w, 64)):
        y = qw.matmul(x)
        assert y.shape == (2, n) and torch.isfinite(y).all()
        rows = torch.cat([torch.arange(0, 64), torch.arange(8190, 8260), torch.arange(n - 70, n)])
        d = qw.dequantize(torch.float32)[rows]
        ref = x.float() @ d.t()
        err = (y[:, rows].float() - ref).abs()
        assert bool((err <= 2.0 ** -7 * ref.abs() + 2.0 ** -12 * (x.float().abs() @ d.abs().t())).all())


# ---- heron's own GEMV kernels (gemv_q8 / gemv_q4) for the small calls --------------------------
def _kernels_or_skip():
    ops = wo._gemv_kernels()
    if ops is None:
        pytest.skip("heron's CPU kernels are not built here (no compiler, or neither AVX512-BF16 nor AVX2)")
    return ops


@pytest.mark.parametrize("method,gs,rows", [("int8", None, (1, 2, 5, 16)), ("int4", 32, (1, 3, 4, 8)),
                                            ("int4", 64, (1, 2, 6, 7)), ("int4", 128, (1, 8))])
@pytest.mark.parametrize("n,k", [(64, 256), (1536, 640), (640, 2048)])
def test_gemv_kernels_take_small_calls_and_match(method, gs, rows, n, k):
    ops = _kernels_or_skip()
    if method == "int4" and not ops.gemv_q4_supported():
        pytest.skip("the int4 GEMV needs AVX512-BF16 with AVX512-VBMI, or AVX2")
    qw = quantize(_weight(n, k, seed=n + k), method, gs)
    most = ops.gemv_q8_max_rows() if method == "int8" else ops.gemv_q4_max_rows()
    # AVX512-BF16 / AVX2 (int4 on AVX2: any number of rows, GEMM-style from 16: test_gemv_q4_many_rows)
    assert most in ((16, 8) if method == "int8" else (8, 1 << 40))
    assert qw._fast == (f"gemv_q{8 if method == 'int8' else 4}", most)
    limit = min(most, 8)
    rows = tuple(sorted({r for r in rows if r <= limit} | {limit}))
    assert qw.blocked == (method == "int4")
    if method == "int4":
        assert qw.block_rows == ops.gemv_q4_block() and qw.scales.shape == (n // qw.block_rows, k // gs, qw.block_rows, 2)
    x = _x((max(rows), k), seed=n)
    for m in rows:
        _assert_matches_dequantized(qw, x[:m])
    # exactly the kernel's result, and each row's result independent of how many rows share the call
    direct = (ops.gemv_q8(x, qw.qweight, qw.scales) if method == "int8"
              else ops.gemv_q4(x, qw.qweight, qw.scales, gs))
    assert torch.equal(qw.matmul(x), direct)
    for m in rows:
        assert torch.equal(qw.matmul(x[:m]), direct[:m])
    assert torch.equal(qw.matmul(x[m - 1: m]), direct[m - 1: m])


@pytest.mark.parametrize("method,gs", [("int8", None), ("int4", 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_more_rows_than_a_kernel_pass_run_as_several_passes(method, gs, dtype):
    """A call of more rows than one kernel pass takes (heron.quant.apply lets up to 256 through
    on some CPUs) runs pass after pass over the weight: each row's result is exactly what that row
    alone gets."""
    _kernels_or_skip()
    qw = quantize(_weight(96, 256, seed=3), method, gs)
    assert qw._fast is not None
    most = qw._fast[1]
    if most > 256:   # int4 on AVX2: one call takes any number of rows, in passes of 4 below 16 rows
        most = 4       # (GEMM-style from there on: tests/unit/test_cpu_kernels.py, test_gemv_q4_many_rows)
    x = _x((3 * most + 1, 256), dtype=dtype, seed=4)
    got = qw.matmul(x)
    assert got.dtype == dtype and got.shape == (3 * most + 1, 96)
    for r in (0, most - 1, most, 2 * most + 3, 3 * most):
        assert torch.equal(got[r: r + 1], qw.matmul(x[r: r + 1])), r
    _assert_matches_dequantized(qw, x.to(torch.bfloat16))


@pytest.mark.parametrize("method,gs", [("int4", 32), ("int4", 64), ("int8", None)])
def test_avx2_gemv_kernels_read_every_weight_right(method, gs):
    """The AVX2 variants read each code and scale where dequantize() does: with x one-hot in
    column k (any row of the call), the output is that weight column rounded to bf16 -- exactly
    for int8; int4 adds (zero - 8 scale) as one float32 term, so within one bf16 step."""
    ops = _kernels_or_skip()
    if ops.gemv_q4_block() != 32:
        pytest.skip("this CPU runs the AVX512-BF16 variants (bf16 products, another rounding)")
    n, k = 96, 256
    qw = quantize(_weight(n, k, seed=5), method, gs)
    w = qw.dequantize(torch.float32)
    for col in (0, 1, 37, 64, 255):
        for m, row in ((1, 0), (3, 2), (8, 5)):
            x = torch.zeros(m, k, dtype=torch.bfloat16)
            x[row, col] = 1.0
            y = qw.matmul(x)
            want = w[:, col].to(torch.bfloat16)
            if method == "int8":
                assert torch.equal(y[row], want), (col, m, row)
            else:
                step = 2.0 ** (torch.frexp(want.float())[1].float() - 8)   # a bf16 ulp at |want|
                assert bool(((y[row].float() - want.float()).abs() <= step).all()), (col, m, row)
            assert not y[torch.arange(m) != row].any()


@pytest.mark.parametrize("n,k,gs", [(96, 256, 64), (90, 128, 32), (4096, 640, 64), (640, 2048, 128), (224, 512, 256)])
def test_int4_dequantize_in_cpp_equals_the_torch_ops(n, k, gs):
    """Blocked int4 weights dequantize in heron's C++ loop (dequant_q4, and dequant_q4_rows for
    the rows an embedding looks up): the very values of the torch-op path, float32 and bf16,
    padded rows left out."""
    ops = _kernels_or_skip()
    qw = quantize_int4(_weight(n, k, seed=n), gs)
    if not qw.blocked:
        assert qw.padded_out_features % max(ops.gemv_q4_block(), 1) != 0   # only then unblocked
        pytest.skip(f"{n} rows pad to {qw.padded_out_features}: not whole blocks of {ops.gemv_q4_block()} here")
    rows = torch.tensor([0, n - 1, 5, 5, n // 2, 33 % n])
    for dtype in (torch.float32, torch.bfloat16):
        got = qw.dequantize(dtype)
        want = qw._dequantize_int4_torch(torch.empty(n, k, dtype=dtype))
        assert got.dtype == dtype and got.shape == (n, k)
        assert torch.equal(got, want)
        # an embedding lookup in a tied head: those rows alone, in C++ (dequant_q4_rows)
        assert torch.equal(qw.dequantize_rows(rows, dtype), want[rows])
        assert qw.dequantize_rows(rows[:0], dtype).shape == (0, k)
    with pytest.raises(RuntimeError, match="out of range"):
        ops.dequant_q4_rows(qw.qweight, qw.scales, gs, torch.tensor([qw.padded_out_features]), False)


def test_blocked_int4_scales_serve_torch_kernel_dequantize_and_codes(monkeypatch):
    _kernels_or_skip()
    w = _weight(192, 256)
    qw = quantize_int4(w, 32)
    if not qw.blocked:
        pytest.skip("the int4 GEMV kernel is not available here")
    blk = qw.block_rows                                # 64 on AVX-512, 32 on AVX2
    assert blk in (32, 64) and qw.scales.shape == (192 // blk, 256 // 32, blk, 2)
    monkeypatch.setattr(wo, "_gemv_kernels", lambda: None)
    plain = quantize_int4(w, 32)                      # torch's [G, N, 2] order
    assert not plain.blocked and plain._fast is None
    assert torch.equal(qw.group_scales(), plain.scales)
    assert torch.equal(qw.group_scales(64, 150), plain.scales[:, 64:150])
    assert torch.equal(qw.group_scales(40, 41), plain.scales[:, 40:41])   # not on a block boundary
    assert torch.equal(qw.dequantize(torch.float32), plain.dequantize(torch.float32))
    rows = torch.tensor([0, 63, 64, 130, 191, 5])
    assert torch.equal(qw.dequantize_rows(rows), plain.dequantize_rows(rows))
    assert all(torch.equal(a, b) for a, b in zip(qw.codes(), plain.codes()))
    x = _x((12, 256))
    assert torch.equal(qw.matmul(x), plain.matmul(x))  # > 8 rows: torch's kernel on both
    small = x[:3]                                      # the GEMV kernel against torch's
    err = (qw.matmul(small).float() - plain.matmul(small).float()).abs()
    ref = small.float() @ plain.dequantize(torch.float32).t()
    assert bool((err <= 2.0 ** -7 * ref.abs() + 1e-3).all())


def test_gemv_kernel_input_checks():
    ops = _kernels_or_skip()
    q8 = quantize_int8(_weight(64, 256))
    most = ops.gemv_q8_max_rows()
    with pytest.raises(RuntimeError, match=f"1-{most} rows"):
        ops.gemv_q8(_x((most + 1, 256)), q8.qweight, q8.scales)
    with pytest.raises(RuntimeError, match="x \\[M, K\\], w \\[N, K\\]"):
        ops.gemv_q8(_x((1, 128)), q8.qweight, q8.scales)
    if ops.gemv_q4_supported():
        q4 = quantize_int4(_weight(64, 256), 32)
        most = ops.gemv_q4_max_rows()
        if most == 8:   # the AVX-512 GEMV (on AVX2 any number of rows)
            with pytest.raises(RuntimeError, match="1-8 rows"):
                ops.gemv_q4(_x((9, 256)), q4.qweight, q4.scales, 32)
        with pytest.raises(RuntimeError, match=f"1-{most} rows"):
            ops.gemv_q4(_x((1, 256))[:0], q4.qweight, q4.scales, 32)
        with pytest.raises(RuntimeError, match="group size"):
            ops.gemv_q4(_x((1, 256)), q4.qweight, q4.scales, 64)


# ---- int8, group-wise (--quantization int8 --quantization-group-size G) -----------------------------
@pytest.mark.parametrize("group", [16, 32, 128])
def test_int8_groups_error_bound_and_codes(group):
    """One float32 scale per `group` input columns: |w - q s| <= s / 2 with s = absmax(group) / 127,
    the codes round-trip through from_int8, and rows are dequantized like the whole matrix."""
    from heron.quant.weight_only import QuantizedWeight, quantize_int8
    torch.manual_seed(3)
    w = torch.randn(96, 256) * torch.logspace(-3, 0, 256)[None, :]   # groups of very different ranges
    qw = quantize_int8(w, group)
    assert (qw.method, qw.group_size, qw.scales.shape, qw.scales.dtype) == ("int8", group, (96, 256 // group), torch.float32)
    s = w.view(96, -1, group).abs().amax(2) / 127
    torch.testing.assert_close(qw.scales, s, rtol=0, atol=0)
    err = (qw.dequantize(torch.float32) - w).view(96, -1, group).abs()
    assert bool((err <= s[..., None] / 2 * (1 + 1e-5)).all())      # (float32 rounding of w / s and q s)
    # finer than one scale per output channel on such rows
    assert (qw.dequantize(torch.float32) - w).abs().mean() < (quantize_int8(w).dequantize(torch.float32) - w).abs().mean()
    q, sc = qw.codes()
    again = QuantizedWeight.from_int8(q, sc)
    assert again.group_size == group and torch.equal(again.dequantize(), qw.dequantize())
    rows = torch.tensor([0, 95, 7, 7])
    assert torch.equal(qw.dequantize_rows(rows, torch.float32), qw.dequantize(torch.float32)[rows])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 9])
def test_int8_groups_matmul_sums_in_float32(dtype, rows, monkeypatch):
    """matmul (heron's gemv_q8g) sums products of x and the codes in float32 and rounds once to
    x's dtype; without the kernels it runs the dequantized weight through F.linear."""
    from heron.ops import cpu as cpu_ops
    from heron.quant.weight_only import quantize_int8
    torch.manual_seed(4)
    qw = quantize_int8(torch.randn(130, 320) * 0.05, 32)
    x = torch.randn(2, rows, 320).to(dtype)
    ref = (x.double() @ qw.dequantize(torch.float32).double().t())
    out = qw.matmul(x)
    assert out.dtype == dtype and out.shape == (2, rows, 130)
    if cpu_ops.load_kernel() is not None:
        tol = 1e-5 if dtype == torch.float32 else 2 ** -8
        torch.testing.assert_close(out.double(), ref.to(dtype).double(), rtol=tol, atol=1e-5)
    monkeypatch.setattr(cpu_ops, "load_kernel", lambda: None)
    assert torch.equal(qw.matmul(x), torch.nn.functional.linear(x, qw.dequantize(dtype)))


def test_int8_group_errors():
    from heron.quant.weight_only import QuantizedWeight, quantize, quantize_int8
    w = torch.randn(8, 96)
    with pytest.raises(ValueError, match="group_size must be one of"):
        quantize_int8(w, 40)
    with pytest.raises(ValueError, match="group_size must be one of"):
        quantize_int8(w, 64)                         # does not divide 96
    with pytest.raises(ValueError, match="group-wise int8 takes groups of"):
        QuantizedWeight.from_int8(torch.zeros(8, 96, dtype=torch.int8), torch.ones(8, 32))   # groups of 3
    assert quantize(torch.randn(8, 128), "int8", 128).group_size is None   # one group a row is per channel
    assert quantize(w, "int8").group_size is None
