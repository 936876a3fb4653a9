"""The gated activations of the MLPs: [gate, up] -> act(gate) * up, one fused C++ op on CPU for bf16
(torch's rounding steps) and, in quantized models, float32."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from heron.ops.cpu import fused_ops


class SiluAndMul(nn.Module):
    """x = [gate, up] -> silu(gate) * up (SwiGLU)."""
    fused_float32 = False   # float32 x through the fused op as well (quantized models: heron.quant.apply)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = fused_ops(x, self.fused_float32)
        if ops is not None:
            return ops.act_and_mul(x, False)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class GeluTanhAndMul(nn.Module):
    """x = [gate, up] -> gelu_tanh(gate) * up (GeGLU, Gemma)."""
    fused_float32 = False   # float32 x through the fused op as well (quantized models: heron.quant.apply)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = fused_ops(x, self.fused_float32)
        if ops is not None:
            return ops.act_and_mul(x, True)
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up


def get_act_and_mul(name: str) -> nn.Module:
    if name in ("silu", "swish"):
        return SiluAndMul()
    if name in ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new"):
        return GeluTanhAndMul()
    raise ValueError(f"unsupported activation {name!r}; supported: silu, gelu_pytorch_tanh")
