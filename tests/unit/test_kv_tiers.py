from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

from heron.core.kv_tiers import MAGIC, DiskKVTier, KVLayout, MemoryKVTier

BS = 4  # block size of the tiny layout


def _layout(dtype: torch.dtype = torch.float32, model_id: str = "tiny-model") -> KVLayout:
    return KVLayout(model_id=model_id, dtype=dtype, num_layers=2, block_size=BS, num_kv_heads=1, head_dim=8)


def _block(i: int, layout: KVLayout | None = None) -> tuple[bytes, list[int], torch.Tensor]:
    """(hash, prefix tokens, payload) of a one-block sequence; distinct data for each i."""
    layout = layout or _layout()
    tokens = [i * 10 + j for j in range(BS)]
    block_hash = hashlib.blake2b(repr(tokens).encode(), digest_size=16).digest()
    gen = torch.Generator().manual_seed(i)
    payload = torch.randn(layout.shape, generator=gen).to(layout.dtype)
    return block_hash, tokens, payload


def _disk(tmp_path: Path, capacity_gib: float = 1.0, layout: KVLayout | None = None, **kw) -> DiskKVTier:
    return DiskKVTier(tmp_path / "kv", capacity_gib, layout or _layout(), **kw)


def _file_nbytes(tmp_path: Path, layout: KVLayout | None = None) -> int:
    """Size of one block file of the tiny layout (measured with a throwaway tier)."""
    with DiskKVTier(tmp_path / "probe", 1.0, layout or _layout()) as probe:
        h, tokens, payload = _block(0, layout)
        probe.store(h, tokens, b"", payload)
        probe.flush()
        return probe.bytes_used


def _flip_byte(path: Path, offset_from_end: int) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------------------ layout


def test_layout_shape_nbytes_and_digest():
    a = _layout(torch.bfloat16)
    assert a.shape == (2, 2, BS, 1, 8)
    assert a.block_nbytes == 2 * 2 * BS * 8 * 2
    assert a.digest() == _layout(torch.bfloat16).digest() and len(a.digest()) == 16
    assert a.digest() != _layout(torch.float32).digest()
    assert a.digest() != _layout(torch.bfloat16, model_id="other").digest()
    with pytest.raises(ValueError, match="num_layers"):
        KVLayout("m", torch.float32, 0, BS, 1, 8)


@pytest.mark.parametrize("capacity", [0, -1.0])
def test_capacity_must_be_positive(tmp_path, capacity):
    with pytest.raises(ValueError, match="capacity must be > 0"):
        MemoryKVTier(capacity, _layout())
    with pytest.raises(ValueError, match="capacity must be > 0"):
        DiskKVTier(tmp_path, capacity, _layout())


# ----------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_memory_round_trip(dtype):
    layout = _layout(dtype)
    tier = MemoryKVTier(1.0, layout)
    h, tokens, payload = _block(1, layout)
    assert not tier.contains(h)
    assert tier.store(h, tokens, b"", payload)
    assert tier.contains(h)
    out = tier.load(h, tokens, b"")
    assert out is not None and out.dtype == dtype and torch.equal(out, payload)
    assert out.data_ptr() != payload.data_ptr()
    assert tier.load(_block(2)[0], tokens, b"") is None
    s = tier.stats()
    assert (s["stores"], s["hits"], s["misses"], s["num_blocks"]) == (1, 1, 1, 1)
    assert s["bytes_used"] == layout.block_nbytes == tier.bytes_used


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_disk_round_trip(tmp_path, dtype):
    layout = _layout(dtype)
    with _disk(tmp_path, layout=layout) as tier:
        h, tokens, payload = _block(1, layout)
        assert tier.store(h, tokens, b"", payload)
        assert tier.contains(h)
        assert tier.flush(timeout=10)
        path = tier.dir / h.hex()[:2] / f"{h.hex()}.kvb"
        assert path.is_file() and path.read_bytes().startswith(MAGIC)
        assert tier.stats()["pending"] == 0 and tier.num_blocks == 1
        assert tier.bytes_used == path.stat().st_size
        out = tier.load(h, tokens, b"")
        assert out is not None and out.dtype == dtype and out.shape == layout.shape
        assert torch.equal(out, payload) and out.data_ptr() != payload.data_ptr()
        out.zero_()  # the caller owns the result
        assert torch.equal(tier.load(h, tokens, b""), payload)
        assert tier.stats()["hits"] == 2
        info = json.loads((tier.dir / "layout.json").read_text())
        assert info["model_id"] == "tiny-model" and info["digest"] == layout.digest()


