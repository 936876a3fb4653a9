"""Speculative decoding integrated with continuous batching.

Proposers: `ngram` (prompt lookup, heron/spec/ngram.py), `self-int4` and `draft:MODEL` (a draft
model with its own runner and KV pool, heron/spec/draft.py).

After each step the speculator asks a proposer for up to k draft tokens per decoding request
(`Request.spec_token_ids`); the scheduler gives the request 1 + k KV slots in the next step,
the runner scores the last token and the drafts in one forward, samples every position with
the drafts before it as history, and keeps the drafts up to the first position where the
target's token differs, plus that token (see ModelRunner.execute). Greedy outputs are the
target's exactly; sampled outputs follow the target's distribution exactly (drafts are
deterministic, so the rejection rule of Leviathan et al. accepts draft d with probability
p(d) and otherwise draws from p restricted to the other tokens, which is the same as drawing
from p and comparing).

Adaptive length: a request's next draft length is its recent accepted drafts per step plus
one (an exponential moving average, between 1 and --num-speculative-tokens), and nothing is
proposed while more than --speculative-max-batch requests are decoding, where verifying
drafts for every row would cost more than it saves (on CPU larger batches are compute-bound).

Token trees (SpecInfer, heron/spec/tree.py): with --speculative-tree-width W > 1 the n-gram
proposer offers its W best distinct continuations at once, merged into a trie, and the runner
verifies every node in one forward under a tree attention mask. The draft counters then count
tree nodes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from heron.request import Request
from heron.spec import tree

METHODS = ("ngram", "self-int4", "draft:MODEL")
EMA_WEIGHT = 0.5        # weight of the newest step in a request's acceptance average


@dataclass
class SpecStats:
    num_steps: int = 0              # request-steps that verified drafts
    num_proposed: int = 0           # draft tokens verified
    num_accepted: int = 0           # draft tokens accepted
    num_emitted: int = 0            # tokens produced by verifying steps (accepted + the target's own)

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted / self.num_proposed if self.num_proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens produced per verifying step (accepted drafts + 1)."""
        return self.num_emitted / self.num_steps if self.num_steps else 0.0


class Proposer:
    """Proposes draft tokens: `propose(request, k)` -> up to k token ids (may be empty)."""

    name = "base"

    def propose(self, request: Request, k: int) -> list[int]:
        raise NotImplementedError


class Speculator:
    def __init__(self, proposer: Proposer, num_speculative_tokens: int, max_batch: int,
                 max_model_len: int = 1 << 30, tree_width: int = 1) -> None:
        self.proposer = proposer
        self.k = num_speculative_tokens
        self.max_batch = max_batch
        self.tree_width = tree_width if hasattr(proposer, "propose_tree") else 1
        self.max_model_len = max_model_len
        self.stats = SpecStats()

    def next_length(self, request: Request) -> int:
        ema = request.spec_accept_ema
        if ema is None:
            return self.k
        return max(1, min(self.k, math.ceil(ema) + 1))

    def update_stats(self, sched_out, sampled: dict[str, list[int]]) -> None:
        if not sched_out.spec_tokens:
            return
        by_id = {r.request_id: r for r, _ in sched_out.scheduled}
        for rid, drafts in sched_out.spec_tokens.items():
            tokens = sampled.get(rid)
            if not tokens:
                continue
            request = by_id.get(rid)
            accepted = len(tokens) - 1
            st = self.stats
            st.num_steps += 1
            st.num_proposed += len(drafts)
            st.num_accepted += accepted
            st.num_emitted += len(tokens)
            if request is not None:
                ema = request.spec_accept_ema
                request.spec_accept_ema = accepted if ema is None else \
                    (1 - EMA_WEIGHT) * ema + EMA_WEIGHT * accepted

    def propose(self, running: list[Request]) -> None:
        """Set the drafts of every decoding request for the next step (none in a large batch)."""
        wanted = []
        if len(running) <= self.max_batch:
            for request in running:
                if request.is_finished or request.num_tokens - request.num_computed_tokens != 1:
                    continue
                k = min(self.next_length(request), request.max_tokens - request.num_output_tokens - 1,
                        self.max_model_len - request.num_tokens)
                if k > 0:
                    wanted.append((request, k))
        if getattr(self.proposer, "batched", False):
            # (called with nothing wanted too: a draft model frees the KV of requests it left)
            drafts = self.proposer.propose_batch(wanted)
            for request, _ in wanted:
                request.spec_token_ids = drafts.get(request.request_id, [])
            return
        for request, k in wanted:
            if self.tree_width > 1:
                tokens, parents = self.proposer.propose_tree(request, k, self.tree_width)
                tree.check_tree(tokens, parents)
                request.spec_token_ids = tokens
                request.spec_parents = None if tree.is_chain(parents) else parents
            else:
                request.spec_token_ids = self.proposer.propose(request, k)


def make_speculator(config, engine) -> Speculator:
    method = config.speculative
    if method == "ngram":
        from heron.spec.ngram import NgramProposer
        proposer = NgramProposer(config.speculative_ngram_min, config.speculative_ngram_max)
    elif method == "self-int4":
        from heron.spec.draft import DraftModelProposer
        proposer = DraftModelProposer(method, config, engine, None, "int4")
    elif method.startswith("draft:"):
        from heron.spec.draft import DraftModelProposer
        proposer = DraftModelProposer("draft", config, engine, method[len("draft:"):], None)
    else:  # config validation lists the methods
        raise ValueError(f"unknown speculative method {method!r}; available: {', '.join(METHODS)}")
    return Speculator(proposer, config.num_speculative_tokens, config.speculative_max_batch, engine.max_model_len,
                      config.speculative_tree_width)
