"""Speculative decoding end to end on tiny random models: greedy outputs with drafts (n-gram,
and an oracle that is right for a while and then wrong, so both accepted runs and rejections
happen) equal HF transformers' greedy outputs and heron's own outputs without speculation,
whatever else the scheduler did (batching, chunking, preemption, prefix hits, stops); and
sampled outputs follow the target's distribution (a chi-square test on a 6-token vocabulary)."""
from __future__ import annotations

import math
import random

import pytest
import torch

from heron import LLM, SamplingParams
from heron.spec import Proposer, tree
from tests.tiny_models import VOCAB, hf_greedy, make_tiny_model

MAX_TOKENS = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module", params=["gemma3", "llama"])
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"tiny-spec-{request.param}")
    model = make_tiny_model(request.param, folder)
    return folder, model


def _tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


def _prompts() -> list[list[int]]:
    rep = _tokens(20, 1)
    return [[1] + rep + rep[:8],            # the n-gram proposer finds the repeat
            [1] + _tokens(45, 2),
            [1] + _tokens(7, 3),
            [1] + _tokens(33, 4) + _tokens(33, 4)[:20]]


def _llm(folder, **kw) -> LLM:
    kw.setdefault("max_num_batched_tokens", 512)
    return LLM(model=str(folder), dtype="float32", load_progress=False, **kw)


class OracleProposer(Proposer):
    """Drafts the known greedy continuation, with one token made wrong in half of the
    proposals (seeded), so that verification accepts runs of every length and rejects."""

    name = "oracle"

    def __init__(self, refs: dict[tuple[int, ...], list[int]], seed: int = 0) -> None:
        self.refs = refs
        self.rng = random.Random(seed)
        self.calls = 0

    def propose(self, request, k):
        self.calls += 1
        ref = self.refs[tuple(request.prompt_token_ids)]
        done = request.num_output_tokens
        drafts = list(ref[done:done + k]) or [5] * k      # past the reference: mostly wrong tokens
        if self.rng.random() < 0.5:
            i = self.rng.randrange(len(drafts))
            drafts[i] = 3 + (drafts[i] - 2) % (VOCAB - 3)   # a different token
        return drafts


class TreeOracleProposer(OracleProposer):
    """Token trees of three branches: the oracle's drafts (wrong somewhere half of the time),
    the known continuation going wrong at a random depth, and random tokens, in a shuffled
    order, so the accepted path is often not the first branch (its KV has to move)."""

    name = "tree-oracle"

    def propose(self, request, k):
        raise AssertionError("a tree proposer is asked for trees")

    def propose_tree(self, request, k, width):
        drafts = OracleProposer.propose(self, request, k)
        ref = self.refs[tuple(request.prompt_token_ids)][request.num_output_tokens:][:k] or [5] * k
        diverging = list(ref)
        i = self.rng.randrange(len(diverging))
        diverging[i] = 3 + (diverging[i] - 2) % (VOCAB - 3)
        noise = [self.rng.randrange(3, VOCAB) for _ in range(k)]
        branches = [drafts, diverging, noise]
        self.rng.shuffle(branches)
        return tree.build(branches[:width])


def _oracle_llm(folder, model, prompts, max_tokens=MAX_TOKENS, tree_width=1, **kw) -> LLM:
    kw.setdefault("speculative_max_batch", 64)
    llm = _llm(folder, speculative="ngram", speculative_tree_width=tree_width, **kw)
    refs = {tuple(p): hf_greedy(model, p, max_tokens) for p in prompts}
    llm.engine.spec.proposer = (TreeOracleProposer if tree_width > 1 else OracleProposer)(refs)
    return llm


def _count_moves(llm) -> list[int]:
    """Spy on the runner: how many token-tree steps accepted a path that was not the first branch."""
    runner = llm.engine.runner
    real = runner._move_accepted
    moved = [0]

    def spy(request, path):
        moved[0] += any(n != d for d, n in enumerate(path))
        real(request, path)
    runner._move_accepted = spy
    return moved


