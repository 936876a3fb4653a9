"""Batched logits transformations used by :class:`heron.sample.sampler.Sampler`.

Every function works on a whole batch at once: per-row parameters are gathered into
small tensors and applied with masked ops, so the cost does not depend on a Python loop
over the vocabulary, and rows that don't use a stage cost nothing beyond building the
parameter lists. Functions that take ``logits`` modify it in place (the sampler owns a
float32 copy) and expect ``rows`` to line up with the logits' first dimension.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import chain
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from heron.sample.sampler import SamplingRow

_NEG_INF = float("-inf")
# Candidate counts tried in turn by the top-p fast path before a full sort.
_TOP_P_CANDIDATES = (1024, 16384)


def apply_logit_bias(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Add each row's ``params.logit_bias`` to its logits (ids outside the vocab ignored)."""
    vocab = logits.shape[1]
    row_idx: list[int] = []
    tok_idx: list[int] = []
    values: list[float] = []
    for i, row in enumerate(rows):
        bias = row.params.logit_bias
        if not bias:
            continue
        for tok, value in bias.items():
            # why: out-of-range ids are rejected at request admission
            # (SamplingParams.verify_vocab_size); never fail a whole batch here.
            if 0 <= tok < vocab:
                row_idx.append(i)
                tok_idx.append(tok)
                values.append(value)
    if not row_idx:
        return
    dev = logits.device
    logits.index_put_(
        (torch.tensor(row_idx, device=dev), torch.tensor(tok_idx, device=dev)),
        torch.tensor(values, dtype=logits.dtype, device=dev),
        accumulate=True,
    )


