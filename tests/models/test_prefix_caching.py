"""Prefix caching end to end on tiny random models: greedy outputs with cache hits (pool and
lower tiers) equal HF transformers' outputs, whatever was reused, chunked, preempted or evicted."""
from __future__ import annotations

import pytest
import torch

from heron import LLM, SamplingParams
from tests.tiny_models import VOCAB, hf_greedy, hf_logprobs, make_tiny_model

MAX_TOKENS = 6
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module", params=["gemma3", "llama"])
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    model = make_tiny_model(request.param, folder)
    return folder, model


def _tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


def _llm(folder, **kw) -> LLM:
    kw.setdefault("max_num_batched_tokens", 512)
    return LLM(model=str(folder), dtype="float32", load_progress=False, **kw)


def _check(model, prompts, outs):
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == hf_greedy(model, p, MAX_TOKENS), f"prompt of {len(p)} tokens"


def test_overlapping_and_partial_block_prefixes(tiny):
    folder, model = tiny
    base = [1] + _tokens(79, seed=1)                       # 80 tokens = 5 blocks of 16
    prompts = [
        base,                                              # repeat: 4 blocks (the last token is computed)
        base[:70] + _tokens(10, 2),                        # shares 4 full blocks and 6 tokens of the 5th
        base[:64] + _tokens(5, 3),                         # shares exactly 4 blocks
        base[:37] + _tokens(20, 4),                        # 2 full blocks, then a partial one
        [1] + _tokens(40, 5),                              # nothing in common past the BOS token
    ]
    llm = _llm(folder)
    first = llm.generate([base], GREEDY, use_tqdm=False)
    assert first[0].num_cached_tokens == 0
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    assert [o.num_cached_tokens for o in outs] == [64, 64, 64, 32, 0]
    _check(model, [base], first)
    _check(model, prompts, outs)
    stats = llm.engine.kv_cache_manager.stats
    assert stats.hits == 64 * 3 + 32
    assert stats.queries == len(base) + sum(len(p) for p in prompts)


def test_requests_arriving_together_compute_the_shared_prefix_once(tiny):
    folder, model = tiny
    prefix = [1] + _tokens(47, seed=6)                     # 3 blocks
    prompts = [prefix + _tokens(8, 10 + i) for i in range(8)]
    llm = _llm(folder)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    _check(model, prompts, outs)
    # the first computes all 56 prompt tokens; the others wait one step for the prefix, then
    # compute only their own 8 tokens
    assert [o.num_cached_tokens for o in outs] == [0] + [48] * 7
    assert llm.engine.runner.stats.num_prefill_tokens == 56 + 7 * 8


def test_chunked_prefill_with_hits(tiny):
    folder, model = tiny
    prefix = [1] + _tokens(60, seed=7)
    prompts = [prefix + _tokens(30, 20 + i) for i in range(4)]
    llm = _llm(folder, max_num_batched_tokens=24)          # every prompt needs several chunks
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    _check(model, prompts, outs)
    assert [o.num_cached_tokens for o in outs] == [0, 48, 48, 48]
    assert llm.engine.runner.stats.num_chunked_prefills > 0


def test_preemption_and_eviction_under_a_tiny_pool(tiny):
    folder, model = tiny
    prefixes = [[1] + _tokens(31, seed=30 + k) for k in range(3)]
    prompts = [prefixes[i % 3] + _tokens(5 + i, 40 + i) for i in range(9)]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    llm = _llm(folder, num_kv_blocks=12)                   # 11 usable blocks = 176 tokens
    outs = llm.generate(prompts, params, use_tqdm=False)
    eng = llm.engine
    assert eng.scheduler.num_preemptions_total > 0
    assert eng.kv_cache_manager.pool.num_evictions > 0
    assert eng.kv_cache_manager.stats.hits > 0
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == hf_greedy(model, p, 20)
    # nothing leaked: every block is free again (cached or not)
    assert eng.kv_cache_manager.num_free_blocks == 11


def test_n_samples_and_prompt_logprobs_with_cache(tiny):
    folder, model = tiny
    prompt = [1] + _tokens(50, seed=8)
    llm = _llm(folder)
    llm.generate([prompt], GREEDY, use_tqdm=False)         # cache the prompt's blocks
    out = llm.generate([prompt], SamplingParams(n=3, temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True),
                       use_tqdm=False)[0]
    assert out.num_cached_tokens == 48
    ref = hf_greedy(model, prompt, MAX_TOKENS)
    assert all(c.token_ids == ref for c in out.outputs)
    # prompt logprobs need every prompt position's logits, so such a request skips the cache
    plp = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0),
                       use_tqdm=False)[0]
    assert plp.num_cached_tokens == 0
    want = hf_logprobs(model, prompt)
    got = [entry[tok].logprob for entry, tok in zip(plp.prompt_logprobs[1:], prompt[1:])]
    assert torch.allclose(torch.tensor(got), want[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])],
                          atol=1e-4)


