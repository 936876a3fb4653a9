"""GGUF checkpoints: metadata -> HF config, tensors -> HF-named, HF-shaped torch tensors.

Everything GGUF-specific lives here (see docs/contracts.md): the metadata reader, the llama.cpp ->
transformers name mapping, dequantization and the value conventions llama.cpp applies on export
(Gemma norms stored as `w + 1`, llama q/k rows permuted for its rotary layout). The conventions mirror
transformers' own GGUF loader (`modeling_gguf_pytorch_utils.load_gguf_checkpoint`), so the config and
weights equal what `from_pretrained(dir, gguf_file=...)` produces.
"""
from __future__ import annotations

import logging
import mmap
import os
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize
from tqdm.auto import tqdm
from transformers import PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")

# ---------------------------------------------------------------------------------------------
# Metadata reader. `gguf.GGUFReader` builds one numpy view per vocabulary string, which takes
# ~11 s for Gemma 3's 262k-token vocabulary; this reader walks the header with `struct` in ~0.03 s.
# ---------------------------------------------------------------------------------------------
_STRING, _ARRAY = 8, 9
_SCALAR_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_SCALAR_NP = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
              12: "<f8"}
_MAX_EAGER_ARRAY = 4096  # longer arrays: numbers stay numpy, strings (vocab, merges) keep only their length


class SkippedStrings:
    """A long string array in the metadata that was not decoded; only its length is kept."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __repr__(self) -> str:
        return f"SkippedStrings({self.length})"


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor's entry in the file's tensor table."""

    name: str
    shape: tuple[int, ...]  # torch order: (out_features, in_features) for a linear weight
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset of the data in the file
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    """A GGUF file's metadata and tensor table (no tensor data)."""

    path: Path
    metadata: dict[str, Any]
    tensors: tuple[GGUFTensorInfo, ...]

    @property
    def architecture(self) -> str:
        return str(self.metadata["general.architecture"])

    def arch_value(self, suffix: str, default: Any = None) -> Any:
        """Metadata value `<architecture>.<suffix>`."""
        return self.metadata.get(f"{self.architecture}.{suffix}", default)


def read_gguf_header(path: str | os.PathLike) -> GGUFHeader:
    """Parse (and cache, keyed on path/size/mtime) the metadata and tensor table of a GGUF file."""
    path = Path(path).expanduser().resolve()
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"GGUF file not found: {path}") from None
    return _read_header_cached(str(path), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=4)
def _read_header_cached(path: str, size: int, mtime_ns: int) -> GGUFHeader:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        try:
            return _parse_header(Path(path), mm)
        except (struct.error, UnicodeDecodeError, IndexError) as e:
            raise ValueError(f"{path} is not a valid GGUF file (truncated or corrupt header: {e})") from e


def _parse_header(path: Path, buf: mmap.mmap) -> GGUFHeader:
    if buf[:4] != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (bad magic {bytes(buf[:4])!r})")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise ValueError(f"{path}: unsupported GGUF version {version} (supported: 2, 3; big-endian files are not)")
    pos = 24
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key, pos = _read_str(buf, pos)
        (vtype,) = struct.unpack_from("<I", buf, pos)
        metadata[key], pos = _read_value(buf, pos + 4, vtype)
    if "general.architecture" not in metadata:
        raise ValueError(f"{path}: GGUF metadata has no general.architecture")
    entries = []
    for _ in range(n_tensors):
        name, pos = _read_str(buf, pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        raw_type, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise ValueError(f"{path}: tensor {name} has unknown ggml type id {raw_type}") from None
        entries.append((name, tuple(reversed(dims)), qtype, offset))  # ggml lists the fastest dim first
    alignment = int(metadata.get("general.alignment", 32))
    data_start = (pos + alignment - 1) // alignment * alignment
    tensors = []
    for name, shape, qtype, offset in entries:
        block, type_size = GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(shape, dtype=np.int64)) // block * type_size
        start = data_start + offset
        if start + nbytes > len(buf):
            raise ValueError(f"{path}: tensor {name} extends past the end of the file (truncated download?)")
        tensors.append(GGUFTensorInfo(name, shape, qtype, start, nbytes))
    return GGUFHeader(path, metadata, tuple(tensors))


