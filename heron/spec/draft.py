"""Draft-model proposals: a smaller model with the same vocabulary (`draft:MODEL`), or the target
itself with int4 weights (`self-int4`), proposes k tokens greedily, one forward per token.

The draft has its own model runner and its own small paged KV pool. Each request it drafts for
has a shadow request in that pool whose KV covers the request's tokens up to where the draft
last computed them: drafts the target accepted stay valid (the same tokens at the same
positions), so a round only computes the tokens it has not seen (after admission the whole
prompt, later the target's own token and at most one more) before drafting k tokens, all the
requests of a round in one batch per forward. Greedy drafts are deterministic, so the target's
verification keeps its exact output distribution (see heron.spec).
"""
from __future__ import annotations

import dataclasses
import logging

from heron.core.kv_cache_manager import KVCacheManager
from heron.core.scheduler import SchedulerOutput
from heron.request import Request
from heron.sampling_params import SamplingParams
from heron.spec import Proposer

logger = logging.getLogger(__name__)

_GREEDY = SamplingParams(temperature=0.0, max_tokens=1)
DRAFT_KV_GIB = 0.25          # the draft's own KV pool
CATCH_UP_ROWS = 4            # unseen tokens up to this many are computed as decode rows


class _Shadow:
    __slots__ = ("req", "valid")

    def __init__(self, req: Request) -> None:
        self.req = req          # the draft-side request: token ids, its blocks in the draft pool
        self.valid = 0          # leading positions whose draft KV is computed


class DraftModelProposer(Proposer):
    batched = True

    def __init__(self, name: str, config, engine, model: str | None, quantization: str | None) -> None:
        from heron.models.loader import iter_weights, load_config, resolve_model
        from heron.runner.model_runner import ModelRunner

        self.name = name
        source = engine.source if model is None else resolve_model(model)
        hf_config = engine.hf_config if model is None else load_config(source)
        if hf_config.vocab_size != engine.hf_config.vocab_size:
            raise ValueError(f"the draft model {source.name} has a vocabulary of {hf_config.vocab_size} tokens, the "
                             f"target {engine.hf_config.vocab_size}; a draft must share the target's tokenizer")
        cfg = dataclasses.replace(config, model=str(source.path) if model is not None else config.model,
                                  quantization=quantization, speculative=None, num_kv_blocks=None,
                                  kv_cache_memory=DRAFT_KV_GIB, enable_prefix_caching=False, kv_offload_dir=None,
                                  kv_offload_cpu_gib=0.0)
        self.runner = ModelRunner(cfg, hf_config, iter_weights(source, cfg.torch_dtype, progress=False))
        self.num_borrowed = 0
        if model is None:
            self.num_borrowed = _borrow_full_precision(self.runner.model, engine.runner.model)
        num_blocks = self.runner.allocate_kv_cache(DRAFT_KV_GIB, None)
        self.kv = KVCacheManager(num_blocks, cfg.block_size, enable_prefix_caching=False)
        self.shadows: dict[str, _Shadow] = {}
        self.num_forwards = 0
        logger.info("draft model %s (%s) ready: %d KV blocks", source.name, quantization or cfg.torch_dtype,
                    num_blocks)

    def propose(self, request: Request, k: int) -> list[int]:
        return self.propose_batch([(request, k)]).get(request.request_id, [])

    def propose_batch(self, wanted: list[tuple[Request, int]]) -> dict[str, list[int]]:
        """Drafts for every (request, k), computed together: one forward per draft position."""
        self._forget_gone({r.request_id for r, _ in wanted})
        drafts: dict[str, list[int]] = {}
        # (shadow, drafts still wanted, tokens to compute now: the unseen ones up to the last)
        active = []
        for request, k in wanted:
            sh = self._sync(request)
            drafts[request.request_id] = []
            active.append((sh, k, len(sh.req.all_token_ids) - sh.valid))
        while active:
            # a request the draft pool has no room for stops drafting (it keeps what it has)
            batch = [(sh, k, n) for sh, k, n in active if self.kv.allocate_slots(sh.req, n)]
            if not batch:
                break
            # a catch-up of a few tokens runs as decode rows (the paged kernel, no chunk gather)
            rows = {sh.req.request_id for sh, _, n in batch if 1 < n <= CATCH_UP_ROWS}
            result = self.runner.execute(SchedulerOutput(scheduled=[(sh.req, n) for sh, _, n in batch],
                                                         decode_rows=rows))
            self.num_forwards += 1
            active = []
            for sh, k, n in batch:
                req = sh.req
                req.num_computed_tokens += n
                sh.valid = req.num_computed_tokens
                token = result.sampled[req.request_id][0]
                req.append_token(token)
                drafts[req.request_id].append(token)
                if k > 1:
                    active.append((sh, k - 1, 1))
        return drafts

    # ---- shadows ----------------------------------------------------------------------
    def _sync(self, request: Request) -> _Shadow:
        """The request's shadow, its tokens set to the request's (drafts rolled back)."""
        sh = self.shadows.get(request.request_id)
        if sh is None:
            shadow = Request(request.request_id, list(request.prompt_token_ids), _GREEDY, frozenset(),
                             max_tokens=1 << 30)
            sh = self.shadows[request.request_id] = _Shadow(shadow)
        tokens = request.all_token_ids
        req = sh.req
        # the longest common prefix of what the draft computed and the request's tokens
        keep = min(sh.valid, len(tokens) - 1)
        own = req.all_token_ids
        i = 0
        while i < keep and own[i] == tokens[i]:
            i += 1
        req.all_token_ids = list(tokens)
        req.output_token_ids = []
        req.num_computed_tokens = sh.valid = i
        return sh

    def _forget_gone(self, keep: set[str]) -> None:
        """Free the draft KV of requests that are no longer drafted for (finished, preempted,
        or in a batch too large to speculate)."""
        for rid in [rid for rid in self.shadows if rid not in keep]:
            self.kv.free(self.shadows.pop(rid).req)


def _borrow_full_precision(draft, target) -> int:
    """A quantized self-draft computes calls of many rows (its catch-up prefills) with the
    target's own layers instead of dequantizing its weights on every call (about 4x slower
    than the bf16 matmul): the same weights, no extra memory. Returns the layers so linked."""
    from heron.layers.linear import LinearBase
    target_modules = dict(target.named_modules())
    n = 0
    for name, module in draft.named_modules():
        if isinstance(module, LinearBase) and module.quant is not None:
            twin = target_modules.get(name)
            if isinstance(twin, LinearBase) and (twin.in_features, twin.out_features) == \
                    (module.in_features, module.out_features):
                module.full_precision = twin.forward
                n += 1
    return n
