"""The only place that touches tensors: builds the step's flat batch, runs the model, samples.

One flat, unpadded batch per step: decodes first (one row each; a request verifying k draft
tokens has k + 1 decode rows), then prefill chunks (and token trees being verified: a
chunk of the root and the tree's nodes under a tree attention mask, heron.spec.tree).
Logits are computed only for the rows that are sampled (plus prompt rows of requests that
asked for prompt logprobs).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from heron.config import EngineConfig
from heron.core.scheduler import SchedulerOutput
from heron.models.registry import get_model_class
from heron.request import Request
from heron.runner.attention import AttentionMetadata, get_attention_backend
from heron.runner.kv_cache import allocate_kv_caches, kv_bytes_per_block, kv_code_dtype, num_blocks_for_memory
from heron.sample.sampler import Sampler, SamplingRow, TokenLogprobs, compute_prompt_logprobs
from heron.spec import tree



@dataclass
class RunnerOutput:
    # request id -> this step's new tokens: one, or with drafts the accepted ones plus the target's next
    sampled: dict[str, list[int]] = field(default_factory=dict)
    logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)   # aligned with `sampled`
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)


@dataclass
class RunnerStats:
    num_steps: int = 0
    num_mixed_steps: int = 0          # steps that ran decodes and prefill chunks together
    num_chunked_prefills: int = 0     # prefill chunks that stopped short of the end of the prompt
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class ModelRunner:
    def __init__(self, config: EngineConfig, hf_config, weights) -> None:
        self.config = config
        self.device = config.torch_device
        self.dtype = config.torch_dtype
        self.block_size = config.block_size
        cls = get_model_class(hf_config)
        with _default_dtype(self.dtype), torch.device(self.device):
            self.model = cls(hf_config)
        from heron.quant.checkpoint import checkpoint_spec
        ckpt = checkpoint_spec(hf_config)
        if ckpt is not None:   # a GPTQ / AWQ checkpoint: its linear layers keep the checkpoint's quantized weights
            from heron.quant.checkpoint import load_quantized_checkpoint
            self.quant_summary = load_quantized_checkpoint(self.model, weights, ckpt, config.model,
                                                           config.quantization_lm_head,
                                                           config.quantization_group_size)
        else:
            self.model.load_weights(weights)
        # w8a8 with SmoothQuant needs the model running (calibration): the engine does it once
        # the KV cache exists (heron.quant.w8a8.smoothquant_model)
        self.needs_smoothquant = config.quantization == "w8a8" and config.smoothquant_alpha != 0 and ckpt is None
        if config.quantization is not None and ckpt is None and not self.needs_smoothquant:
            from heron.quant.apply import quantize_model
            self.quant_summary = quantize_model(self.model, config.quantization, config.quantization_group_size,
                                                source=config.model, lm_head=config.quantization_lm_head)
        if config.quantization is not None or ckpt is not None:
            from heron.quant.apply import use_fused_float32
            use_fused_float32(self.model)
        for module in self.model.modules():
            if hasattr(module, "process_weights_after_loading"):
                module.process_weights_after_loading()
        self.model.eval()
        self.num_layers = hf_config.num_hidden_layers
        self.vocab_size = hf_config.vocab_size
        self.backend = get_attention_backend(config.attention_backend, self.device)
        self.sampler = Sampler()
        self.kv_caches: list[torch.Tensor] = []
        self.kv_prefault = None   # heron.ops.cpu_memory.KVPrefaulter on CPU
        # None: K/V in the model dtype; int8/float8_e4m3fn: 8-bit codes + a float32 scale per (token, head)
        self.kv_code_dtype = kv_code_dtype(config.kv_cache_dtype)
        self.num_blocks = 0
        self.stats = RunnerStats()

    # ---- KV cache ---------------------------------------------------------------------
    def bytes_per_block(self) -> int:
        return kv_bytes_per_block(self.num_layers, self.block_size, self.model.num_kv_heads, self.model.head_dim,
                                  self.dtype, self.kv_code_dtype)

    def allocate_kv_cache(self, gib: float | None, num_blocks: int | None) -> int:
        from heron.config import default_kv_cache_gib
        if num_blocks is None:
            gib = gib if gib is not None else default_kv_cache_gib(self.device)
            num_blocks = num_blocks_for_memory(gib, self.bytes_per_block())
            if num_blocks < 2:
                raise ValueError(f"kv_cache_memory {gib} GiB holds fewer than 2 blocks of "
                                 f"{self.bytes_per_block()} bytes; raise it")
        if self.kv_prefault is not None:
            self.kv_prefault.stop()
        self.kv_caches = allocate_kv_caches(self.num_layers, num_blocks, self.block_size, self.model.num_kv_heads,
                                            self.model.head_dim, self.dtype, self.device, self.kv_code_dtype)
        self.num_blocks = num_blocks
        if self.device.type == "cpu":
            # map the pool's pages in on an idle-priority thread before the steps need them
            from heron.ops.cpu_memory import KVPrefaulter
            self.kv_prefault = KVPrefaulter(self.kv_caches)
        return num_blocks

    # ---- one step ---------------------------------------------------------------------
    def read_block(self, block_id: int) -> torch.Tensor:
        """A CPU copy of one block across all layers: [num_layers, 2, block_size, Hkv, D] (an 8-bit cache:
        [num_layers, 2, block_size, Hkv, D + 4] codes with their scales, the bytes as they are)."""
        return torch.stack([kv[:, block_id] for kv in self.kv_caches]).cpu()

    def write_block(self, block_id: int, payload: torch.Tensor) -> None:
        for layer, kv in enumerate(self.kv_caches):
            kv[:, block_id].copy_(payload[layer], non_blocking=False)

    def _move_accepted(self, request: Request, path: list[int]) -> None:
        """After a token tree's verification: the KV of accepted node path[d] (written at slot
        position p + 1 + path[d]) moves to position p + 1 + d, where a chain would have put it.
        Sources never lie below their targets (path[d] >= d), and all are read before writing."""
        moves = [(1 + n, 1 + d) for d, n in enumerate(path) if n != d]
        if not moves:
            return
        p, bs, blocks = request.num_computed_tokens, self.block_size, request.block_ids
        src = torch.tensor([blocks[(p + a) // bs] * bs + (p + a) % bs for a, _ in moves], device=self.device)
        dst = torch.tensor([blocks[(p + b) // bs] * bs + (p + b) % bs for _, b in moves], device=self.device)
        for kv in self.kv_caches:
            flat = kv.view(torch.uint8) if kv.element_size() == 1 else kv
            flat = flat.view(2, -1, *kv.shape[3:])
            flat[:, dst] = flat[:, src]

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        for bid, payload in out.blocks_to_load:
            self.write_block(bid, payload)
        for src, dst in out.blocks_to_copy:
            for kv in self.kv_caches:
                kv[:, dst].copy_(kv[:, src])
        # a request verifying k drafts is k + 1 decode rows (row j sees the cache up to its own
        # position), so verification reads the paged cache in place like any decode
        # (so do the few tokens of a request in `decode_rows`); a token tree (heron.spec.tree)
        # is verified as a chunk with a tree mask instead
        spec, trees = out.spec_tokens, out.spec_parents
        as_rows = {rid for rid in spec if rid not in trees} | out.decode_rows
        decodes = [(r, n) for r, n in out.scheduled if n == 1 or r.request_id in as_rows]
        chunks = [(r, n) for r, n in out.scheduled if n != 1 and r.request_id not in as_rows]
        batch = decodes + chunks
        bs = self.block_size
        st = self.stats
        st.num_steps += 1
        prefills = [(r, n) for r, n in chunks if r.request_id not in spec]
        st.num_mixed_steps += bool(prefills and len(prefills) < len(out.scheduled))
        st.num_prefill_tokens += sum(n for _, n in prefills)
        st.num_decode_tokens += out.total_num_scheduled_tokens - sum(n for _, n in prefills)
        st.num_chunked_prefills += sum(1 for r, n in prefills if r.num_computed_tokens + n < r.num_tokens)

        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []          # rows whose logits are sampled
        sample_reqs: list[Request] = []      # their requests (a request with k drafts has k + 1 rows)
        sample_hist: list[list[int]] = []    # drafts before each row (part of its history)
        plp_rows: list[tuple[Request, int, int, int]] = []  # (request, row, prompt position, count) for prompt logprobs
        prefill_starts, prefill_lens, prefill_ctx, prefill_tables, prefill_trees = [], [], [], [], []
        dev = self.device
        for request, num_new in batch:
            start = request.num_computed_tokens
            end = start + num_new
            row0 = len(input_ids)
            drafts = spec.get(request.request_id)
            parents = trees.get(request.request_id)
            input_ids.extend(request.all_token_ids[start:end] if not drafts else
                             request.all_token_ids[start:] + drafts)
            if parents is None:
                positions.extend(range(start, end))
            else:   # the root at `start`, each node at start + its depth
                positions.append(start)
                positions.extend(start + d for d in tree.depths(parents))
            blocks = request.block_ids
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(start, end))
            if num_new != 1 and request.request_id not in as_rows:
                prefill_starts.append(row0)
                prefill_lens.append(num_new)
                prefill_ctx.append(start)
                prefill_tables.append(torch.tensor(blocks, dtype=torch.long))
                prefill_trees.append(None if parents is None else (
                    torch.tensor(positions[row0:], dtype=torch.long, device=dev),
                    tree.attention_mask(parents).to(dev)))
            if drafts:
                # verification: every row from the last real token on is sampled, each with the
                # drafts on its path as history (penalties, min_tokens see what they would see)
                first = row0 + num_new - 1 - len(drafts)
                for j in range(len(drafts) + 1):
                    sample_rows.append(first + j)
                    sample_reqs.append(request)
                    sample_hist.append(drafts[:j] if parents is None else
                                       [drafts[n] for n in tree.path_to(parents, j - 1)])
            elif end == request.num_tokens:
                sample_rows.append(row0 + num_new - 1)
                sample_reqs.append(request)
                sample_hist.append([])
            k = request.sampling_params.prompt_logprobs
            if k is not None:
                # rows predicting prompt tokens 1..P-1 that have not been reported yet
                lo = max(start, request.num_prompt_logprobs_done)
                hi = min(end, request.num_prompt_tokens - 1)
                if hi > lo:
                    plp_rows.append((request, row0 + lo - start, lo, hi - lo))

        nd = sum(n for _, n in decodes)
        if nd:
            max_blocks = max(len(r.block_ids) for r, _ in decodes)
            table, seq_lens = [], []
            for r, n in decodes:
                row = r.block_ids + [0] * (max_blocks - len(r.block_ids))
                for j in range(n):
                    table.append(row)
                    seq_lens.append(r.num_computed_tokens + 1 + j)
            decode_tables = torch.tensor(table, dtype=torch.long, device=dev)
            decode_seq_lens = torch.tensor(seq_lens, dtype=torch.long, device=dev)
        else:
            decode_tables = torch.zeros(0, 1, dtype=torch.long, device=dev)
            decode_seq_lens = torch.zeros(0, dtype=torch.long, device=dev)
        meta = AttentionMetadata(
            block_size=bs,
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            num_decodes=nd,
            decode_block_tables=decode_tables,
            decode_seq_lens=decode_seq_lens,
            prefill_query_starts=prefill_starts,
            prefill_query_lens=prefill_lens,
            prefill_context_lens=prefill_ctx,
            prefill_block_tables=[t.to(dev) for t in prefill_tables],
            backend=self.backend,
            prefill_trees=prefill_trees if any(t is not None for t in prefill_trees) else [],
        )
        ids_t = torch.tensor(input_ids, dtype=torch.long, device=dev)
        pos_t = torch.tensor(positions, dtype=torch.long, device=dev)
        hidden = self.model(ids_t, pos_t, self.kv_caches, meta)

        result = RunnerOutput()
        if sample_rows:
            logits = self.model.compute_logits(hidden[torch.tensor(sample_rows, device=dev)])  # model dtype
            rows = [SamplingRow(r.sampling_params, r.prompt_token_ids,
                                r.output_token_ids + hist if hist else r.output_token_ids, r.eos_token_ids,
                                r.generator) for r, hist in zip(sample_reqs, sample_hist)]
            sampled = self.sampler(logits, rows)
            i = 0
            while i < len(sample_reqs):
                request = sample_reqs[i]
                rid = request.request_id
                drafts = spec.get(rid, ())
                # accept drafts while they equal what the target sampled at their position: for
                # greedy rows the target's own output; for sampled rows exactly the target's
                # distribution (a deterministic draft is accepted with probability p(draft), as in
                # the rejection rule of Leviathan et al. / Chen et al. with a one-hot draft
                # distribution; in a tree, the child equal to the target's token, if any, is the
                # one draft of it), and the first differing token is the correction
                if rid in trees:
                    parents = trees[rid]
                    path = tree.accept(drafts, parents, sampled.token_ids[i:i + len(drafts) + 1])
                    rows = [i] + [i + 1 + n for n in path]
                    self._move_accepted(request, path)
                else:
                    n = 0
                    while n < len(drafts) and sampled.token_ids[i + n] == drafts[n]:
                        n += 1
                    rows = list(range(i, i + n + 1))
                result.sampled[rid] = [sampled.token_ids[r] for r in rows]
                if sampled.logprobs[i] is not None:
                    result.logprobs[rid] = [sampled.logprobs[r] for r in rows]
                i += len(drafts) + 1
        for request, row0, first, count in plp_rows:
            logits = self.model.compute_logits(hidden[row0:row0 + count]).float()
            targets = request.prompt_token_ids[first + 1:first + 1 + count]
            result.prompt_logprobs[request.request_id] = compute_prompt_logprobs(
                logits, targets, request.sampling_params.prompt_logprobs)
            request.num_prompt_logprobs_done = first + count
        return result