def _read_str(buf: mmap.mmap, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    return buf[pos + 8:pos + 8 + n].decode("utf-8"), pos + 8 + n


def _read_value(buf: mmap.mmap, pos: int, vtype: int) -> tuple[Any, int]:
    if vtype in _SCALAR_FMT:
        fmt = _SCALAR_FMT[vtype]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    if vtype == _STRING:
        return _read_str(buf, pos)
    if vtype != _ARRAY:
        raise ValueError(f"unknown GGUF metadata value type {vtype}")
    etype, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if etype in _SCALAR_NP:
        arr = np.frombuffer(buf, dtype=_SCALAR_NP[etype], count=count, offset=pos).copy()
        return (arr.tolist() if count <= _MAX_EAGER_ARRAY else arr), pos + arr.nbytes
    if etype == _STRING:
        if count <= _MAX_EAGER_ARRAY:
            out = []
            for _ in range(count):
                s, pos = _read_str(buf, pos)
                out.append(s)
            return out, pos
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):  # variable-length entries: walk the lengths only
            pos += 8 + unpack(buf, pos)[0]
        return SkippedStrings(count), pos
    if etype == _ARRAY:
        out = []
        for _ in range(count):  # each element is itself (element type, count, data)
            value, pos = _read_value(buf, pos, _ARRAY)
            out.append(value)
        return out, pos
    raise ValueError(f"unknown GGUF array element type {etype}")


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
_COMMON_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}
# `<arch>.<suffix>` -> HF config key, as in transformers' GGUF_CONFIG_MAPPING.
_CONFIG_KEYS: dict[str, dict[str, str]] = {
    "llama": {**_COMMON_KEYS, "rope.dimension_count": "head_dim"},
    "mistral": {**_COMMON_KEYS, "rope.dimension_count": "head_dim"},
    "qwen2": _COMMON_KEYS,
    # transformers leaves qwen3's head_dim at the Qwen3Config default (128, true of every released
    # Qwen3); reading key_length gives the same value there and stays right for any other width.
    "qwen3": {**_COMMON_KEYS, "attention.key_length": "head_dim"},
    "gemma3": {**_COMMON_KEYS, "attention.key_length": "head_dim", "attention.sliding_window": "sliding_window"},
}
_TOKEN_ID_KEYS = {
    "tokenizer.ggml.bos_token_id": "bos_token_id",
    "tokenizer.ggml.eos_token_id": "eos_token_id",
    "tokenizer.ggml.unknown_token_id": "unk_token_id",
    "tokenizer.ggml.padding_token_id": "pad_token_id",
}
_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}
_HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
}


def _hf_arch(header: GGUFHeader) -> str:
    """The architecture key used for the HF config (llama files named exactly "mistral" -> mistral)."""
    arch = header.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{header.path}: GGUF architecture {arch!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)} (mistral GGUFs use 'llama')")
    # transformers tests `"mistral" in [general.name]`, i.e. an exact match; mirrored to keep configs equal.
    if arch == "llama" and header.metadata.get("general.name") == "mistral":
        return "mistral"
    return arch


def gguf_config_dict(header: GGUFHeader) -> dict[str, Any]:
    """The raw config dict transformers' GGUF loader builds for this file (before the config class)."""
    arch, hf_arch = header.architecture, _hf_arch(header)
    d: dict[str, Any] = {"model_type": _MODEL_TYPES[hf_arch]}
    if "general.name" in header.metadata:
        d["_model_name_or_path"] = header.metadata["general.name"]
    for suffix, key in _CONFIG_KEYS[hf_arch].items():
        value = header.metadata.get(f"{arch}.{suffix}")
        if value is not None:
            d[key] = value
    for gguf_key, key in _TOKEN_ID_KEYS.items():
        if gguf_key in header.metadata:
            d[key] = header.metadata[gguf_key]
    d["tie_word_embeddings"] = all(t.name != "output.weight" for t in header.tensors)
    if "vocab_size" not in d and "tokenizer.ggml.tokens" in header.metadata:
        d["vocab_size"] = len(header.metadata["tokenizer.ggml.tokens"])
    return d


