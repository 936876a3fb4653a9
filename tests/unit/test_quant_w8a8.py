"""W8A8 (int8 weights per channel, 8-bit activations per token with a zero point each): the
integer matmul against an exact reference built from the same codes, on both kernels, the
small-batch rule, and SmoothQuant's per-layer alpha search."""
from __future__ import annotations

import pytest
import torch

from heron.quant.w8a8 import W8A8Weight, _onednn_available, quantize_activations


def _reference(q: W8A8Weight, x: torch.Tensor, smooth: torch.Tensor | None = None) -> torch.Tensor:
    ux, sx, zx = quantize_activations(x, smooth)
    qw, sw = q.int8.codes()
    return ((ux.double() - zx.double()) @ qw.double().T) * sx.double() * sw.double()[None]


def test_activation_codes_are_per_token_with_a_zero_point():
    x = torch.tensor([[0.5, -1.0, 0.3], [0.0, 0.0, 0.0], [255.0, 0.0, 51.0], [-2.0, -0.4, 0.0]])
    u, s, z = quantize_activations(x)
    assert u.dtype == torch.uint8 and s.shape == z.shape == (4, 1)
    # each token's range [min(x, 0), max(x, 0)] over all 256 codes, 0 on the grid
    assert s.flatten().tolist() == pytest.approx([1.5 / 255, 1.0, 1.0, 2 / 255])
    assert z.flatten().tolist() == [170, 0, 0, 255]
    assert u.tolist() == [[255, 0, 221], [0, 0, 0], [255, 0, 51], [0, 204, 255]]
    # every element within half a step of its code's value (a symmetric code would be off by up
    # to a whole step of the same token's range over 255 where the token is one-sided)
    torch.manual_seed(0)
    x = torch.cat([torch.randn(8, 300), torch.rand(8, 300) * 5, -torch.rand(8, 300)])
    u, s, z = quantize_activations(x)
    err = ((u.float() - z) * s - x).abs()
    assert (err <= s * 0.5 + 1e-6).all()
    assert int(u.min()) == 0 and int(u.max()) == 255


def test_weight_bits_follow_the_cpu():
    """8-bit weights only where u8 x s8 products accumulate in int32 (VNNI / AMX-INT8); 7 bits
    elsewhere. Activations always take 8."""
    from heron.config import EngineConfig
    from heron.quant.w8a8 import ACT_LEVELS, WEIGHT_QMAX, cpu_has_vnni
    assert ACT_LEVELS == 255
    assert WEIGHT_QMAX == (127 if cpu_has_vnni() else 63)
    assert EngineConfig(quantization="w8a8").smoothquant_alpha == "auto"
    assert EngineConfig(quantization="w8a8", smoothquant_alpha=0.3).smoothquant_alpha == 0.3
    assert EngineConfig(quantization="w8a8", smoothquant_alpha="0.3").smoothquant_alpha == 0.3   # the CLI's string
    for bad in (1.0, -0.1, "high", True):
        with pytest.raises(ValueError, match=r"smoothquant_alpha must be 'auto' or a number in \[0, 1\)"):
            EngineConfig(quantization="w8a8", smoothquant_alpha=bad)
    q = W8A8Weight.quantize(torch.randn(32, 64))
    assert int(q.int8.qweight.abs().max()) == WEIGHT_QMAX


