"""Vectorised token sampler: logits [R, V] + per-row params -> one token per row.

Processing order (vLLM / HF semantics):

1. logprobs, when any row asks, from the *raw* logits (``log_softmax`` in float32 before
   any processing: vLLM's default ``logprobs_mode="raw_logprobs"``);
2. ``logit_bias``;
3. ``min_tokens``: EOS + ``stop_token_ids`` -> -inf while too few tokens were generated;
4. repetition / frequency / presence penalties;
5. greedy rows: argmax. Sampling rows: / temperature, top-k, top-p, min-p, then one draw
   with the exponential race (see :meth:`Sampler._draw`).

Each stage is skipped entirely when no row needs it; a batch of plain greedy rows is just
one ``argmax`` over the raw logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from heron.sample.logits_processors import (
    apply_logit_bias,
    apply_min_p,
    apply_min_tokens,
    apply_penalties,
    apply_top_k,
    apply_top_p,
)
from heron.sampling_params import SamplingParams

# Rows of log_softmax materialised at once by compute_prompt_logprobs (bounds memory for
# long prompts with large vocabularies: 512 x 262k x 4 B = 512 MiB worst case).
_PROMPT_LOGPROBS_CHUNK = 256

# Bytes of float32 logits the non-greedy / logprobs stages work on at once. Every stage
# there makes [R, V] float32 temporaries (the working copy, softmax, cumulative sums,
# log_softmax); at 64 rows x 262k vocab each is 67 MB, above glibc's 32 MiB mmap threshold,
# so every one was a fresh mmap page-faulted in again (70-340 ms a step on this VM). In
# chunks of 16 rows (16 MiB) the temporaries come from the heap and stay warm: ~15 ms.
_SAMPLE_CHUNK_BYTES = 16 << 20


@dataclass(slots=True)
class SamplingRow:
    """One sampled position of one request in this step."""

    params: SamplingParams
    prompt_token_ids: list[int]
    # Tokens generated so far by this request, not including the one being sampled now.
    output_token_ids: list[int]
    # The model's EOS ids; masked while below min_tokens (stopping on them is the
    # scheduler's business and honours params.ignore_eos).
    eos_token_ids: frozenset[int]
    # Seeded per-request generator (on the logits' device); None -> the global RNG.
    generator: torch.Generator | None = None


@dataclass(slots=True)
class TokenLogprobs:
    """Logprob information for one position."""

    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token under the raw distribution
    top: list[tuple[int, float]]  # (token_id, logprob), best first; len = requested k


def greedy_argmax(logits: torch.Tensor) -> torch.Tensor:
    """First maximum of each row: heron's CPU kernel (vectorised, split over the vocabulary,
    any row/column-contiguous layout) when built, else ``max(dim=-1)``, which on CPU is ~3x
    faster than ``argmax`` over a 262k vocabulary and also returns the first maximum."""
    from heron.ops.cpu import argmax_rows
    ids = argmax_rows(logits)
    return ids if ids is not None else logits.max(dim=-1).indices


def _fix_min_tokens(logits: torch.Tensor, rows: list[SamplingRow], token_ids: torch.Tensor) -> torch.Tensor:
    """Greedy rows still under ``min_tokens`` must not pick EOS or a stop id. The unmasked
    argmax is already right unless it picked one of those, so only such rows are redone with
    the mask (exactly what masking every row first would give, without copying every row)."""
    chosen = token_ids.tolist()
    redo = []
    for i, row in enumerate(rows):
        p = row.params
        if p.min_tokens > len(row.output_token_ids):
            if chosen[i] in row.eos_token_ids or chosen[i] in (p.stop_token_ids or ()):
                redo.append(i)
    if not redo:
        return token_ids
    work = logits[redo].to(torch.float32)
    apply_min_tokens(work, [rows[i] for i in redo])
    token_ids = token_ids.clone()
    token_ids[redo] = work.argmax(dim=-1)
    return token_ids


@dataclass(slots=True)
class SamplerOutput:
    """Result of one :class:`Sampler` call, one entry per row."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]  # None where params.logprobs is None


def _logprob_entries(
    logprobs: torch.Tensor, token_ids: torch.Tensor, ks: list[int]
) -> list[TokenLogprobs]:
    """Chosen-token logprob, rank and top-k for each row of a [N, V] log-prob tensor."""
    chosen = logprobs.gather(1, token_ids.unsqueeze(1))  # [N, 1]
    # rank = 1 + number of tokens strictly more likely (vLLM's definition).
    ranks = (logprobs > chosen).sum(dim=1).add_(1)
    k_max = max(ks, default=0)
    if k_max > 0:
        top_vals, top_ids = logprobs.topk(min(k_max, logprobs.shape[1]), dim=-1)
        top_vals_l, top_ids_l = top_vals.tolist(), top_ids.tolist()
    else:
        top_vals_l = top_ids_l = [[] for _ in ks]
    out: list[TokenLogprobs] = []
    for tok, lp, rank, k, tv, ti in zip(
        token_ids.tolist(), chosen.squeeze(1).tolist(), ranks.tolist(), ks, top_vals_l, top_ids_l
    ):
        out.append(TokenLogprobs(tok, lp, rank, list(zip(ti[:k], tv[:k]))))
    return out