def _default_dtype(header: GGUFHeader) -> torch.dtype:
    """BF16/F16 for files stored in those types, float32 for quantized or F32 files."""
    types = {t.qtype for t in header.tensors}
    if types <= {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16}:
        if GGMLQuantizationType.BF16 in types:
            return torch.bfloat16
        if GGMLQuantizationType.F16 in types:
            return torch.float16
    return torch.float32


def load_gguf_config(path: str | os.PathLike) -> PretrainedConfig:
    """Build the transformers config for a GGUF file (equal to `AutoConfig.from_pretrained(dir, gguf_file=...)`,
    plus `architectures` and `dtype`)."""
    header = read_gguf_header(path)
    d = gguf_config_dict(header)
    config = CONFIG_MAPPING[d["model_type"]].from_dict(d)
    config.architectures = [_HF_ARCHITECTURES[_hf_arch(header)]]
    config.dtype = _default_dtype(header)
    return config


# ---------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3 has four norms per layer; llama.cpp's ffn_norm is its pre-feedforward norm.
_GEMMA3_LAYER_NAMES = {
    **_LAYER_NAMES,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_IGNORED = {"rope_freqs.weight"}  # llama3 rope factors; transformers drops them too (config has no rope scaling)


def hf_tensor_name(gguf_name: str, architecture: str) -> str | None:
    """HF parameter name for a GGUF tensor name, or None when the tensor has no HF counterpart."""
    base, _, suffix = gguf_name.rpartition(".")
    if suffix not in ("weight", "bias") or not base:
        return None
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    parts = base.split(".")
    if len(parts) != 3 or parts[0] != "blk" or not parts[1].isdigit():
        return None
    names = _GEMMA3_LAYER_NAMES if architecture == "gemma3" else _LAYER_NAMES
    leaf = names.get(parts[2])
    return None if leaf is None else f"model.layers.{parts[1]}.{leaf}.{suffix}"


def _unpermute_rotary(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (transformers' LlamaTensorProcessor._reverse_permute_weights)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _conventions(arch: str, gguf_name: str, n_head: int | None, n_kv_head: int | None) -> tuple[int | None, float]:
    """llama.cpp's export conventions for one tensor: (heads of the rotary row permutation to undo, or
    None; the constant to subtract from the values, 0.0 for none)."""
    if arch == "gemma3" and gguf_name.endswith("norm.weight"):
        return None, 1.0
    if arch == "llama" and n_head is not None and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
        return (n_head if ".attn_q." in gguf_name else n_kv_head), 0.0
    return None, 0.0


def unpermute_rotary_rows(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation on anything indexed by output row first: a weight
    [N, K], or its quantized codes [N, K] and per-row scales [N] / [N, groups] (the permutation
    moves whole rows, so a quantized tensor is un-permuted by moving its codes and scales alike)."""
    if rows.shape[0] % (2 * n_head):
        raise ValueError(f"cannot un-permute {rows.shape[0]} rows for {n_head} rotary heads "
                         f"(need a multiple of {2 * n_head})")
    return _unpermute_rotary(rows, n_head)


def dequantize_tensor(header: GGUFHeader, info: GGUFTensorInfo, data: np.ndarray | None = None) -> torch.Tensor:
    """A tensor's values as float32 in torch order, exactly as `gguf.quants.dequantize` computes them."""
    if data is None:
        data = np.memmap(header.path, mode="r", dtype=np.uint8)
    block, type_size = GGML_QUANT_SIZES[info.qtype]
    raw = data[info.offset:info.offset + info.nbytes].reshape(*info.shape[:-1], info.shape[-1] // block * type_size)
    try:
        values = dequantize(raw, info.qtype)
    except NotImplementedError:
        raise ValueError(f"{header.path}: tensor {info.name} uses ggml type {info.qtype.name}, "
                         f"which gguf {_gguf_version()} cannot dequantize") from None
    values = np.asarray(values, dtype=np.float32).reshape(info.shape)
    if not values.flags.writeable or not values.flags.c_contiguous:
        values = np.array(values, dtype=np.float32, order="C")  # F32 data is a read-only view of the mmap
    return torch.from_numpy(values)


def _gguf_version() -> str:
    try:
        from importlib.metadata import version
        return version("gguf")
    except Exception:  # pragma: no cover - metadata missing
        return "?"


def iter_gguf_tensors(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                      progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(hf_name, tensor)` for every model tensor of a GGUF file, dequantized, converted to `dtype`
    and with llama.cpp's export conventions undone (values equal transformers' GGUF loading).

    The file is parsed and its architecture checked at call time; tensors are read lazily."""
    header = read_gguf_header(path)
    _hf_arch(header)  # raises for unsupported architectures
    if os.environ.get("HERON_NO_WEIGHT_CACHE", "") not in ("", "0"):
        return _iter_tensors(header, dtype, progress)
    return _iter_cached(header, dtype, progress)


_WEIGHT_CACHE_FORMAT = 1  # bump to invalidate every cached weight file


def weight_cache_file(path: str | os.PathLike, dtype: torch.dtype) -> Path:
    """Where the dequantized weights of this GGUF file in `dtype` are cached (safetensors).

    Dequantizing Q4_K/Q6_K with the gguf package's numpy code takes most of a start-up (~7 s
    for the default model); later starts read this file instead. The key hashes the file's
    resolved path, size and modification time (reading the file itself for a content hash costs
    seconds when it is not in the page cache) and the gguf version."""
    import hashlib

    from heron.models.loader.tokenizer import cache_root
    st = Path(path).stat()
    key = hashlib.sha256(f"weights|{_WEIGHT_CACHE_FORMAT}|{_gguf_version()}|{Path(path).resolve()}|{st.st_size}|"
                         f"{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "weights" / f"{Path(path).stem}-{key}-{str(dtype).replace('torch.', '')}.safetensors"


_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def _map_safetensors(path: Path) -> list[tuple[str, torch.Tensor]]:
    """The tensors of a safetensors file as views of a private (copy-on-write) memory map: no
    copy is made here, the caller's copy into the parameters is the only one."""
    import json
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    (n,) = struct.unpack("<Q", buf[:8])
    meta = json.loads(buf[8:8 + n])
    out = []
    for name, info in meta.items():
        if name == "__metadata__":
            continue
        dtype = _ST_DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        numel = 1
        for d in info["shape"]:
            numel *= d
        if end - begin != numel * torch.empty((), dtype=dtype).element_size() or 8 + n + end > len(buf):
            raise ValueError(f"tensor {name}: size does not match its shape")
        t = torch.frombuffer(buf, dtype=dtype, count=numel, offset=8 + n + begin) if numel else torch.empty(0, dtype=dtype)
        out.append((name, t.view(info["shape"])))
    return out


def _iter_cached(header: GGUFHeader, dtype: torch.dtype, progress: bool) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors.torch import save_file
    cache = weight_cache_file(header.path, dtype)
    if cache.is_file():
        try:
            tensors = _map_safetensors(cache)
        except Exception as e:  # truncated or unreadable: rebuild it
            logger.warning("ignoring unreadable weight cache %s (%s); rebuilding", cache, e)
        else:
            logger.info("loading dequantized weights from %s", cache)
            yield from tensors
            return
    collected = {}
    for name, w in _iter_tensors(header, dtype, progress):
        collected[name] = w
        yield name, w
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        save_file(collected, str(tmp))
        os.replace(tmp, cache)
        logger.info("cached the dequantized weights in %s (later starts read them from there)", cache)
    except OSError as e:  # read-only or full cache folder: start-up just stays slower
        logger.warning("could not cache the dequantized weights in %s: %s", cache, e)


def _iter_tensors(header: GGUFHeader, dtype: torch.dtype, progress: bool) -> Iterator[tuple[str, torch.Tensor]]:
    arch = header.architecture
    n_head = header.arch_value("attention.head_count")
    n_kv_head = header.arch_value("attention.head_count_kv", n_head)
    data = np.memmap(header.path, mode="r", dtype=np.uint8)
    skipped = []
    with tqdm(total=len(header.tensors), desc="Loading weights", unit="tensor", file=sys.stderr,
              disable=not progress, leave=False) as bar:
        for info in header.tensors:
            bar.update(1)
            name = hf_tensor_name(info.name, arch)
            if name is None:
                skipped.append(info.name)
                continue
            w = dequantize_tensor(header, info, data)
            rotary_heads, norm_offset = _conventions(arch, info.name, n_head, n_kv_head)
            if norm_offset:
                w = w - norm_offset  # llama.cpp stores Gemma's (1 + w) RMSNorm scale as w + 1
            elif rotary_heads is not None:
                w = _unpermute_rotary(w, rotary_heads)
            yield name, w.to(dtype).contiguous()
    unexpected = [n for n in skipped if n not in _IGNORED]
    if unexpected:
        logger.warning("%s: ignored %d GGUF tensors with no HF counterpart: %s", header.path.name,
                       len(unexpected), ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else ""))
    if "rope_freqs.weight" in skipped:
        logger.warning("%s: rope_freqs.weight (llama3-style rope scaling factors) is ignored, as transformers "
                       "does; outputs may differ slightly from the original checkpoint", header.path.name)


# ---------------------------------------------------------------------------------------------
# Raw tensors: the stored ggml blocks, for `--quantization gguf` (heron.quant.gguf_native)
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GGUFRawTensor:
    """One model tensor as the file stores it, under its HF name, with the conventions to apply
    after decoding (the values `iter_gguf_tensors` yields are decode(blocks), then `- norm_offset`,
    then `unpermute_rotary_rows(., rotary_heads)` when that is not None)."""

    hf_name: str
    info: GGUFTensorInfo
    blocks: np.ndarray          # uint8 [rows, bytes per row] (a 1-D tensor: [bytes]); read-only view of the file
    rotary_heads: int | None    # llama q/k: the rows are in llama.cpp's rotary order
    norm_offset: float          # gemma3 norms are stored as w + 1

    @property
    def qtype(self) -> GGMLQuantizationType:
        return self.info.qtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape


def gguf_raw_tensors(path: str | os.PathLike) -> dict[str, GGUFRawTensor]:
    """The model tensors of a GGUF file by HF name, undecoded (memory-mapped; nothing is read yet)."""
    header = read_gguf_header(path)
    _hf_arch(header)  # raises for unsupported architectures
    arch = header.architecture
    n_head = header.arch_value("attention.head_count")
    n_kv_head = header.arch_value("attention.head_count_kv", n_head)
    data = np.memmap(header.path, mode="r", dtype=np.uint8)
    out = {}
    for info in header.tensors:
        name = hf_tensor_name(info.name, arch)
        if name is None:
            continue
        block, type_size = GGML_QUANT_SIZES[info.qtype]
        if info.shape[-1] % block:
            raise ValueError(f"{header.path}: tensor {info.name} has rows of {info.shape[-1]} values, not a whole "
                             f"number of {info.qtype.name} blocks of {block}")
        raw = data[info.offset:info.offset + info.nbytes].reshape(*info.shape[:-1], info.shape[-1] // block * type_size)
        rotary_heads, norm_offset = _conventions(arch, info.name, n_head, n_kv_head)
        out[name] = GGUFRawTensor(name, info, raw, rotary_heads, norm_offset)
    return out
