"""HF checkpoint folders: `config.json` + `*.safetensors` (single file or sharded with an index)."""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import AutoConfig, PretrainedConfig

INDEX_FILE = "model.safetensors.index.json"


def load_hf_config(model_dir: str | os.PathLike) -> PretrainedConfig:
    """`AutoConfig` from a local folder (no hub access, no remote code)."""
    model_dir = Path(model_dir).expanduser()
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json; expected an HF model folder")
    return AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False, local_files_only=True)


def safetensors_files(model_dir: str | os.PathLike) -> list[Path]:
    """The folder's weight files: those named by `model.safetensors.index.json`, else all `*.safetensors`."""
    model_dir = Path(model_dir).expanduser()
    index = model_dir / INDEX_FILE
    if index.is_file():
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [str(p.name) for p in files if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are missing from {model_dir}: {', '.join(missing)}")
        if files:
            return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no safetensors weights in {model_dir}: expected model.safetensors or shards listed in {INDEX_FILE} "
            f"(.bin/.pt checkpoints are not supported; convert them to safetensors)")
    return files


def iter_safetensors(model_dir: str | os.PathLike, dtype: torch.dtype = torch.float32,
                     progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(name, tensor)` for every tensor of the folder's safetensors files; floating tensors are
    converted to `dtype`, integer ones are left as stored. Missing weights raise at call time."""
    files = safetensors_files(model_dir)
    return _iter_files(files, dtype, progress)


def _iter_files(files: list[Path], dtype: torch.dtype, progress: bool) -> Iterator[tuple[str, torch.Tensor]]:
    counts = []
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            counts.append(len(list(f.keys())))
    with tqdm(total=sum(counts), desc="Loading weights", unit="tensor", file=sys.stderr, disable=not progress,
              leave=False) as bar:
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    tensor = f.get_tensor(name)
                    if tensor.is_floating_point():
                        tensor = tensor.to(dtype)
                    bar.update(1)
                    yield name, tensor