def test_hash_collisions_are_misses(tiny, monkeypatch):
    """With every block hashing alike, lookups must still only return blocks with the same tokens."""
    import heron.core.kv_cache_manager as kvm
    monkeypatch.setattr(kvm, "hash_block", lambda parent, tokens, extra=b"": b"\x07" * 16)
    folder, model = tiny
    base = [1] + _tokens(63, seed=9)
    prompts = [base[:32] + _tokens(20, 50), [1] + _tokens(40, 51), base + _tokens(3, 52)]
    llm = _llm(folder)
    llm.generate([base], GREEDY, use_tqdm=False)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    _check(model, prompts, outs)
    assert [o.num_cached_tokens for o in outs] == [16, 0, 16]   # only the first block is ever confirmed


def test_cache_salt_isolates(tiny):
    folder, _ = tiny
    prompt = [1] + _tokens(40, seed=11)
    eng = _llm(folder).engine
    for salt, want in [("a", 0), ("a", 32), ("b", 0), (None, 0), (None, 32)]:
        rid = eng.add_request(None, prompt, GREEDY, cache_salt=salt)
        out = None
        while eng.has_unfinished_requests():
            out = next((o for o in eng.step() if o.request_id == rid), out)
        assert out.num_cached_tokens == want, salt


def test_caching_off(tiny):
    folder, model = tiny
    prompt = [1] + _tokens(40, seed=12)
    llm = _llm(folder, enable_prefix_caching=False)
    outs = llm.generate([prompt, prompt], GREEDY, use_tqdm=False)
    assert [o.num_cached_tokens for o in outs] == [0, 0]
    _check(model, [prompt, prompt], outs)
    assert llm.engine.kv_cache_manager.pool.cached == {}


def test_disk_tier_survives_restart_and_rejects_corrupt_files(tiny, tmp_path):
    folder, model = tiny
    prompt = [1] + _tokens(69, seed=13)                    # 4 full blocks can come from the tier
    llm = _llm(folder, kv_offload_dir=str(tmp_path))
    first = llm.generate([prompt], GREEDY, use_tqdm=False)
    llm.engine.shutdown()                                  # flushes the writer
    files = sorted(tmp_path.rglob("*.kvb"))
    assert len(files) >= 4

    # a new engine on the same directory: the pool is empty, the disk has the blocks
    llm2 = _llm(folder, kv_offload_dir=str(tmp_path))
    out = llm2.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert out.num_cached_tokens == 64
    assert llm2.engine.kv_cache_manager.stats.tier_hits == {"disk": 64}
    assert llm2.engine.runner.stats.num_prefill_tokens == len(prompt) - 64
    assert out.outputs[0].token_ids == first[0].outputs[0].token_ids == hf_greedy(model, prompt, MAX_TOKENS)
    llm2.engine.shutdown()

    # damage every file: each is a miss (and removed), the output is still exact
    for f in tmp_path.rglob("*.kvb"):
        data = bytearray(f.read_bytes())
        data[-1] ^= 0xFF
        f.write_bytes(bytes(data))
    llm3 = _llm(folder, kv_offload_dir=str(tmp_path))
    out = llm3.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert out.num_cached_tokens == 0
    assert llm3.engine.kv_tier_stats()["disk"]["corrupt"] >= 1
    assert out.outputs[0].token_ids == hf_greedy(model, prompt, MAX_TOKENS)
    llm3.engine.shutdown()


def test_disk_tier_is_not_shared_across_quantization(tiny, tmp_path):
    """Blocks computed with the plain weights are a miss for an int8-quantized engine on the same
    directory (its KV differs), and the other way round."""
    folder, model = tiny
    prompt = [1] + _tokens(69, seed=14)
    llm = _llm(folder, kv_offload_dir=str(tmp_path))
    llm.generate([prompt], GREEDY, use_tqdm=False)
    llm.engine.shutdown()
    assert len(list(tmp_path.rglob("*.kvb"))) >= 4
    q = _llm(folder, kv_offload_dir=str(tmp_path), quantization="int8")
    out = q.generate([prompt], GREEDY, use_tqdm=False)[0]
    assert out.num_cached_tokens == 0
    q.engine.shutdown()
    q2 = _llm(folder, kv_offload_dir=str(tmp_path), quantization="int8")   # its own blocks do hit
    assert q2.generate([prompt], GREEDY, use_tqdm=False)[0].num_cached_tokens == 64
    q2.engine.shutdown()


def test_cpu_tier_serves_blocks_evicted_from_the_pool(tiny):
    folder, model = tiny
    prompts = [[1] + _tokens(47, seed=60 + i) for i in range(4)]
    llm = _llm(folder, num_kv_blocks=8, kv_offload_cpu_gib=0.01)   # 7 usable blocks: one prompt at a time
    llm.generate(prompts, GREEDY, use_tqdm=False)          # later prompts evict the first's blocks
    out = llm.generate([prompts[0]], GREEDY, use_tqdm=False)[0]
    stats = llm.engine.kv_cache_manager.stats
    assert out.num_cached_tokens == 32
    assert stats.tier_hits["cpu"] == 32
    _check(model, [prompts[0]], [out])
