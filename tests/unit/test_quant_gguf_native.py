"""--quantization gguf (heron.quant.gguf_native): GGML blocks decoded into heron's int4/int8 formats.

The 4-bit types with one affine map per 32 values (Q4_0, Q4_1, Q4_K) must land in int4 group 32
exactly up to the bf16 rounding of the kernel's scale and zero; the >= 5-bit types are
re-quantized to int8 per channel within half a step; llama's rotary row order is undone on the
codes and scales alike. References: gguf-py's own dequantization (`gguf.quants.dequantize`) and
heron's GGUF loader (values equal transformers', see test_loader.py).
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from heron.models.loader.gguf import gguf_raw_tensors, iter_gguf_tensors, unpermute_rotary_rows
from heron.quant import gguf_native as gn
from heron.quant.weight_only import QuantizedWeight, quantize_int4

BF16_U = 2.0 ** -8   # bf16 keeps 8 significant bits: |bf16(x) - x| <= 2^-8 |x|


def random_blocks(qtype: Q, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random valid blocks [rows, bytes per row]: random bytes with finite fp16 scales (any bit
    pattern of the codes and 6-bit sub-block scales is a valid block)."""
    rng = np.random.default_rng(seed)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)

    def f16(shape, lo=1e-3, hi=0.05):
        v = rng.uniform(lo, hi, size=shape) * rng.choice([-1.0, 1.0], size=shape)
        return v.astype(np.float16)[..., None].view(np.uint8)

    if qtype in (Q.Q4_0, Q.Q8_0, Q.Q5_0):
        raw[..., 0:2] = f16(raw.shape[:2])
    elif qtype in (Q.Q4_1, Q.Q5_1):
        raw[..., 0:2], raw[..., 2:4] = f16(raw.shape[:2]), f16(raw.shape[:2])
    elif qtype == Q.Q4_K:   # d and dmin are positive in real files; the decoding must not care
        raw[..., 0:2], raw[..., 2:4] = f16(raw.shape[:2]), f16(raw.shape[:2])
    elif qtype == Q.Q6_K:
        raw[..., 208:210] = f16(raw.shape[:2])
    return raw.reshape(rows, -1)


class _Raw:
    """A stand-in for GGUFRawTensor over in-memory blocks."""

    def __init__(self, blocks, qtype, shape, rotary_heads=None, hf_name="w"):
        self.blocks, self.qtype, self.shape = blocks, qtype, shape
        self.rotary_heads, self.norm_offset, self.hf_name = rotary_heads, 0.0, hf_name


def _gguf_values(blocks: np.ndarray, qtype: Q, shape) -> torch.Tensor:
    return torch.from_numpy(np.asarray(dequantize(blocks, qtype), dtype=np.float32).reshape(shape).copy())


# ---- exact int4 -------------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q4_0, Q.Q4_1])
def test_exact_int4_decoding_equals_gguf(qtype):
    rows, cols = 48, 512
    blocks = random_blocks(qtype, rows, cols, seed=int(qtype))
    ref = _gguf_values(blocks, qtype, (rows, cols))
    codes, scales, offsets = gn.decode_exact_int4(blocks, qtype, cols)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15 and codes.shape == (rows, cols)
    assert scales.shape == offsets.shape == (rows, cols // 32)
    mine = (codes.float().view(rows, -1, 32) * scales[..., None] + offsets[..., None]).view(rows, cols)
    assert torch.equal(mine, ref)   # same products and sums in float32: bit-identical
    # every code value and sub-block scale is exercised (random bytes)
    assert len(torch.unique(codes)) == 16 and len(torch.unique(scales)) > rows


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q4_0, Q.Q4_1])
def test_exact_int4_into_heron_int4_within_bf16_rounding(qtype):
    rows, cols = 40, 256   # 40 rows: the int4 kernel pads N to 48
    blocks = random_blocks(qtype, rows, cols, seed=7 + int(qtype))
    ref = _gguf_values(blocks, qtype, (rows, cols))
    form = gn.int_form(_Raw(blocks, qtype, (rows, cols)), "int4")
    qw = form.build()
    assert (qw.method, qw.group_size, qw.out_features, qw.in_features) == ("int4", 32, rows, cols)
    got = qw.dequantize(torch.float32)
    s = form.scales.repeat_interleave(32, dim=1)
    o = form.offsets.repeat_interleave(32, dim=1)
    bound = BF16_U * (8 * s.abs() + (8 * s + o).abs()) * (1 + 2 ** -10) + 1e-12
    err = (got - ref).abs()
    assert bool((err <= bound).all()), f"max err {err.max().item()}"
    # the codes are the file's own: the packed weight gives them back unchanged
    q, _, _ = qw.codes()
    assert torch.equal(q, form.codes)
    # the kernel computes with exactly these weights
    x = torch.randn(3, cols).bfloat16()
    y = qw.matmul(x).float()
    want = x.float() @ got.t()
    assert bool(((y - want).abs() <= 2 ** -7 * want.abs() + 2 ** -12 * (x.float().abs() @ got.abs().t())).all())


