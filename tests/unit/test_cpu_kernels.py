"""heron's C++ CPU kernels against torch: the row argmax used by greedy sampling."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from heron.ops.cpu import argmax_rows, kernel_error, load_kernel
from heron.sample.sampler import greedy_argmax

pytestmark = pytest.mark.skipif(load_kernel() is None, reason=f"heron's CPU kernels did not build: {kernel_error()}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows,vocab", [(1, 262144), (3, 17), (17, 8193), (64, 20000), (1, 1)])
@pytest.mark.parametrize("layout", ["rows", "columns"])
def test_argmax_rows_matches_torch(dtype, rows, vocab, layout):
    g = torch.Generator().manual_seed(rows * vocab)
    x = torch.randn(rows, vocab, generator=g).to(dtype)
    if vocab > 8200:
        # the maximum twice, in different 8192-wide chunks and lanes: the first one wins
        top = x.float().max().item() + 1
        x[:, 8200] = top
        x[:, 8191] = top
        x[0, 3] = top
    if layout == "columns":
        x = x.t().contiguous().t()  # [V, R] storage, as W @ h^T produces
    assert torch.equal(argmax_rows(x), x.float().argmax(dim=-1))
    assert torch.equal(greedy_argmax(x), x.float().argmax(dim=-1))


def test_argmax_rows_declines_what_it_cannot_do():
    assert argmax_rows(torch.zeros(2, 3, dtype=torch.float16)) is None
    assert argmax_rows(torch.zeros(4, 6)[::2, ::2]) is None  # neither rows nor columns contiguous
    assert argmax_rows(torch.zeros(5)) is None
    assert greedy_argmax(torch.tensor([[1.0, 3.0, 3.0]], dtype=torch.float16)).tolist() == [1]


# ---- fused bf16 ops against the torch expressions they replace -------------------------------
def _close_in_bf16(out: torch.Tensor, ref: torch.Tensor, min_exact: float = 0.98) -> None:
    """Equal up to one bf16 rounding step (summation order and the exp/tanh polynomials differ
    from torch's in the last float32 bits), and nearly all elements bit for bit equal."""
    assert out.dtype == ref.dtype == torch.bfloat16 and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), rtol=2 ** -7, atol=1e-5)
    assert (out == ref).float().mean().item() >= min_exact


def _bf16(*shape, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).bfloat16()


@pytest.mark.parametrize("shape", [(1, 640), (37, 640), (5, 4, 256), (3, 40)])
def test_fused_rms_norm_matches_torch(shape):
    from heron.layers.norm import GemmaRMSNorm, RMSNorm
    x, res = _bf16(*shape, seed=1, scale=3.0), _bf16(*shape, seed=2)
    ops = load_kernel()
    for cls, gemma in ((GemmaRMSNorm, True), (RMSNorm, False)):
        norm = cls(shape[-1], 1e-6).to(torch.bfloat16)
        norm.weight.copy_(_bf16(shape[-1], seed=3))
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        ref = (h * (1.0 + norm.weight.float())).to(x.dtype) if gemma else norm.weight * h.to(x.dtype)
        _close_in_bf16(ops.rms_norm(x, norm.weight, 1e-6, gemma, None), ref)
        _close_in_bf16(norm(x), ref)  # the layer takes the fused path for bf16
        if gemma:
            _close_in_bf16(norm(x, residual=res), res + ref)


@pytest.mark.parametrize("rows,width", [(1, 4096), (9, 2048), (4, 34)])
def test_fused_act_and_mul_matches_torch(rows, width):
    import torch.nn.functional as F
    x = _bf16(rows, width, seed=4, scale=2.5)
    gate, up = x.chunk(2, dim=-1)
    ops = load_kernel()
    _close_in_bf16(ops.act_and_mul(x, True), F.gelu(gate, approximate="tanh") * up)
    _close_in_bf16(ops.act_and_mul(x, False), F.silu(gate) * up)


def test_fused_rope_matches_torch():
    from heron.layers.rotary import _rotate_half, apply_rotary
    t, h, d = 11, 4, 256
    x = _bf16(t, h, d, seed=5, scale=2.0)
    pos = torch.arange(100, 100 + t).float()
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
    emb = torch.cat([pos[:, None] * inv] * 2, dim=-1)
    cos, sin = emb.cos().bfloat16(), emb.sin().bfloat16()
    ref = x * cos[:, None] + _rotate_half(x) * sin[:, None]
    out = apply_rotary(x, cos, sin)  # fused path for bf16
    assert torch.equal(out, ref)
    strided = torch.cat([x, x], dim=-1)[..., :d]  # rows of D not contiguous with each other
    assert torch.equal(load_kernel().rope(strided, cos, sin), ref)


