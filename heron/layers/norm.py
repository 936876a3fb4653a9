"""RMSNorm in float32, in the two conventions: `w * x` (Llama, Qwen) and `(1 + w) * x` (Gemma).

bf16 activations on CPU go through one fused C++ op (heron.ops.cpu) with the same rounding
steps; GemmaRMSNorm can also add a residual to its output in the same pass. float32 activations
take the fused op too when `fused_float32` is set (quantized models: heron.quant.apply).
"""
from __future__ import annotations

import torch
from torch import nn

from heron.ops.cpu import fused_ops


class RMSNorm(nn.Module):
    fused_float32 = False   # float32 x through the fused op as well (not bit-identical to HF's)

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = fused_ops(x, self.fused_float32)
        w = self.weight
        if ops is not None and w.dtype == x.dtype:
            return ops.rms_norm(x, w, self.eps, False, None)
        # same order of operations as HF's LlamaRMSNorm, so float32 results match bit for bit
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class GemmaRMSNorm(nn.Module):
    fused_float32 = False   # float32 x through the fused op as well (not bit-identical to HF's)

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """norm(x), or residual + norm(x) when a residual is given."""
        ops = fused_ops(x, self.fused_float32)
        w = self.weight
        if ops is not None and w.dtype == x.dtype and (residual is None or residual.dtype == x.dtype):
            return ops.rms_norm(x, w, self.eps, True, residual)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = (h * (1.0 + self.weight.float())).to(x.dtype)
        return out if residual is None else residual + out
