"""Tokenizers: HF folders load directly; GGUF tokenizers are converted once by transformers, then cached.

Converting a GGUF vocabulary (transformers' `AutoTokenizer.from_pretrained(dir, gguf_file=...)`) takes
~15 s for Gemma 3's 262k tokens, so the result is saved under
`$HERON_CACHE_DIR/tokenizers/<key>/` (default `~/.cache/heron`) and later loads come from there.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import transformers
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from heron.models.loader.gguf import read_gguf_header
from heron.models.loader.source import ModelSource

logger = logging.getLogger(__name__)

_CACHE_FORMAT = 1  # bump to invalidate every cached tokenizer
_EDGE_BYTES = 1 << 20


def cache_root() -> Path:
    """Heron's cache folder: `$HERON_CACHE_DIR`, else `~/.cache/heron`."""
    return Path(os.environ.get("HERON_CACHE_DIR") or "~/.cache/heron").expanduser()


def tokenizer_cache_dir(gguf_path: str | os.PathLike) -> Path:
    """Where the converted tokenizer of this GGUF file is cached.

    The key hashes the file size and its first and last MiB (so a changed file gets a new entry even
    with the same name), plus the transformers version that did the conversion.
    """
    path = Path(gguf_path)
    key = file_fingerprint(path, f"{_CACHE_FORMAT}|{transformers.__version__}")
    return cache_root() / "tokenizers" / f"{path.stem}-{key}"


def file_fingerprint(path: str | os.PathLike, salt: str) -> str:
    """16 hex digits from `salt`, the file's size and its first and last MiB."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(f"{salt}|{size}|".encode())
    with open(path, "rb") as f:
        h.update(f.read(_EDGE_BYTES))
        f.seek(max(0, size - _EDGE_BYTES))
        h.update(f.read(_EDGE_BYTES))
    return h.hexdigest()[:16]


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    """The tokenizer of a resolved model (HF tokenizer folder, or built from the GGUF metadata)."""
    if source.tokenizer_path is not None:
        return _from_folder(source.tokenizer_path)
    if source.kind == "hf":
        return _from_folder(source.path)
    return load_gguf_tokenizer(source.path)


def _from_folder(folder: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, local_files_only=True)


_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "mask_token", "cls_token", "sep_token")


def _from_cache_folder(folder: Path) -> PreTrainedTokenizerBase:
    """Our own cache of a converted GGUF tokenizer, built straight from tokenizer.json: 2 s for
    Gemma 3's 262k vocabulary against 4.5 s through AutoTokenizer, which parses the 33 MB file
    with Python's json module several times before handing it to the Rust tokenizer. The cache
    holds only tokenizer.json and a config with the special tokens (tests compare the ids,
    special tokens and decoding with transformers' GGUF tokenizer). Anything else in the config
    goes through AutoTokenizer."""
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    known = set(_SPECIAL_KEYS) | {"backend", "is_local", "local_files_only", "model_max_length", "tokenizer_class",
                                  "clean_up_tokenization_spaces"}
    if set(cfg) - known or not all(isinstance(cfg.get(k), (str, type(None))) for k in _SPECIAL_KEYS):
        return _from_folder(folder)
    from transformers import PreTrainedTokenizerFast
    kwargs = {k: cfg[k] for k in _SPECIAL_KEYS if cfg.get(k) is not None}
    if "model_max_length" in cfg:
        kwargs["model_max_length"] = cfg["model_max_length"]
    if "clean_up_tokenization_spaces" in cfg:
        kwargs["clean_up_tokenization_spaces"] = cfg["clean_up_tokenization_spaces"]
    return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **kwargs)


def load_gguf_tokenizer(gguf_path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Tokenizer equal to transformers' GGUF tokenizer for this file, cached after the first conversion."""
    path = Path(gguf_path).expanduser().resolve()
    cache = tokenizer_cache_dir(path)
    tokenizer = None
    if cache.is_dir():
        try:
            tokenizer = _from_cache_folder(cache)
        except Exception as e:  # unreadable cache (e.g. written by an incompatible version): rebuild it
            logger.warning("ignoring unreadable tokenizer cache %s (%s); rebuilding", cache, e)
    if tokenizer is None:
        logger.info("converting the GGUF tokenizer of %s (one-off, cached in %s)", path.name, cache)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        _save_atomically(tokenizer, cache)
    _restore_gguf_attributes(tokenizer, path)
    return tokenizer


def _restore_gguf_attributes(tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    """Re-apply what a save/load round trip drops: the GGUF chat template (normally kept in
    chat_template.jinja) and the `add_bos_token`/`add_eos_token` flags. transformers never saves those
    flags (the post-processor in tokenizer.json already adds BOS, so ids are unaffected); they are set
    without rebuilding the post-processor so the attributes match transformers' GGUF tokenizer."""
    metadata = read_gguf_header(path).metadata
    template = metadata.get("tokenizer.chat_template")
    if isinstance(template, str) and template and tokenizer.chat_template != template:
        tokenizer.chat_template = template
    for key, attr in (("tokenizer.ggml.add_bos_token", "_add_bos_token"), ("tokenizer.ggml.add_eos_token",
                                                                           "_add_eos_token")):
        if isinstance(metadata.get(key), bool) and hasattr(tokenizer, attr):
            object.__setattr__(tokenizer, attr, metadata[key])


def _save_atomically(tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    """`save_pretrained` into a temp folder, then rename it into place (never a half-written cache)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as e:
        logger.warning("cannot cache the tokenizer in %s: %s", target.parent, e)
        return
    try:
        tokenizer.save_pretrained(str(tmp))
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700
        if target.exists():  # a stale/unreadable entry: move it aside first (rename is atomic, rmtree is not)
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale.", dir=target.parent))
            os.replace(target, stale / "old")
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(tmp, target)
    except OSError as e:
        if not target.is_dir():  # losing a race to another process is fine; anything else is worth a warning
            logger.warning("cannot cache the tokenizer in %s: %s", target, e)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