def test_disk_pending_write_is_served_from_memory(tmp_path, monkeypatch):
    tier = _disk(tmp_path)
    gate = threading.Event()
    real_write = tier._write_file

    def blocked_write(path, chunks):
        gate.wait(10)
        real_write(path, chunks)

    monkeypatch.setattr(tier, "_write_file", blocked_write)
    h, tokens, payload = _block(1)
    assert tier.store(h, tokens, b"", payload)
    assert tier.contains(h) and tier.stats()["pending"] == 1
    out = tier.load(h, tokens, b"")
    assert out is not None and torch.equal(out, payload) and out.data_ptr() != payload.data_ptr()
    assert tier.load(h, [99] * BS, b"") is None and tier.stats()["mismatch"] == 1
    assert not tier.flush(timeout=0.05)  # still blocked
    gate.set()
    tier.close()
    assert tier.num_blocks == 1 and torch.equal(tier.load(h, tokens, b""), payload)


# ------------------------------------------------------------------------------------------- dedup


def test_store_same_hash_twice_is_skipped(tmp_path):
    for tier in (MemoryKVTier(1.0, _layout()), _disk(tmp_path)):
        h, tokens, payload = _block(1)
        assert tier.store(h, tokens, b"", payload)
        assert not tier.store(h, tokens, b"", payload)  # pending (disk) or stored
        tier.flush()
        assert not tier.store(h, tokens, b"", payload)  # on disk
        s = tier.stats()
        assert s["stores"] == 1 and s["store_skipped"] == 2 and s["num_blocks"] == 1
        tier.close()


# ----------------------------------------------------------------------------------------- restart


def test_disk_survives_restart_and_separates_layouts(tmp_path):
    h, tokens, payload = _block(1)
    tier = _disk(tmp_path)
    tier.store(h, tokens, b"", payload)
    tier.close()
    tier.close()  # idempotent
    assert not tier.store(*_block(2)[:2], b"", _block(2)[2])  # refused after close

    with _disk(tmp_path) as again:
        assert again.contains(h) and again.num_blocks == 1
        out = again.load(h, tokens, b"")
        assert out is not None and torch.equal(out, payload)

    other_model = _layout(model_id="another-model")
    with _disk(tmp_path, layout=other_model) as other:
        assert not other.contains(h) and other.load(h, tokens, b"") is None
    other_dtype = _layout(torch.bfloat16)
    with _disk(tmp_path, layout=other_dtype) as other:
        assert other.load(h, tokens, b"") is None


def test_disk_restart_keeps_lru_order_by_mtime_and_enforces_capacity(tmp_path):
    size = _file_nbytes(tmp_path)
    blocks = [_block(i) for i in range(3)]
    with _disk(tmp_path) as tier:
        for h, tokens, payload in blocks:
            tier.store(h, tokens, b"", payload)
        tier.flush()
        paths = [tier._path(h) for h, _, _ in blocks]
    # block 1 is the least recently used, then 2, then 0
    for path, mtime in zip(paths, (3_000, 1_000, 2_000), strict=True):
        os.utime(path, (mtime, mtime))
    with _disk(tmp_path, capacity_gib=2.5 * size / 2**30) as tier:
        assert tier.num_blocks == 2 and tier.stats()["evictions"] == 1
        assert not paths[1].exists() and not tier.contains(blocks[1][0])
        assert list(tier._index) == [blocks[2][0], blocks[0][0]]