def test_fused_ops_reject_other_dtypes():
    ops = load_kernel()
    with pytest.raises(RuntimeError, match="bfloat16"):
        ops.act_and_mul(torch.zeros(2, 4, dtype=torch.float16), True)
    with pytest.raises(RuntimeError, match="float32 weight"):
        ops.rms_norm(torch.zeros(2, 4), torch.zeros(4, dtype=torch.bfloat16), 1e-6, True, None)
    with pytest.raises(RuntimeError, match="float32 cos"):
        ops.rope(torch.zeros(2, 1, 4), torch.zeros(2, 4, dtype=torch.bfloat16), torch.zeros(2, 4, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="bfloat16"):
        ops.rms_norm(torch.zeros(2, 4, dtype=torch.float16), torch.zeros(4, dtype=torch.float16), 1e-6, True, None)


@pytest.mark.parametrize("shape", [(1, 640), (37, 640), (5, 4, 256), (3, 40)])
def test_fused_float32_rms_norm_and_rope_when_asked(shape, monkeypatch):
    """float32 activations take the fused norm / rope only when the layer says so (quantized
    models); the results are torch's expressions up to float32 summation order."""
    import heron.layers.norm as norm_mod
    from heron.layers.norm import GemmaRMSNorm, RMSNorm
    from heron.layers.rotary import _rotate_half, apply_rotary
    calls = []

    class Spy:   # the kernels module, counting rms_norm calls
        def __getattr__(self, name):
            if name == "rms_norm":
                calls.append(name)
            return getattr(load_kernel(), name)

    monkeypatch.setattr(norm_mod, "fused_ops", lambda x, f32=False: Spy() if load_kernel() and (
        x.dtype == torch.bfloat16 or f32) else None)
    g = torch.Generator().manual_seed(7)
    x, res = torch.randn(*shape, generator=g) * 3.0, torch.randn(*shape, generator=g)
    for cls, gemma in ((GemmaRMSNorm, True), (RMSNorm, False)):
        norm = cls(shape[-1], 1e-6)
        norm.weight.copy_(torch.randn(shape[-1], generator=g))
        h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        ref = h * (1.0 + norm.weight) if gemma else norm.weight * h
        assert torch.equal(norm(x), ref) and not calls     # unset: torch's expression, bit for bit
        norm.fused_float32 = True
        torch.testing.assert_close(norm(x), ref, rtol=1e-5, atol=1e-6)
        assert calls == ["rms_norm"]
        if gemma:
            torch.testing.assert_close(norm(x, residual=res), res + ref, rtol=1e-5, atol=1e-5)
        calls.clear()
    if len(shape) == 3:
        t, hds, d = shape
        cos, sin = torch.randn(t, d, generator=g), torch.randn(t, d, generator=g)
        want = x * cos[:, None] + _rotate_half(x) * sin[:, None]
        torch.testing.assert_close(apply_rotary(x, cos, sin, fused_float32=True), want, rtol=1e-5, atol=1e-5)
        strided = torch.cat([x, x], dim=-1)[..., :d]
        torch.testing.assert_close(apply_rotary(strided, cos, sin, fused_float32=True), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("width", [2048, 100, 13])
@pytest.mark.parametrize("gelu", [True, False])
def test_fused_float32_act_and_mul_when_asked(width, gelu, monkeypatch):
    """float32 GeGLU / SwiGLU take the fused op (vectorised exp / tanh, a scalar tail) only when
    the layer says so; the results are torch's within float32 rounding."""
    import heron.layers.activation as act_mod
    from heron.layers.activation import GeluTanhAndMul, SiluAndMul
    if load_kernel() is None:
        pytest.skip("heron's CPU kernels are not built here")
    calls = []
    monkeypatch.setattr(act_mod, "fused_ops", lambda x, f32=False: calls.append(f32) or (
        load_kernel() if x.dtype == torch.bfloat16 or f32 else None))
    g = torch.Generator().manual_seed(width)
    x = torch.randn(3, 2 * width, generator=g) * 4.0
    x[0, :6] = torch.tensor([0.0, 1e-8, -30.0, 30.0, 0.6, -0.6])   # both tanh branches, saturation
    gate, up = x.chunk(2, dim=-1)
    want = (F.gelu(gate, approximate="tanh") if gelu else F.silu(gate)) * up
    layer = GeluTanhAndMul() if gelu else SiluAndMul()
    assert torch.equal(layer(x), want) and calls == [False]    # unset: torch's expression, bit for bit
    layer.fused_float32 = True
    got = layer(x)
    assert calls == [False, True] and got.dtype == torch.float32 and got.shape == want.shape
    # (1 + tanh) cancels for very negative gates in both: absolute differences of ~eps * |gate * up|
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(load_kernel().act_and_mul(x, gelu), got)


@pytest.mark.parametrize("t,hq,hkv,d", [(1, 4, 1, 256), (7, 8, 2, 64), (3, 2, 2, 40)])
def test_qk_norm_rope_equals_norm_then_rope(t, hq, hkv, d):
    """Gemma's q/k norms and rope in one float32 call: the very values of rms_norm then rope (the
    same row code), from a qkv row of any stride, v left alone."""
    ops = load_kernel()
    if ops is None:
        pytest.skip("heron's CPU kernels are not built here")
    g = torch.Generator().manual_seed(d)
    width = (hq + 2 * hkv) * d
    qkv = torch.randn(t, width + 8, generator=g)[:, :width] * 3.0     # rows padded: a row stride of its own
    qw, kw = torch.randn(d, generator=g) * 0.2, torch.randn(d, generator=g) * 0.2
    ang = torch.randn(t, d // 2, generator=g)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    q, k = ops.qk_norm_rope(qkv, qw, kw, cos, sin, 1e-6, hq, hkv)
    q0, k0, _ = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    want_q = ops.rope(ops.rms_norm(q0.reshape(t, hq, d), qw, 1e-6, True, None), cos, sin)
    want_k = ops.rope(ops.rms_norm(k0.reshape(t, hkv, d), kw, 1e-6, True, None), cos, sin)
    assert q.shape == (t, hq, d) and k.shape == (t, hkv, d)
    assert torch.equal(q, want_q) and torch.equal(k, want_k)
    h = q0.reshape(t, hq, d)
    ref = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + qw)
    ref = ref * cos[:, None] + torch.cat([-ref[..., d // 2:], ref[..., : d // 2]], -1) * sin[:, None]
    torch.testing.assert_close(q, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="Hq \\+ 2 Hkv"):
        ops.qk_norm_rope(qkv, qw, kw, cos, sin, 1e-6, hq + 1, hkv)
    with pytest.raises(RuntimeError, match="float32"):
        ops.qk_norm_rope(qkv.bfloat16(), qw, kw, cos, sin, 1e-6, hq, hkv)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 9, 16])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_linear(rows, bias):
    ops = load_kernel()
    if not ops.gemv_supported():
        pytest.skip("this CPU has no AVX512-BF16")
    x, w = _bf16(rows, 640, seed=6), _bf16(1027, 640, seed=7)  # odd N: the one-row tail
    b = _bf16(1027, seed=8) if bias else None
    ref = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    out = ops.gemv(x, w, b)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 1027)
    # products are exact in float32; only the summation order differs from float32 linear
    torch.testing.assert_close(out.float(), ref.bfloat16().float(), rtol=2 ** -7, atol=1e-3)
    # a row's result does not depend on the rows sharing the call (verification = plain decode)
    assert torch.equal(out[-1], ops.gemv(x[-1:], w, b)[0])
    with pytest.raises(RuntimeError, match="1-16 rows"):
        ops.gemv(_bf16(17, 640, seed=6), w, b)


def test_linear_layer_paths_agree():
    """A bf16 linear layer gives the same result through all three paths: the GEMV kernel
    (1-3 rows), oneDNN's packed weight, and plain F.linear."""
    from heron.layers.linear import RowParallelLinear
    layer = RowParallelLinear(640, 256, bias=False).to(torch.bfloat16)
    layer.weight.copy_(_bf16(256, 640, seed=9))
    x = _bf16(6, 640, seed=10)
    plain = torch.nn.functional.linear(x, layer.weight)
    layer.process_weights_after_loading()
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        # an AVX2-only CPU: oneDNN's bf16 reorder would raise, so the layer keeps F.linear
        assert layer.packed_weight is None
        assert torch.equal(layer(x), plain) and torch.equal(layer(x[:2]), plain[:2])
        return
    assert layer.packed_weight is not None
    assert torch.equal(layer(x), plain)  # 6 rows: packed oneDNN, bit-identical
    _close_in_bf16(layer(x[:2]), plain[:2], min_exact=0.9)  # 2 rows: GEMV kernel


def test_gemv_q8g_matches_float64_and_checks_its_inputs():
    """Group-wise int8 GEMV: float32 sums of exact products, one scale per group, any row count."""
    ops = load_kernel()
    g = torch.Generator().manual_seed(12)
    q = torch.randint(-127, 128, (77, 96), generator=g, dtype=torch.int8)
    s = torch.rand(77, 3, generator=g) * 0.01
    x = torch.randn(5, 96, generator=g)
    ref = x.double() @ (q.double().view(77, 3, 32) * s.double()[..., None]).view(77, 96).t()
    torch.testing.assert_close(ops.gemv_q8g(x, q, s, 32).double(), ref, rtol=1e-5, atol=1e-6)
    out = ops.gemv_q8g(x.bfloat16(), q, s, 32)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out[2:3], ops.gemv_q8g(x.bfloat16()[2:3], q, s, 32))   # rows do not interact
    with pytest.raises(RuntimeError, match="shapes do not match the group size"):
        ops.gemv_q8g(x, q, s, 48)
    with pytest.raises(RuntimeError, match="int8 q, float32 scales"):
        ops.gemv_q8g(x, q.float(), s, 32)


@pytest.mark.parametrize("rows", [8, 9, 16, 23, 64])
def test_gemv_q8g_many_rows(rows):
    """From 8 rows on, gemv_q8g runs GEMM-style on AVX2 CPUs (dequantized tiles of 48 weight rows,
    blocks of 6 weight rows by 16 x rows): every weight row and x row lands where it belongs,
    across tile and block edges and the zero-padded x rows, and a row's result is the same in
    any call of 8 or more rows."""
    ops = load_kernel()
    g = torch.Generator().manual_seed(rows)
    n, k = 203, 192                      # 4 tiles of 48 and one of 11 (blocks of 6 and one of 5)
    q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    s = torch.rand(n, 3, generator=g) * 0.01
    x = torch.randn(rows, k, generator=g)
    ref = x.double() @ (q.double().view(n, 3, 64) * s.double()[..., None]).view(n, k).t()
    out = ops.gemv_q8g(x, q, s, 64)
    assert out.shape == (rows, n)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for r in (0, rows - 1):   # a one-hot x row reads back one weight column, exactly
        xo = torch.zeros(rows, k)
        xo[r, 70] = 1.0
        col = ops.gemv_q8g(xo, q, s, 64)
        assert torch.equal(col[r], q[:, 70].float() * s[:, 1]) and not col[torch.arange(rows) != r].any()
    other = torch.cat([x[:8], torch.randn(5, k, generator=g)])
    assert torch.equal(ops.gemv_q8g(other, q, s, 64)[:8], out[:8])   # the other rows of the call do not matter


@pytest.mark.parametrize("rows,gs", [(16, 32), (17, 64), (23, 128), (40, 64), (64, 32)])
def test_gemv_q4_many_rows(rows, gs):
    """From 16 rows on, gemv_q4 runs GEMM-style on AVX2 CPUs (each block of 32 weight rows
    dequantized to float32, then 16 weight rows by up to 6 x rows at a time): every weight row and
    x row lands where it belongs, the result is the dequantized weight's product rounded once to
    bf16, and a row's result is the same in any call of 16 or more rows."""
    from heron.quant.weight_only import quantize
    ops = load_kernel()
    if ops.gemv_q4_block() != 32:
        pytest.skip("the GEMM-style int4 path is the AVX2 build's (the AVX-512 GEMV takes up to 8 rows a call)")
    g = torch.Generator().manual_seed(rows)
    n, k = 160, 256                      # 5 blocks of 32 weight rows, 2-8 groups
    qw = quantize(torch.randn(n, k, generator=g) * 0.05, "int4", gs)
    assert qw.blocked
    w = qw.dequantize(torch.float32).double()
    x = torch.randn(rows, k, generator=g).bfloat16()
    out = ops.gemv_q4(x, qw.qweight, qw.scales, gs)
    assert out.shape == (rows, n) and out.dtype == torch.bfloat16
    ref = x.double() @ w.t()
    tol = 2.0 ** -8 * ref.abs() + 1e-5 * (x.double().abs() @ w.abs().t())   # one bf16 rounding
    assert ((out.double() - ref).abs() <= tol).all()
    assert torch.equal(ops.gemv_q4(x.float(), qw.qweight, qw.scales, gs), out.float())   # float32 x alike
    for r, col in ((0, 0), (rows - 1, 70), (rows // 2, k - 1)):   # a one-hot x row reads back a weight column
        xo = torch.zeros(rows, k, dtype=torch.bfloat16)
        xo[r, col] = 1.0
        y = ops.gemv_q4(xo, qw.qweight, qw.scales, gs)
        want = w[:, col].float().bfloat16().double()
        step = 2.0 ** (torch.frexp(want)[1].double() - 8)                    # a bf16 ulp at |want|
        assert ((y[r].double() - want).abs() <= step).all(), (r, col)
        assert not y[torch.arange(rows) != r].any()
    other = torch.cat([x[:16], torch.randn(5, k, generator=g).bfloat16()])
    assert torch.equal(ops.gemv_q4(other, qw.qweight, qw.scales, gs)[:16], out[:16])   # the other rows do not matter