def test_integer_matmul_is_exact_at_the_largest_codes():
    """Every product at its largest magnitude (u8 255 or 0 against +-WEIGHT_QMAX, the same sign
    along each pair of columns): the case where VPMADDUBSW's int16 pair sums saturate when the
    code ranges are too wide for the CPU. The result must be the exact integer product."""
    if not _onednn_available():
        pytest.skip("this torch build has no oneDNN quantized linear")
    from heron.quant.w8a8 import WEIGHT_QMAX
    k = 640
    signs = torch.tensor([1.0, 1.0, -1.0, -1.0]).repeat(k // 4)
    w = torch.stack([signs, -signs, torch.ones(k), -torch.ones(k)]) * 0.01       # every code +-WEIGHT_QMAX
    q = W8A8Weight.quantize(w)
    assert int(q.int8.qweight[:, :k].abs().min()) == WEIGHT_QMAX
    top = lambda v: torch.where(v > 0, 127.0, -128.0)         # scale 1, zero point 128: codes 255 and 0
    x = torch.stack([top(signs), top(-signs), torch.ones(k), -torch.ones(k), torch.ones(k) * 3]).float()
    u = quantize_activations(x)[0]
    assert ((u == 0) | (u == 255)).all()                      # every code 0 or 255
    out = q.matmul_large(x)
    # float32 rounding only: the zero points' term cancels most of the kernel's sum here (every
    # weight of a row one sign), so the bound is relative to the sum of |products|; one saturated
    # pair would be off by ~32,000 of the 255 x 63 x 640 units that sum is made of
    wd = q.dequantize(torch.float32)
    bound = 1e-5 * (x.abs() @ wd.abs().T).double()
    assert ((out.double() - _reference(q, x)).abs() <= bound).all()
    assert ((out - x @ wd.T).abs() <= bound).all()


def test_activation_quantization_leaves_its_input_alone():
    x = torch.randn(6, 64)
    x0 = x.clone()
    quantize_activations(x, torch.rand(64) + 0.5)
    quantize_activations(x)
    assert torch.equal(x, x0)


@pytest.mark.parametrize("kernel", ["onednn", "int_mm"])
def test_integer_matmul_equals_the_exact_reference(kernel):
    if kernel == "onednn" and not _onednn_available():
        pytest.skip("this torch build has no oneDNN quantized linear")
    torch.manual_seed(0)
    w = torch.randn(300, 640) * 0.05
    q = W8A8Weight.quantize(w)
    if kernel == "int_mm":
        q._onednn = False
        q.packed = q.int8.codes()[0].t().contiguous()
    for rows in (5, 64, 333):
        x = torch.randn(rows, 640).bfloat16() * 3
        out = q.matmul_large(x)
        assert out.dtype == torch.bfloat16 and out.shape == (rows, 300)
        ref = _reference(q, x)
        # the only differences: float32 scaling and the final rounding to bf16
        assert torch.allclose(out.double(), ref, rtol=2 ** -8, atol=1e-6)
    # and it approximates the float product
    x = torch.randn(64, 640).bfloat16()
    rel = (q.matmul_large(x).float() - x.float() @ w.T).norm() / (x.float() @ w.T).norm()
    assert rel < 0.02


def test_batched_input_shapes_and_the_small_batch_path():
    torch.manual_seed(1)
    w = torch.randn(64, 128) * 0.1
    q = W8A8Weight.quantize(w)
    x = torch.randn(2, 7, 128).bfloat16()
    assert torch.equal(q.matmul_large(x), q.matmul_large(x.reshape(14, 128)).reshape(2, 7, 64))
    small = torch.randn(2, 128).bfloat16()
    assert torch.equal(q.matmul(small), q.int8.matmul(small))       # few rows: weight-only int8
    assert torch.equal(q.dequantize(), q.int8.dequantize())
    assert q.nbytes() > q.int8.nbytes()
    with pytest.raises(ValueError, match="wraps an int8"):
        from heron.quant.weight_only import quantize_int4
        W8A8Weight(quantize_int4(w, 64))


def test_smooth_scales_move_activation_range_into_the_weight():
    from heron.quant.w8a8 import smooth_scales
    torch.manual_seed(2)
    w = torch.randn(96, 128) * 0.05
    x = torch.randn(40, 128).bfloat16()
    x[:, 7] *= 60                                   # an outlier channel
    s = smooth_scales(x.float().abs().amax(0), w, 0.65)
    assert s.shape == (128,) and s[7] == s.max()
    q = W8A8Weight.quantize(w, s)
    out = q.matmul_large(x)
    # exact reference: codes of W diag(s), activations x / s quantized per token
    assert torch.allclose(out.double(), _reference(q, x, s), rtol=2 ** -8, atol=1e-6)
    # smoothing helps with the outlier channel
    exact = x.float() @ w.T
    err_s = (out.float() - exact).norm()
    err_0 = (W8A8Weight.quantize(w).matmul_large(x).float() - exact).norm()
    assert err_s < err_0
    # the weight still reads back as W; few rows divide x by s before the weight-only kernel
    sw = q.int8.codes()[1]
    assert ((q.dequantize(torch.float32) - w).abs() <= 0.51 * sw[:, None] / s[None, :] + 1e-6).all()
    small = x[:2]
    assert torch.equal(q.matmul(small), q.int8.matmul((small.float() / s).to(torch.bfloat16)))
    with pytest.raises(ValueError, match="positive per-input-channel"):
        W8A8Weight.quantize(w, torch.zeros(128))


def test_alpha_search_keeps_the_grid_value_with_the_smallest_output_error(monkeypatch):
    import heron.quant.w8a8 as w8a8
    torch.manual_seed(3)
    w = torch.randn(96, 128) * 0.05
    x = torch.randn(200, 128)
    x[:, 7] *= 60                                   # an outlier channel: smoothing pays
    act_max = x.abs().amax(0)
    exact = x @ w.T
    errs = {}
    for a in w8a8.ALPHA_GRID:
        s = w8a8.smooth_scales(act_max, w, a) if a > 0 else None
        errs[a] = float((W8A8Weight.quantize(w, s).matmul_large(x) - exact).square().sum())
    alpha, smooth = w8a8.search_alpha(act_max, w, x)
    assert alpha == min(errs, key=errs.get) and alpha > 0
    assert torch.equal(smooth, w8a8.smooth_scales(act_max, w, alpha))
    # no outliers and a grid of 0 only: no smoothing
    assert w8a8.search_alpha(x.abs().amax(0), w, torch.randn(50, 128), grid=(0.0,)) == (0.0, None)
    # a weight with more rows than SEARCH_HEAD_ROWS is compared on evenly spaced rows; its
    # scales still come from every row's column maxima
    monkeypatch.setattr(w8a8, "SEARCH_HEAD_ROWS", 32)
    w[50, 3] = 10.0                                 # a column maximum on a row the search skips
    alpha_h, smooth_h = w8a8.search_alpha(act_max, w, x)
    assert alpha_h > 0 and torch.equal(smooth_h, w8a8.smooth_scales(act_max, w, alpha_h))


def test_alpha_values():
    from heron.quant.w8a8 import check_alpha
    assert check_alpha(None) == check_alpha("auto") == "auto"
    assert check_alpha(0) == 0.0 and check_alpha("0.65") == 0.65
    for bad in (1, 1.5, -0.2, "x", True, [0.5]):
        with pytest.raises(ValueError, match="'auto' or a number in"):
            check_alpha(bad)
