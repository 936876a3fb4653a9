"""Lower tiers of the KV cache: CPU memory and local disk (CachedAttention / AttentionStore style).

The primary tier is the paged KV pool on the accelerator (heron.core.block_pool with the prefix
cache in heron.core.kv_cache_manager). The tiers here sit below it:

* ``MemoryKVTier`` ("cpu") keeps blocks in process memory. Used on CUDA machines, where host RAM
  is much larger than the KV pool; a hit is a host-to-device copy instead of a prefill.
* ``DiskKVTier`` ("disk") keeps blocks as files under a root directory, so they survive evictions
  from every other tier and restarts of the server.

Write-through: as soon as a full block's KV has been computed, the engine hands a CPU copy of it to
every tier (``store``). The memory tier keeps the tensor; the disk tier only queues it, and one
daemon writer thread serializes and writes it, so the engine thread never waits for the disk. When
the pool misses on a block hash, the engine asks the tiers in order (``load``) and copies a hit back
into a fresh pool block instead of recomputing it. Both tiers evict least-recently-used blocks when
over capacity; a hit counts as a use.

A block is identified by ``block_hash`` (a 16-byte hash chained over all tokens of the prefix and the
extra key, computed by the caller), but a hash is only an index: every tier keeps the block's full
prefix token ids and extra key (e.g. a cache salt or adapter id) and returns a block only if both
equal those of the request exactly, so a hash collision is a miss, never wrong KV. The disk tier
additionally keys its directory by a digest of the ``KVLayout`` (model identity, dtype and shape),
so blocks of different models or KV dtypes never meet. An 8-bit KV cache (``--kv-cache-dtype int8|fp8``)
has its own layouts: ``dtype`` is the code dtype and ``scale_dtype`` the per-row scale stored after the
codes of every (token, head) row, so its payloads are the pool's bytes, codes and scales together.

Disk layout, under ``root/<layout digest>/`` (with a human-readable ``layout.json``)::

    <hash hex[:2]>/<hash hex>.kvb

    offset 0   8 bytes   magic b"HERONKV1" (the trailing "1" is the format version)
    offset 8   4 bytes   header length H, uint32 little-endian
    offset 12  H bytes   header, UTF-8 JSON: {"version", "hash", "extra", "layout", "dtype", "shape",
                         "payload_nbytes", "checksum", "num_tokens"} (hex strings for bytes), padded
                         with spaces so the payload starts at a multiple of 64 bytes
    then       4*N bytes the prefix token ids, int32 little-endian (N = num_tokens)
    then       payload   the raw bytes of the contiguous KV tensor of ``layout.shape`` / ``layout.dtype``

Files are written to a temporary ``.<name>.tmp`` in the same directory and renamed into place
(``os.replace``), so a reader never sees a half-written ``.kvb``; leftovers of a crash are removed at
startup. There is no fsync: a file torn by a power loss is caught by the checks below and dropped,
which for a cache is as good as never having written it. A disk hit is verified completely before
it is returned: magic, header, stored hash, layout digest, dtype, shape, exact file length, the
prefix tokens and extra key, and a blake2b-128 checksum of the payload. Any damaged or unreadable
file is deleted and counted as ``corrupt``; an intact file whose tokens or extra key differ (a hash
collision) is counted as ``mismatch`` and kept. The startup scan orders files by mtime and a hit
touches the file's mtime, so the LRU order survives restarts. One root directory is meant to be used
by one process at a time (a second process would remove the first one's temporary files at startup
and would not see its evictions; nothing breaks, but blocks may be lost).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import struct
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Self

import numpy as np
import torch

logger = logging.getLogger(__name__)

MAGIC = b"HERONKV1"
FORMAT_VERSION = 1
FILE_SUFFIX = ".kvb"
TMP_SUFFIX = ".tmp"
_LEN = struct.Struct("<I")
_PREFIX_NBYTES = len(MAGIC) + _LEN.size  # magic + header length
_PAYLOAD_ALIGN = 64  # the header is padded so the payload starts at a multiple of this
_CHECKSUM_BYTES = 16
_MAX_HASH_BYTES = 64


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class KVLayout:
    """What a KV block of one model looks like; blocks are only shared between equal layouts."""

    model_id: str  # identifies the weights (e.g. file name + size + mtime); different models never share blocks
    dtype: torch.dtype  # KV dtype
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    # 8-bit caches: each row of head_dim codes (dtype) is followed by its scale in this dtype
    scale_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.dtype, torch.dtype):
            raise TypeError(f"KVLayout.dtype must be a torch.dtype, got {self.dtype!r}")
        if self.scale_dtype is not None:
            if not isinstance(self.scale_dtype, torch.dtype):
                raise TypeError(f"KVLayout.scale_dtype must be a torch.dtype or None, got {self.scale_dtype!r}")
            if self.dtype.itemsize != 1:
                raise ValueError(f"KVLayout.scale_dtype goes with 1-byte codes, got dtype {self.dtype}")
        for name in ("num_layers", "block_size", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"KVLayout.{name} must be a positive int, got {value!r}")

    @property
    def shape(self) -> tuple[int, ...]:
        """(layers, K/V, tokens, heads, head dim) of one block; with 8-bit codes the last dimension
        is head_dim codes + the scale's bytes."""
        row = self.head_dim if self.scale_dtype is None else self.head_dim + self.scale_dtype.itemsize
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, row)

    @property
    def block_nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize

    def to_dict(self) -> dict[str, object]:
        d: dict[str, object] = {"model_id": self.model_id, "dtype": _dtype_name(self.dtype),
                                "num_layers": self.num_layers, "block_size": self.block_size,
                                "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim}
        if self.scale_dtype is not None:  # only then: the digests of model-dtype layouts stay as they were
            d["scale_dtype"] = _dtype_name(self.scale_dtype)
        return d

    def digest(self) -> str:
        """16 hex chars: blake2b-64 of the canonical JSON of all fields (stable across processes)."""
        canonical = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.blake2b(canonical.encode(), digest_size=8).hexdigest()


class KVTier(Protocol):
    """What the KV cache manager needs from a lower tier (implemented by MemoryKVTier, DiskKVTier)."""

    name: str
    layout: KVLayout

    def contains(self, block_hash: bytes) -> bool: ...

    def store(self, block_hash: bytes, prefix_tokens: Sequence[int], extra_key: bytes,
              payload: torch.Tensor) -> bool: ...

    def load(self, block_hash: bytes, prefix_tokens: Sequence[int], extra_key: bytes) -> torch.Tensor | None: ...

    def flush(self, timeout: float | None = None) -> bool: ...

    def close(self) -> None: ...

    def stats(self) -> dict[str, int]: ...


_STAT_KEYS = ("stores", "store_skipped", "store_dropped", "write_errors", "hits", "misses", "corrupt",
              "mismatch", "evictions")


def _capacity_bytes(capacity_gib: float) -> int:
    if not capacity_gib > 0:  # also rejects NaN
        raise ValueError(f"KV tier capacity must be > 0 GiB, got {capacity_gib!r}")
    return int(capacity_gib * 2**30)


class _TierBase:
    """Argument checks and counters shared by both tiers."""

    name: str

    def __init__(self, capacity_gib: float, layout: KVLayout) -> None:
        if not isinstance(layout, KVLayout):
            raise TypeError(f"layout must be a KVLayout, got {type(layout).__name__}")
        self.layout = layout
        self.capacity_bytes = _capacity_bytes(capacity_gib)
        self._counters: dict[str, int] = dict.fromkeys(_STAT_KEYS, 0)
        self._bytes_used = 0   # memory tier: payload bytes; disk tier: bytes of block files on disk
        # guards the index and the counters; the disk writer thread takes it only for bookkeeping
        self._lock = threading.Lock()

    @property
    def bytes_used(self) -> int:
        """Payload bytes held (memory tier) or bytes of block files on disk (disk tier)."""
        return self._bytes_used

    def _check_key(self, block_hash: bytes, prefix_tokens: Sequence[int]) -> None:
        if not isinstance(block_hash, bytes) or not 0 < len(block_hash) <= _MAX_HASH_BYTES:
            raise ValueError(f"block_hash must be 1..{_MAX_HASH_BYTES} bytes, got {block_hash!r}")
        n = len(prefix_tokens)
        if n == 0 or n % self.layout.block_size:
            raise ValueError(f"prefix_tokens must be a positive multiple of block_size={self.layout.block_size} "
                             f"tokens (the whole prefix up to the end of the block), got {n}")

    def _check_payload(self, payload: torch.Tensor) -> None:
        layout = self.layout
        if not isinstance(payload, torch.Tensor):
            raise TypeError(f"payload must be a torch.Tensor, got {type(payload).__name__}")
        if tuple(payload.shape) != layout.shape or payload.dtype != layout.dtype:
            raise ValueError(f"payload must have shape {layout.shape} and dtype {layout.dtype}, "
                             f"got {tuple(payload.shape)} {payload.dtype}")
        if payload.device.type != "cpu" or not payload.is_contiguous():
            raise ValueError(f"payload must be a contiguous CPU tensor (device={payload.device}, "
                             f"contiguous={payload.is_contiguous()})")

    def _count(self, key: str, n: int = 1) -> None:
        # caller holds self._lock
        self._counters[key] += n


# ---------------------------------------------------------------------------------------------- memory


@dataclass(slots=True)
class _MemEntry:
    tokens: tuple[int, ...]
    extra_key: bytes
    payload: torch.Tensor


class MemoryKVTier(_TierBase):
    """Blocks kept in process memory; LRU eviction over the payload bytes. Every operation is O(1)
    apart from copying the prefix tokens (store) and comparing them (load)."""

    name = "cpu"

    def __init__(self, capacity_gib: float, layout: KVLayout) -> None:
        super().__init__(capacity_gib, layout)
        self._entries: OrderedDict[bytes, _MemEntry] = OrderedDict()  # least recently used first

    @property
    def num_blocks(self) -> int:
        return len(self._entries)

    def contains(self, block_hash: bytes) -> bool:
        return block_hash in self._entries

    def store(self, block_hash: bytes, prefix_tokens: Sequence[int], extra_key: bytes,
              payload: torch.Tensor) -> bool:
        self._check_key(block_hash, prefix_tokens)
        self._check_payload(payload)
        nbytes = self.layout.block_nbytes
        with self._lock:
            if block_hash in self._entries:
                self._count("store_skipped")
                return False
            if nbytes > self.capacity_bytes:
                self._count("store_dropped")
                return False
            self._entries[block_hash] = _MemEntry(tuple(prefix_tokens), bytes(extra_key), payload)
            self._bytes_used += nbytes
            self._count("stores")
            while self._bytes_used > self.capacity_bytes:
                self._entries.popitem(last=False)
                self._bytes_used -= nbytes
                self._count("evictions")
        return True

    def load(self, block_hash: bytes, prefix_tokens: Sequence[int], extra_key: bytes) -> torch.Tensor | None:
        with self._lock:
            entry = self._entries.get(block_hash)
            if entry is None:
                self._count("misses")
                return None
            if entry.extra_key != extra_key or entry.tokens != tuple(prefix_tokens):
                self._count("mismatch")
                self._count("misses")
                return None
            self._entries.move_to_end(block_hash)
            self._count("hits")
            payload = entry.payload
        return payload.clone()  # the caller gets its own memory; the copy runs outside the lock

    def flush(self, timeout: float | None = None) -> bool:
        return True

    def close(self) -> None:
        pass

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {**self._counters, "num_blocks": len(self._entries), "bytes_used": self._bytes_used,
                    "pending": 0, "pending_bytes": 0}


# ------------------------------------------------------------------------------------------------ disk


class _CorruptBlock(Exception):
    """A block file that is damaged, unreadable or not what its name says; it gets deleted."""


@dataclass(slots=True)
class _PendingWrite:
    block_hash: bytes
    tokens: tuple[int, ...]
    extra_key: bytes
    payload: torch.Tensor
    nbytes: int = field(default=0)  # payload bytes, for the backpressure limit


def _pack_tokens(tokens: Sequence[int]) -> bytes:
    """Token ids as int32 little-endian; ValueError if one does not fit (no real vocabulary does)."""
    try:
        return np.asarray(tokens, dtype="<i4").tobytes()
    except (OverflowError, TypeError, ValueError) as e:
        raise ValueError(f"token ids must be ints in the int32 range: {e}") from e


class DiskKVTier(_TierBase):
    """Blocks stored as files under ``root/<layout digest>/``, written by one daemon thread.

    The tier's directory is created in the constructor: if that fails (e.g. ``root`` lies under a
    regular file, or permissions) the constructor raises ``OSError``, so a misconfigured path is
    reported at startup. Later I/O errors never raise: a failed write is logged (one warning, then
    debug messages) and counted in ``write_errors``, a failed read is a miss counted as ``corrupt``.
    """

    name = "disk"

    def __init__(self, root: str | os.PathLike[str], capacity_gib: float, layout: KVLayout,
                 max_pending_mib: float = 256) -> None:
        super().__init__(capacity_gib, layout)
        if not max_pending_mib >= 0:
            raise ValueError(f"max_pending_mib must be >= 0, got {max_pending_mib!r}")
        self.root = Path(root)
        self.dir = self.root / layout.digest()
        self.max_pending_bytes = int(max_pending_mib * 2**20)
        self._index: OrderedDict[bytes, int] = OrderedDict()  # hash -> file size, least recently used first
        self._pending: dict[bytes, _PendingWrite] = {}  # queued or being written; not in _index yet
        self._pending_bytes = 0
        self._idle = threading.Condition(self._lock)  # notified whenever a pending write finishes
        self._queue: queue.SimpleQueue[_PendingWrite | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._warned_write = False
        self._warned_corrupt = False
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._write_layout_json()
        except OSError as e:
            raise OSError(f"KV disk tier: cannot use directory {self.dir}: {e}") from e
        self._scan()

    # -- public API

    @property
    def num_blocks(self) -> int:
        """Blocks on disk (pending writes not included; see stats()["pending"])."""
        return len(self._index)


    def contains(self, block_hash: bytes) -> bool:
        with self._lock:
            return block_hash in self._index or block_hash in self._pending

    def store(self, block_hash: bytes, prefix_tokens: Sequence[int], extra_key: bytes,
              payload: torch.Tensor) -> bool:
        """Queue the block for writing; never blocks on I/O. The tier keeps a reference to `payload`."""
        self._check_key(block_hash, prefix_tokens)
        self._check_payload(payload)
        nbytes = self.layout.block_nbytes
        with self._lock:
            if self._closed:
                return False
            if block_hash in self._index or block_hash in self._pending:
                self._count("store_skipped")
                return False
            # a block that can never fit, or too much not written yet (the disk cannot keep up): drop it.
            # The first pending write is always accepted, so a limit below one block means "one at a time".
            too_big = nbytes + 4 * len(prefix_tokens) > self.capacity_bytes
            if too_big or (self._pending and self._pending_bytes + nbytes > self.max_pending_bytes):
                self._count("store_dropped")
                return False
            item = _PendingWrite(block_hash, tuple(prefix_tokens), bytes(extra_key), payload, nbytes)
            self._pending[block_hash] = item
            self._pending_bytes += nbytes
            self._count("stores")
            if self._thread is None:
                self._thread = threading.Thread(target=self._writer_loop, name="heron-kv-disk-writer", daemon=True)
                self._thread.start()
        self._queue.put(item)
        return True

    def load(self, block_hash: bytes, prefix_tokens: Sequence[int], extra_key: bytes) -> torch.Tensor | None:
        """The block's KV (a new tensor), or None. A block still waiting to be written is served from
        memory. The file is read and verified under the lock (which only the writer's bookkeeping
        contends for), so an eviction cannot delete it half-way."""
        with self._lock:
            pending = self._pending.get(block_hash)
            if pending is not None:
                if pending.extra_key == extra_key and pending.tokens == tuple(prefix_tokens):
                    self._count("hits")
                    return pending.payload.clone()
                self._miss("mismatch")
                return None
            if block_hash not in self._index:
                self._miss()
                return None
            path = self._path(block_hash)
            try:
                payload = self._read_verified(path, block_hash, prefix_tokens, extra_key)
            except _CorruptBlock as e:
                self._drop_corrupt(block_hash, path, str(e))
                self._miss("corrupt")
                return None
            if payload is None:
                self._miss("mismatch")
                return None
            self._index.move_to_end(block_hash)
            with contextlib.suppress(OSError):
                os.utime(path)  # so the LRU order survives a restart
            self._count("hits")
            return payload

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every accepted store is on disk (or failed). False if `timeout` expired first."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._pending, timeout)

    def close(self, timeout: float | None = None) -> None:
        """Flush, then stop the writer thread. Idempotent; stores after close are refused."""
        with self._lock:
            already, self._closed = self._closed, True
            thread = self._thread
        if already:
            return
        if not self.flush(timeout):
            logger.warning("KV disk tier %s: close() timed out with %d writes pending", self.dir,
                           len(self._pending))
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {**self._counters, "num_blocks": len(self._index), "bytes_used": self._bytes_used,
                    "pending": len(self._pending), "pending_bytes": self._pending_bytes}

    # -- files

    def _path(self, block_hash: bytes) -> Path:
        h = block_hash.hex()
        return self.dir / h[:2] / f"{h}{FILE_SUFFIX}"

    def _write_layout_json(self) -> None:
        path = self.dir / "layout.json"
        if path.exists():
            return
        info = {**self.layout.to_dict(), "digest": self.layout.digest(), "shape": list(self.layout.shape),
                "block_nbytes": self.layout.block_nbytes, "format": MAGIC.decode()}
        self._write_file(path, [json.dumps(info, indent=2).encode() + b"\n"])

    def _scan(self) -> None:
        """Remove temporary leftovers, index the existing block files (oldest mtime first), trim to capacity."""
        found: list[tuple[int, str, bytes, int]] = []
        for tmp in self.dir.glob(f".*{TMP_SUFFIX}"):
            self._unlink(tmp)
        for sub in self._scandir(self.dir):
            if not sub.is_dir(follow_symlinks=False):
                continue
            for entry in self._scandir(Path(sub.path)):
                name = entry.name
                if name.startswith(".") and name.endswith(TMP_SUFFIX):
                    self._unlink(Path(entry.path))
                    continue
                if not name.endswith(FILE_SUFFIX):
                    continue
                try:
                    block_hash = bytes.fromhex(name[:-len(FILE_SUFFIX)])
                    st = entry.stat(follow_symlinks=False)
                except (ValueError, OSError):
                    block_hash, st = b"", None
                if st is None or not block_hash or len(block_hash) > _MAX_HASH_BYTES or \
                        name[:2] != sub.name or not entry.is_file(follow_symlinks=False):
                    self._unlink(Path(entry.path))  # not a file this tier could have written
                    continue
                found.append((st.st_mtime_ns, name, block_hash, st.st_size))
        found.sort()
        with self._lock:
            for _, _, block_hash, size in found:
                self._index[block_hash] = size
                self._bytes_used += size
            self._evict_locked()

    @staticmethod
    def _scandir(path: Path) -> list[os.DirEntry[str]]:
        try:
            with os.scandir(path) as it:
                return list(it)
        except OSError as e:
            logger.warning("KV disk tier: cannot scan %s: %s", path, e)
            return []

    @staticmethod
    def _unlink(path: Path) -> None:
        with contextlib.suppress(OSError):
            path.unlink()

    def _write_file(self, path: Path, chunks: Sequence[bytes | memoryview]) -> None:
        """Write `chunks` to `path` atomically (temporary file in the same directory + rename)."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}{TMP_SUFFIX}")
        try:
            with open(tmp, "wb") as f:
                f.writelines(chunks)
            os.replace(tmp, path)
        except BaseException:
            self._unlink(tmp)
            raise

    def _encode(self, item: _PendingWrite) -> list[bytes | memoryview]:
        """The file's chunks: magic + header length + header, tokens, payload (not copied)."""
        layout = self.layout
        payload = memoryview(item.payload.reshape(-1).view(torch.uint8).numpy())
        tokens = _pack_tokens(item.tokens)
        header = {"version": FORMAT_VERSION, "hash": item.block_hash.hex(), "extra": item.extra_key.hex(),
                  "layout": layout.digest(), "dtype": _dtype_name(layout.dtype), "shape": list(layout.shape),
                  "payload_nbytes": payload.nbytes, "num_tokens": len(item.tokens),
                  "checksum": hashlib.blake2b(payload, digest_size=_CHECKSUM_BYTES).hexdigest()}
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-(_PREFIX_NBYTES + len(head) + len(tokens)) % _PAYLOAD_ALIGN)  # JSON allows trailing blanks
        return [MAGIC + _LEN.pack(len(head)) + head, tokens, payload]

    def _read_verified(self, path: Path, block_hash: bytes, prefix_tokens: Sequence[int],
                       extra_key: bytes) -> torch.Tensor | None:
        """The payload of `path` if everything checks out; None if the file is intact but belongs to a
        different prefix or extra key; raises _CorruptBlock otherwise."""
        layout = self.layout
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                buf = bytearray(size)
                if f.readinto(buf) != size:
                    raise _CorruptBlock("short read")
        except OSError as e:
            raise _CorruptBlock(f"unreadable: {e}") from e
        if size < _PREFIX_NBYTES or buf[:len(MAGIC)] != MAGIC:
            raise _CorruptBlock("bad magic or format version")
        (head_len,) = _LEN.unpack_from(buf, len(MAGIC))
        tokens_at = _PREFIX_NBYTES + head_len
        if tokens_at > size:
            raise _CorruptBlock("truncated header")
        try:
            header = json.loads(buf[_PREFIX_NBYTES:tokens_at].decode())
            num_tokens = header["num_tokens"]
            payload_nbytes = header["payload_nbytes"]
            stored_extra = bytes.fromhex(header["extra"])
            ok = (header["version"] == FORMAT_VERSION and header["hash"] == block_hash.hex()
                  and header["layout"] == layout.digest() and header["dtype"] == _dtype_name(layout.dtype)
                  and header["shape"] == list(layout.shape) and payload_nbytes == layout.block_nbytes
                  and type(num_tokens) is int and num_tokens >= 0 and isinstance(header["checksum"], str))
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            raise _CorruptBlock(f"bad header: {e}") from e
        if not ok:
            raise _CorruptBlock("header does not match the block hash or the layout")
        payload_at = tokens_at + 4 * num_tokens
        if size != payload_at + payload_nbytes:
            raise _CorruptBlock(f"file is {size} bytes, the header says {payload_at + payload_nbytes}")
        # an intact file of another prefix (a hash collision) is only a mismatch: keep it
        if stored_extra != extra_key or num_tokens != len(prefix_tokens):
            return None
        try:
            expected_tokens = _pack_tokens(prefix_tokens)
        except ValueError:
            return None
        view = memoryview(buf)
        if view[tokens_at:payload_at] != expected_tokens:
            return None
        checksum = hashlib.blake2b(view[payload_at:], digest_size=_CHECKSUM_BYTES).hexdigest()
        if checksum != header["checksum"]:
            raise _CorruptBlock("payload checksum mismatch")
        # the tensor takes over `buf` (nothing else references it): no copy
        raw = torch.frombuffer(buf, dtype=torch.uint8, count=payload_nbytes, offset=payload_at)
        return raw.view(layout.dtype).view(layout.shape)

    # -- bookkeeping (caller holds self._lock)

    def _miss(self, reason: str | None = None) -> None:
        if reason is not None:
            self._count(reason)
        self._count("misses")

    def _drop_corrupt(self, block_hash: bytes, path: Path, reason: str) -> None:
        size = self._index.pop(block_hash, None)
        if size is not None:
            self._bytes_used -= size
        self._unlink(path)
        if not self._warned_corrupt:
            self._warned_corrupt = True
            logger.warning("KV disk tier: dropped damaged block file %s (%s); further ones are logged at debug level",
                           path, reason)
        else:
            logger.debug("KV disk tier: dropped damaged block file %s (%s)", path, reason)

    def _evict_locked(self) -> None:
        """Delete least recently used files until within capacity. Unlinks run under the lock so that a
        concurrent load never reads a file that is being deleted, and a re-store cannot be deleted."""
        while self._bytes_used > self.capacity_bytes and self._index:
            block_hash, size = self._index.popitem(last=False)
            self._bytes_used -= size
            self._count("evictions")
            self._unlink(self._path(block_hash))

    # -- writer thread

    def _writer_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            path = self._path(item.block_hash)
            size = 0
            try:
                chunks = self._encode(item)
                path.parent.mkdir(exist_ok=True)
                self._write_file(path, chunks)
                size = sum(len(c) if isinstance(c, bytes) else c.nbytes for c in chunks)
            except Exception as e:  # noqa: BLE001 - the writer must survive anything; the block is just not cached
                self._write_failed(path, e)
            with self._lock:
                del self._pending[item.block_hash]
                self._pending_bytes -= item.nbytes
                if size:
                    self._index[item.block_hash] = size
                    self._bytes_used += size
                    self._evict_locked()
                else:
                    self._count("write_errors")
                self._idle.notify_all()

    def _write_failed(self, path: Path, error: Exception) -> None:
        if not self._warned_write:
            self._warned_write = True
            logger.warning("KV disk tier: cannot write %s: %s (the block is not cached; further errors are logged "
                           "at debug level)", path, error)
        else:
            logger.debug("KV disk tier: cannot write %s: %s", path, error)
