"""bf16 on CPU runs heron's fast paths (fused norm/activation/RoPE ops, oneDNN-packed weights,
the small-batch GEMV, the K/V-writing decode kernel, W @ h^T LM head). Whole tiny models must
give the same results through them as through plain torch ops in bf16: prompt logprobs within
bf16 rounding and the same greedy tokens, alone (GEMV path) and in a batch (packed path)."""
from __future__ import annotations

import pytest
import torch

import heron.ops.cpu as cpu_ops
from heron import LLM, SamplingParams
from tests.tiny_models import make_prompts, make_tiny_model

pytestmark = pytest.mark.skipif(cpu_ops.load_kernel() is None, reason=f"heron's CPU kernels did not build: {cpu_ops.kernel_error()}")


def _run(folder, prompts, fast: bool, monkeypatch):
    monkeypatch.setattr(cpu_ops, "_disabled", not fast)
    monkeypatch.setenv("HERON_NO_PACKED_WEIGHTS", "0" if fast else "1")
    llm = LLM(model=str(folder), dtype="bfloat16", num_kv_blocks=256, load_progress=False)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, prompt_logprobs=0)
    alone = llm.generate(prompts[:1], params, use_tqdm=False)
    batch = llm.generate(prompts, params, use_tqdm=False)
    return alone + batch


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_bf16_fast_paths_match_plain_torch(arch, tmp_path, monkeypatch):
    make_tiny_model(arch, tmp_path / arch)
    prompts = make_prompts()
    fast = _run(tmp_path / arch, prompts, True, monkeypatch)
    plain = _run(tmp_path / arch, prompts, False, monkeypatch)
    for f, p in zip(fast, plain):
        assert f.outputs[0].token_ids == p.outputs[0].token_ids
        lf = torch.tensor([next(iter(d.values())).logprob for d in f.prompt_logprobs[1:]])
        lp = torch.tensor([next(iter(d.values())).logprob for d in p.prompt_logprobs[1:]])
        torch.testing.assert_close(lf, lp, atol=0.05, rtol=0.02)



@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_cascade_attention_on_shared_prefixes_matches_no_cache(arch, tmp_path, monkeypatch):
    """Prompts sharing a 160-token prefix: with prefix caching the followers' chunks and all
    decode steps share cached blocks and take cascade attention (shared keys once as one
    flash-attention GEMM, merged by log-sum-exp); without it no block is shared. In bf16 a
    GEMM-shaped attention rounds its probabilities to bf16 (as SDPA and HF's bf16 path do), so
    on a tiny random model greedy paths may part at a near-tie: every token up to the first
    difference has the same logprob within bf16 rounding, and at a difference the two choices
    were within 0.15 nats of each other in the run without the cache."""
    from heron.runner.attention import cpu_backend
    from tests.tiny_models import VOCAB
    make_tiny_model(arch, tmp_path / arch)
    g = torch.Generator().manual_seed(11)
    prefix = torch.randint(3, VOCAB, (160,), generator=g).tolist()
    prompts = [prefix + torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (5, 17, 30, 9, 22, 3, 12, 8, 26, 14)]
    used = []
    plan = cpu_backend.CpuAttentionBackend._cascade_plan

    def spy(self, meta, spec, tables, seq_lens):
        result = plan(self, meta, spec, tables, seq_lens)
        used.append(result is not None)
        return result

    monkeypatch.setattr(cpu_backend.CpuAttentionBackend, "_cascade_plan", spy)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=3)
    outs = {}
    for caching in (True, False):
        used.clear()
        llm = LLM(model=str(tmp_path / arch), dtype="bfloat16", num_kv_blocks=256, load_progress=False,
                  enable_prefix_caching=caching)
        outs[caching] = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        assert any(used) == caching
    same = 0
    for c, r in zip(outs[True], outs[False]):
        for t, (tc, tr) in enumerate(zip(c.token_ids, r.token_ids)):
            if tc != tr:
                assert tc in r.logprobs[t] and r.logprobs[t][tr].logprob - r.logprobs[t][tc].logprob < 0.15
                break
            assert abs(c.logprobs[t][tc].logprob - r.logprobs[t][tr].logprob) < 0.15
            same += 1
    assert same >= len(prompts) * 16 // 2
