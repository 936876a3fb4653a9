"""heron's greedy tokens equal HF transformers' for every architecture, float32, whatever the
scheduler did: plain batching, chunking of every prefill, mixed prefill/decode steps, preemption."""
from __future__ import annotations

import math

import pytest
import torch

from heron import LLM, SamplingParams
from tests.tiny_models import ARCHS, PROMPT_LENS, hf_greedy, hf_logprobs, make_prompts, make_tiny_model

NEW_TOKENS = 32


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    arch = request.param
    folder = tmp_path_factory.mktemp(arch)
    model = make_tiny_model(arch, folder)
    prompts = make_prompts()
    expected = [hf_greedy(model, p, NEW_TOKENS) for p in prompts]
    return arch, folder, model, prompts, expected


def _run(folder, prompts, **engine_kwargs):
    llm = LLM(model=str(folder), dtype="float32", load_progress=False, **engine_kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return llm, [o.outputs[0].token_ids for o in outs]


def test_greedy_equals_hf(tiny):
    arch, folder, _, prompts, expected = tiny
    # budget 32 < the longest prompts (40, 70, 100), and the sliding windows (24) are exceeded
    llm, got = _run(folder, prompts, max_num_batched_tokens=32)
    assert got == expected
    assert llm.engine.runner.backend.name == "cpu"  # the kernel backend is what CPUs use by default
    assert llm.engine.runner.stats.num_chunked_prefills > 0
    assert max(PROMPT_LENS) > 32


def test_every_prefill_chunked(tiny):
    _, folder, _, prompts, expected = tiny
    llm, got = _run(folder, prompts, max_num_batched_tokens=7)
    assert got == expected
    # every prompt longer than 7 tokens was split
    assert llm.engine.runner.stats.num_chunked_prefills >= sum(math.ceil(n / 7) - 1 for n in PROMPT_LENS if n > 7)


def test_mixed_prefill_and_decode_steps(tiny):
    _, folder, _, prompts, expected = tiny
    llm, got = _run(folder, prompts, max_num_batched_tokens=24, max_num_seqs=3)
    assert got == expected
    assert llm.engine.runner.stats.num_mixed_steps > 0


def test_preemption_keeps_outputs(tiny):
    _, folder, _, prompts, expected = tiny
    # 12 blocks of 16 tokens: the 6 requests need ~40 blocks in all, so some must be preempted
    llm, got = _run(folder, prompts, num_kv_blocks=13, block_size=16, max_num_batched_tokens=64)
    assert llm.engine.scheduler.num_preemptions_total > 0
    assert got == expected


def test_logprobs_match_hf(tiny):
    _, folder, model, prompts, expected = tiny
    llm = LLM(model=str(folder), dtype="float32", load_progress=False, max_num_batched_tokens=32)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=5, prompt_logprobs=5)
    outs = llm.generate(prompts[:4], params, use_tqdm=False)
    for prompt, out in zip(prompts[:4], outs):
        tokens = prompt + out.outputs[0].token_ids
        ref = hf_logprobs(model, tokens)  # [len, V]
        # prompt logprobs: position i predicts token i (first is None)
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
        for i in range(1, len(prompt)):
            entry = out.prompt_logprobs[i]
            assert prompt[i] in entry
            assert abs(entry[prompt[i]].logprob - ref[i - 1, prompt[i]].item()) < 1e-4
            top = torch.topk(ref[i - 1], 5)
            got_top = sorted(((lp.rank, t) for t, lp in entry.items() if lp.rank <= 5))
            assert len(got_top) >= 5
            for (rank, tok), ref_tok, ref_lp in zip(got_top[:5], top.indices.tolist(), top.values.tolist()):
                assert abs(entry[tok].logprob - ref_lp) < 1e-4
        # sampled-token logprobs
        for j, (tok, pos) in enumerate(zip(out.outputs[0].token_ids, out.outputs[0].logprobs)):
            r = ref[len(prompt) - 1 + j]
            assert abs(pos[tok].logprob - r[tok].item()) < 1e-4
            assert pos[tok].rank == 1


def test_portable_torch_backend_equals_hf(tiny):
    """The default on CPU is the C++ kernel backend; the portable backend must agree too."""
    _, folder, _, prompts, expected = tiny
    llm, got = _run(folder, prompts, max_num_batched_tokens=32, attention_backend="torch")
    assert llm.engine.runner.backend.name == "torch"
    assert got == expected
