"""Sampler: greedy, seeded reproducibility, filters, penalties, bias, min_tokens, logprobs."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from heron.sample import Sampler, SamplingRow, compute_prompt_logprobs
from heron.sample.logits_processors import apply_logit_bias, apply_min_tokens, apply_penalties
from heron.sampling_params import SamplingParams

V = 32
EOS = frozenset({2})


def row(
    params: SamplingParams | None = None,
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    seed: int | None = None,
) -> SamplingRow:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return SamplingRow(params or SamplingParams(), prompt or [1, 3], output or [], EOS, gen)


@pytest.fixture
def sampler() -> Sampler:
    return Sampler()


def test_greedy_is_argmax(sampler: Sampler) -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, V)
    rows = [row(SamplingParams(temperature=0.0)) for _ in range(6)]
    out = sampler(logits, rows)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 6
    # bf16 input and top_k == 1 take the same path
    out = sampler(logits.bfloat16(), [row(SamplingParams(top_k=1)) for _ in range(6)])
    assert out.token_ids == logits.bfloat16().float().argmax(-1).tolist()


def test_does_not_modify_input(sampler: Sampler) -> None:
    logits = torch.randn(2, V)
    before = logits.clone()
    params = SamplingParams(
        top_k=5, top_p=0.5, min_p=0.1, repetition_penalty=1.5, logit_bias={4: 3.0}, min_tokens=3
    )
    sampler(logits, [row(params, output=[4, 5]), row(SamplingParams(temperature=0))])
    assert torch.equal(logits, before)


def test_mixed_greedy_and_sampled_rows(sampler: Sampler) -> None:
    logits = torch.randn(4, V)
    logits[1] = -1e9
    logits[1, 7] = 0.0  # sampled row with only one possible token
    rows = [row(SamplingParams(temperature=0)), row(), row(SamplingParams(top_k=1)), row()]
    logits[3] = -1e9
    logits[3, 9] = 0.0
    out = sampler(logits, rows)
    assert out.token_ids[0] == int(logits[0].argmax())
    assert out.token_ids[1] == 7
    assert out.token_ids[2] == int(logits[2].argmax())
    assert out.token_ids[3] == 9


def _draw_seq(sampler: Sampler, logits: torch.Tensor, batch_rows, target_index: int, steps: int):
    tokens = []
    for _ in range(steps):
        tokens.append(sampler(logits, batch_rows).token_ids[target_index])
    return tokens


def test_seeded_reproducible_and_batch_independent(sampler: Sampler) -> None:
    torch.manual_seed(1)
    base = torch.randn(V) * 0.5  # flat-ish distribution: many different tokens likely
    params = SamplingParams(temperature=1.0, seed=1234)

    alone = [row(params, seed=1234)]
    seq_alone = _draw_seq(sampler, base.unsqueeze(0), alone, 0, 20)
    again = _draw_seq(sampler, base.unsqueeze(0), [row(params, seed=1234)], 0, 20)
    assert seq_alone == again
    assert len(set(seq_alone)) > 3  # it is actually random

    # Same request at index 3 of a batch of 6 with other seeded/unseeded/greedy rows.
    others = [
        row(SamplingParams(seed=1), seed=1),
        row(SamplingParams()),
        row(SamplingParams(temperature=0)),
        row(SamplingParams(top_k=5, seed=99), seed=99),
        row(SamplingParams(top_p=0.5)),
    ]
    batch = others[:3] + [row(params, seed=1234)] + others[3:]
    logits = torch.randn(6, V)
    logits[3] = base
    assert _draw_seq(sampler, logits, batch, 3, 20) == seq_alone

    # A different seed gives a different sequence.
    other_seed = _draw_seq(sampler, base.unsqueeze(0), [row(params, seed=4321)], 0, 20)
    assert other_seed != seq_alone


def _frequencies(sampler: Sampler, logits: torch.Tensor, params: SamplingParams, n: int) -> Counter:
    """Draw n samples in one batch of n identical rows (unseeded: one batched draw)."""
    batch = logits.unsqueeze(0).expand(n, -1).contiguous()
    return Counter(sampler(batch, [row(params) for _ in range(n)]).token_ids)


def test_temperature_distribution_matches_softmax(sampler: Sampler) -> None:
    torch.manual_seed(2)
    logits = torch.tensor([1.0, 0.5, -0.2, 0.3])
    n = 6000
    for temp in (1.0, 0.5, 2.0):
        counts = _frequencies(sampler, logits, SamplingParams(temperature=temp), n)
        expected = torch.softmax(logits / temp, -1)
        for tok in range(4):
            p = float(expected[tok])
            sd = math.sqrt(p * (1 - p) / n)
            assert abs(counts[tok] / n - p) < 5 * sd + 1e-3, (temp, tok, counts)


def test_top_k_mask(sampler: Sampler) -> None:
    torch.manual_seed(3)
    logits = torch.tensor([3.0, 2.9, 2.8, 0.0, -1.0, 2.7, -2.0, 1.0])
    counts = _frequencies(sampler, logits, SamplingParams(top_k=3), 3000)
    assert set(counts) == {0, 1, 2}


def test_top_p_mask(sampler: Sampler) -> None:
    torch.manual_seed(4)
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    logits = probs.log()
    # cumulative: 0.4, 0.7, 0.85 -> smallest set reaching 0.8 is {0, 1, 2}
    counts = _frequencies(sampler, logits, SamplingParams(top_p=0.8), 3000)
    assert set(counts) == {0, 1, 2}
    # tiny top_p keeps only the top token
    counts = _frequencies(sampler, logits, SamplingParams(top_p=0.01), 200)
    assert set(counts) == {0}
    # renormalised within the nucleus
    counts = _frequencies(sampler, logits, SamplingParams(top_p=0.8), 6000)
    assert abs(counts[0] / 6000 - 0.4 / 0.85) < 0.05


def test_min_p_mask(sampler: Sampler) -> None:
    torch.manual_seed(5)
    probs = torch.tensor([0.5, 0.3, 0.12, 0.05, 0.03])
    # min_p = 0.2 -> threshold 0.1: keep {0, 1, 2}
    counts = _frequencies(sampler, probs.log(), SamplingParams(min_p=0.2), 3000)
    assert set(counts) == {0, 1, 2}


def test_filters_combined_per_row(sampler: Sampler) -> None:
    """Different filters in one batch apply to their own rows only."""
    torch.manual_seed(6)
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    params = [SamplingParams(top_k=2), SamplingParams(top_p=0.8), SamplingParams(min_p=0.3),
              SamplingParams()]
    allowed = [{0, 1}, {0, 1, 2}, {0, 1, 2}, {0, 1, 2, 3, 4}]
    reps = 800
    logits = probs.log().expand(4 * reps, -1).contiguous()
    rows = [row(params[i % 4]) for i in range(4 * reps)]
    tokens = sampler(logits, rows).token_ids
    for i in range(4):
        assert set(tokens[i::4]) == allowed[i]


def _reference_penalties(logits: torch.Tensor, r: SamplingRow) -> torch.Tensor:
    """Straightforward per-row loops over tokens (the spec)."""
    out = logits.clone()
    p = r.params
    counts = Counter(r.output_token_ids)
    seen = set(r.prompt_token_ids) | set(r.output_token_ids)
    for tok in range(out.shape[0]):
        x = float(out[tok])
        if tok in seen:
            x = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
        x -= p.frequency_penalty * counts[tok]
        x -= p.presence_penalty * (1.0 if counts[tok] > 0 else 0.0)
        out[tok] = x
    return out


def test_penalties_match_reference() -> None:
    torch.manual_seed(7)
    rows = [
        row(SamplingParams(repetition_penalty=1.3), prompt=[1, 5, 5, 9], output=[9, 10, 10]),
        row(SamplingParams(), prompt=[1, 2, 3], output=[4, 4]),  # no penalties: untouched
        row(SamplingParams(frequency_penalty=0.7), prompt=[0, 1], output=[3, 3, 3, 6]),
        row(SamplingParams(presence_penalty=-1.5), prompt=[11], output=[12, 12, 13]),
        row(
            SamplingParams(repetition_penalty=0.8, frequency_penalty=-0.4, presence_penalty=1.1),
            prompt=[20, 21],
            output=[21, 22, 22, 23, 22],
        ),
        row(SamplingParams(repetition_penalty=2.0), prompt=[7], output=[]),  # prompt only
    ]
    logits = torch.randn(len(rows), V) * 3
    work = logits.clone()
    apply_penalties(work, rows)
    for i, r in enumerate(rows):
        torch.testing.assert_close(work[i], _reference_penalties(logits[i], r))
    assert torch.equal(work[1], logits[1])


def test_penalties_steer_sampling(sampler: Sampler) -> None:
    logits = torch.zeros(1, V)
    logits[0, 5] = 1.0
    logits[0, 6] = 0.9
    r = row(SamplingParams(temperature=0, frequency_penalty=0.2), output=[5])
    assert sampler(logits, [r]).token_ids == [6]
    r = row(SamplingParams(temperature=0, repetition_penalty=1.2), prompt=[5])
    assert sampler(logits, [r]).token_ids == [6]


def test_logit_bias(sampler: Sampler) -> None:
    logits = torch.zeros(2, V)
    logits[:, 0] = 5.0
    rows = [
        row(SamplingParams(temperature=0, logit_bias={7: 6.0, 0: -1.0, 10_000: 50.0})),
        row(SamplingParams(temperature=0)),
    ]
    work = logits.clone()
    apply_logit_bias(work, rows)
    assert work[0, 7] == 6.0 and work[0, 0] == 4.0  # out-of-vocab id ignored
    assert torch.equal(work[1], logits[1])
    assert sampler(logits, rows).token_ids == [7, 0]
    # -100 effectively bans a token even when sampling
    counts = _frequencies(sampler, torch.zeros(4), SamplingParams(logit_bias={1: -100}), 2000)
    assert set(counts) == {0, 2, 3}


def test_min_tokens_masks_eos_and_stop_ids(sampler: Sampler) -> None:
    logits = torch.zeros(3, V)
    logits[:, 2] = 10.0  # EOS is the favourite
    logits[:, 8] = 9.0  # then a stop token id
    logits[:, 4] = 8.0
    params = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[8])
    rows = [
        row(params, output=[5]),  # below min_tokens: EOS and 8 masked
        row(params, output=[5, 5, 5]),  # reached: no masking
        row(SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[8], ignore_eos=True),
            output=[]),
    ]
    work = logits.clone()
    apply_min_tokens(work, rows)
    assert work[0, 2] == -math.inf and work[0, 8] == -math.inf
    assert torch.equal(work[1], logits[1])
    assert sampler(logits, rows).token_ids == [4, 2, 4]
    # sampled rows never produce a masked token
    r = [row(SamplingParams(min_tokens=2, stop_token_ids=[8]), output=[1]) for _ in range(500)]
    tokens = sampler(logits[:1].expand(500, -1), r).token_ids
    assert 2 not in tokens and 8 not in tokens


def test_logprobs_from_raw_logits(sampler: Sampler) -> None:
    torch.manual_seed(8)
    logits = torch.randn(3, V) * 2
    rows = [
        row(SamplingParams(temperature=0, logprobs=5, repetition_penalty=1.5), prompt=[1]),
        row(SamplingParams()),  # no logprobs
        row(SamplingParams(temperature=0.8, logprobs=0, seed=3), seed=3),
    ]
    out = sampler(logits.bfloat16(), rows)
    raw = torch.log_softmax(logits.bfloat16().float(), -1)
    assert out.logprobs[1] is None
    for i in (0, 2):
        lp = out.logprobs[i]
        tok = out.token_ids[i]
        assert lp.token_id == tok
        assert lp.logprob == pytest.approx(float(raw[i, tok]), abs=1e-6)
        assert lp.rank == 1 + int((raw[i] > raw[i, tok]).sum())
    top = out.logprobs[0].top
    assert len(top) == 5 and out.logprobs[2].top == []
    assert [t for t, _ in top] == raw[0].topk(5).indices.tolist()
    assert [v for _, v in top] == pytest.approx(raw[0].topk(5).values.tolist(), abs=1e-6)
    assert all(a[1] >= b[1] for a, b in zip(top, top[1:]))


def test_logprobs_rank_of_greedy_token_is_one(sampler: Sampler) -> None:
    logits = torch.randn(2, V)
    out = sampler(logits, [row(SamplingParams(temperature=0, logprobs=1)) for _ in range(2)])
    assert [lp.rank for lp in out.logprobs] == [1, 1]
    assert [lp.top[0][0] for lp in out.logprobs] == out.token_ids


def test_compute_prompt_logprobs() -> None:
    torch.manual_seed(9)
    logits = torch.randn(5, V)
    targets = [3, 1, 4, 1, 5]
    out = compute_prompt_logprobs(logits, targets, k=2)
    raw = torch.log_softmax(logits, -1)
    assert len(out) == 5
    for t, entry in enumerate(out):
        assert entry.token_id == targets[t]
        assert entry.logprob == pytest.approx(float(raw[t, targets[t]]), abs=1e-6)
        assert entry.rank == 1 + int((raw[t] > raw[t, targets[t]]).sum())
        assert [tok for tok, _ in entry.top] == raw[t].topk(2).indices.tolist()
    with pytest.raises(ValueError):
        compute_prompt_logprobs(logits, targets[:3], k=0)


def test_empty_batch(sampler: Sampler) -> None:
    out = sampler(torch.empty(0, V), [])
    assert out.token_ids == [] and out.logprobs == []


def _reference_top_p_keep(row_logits: torch.Tensor, p: float) -> set[int]:
    probs = torch.softmax(row_logits.double(), -1)
    order = probs.argsort(descending=True).tolist()
    keep, total = set(), 0.0
    for tok in order:
        keep.add(tok)
        total += float(probs[tok])
        if total >= p:
            break
    return keep


@pytest.mark.parametrize("candidates", [(1024, 16384), (4, 64), (2,)])
def test_top_p_candidate_cascade_matches_full_sort(monkeypatch, candidates) -> None:
    """The topk fast path and its fallbacks give the same nucleus as a full sort."""
    import heron.sample.logits_processors as lp

    monkeypatch.setattr(lp, "_TOP_P_CANDIDATES", candidates)
    torch.manual_seed(10)
    vocab = 512
    scales = [0.1, 0.5, 1.0, 3.0, 10.0, 30.0]  # from flat (huge nucleus) to peaked
    logits = torch.cat([torch.randn(1, vocab) * s for s in scales])
    top_p = [0.9, 0.5, 0.95, 0.3, 0.99, 1.0]
    work = logits.clone()
    lp.apply_top_p(work, top_p)
    for i, p in enumerate(top_p):
        kept = set(torch.isfinite(work[i]).nonzero().squeeze(1).tolist())
        expected = set(range(vocab)) if p >= 1.0 else _reference_top_p_keep(logits[i], p)
        assert kept == expected, (i, p, len(kept), len(expected))


def test_inverse_cdf_draw_never_picks_zero_probability_tokens():
    from heron.sample.sampler import Sampler
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]] * 4000 + [[0.0, 0.0, 0.0, 1.0, 0.0]] * 10)
    gens = [None] * 2000 + [torch.Generator().manual_seed(i) for i in range(2010)]
    tokens = Sampler._draw(probs, gens)
    counts = torch.bincount(tokens, minlength=5).tolist()
    assert counts[0] == counts[2] == counts[4] == 0
    assert abs(counts[1] - 2000) < 200 and counts[3] == 4010 - counts[1]
    # a seeded row draws one number from its own generator: same seed, same token
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    p = torch.softmax(torch.randn(1, 262144), -1)
    assert Sampler._draw(p, [g1]).item() == Sampler._draw(p.clone(), [g2]).item()


@pytest.mark.parametrize("vocab", [5, 1024, 3000, 262144])
def test_two_level_inverse_cdf_equals_float64_reference(vocab):
    from heron.sample.sampler import _inverse_cdf
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(16, vocab, generator=g) * 4
    logits[:, ::3] = float("-inf")  # masked tokens
    probs = torch.softmax(logits, -1)
    u = torch.rand(16, 1, dtype=torch.float64, generator=g)
    u[0] = 0.0                       # r = total: the last positive token
    u[1] = 1.0 - 1e-12               # r just above 0: the first positive token
    cdf = torch.cumsum(probs.double(), -1)
    ref = torch.searchsorted(cdf, (1.0 - u) * cdf[:, -1:]).squeeze(1)
    got = _inverse_cdf(probs, u)
    # ordinary draws agree exactly; at the extremes (u = 0: r = total) a token of probability
    # ~1e-8 can be absorbed by float32 rounding inside its 1024-token chunk, so there only
    # the guarantee that a positive-probability token is chosen is checked
    assert torch.equal(got[2:], ref[2:])
    assert bool((probs.gather(1, got[:, None]) > 0).all())


def test_row_chunks_give_the_whole_batch_result(monkeypatch, sampler: Sampler) -> None:
    """Large non-greedy batches are sampled in row chunks (bounded float32 temporaries);
    seeded, greedy-with-bias, penalised and logprob rows must come out as one call gives."""
    import heron.sample.sampler as sampler_mod

    torch.manual_seed(3)
    logits = torch.randn(11, V).bfloat16()
    specs = [
        SamplingParams(seed=7), SamplingParams(temperature=0, logit_bias={5: 4.0}),
        SamplingParams(top_k=4, seed=8, logprobs=2), SamplingParams(temperature=0, logprobs=3),
        SamplingParams(top_p=0.7, seed=9), SamplingParams(repetition_penalty=1.3, seed=10),
        SamplingParams(temperature=0.5, min_p=0.05, seed=11), SamplingParams(temperature=0),
        SamplingParams(min_tokens=4, seed=12), SamplingParams(seed=13, logprobs=1),
        SamplingParams(temperature=0, presence_penalty=0.5),
    ]

    def rows_() -> list[SamplingRow]:
        return [row(p, output=[4, 5], seed=p.seed) for p in specs]

    whole = sampler(logits, rows_())
    calls = []
    real_call = Sampler.__call__

    def counting(self, lg, rs):
        calls.append(lg.shape[0])
        return real_call(self, lg, rs)

    monkeypatch.setattr(sampler_mod, "_SAMPLE_CHUNK_BYTES", 3 * 4 * V)  # 3 rows a chunk
    monkeypatch.setattr(Sampler, "__call__", counting)
    chunked = sampler(logits, rows_())
    assert calls == [11, 3, 3, 3, 2]  # it really split
    assert chunked.token_ids == whole.token_ids
    for a, b in zip(chunked.logprobs, whole.logprobs):
        assert (a is None) == (b is None)
        if a is not None:
            assert (a.token_id, a.rank, [t for t, _ in a.top]) == (b.token_id, b.rank, [t for t, _ in b.top])
            assert a.logprob == pytest.approx(b.logprob, abs=1e-6)
    # A plain greedy batch stays one argmax call, unsplit.
    calls.clear()
    sampler(logits, [row(SamplingParams(temperature=0)) for _ in range(11)])
    assert calls == [11]
