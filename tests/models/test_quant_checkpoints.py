"""`heron quantize` (RTN / GPTQ / AWQ) writing standard GPTQ / AWQ checkpoints, and heron loading
such checkpoints (heron.quant.checkpoint) into its quantized layers, on tiny random models."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from heron import LLM, SamplingParams
from heron.config import EngineConfig
from heron.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from heron.layers.linear import LinearBase
from heron.quant.export import quantize_checkpoint
from tests.tiny_models import make_prompts, make_tiny_model

CALIB = " ".join(f"w{(7 * i) % 380 + 3}" for i in range(2000))   # the tiny tokenizer's words


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-qckpt")
    for arch in ("gemma3", "llama"):
        make_tiny_model(arch, root / arch)
    return root


def _llm(folder, **kw) -> LLM:
    return LLM(model=str(folder), dtype="bfloat16", load_progress=False, enable_prefix_caching=False, **kw)


def _quantize(src, out, method, bits=4, group_size=32):
    return quantize_checkpoint(str(src), method, out, bits=bits, group_size=group_size, calib_text=CALIB,
                               calib_tokens=768, context_len=128, progress=False)


CASES = [("rtn", 4, 32), ("gptq", 4, 64), ("awq", 4, 32), ("gptq", 8, None)]


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
@pytest.mark.parametrize("method,bits,group_size", CASES)
def test_quantize_writes_the_standard_layout_and_loads_exactly(tiny, tmp_path, arch, method, bits, group_size):
    out = tmp_path / "q"
    summary = _quantize(tiny / arch, out, method, bits, group_size)
    qweights = summary["weights"]
    assert summary["layers"] == len(qweights) == 4 * (4 if arch == "gemma3" else 3)

    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    if method == "awq":
        assert qc == {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}
    else:
        assert qc == {"quant_method": "gptq", "bits": bits, "group_size": group_size or -1, "desc_act": False,
                      "sym": bits == 8, "checkpoint_format": "gptq"}
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        hidden = 64
        q = f.get_tensor("model.layers.0.self_attn.q_proj.qweight")
        assert q.dtype == torch.int32
        if method == "awq":
            assert q.shape == (hidden, f.get_tensor("model.layers.0.self_attn.q_proj.scales").shape[1] // 8)
            assert "model.layers.0.self_attn.q_proj.g_idx" not in names
        else:
            assert q.shape[0] == hidden * bits // 32
            assert f.get_tensor("model.layers.0.self_attn.q_proj.g_idx").shape == (hidden,)
        assert f.get_tensor("model.layers.0.mlp.down_proj.scales").dtype == torch.float16
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        assert f.get_tensor("model.layers.0.input_layernorm.weight").dtype == torch.bfloat16
    assert not any("qkv_proj" in n or "gate_up_proj" in n for n in names)          # per projection, HF names
    assert not any(n.endswith("_proj.weight") for n in names)
    assert ("lm_head.weight" in names) == (arch == "llama")                          # gemma ties it

    llm = _llm(out)
    model = llm.engine.runner.model
    mods = dict(model.named_modules())
    for name, iw in qweights.items():
        layer = mods[name]
        assert layer.weight.numel() == 0 and layer.quant.method == ("int8" if bits == 8 else "int4")
        # bit for bit what the quantizer produced (scales are bf16 and fp16 values both)
        assert torch.equal(layer.quant.dequantize(torch.float32), iw.build().dequantize(torch.float32)), name
        assert torch.equal(layer.quant.dequantize(torch.float32), iw.dequantize()), name
    assert all(m.quant is not None for m in model.modules() if isinstance(m, LinearBase))
    head = next(m for m in model.modules() if isinstance(m, ParallelLMHead))
    assert head.quant is None and head.weight.numel() > 0
    s = llm.engine.runner.quant_summary
    assert s["method"] == ("awq" if method == "awq" else "gptq") and s["layers"] == len(qweights)

    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompts = make_prompts()[:3]
    a = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    b = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert a == b and all(len(t) == 6 for t in a)


def test_quantize_cli(tiny, tmp_path, capsys):
    from heron.cli import main
    out = tmp_path / "cli"
    rc = main(["quantize", str(tiny / "llama"), "--method", "rtn", "--bits", "4", "--group-size", "64", "--out",
               str(out), "--no-progress"])
    assert rc == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (line["method"], line["bits"], line["group_size"], line["layers"]) == ("rtn", 4, 64, 12)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["group_size"] == 64
    # errors: clear messages, exit status 2
    assert main(["quantize", str(tiny / "llama"), "--method", "awq", "--bits", "8", "--out", str(tmp_path / "x")]) == 2
    assert "AWQ is 4-bit only" in capsys.readouterr().err
    assert main(["quantize", str(tiny / "llama"), "--method", "rtn", "--group-size", "128", "--out",
                 str(tmp_path / "y"), "--no-progress"]) == 2
    assert "not a multiple of --group-size 128" in capsys.readouterr().err
    assert main(["quantize", str(tiny / "llama"), "--method", "rtn", "--out", str(out)]) == 2
    assert "is not an empty folder" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_awq_folds_leave_the_float_model_unchanged(tiny, arch):
    """Before rounding, AWQ's scaling is an identity: W diag(s) with x / s folded into the norms
    (Gemma: 1 + w), v's rows (o_proj, shared across the query heads of a KV group) and up's rows
    (down_proj). Run the float32 model before and after the folds: same log-probabilities up to
    the bf16 rounding of the folded norm weights."""
    from heron.quant.awq import apply_awq
    from heron.quant.calibration import calibration_windows, collect_input_stats
    llm = LLM(model=str(tiny / arch), dtype="float32", load_progress=False, enable_prefix_caching=False)
    model = llm.engine.runner.model
    with torch.no_grad():   # start from bf16 norm weights, as a checkpoint stores them
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(p.to(torch.bfloat16).float())
    linears = {n: m for n, m in model.named_modules() if isinstance(m, LinearBase)}
    stats = collect_input_stats(llm, linears, calibration_windows(llm.tokenizer, CALIB, 512, 128))
    prompt = make_prompts()[5]
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)

    def logprobs():
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        return torch.tensor([next(iter(e.values())).logprob for e in out.prompt_logprobs[1:]])

    before = logprobs()
    alphas = []
    for i, layer in enumerate(model.model.layers):
        pre = f"model.layers.{i}."
        res = apply_awq(layer, {n[len(pre):]: s for n, s in stats.items() if n.startswith(pre)}, 32)
        alphas += [a for _, a in res.values()]
    after = logprobs()
    assert max(alphas) > 0                       # the folds were not all identities
    assert torch.allclose(before, after, atol=0.05, rtol=0.02), (before - after).abs().max()


# ---- hand-built checkpoints: the layouts, pinned -------------------------------------------------
def _pack_words(vals: np.ndarray, bits: int) -> np.ndarray:
    """uint32 words from codes [..., 32/bits] (last axis: lowest bits first), as int32."""
    out = np.zeros(vals.shape[:-1], dtype=np.uint64)
    for j in range(vals.shape[-1]):
        out |= vals[..., j].astype(np.uint64) << np.uint64(bits * j)
    return out.astype(np.uint32).view(np.int32)


def _hand_gptq(codes, zeros, scales, bits, group, fmt):
    """GPTQ tensors built straight from the layout's definition (numpy, not heron's packer)."""
    n, k = codes.shape
    per = 32 // bits
    qweight = _pack_words(codes.T.reshape(k // per, per, n).transpose(0, 2, 1), bits)        # [K/per, N]
    stored = zeros - (1 if fmt == "gptq" else 0)
    qzeros = _pack_words(stored.T.reshape(-1, n // per, per), bits)                            # [G, N/per]
    g = k if group == -1 else group
    return dict(qweight=torch.from_numpy(qweight.copy()), qzeros=torch.from_numpy(qzeros.copy()),
                scales=torch.from_numpy(scales.T.astype(np.float16).copy()),
                g_idx=torch.from_numpy((np.arange(k) // g).astype(np.int32)))


def _hand_awq(codes, zeros, scales):
    n, k = codes.shape
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    qweight = _pack_words(codes.T.reshape(k, n // 8, 8)[..., order], 4)                      # [K, N/8]
    qzeros = _pack_words(zeros.T.reshape(-1, n // 8, 8)[..., order], 4)
    return dict(qweight=torch.from_numpy(qweight.copy()), qzeros=torch.from_numpy(qzeros.copy()),
                scales=torch.from_numpy(scales.T.astype(np.float16).copy()))


PROJ = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj"]
FUSED = {"self_attn.qkv_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
         "mlp.gate_up_proj": ["mlp.gate_proj", "mlp.up_proj"], "self_attn.o_proj": ["self_attn.o_proj"],
         "mlp.down_proj": ["mlp.down_proj"]}


def _hand_checkpoint(src, out, qc, seed=0):
    """A copy of the tiny model whose projections hold known codes: scales are powers of two and
    zeros integers, so the expected weights (code - zero) * scale are exact in bf16 too."""
    import shutil
    shutil.copytree(src, out)
    tensors = load_file(str(out / "model.safetensors"))
    rng = np.random.default_rng(seed)
    bits, group = qc["bits"], qc["group_size"]
    fmt = "awq" if qc["quant_method"] == "awq" else qc.get("checkpoint_format", "gptq")
    expected = {}
    for name in [n for n in tensors if n.endswith("_proj.weight")]:
        n, k = tensors.pop(name).shape
        prefix = name[: -len(".weight")]
        g = k if group == -1 else group
        codes = rng.integers(0, 1 << bits, size=(n, k), dtype=np.int64)
        if bits == 8:
            zeros = np.full((n, k // g), 128, dtype=np.int64)
        else:
            zeros = rng.integers(1 if fmt == "gptq" else 0, 16, size=(n, k // g), dtype=np.int64)
        scales = 2.0 ** rng.integers(-9, -4, size=(n, k // g)).astype(np.float64)
        expected[prefix] = torch.from_numpy((codes - np.repeat(zeros, g, axis=1)) * np.repeat(scales, g, axis=1)).float()
        built = _hand_awq(codes, zeros, scales) if fmt == "awq" else _hand_gptq(codes, zeros, scales, bits, group, fmt)
        for key, t in built.items():
            tensors[f"{prefix}.{key}"] = t
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(cfg))
    return expected


HAND = [
    {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": False, "checkpoint_format": "gptq"},
    {"quant_method": "gptq", "bits": 4, "group_size": -1, "desc_act": False, "sym": False,
     "checkpoint_format": "gptq_v2"},
    {"quant_method": "gptq", "bits": 8, "group_size": -1, "desc_act": False, "sym": True},
    {"quant_method": "gptq", "bits": 8, "group_size": 32, "desc_act": False, "sym": True},
    {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"},
]


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
@pytest.mark.parametrize("qc", HAND, ids=["gptq4-g32", "gptq4-v2-perchannel", "gptq8", "gptq8-g32", "awq4-g32"])
def test_hand_built_checkpoint_loads_to_the_expected_weights(tiny, tmp_path, arch, qc):
    expected = _hand_checkpoint(tiny / arch, tmp_path / "hand", qc)
    llm = _llm(tmp_path / "hand")
    mods = dict(llm.engine.runner.model.named_modules())
    for i in range(len(llm.engine.runner.model.model.layers)):
        for fused, parts in FUSED.items():
            layer = mods[f"model.layers.{i}.{fused}"]
            want = torch.cat([expected[f"model.layers.{i}.{p}"] for p in parts])
            got = layer.quant.dequantize(torch.float32)
            assert torch.equal(got, want), f"layer {i} {fused}: max diff {(got - want).abs().max()}"
            assert layer.quant.method == ("int8" if qc["bits"] == 8 else "int4")
            if qc["bits"] == 8:   # symmetric 8-bit groups load as heron's group-wise int8, exactly
                assert layer.quant.group_size == (None if qc["group_size"] == -1 else qc["group_size"])
    out = llm.generate([make_prompts()[0]], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 3


def test_checkpoint_option_errors(tiny, tmp_path):
    ckpt = tmp_path / "rtn"
    _quantize(tiny / "gemma3", ckpt, "rtn")
    with pytest.raises(ValueError, match="already quantized; drop --quantization int4"):
        EngineConfig(model=str(ckpt), quantization="int4")
    with pytest.raises(ValueError, match="drop --quantization awq"):
        EngineConfig(model=str(ckpt), quantization="awq")
    EngineConfig(model=str(ckpt), quantization="gptq")     # the explicit equivalent is fine
    with pytest.raises(ValueError, match="is not one; make one with `heron quantize"):
        EngineConfig(model=str(tiny / "gemma3"), quantization="gptq")
    # an unsupported config is refused when the engine config is built, naming what is supported
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 3
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPTQ with bits=3.*heron loads GPTQ with bits 4 or 8"):
        EngineConfig(model=str(ckpt))


def test_act_order_g_idx_is_refused(tiny, tmp_path):
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": False}
    _hand_checkpoint(tiny / "llama", tmp_path / "ao", qc)
    tensors = load_file(str(tmp_path / "ao" / "model.safetensors"))
    g_idx = tensors["model.layers.1.mlp.up_proj.g_idx"]
    tensors["model.layers.1.mlp.up_proj.g_idx"] = g_idx.flip(0).contiguous()
    save_file(tensors, str(tmp_path / "ao" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="act-order"):
        _llm(tmp_path / "ao")


def test_lm_head_option_on_a_checkpoint(tiny, tmp_path):
    ckpt = tmp_path / "gptq"
    _quantize(tiny / "gemma3", ckpt, "gptq")
    llm = _llm(ckpt, quantization_lm_head="int4", quantization_group_size=32)
    model = llm.engine.runner.model
    head = next(m for m in model.modules() if isinstance(m, ParallelLMHead))
    emb = next(m for m in model.modules() if isinstance(m, VocabParallelEmbedding))
    assert (head.quant.method, head.quant.group_size) == ("int4", 32) and emb.quant is head.quant
    assert llm.engine.runner.quant_summary["layers"] == 17