def test_from_int4_affine_checks_inputs():
    q = torch.zeros(16, 64, dtype=torch.uint8)
    s = torch.ones(16, 2)
    with pytest.raises(ValueError, match="codes must be in 0..15"):
        QuantizedWeight.from_int4_affine(q + 16, s, s, 32)
    with pytest.raises(ValueError, match=r"offsets must have shape \[N, K/group_size\] = \[16, 2\]"):
        QuantizedWeight.from_int4_affine(q, s, torch.ones(16, 3), 32)
    with pytest.raises(ValueError, match="group size must be one of"):
        QuantizedWeight.from_int4_affine(q, s, s, 48)
    with pytest.raises(TypeError, match="integer tensor of codes"):
        QuantizedWeight.from_int4_affine(q.float(), s, s, 32)


def test_decode_exact_int4_rejects_other_types():
    with pytest.raises(ValueError, match="Q5_0 is not a 4-bit type.*allowed: Q4_0, Q4_1, Q4_K"):
        gn.decode_exact_int4(random_blocks(Q.Q5_0, 2, 32), Q.Q5_0, 32)


# ---- re-quantized types -------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q5_0, Q.Q6_K, Q.Q4_K, Q.Q5_1])
def test_requantized_int8_within_half_a_step(qtype):
    rows, cols = 24, 256
    blocks = random_blocks(qtype, rows, cols, seed=3)
    ref = _gguf_values(blocks, qtype, (rows, cols))
    raw = _Raw(blocks, qtype, (rows, cols))
    assert torch.equal(gn.dequantize_raw_rows(raw, 0, rows), ref)       # exact values first
    form = gn.int_form(raw, "int8")
    qw = form.build()
    assert qw.method == "int8" and form.codes.dtype == torch.int8
    absmax = ref.abs().amax(dim=1)
    # quantize_int8's rule on the exact values: scale = absmax/127 rounded up to bf16
    assert bool((form.scales >= absmax / 127 * (1 - 1e-6)).all())
    assert bool((form.scales <= absmax / 127 * (1 + 2 ** -7)).all())
    err = (qw.dequantize(torch.float32) - ref).abs()
    # (Q8_0 / Q5_0 / Q6_K are rounded as code * (block scale / scale): a few float32 ulps of w/scale)
    assert bool((err <= form.scales[:, None] / 2 * (1 + 1e-4)).all())
    assert float(err.max()) > float(form.scales.min()) / 8     # a real re-quantization happened


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q5_0, Q.Q6_K, Q.Q5_1])
def test_requantized_int4_within_bound(qtype):
    """int4 g32 from other types (an LM head forced to int4, types below 5 bits): quantize_int4's
    rounding of the exact values, |error| <= scale/2 + scale/32 (the bf16 zero)."""
    rows, cols = 16, 256
    blocks = random_blocks(qtype, rows, cols, seed=4)
    ref = _gguf_values(blocks, qtype, (rows, cols))
    form = gn.int_form(_Raw(blocks, qtype, (rows, cols)), "int4")
    assert form.codes.dtype == torch.uint8 and int(form.codes.max()) <= 15
    got = form.build().dequantize(torch.float32)
    s = form.scales.repeat_interleave(32, dim=1)
    err = (got - ref).abs()
    assert bool((err <= (s / 2 + s / 32) * (1 + 1e-4) + 1e-7).all())
    assert float(err.max()) > float(form.scales.min()) / 8
    # the same rule as quantize_int4 on the exact values: equal scales and zero points
    ref_form = quantize_int4(ref, 32).codes()
    assert torch.equal(form.scales, ref_form[1])
    assert torch.equal(-form.offsets / form.scales, ref_form[2])