def test_leftover_tmp_files_are_removed_at_startup(tmp_path):
    h, tokens, payload = _block(1)
    with _disk(tmp_path) as tier:
        tier.store(h, tokens, b"", payload)
        tier.flush()
        sub = tier._path(h).parent
    leftovers = [sub / f".{h.hex()}.kvb.123.456.tmp", tier.dir / ".layout.json.1.2.tmp"]
    for p in leftovers:
        p.write_bytes(b"half written")
    stray = sub / "not-a-hash.kvb"
    stray.write_bytes(b"x")
    with _disk(tmp_path) as tier:
        assert not any(p.exists() for p in leftovers) and not stray.exists()
        assert tier.num_blocks == 1 and torch.equal(tier.load(h, tokens, b""), payload)


# ------------------------------------------------------------------------------------- verification


def _stored(tmp_path, layout: KVLayout | None = None):
    tier = _disk(tmp_path, layout=layout)
    h, tokens, payload = _block(1, layout)
    tier.store(h, tokens, b"", payload)
    tier.flush()
    return tier, h, tokens, payload, tier._path(h)


def _assert_dropped_as_corrupt(tier: DiskKVTier, h: bytes, tokens: list[int], path: Path) -> None:
    before = tier.stats()
    assert tier.load(h, tokens, b"") is None
    assert not path.exists() and not tier.contains(h)
    s = tier.stats()
    assert s["corrupt"] == 1 and s["misses"] == 1 and s["hits"] == 0
    assert s["num_blocks"] == before["num_blocks"] - 1
    assert s["bytes_used"] == sum(p.stat().st_size for p in tier.dir.rglob("*.kvb"))
    # the block can be stored again afterwards
    _, _, payload = _block(1, tier.layout)
    assert tier.store(h, tokens, b"", payload)
    tier.flush()
    assert torch.equal(tier.load(h, tokens, b""), payload)
    tier.close()


def test_flipped_payload_byte_is_corrupt(tmp_path, caplog):
    tier, h, tokens, _, path = _stored(tmp_path)
    _flip_byte(path, 5)  # inside the payload (the last bytes of the file)
    with caplog.at_level(logging.WARNING, logger="heron.core.kv_tiers"):
        _assert_dropped_as_corrupt(tier, h, tokens, path)
    assert "damaged block file" in caplog.text


def test_truncated_file_is_corrupt(tmp_path):
    tier, h, tokens, _, path = _stored(tmp_path)
    path.write_bytes(path.read_bytes()[:-1])
    _assert_dropped_as_corrupt(tier, h, tokens, path)


def test_garbage_file_is_corrupt(tmp_path):
    tier, h, tokens, _, path = _stored(tmp_path)
    path.write_bytes(os.urandom(300))
    _assert_dropped_as_corrupt(tier, h, tokens, path)


def test_bad_magic_is_corrupt(tmp_path):
    tier, h, tokens, _, path = _stored(tmp_path)
    data = bytearray(path.read_bytes())
    data[7:8] = b"2"  # HERONKV2: another format version
    path.write_bytes(bytes(data))
    _assert_dropped_as_corrupt(tier, h, tokens, path)


def test_file_with_another_hash_in_its_header_is_corrupt(tmp_path):
    tier, h, tokens, _, path = _stored(tmp_path)
    h2, tokens2, payload2 = _block(2)
    tier.store(h2, tokens2, b"", payload2)
    tier.flush()
    shutil.copyfile(tier._path(h2), path)  # a valid file, under the wrong name
    _assert_dropped_as_corrupt(tier, h, tokens, path)


def test_file_of_another_layout_is_corrupt(tmp_path):
    tier, h, tokens, _, path = _stored(tmp_path)
    other = _disk(tmp_path, layout=_layout(model_id="other"))
    other.store(h, tokens, b"", _block(1)[2])
    other.flush()
    shutil.copyfile(other._path(h), path)  # same hash and shape, but the header names another layout
    _assert_dropped_as_corrupt(tier, h, tokens, path)
    other.close()


