"""W8A8: int8 weights (symmetric, per output channel) and int8 activations quantized per token
at run time (dynamic, symmetric), multiplied as integers (ZeroQuant / SmoothQuant without the
smoothing step).

    x[m, :] ~ qx[m, :] * sx[m]             qx in [-127, 127], sx = absmax(x[m]) / 127
    w[n, :] ~ qw[n, :] * sw[n]             qw in [-127, 127] (heron.quant.weight_only.quantize_int8)
    y[m, n] = sx[m] * sw[n] * sum_k qx[m, k] * qw[n, k]        (int32 accumulation)

The integer matmul is oneDNN's quantized linear (`onednn::qlinear_pointwise`, VNNI / AMX-INT8 on
CPUs that have them) on a weight prepacked once; oneDNN takes unsigned activations, so qx is
shifted by 128 and passed with zero point 128; the kernel applies the per-channel weight scale
in its float32 output, the per-token scale follows in place, then one rounding to the model
dtype. (Asking the kernel for bf16 output directly is ~10-20% faster at 1,024 rows but adds
errors up to ~0.8% of an element, more than its rounding explains.) Without oneDNN,
torch._int_mm in float32.

Calls with at most KERNEL_MAX_ROWS rows (decode of a few streams, which is memory-bound) run
the int8 weight-only kernel on the same codes instead: activations stay in bf16 there, which
only makes those rows more exact. Memory: the int8 codes twice (plain for that kernel and
oneDNN's blocked copy), ~half of bf16.
"""
from __future__ import annotations

import torch

from heron.quant.weight_only import QuantizedWeight, quantize_int8

_ZERO_POINT = 128


def _onednn_available() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops, "onednn")
            and hasattr(torch.ops.onednn, "qlinear_pointwise") and hasattr(torch.ops.onednn, "qlinear_prepack"))


def quantize_activations(x: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8 of x [M, K]: (codes [M, K] in [-127, 127] as int8, or shifted by
    `offset` = 128 into [1, 255] as uint8; scales [M, 1] float32)."""
    xf = x.float()
    s = xf.abs().amax(dim=1, keepdim=True) / 127.0
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = xf.div_(s).round_()
    if offset:
        return q.add_(offset).clamp_(offset - 127, offset + 127).to(torch.uint8), s
    return q.clamp_(-127, 127).to(torch.int8), s


class W8A8Weight:
    method = "w8a8"

    def __init__(self, int8: QuantizedWeight) -> None:
        if int8.method != "int8":
            raise ValueError(f"W8A8Weight wraps an int8 QuantizedWeight, got {int8.method}")
        self.int8 = int8
        self.out_features, self.in_features = int8.out_features, int8.in_features
        self.group_size = None
        q = int8.qweight[:, :self.in_features].contiguous()        # [N, K] int8, unpadded
        self.w_scale = int8.scales.float().contiguous()           # [N]: what the weight-only kernel uses too
        self._onednn = _onednn_available()
        if self._onednn:
            self.packed = torch.ops.onednn.qlinear_prepack(q, [64, self.in_features])
            self._w_zero = torch.zeros(self.out_features, dtype=torch.long)
        else:
            self.packed = q.t().contiguous()                      # [K, N] for torch._int_mm

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> W8A8Weight:
        return cls(quantize_int8(weight))

    def __repr__(self) -> str:
        return f"W8A8Weight(out_features={self.out_features}, in_features={self.in_features}, nbytes={self.nbytes()})"

    # ---- matmuls ----------------------------------------------------------------------------
    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """Few rows: the int8 weight-only kernel (activations unquantized)."""
        return self.int8.matmul(x)

    def matmul_large(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N] with per-token int8 activations and an integer matmul."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self._onednn:
            ux, sx = quantize_activations(x2, _ZERO_POINT)
            # the kernel applies the weight scales; the per-token scales follow in place
            out = torch.ops.onednn.qlinear_pointwise(ux, 1.0, _ZERO_POINT, self.packed, self.w_scale, self._w_zero,
                                                     None, 1.0, 0, torch.float32, "none", [], "")
            out = out.mul_(sx).to(x.dtype)
        else:
            qx, sx = quantize_activations(x2)
            out = (torch._int_mm(qx, self.packed).float() * sx * self.w_scale).to(x.dtype)
        return out.reshape(*shape[:-1], self.out_features)

    # ---- what other code asks of a quantized weight ----------------------------------------------
    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return self.int8.dequantize(dtype)

    def dequantize_rows(self, rows: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return self.int8.dequantize_rows(rows, dtype)

    def codes(self):
        return self.int8.codes()

    def nbytes(self) -> int:
        packed = self.packed.numel() * self.packed.element_size()
        return self.int8.nbytes() + packed
