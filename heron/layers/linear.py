"""Linear layers named for tensor parallelism (world size 1 today).

Each parameter carries a `weight_loader(param, loaded, shard_id)` so the generic loader can
put HF's separate q/k/v or gate/up tensors into one fused weight (nano-vllm style). A
quantization transform can later swap a layer's weight and `forward` without touching the
model files.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import heron.quant.apply as quant_apply
from heron.ops.cpu import small_batch_gemv


# bumped whenever a layer's weight is swapped for a quantized one (or fused ops are switched on:
# heron.quant.apply.use_fused_float32), so that plans built on the modules (the direct decode path
# of heron.models.gemma3) know to look again
QUANT_EPOCH = [0]


def empty_parameter(like: torch.Tensor) -> nn.Parameter:
    """A 0-element stand-in for a weight a quantized layer no longer keeps (dtype and device kept)."""
    return nn.Parameter(torch.empty(0, dtype=like.dtype, device=like.device), requires_grad=False)


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint {tuple(loaded.shape)}")
    param.data.copy_(loaded)


class LinearBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.has_bias = bias   # (a plain attribute: `self.bias` goes through nn.Module's slower lookup)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        default_weight_loader(param, loaded)

    packed_weight: torch.Tensor | None = None
    quant = None   # a heron.quant QuantizedWeight once --quantization has swapped the weight
    # a layer with the same weight in full precision, for calls of more rows than the quantized
    # kernel serves (a self-draft borrows the target's layers for its catch-up prefills)
    full_precision = None   # (a bound forward, not a Module: it must not become a submodule)

    def set_quantized(self, qweight) -> None:
        """Keep only the quantized weight (the plain and packed ones are dropped)."""
        self.quant = qweight
        QUANT_EPOCH[0] += 1
        self.packed_weight = None
        self.weight = empty_parameter(self.weight)

    def process_weights_after_loading(self) -> None:
        """On CPU with bf16 weights: re-lay the weight out once in oneDNN's blocked format.

        F.linear hands oneDNN a plain row-major weight, which it re-blocks on every call; at
        decode batch sizes that re-blocking streams the whole weight through memory once more
        per step (~1.7x slower at 64 rows here); the packed copy gives bit-identical results.
        The plain weight stays for 1-3 rows, where heron's streaming GEMV kernel reads it
        faster than either (memory-bound single-stream decode)."""
        w = self.weight
        if self.quant is not None or w.device.type != "cpu" or w.dtype != torch.bfloat16 or not _can_pack():
            return
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(w.detach(), 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.quant
        if q is not None:
            if self.full_precision is not None and x.numel() > quant_apply.kernel_max_rows(q) * x.shape[-1]:
                return self.full_precision(x)
            out = quant_apply.quantized_linear(q, x)
            return out + self.bias if self.has_bias else out
        if self.packed_weight is not None:
            if x.shape[0] <= 3:
                ops = small_batch_gemv(x, self.weight)
                if ops is not None:
                    return ops.gemv(x, self.weight, self.bias)
            return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [None], "")
        return F.linear(x, self.weight, self.bias)


def _can_pack() -> bool:
    """oneDNN can re-lay bf16 weights out here: not disabled, built in, and a CPU with its bf16
    path (AVX512-BW/VL/DQ or AVX-NE-CONVERT; on an AVX2-only CPU the reorder raises)."""
    import os
    if os.environ.get("HERON_NO_PACKED_WEIGHTS", "") not in ("", "0") or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class ColumnParallelLinear(LinearBase):
    """Output features would be split across ranks."""


class RowParallelLinear(LinearBase):
    """Input features would be split across ranks (and the output all-reduced)."""


class MergedColumnParallelLinear(LinearBase):
    """Several column-parallel projections of the same input in one matmul (gate/up)."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False) -> None:
        self.output_sizes = list(output_sizes)
        super().__init__(in_features, sum(output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        offset = sum(self.output_sizes[:shard_id])
        size = self.output_sizes[shard_id]
        target = param.data.narrow(0, offset, size)
        if target.shape != loaded.shape:
            raise ValueError(f"shape mismatch for shard {shard_id}: {tuple(target.shape)} vs {tuple(loaded.shape)}")
        target.copy_(loaded)


class QKVParallelLinear(MergedColumnParallelLinear):
    """q, k and v projections fused; shard ids "q", "k", "v"."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False) -> None:
        self.q_size = num_heads * head_dim
        self.kv_size = num_kv_heads * head_dim
        super().__init__(hidden_size, [self.q_size, self.kv_size, self.kv_size], bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        super().weight_loader(param, loaded, {"q": 0, "k": 1, "v": 2}[shard_id])
