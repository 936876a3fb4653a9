"""Rotary position embeddings (NEOX / rotate-half layout, as HF's Llama, Qwen and Gemma).

The inverse frequencies come from transformers' RoPE initialisers (so every rope_type
HF supports — default, linear, llama3, yarn, ... — is computed the same way); the cos/sin
for a step are computed once per step from the positions and shared by all layers of
the same type, in float32 exactly as HF does.
"""
from __future__ import annotations

import torch

from heron.ops.cpu import fused_ops

try:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
except ImportError:  # pragma: no cover
    ROPE_INIT_FUNCTIONS = {}


def _default_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def rope_parameters_for(config, layer_type: str | None) -> dict:
    params = getattr(config, "rope_parameters", None)
    if params is None:
        return {"rope_type": "default", "rope_theta": getattr(config, "rope_theta", 10000.0)}
    if layer_type is not None and layer_type in params and isinstance(params[layer_type], dict):
        return params[layer_type]
    return params


class RotaryEmbedding:
    """Holds inv_freq and the attention scaling for one rope configuration."""

    def __init__(self, config, head_dim: int, layer_type: str | None = None) -> None:
        params = rope_parameters_for(config, layer_type)
        rope_type = params.get("rope_type", params.get("type", "default")) or "default"
        if rope_type == "default":
            self.inv_freq = _default_inv_freq(params["rope_theta"], head_dim)
            self.scaling = 1.0
        else:
            if rope_type not in ROPE_INIT_FUNCTIONS:
                raise ValueError(f"unsupported rope_type {rope_type!r}; supported: default, {', '.join(ROPE_INIT_FUNCTIONS)}")
            kwargs = {"layer_type": layer_type} if layer_type is not None else {}
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", **kwargs)
            self.inv_freq, self.scaling = inv_freq.float(), float(scaling)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, head_dim] in `dtype`."""
        inv_freq = self.inv_freq.to(positions.device)
        freqs = positions[:, None].float() * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fused_float32: bool = False) -> torch.Tensor:
    """x [T, H, D], cos/sin [T, D]; `fused_float32`: float32 x through the fused op as well."""
    ops = fused_ops(x, fused_float32)
    if ops is not None and cos.dtype == x.dtype and sin.dtype == x.dtype and x.stride(-1) == 1:
        return ops.rope(x, cos, sin)
    cos = cos[:, None, :]
    sin = sin[:, None, :]
    return (x * cos) + (_rotate_half(x) * sin)
