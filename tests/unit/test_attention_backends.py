"""Every attention backend against a plain reference computed from contiguous K/V."""
from __future__ import annotations

import math

import pytest
import torch

from heron.runner.attention import AttentionMetadata, get_attention_backend
from heron.runner.attention.base import AttentionSpec


def _reference(q, keys, values, scale, window):
    # q [Hq, D], keys/values [L, Hkv, D]; the query is the last position
    hq, hkv = q.shape[0], keys.shape[1]
    L = keys.shape[0]
    k = keys.repeat_interleave(hq // hkv, dim=1).float()
    v = values.repeat_interleave(hq // hkv, dim=1).float()
    s = torch.einsum("hd,lhd->hl", q.float(), k) * scale
    pos = torch.arange(L)
    if window is not None:
        s[:, pos < L - window] = -math.inf
    return torch.einsum("hl,lhd->hd", torch.softmax(s, -1), v)


def _make_case(dtype, hq, hkv, d, window, seq_lens, bs=16, seed=0, shared=0):
    """Requests' K/V written into scattered blocks; with `shared` (whole blocks) every request's
    first `shared` tokens are the same physical blocks, as after prefix-cache hits."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = 1 + shared // bs + sum(-(-(n - shared) // bs) for n in seq_lens) + 3
    kv = torch.zeros(2, num_blocks, bs, hkv, d, dtype=dtype)
    free = list(torch.randperm(num_blocks - 1, generator=g).add(1).tolist())  # scattered blocks
    common = [free.pop() for _ in range(shared // bs)]
    prefix_k = torch.randn(shared, hkv, d, generator=g).to(dtype)
    prefix_v = torch.randn(shared, hkv, d, generator=g).to(dtype)
    tables, contexts = [], []
    for n in seq_lens:
        blocks = common + [free.pop() for _ in range(-(-(n - shared) // bs))]
        keys = torch.cat([prefix_k, torch.randn(n - shared, hkv, d, generator=g).to(dtype)])
        values = torch.cat([prefix_v, torch.randn(n - shared, hkv, d, generator=g).to(dtype)])
        for p in range(n):
            kv[0, blocks[p // bs], p % bs] = keys[p]
            kv[1, blocks[p // bs], p % bs] = values[p]
        tables.append(blocks)
        contexts.append((keys, values))
    width = max(map(len, tables))
    table_t = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    q = torch.randn(len(seq_lens), hq, d, generator=g).to(dtype)
    return kv, table_t, q, contexts


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("hq,hkv,d,window", [(4, 1, 256, None), (4, 2, 32, 24), (8, 8, 64, None), (4, 1, 48, 40)])
def test_decode_matches_reference(backend, dtype, tol, hq, hkv, d, window):
    be = get_attention_backend(backend)
    seq_lens = [1, 15, 16, 17, 70, 200]
    kv, tables, q, contexts = _make_case(dtype, hq, hkv, d, window, seq_lens)
    spec = AttentionSpec(hq, hkv, d, d ** -0.5, window)
    meta = AttentionMetadata(block_size=16, slot_mapping=torch.zeros(0, dtype=torch.long), num_decodes=len(seq_lens),
                             decode_block_tables=tables, decode_seq_lens=torch.tensor(seq_lens),
                             prefill_query_starts=[], prefill_query_lens=[], prefill_context_lens=[],
                             prefill_block_tables=[], backend=be)
    out = be._decode(spec, q, kv, meta)
    for i, (keys, values) in enumerate(contexts):
        ref = _reference(q[i], keys, values, spec.scale, window)
        torch.testing.assert_close(out[i].float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("bs,window", [(8, None), (32, None), (32, 40)])
def test_decode_block_sizes(backend, dtype, tol, bs, window):
    # blocks shorter and longer than the kernel's 16-wide softmax chunks, and windows that
    # start inside a block
    be = get_attention_backend(backend)
    seq_lens = [1, 7, 31, 33, 100]
    kv, tables, q, contexts = _make_case(dtype, 4, 1, 256, window, seq_lens, bs=bs, seed=1)
    spec = AttentionSpec(4, 1, 256, 256 ** -0.5, window)
    meta = AttentionMetadata(block_size=bs, slot_mapping=torch.zeros(0, dtype=torch.long), num_decodes=len(seq_lens),
                             decode_block_tables=tables, decode_seq_lens=torch.tensor(seq_lens),
                             prefill_query_starts=[], prefill_query_lens=[], prefill_context_lens=[],
                             prefill_block_tables=[], backend=be)
    out = be._decode(spec, q, kv, meta)
    for i, (keys, values) in enumerate(contexts):
        torch.testing.assert_close(out[i].float(), _reference(q[i], keys, values, spec.scale, window),
                                   atol=tol, rtol=tol)


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize("seq_len,window,hkv", [(300, None, 1), (300, 100, 1), (70, None, 1), (129, None, 2)])
def test_single_stream_decode_split_over_threads(threads, seq_len, window, hkv):
    """The portable kernel (float32 here) splits one stream's keys into spans of whole blocks when
    there are fewer (request, kv head) items than threads, and merges the spans: the same
    attention, whichever number of spans (1 thread: none)."""
    be = get_attention_backend("cpu")
    kv, tables, q, contexts = _make_case(torch.float32, 4, hkv, 64, window, [seq_len], seed=threads)
    spec = AttentionSpec(4, hkv, 64, 64 ** -0.5, window)
    meta = AttentionMetadata(block_size=16, slot_mapping=torch.zeros(0, dtype=torch.long), num_decodes=1,
                             decode_block_tables=tables, decode_seq_lens=torch.tensor([seq_len]),
                             prefill_query_starts=[], prefill_query_lens=[], prefill_context_lens=[],
                             prefill_block_tables=[], backend=be)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out = be._decode(spec, q, kv, meta)
    finally:
        torch.set_num_threads(before)
    keys, values = contexts[0]
    torch.testing.assert_close(out[0], _reference(q[0], keys, values, spec.scale, window), atol=1e-5, rtol=1e-5)


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="available: auto, torch, cpu"):
        get_attention_backend("flash")


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("hq,hkv,d,window", [(4, 1, 256, None), (4, 1, 256, 24), (4, 2, 32, 40)])
def test_mixed_step_matches_reference(backend, dtype, tol, hq, hkv, d, window):
    """A step of decode rows and prefill chunks (first chunks and chunks after a cached
    context, some longer than the window) through forward(): every token attends to its own
    prefix. The cpu backend runs the chunks' tokens through the paged kernel in bfloat16."""
    be = get_attention_backend(backend)
    bs = 16
    decode_lens = [9, 40]                        # decodes: context + 1 new token
    chunks = [(0, 37), (20, 13), (33, 1), (50, 30)]  # prefill (cached context, new tokens)
    seq_lens = decode_lens + [c + n for c, n in chunks]
    kv, tables, _, contexts = _make_case(dtype, hq, hkv, d, window, seq_lens, bs=bs, seed=2)
    _run_mixed_step(be, kv, tables, contexts, decode_lens, chunks, AttentionSpec(hq, hkv, d, d ** -0.5, window),
                    dtype, tol)


def _run_mixed_step(be, kv, tables, contexts, decode_lens, chunks, spec, dtype, tol, clear=False, bs=16):
    """One forward() over decode rows and prefill chunks (context, new tokens); every token's
    output against the reference over its own prefix. `clear`: the step's own K/V slots start
    empty (forward() must write them). Returns the step's metadata."""
    g = torch.Generator().manual_seed(5)
    rows = [(i, n - 1) for i, n in enumerate(decode_lens)]
    rows += [(len(decode_lens) + j, c + t) for j, (c, n) in enumerate(chunks) for t in range(n)]
    q = torch.randn(len(rows), spec.num_heads, spec.head_dim, generator=g).to(dtype)
    k = torch.stack([contexts[r][0][p] for r, p in rows])
    v = torch.stack([contexts[r][1][p] for r, p in rows])
    slots = torch.tensor([tables[r, p // bs] * bs + p % bs for r, p in rows])
    if clear:
        for r, p in rows:
            kv[:, tables[r, p // bs], p % bs] = 0
    nd = len(decode_lens)
    starts = [nd + sum(n for _, n in chunks[:j]) for j in range(len(chunks))]
    meta = AttentionMetadata(
        block_size=bs, slot_mapping=slots, num_decodes=nd, decode_block_tables=tables[:nd].contiguous(),
        decode_seq_lens=torch.tensor(decode_lens), prefill_query_starts=starts,
        prefill_query_lens=[n for _, n in chunks], prefill_context_lens=[c for c, _ in chunks],
        prefill_block_tables=[tables[nd + j, :-(-(c + n) // bs)] for j, (c, n) in enumerate(chunks)],
        backend=be)
    out = be.forward(spec, q, k, v, kv, meta)
    for row, (r, p) in enumerate(rows):
        keys, values = contexts[r]
        ref = _reference(q[row], keys[:p + 1], values[:p + 1], spec.scale, spec.sliding_window)
        torch.testing.assert_close(out[row].float(), ref, atol=tol, rtol=tol)
    return meta


def _make_shared_case(dtype, hq, hkv, d, shared, seq_lens, bs=16, seed=3):
    kv, tables, _, contexts = _make_case(dtype, hq, hkv, d, None, seq_lens, bs=bs, seed=seed, shared=shared)
    return kv, tables, contexts


@pytest.mark.parametrize("hq,hkv,d,window", [(4, 1, 256, None), (4, 1, 256, 150), (4, 1, 64, 100), (4, 2, 32, 180), (4, 2, 16, None),
                                             (8, 8, 64, None)])
def test_cascade_decode_matches_reference(hq, hkv, d, window):
    """Decode rows sharing a 160-token cached prefix go through cascade attention (the shared
    keys once for all rows, merged with each row's own by log-sum-exp); rows whose window
    starts inside the prefix are masked there, rows whose window misses it are plain rows."""
    be = get_attention_backend("cpu")
    seq_lens = [161, 170, 200, 175, 400, 161, 190, 165, 230, 177]
    kv, tables, contexts = _make_shared_case(torch.bfloat16, hq, hkv, d, 160, seq_lens)
    q = torch.randn(len(seq_lens), hq, d, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    meta = AttentionMetadata(block_size=16, slot_mapping=torch.zeros(0, dtype=torch.long), num_decodes=len(seq_lens),
                             decode_block_tables=tables, decode_seq_lens=torch.tensor(seq_lens),
                             prefill_query_starts=[], prefill_query_lens=[], prefill_context_lens=[],
                             prefill_block_tables=[], backend=be)
    spec = AttentionSpec(hq, hkv, d, d ** -0.5, window)
    out = be._rows(spec, q, kv, meta, tables, meta.decode_seq_lens)
    plan = meta.cache[("cascade", window)]
    assert plan is not None                      # the shared prefix did take the cascade path
    (rows, _, lo, lp, mask), = plan[0]
    assert lp == 160 and rows.numel() >= 8
    if window == 150:
        assert rows.tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 9] and lo == 11 and mask is not None   # 400 - 150 > 160
    for i, (keys, values) in enumerate(contexts):
        ref = _reference(q[i], keys, values, spec.scale, window)
        torch.testing.assert_close(out[i].float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("first_chunk", [False, True])
@pytest.mark.parametrize("window", [None, 100])
def test_cascade_mixed_step_matches_reference(first_chunk, window):
    """A step of decodes and prefill chunks after a shared cached prefix (the followers of a
    prefix-cache hit), with and without a first chunk in the same step: every token attends
    to its own prefix."""
    hq, hkv, d, bs, shared = 4, 1, 256, 16, 128
    be = get_attention_backend("cpu")
    decode_lens = [140, 129, 131, 160, 135, 145]
    chunks = [(129, 20), (128, 33), (150, 5)] + ([(0, 140)] if first_chunk else [])
    seq_lens = decode_lens + [c + n for c, n in chunks]
    kv, tables, contexts = _make_shared_case(torch.bfloat16, hq, hkv, d, shared, seq_lens, bs=bs, seed=4)
    if first_chunk:   # the last request is unrelated: a prompt of its own from position 0
        last = len(seq_lens) - 1
        kv2, tables2, _, contexts2 = _make_case(torch.bfloat16, hq, hkv, d, window, [140], bs=bs, seed=9)
        base = kv.shape[1]
        kv = torch.cat([kv, kv2[:, 1:]], dim=1)
        row = tables2[0] + base - 1
        tables[last] = torch.cat([row, torch.zeros(tables.shape[1] - row.numel(), dtype=torch.long)])
        contexts[last] = contexts2[0]
    meta = _run_mixed_step(be, kv, tables, contexts, decode_lens, chunks, AttentionSpec(hq, hkv, d, d ** -0.5, window),
                           torch.bfloat16, 2e-2, clear=True, bs=bs)
    assert meta.cache[("cascade", window)] is not None