def test_disk_tokens_mismatch_is_a_miss_and_keeps_the_file(tmp_path):
    tier, h, tokens, payload, path = _stored(tmp_path)
    assert tier.load(h, [t + 1 for t in tokens], b"") is None
    assert tier.load(h, [*tokens, 1, 2, 3, 4], b"") is None  # longer prefix
    s = tier.stats()
    assert s["mismatch"] == 2 and s["corrupt"] == 0 and s["misses"] == 2
    assert path.exists() and tier.contains(h)
    assert torch.equal(tier.load(h, tokens, b""), payload)
    tier.close()


def test_extra_key_mismatch_is_a_miss(tmp_path):
    mem = MemoryKVTier(1.0, _layout())
    disk = _disk(tmp_path)
    h, tokens, payload = _block(1)
    for tier in (mem, disk):
        assert tier.store(h, tokens, b"adapter-1", payload)
        tier.flush()
        assert tier.load(h, tokens, b"") is None
        assert tier.load(h, tokens, b"adapter-2") is None
        assert tier.stats()["mismatch"] == 2
        assert torch.equal(tier.load(h, tokens, b"adapter-1"), payload)
    disk.close()


def test_memory_tokens_mismatch_is_a_miss():
    tier = MemoryKVTier(1.0, _layout())
    h, tokens, payload = _block(1)
    tier.store(h, tokens, b"", payload)
    assert tier.load(h, [0] * BS, b"") is None
    assert tier.stats()["mismatch"] == 1 and tier.contains(h)
    assert torch.equal(tier.load(h, tokens, b""), payload)


# -------------------------------------------------------------------------------------- capacity/LRU


def _lru_scenario(tier, flush) -> None:
    """Capacity for 3 blocks. Store A, B, C; a hit on A makes B the oldest, so D evicts B; then a hit
    on C leaves the order A, D, C, so E evicts A."""
    a, b, c, d, e = (_block(i) for i in range(5))
    for blk in (a, b, c):
        assert tier.store(blk[0], blk[1], b"", blk[2])
        flush()
    assert tier.num_blocks == 3 and tier.stats()["evictions"] == 0
    assert torch.equal(tier.load(a[0], a[1], b""), a[2])  # order: B, C, A
    assert tier.store(d[0], d[1], b"", d[2])
    flush()  # order: C, A, D -> B evicted
    assert [tier.contains(x[0]) for x in (a, b, c, d)] == [True, False, True, True]
    assert tier.load(b[0], b[1], b"") is None
    assert torch.equal(tier.load(c[0], c[1], b""), c[2])  # order: A, D, C
    assert tier.store(e[0], e[1], b"", e[2])
    flush()  # order: D, C, E -> A evicted
    assert [tier.contains(x[0]) for x in (a, b, c, d, e)] == [False, False, True, True, True]
    s = tier.stats()
    assert s["evictions"] == 2 and s["num_blocks"] == 3


def test_memory_lru_eviction():
    layout = _layout()
    tier = MemoryKVTier(3.5 * layout.block_nbytes / 2**30, layout)
    _lru_scenario(tier, tier.flush)
    assert tier.bytes_used == 3 * layout.block_nbytes


def test_disk_lru_eviction(tmp_path):
    size = _file_nbytes(tmp_path)
    tier = _disk(tmp_path, capacity_gib=3.5 * size / 2**30)
    _lru_scenario(tier, tier.flush)
    assert tier.bytes_used == 3 * size
    files = sorted(p.name for p in tier.dir.rglob("*.kvb"))
    assert files == sorted(tier._path(h).name for h in tier._index)
    tier.close()


def test_block_larger_than_capacity_is_dropped(tmp_path):
    layout = _layout()
    tiny = 0.5 * layout.block_nbytes / 2**30
    for tier in (MemoryKVTier(tiny, layout), _disk(tmp_path, capacity_gib=tiny)):
        h, tokens, payload = _block(1)
        assert not tier.store(h, tokens, b"", payload)
        assert tier.stats()["store_dropped"] == 1 and not tier.contains(h)
        tier.close()


# ------------------------------------------------------------------------------------- bad arguments


