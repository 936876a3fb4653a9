"""CPU backend: a C++ paged-attention kernel that reads the KV blocks in place (no gathered
copy of the context). Decode rows go through it, and so do bfloat16 prefill chunks that
continue a cached context: a chunk's token at position p is a row that attends to the first
p + 1 cached tokens (within the sliding window), so one kernel call per layer serves all of
them. Against one masked SDPA per chunk this is 2-4.5x faster here (a 32-token suffix of a
1,024-token cached prefix; the kernel skips keys outside a sliding window, SDPA only masks
them). A first chunk (no context) attends only to its own fresh keys, a causal GEMM-shaped
problem where SDPA's is_causal path is 3-6x faster than rows of the kernel (128-512 tokens), so
those chunks take it (their K/V are written to their slots first); one longer than a sliding
window takes SDPA with a causal window mask (1,057 tokens, window 512: ~5 ms a layer against
~19 ms as kernel rows).
Rows that share a long run of cached blocks (requests that hit the same prefix in the prefix
cache) take cascade attention: the shared keys once for all of them as one GEMM-shaped flash
attention, the rest of each row's keys in the kernel, merged by log-sum-exp (_rows).
Token trees, other dtypes and 8-bit caches keep the torch backend's prefill. With an 8-bit
cache (`--kv-cache-dtype int8|fp8`) decode-only steps go through the kernel, which quantizes
the step's K/V into their slots and reads the codes and scales directly, dequantizing in
registers. (Its prefill rows are closer to the dequantized values than the torch prefill, but
measured +1.4% perplexity with fp8 on the default model's first 1,023 tokens against +0.6%
through the torch prefill, so prefill over an 8-bit cache stays there.)

The kernel lives in heron.ops.cpu (compiled once per machine and cached); if no compiler
is available the engine falls back to the portable torch backend.
"""
from __future__ import annotations

import torch

from heron.ops.cpu import kernel_error, load_kernel
from heron.runner.attention.base import AttentionMetadata, AttentionSpec
from heron.runner.attention.torch_backend import TorchAttentionBackend