def test_heron_format_mapping():
    f = gn.heron_format
    assert [f(t) for t in (Q.Q4_0, Q.Q4_1, Q.Q4_K)] == ["int4"] * 3
    assert [f(t) for t in (Q.Q5_0, Q.Q5_1, Q.Q5_K, Q.Q6_K, Q.Q8_0)] == ["int8"] * 5
    assert [f(t) for t in (Q.Q2_K, Q.Q3_K, Q.IQ4_XS, Q.IQ4_NL)] == ["int4"] * 4
    assert [f(t) for t in (Q.F32, Q.F16, Q.BF16)] == ["keep"] * 3
    assert gn.is_exact(Q.Q4_K, "int4") and not gn.is_exact(Q.Q4_K, "int8") and not gn.is_exact(Q.IQ4_NL, "int4")


# ---- a tiny GGUF with llama's rotary row order ---------------------------------------------------------
def write_gguf(path: Path, arch: str, types: dict[str, Q], *, hidden=64, inter=256, layers=2, heads=4,
               kv_heads=2, head_dim=16, vocab=48, tied=True, seed=0) -> Path:
    """A tiny random GGUF whose linear weights have the given ggml types (by llama.cpp name:
    attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down, token_embd, output)."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    else:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_sliding_window(32)
    tokens = ["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(vocab - 3)]
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 3 + [-float(i) for i in range(vocab - 3)])
    w.add_token_types([2, 3, 3] + [1] * (vocab - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def add(name: str, shape, qtype: Q) -> None:
        if qtype in (Q.Q4_K, Q.Q6_K, Q.Q4_1):
            w.add_tensor(name, random_blocks(qtype, shape[0], shape[1], seed=int(rng.integers(1 << 30))),
                         raw_dtype=qtype)
            return
        x = (rng.standard_normal(shape) * 0.5).astype(np.float32)
        if qtype == Q.F32:
            w.add_tensor(name, x)
        elif qtype == Q.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, quantize(x, qtype), raw_dtype=qtype)

    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim
    add("token_embd.weight", (vocab, hidden), types.get("token_embd", Q.Q8_0))
    add("output_norm.weight", (hidden,), Q.F32)
    if not tied:
        add("output.weight", (vocab, hidden), types.get("output", Q.Q8_0))
    for i in range(layers):
        p = f"blk.{i}."
        for n in ("attn_norm", "ffn_norm") + (("post_attention_norm", "post_ffw_norm", "attn_q_norm", "attn_k_norm")
                                               if arch == "gemma3" else ()):
            add(p + n + ".weight", (head_dim if n in ("attn_q_norm", "attn_k_norm") else hidden,), Q.F32)
        add(p + "attn_q.weight", (q_dim, hidden), types.get("attn_q", Q.Q5_0))
        add(p + "attn_k.weight", (kv_dim, hidden), types.get("attn_k", Q.Q5_0))
        add(p + "attn_v.weight", (kv_dim, hidden), types.get("attn_v", Q.Q8_0))
        add(p + "attn_output.weight", (hidden, q_dim), types.get("attn_output", Q.Q4_K if q_dim % 256 == 0 else Q.Q4_0))
        add(p + "ffn_gate.weight", (inter, hidden), types.get("ffn_gate", Q.Q5_0))
        add(p + "ffn_up.weight", (inter, hidden), types.get("ffn_up", Q.Q5_0))
        add(p + "ffn_down.weight", (hidden, inter), types.get("ffn_down", Q.Q4_K))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q4_0, Q.Q5_0])
def test_rotary_rows_are_permuted_with_their_scales(tmp_path, qtype):
    """llama q/k: decoding the blocks then un-permuting the codes/scales rows gives the loader's
    values (decode, then un-permute the values) -- exactly for int4, within half a step for int8."""
    path = write_gguf(tmp_path / "llama.gguf", "llama", {"attn_q": qtype, "attn_k": qtype}, hidden=256,
                      head_dim=32, heads=4, kv_heads=2, layers=1, inter=256, tied=False)
    raws = gguf_raw_tensors(path)
    loaded = dict(iter_gguf_tensors(path, torch.float32, progress=False))
    for name, heads in (("model.layers.0.self_attn.q_proj.weight", 4), ("model.layers.0.self_attn.k_proj.weight", 2)):
        raw = raws[name]
        assert raw.rotary_heads == heads and raw.qtype == qtype
        want = loaded[name]
        stored = gn.dequantize_raw_rows(raw, 0, raw.shape[0])
        assert not torch.equal(stored, want) and torch.equal(unpermute_rotary_rows(stored, heads), want)
        fmt = gn.heron_format(qtype)
        form = gn.int_form(raw, fmt)
        got = form.build().dequantize(torch.float32)
        if fmt == "int4":
            s = form.scales.repeat_interleave(32, dim=1)
            o = form.offsets.repeat_interleave(32, dim=1)
            bound = BF16_U * (8 * s.abs() + (8 * s + o).abs()) * (1 + 2 ** -10) + 1e-12
        else:
            bound = form.scales[:, None] / 2 * (1 + 1e-4)
        assert bool(((got - want).abs() <= bound).all()), name
    # gemma3 / qwen: no permutation
    g = gguf_raw_tensors(write_gguf(tmp_path / "g.gguf", "gemma3", {}, layers=1))
    assert g["model.layers.0.self_attn.q_proj.weight"].rotary_heads is None
    assert g["model.layers.0.input_layernorm.weight"].norm_offset == 1.0


def test_unpermute_rotary_rows_checks_rows():
    with pytest.raises(ValueError, match="cannot un-permute 12 rows for 4 rotary heads"):
        unpermute_rotary_rows(torch.zeros(12, 4), 4)


def test_plan_fused_layers_take_the_most_precise_format(tmp_path):
    from heron.models.loader import load_config, resolve_model
    from heron.models.registry import get_model_class
    path = write_gguf(tmp_path / "m.gguf", "gemma3", {"attn_q": Q.Q4_K, "attn_k": Q.Q4_K, "attn_v": Q.Q8_0,
                                                      "ffn_gate": Q.Q4_K, "ffn_up": Q.F16, "ffn_down": Q.Q4_K},
                      hidden=256, layers=1)
    cfg = load_config(resolve_model(str(path)))
    with torch.device("meta"):
        model = get_model_class(cfg)(cfg)
    plans = {lp.module: lp for lp in gn.plan(model, gguf_raw_tensors(path))}
    qkv = plans["model.layers.0.self_attn.qkv_proj"]
    assert qkv.fmt == "int8" and [p.hf_name.split(".")[-2] for p in qkv.parts] == ["q_proj", "k_proj", "v_proj"]
    assert plans["model.layers.0.mlp.gate_up_proj"].fmt == "keep"
    assert plans["model.layers.0.mlp.down_proj"].fmt == "int4"
    assert plans["model.layers.0.self_attn.o_proj"].fmt == "int4"   # Q4_0 (q_dim 64 is not a Q4_K row)
    head = plans["lm_head"]
    assert head.parts[0].hf_name == "model.embed_tokens.weight" and head.tied and head.fmt == "int8"   # Q8_0
    assert {lp.module: lp for lp in gn.plan(model, gguf_raw_tensors(path), lm_head="int4")}["lm_head"].fmt == "int4"
    with pytest.raises(ValueError, match="lm_head must be one of auto, int8, int4"):
        gn.plan(model, gguf_raw_tensors(path), lm_head="fp8")
    table = gn.plan_table(str(path))
    assert any(t["name"] == "model.layers.0.mlp.down_proj.weight" and t["heron"] == "int4 g32 exact"
               for t in table["tensors"])
    assert "int4 g32 exact" in gn.format_summary(table)


# ---- configuration -----------------------------------------------------------------------------------
def test_config_errors(tmp_path):
    from heron.config import EngineConfig
    from heron.quant.apply import check_quantization
    from tests.tiny_models import make_tiny_model
    make_tiny_model("llama", tmp_path)
    with pytest.raises(ValueError, match="--quantization gguf keeps a GGUF file's own quantized weights.*HF folder"):
        EngineConfig(model=str(tmp_path), quantization="gguf")
    with pytest.raises(ValueError, match="quantization must be one of int8, int4, w8a8, gguf"):
        EngineConfig(quantization="q4_k")
    with pytest.raises(ValueError, match="--quantization gguf runs torch's packed CPU kernels; use --device cpu"):
        check_quantization("gguf", 64, torch.device("cuda"), None)
    with pytest.raises(ValueError, match="quantization_lm_head must be one of auto, int8, int4; got 'int2'"):
        EngineConfig(quantization="gguf", quantization_lm_head="int2")
    with pytest.raises(ValueError, match="quantization_lm_head=int4 needs --quantization"):
        EngineConfig(quantization_lm_head="int4")
    EngineConfig(quantization="gguf", quantization_lm_head="int4")   # the default model is a GGUF file
