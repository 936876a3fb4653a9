"""Helpers shared by model files: per-layer attention type and declarative weight loading."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from heron.layers.linear import default_weight_loader


def layer_sliding_windows(config) -> list[int | None]:
    """The sliding window of each layer (None = full attention), from HF's config fields."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return [window if t == "sliding_attention" else None for t in layer_types]
    if window is not None and getattr(config, "model_type", "") == "mistral":
        return [window] * n  # Mistral: every layer slides
    return [None] * n


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                 packed_modules_mapping: dict[str, tuple[str, object]], skip: tuple[str, ...] = ()) -> None:
    """Copy HF-named tensors into the model, routing q/k/v and gate/up into fused layers.
    Raises if a checkpoint tensor has no home or a parameter got no tensor."""
    params = dict(model.named_parameters())  # tied weights appear once
    loaded: set[str] = set()
    unexpected = []
    for name, tensor in weights:
        if any(s in name for s in skip) or "rotary_emb.inv_freq" in name:
            continue
        target, shard = name, None
        for src, (dst, shard_id) in packed_modules_mapping.items():
            if f".{src}." in name:
                target, shard = name.replace(f".{src}.", f".{dst}."), shard_id
                break
        param = params.get(target)
        if param is None:
            unexpected.append(name)
            continue
        loader = getattr(param, "weight_loader", default_weight_loader)
        with torch.no_grad():
            loader(param, tensor.to(param.dtype), shard) if shard is not None else loader(param, tensor.to(param.dtype))
        loaded.add(target if shard is None else f"{target}#{shard}")
    if unexpected:
        raise ValueError(f"checkpoint tensors the model does not have: {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    missing = []
    for name in params:
        if name in loaded:
            continue
        shards = [k for k in loaded if k.startswith(name + "#")]
        if not shards:
            missing.append(name)
    if missing:
        raise ValueError(f"parameters missing from the checkpoint: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