class CpuAttentionBackend(TorchAttentionBackend):
    name = "cpu"

    def __init__(self) -> None:
        self.kernel = load_kernel()
        if self.kernel is None:
            raise RuntimeError(f"the CPU attention kernel could not be built: {kernel_error()}")

    def forward(self, spec: AttentionSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if spec.logit_softcap is None and q.device.type == "cpu":
            if meta.num_prefills == 0:
                # decode-only step: the kernel writes this step's keys/values into their slots
                # and attends, one call per layer (rows sharing a long cached prefix: cascade)
                return self._rows(spec, q.contiguous(), kv_cache, meta, meta.decode_block_tables,
                                  meta.decode_seq_lens, (k, v))
            if (q.dtype == torch.bfloat16 and kv_cache.dtype == torch.bfloat16
                    and not any(t is not None for t in meta.prefill_trees)):
                return self._mixed(spec, q, k, v, kv_cache, meta)
        return super().forward(spec, q, k, v, kv_cache, meta)

    def _mixed(self, spec: AttentionSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """A step with prefill chunks, bf16: first chunks by causal SDPA, the rest as kernel rows."""
        first, rows, row_tables, row_lens = self._mixed_plan(meta, spec.sliding_window)
        if not first:
            return self._rows(spec, q.contiguous(), kv_cache, meta, row_tables, row_lens, (k, v))
        self._write(spec, k, v, kv_cache, meta)   # every K/V into its slot first (the kernel then only reads)
        out = torch.empty_like(q)
        for i in first:   # the torch backend's SDPA over the chunk's own keys (no context; causal, windowed)
            s, n = meta.prefill_query_starts[i], meta.prefill_query_lens[i]
            out[s:s + n] = self._prefill(spec, i, q[s:s + n], k[s:s + n], v[s:s + n], kv_cache, meta)
        if rows is not None:
            out[rows] = self._rows(spec, q[rows], kv_cache, meta, row_tables, row_lens)
        return out

    # ---- cascade attention over shared prefixes -------------------------------------------
    # Rows whose block tables begin with the same cached blocks (requests that hit the same
    # prefix in the prefix cache, the samples of an n > 1 request) read those keys once, as one
    # GEMM-shaped attention for all of them (torch's flash attention for CPU, which also returns
    # the log-sum-exp); the kernel then attends each row to the rest of its keys, and the two
    # parts are merged by their log-sum-exps (as in FlashInfer's cascade attention / Hydragen).
    # 62 prompts' 33 own tokens each on a 1,024-token shared prefix: 32-65 ms -> ~7-9 ms a layer
    # as kernel rows; 64 decode rows there: 1.1-2.1 -> 0.8-1.3 ms a layer (docs/benchmarks.md).
    # Only for groups of at least 8 requests (distinct block tables): a request's result then
    # depends on the batch (where its keys are split), as with any batched GEMM; speculation
    # (at most --speculative-max-batch = 4 decoding requests) and n <= 7 samples keep the
    # kernel's per-row results, bit-identical whatever else runs, which speculation relies on.
    CASCADE_MIN_REQUESTS = 8
    CASCADE_MIN_TOKENS = 128      # shared tokens

    def _cascade_ok(self, q: torch.Tensor, kv_cache: torch.Tensor) -> bool:
        return (q.dtype == torch.bfloat16 and kv_cache.dtype == torch.bfloat16 and q.shape[-1] % 16 == 0
                and q.shape[1] // kv_cache.shape[3] in (1, 2, 4, 8) and bool(self.kernel.paged_part_supported()))

    def _cascade_plan(self, meta: AttentionMetadata, spec: AttentionSpec, tables: torch.Tensor,
                      seq_lens: torch.Tensor):
        """Per step and window: groups of rows sharing at least CASCADE_MIN_TOKENS of whole cached
        blocks that every one of them attends to (within its window), or None. Each group is
        (row indices, K/V gather index [L], first shared key, shared length Lp, mask or None).
        A step has one set of kernel rows (decodes, or the tokens that are not first chunks)."""
        key = ("cascade", spec.sliding_window)
        if key in meta.cache:
            return meta.cache[key]
        plan = None
        bs, window = meta.block_size, spec.sliding_window
        n = tables.shape[0]
        if n >= self.CASCADE_MIN_REQUESTS and tables.shape[1] * bs >= self.CASCADE_MIN_TOKENS:
            groups = []
            starts = torch.zeros(n, dtype=torch.long)
            heads, counts = torch.unique(tables[:, 0], return_counts=True)
            for head in heads[counts >= self.CASCADE_MIN_REQUESTS].tolist():
                rows = (tables[:, 0] == head).nonzero().flatten()
                t = tables[rows]
                same = (t == t[:1]).all(0)
                shared = int(same.numel() if bool(same.all()) else int((~same).nonzero()[0]))
                lens = seq_lens[rows]
                # every row's own position lies after the shared blocks
                shared = min(shared, (int(lens.min()) - 1) // bs)
                lp = shared * bs
                if lp < self.CASCADE_MIN_TOKENS:
                    continue
                first = (lens - window).clamp(min=0) if window is not None else torch.zeros_like(lens)
                sees = first < lp            # rows whose window reaches into the shared keys
                rows, first = rows[sees], first[sees]
                if rows.numel() < self.CASCADE_MIN_REQUESTS or \
                        torch.unique(tables[rows], dim=0).shape[0] < self.CASCADE_MIN_REQUESTS:
                    continue
                lo = int(first.min())
                if lp - lo < self.CASCADE_MIN_TOKENS // 2:
                    continue
                blocks = tables[rows[0], :shared]
                index = (blocks[:, None] * bs + torch.arange(bs)).flatten()[lo:]
                mask = None
                if bool((first > lo).any()):
                    # keys before a row's window start are masked, for each of its query heads
                    g = spec.num_heads // spec.num_kv_heads
                    k_pos = torch.arange(lo, lp)[None, :]
                    hidden = (k_pos < first[:, None]).repeat_interleave(g, dim=0)
                    mask = torch.zeros(hidden.shape, dtype=torch.bfloat16).masked_fill_(hidden, float("-inf"))
                starts[rows] = lp
                groups.append((rows, index, lo, lp, mask))
            if groups:
                plan = (groups, starts)
        meta.cache[key] = plan
        return plan

    def _rows(self, spec: AttentionSpec, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
              tables: torch.Tensor, seq_lens: torch.Tensor, write: tuple | None = None) -> torch.Tensor:
        """Decode rows q [R, Hq, D] over the cache: the kernel, with cascade attention for rows
        that share a long cached prefix. `write` = (k, v): the step's K/V still to be written
        (all of the step's rows are then these rows)."""
        window = spec.sliding_window or 0
        plan = self._cascade_plan(meta, spec, tables, seq_lens) if self._cascade_ok(q, kv_cache) else None
        if plan is None:
            k, v, slots = (*write, meta.slot_mapping) if write is not None else (None, None, None)
            return self.kernel.paged_decode(q, kv_cache, tables, seq_lens, window, spec.scale, k, v, slots)
        if write is not None:
            self._write(spec, *write, kv_cache, meta)
        groups, starts = plan
        out, lse = self.kernel.paged_part(q, kv_cache, tables, seq_lens, starts, window, spec.scale)
        hkv, d = spec.num_kv_heads, spec.head_dim
        g = spec.num_heads // hkv
        flat_k = kv_cache[0].view(-1, hkv, d)
        flat_v = kv_cache[1].view(-1, hkv, d)
        for rows, index, lo, lp, mask in groups:
            r = rows.numel()
            # the rows' query heads of one KV head as one sequence: [1, Hkv, R * G, D]
            qg = q[rows].view(r, hkv, g, d).transpose(0, 1).reshape(1, hkv, r * g, d)
            kg = flat_k[index].transpose(0, 1)[None]
            vg = flat_v[index].transpose(0, 1)[None]
            o1, lse1 = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                qg, kg, vg, attn_mask=mask, scale=spec.scale)[:2]
            o1 = o1[0].view(hkv, r, g, d).transpose(0, 1).reshape(r, hkv * g, d)   # no copy when Hkv == 1
            lse1 = lse1[0].view(hkv, r, g).transpose(0, 1).reshape(r, hkv * g)
            self.kernel.merge_part(out, lse, rows, o1.contiguous(), lse1.contiguous())
        return out.to(q.dtype)

    def _mixed_plan(self, meta: AttentionMetadata, window: int | None):
        """Per step and window, built once: the first chunks that take SDPA (no context) and
        the other tokens as kernel rows: their indices (None when
        every row is taken; all rows when no chunk is), block tables and attended lengths."""
        key = ("mixed", window)
        if key not in meta.cache:
            first = [i for i, (ctx, qlen) in enumerate(zip(meta.prefill_context_lens, meta.prefill_query_lens))
                     if ctx == 0 and qlen > 1]
            if not first:
                meta.cache[key] = ([], None, *self._row_tables(meta))
                return meta.cache[key]
            in_first = torch.zeros(meta.num_decodes + sum(meta.prefill_query_lens), dtype=torch.bool)
            for i in first:
                start = meta.prefill_query_starts[i]
                in_first[start:start + meta.prefill_query_lens[i]] = True
            if bool(in_first.all()):
                meta.cache[key] = (first, None, None, None)
            else:
                tables, seq_lens = self._row_tables(meta)
                rows = (~in_first).nonzero().flatten()
                meta.cache[key] = (first, rows, tables[rows], seq_lens[rows])
        return meta.cache[key]

    @staticmethod
    def _row_tables(meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Every token of the step as a decode row: its request's block table [T, max_blocks]
        and the number of cached tokens it attends to [T] (position + 1; the kernel applies
        the causal order and any sliding window through it). Built once per step."""
        key = "row_tables"
        if key not in meta.cache:
            nd = meta.num_decodes
            width = max([meta.decode_block_tables.shape[1] if nd else 0]
                        + [t.numel() for t in meta.prefill_block_tables])
            total = nd + sum(meta.prefill_query_lens)
            tables = torch.zeros(total, width, dtype=torch.long)
            seq_lens = torch.empty(total, dtype=torch.long)
            if nd:
                tables[:nd, :meta.decode_block_tables.shape[1]] = meta.decode_block_tables
                seq_lens[:nd] = meta.decode_seq_lens
            for start, qlen, ctx, table in zip(meta.prefill_query_starts, meta.prefill_query_lens,
                                               meta.prefill_context_lens, meta.prefill_block_tables):
                tables[start:start + qlen, :table.numel()] = table
                torch.arange(ctx + 1, ctx + qlen + 1, out=seq_lens[start:start + qlen])
            meta.cache[key] = (tables, seq_lens)
        return meta.cache[key]

    def _decode(self, spec: AttentionSpec, q: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        if spec.logit_softcap is not None or q.device.type != "cpu":
            return super()._decode(spec, q, kv_cache, meta)
        return self.kernel.paged_decode(q.contiguous(), kv_cache, meta.decode_block_tables, meta.decode_seq_lens,
                                        spec.sliding_window or 0, spec.scale, None, None, None)
