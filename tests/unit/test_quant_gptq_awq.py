"""GPTQ and AWQ (heron.quant.gptq / awq), their shared grid (heron.quant.grid) and the GPTQ / AWQ
checkpoint tensor layouts (heron.quant.checkpoint)."""
from __future__ import annotations

import pytest
import torch

from heron.quant.awq import awq_scales, search_scale
from heron.quant.checkpoint import (
    AWQ_ORDER,
    pack_awq,
    pack_gptq,
    parse_quantization_config,
    unpack_awq,
    unpack_gptq,
)
from heron.quant.export import check_quantize_args
from heron.quant.gptq import gptq_quantize, output_error
from heron.quant.grid import MIN_SCALE, int4_params, rtn


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _layer(n=64, k=256, t=1024, seed=0):
    """A weight and correlated calibration inputs (a few shared factors plus noise, some loud channels)."""
    g = _gen(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(t, 24, generator=g) @ torch.randn(24, k, generator=g) + 0.2 * torch.randn(t, k, generator=g)
    x[:, :: k // 8] *= 8
    return w, x


# ---- the grid ---------------------------------------------------------------------------------
def test_int4_grid_keeps_zero_on_the_grid_and_zero_points_ge_1():
    w = torch.tensor([[0.0, 0.1, 0.2, 0.3] * 8, [-0.3, -0.1, 0.0, 0.05] * 8, [0.0] * 32, [1e-7, 0, 0, 0] * 8])
    iw = rtn(w, 4, 32)
    assert iw.zeros.min() >= 1 and iw.zeros.max() <= 15          # GPTQ v1 stores zero - 1
    assert iw.codes.max() <= 15
    assert iw.scales[2] == 0                                     # all-zero group
    assert iw.scales[3] >= MIN_SCALE                             # fp16-exact scale floor
    deq = iw.dequantize()
    assert (deq[w == 0] == 0).all()                              # 0 is exactly representable
    s = iw.scales[:, :1]
    assert ((deq - w).abs() <= s / 2 + s / 32 + 1e-12).all()
    # scales are bf16 values and fp16 values both
    assert torch.equal(iw.scales.to(torch.bfloat16).float(), iw.scales)
    assert torch.equal(iw.scales.to(torch.float16).float(), iw.scales)


def test_int4_params_matches_the_rtn_range():
    s, z = int4_params(torch.tensor([-1.5]), torch.tensor([1.5]))
    assert s.item() >= 3.0 / 15 and z.item() == round(1.5 / s.item())


# ---- GPTQ -------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 64), (4, 128), (8, None)])
def test_gptq_beats_rtn_on_the_calibration_output_error(bits, group_size):
    """Error feedback must cut the output error on correlated inputs well below RTN's (a broken
    feedback -- wrong sign, wrong Hessian row, no lazy block update -- does not)."""
    w, x = _layer()
    h = x.t() @ x
    e_rtn = output_error(w, rtn(w, bits, group_size).dequantize(), h)
    e_gptq = output_error(w, gptq_quantize(w, h, bits, group_size).dequantize(), h)
    assert e_gptq < 0.5 * e_rtn


def test_gptq_block_update_matters():
    """Blocks of 32 and 128 columns give the same answer up to float rounding: the lazy batch
    update between blocks is equivalent to updating every column at once."""
    w, x = _layer(k=128)
    h = x.t() @ x
    a = gptq_quantize(w, h, 4, 32, block=32).dequantize()
    b = gptq_quantize(w, h, 4, 32, block=128).dequantize()
    ea, eb = output_error(w, a, h), output_error(w, b, h)
    assert abs(ea - eb) <= 0.05 * eb


def test_gptq_is_deterministic_and_builds_heron_weights():
    w, x = _layer(n=48, k=128)
    h = x.t() @ x
    a, b = gptq_quantize(w, h, 4, 64), gptq_quantize(w, h, 4, 64)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)
    qw = a.build()
    assert (qw.method, qw.group_size) == ("int4", 64)
    assert torch.equal(qw.dequantize(torch.float32), a.dequantize())   # the grid is the kernel's values
    q8 = gptq_quantize(w, h, 8, None)
    assert torch.equal(q8.build().dequantize(torch.float32), q8.dequantize())


def test_gptq_dead_inputs_and_errors():
    w, x = _layer(n=16, k=64)
    x[:, 5] = 0   # a channel that is always 0 -> zero Hessian diagonal
    h = x.t() @ x
    assert torch.isfinite(gptq_quantize(w, h, 4, 32).dequantize()).all()
    with pytest.raises(ValueError, match="hessian must be"):
        gptq_quantize(w, h[:32, :32], 4, 32)
    with pytest.raises(ValueError, match="group size"):
        gptq_quantize(w, h, 4, 48)
    with pytest.raises(ValueError, match="per output channel"):
        gptq_quantize(w, h, 8, 64)
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        gptq_quantize(w, h, 3, 32)


# ---- AWQ --------------------------------------------------------------------------------------
def test_awq_search_never_worse_than_rtn():
    w, x = _layer()
    h = x.t() @ x
    a = x.abs().mean(dim=0)
    s, factor, alpha, losses = search_scale(w, h, a, 64)
    assert len(losses) == 20
    assert losses[0] == output_error(w, rtn(w, 4, 64).dequantize(), h)    # alpha = 0 is plain RTN
    assert min(losses) <= losses[0]
    best = losses[round(alpha * 20)]
    assert best == min(losses) and best < losses[0]     # loud channels: some scaling helps
    assert torch.equal(factor, 1.0 / s)
    assert torch.equal(awq_scales(a, 0.0), torch.ones_like(a))


def test_awq_clip_search_never_worse_than_rtn_per_group():
    """rtn_clipped: rtn's integer grid on a clipped range, per group the one with the smallest
    output error d H_gg d^T; never above rtn's (shrink 1.0 is its grid), lower in total on a
    layer with outliers, and the codes' output error over all columns is lower too."""
    from heron.quant.grid import rtn_clipped
    w, x = _layer()
    h = x.t() @ x
    n, k, gs = w.shape[0], w.shape[1], 64
    base, clip = rtn(w, 4, gs), rtn_clipped(w, gs, h)
    assert clip.codes.dtype == torch.uint8 and clip.scales.shape == base.scales.shape
    assert torch.equal(clip.zeros, clip.zeros.round()) and bool((clip.zeros >= 1).all())
    g = k // gs
    hb = h.view(g, gs, g, gs)[torch.arange(g), :, torch.arange(g), :]

    def per_group(q):
        d = (q.dequantize() - w).view(n, g, gs)
        return torch.einsum("ngi,gij,ngj->ng", d, hb, d)
    eb, ec = per_group(base), per_group(clip)
    assert bool((ec <= eb * (1 + 1e-5) + 1e-6).all()) and ec.sum() < 0.95 * eb.sum()
    assert output_error(w, clip.dequantize(), h) < output_error(w, base.dequantize(), h)
    assert torch.equal(rtn_clipped(w, gs, h, shrinks=(1.0,)).codes, base.codes)
    with pytest.raises(ValueError, match="hessian must be"):
        rtn_clipped(w, gs, h[:-1, :-1])


def test_awq_scales_are_normalised():
    a = torch.tensor([0.01, 0.1, 1.0, 10.0])
    s = awq_scales(a, 0.5)
    assert torch.allclose(s.max() * s.min(), torch.tensor(1.0))
    assert torch.all(s[1:] > s[:-1])


# ---- checkpoint layouts -----------------------------------------------------------------------
def _codes(n, k, bits, seed):
    return torch.randint(0, 1 << bits, (n, k), generator=_gen(seed), dtype=torch.int32)


def _words(value_bits: list[int]) -> int:
    """An int32 from unsigned 32-bit bits."""
    v = sum(value_bits)
    return v - (1 << 32) if v >= 1 << 31 else v


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_gptq_pack_layout_and_round_trip(bits, fmt):
    n, k, g = 16, 64, 32
    codes = _codes(n, k, bits, 1)
    zeros = torch.randint(1, 1 << bits, (n, k // g), generator=_gen(2)).float()
    scales = torch.rand(n, k // g, generator=_gen(3)) + 0.5
    t = pack_gptq(codes, scales, zeros, bits, g, fmt)
    per = 32 // bits
    assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (k // per, n)
    assert t["qzeros"].dtype == torch.int32 and t["qzeros"].shape == (k // g, n // per)
    assert t["scales"].dtype == torch.float16 and t["scales"].shape == (k // g, n)
    assert torch.equal(t["g_idx"], torch.arange(k, dtype=torch.int32) // g)
    # the layout, spelled out: word [r, c] holds codes[c, r*per + j] at bit bits*j (lowest first)
    for r, c in ((0, 0), (1, 5), (k // per - 1, n - 1)):
        assert int(t["qweight"][r, c]) == _words([int(codes[c, r * per + j]) << (bits * j) for j in range(per)])
    off = 1 if fmt == "gptq" else 0   # v1 stores zero - 1
    for r, c in ((0, 0), (1, 1)):
        assert int(t["qzeros"][r, c]) == _words([(int(zeros[c * per + j, r]) - off) << (bits * j)
                                                 for j in range(per)])
    c2, s2, z2, g_idx = unpack_gptq(t, bits, fmt)
    assert torch.equal(c2, codes) and torch.equal(z2, zeros)
    assert torch.equal(s2, scales.to(torch.float16).float())


def test_gptq_v1_cannot_store_zero_0():
    codes = _codes(8, 32, 4, 1)
    with pytest.raises(ValueError, match="zero >= 1"):
        pack_gptq(codes, torch.ones(8, 1), torch.zeros(8, 1), 4, 32, "gptq")


def test_awq_pack_layout_and_round_trip():
    n, k, g = 24, 64, 32
    codes = _codes(n, k, 4, 4)
    zeros = torch.randint(0, 16, (n, k // g), generator=_gen(5)).float()
    scales = torch.rand(n, k // g, generator=_gen(6)) + 0.5
    t = pack_awq(codes, scales, zeros)
    assert t["qweight"].shape == (k, n // 8) and t["qzeros"].shape == (k // g, n // 8)
    assert t["scales"].shape == (k // g, n) and t["scales"].dtype == torch.float16
    # nibble i of word [r, j] holds column 8j + AWQ_ORDER[i]
    assert AWQ_ORDER == (0, 2, 4, 6, 1, 3, 5, 7)
    for r, j in ((0, 0), (7, 2), (k - 1, n // 8 - 1)):
        assert int(t["qweight"][r, j]) == _words([int(codes[8 * j + AWQ_ORDER[i], r]) << (4 * i) for i in range(8)])
    assert int(t["qzeros"][1, 1]) == _words([int(zeros[8 + AWQ_ORDER[i], 1]) << (4 * i) for i in range(8)])
    c2, s2, z2 = unpack_awq(t)
    assert torch.equal(c2, codes) and torch.equal(z2, zeros) and torch.equal(s2, scales.half().float())


# ---- options and configs ----------------------------------------------------------------------
def test_quantize_argument_errors():
    assert check_quantize_args("gptq", 4, None) == 128
    assert check_quantize_args("rtn", 8, None) == -1
    assert check_quantize_args("awq", 4, 64) == 64
    with pytest.raises(ValueError, match="AWQ is 4-bit only"):
        check_quantize_args("awq", 8, None)
    with pytest.raises(ValueError, match="must be one of 32, 64, 128, 256"):
        check_quantize_args("gptq", 4, 48)
    with pytest.raises(ValueError, match="8-bit is per output channel"):
        check_quantize_args("gptq", 8, 128)
    with pytest.raises(ValueError, match="--bits must be 4 or 8"):
        check_quantize_args("rtn", 3, None)
    with pytest.raises(ValueError, match="--method must be one of rtn, gptq, awq"):
        check_quantize_args("smoothquant", 4, None)


@pytest.mark.parametrize("qc,match", [
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "GPTQ with bits=3"),
    ({"quant_method": "gptq", "bits": 2, "group_size": 128}, "GPTQ with bits=2"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"}, "checkpoint_format 'marlin'"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "AWQ version 'gemv'"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "exllama"}, "AWQ version 'exllama'"),
    ({"quant_method": "awq", "bits": 8, "group_size": 128}, "AWQ with bits=8"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": False}, "zero_point false"),
    ({"quant_method": "bitsandbytes"}, "quant_method 'bitsandbytes'"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 0}, "group_size 0"),
])
def test_unsupported_quantization_configs(qc, match):
    with pytest.raises(ValueError, match=match) as e:
        parse_quantization_config(qc)
    assert "heron loads GPTQ with bits 4 or 8" in str(e.value)


def test_supported_quantization_configs():
    s = parse_quantization_config({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False,
                                   "sym": True, "damp_percent": 0.01})
    assert (s.method, s.bits, s.group_size, s.checkpoint_format, s.zero_offset) == ("gptq", 4, 128, "gptq", 1)
    s = parse_quantization_config({"quant_method": "gptq", "bits": 8, "group_size": -1,
                                   "checkpoint_format": "gptq_v2"})
    assert (s.bits, s.group_size, s.zero_offset) == (8, -1, 0)
    s = parse_quantization_config({"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True,
                                   "version": "GEMM"})
    assert (s.method, s.group_size, s.checkpoint_format) == ("awq", 64, "awq_gemm")
    assert parse_quantization_config(None) is None
