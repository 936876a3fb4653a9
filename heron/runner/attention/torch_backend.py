"""Portable attention over the paged KV cache with plain PyTorch ops (CPU and CUDA).

Decodes: one batched scaled_dot_product_attention over the blocks each request needs (for a
sliding-window layer only the blocks that overlap the window), with a validity mask.
Prefill chunks: one SDPA per chunk; a first chunk attends to its own fresh keys/values with
no gather at all, later chunks gather their context from the cache.

With an 8-bit cache (`--kv-cache-dtype int8|fp8`, heron.runner.kv_cache) the step's K/V are
quantized into their slots, and attention reads what the cache holds: the gathered blocks of
each request are dequantized (only those, never the pool), and a first prefill chunk attends
to its own quantize-dequantized K/V, so a request sees the same keys and values however its
prompt was chunked or found in the prefix cache.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from heron.runner.attention.base import AttentionBackend, AttentionMetadata, AttentionSpec
from heron.runner.kv_cache import dequantize_kv_rows, pack_kv_rows


def _softcap_unsupported(spec: AttentionSpec) -> None:
    if spec.logit_softcap is not None:
        raise NotImplementedError("attention logit softcapping is not supported by the torch backend")


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def forward(self, spec: AttentionSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        _softcap_unsupported(spec)
        num_slots = kv_cache.shape[1] * kv_cache.shape[2]
        if kv_cache.element_size() == 1:
            k, v = self._write_quantized(spec, k, v, kv_cache, meta, q.dtype)
        else:
            self._write(spec, k, v, kv_cache, meta)

        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            out[:nd] = self._decode(spec, q[:nd], kv_cache, meta)
        for i in range(meta.num_prefills):
            start, qlen = meta.prefill_query_starts[i], meta.prefill_query_lens[i]
            out[start:start + qlen] = self._prefill(spec, i, q[start:start + qlen], k[start:start + qlen],
                                                    v[start:start + qlen], kv_cache, meta)
        return out

    @staticmethod
    def _write(spec: AttentionSpec, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
               meta: AttentionMetadata) -> None:
        """The step's k/v [T, Hkv, D] into their slots of a cache in the model dtype."""
        num_slots = kv_cache.shape[1] * kv_cache.shape[2]
        kv_cache[0].view(num_slots, spec.num_kv_heads, spec.head_dim).index_copy_(0, meta.slot_mapping, k)
        kv_cache[1].view(num_slots, spec.num_kv_heads, spec.head_dim).index_copy_(0, meta.slot_mapping, v)

    # ---- 8-bit cache --------------------------------------------------------------------
    @staticmethod
    def _write_quantized(spec: AttentionSpec, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                         meta: AttentionMetadata, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize the step's k/v into their slots (codes + scale per row); returns them
        dequantized, which is what prefill chunks attend to (decodes read the cache)."""
        code_dtype = kv_cache.dtype
        raw = kv_cache.view(torch.uint8)
        num_slots, width = raw.shape[1] * raw.shape[2], raw.shape[-1]
        out = []
        for i, x in enumerate((k, v)):
            rows = pack_kv_rows(x, code_dtype)
            raw[i].view(num_slots, spec.num_kv_heads, width).index_copy_(0, meta.slot_mapping, rows)
            out.append(dequantize_kv_rows(rows, code_dtype, dtype) if meta.num_prefills else x)
        return out[0], out[1]

    @staticmethod
    def _gather(kv_cache: torch.Tensor, which: int, blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """kv_cache[which][blocks] in `dtype` (with an 8-bit cache: those blocks dequantized)."""
        if kv_cache.element_size() != 1:
            return kv_cache[which][blocks]
        return dequantize_kv_rows(kv_cache[which].view(torch.uint8)[blocks], kv_cache.dtype, dtype)

    # ---- decode -----------------------------------------------------------------------
    def _decode_gather(self, spec: AttentionSpec, meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ids to read [B, n] and the validity mask [B, 1, 1, n * block_size]; shared by all
        layers with the same window."""
        key = ("decode", spec.sliding_window)
        if key in meta.cache:
            return meta.cache[key]
        bs = meta.block_size
        tables, seq_lens = meta.decode_block_tables, meta.decode_seq_lens
        max_blocks = tables.shape[1]
        window = spec.sliding_window
        if window is None or window >= max_blocks * bs:
            first = torch.zeros_like(seq_lens)
            n = max_blocks
            blocks = tables
        else:
            first = torch.clamp(seq_lens - window, min=0) // bs
            n = min(max_blocks, -(-window // bs) + 1)
            idx = (first[:, None] + torch.arange(n, device=tables.device)).clamp_(max=max_blocks - 1)
            blocks = tables.gather(1, idx)
        pos = (first[:, None] * bs + torch.arange(n * bs, device=tables.device)[None, :])
        valid = pos < seq_lens[:, None]
        if window is not None:
            valid &= pos >= (seq_lens[:, None] - window)
        result = (blocks, valid[:, None, None, :])
        meta.cache[key] = result
        return result

    def _decode(self, spec: AttentionSpec, q: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        blocks, mask = self._decode_gather(spec, meta)
        b, n = blocks.shape
        # [B, n, bs, Hkv, D] -> [B, Hkv, n*bs, D]
        keys = self._gather(kv_cache, 0, blocks, q.dtype).view(b, n * meta.block_size, spec.num_kv_heads,
                                                                spec.head_dim).transpose(1, 2)
        values = self._gather(kv_cache, 1, blocks, q.dtype).view(b, n * meta.block_size, spec.num_kv_heads,
                                                                  spec.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q[:, :, None, :], keys, values, attn_mask=mask, scale=spec.scale,
                                             enable_gqa=spec.num_heads != spec.num_kv_heads)
        return out[:, :, 0, :]

    # ---- prefill ----------------------------------------------------------------------
    def _prefill(self, spec: AttentionSpec, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        ctx, qlen = meta.prefill_context_lens[i], meta.prefill_query_lens[i]
        window = spec.sliding_window
        gqa = spec.num_heads != spec.num_kv_heads
        qh = q.transpose(0, 1)[None]  # [1, Hq, qlen, D]
        if ctx == 0:
            keys, values, kv_start = k, v, 0
        else:
            bs = meta.block_size
            kv_start = 0 if window is None else max(0, ctx - window + 1)
            first_block = kv_start // bs
            kv_start = first_block * bs
            table = meta.prefill_block_tables[i][first_block:]
            seq_len = ctx + qlen
            keys = self._gather(kv_cache, 0, table, q.dtype).flatten(0, 1)[:seq_len - kv_start]
            values = self._gather(kv_cache, 1, table, q.dtype).flatten(0, 1)[:seq_len - kv_start]
        kh, vh = keys.transpose(0, 1)[None], values.transpose(0, 1)[None]
        kv_len = kh.shape[2]
        tree = meta.prefill_trees[i] if meta.prefill_trees else None
        if tree is not None:
            mask = self._tree_mask(spec, meta, i, kv_start, kv_len)
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=spec.scale, enable_gqa=gqa)
        elif ctx == 0 and (window is None or qlen <= window):
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=spec.scale, enable_gqa=gqa)
        else:
            q_pos = torch.arange(ctx, ctx + qlen, device=q.device)[:, None]
            k_pos = torch.arange(kv_start, kv_start + kv_len, device=q.device)[None, :]
            mask = k_pos <= q_pos
            if window is not None:
                mask &= k_pos > q_pos - window
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=spec.scale, enable_gqa=gqa)
        return out[0].transpose(0, 1)

    @staticmethod
    def _tree_mask(spec: AttentionSpec, meta: AttentionMetadata, i: int, kv_start: int, kv_len: int) -> torch.Tensor:
        """A token tree's mask over keys [kv_start, kv_start + kv_len): the context (keys before
        the chunk, within the window of each query's own position) and the chunk's keys the tree
        mask allows (its ancestors and itself; all within any window, as a tree is shallow)."""
        key = ("tree", i, spec.sliding_window, kv_start)
        if key not in meta.cache:
            ctx = meta.prefill_context_lens[i]
            q_pos, tree_mask = meta.prefill_trees[i]
            k_pos = torch.arange(kv_start, ctx, device=q_pos.device)[None, :]
            context = k_pos <= q_pos[:, None]
            if spec.sliding_window is not None:
                context &= k_pos > q_pos[:, None] - spec.sliding_window
            meta.cache[key] = torch.cat([context, tree_mask], dim=1)
            assert meta.cache[key].shape[1] == kv_len
        return meta.cache[key]
