"""The 8-bit KV cache (--kv-cache-dtype int8|fp8): quantization bounds, the torch and C++
writers storing the same bytes, and both attention backends against a plain reference that
attends to the quantize-dequantized keys and values."""
from __future__ import annotations

import math

import pytest
import torch

from heron.ops.cpu import kernel_error, load_kernel
from heron.runner.attention import AttentionMetadata, get_attention_backend
from heron.runner.attention.base import AttentionSpec
from heron.runner.kv_cache import (SCALE_BYTES, allocate_kv_caches, dequantize_kv_rows, kv_bytes_per_block,
                                   kv_code_dtype, pack_kv_rows, quantize_kv, unpack_kv_rows)

CODES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
BACKENDS = ["torch"] + (["cpu"] if load_kernel() is not None else [])


def _rand(*shape, seed=0, dtype=torch.float32, spread=20):
    g = torch.Generator().manual_seed(seed)
    # rows of different magnitudes (a factor up to 2^spread), so per-row scales matter
    return (torch.randn(*shape, generator=g) * torch.rand(*shape[:-1], 1, generator=g).mul(spread).exp2()
            .div(2 ** (spread / 2))).to(dtype)


# ---- quantization ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_error_bounds(name, dtype):
    x = _rand(300, 3, 64, seed=1, dtype=dtype)
    x[5, 1] = 0   # an all-zero row
    x[7, 2, 9] = -x[7, 2].float().abs().max() * 3  # one outlier
    codes, scales = quantize_kv(x, CODES[name])
    assert codes.dtype == CODES[name] and scales.dtype == torch.float32 and scales.shape == (300, 3, 1)
    xf = x.float()
    amax = xf.abs().amax(-1, keepdim=True)
    deq = codes.float() * scales
    err = (deq - xf).abs()
    if name == "int8":
        assert codes.abs().max().item() <= 127
        row_max = codes.abs().amax(-1, keepdim=True)
        assert bool((row_max[amax > 0] == 127).all())           # every nonzero row uses the full range
        bound = amax / 254 * (1 + 1e-5)                          # half a step of amax / 127
    else:
        # e4m3: 3 mantissa bits (half a step is at most 1/16 of the value), subnormal steps of 2^-9
        bound = torch.maximum(xf.abs() / 16, 2.0 ** -10 * scales) * (1 + 1e-5)
    assert bool((err <= bound).all()), (err - bound).max()
    assert torch.equal(scales[5, 1], torch.zeros(1)) and not codes.float()[5, 1].any()
    # the mean error is far below the bound: a real rounding, not a truncation
    assert err.mean() < bound.mean() * (0.6 if name == "int8" else 0.8)


def test_values_on_the_grid_round_trip_exactly():
    # int8: integers times a power of two with the row maximum 127 * 2^-3
    x = torch.randint(-127, 128, (10, 2, 32)).float() * 0.125
    x[:, :, 0] = 127 * 0.125
    codes, scales = quantize_kv(x, torch.int8)
    assert torch.equal(codes.float() * scales, x)
    # fp8: e4m3 values, row maximum 448 (scale 1)
    f = torch.randn(10, 2, 32).mul(50).to(torch.float8_e4m3fn).float()
    f[:, :, 0] = 448.0
    codes, scales = quantize_kv(f, torch.float8_e4m3fn)
    assert torch.equal(codes.float() * scales, f)


@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_packed_rows_layout(name):
    x = _rand(6, 2, 16, seed=2)
    rows = pack_kv_rows(x, CODES[name])
    assert rows.dtype == torch.uint8 and rows.shape == (6, 2, 16 + SCALE_BYTES)
    codes, scales = quantize_kv(x, CODES[name])
    c2, s2 = unpack_kv_rows(rows, CODES[name])
    assert torch.equal(c2.view(torch.uint8), codes.view(torch.uint8)) and torch.equal(s2, scales)
    # the scale is the row's last 4 bytes, float32 little-endian
    assert torch.equal(rows[..., 16:].contiguous().view(torch.float32), scales)
    torch.testing.assert_close(dequantize_kv_rows(rows, CODES[name], torch.float32), codes.float() * scales,
                               rtol=0, atol=0)


