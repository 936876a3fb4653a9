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

pytestmark = pytest.mark.skipif(cpu_ops.load_kernel() is None, reason="no C++ compiler for heron's CPU kernels")


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