def test_ngram_greedy_equals_hf(tiny):
    folder, model = tiny
    prompts = _prompts()
    llm = _llm(folder, speculative="ngram", speculative_max_batch=64, speculative_ngram_min=1)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == hf_greedy(model, p, MAX_TOKENS)
    assert llm.engine.spec.stats.num_proposed > 0    # (acceptance is the oracle tests' business)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_accepted_runs_and_rejections_equal_hf(tiny, k):
    folder, model = tiny
    prompts = _prompts()
    llm = _oracle_llm(folder, model, prompts, num_speculative_tokens=k)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == hf_greedy(model, p, MAX_TOKENS)
    stats = llm.engine.spec.stats
    assert 0 < stats.num_accepted < stats.num_proposed      # both accepted and rejected drafts happened
    if k > 1:
        assert stats.mean_accepted_length > 1.5
    # the KV of rejected drafts was overwritten: each request computed its tokens once more than
    # accepted ones, never fewer (a rolled-back slot reused with stale KV would change the outputs above)
    for p, o in zip(prompts, outs):
        assert len(o.outputs[0].token_ids) == MAX_TOKENS


@pytest.mark.parametrize("k", [2, 5])
def test_token_trees_equal_hf(tiny, k):
    folder, model = tiny
    prompts = _prompts()
    llm = _oracle_llm(folder, model, prompts, tree_width=3, num_speculative_tokens=k)
    moved = _count_moves(llm)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == hf_greedy(model, p, MAX_TOKENS)
    stats = llm.engine.spec.stats
    assert 0 < stats.num_accepted < stats.num_proposed
    assert moved[0] > 0           # accepted paths off the first branch happened (their KV moved)


def test_token_trees_with_an_8bit_cache_and_the_torch_backend_match_no_speculation(tiny):
    folder, model = tiny
    prompts = _prompts()
    for kw in (dict(kv_cache_dtype="int8"), dict(attention_backend="torch")):
        plain = _llm(folder, **kw).generate(prompts, GREEDY, use_tqdm=False)
        llm = _oracle_llm(folder, model, prompts, tree_width=3, num_speculative_tokens=4, **kw)
        moved = _count_moves(llm)
        spec = llm.generate(prompts, GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in plain], kw
        assert moved[0] > 0


@pytest.mark.parametrize("tree_width", [1, 3])
def test_budget_chunking_preemption_and_prefix_hits(tiny, tree_width):
    folder, model = tiny
    prefixes = [[1] + _tokens(31, seed=30 + k) for k in range(3)]
    prompts = [prefixes[i % 3] + _tokens(5 + i, 40 + i) for i in range(9)]
    max_tokens = 20
    # 11 usable blocks of 16 tokens for 9 requests of up to 65 tokens: preemptions and
    # evictions; a budget of 40 tokens: prompts are chunked and drafts trimmed to what is left
    llm = _oracle_llm(folder, model, prompts, max_tokens, num_kv_blocks=12, max_num_batched_tokens=40,
                      num_speculative_tokens=4, tree_width=tree_width)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
                        use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == hf_greedy(model, p, max_tokens)
    eng = llm.engine
    assert eng.scheduler.num_preemptions_total > 0
    assert eng.kv_cache_manager.stats.hits > 0
    assert eng.spec.stats.num_accepted > 0
    assert eng.kv_cache_manager.num_free_blocks == 11        # nothing leaked, drafts' slots included


def _same_outputs(a, b):
    for x, y in zip(a, b):
        cx, cy = x.outputs[0], y.outputs[0]
        assert (cx.token_ids, cx.text, cx.finish_reason, cx.stop_reason) == \
            (cy.token_ids, cy.text, cy.finish_reason, cy.stop_reason)


def test_stops_inside_an_accepted_run_match_no_speculation(tiny):
    folder, model = tiny
    prompts = _prompts()
    plain = _llm(folder)
    refs = [o.outputs[0] for o in plain.generate(prompts, GREEDY, use_tqdm=False)]
    spec = _oracle_llm(folder, model, prompts, num_speculative_tokens=6)
    cases = []
    for ref in refs:
        cases.append(SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, stop_token_ids=[ref.token_ids[4]]))
        cases.append(SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                                    stop=[ref.text.split()[5]]))
        cases.append(SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True,
                                    stop=[ref.text.split()[3]], include_stop_str_in_output=True))
    for params in cases + [SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)]:
        _same_outputs(spec.generate(prompts, params, use_tqdm=False),
                      plain.generate(prompts, params, use_tqdm=False))
    assert any(len(o.outputs[0].token_ids) < MAX_TOKENS
               for o in spec.generate(prompts, cases[1], use_tqdm=False))   # the stops did stop early