def test_code_dtypes_and_sizes():
    assert kv_code_dtype("auto") is None
    assert kv_code_dtype("int8") == torch.int8 and kv_code_dtype("fp8") == torch.float8_e4m3fn
    with pytest.raises(ValueError, match="auto, int8, fp8"):
        kv_code_dtype("int4")
    bf16 = kv_bytes_per_block(18, 16, 1, 256, torch.bfloat16)
    q8 = kv_bytes_per_block(18, 16, 1, 256, torch.bfloat16, torch.int8)
    assert bf16 == 18 * 2 * 16 * 256 * 2 and q8 == 18 * 2 * 16 * (256 + 4)
    kv = allocate_kv_caches(2, 5, 16, 1, 256, torch.bfloat16, torch.device("cpu"), torch.int8)
    assert len(kv) == 2 and kv[0].shape == (2, 5, 16, 1, 260) and kv[0].dtype == torch.int8
    assert sum(t.numel() for t in kv) == 5 * kv_bytes_per_block(2, 16, 1, 256, torch.bfloat16, torch.int8)
    with pytest.raises(ValueError, match="multiple of 4"):
        allocate_kv_caches(1, 4, 16, 1, 30, torch.bfloat16, torch.device("cpu"), torch.int8)


@pytest.mark.skipif(load_kernel() is None, reason=f"heron's CPU kernels did not build: {kernel_error()}")
@pytest.mark.parametrize("name", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_writer_stores_the_torch_writers_bytes(name, dtype):
    h, d, bs, n = 2, 48, 16, 9
    k, v = _rand(37, h, d, seed=3, dtype=dtype), _rand(37, h, d, seed=4, dtype=dtype)
    k[4, 0] = 0
    slots = torch.randperm(n * bs, generator=torch.Generator().manual_seed(0))[:37]
    a = allocate_kv_caches(1, n, bs, h, d, dtype, torch.device("cpu"), CODES[name])[0]
    b = a.clone()
    spec = AttentionSpec(4, h, d, d ** -0.5)
    get_attention_backend("torch")._write_quantized(spec, k, v, a, _meta(bs, slots), dtype)
    empty = torch.zeros(0, 4, d, dtype=dtype)
    load_kernel().paged_decode(empty, b, torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, dtype=torch.long), 0,
                               1.0, k, v, slots)
    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    assert a.view(torch.uint8).any()


# ---- attention over an 8-bit cache -------------------------------------------------------------
def _meta(bs, slots, num_decodes=0, tables=None, seq_lens=None, prefills=(), be=None):
    return AttentionMetadata(
        block_size=bs, slot_mapping=slots, num_decodes=num_decodes,
        decode_block_tables=tables if tables is not None else torch.zeros(0, 1, dtype=torch.long),
        decode_seq_lens=seq_lens if seq_lens is not None else torch.zeros(0, dtype=torch.long),
        prefill_query_starts=[p[0] for p in prefills], prefill_query_lens=[p[1] for p in prefills],
        prefill_context_lens=[p[2] for p in prefills], prefill_block_tables=[p[3] for p in prefills], backend=be)


