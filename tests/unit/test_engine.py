"""Engine behaviour on a tiny random Llama: n > 1 sharing, seeds, stops, errors, aborts."""
from __future__ import annotations

import pytest

from heron import LLM, SamplingParams
from tests.tiny_models import make_prompts, make_tiny_model


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama", folder)
    return LLM(model=str(folder), dtype="float32", load_progress=False, max_num_batched_tokens=64)


def test_n_samples_share_prompt_kv(llm):
    prompt = make_prompts()[3]  # 70 tokens
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    ref = llm.generate([prompt], greedy, use_tqdm=False)[0].outputs[0].token_ids
    stats = llm.engine.runner.stats
    before = stats.num_prefill_tokens + stats.num_decode_tokens
    out = llm.generate([prompt], SamplingParams(n=3, temperature=0.0, max_tokens=8, ignore_eos=True),
                       use_tqdm=False)[0]
    computed = stats.num_prefill_tokens + stats.num_decode_tokens - before
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(c.token_ids == ref for c in out.outputs)
    # the prompt is computed once (70, less the 4 blocks of 16 the prefix cache kept from the
    # first run), each extra sample recomputes only the last prompt token, and each sample
    # computes its own 7 decode steps
    assert out.num_cached_tokens == 64
    assert computed == (70 - 64) + 2 * 1 + 3 * 7


def test_seeded_sampling_is_independent_of_batch(llm):
    prompts = make_prompts()
    seeded = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=12, seed=1234, ignore_eos=True)
    alone = llm.generate([prompts[2]], seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=0.7, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=1.3, top_k=5, max_tokens=12, seed=7, ignore_eos=True)]
    batch = llm.generate([prompts[0], prompts[1], prompts[2]], others + [seeded], use_tqdm=False)
    assert batch[2].outputs[0].token_ids == alone
    again = llm.generate([prompts[2]], seeded, use_tqdm=False)[0].outputs[0].token_ids
    assert again == alone


def test_n_with_seed_gives_distinct_reproducible_samples(llm):
    p = SamplingParams(n=4, temperature=1.5, max_tokens=10, seed=99, ignore_eos=True)
    a = llm.generate([make_prompts()[1]], p, use_tqdm=False)[0]
    b = llm.generate([make_prompts()[1]], p, use_tqdm=False)[0]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({tuple(c.token_ids) for c in a.outputs}) > 1


def test_stop_string_truncates_text(llm):
    prompt = make_prompts()[2]
    full = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    words = full.text.split()
    stop = words[5]
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full.text[:full.text.index(stop)]
    assert len(out.token_ids) < 20


def test_stop_token_id_and_max_tokens(llm):
    prompt = make_prompts()[1]
    full = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 6
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True,
                                                stop_token_ids=[full.token_ids[2]]), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == full.token_ids[2]
    assert out.token_ids == full.token_ids[:3]


def test_bad_input_is_rejected_clearly(llm):
    with pytest.raises(ValueError, match="maximum model length is 512"):
        llm.generate([[5] * 600], SamplingParams(max_tokens=4), use_tqdm=False)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 384\)"):
        llm.generate([[5, 99999]], SamplingParams(max_tokens=4), use_tqdm=False)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], SamplingParams(max_tokens=4), use_tqdm=False)
    # nothing was left queued by the failures
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.kv_cache_manager.num_free_blocks == llm.engine.kv_cache_manager.pool.num_usable_blocks


def test_abort_frees_blocks(llm):
    eng = llm.engine
    rid = eng.add_request(None, make_prompts()[4], SamplingParams(max_tokens=50, ignore_eos=True))
    eng.step()
    assert eng.kv_cache_manager.num_free_blocks < eng.kv_cache_manager.pool.num_usable_blocks
    eng.abort_request(rid)
    assert not eng.has_unfinished_requests()
    assert eng.kv_cache_manager.num_free_blocks == eng.kv_cache_manager.pool.num_usable_blocks


def test_timings_are_reported(llm):
    out = llm.generate([make_prompts()[0]], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
                       use_tqdm=False)[0]
    m = out.metrics
    assert m.time_to_first_token is not None and m.time_to_first_token >= 0
    assert m.time_per_output_token is not None and m.time_per_output_token >= 0
    assert m.e2e_latency >= m.time_to_first_token


def test_chat_uses_the_template_and_requires_one(llm):
    msgs = [{"role": "user", "content": "w10 w11 w12"}]
    with pytest.raises(ValueError, match="no chat template"):
        llm.chat(msgs, SamplingParams(max_tokens=3), use_tqdm=False)
    template = "{% for m in messages %}<s> {{ m['content'] }} </s> {% endfor %}w7"
    out = llm.chat(msgs, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), chat_template=template,
                   use_tqdm=False)[0]
    assert out.prompt_token_ids == [1, 10, 11, 12, 2, 7]
    direct = llm.generate([[1, 10, 11, 12, 2, 7]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
                          use_tqdm=False)[0]
    assert out.outputs[0].token_ids == direct.outputs[0].token_ids


def test_generation_config_eos_ids_are_used(tmp_path):
    import json
    folder = tmp_path / "m"
    make_tiny_model("llama", folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    llm = LLM(model=str(folder), dtype="float32", load_progress=False)
    assert llm.engine.eos_token_ids == frozenset({2, 7})