def test_penalties_min_tokens_and_logprobs_match_no_speculation(tiny):
    folder, model = tiny
    prompts = _prompts()
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, repetition_penalty=1.5, presence_penalty=0.5,
                            min_tokens=6, logprobs=3, stop_token_ids=[7, 8, 9])
    plain = _llm(folder).generate(prompts, params, use_tqdm=False)
    refs = {tuple(p): list(o.outputs[0].token_ids) for p, o in zip(prompts, plain)}
    llm = _llm(folder, speculative="ngram", speculative_max_batch=64)
    llm.engine.spec.proposer = OracleProposer(refs)
    spec = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.spec.stats.num_accepted > 0
    for a, b in zip(spec, plain):
        ca, cb = a.outputs[0], b.outputs[0]
        assert ca.token_ids == cb.token_ids
        assert len(ca.logprobs) == len(cb.logprobs) == len(ca.token_ids)
        for la, lb in zip(ca.logprobs, cb.logprobs):
            assert list(la) == list(lb)       # same chosen token and top-3, in order
            for tid in la:
                assert la[tid].logprob == pytest.approx(lb[tid].logprob, abs=1e-4)
        assert ca.cumulative_logprob == pytest.approx(cb.cumulative_logprob, abs=1e-3)


def test_large_batches_do_not_speculate(tiny):
    folder, model = tiny
    prompts = _prompts() * 3
    llm = _llm(folder, speculative="ngram", speculative_max_batch=4)
    llm.engine.spec.proposer = OracleProposer({tuple(p): hf_greedy(model, p, MAX_TOKENS) for p in _prompts()})
    proposals = []
    real = llm.engine.spec.propose

    def spy(running):
        real(running)
        proposals.append((len(running), sum(bool(r.spec_token_ids) for r in running)))
    llm.engine.spec.propose = spy
    # 12 requests, 3 of which run 3x longer: the batch falls to 3 for the last stretch
    params = [SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS * (3 if i < 3 else 1), ignore_eos=True)
              for i in range(len(prompts))]
    llm.generate(prompts, params, use_tqdm=False)
    assert all(n == 0 for running, n in proposals if running > 4)
    assert any(n > 0 for running, n in proposals if running <= 4)


# ---- sampling follows the target distribution ---------------------------------------------
SMALL_VOCAB = 6


@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory):
    """A tiny Llama with 6 tokens (its 4-token continuations: ~40 cells with >= 5 expected in 4,000)."""
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import _tiny_tokenizer, tiny_config
    folder = tmp_path_factory.mktemp("tiny-6-vocab")
    torch.manual_seed(3)
    cfg = tiny_config("llama")
    cfg.vocab_size = SMALL_VOCAB
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    model.save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    return folder, model


@torch.inference_mode()
def _joint_probs(model, prompt: list[int], length: int) -> dict[tuple[int, ...], float]:
    """Exact probability of every continuation of `length` tokens (temperature 1)."""
    out: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(length):
        nxt = {}
        for seq, p in out.items():
            probs = torch.softmax(model(torch.tensor([prompt + list(seq)])).logits[0, -1].double(), -1)
            for t in range(SMALL_VOCAB):
                nxt[seq + (t,)] = p * float(probs[t])
        out = nxt
    return out


class FixedProposer(Proposer):
    name = "fixed"

    def __init__(self, drafts):
        self.drafts = drafts

    def propose(self, request, k):
        return list(self.drafts[:k])

    def propose_tree(self, request, k, width):    # the drafts, and a sibling for each of them
        return tree.build([self.drafts[:k], [(t + 1) % SMALL_VOCAB for t in self.drafts[:k]]][:width])