def compute_prompt_logprobs(
    logits: torch.Tensor, target_ids: list[int] | torch.Tensor, k: int
) -> list[TokenLogprobs]:
    """Logprobs of the actual next tokens of a prompt, plus the top-``k`` alternatives.

    ``logits[t]`` is the model's prediction for position t + 1, so ``target_ids[t]`` is the
    prompt token at t + 1. Raw ``log_softmax`` in float32, computed in chunks of rows.
    """
    targets = torch.as_tensor(target_ids, dtype=torch.long, device=logits.device).view(-1)
    if targets.numel() != logits.shape[0]:
        raise ValueError(
            f"target_ids has {targets.numel()} entries for {logits.shape[0]} logits rows"
        )
    out: list[TokenLogprobs] = []
    for start in range(0, logits.shape[0], _PROMPT_LOGPROBS_CHUNK):
        stop = start + _PROMPT_LOGPROBS_CHUNK
        lp = torch.log_softmax(logits[start:stop].float(), dim=-1)
        out.extend(_logprob_entries(lp, targets[start:stop], [k] * lp.shape[0]))
    return out


class Sampler:
    """Samples one token per row of a logits batch; see the module docstring for the order.

    Stateless: all per-request state (generated tokens, seeded generator) travels in the
    :class:`SamplingRow` objects, so the same instance serves every step.
    """

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        num_rows = len(rows)
        if logits.dim() != 2 or logits.shape[0] != num_rows:
            raise ValueError(
                f"logits must be [R, V] with R = len(rows) = {num_rows}, got {tuple(logits.shape)}"
            )
        if num_rows == 0:
            return SamplerOutput([], [])

        # One pass over the rows to decide which stages are needed at all.
        want_logprobs = want_bias = want_min_tokens = want_penalties = False
        all_greedy = True
        for row in rows:
            p = row.params
            want_logprobs |= p.logprobs is not None
            want_bias |= bool(p.logit_bias)
            want_min_tokens |= p.min_tokens > len(row.output_token_ids)
            want_penalties |= p.has_penalties
            all_greedy &= p.greedy

        hot_path = all_greedy and not (want_bias or want_penalties)
        if want_logprobs or not hot_path:
            chunk = max(1, _SAMPLE_CHUNK_BYTES // (4 * logits.shape[1]))
            if num_rows > chunk:
                # Rows are independent (a seeded row draws from its own generator), so the
                # chunks give the tokens the whole batch would have.
                token_list: list[int] = []
                lp_list: list[TokenLogprobs | None] = []
                for start in range(0, num_rows, chunk):
                    part = self(logits[start:start + chunk], rows[start:start + chunk])
                    token_list += part.token_ids
                    lp_list += part.logprobs
                return SamplerOutput(token_list, lp_list)

        raw_logprobs = None
        if want_logprobs:
            lp_rows = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
            raw = logits[lp_rows] if len(lp_rows) != num_rows else logits
            raw_logprobs = torch.log_softmax(raw.float().contiguous(), dim=-1)

        if hot_path:
            # Hot path: plain greedy decoding. float32 conversion is monotonic, so the first
            # maximum over the raw dtype is the same token, found without a copy.
            token_ids = greedy_argmax(logits)
            if want_min_tokens:
                token_ids = _fix_min_tokens(logits, rows, token_ids)
        else:
            # why copy: the stages below work in place and the caller's tensor (possibly
            # already float32) must not change.
            work = logits.to(dtype=torch.float32, memory_format=torch.contiguous_format, copy=True)
            if want_bias:
                apply_logit_bias(work, rows)
            if want_min_tokens:
                apply_min_tokens(work, rows)
            if want_penalties:
                apply_penalties(work, rows)
            token_ids = self._choose(work, rows, all_greedy)

        token_list = token_ids.tolist()
        lp_out: list[TokenLogprobs | None] = [None] * num_rows
        if raw_logprobs is not None:
            ks = [rows[i].params.logprobs for i in lp_rows]
            chosen = token_ids[lp_rows] if len(lp_rows) != num_rows else token_ids
            for i, entry in zip(lp_rows, _logprob_entries(raw_logprobs, chosen, ks)):
                lp_out[i] = entry
        return SamplerOutput(token_list, lp_out)

    # ------------------------------------------------------------------ helpers
    def _choose(
        self, logits: torch.Tensor, rows: list[SamplingRow], all_greedy: bool
    ) -> torch.Tensor:
        """Argmax for greedy rows, filtered random sampling for the others. -> [R] long."""
        if all_greedy:
            return greedy_argmax(logits)
        sample_idx = [i for i, r in enumerate(rows) if not r.params.greedy]
        if len(sample_idx) == len(rows):
            return self._sample(logits, rows)
        dev = logits.device
        token_ids = greedy_argmax(logits)  # greedy rows; sampled rows overwritten below
        idx_t = torch.tensor(sample_idx, device=dev)
        token_ids[idx_t] = self._sample(logits[idx_t], [rows[i] for i in sample_idx])
        return token_ids

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Temperature, top-k, top-p, min-p, then a draw; all rows here are non-greedy."""
        temps = [r.params.temperature for r in rows]
        if any(t != 1.0 for t in temps):  # skip a full [S, V] pass in the default case
            logits.div_(torch.tensor(temps, dtype=logits.dtype, device=logits.device).unsqueeze(1))
        apply_top_k(logits, [r.params.top_k for r in rows])
        apply_top_p(logits, [r.params.top_p for r in rows])
        apply_min_p(logits, [r.params.min_p for r in rows])
        probs = torch.softmax(logits, dim=-1)
        return self._draw(probs, [r.generator for r in rows])

    @staticmethod
    def _draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
        """One categorical draw per row by inverse-CDF sampling: one uniform number per row.

        The token is the first index whose cumulative probability reaches r = (1 - u) * total
        with u ~ Uniform[0, 1), so r is in (0, total] and a token of probability 0 (masked
        by top-k/top-p/min-p or by -inf logits) can never be chosen: its cumulative value
        equals its predecessor's. The cumulative sum is taken in float64 so that rounding
        over a 262k vocabulary does not shift the distribution measurably.

        Why not ``torch.multinomial`` or the exponential race (argmax p / E): both draw a
        number per vocabulary entry (or, for multinomial on CPU, are far slower); here a
        seeded request draws exactly one number per step from its own generator, so its
        tokens do not depend on the other rows of the batch or on its row index, and
        unseeded rows share one batched draw from the global RNG. On CPU this is ~6x
        cheaper than the race for 64 rows x 262k tokens (the uniform noise alone was ~90 ms).
        """
        num_rows = probs.shape[0]
        u = torch.empty(num_rows, 1, dtype=torch.float64, device=probs.device)
        seeded = [i for i, g in enumerate(generators) if g is not None]
        if len(seeded) < num_rows:
            u.uniform_()
        for i in seeded:
            u[i].uniform_(generator=generators[i])
        return _inverse_cdf(probs, u)


_CDF_CHUNK = 1024


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """First index whose cumulative probability reaches (1 - u) * total, per row.

    Two levels, for speed at float64-like accuracy: a float32 cumsum inside chunks of 1024
    tokens (error ~1e-4 of one chunk's mass) and a float64 cumsum over chunk totals
    (a full float64 cumsum over 262k tokens costs 3x more on CPU). Zero-probability tokens
    are never returned: the chosen chunk has positive mass, and inside it the target is
    clamped to (0, chunk total], so the first index reaching it has positive probability.
    """
    rows, vocab = probs.shape
    pad = (-vocab) % _CDF_CHUNK
    if pad:
        probs = torch.nn.functional.pad(probs, (0, pad))
    inner = torch.cumsum(probs.view(rows, -1, _CDF_CHUNK), dim=-1)          # [R, C, 1024] float32
    outer = torch.cumsum(inner[..., -1].double(), dim=-1)                    # [R, C] float64
    r = (1.0 - u) * outer[:, -1:]                                            # (0, total]
    chunk = torch.searchsorted(outer, r).clamp_(max=outer.shape[1] - 1)      # first chunk reaching r
    before = torch.where(chunk > 0, outer.gather(1, (chunk - 1).clamp(min=0)), torch.zeros_like(r))
    in_chunk = inner[torch.arange(rows, device=probs.device), chunk.squeeze(1)]  # [R, 1024]
    target = (r - before).float().clamp_(min=torch.finfo(torch.float32).tiny)
    target = torch.minimum(target, in_chunk[:, -1:])
    offset = torch.searchsorted(in_chunk, target).clamp_(max=_CDF_CHUNK - 1)
    return (chunk * _CDF_CHUNK + offset).squeeze(1).clamp_(max=vocab - 1)
