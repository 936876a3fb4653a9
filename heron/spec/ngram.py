"""Prompt lookup / n-gram drafts (Saxena's prompt lookup decoding, vLLM's `ngram`): find the
longest recent earlier occurrence of the sequence's last n tokens (min_n <= n <= max_n) in the
prompt and the text generated so far, and propose the tokens that followed it.

Cost per proposal is bounded: an index from token id to the positions holding it is kept per
request and extended with the new tokens only, and at most MAX_CANDIDATES of the most recent
positions holding the last token are compared backwards.

With `--speculative-tree-width W` > 1 the W best distinct continuations are proposed together
as a token tree (heron.spec.tree) and verified in one forward.
"""
from __future__ import annotations

from heron.request import Request
from heron.spec import Proposer, tree

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

    def propose_tree(self, request: Request, k: int, width: int) -> tuple[list[int], list[int]]:
        """Up to `width` different continuations of up to k tokens each, merged into a token
        tree (heron.spec.tree): the best match's first, then the next best distinct ones."""
        tokens = request.all_token_ids
        return tree.build(self.continuations(tokens, k, width, _index(request, tokens)))

    def lookup(self, tokens: list[int], k: int, index: _Index | None = None) -> list[int]:
        """Up to k tokens continuing `tokens`, or [] when its last min_n tokens occur nowhere earlier."""
        found = self.continuations(tokens, k, 1, index)
        return found[0] if found else []

    def continuations(self, tokens: list[int], k: int, width: int, index: _Index | None = None) -> list[list[int]]:
        """What followed the `width` best earlier occurrences of the sequence's suffix (longest
        match first, then the most recent), distinct ones only."""
        n_tok = len(tokens)
        if k <= 0 or n_tok < self.min_n + 1:
            return []
        if index is None:
            index = _Index()
        _extend(index, tokens)
        candidates = index.positions.get(tokens[-1])
        if not candidates:
            return []
        matches: list[tuple[int, int]] = []          # (match length, end), most recent first
        for end in reversed(candidates[-MAX_CANDIDATES:]):
            m = 1
            while m < self.max_n and end - m >= 0 and tokens[end - m] == tokens[n_tok - 1 - m]:
                m += 1
            if m >= self.min_n:
                matches.append((m, end))
                if width == 1 and m == self.max_n:
                    break
        matches.sort(key=lambda x: -x[0])             # stable: recency breaks ties
        out: list[list[int]] = []
        for _, end in matches:
            cont = _continuation(tokens, end, k)
            if cont not in out:
                out.append(cont)
                if len(out) == width:
                    break
        return out


def _continuation(tokens: list[int], end: int, k: int) -> list[int]:
    """The k tokens after position `end`; where that runs into the sequence's end, the
    continuation repeats with the same period (the drafts extend the sequence they are read from)."""
    n_tok = len(tokens)
    out: list[int] = []
    for j in range(k):
        i = end + 1 + j
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