@pytest.mark.parametrize("tree_width", [1, 2])
def test_sampled_outputs_follow_the_target_distribution(small_vocab_model, tree_width):
    """Chi-square test of the 4 sampled tokens against their exact joint distribution, with
    2 drafts per step that are sometimes both accepted, sometimes one, sometimes none (with a
    token tree: two branches of 2). A rule that accepted drafts too often (or corrected from
    the wrong distribution) fails it."""
    folder, model = small_vocab_model
    prompt = [1, 4, 3, 5]
    length = 4
    probs = _joint_probs(model, prompt, length)
    best = max(probs, key=probs.get)
    drafts = [best[1], best[2]]                   # likely, but far from always right
    llm = _llm(folder, speculative="ngram", num_speculative_tokens=2, speculative_max_batch=100000, seed=11,
               speculative_tree_width=tree_width)
    llm.engine.spec.proposer = FixedProposer(drafts)
    n = 4000
    params = SamplingParams(temperature=1.0, max_tokens=length, ignore_eos=True)
    outs = llm.generate([prompt] * n, params, use_tqdm=False)
    counts: dict[tuple[int, ...], int] = {}
    for o in outs:
        key = tuple(o.outputs[0].token_ids)
        counts[key] = counts.get(key, 0) + 1
    stats = llm.engine.spec.stats
    assert stats.num_steps >= n and 0 < stats.num_accepted < stats.num_proposed
    assert stats.mean_accepted_length > 1.2
    # cells with expected count >= 5; the rest pooled into one cell
    chi2, dof, pooled_obs, pooled_exp = 0.0, -1, 0, 0.0
    for key, p in probs.items():
        exp = n * p
        if exp >= 5:
            chi2 += (counts.get(key, 0) - exp) ** 2 / exp
            dof += 1
        else:
            pooled_obs += counts.get(key, 0)
            pooled_exp += exp
    if pooled_exp > 0:
        chi2 += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        dof += 1
    # 99.9th percentile of chi-square(dof), Wilson-Hilferty approximation
    z = 3.09
    crit = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    assert dof >= 10 and chi2 < crit, f"chi2 {chi2:.1f} >= {crit:.1f} with {dof} dof"
    # the test has power: the same counts with 1 sample in 8 moved onto the drafted
    # continuation (as an over-accepting rule would do) fail it
    moved = n // 8
    rest = n - counts.get(best, 0)
    biased = {k: c * (rest - moved) / rest for k, c in counts.items() if k != best}
    biased[best] = counts.get(best, 0) + moved
    chi2_b = sum((biased.get(k, 0) - n * p) ** 2 / (n * p) for k, p in probs.items() if n * p >= 5)
    assert chi2_b > crit


# ---- draft models ---------------------------------------------------------------------------
def test_draft_model_equal_to_the_target_is_always_accepted(tiny):
    folder, model = tiny
    prompts = _prompts()
    llm = _llm(folder, speculative=f"draft:{folder}", num_speculative_tokens=3, speculative_max_batch=64)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == hf_greedy(model, p, MAX_TOKENS)
    stats = llm.engine.spec.stats
    assert stats.num_proposed > 0 and stats.num_accepted == stats.num_proposed
    proposer = llm.engine.spec.proposer
    # one draft forward per draft position for the whole batch, not per request
    assert proposer.num_forwards <= 3 * llm.engine.num_steps
    assert not proposer.shadows and proposer.kv.num_free_blocks == proposer.kv.pool.num_usable_blocks


def test_a_different_draft_model_and_self_int4_keep_outputs_exact(tiny, tmp_path):
    folder, model = tiny
    other = tmp_path / "other"
    make_tiny_model("llama" if "llama" not in str(folder) else "gemma3", other, seed=5)
    prompts = _prompts()
    with pytest.raises(ValueError, match="vocabulary"):
        bad = tmp_path / "bad"
        from transformers import AutoModelForCausalLM

        from tests.tiny_models import _tiny_tokenizer, tiny_config
        cfg = tiny_config("llama")
        cfg.vocab_size = 100
        AutoModelForCausalLM.from_config(cfg).save_pretrained(bad)
        _tiny_tokenizer().save_pretrained(bad)
        _llm(folder, speculative=f"draft:{bad}")
    for method in (f"draft:{other}", "self-int4"):
        llm = _llm(folder, speculative=method, num_speculative_tokens=4, speculative_max_batch=64,
                   num_kv_blocks=12, max_num_batched_tokens=40)      # a small pool, chunked prompts
        outs = llm.generate(prompts, GREEDY, use_tqdm=False)
        for p, o in zip(prompts, outs):
            assert o.outputs[0].token_ids == hf_greedy(model, p, MAX_TOKENS), method
        assert llm.engine.spec.stats.num_proposed > 0
        if method == "self-int4":   # every linear layer borrows the target's for big calls
            assert llm.engine.spec.proposer.num_borrowed == 4 * llm.engine.runner.num_layers
