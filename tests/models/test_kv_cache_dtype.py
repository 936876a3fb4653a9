"""--kv-cache-dtype int8|fp8 end to end on tiny random models: the pool holds about twice the
blocks, greedy outputs agree with the model-dtype cache, the prefix cache and its tiers move
codes and scales exactly, bad options are refused; and (slow) the default model's perplexity."""
from __future__ import annotations

import json

import pytest
import torch

from heron import LLM, SamplingParams
from heron.config import EngineConfig
from heron.runner.kv_cache import SCALE_BYTES
from tests.tiny_models import VOCAB, make_tiny_model

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-gemma3-kvq")
    make_tiny_model("gemma3", folder)
    return folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama-kvq")
    make_tiny_model("llama", folder)
    return folder


def _prompts(n: int = 24, seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(5, 120, (n,), generator=g).tolist()
    return [[1] + torch.randint(3, VOCAB, (m,), generator=g).tolist() for m in lens]


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _llm(folder, **kw) -> LLM:
    kw.setdefault("dtype", "bfloat16")
    return LLM(model=str(folder), load_progress=False, **kw)


def _greedy(llm, prompts, params=GREEDY) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def test_pool_holds_about_twice_the_blocks(gemma):
    gib = 0.01
    runs = {k: _llm(gemma, kv_cache_dtype=k, kv_cache_memory=gib).engine.runner for k in ("auto", "int8", "fp8")}
    d, hkv, layers, bs = 32, 1, 4, 16                                # the tiny Gemma 3
    assert runs["auto"].bytes_per_block() == layers * 2 * bs * hkv * d * 2           # bf16
    for name, code in (("int8", torch.int8), ("fp8", torch.float8_e4m3fn)):
        r = runs[name]
        assert r.bytes_per_block() == layers * 2 * bs * hkv * (d + SCALE_BYTES)      # codes + float32 scales
        assert r.num_blocks == int(gib * 2**30) // r.bytes_per_block()
        assert all(kv.dtype == code and kv.shape == (2, r.num_blocks, bs, hkv, d + SCALE_BYTES)
                   for kv in r.kv_caches) and len(r.kv_caches) == layers
        # 2 * 32 / (32 + 4) = 1.78 here; 2 * 256 / 260 = 1.97 for the default model's head_dim
        assert r.num_blocks / runs["auto"].num_blocks == pytest.approx(2 * d / (d + SCALE_BYTES), rel=2e-3)


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8"])
def test_greedy_outputs_agree_with_the_bf16_cache(gemma, kv_cache_dtype):
    """Measured: 24 of 24 greedy outputs (16 tokens each) identical for int8 and for fp8."""
    prompts = _prompts()
    ref = _greedy(_llm(gemma), prompts)
    llm = _llm(gemma, kv_cache_dtype=kv_cache_dtype)
    assert llm.engine.runner.kv_caches[0].element_size() == 1
    got = _greedy(llm, prompts)
    identical = sum(a == b for a, b in zip(ref, got))
    assert identical >= 20, f"{identical}/24 greedy outputs agree"


def test_prompt_logprobs_move_a_little(gemma):
    """float32 (a bf16 model's logits are rounded more coarsely than these differences): the
    8-bit caches change the prompt logprobs (they really are 8-bit), int8 less than fp8, both
    by little. Measured mean |difference| on the tiny Gemma 3: int8 0.013, fp8 0.057 nats."""
    plp = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    prompts = _prompts()[:8]
    lp = {}
    for k in ("auto", "int8", "fp8"):
        outs = _llm(gemma, dtype="float32", kv_cache_dtype=k).generate(prompts, plp, use_tqdm=False)
        lp[k] = torch.tensor([o.prompt_logprobs[i][p[i]].logprob for p, o in zip(prompts, outs)
                              for i in range(1, len(p))])
    diff = {k: (lp[k] - lp["auto"]).abs().mean().item() for k in ("int8", "fp8")}
    assert 0 < diff["int8"] < diff["fp8"]
    assert diff["int8"] < 0.03 and diff["fp8"] < 0.12


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "fp8"])
def test_backends_chunking_and_n_agree_with_an_8bit_cache(llama, kv_cache_dtype):
    """Every path reads the same quantized K/V: the C++ kernel and the torch backend, a prompt
    prefilled whole or in 16-token chunks, and the samples of n = 2 (forked blocks, copy on
    write) give the same greedy tokens (float32, where the tiny Llama's outputs are otherwise
    sensitive enough that a bf16 model differs from a float32 one on most prompts)."""
    prompts = _prompts(12, seed=4)
    base = _greedy(_llm(llama, dtype="float32", kv_cache_dtype=kv_cache_dtype), prompts)
    torch_be = _greedy(_llm(llama, dtype="float32", kv_cache_dtype=kv_cache_dtype, attention_backend="torch"),
                       prompts)
    assert torch_be == base
    chunked = _greedy(_llm(llama, dtype="float32", kv_cache_dtype=kv_cache_dtype, max_num_batched_tokens=16),
                      prompts)
    assert chunked == base
    two = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, n=2)
    outs = _llm(llama, dtype="float32", kv_cache_dtype=kv_cache_dtype).generate(prompts[:4], two, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in outs] == [[b, b] for b in base[:4]]


