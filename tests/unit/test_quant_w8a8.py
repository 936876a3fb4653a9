"""W8A8 (int8 weights per channel, int8 activations per token): the integer matmul against an
exact reference built from the same codes, on both kernels, and the small-batch rule."""
from __future__ import annotations

import pytest
import torch

from heron.quant.w8a8 import W8A8Weight, _onednn_available, quantize_activations


def _reference(q: W8A8Weight, x: torch.Tensor) -> torch.Tensor:
    qx, sx = quantize_activations(x)
    qw, sw = q.int8.codes()
    return (qx.double() @ qw.double().T) * sx.double() * sw.double()[None]


def test_activation_codes_are_per_token_and_symmetric():
    x = torch.tensor([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0], [254.0, 1.0, -127.0]])
    q, s = quantize_activations(x, qmax=127)
    assert s.flatten().tolist() == pytest.approx([1 / 127, 1.0, 2.0])
    assert q.tolist() == [[64, -127, 32], [0, 0, 0], [127, 0, -64]]     # round half to even: 0.5 -> 0, -63.5 -> -64
    x = torch.tensor([[0.4, -1.0, 0.2], [0.0, 0.0, 0.0], [252.0, 2.0, -126.0]])
    q, s = quantize_activations(x, qmax=63)                             # 7-bit codes (qmax=63)
    assert s.flatten().tolist() == pytest.approx([1 / 63, 1.0, 4.0])
    assert q.tolist() == [[25, -63, 13], [0, 0, 0], [63, 0, -32]]       # 0.5 -> 0, -31.5 -> -32
    u, _ = quantize_activations(x, offset=64, qmax=63)
    assert u.dtype == torch.uint8 and u.tolist() == [[89, 1, 77], [64, 64, 64], [127, 64, 32]]


def test_weight_bits_follow_the_cpu():
    """8-bit weights only where u8 x s8 products accumulate in int32 (VNNI / AMX-INT8); 7 bits
    elsewhere, and a smaller default SmoothQuant alpha there. Activations always take 8."""
    from heron.config import EngineConfig
    from heron.quant.w8a8 import ACT_QMAX, WEIGHT_QMAX, _ZERO_POINT, cpu_has_vnni
    assert (ACT_QMAX, _ZERO_POINT) == (127, 128)
    assert WEIGHT_QMAX == (127 if cpu_has_vnni() else 63)
    assert EngineConfig(quantization="w8a8").smoothquant_alpha == (0.65 if cpu_has_vnni() else 0.5)
    assert EngineConfig(quantization="w8a8", smoothquant_alpha=0.3).smoothquant_alpha == 0.3
    q = W8A8Weight.quantize(torch.randn(32, 64))
    assert int(q.int8.qweight.abs().max()) == WEIGHT_QMAX


def test_integer_matmul_is_exact_at_the_largest_codes():
    """Every product at its largest magnitude (u8 255 or 1 against +-WEIGHT_QMAX, the same sign
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
    x = torch.stack([signs, -signs, torch.ones(k), -torch.ones(k), torch.ones(k) * 3]).float()   # every code +-127
    out = q.matmul_large(x)
    assert torch.allclose(out.double(), _reference(q, x), rtol=1e-6, atol=1e-6)
    assert torch.allclose(out, x @ q.dequantize(torch.float32).T, rtol=1e-5, atol=1e-5)


def test_activation_quantization_leaves_its_input_alone():
    x = torch.randn(6, 64)
    x0 = x.clone()
    quantize_activations(x, 128, torch.rand(64) + 0.5)
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
    qx, sx = quantize_activations(x, smooth=s)
    qw, sw = q.int8.codes()
    ref = (qx.double() @ qw.double().T) * sx.double() * sw.double()[None]
    assert torch.allclose(out.double(), ref, rtol=2 ** -8, atol=1e-6)
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