def _attend(q, keys, values, scale, window, q_positions):
    """q [Q, Hq, D] at `q_positions`, keys/values [L, Hkv, D] at positions 0..L-1: causal (and
    windowed) attention in float64."""
    hq, hkv = q.shape[1], keys.shape[1]
    k = keys.double().repeat_interleave(hq // hkv, dim=1)
    v = values.double().repeat_interleave(hq // hkv, dim=1)
    s = torch.einsum("qhd,lhd->qhl", q.double(), k) * scale
    qp = torch.tensor(q_positions)[:, None]
    kp = torch.arange(keys.shape[0])[None, :]
    allowed = kp <= qp
    if window is not None:
        allowed &= kp > qp - window
    s = s.masked_fill(~allowed[:, None, :], -math.inf)
    return torch.einsum("qhl,lhd->qhd", torch.softmax(s, -1), v)


class _Pool:
    """An 8-bit cache with a few sequences written at scattered blocks through a backend."""

    def __init__(self, name, dtype, hkv, d, seq_lens, bs, seed=0, num_blocks=None):
        g = torch.Generator().manual_seed(seed)
        self.bs, self.dtype, self.code = bs, dtype, CODES[name]
        num_blocks = num_blocks or 1 + sum(-(-n // bs) + 1 for n in seq_lens) + 3
        self.kv = allocate_kv_caches(1, num_blocks, bs, hkv, d, dtype, torch.device("cpu"), self.code)[0]
        free = torch.randperm(num_blocks - 1, generator=g).add(1).tolist()
        self.tables, self.keys, self.values = [], [], []
        for n in seq_lens:
            blocks = [free.pop() for _ in range(-(-n // bs) + 1)]  # one spare block for a decode/chunk
            self.tables.append(blocks)
            self.keys.append(_rand(n, hkv, d, seed=int(torch.randint(1 << 30, (1,), generator=g)), dtype=dtype,
                                     spread=3))
            self.values.append(_rand(n, hkv, d, seed=int(torch.randint(1 << 30, (1,), generator=g)), dtype=dtype,
                                     spread=3))
            slots = torch.tensor([blocks[p // bs] * bs + p % bs for p in range(n)])
            get_attention_backend("torch")._write_quantized(AttentionSpec(hkv, hkv, d, 1.0), self.keys[-1],
                                                           self.values[-1], self.kv, _meta(bs, slots), dtype)

    def dequantized(self, i, keys_too=True):
        """What the cache holds for sequence i: its keys/values quantized and dequantized."""
        qd = lambda x: (lambda c, s: c.float() * s)(*quantize_kv(x, self.code))  # noqa: E731
        return qd(self.keys[i]), qd(self.values[i])

    def table_tensor(self):
        width = max(map(len, self.tables))
        return torch.tensor([t + [0] * (width - len(t)) for t in self.tables])


TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d,window,bs", [(4, 1, 256, None, 16), (4, 2, 32, 24, 16), (8, 8, 64, None, 8),
                                                (4, 1, 48, 40, 32), (6, 2, 20, None, 16), (8, 1, 16, 7, 16)])
def test_decode_matches_dequantized_reference(backend, name, dtype, hq, hkv, d, window, bs):
    # (6, 2, 20): a group size and a head dim without an AVX-512 instantiation (portable kernel)
    be = get_attention_backend(backend)
    seq_lens = [1, 15, 16, 17, 70, 200]
    pool = _Pool(name, dtype, hkv, d, seq_lens, bs, seed=hq * d)
    q = _rand(len(seq_lens), hq, d, seed=5, dtype=dtype, spread=3)
    spec = AttentionSpec(hq, hkv, d, d ** -0.5, window)
    meta = _meta(bs, torch.zeros(0, dtype=torch.long), len(seq_lens), pool.table_tensor(), torch.tensor(seq_lens),
                 be=be)
    out = be._decode(spec, q, pool.kv, meta)
    assert out.dtype == dtype
    for i, n in enumerate(seq_lens):
        keys, values = pool.dequantized(i)
        ref = _attend(q[i:i + 1], keys, values, spec.scale, window, [n - 1])[0]
        torch.testing.assert_close(out[i].double(), ref, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["int8", "fp8"])
@pytest.mark.parametrize("window", [None, 20])
def test_step_with_decodes_and_prefill_chunks(backend, name, window):
    """One forward with two decodes, a prefill chunk after cached context and a first chunk:
    every row equals the reference over the quantize-dequantized K/V of its sequence (its own
    new tokens included), and the step's K/V land in the cache."""
    dtype, hq, hkv, d, bs = torch.float32, 4, 2, 32, 16
    ctx = [30, 9, 21, 0]             # cached tokens per sequence
    new = [1, 1, 13, 11]             # this step's tokens
    pool = _Pool(name, dtype, hkv, d, [c + n for c, n in zip(ctx, new)], bs, seed=7)
    # rewrite only the cached part: the step writes the rest
    pool.kv.zero_()
    be_t = get_attention_backend("torch")
    for i, c in enumerate(ctx):
        if c:
            slots = torch.tensor([pool.tables[i][p // bs] * bs + p % bs for p in range(c)])
            be_t._write_quantized(AttentionSpec(hkv, hkv, d, 1.0), pool.keys[i][:c], pool.values[i][:c], pool.kv,
                                  _meta(bs, slots), dtype)
    slots, qs, ks, vs, prefills, row = [], [], [], [], [], 0
    q_all = [_rand(n, hq, d, seed=20 + i, spread=3) for i, n in enumerate(new)]
    for i, (c, n) in enumerate(zip(ctx, new)):
        slots += [pool.tables[i][p // bs] * bs + p % bs for p in range(c, c + n)]
        qs.append(q_all[i])
        ks.append(pool.keys[i][c:])
        vs.append(pool.values[i][c:])
        if i >= 2:
            prefills.append((row, n, c, torch.tensor(pool.tables[i])))
        row += n
    be = get_attention_backend(backend)
    tables = torch.tensor([pool.tables[0], pool.tables[1] + [0] * (len(pool.tables[0]) - len(pool.tables[1]))])
    meta = _meta(bs, torch.tensor(slots), 2, tables, torch.tensor([ctx[0] + 1, ctx[1] + 1]), prefills, be)
    spec = AttentionSpec(hq, hkv, d, d ** -0.5, window)
    out = be.forward(spec, torch.cat(qs), torch.cat(ks), torch.cat(vs), pool.kv, meta)
    row = 0
    for i, (c, n) in enumerate(zip(ctx, new)):
        keys, values = pool.dequantized(i)
        ref = _attend(q_all[i], keys, values, spec.scale, window, list(range(c, c + n)))
        torch.testing.assert_close(out[row:row + n].double(), ref, atol=2e-5, rtol=2e-5)
        row += n
    # the cache now holds every sequence quantized exactly as a direct write would store it
    for i, (c, n) in enumerate(zip(ctx, new)):
        codes, scales = quantize_kv(pool.keys[i], pool.code)
        slots_i = torch.tensor([pool.tables[i][p // bs] * bs + p % bs for p in range(c + n)])
        stored = pool.kv.view(torch.uint8)[0].reshape(-1, hkv, d + SCALE_BYTES)[slots_i]
        c2, s2 = unpack_kv_rows(stored, pool.code)
        assert torch.equal(c2.view(torch.uint8), codes.view(torch.uint8)) and torch.equal(s2, scales)


@pytest.mark.skipif(load_kernel() is None, reason=f"heron's CPU kernels did not build: {kernel_error()}")
@pytest.mark.parametrize("name", ["int8", "fp8"])
def test_cpu_decode_only_step_writes_and_attends(name):
    """The decode-only path (one C++ call: quantize this step's K/V into the slots, attend) gives
    the torch backend's cache bytes and output."""
    dtype, hq, hkv, d, bs = torch.bfloat16, 4, 1, 256, 16
    seq_lens = [5, 16, 40]
    pools = [_Pool(name, dtype, hkv, d, seq_lens, bs, seed=11) for _ in range(2)]
    q = _rand(3, hq, d, seed=12, dtype=dtype, spread=3)
    k, v = _rand(3, hkv, d, seed=13, dtype=dtype, spread=3), _rand(3, hkv, d, seed=14, dtype=dtype, spread=3)
    slots = torch.tensor([t[n // bs] * bs + n % bs for t, n in zip(pools[0].tables, seq_lens)])
    spec = AttentionSpec(hq, hkv, d, 0.0625)
    outs = []
    for pool, backend in zip(pools, ["torch", "cpu"]):
        be = get_attention_backend(backend)
        meta = _meta(bs, slots, 3, pool.table_tensor(), torch.tensor(seq_lens) + 1, be=be)
        outs.append(be.forward(spec, q, k, v, pool.kv, meta))
    assert torch.equal(pools[0].kv.view(torch.uint8), pools[1].kv.view(torch.uint8))
    torch.testing.assert_close(outs[0].float(), outs[1].float(), atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(load_kernel() is None, reason=f"heron's CPU kernels did not build: {kernel_error()}")
def test_fp8_kernel_reads_every_code():
    """Every finite e4m3fn code (normals, subnormals, both zeros) through the kernel's in-register
    conversion: one key per code, one-hot queries pick each value out exactly."""
    codes = torch.arange(256, dtype=torch.uint8)
    finite = codes[~codes.view(torch.float8_e4m3fn).float().isnan()]       # 254 codes
    positive = finite[finite < 128]
    n, d, bs = positive.numel(), 16, 16
    kv = torch.zeros(2, -(-n // bs) + 1, bs, 1, d + SCALE_BYTES, dtype=torch.uint8)
    rows = kv.view(2, -1, 1, d + SCALE_BYTES)
    rows[1, :n, 0, :d] = positive[:, None]                                  # values: every code in every column
    rows[1, :n, 0, d:] = torch.tensor([0.5]).view(torch.uint8)              # scale 0.5
    table = torch.arange(kv.shape[1])[None]
    out = load_kernel().paged_decode(torch.zeros(1, 1, d), kv.view(torch.float8_e4m3fn), table,
                                     torch.tensor([n]), 0, 1.0, None, None, None)
    # all keys are zero: uniform weights, the output is the mean of the values
    want = positive.view(torch.float8_e4m3fn).double().mul(0.5).mean()
    torch.testing.assert_close(out[0, 0].double(), want.expand(d), rtol=1e-5, atol=0)
    # and one key at a time: a single-token context returns that value exactly
    for i in (0, 1, 7, 8, 100, 126, 127, 128, 129, 200, 253):
        kv2 = torch.zeros(2, 2, bs, 1, d + SCALE_BYTES, dtype=torch.uint8)
        kv2[1, 1, 0, 0, :d] = finite[i]
        kv2[1, 1, 0, 0, d:] = torch.tensor([1.0]).view(torch.uint8)
        got = load_kernel().paged_decode(torch.zeros(1, 1, d), kv2.view(torch.float8_e4m3fn),
                                         torch.tensor([[1]]), torch.tensor([1]), 0, 1.0, None, None, None)
        assert torch.equal(got[0, 0], finite[i:i + 1].view(torch.float8_e4m3fn).float().expand(d))


# ---- the prefix cache's tiers with 8-bit payloads -------------------------------------------
def _q8_layout(code=torch.int8, **kw):
    from heron.core.kv_tiers import KVLayout
    return KVLayout(model_id="m", dtype=code, num_layers=2, block_size=4, num_kv_heads=1, head_dim=8,
                    scale_dtype=torch.float32, **kw)


def test_layout_of_an_8bit_cache():
    import hashlib
    import json as _json
    from heron.core.kv_tiers import KVLayout
    bf16 = KVLayout(model_id="m", dtype=torch.bfloat16, num_layers=2, block_size=4, num_kv_heads=1, head_dim=8)
    q8, f8 = _q8_layout(), _q8_layout(torch.float8_e4m3fn)
    assert q8.shape == (2, 2, 4, 1, 8 + SCALE_BYTES) and q8.block_nbytes == 2 * 2 * 4 * 12
    assert len({bf16.digest(), q8.digest(), f8.digest(),
                KVLayout(model_id="m", dtype=torch.int8, num_layers=2, block_size=4, num_kv_heads=1,
                         head_dim=8).digest()}) == 4
    # a model-dtype layout's digest is what it was before 8-bit caches existed (disk tiers stay valid)
    old = {"model_id": "m", "dtype": "bfloat16", "num_layers": 2, "block_size": 4, "num_kv_heads": 1, "head_dim": 8}
    canonical = _json.dumps(old, sort_keys=True, separators=(",", ":")).encode()
    assert bf16.digest() == hashlib.blake2b(canonical, digest_size=8).hexdigest()
    with pytest.raises(ValueError, match="1-byte codes"):
        KVLayout(model_id="m", dtype=torch.bfloat16, num_layers=2, block_size=4, num_kv_heads=1, head_dim=8,
                 scale_dtype=torch.float32)


@pytest.mark.parametrize("code", [torch.int8, torch.float8_e4m3fn])
def test_tiers_round_trip_codes_and_scales_exactly(tmp_path, code):
    from heron.core.kv_tiers import DiskKVTier, MemoryKVTier
    layout = _q8_layout(code)
    x = _rand(2, 2, 4, 1, 8, seed=9)
    payload = torch.cat([t.view(torch.uint8) for t in quantize_kv(x, code)], dim=-1).view(code)
    assert payload.shape == layout.shape
    tokens, h = list(range(4)), b"\x01" * 16
    mem = MemoryKVTier(0.01, layout)
    assert mem.store(h, tokens, b"", payload)
    with DiskKVTier(tmp_path, 0.01, layout) as disk:
        assert disk.store(h, tokens, b"", payload)
        disk.flush()
    with DiskKVTier(tmp_path, 0.01, layout) as disk:     # a restart reads the file
        got_disk = disk.load(h, tokens, b"")
    for got in (mem.load(h, tokens, b""), got_disk):
        assert got.dtype == code and got.shape == layout.shape
        assert torch.equal(got.view(torch.uint8), payload.view(torch.uint8))
    # a bf16 payload does not fit an 8-bit layout
    with pytest.raises(ValueError, match="payload must have shape"):
        mem.store(b"\x02" * 16, tokens, b"", torch.zeros(2, 2, 4, 1, 8, dtype=torch.bfloat16))