def apply_min_tokens(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Mask EOS and ``stop_token_ids`` while a row has fewer than ``min_tokens`` outputs.

    The EOS ids are masked even with ``ignore_eos`` (vLLM puts the model's EOS into
    ``all_stop_token_ids`` regardless), so ``min_tokens`` always means "no EOS before".
    """
    vocab = logits.shape[1]
    row_idx: list[int] = []
    tok_idx: list[int] = []
    for i, row in enumerate(rows):
        params = row.params
        if params.min_tokens <= 0 or len(row.output_token_ids) >= params.min_tokens:
            continue
        banned = set(row.eos_token_ids)
        banned.update(params.stop_token_ids or ())
        for tok in banned:
            if 0 <= tok < vocab:
                row_idx.append(i)
                tok_idx.append(tok)
    if not row_idx:
        return
    dev = logits.device
    logits.index_put_(
        (torch.tensor(row_idx, device=dev), torch.tensor(tok_idx, device=dev)),
        torch.tensor(_NEG_INF, dtype=logits.dtype, device=dev),
    )


def _flat_indices(
    seqs: list[Sequence[int]], rows: list[int], vocab: int, device: torch.device
) -> torch.Tensor:
    """Flat indices ``row * vocab + token`` into a contiguous [R, V] tensor, for every token.

    Built without a per-row tensor op: the id lists are chained into one tensor and the
    row index of each entry comes from ``repeat_interleave``.
    """
    lengths = [len(s) for s in seqs]
    toks = torch.tensor(list(chain.from_iterable(seqs)), dtype=torch.long, device=device)
    row_of = torch.repeat_interleave(
        torch.tensor(rows, dtype=torch.long, device=device),
        torch.tensor(lengths, dtype=torch.long, device=device),
    )
    # why: an id outside [0, vocab) would index another row (or out of bounds); drop it.
    valid = (toks >= 0) & (toks < vocab)
    return (row_of * vocab + toks)[valid]


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Repetition, frequency and presence penalties for the rows that set any.

    * repetition (HF/CTRL, as in vLLM): for tokens seen in prompt + output, positive
      logits are divided by the penalty and negative ones multiplied by it;
    * frequency (OpenAI): ``logit -= frequency_penalty * count_in_output``;
    * presence (OpenAI): ``logit -= presence_penalty * (count_in_output > 0)``.

    Works on the flat (row, token) indices of the penalised rows' tokens only, not on dense
    [R, V] count tensors: O(number of tokens) instead of O(R * V), which matters with a
    262k vocabulary on CPU (dense count + ``where`` passes cost tens of ms per step).
    Frequency counts come for free from ``index_add_`` accumulating duplicate indices;
    presence and repetition use the unique indices. ``logits`` must be contiguous.
    """
    sel = [i for i, row in enumerate(rows) if row.params.has_penalties]
    if not sel:
        return
    vocab = logits.shape[1]
    dev, dtype = logits.device, logits.dtype
    flat = logits.view(-1)  # a view: in-place updates below land in `logits`
    # Per-row parameter tables indexed by (flat index // vocab).
    rep_l = [1.0] * len(rows)
    freq_l = [0.0] * len(rows)
    pres_l = [0.0] * len(rows)
    for i in sel:
        p = rows[i].params
        rep_l[i] = p.repetition_penalty
        freq_l[i] = p.frequency_penalty
        pres_l[i] = p.presence_penalty

    out_idx = _flat_indices([rows[i].output_token_ids for i in sel], sel, vocab, dev)

    rep_rows = [i for i in sel if rep_l[i] != 1.0]
    if rep_rows:
        prompts = [rows[i].prompt_token_ids for i in rep_rows]
        prompt_idx = _flat_indices(prompts, rep_rows, vocab, dev)
        seen = torch.unique(torch.cat([prompt_idx, out_idx]))
        rep_t = torch.tensor(rep_l, dtype=dtype, device=dev)[seen // vocab]
        vals = flat[seen]
        # Rows without a repetition penalty have rep = 1.0 here: a no-op for them.
        flat[seen] = torch.where(vals > 0, vals / rep_t, vals * rep_t)

    if any(freq_l[i] != 0.0 for i in sel) and out_idx.numel():
        freq_t = torch.tensor(freq_l, dtype=dtype, device=dev)
        flat.index_add_(0, out_idx, -freq_t[out_idx // vocab])
    if any(pres_l[i] != 0.0 for i in sel) and out_idx.numel():
        uniq_out = torch.unique(out_idx)
        pres_t = torch.tensor(pres_l, dtype=dtype, device=dev)
        flat.index_add_(0, uniq_out, -pres_t[uniq_out // vocab])


def apply_top_k(logits: torch.Tensor, top_k: Sequence[int]) -> None:
    """Keep each row's ``top_k`` largest logits (0 = disabled); ties at the k-th value are kept.

    Uses ``topk`` with the largest requested k instead of a full sort: k is usually small.
    """
    vocab = logits.shape[1]
    ks = [min(k, vocab) if k > 0 else 0 for k in top_k]
    k_max = max(ks)
    if k_max == 0:
        return
    dev = logits.device
    top_vals = logits.topk(k_max, dim=-1).values  # [S, k_max], best first
    k_t = torch.tensor([max(k, 1) for k in ks], device=dev)
    thresh = top_vals.gather(1, (k_t - 1).unsqueeze(1))
    if 0 in ks:  # disabled rows keep everything
        disabled = torch.tensor([k == 0 for k in ks], device=dev).unsqueeze(1)
        thresh = thresh.masked_fill(disabled, _NEG_INF)
    logits.masked_fill_(logits < thresh, _NEG_INF)


def apply_top_p(logits: torch.Tensor, top_p: Sequence[float]) -> None:
    """Nucleus filter: keep the smallest set of tokens whose probability sums to >= top_p.

    The set is "every token at least as likely as the token where the descending
    cumulative probability first reaches top_p" (ties at that boundary are all kept, as
    with top-k); the most likely token is always kept.

    Fast path: a full sort of a 262k vocabulary costs ~15-25 ms per row on CPU, but the
    nucleus is usually much smaller, so look at the most likely ``_TOP_P_CANDIDATES[0]``
    tokens (``topk``), then at more for the rows whose nucleus did not fit, and only sort
    the whole vocabulary for rows whose nucleus is larger still.
    """
    if all(p >= 1.0 for p in top_p):
        return
    dev = logits.device
    probs = logits.softmax(dim=-1)
    p_t = torch.tensor(top_p, dtype=probs.dtype, device=dev)
    vocab = probs.shape[1]
    thresh = torch.zeros(probs.shape[0], 1, dtype=probs.dtype, device=dev)
    # Rows with top_p == 1 keep everything (threshold 0); the others are still pending.
    pending = (p_t < 1.0).nonzero().squeeze(1)
    for num_cand in (*_TOP_P_CANDIDATES, vocab):
        num_cand = min(num_cand, vocab)
        sub = probs[pending]
        if num_cand < vocab:
            cand = sub.topk(num_cand, dim=-1).values  # [P, C], descending
        else:
            cand = sub.sort(dim=-1, descending=True).values
        row_thresh, reached = _nucleus_threshold(cand, p_t[pending])
        if num_cand == vocab:
            reached[:] = True  # the whole vocabulary: nothing left to look at
        thresh[pending[reached]] = row_thresh[reached]
        pending = pending[~reached]
        if pending.numel() == 0:
            break
    logits.masked_fill_(probs < thresh, _NEG_INF)


def _nucleus_threshold(
    sorted_probs: torch.Tensor, p_t: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the probability of the last token needed to reach top_p ([S, 1]), and
    whether ``sorted_probs`` (descending, possibly truncated) reached top_p at all."""
    cum = sorted_probs.cumsum(dim=-1)
    # number of tokens whose preceding mass (cum - own prob) is still < top_p
    num_keep = ((cum - sorted_probs) < p_t.unsqueeze(1)).sum(dim=-1, keepdim=True)
    num_keep.clamp_(min=1, max=sorted_probs.shape[1])
    reached = cum[:, -1] >= p_t
    return sorted_probs.gather(1, num_keep - 1), reached


def apply_min_p(logits: torch.Tensor, min_p: Sequence[float]) -> None:
    """Drop tokens whose probability is below ``min_p`` times the row's top probability.

    Done in logit space: p / p_max = exp(l - l_max), so the test is l < l_max + log(min_p);
    no softmax needed. min_p = 0 gives log(0) = -inf, which masks nothing.
    """
    if all(p <= 0.0 for p in min_p):
        return
    dev = logits.device
    log_min_p = torch.tensor(
        [math.log(p) if p > 0.0 else _NEG_INF for p in min_p], dtype=logits.dtype, device=dev
    ).unsqueeze(1)
    max_logit = logits.max(dim=-1, keepdim=True).values
    logits.masked_fill_(logits < max_logit + log_min_p, _NEG_INF)