def test_wrong_payload_or_tokens_raise_value_error(tmp_path):
    layout = _layout()
    h, tokens, payload = _block(1)
    for tier in (MemoryKVTier(1.0, layout), _disk(tmp_path)):
        with pytest.raises(ValueError, match="shape"):
            tier.store(h, tokens, b"", payload[:1])
        with pytest.raises(ValueError, match="dtype"):
            tier.store(h, tokens, b"", payload.to(torch.float16))
        with pytest.raises(ValueError, match="contiguous"):
            tier.store(h, tokens, b"", payload.transpose(0, 1).contiguous().transpose(0, 1))
        with pytest.raises(ValueError, match="multiple of block_size"):
            tier.store(h, tokens[:-1], b"", payload)
        assert tier.stats()["stores"] == 0 and not tier.contains(h)
        tier.close()


# ---------------------------------------------------------------------------------------- I/O errors


def test_root_that_cannot_be_created_raises_oserror(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="KV disk tier: cannot use directory"):
        DiskKVTier(blocker / "kv", 1.0, _layout())


def test_write_errors_are_counted_not_raised(tmp_path, caplog):
    tier = _disk(tmp_path)
    # the directory disappears after startup and a regular file takes its place
    shutil.rmtree(tier.dir)
    tier.dir.write_text("in the way")
    blocks = [_block(i) for i in range(2)]
    with caplog.at_level(logging.WARNING, logger="heron.core.kv_tiers"):
        for h, tokens, payload in blocks:
            assert tier.store(h, tokens, b"", payload)
        assert tier.flush(timeout=10)
    s = tier.stats()
    assert s["write_errors"] == 2 and s["pending"] == 0 and s["num_blocks"] == 0
    assert caplog.text.count("cannot write") == 1  # one warning, not one per block
    for h, tokens, _ in blocks:
        assert not tier.contains(h) and tier.load(h, tokens, b"") is None
    tier.close()


def test_unreadable_block_file_is_a_miss(tmp_path):
    tier, h, tokens, _, path = _stored(tmp_path)
    path.unlink()
    path.mkdir()  # reading a directory fails with an OSError
    assert tier.load(h, tokens, b"") is None
    assert tier.stats()["corrupt"] == 1 and not tier.contains(h)
    tier.close()


# -------------------------------------------------------------------------------------- backpressure


def test_backpressure_drops_stores_while_the_writer_is_blocked(tmp_path, monkeypatch):
    layout = _layout()
    # room for one pending block and a half
    tier = _disk(tmp_path, max_pending_mib=1.5 * layout.block_nbytes / 2**20)
    gate, entered = threading.Event(), threading.Event()
    real_write = tier._write_file

    def blocked_write(path, chunks):
        entered.set()
        assert gate.wait(10)
        real_write(path, chunks)

    monkeypatch.setattr(tier, "_write_file", blocked_write)
    blocks = [_block(i) for i in range(4)]
    assert tier.store(blocks[0][0], blocks[0][1], b"", blocks[0][2])
    assert entered.wait(10)  # the writer holds block 0
    results = [tier.store(h, tokens, b"", payload) for h, tokens, payload in blocks[1:]]
    assert results == [False, False, False]
    s = tier.stats()
    assert s["store_dropped"] == 3 and s["stores"] == 1 and s["pending"] == 1
    assert s["pending_bytes"] == layout.block_nbytes
    assert not tier.contains(blocks[1][0])
    gate.set()
    assert tier.flush(timeout=10)
    assert tier.num_blocks == 1 and tier.stats()["pending_bytes"] == 0
    # with the queue drained, stores are accepted again
    assert tier.store(blocks[1][0], blocks[1][1], b"", blocks[1][2])
    tier.close()
    assert tier.num_blocks == 2


def test_tiny_pending_limit_still_writes_one_block_at_a_time(tmp_path):
    with _disk(tmp_path, max_pending_mib=0) as tier:
        h, tokens, payload = _block(1)
        assert tier.store(h, tokens, b"", payload)
        tier.flush()
        assert tier.load(h, tokens, b"") is not None
