"""Prompt lookup / n-gram drafts (Saxena's prompt lookup decoding, vLLM's `ngram`): find the
longest recent earlier occurrence of the sequence's last n tokens (min_n <= n <= max_n) in the
prompt and the text generated so far, and propose the tokens that followed it.

Cost per proposal is bounded: an index from token id to the positions holding it is kept per
request and extended with the new tokens only, and at most MAX_CANDIDATES of the most recent
positions holding the last token are compared backwards.
"""
from __future__ import annotations

from heron.request import Request
from heron.spec import Proposer

MAX_CANDIDATES = 64


class _Index:
    __slots__ = ("positions", "num_indexed")

    def __init__(self) -> None:
        self.positions: dict[int, list[int]] = {}
        self.num_indexed = 0


class NgramProposer(Proposer):
    name = "ngram"

    def __init__(self, min_n: int = 2, max_n: int = 4) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes need 1 <= min <= max; got min {min_n}, max {max_n}")
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, request: Request, k: int) -> list[int]:
        tokens = request.all_token_ids
        return self.lookup(tokens, k, _index(request, tokens))

    def lookup(self, tokens: list[int], k: int, index: _Index | None = None) -> list[int]:
        """Up to k tokens continuing `tokens`, or [] when its last min_n tokens occur nowhere earlier."""
        n_tok = len(tokens)
        if k <= 0 or n_tok < self.min_n + 1:
            return []
        if index is None:
            index = _Index()
        _extend(index, tokens)
        candidates = index.positions.get(tokens[-1])
        if not candidates:
            return []
        best, best_len = -1, 0
        for end in reversed(candidates[-MAX_CANDIDATES:]):      # most recent first
            m = 1
            while m < self.max_n and end - m >= 0 and tokens[end - m] == tokens[n_tok - 1 - m]:
                m += 1
            if m > best_len:
                best, best_len = end, m
                if m == self.max_n:
                    break
        if best_len < self.min_n:
            return []
        # what followed the match; where that runs into the sequence's end, the continuation
        # repeats with the same period (the drafts extend the sequence they are read from)
        out: list[int] = []
        for j in range(k):
            i = best + 1 + j
            out.append(tokens[i] if i < n_tok else out[i - n_tok])
        return out


def _index(request: Request, tokens: list[int]) -> _Index:
    index = request.spec_state
    if not isinstance(index, _Index) or index.num_indexed > len(tokens) - 1:
        index = request.spec_state = _Index()
    return index


def _extend(index: _Index, tokens: list[int]) -> None:
    """Index every position but the last (matches must end before the query's own end)."""
    positions = index.positions
    for i in range(index.num_indexed, len(tokens) - 1):
        positions.setdefault(tokens[i], []).append(i)
    index.num_indexed = max(index.num_indexed, len(tokens) - 1)