def _cached_blocks(llm) -> dict[bytes, torch.Tensor]:
    pool = llm.engine.kv_cache_manager.pool
    return {h: llm.engine.runner.read_block(b.block_id) for h, b in pool.cached.items()}


def test_prefix_cache_and_disk_tier_round_trip_int8(gemma, tmp_path):
    prompt = [1] + _tokens(69, seed=13)                    # 4 full blocks can come from the tier
    llm = _llm(gemma, kv_cache_dtype="int8", kv_offload_dir=str(tmp_path / "int8"))
    first = _greedy(llm, [prompt])
    again = llm.generate([prompt], GREEDY, use_tqdm=False)[0]   # from the pool
    assert again.num_cached_tokens == 64 and again.outputs[0].token_ids == first[0]
    blocks1 = _cached_blocks(llm)
    llm.engine.shutdown()
    # the disk tier has its own directory (the layout digest differs from a bf16 cache's)
    bf16 = _llm(gemma, kv_offload_dir=str(tmp_path / "int8"))
    bf16.engine.shutdown()
    dirs = {p.name: json.loads((p / "layout.json").read_text()) for p in (tmp_path / "int8").iterdir()}
    assert len(dirs) == 2
    q8 = next(v for v in dirs.values() if v["dtype"] == "int8")
    assert q8["scale_dtype"] == "float32" and q8["shape"][-1] == 32 + SCALE_BYTES
    assert next(v for v in dirs.values() if v["dtype"] == "bfloat16").get("scale_dtype") is None

    llm2 = _llm(gemma, kv_cache_dtype="int8", kv_offload_dir=str(tmp_path / "int8"))
    out = llm2.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert out.num_cached_tokens == 64
    assert llm2.engine.kv_cache_manager.stats.tier_hits == {"disk": 64}
    assert out.outputs[0].token_ids == first[0]
    blocks2 = _cached_blocks(llm2)
    loaded = [h for h in blocks1 if h in blocks2]
    assert len(loaded) >= 4
    for h in loaded:                                        # codes and scales, byte for byte
        a, b = blocks1[h], blocks2[h]
        assert a.dtype == b.dtype == torch.int8 and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        assert a[..., 32:].contiguous().view(torch.float32).abs().sum() > 0    # scales were stored
    llm2.engine.shutdown()


def test_cpu_tier_serves_evicted_fp8_blocks(gemma):
    prompts = [[1] + _tokens(47, seed=60 + i) for i in range(4)]
    llm = _llm(gemma, kv_cache_dtype="fp8", num_kv_blocks=8, kv_offload_cpu_gib=0.01)  # one prompt at a time
    first = _greedy(llm, prompts)
    out = llm.generate([prompts[0]], GREEDY, use_tqdm=False)[0]
    assert out.num_cached_tokens == 32
    assert llm.engine.kv_cache_manager.stats.tier_hits["cpu"] == 32
    assert out.outputs[0].token_ids == first[0]


def test_bad_options_are_refused(monkeypatch):
    for bad in ("int4", "bf16", "", None, "INT8"):
        with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, int8, fp8"):
            EngineConfig(kv_cache_dtype=bad)
    assert EngineConfig(kv_cache_dtype="int8").kv_cache_dtype == "int8"
    monkeypatch.delattr(torch, "float8_e4m3fn")
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        EngineConfig(kv_cache_dtype="fp8")


def test_cli_option(capsys):
    from heron.cli import build_parser, engine_kwargs
    parser = build_parser()
    args = parser.parse_args(["eval", "perplexity", "--kv-cache-dtype", "fp8"])
    assert engine_kwargs(args)["kv_cache_dtype"] == "fp8"
    args = parser.parse_args(["generate", "hi"])
    assert engine_kwargs(args)["kv_cache_dtype"] == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "perplexity", "--kv-cache-dtype", "int4"])
    assert "invalid choice: 'int4' (choose from" in capsys.readouterr().err


@pytest.mark.slow
def test_default_model_perplexity():
    """The first 1,023 tokens of the shipped text (the full text: `heron eval perplexity
    --kv-cache-dtype ...`): an 8-bit KV cache costs at most 1% perplexity."""
    from heron.eval.perplexity import default_eval_text, perplexity
    text = default_eval_text()
    ppl = {}
    for kv_cache_dtype in ("auto", "int8", "fp8"):
        llm = LLM(load_progress=False, kv_cache_dtype=kv_cache_dtype, max_num_batched_tokens=512)
        ppl[kv_cache_dtype] = perplexity(llm, text, 1024, max_tokens=1023)["perplexity"]
        del llm
    assert ppl["int8"] <= ppl["auto"] * 1.01
    assert ppl["fp8"] <= ppl["auto"] * 1.01
    assert ppl["int8"] != ppl["auto"]    # the cache really was 8-bit
