"""The attention layer a model calls: holds its spec, delegates to the step's backend."""
from __future__ import annotations

import torch
from torch import nn

from heron.runner.attention.base import AttentionMetadata, AttentionSpec


class Attention(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int,
                 sliding_window: int | None = None, logit_softcap: float | None = None) -> None:
        super().__init__()
        self.spec = AttentionSpec(num_heads, num_kv_heads, head_dim, scale, sliding_window, logit_softcap)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """q [T, Hq*D], k/v [T, Hkv*D] -> [T, Hq*D]."""
        s = self.spec
        t = q.shape[0]
        out = meta.backend.forward(s, q.view(t, s.num_heads, s.head_dim), k.view(t, s.num_kv_heads, s.head_dim),
                                   v.view(t, s.num_kv_heads, s.head_dim), kv_cache, meta)
        return out.reshape(t, s.num_heads * s.head_dim)
