"""The integer grids `heron quantize` writes (RTN, GPTQ and AWQ share them), as integer codes.

int4, asymmetric, one (scale, zero) per group of `group_size` input columns:
    w ~ (q - zero) * scale,  q in 0..15, zero an integer in 1..15
  The range is [min(wmin, 0), max(wmax, 0)] (0 is always on the grid), as heron's RTN
  (heron.quant.weight_only.rtn_int4_codes), with two changes so the codes survive a standard
  checkpoint exactly:
  * zero >= 1: AutoGPTQ's v1 format stores zero - 1 in 4 bits, so a zero of 0 would read back
    as 16. A group whose minimum rounds to zero steps (all values >= 0, or nearly) gets
    zero = 1 and scale >= max/14 instead.
  * scale >= 2^-14 (fp16's smallest normal; all-zero groups keep scale 0): checkpoints store
    scales in fp16, and a bf16 scale (rounded up to bf16, as heron's RTN does) is exact in fp16
    down to there. So the scale is a value of both bf16 and fp16, and loading the checkpoint
    gives bit for bit the kernel scale quantizing it did.
  `int4_dequantize` is the value heron's int4 kernel multiplies by,
  (q - 8) * scale + bf16((8 - zero) * scale) (QuantizedWeight.from_int4's form), so GPTQ's error
  feedback and AWQ's search see the weights that will run.

int8, symmetric, one scale per output channel (heron's int8 kernel):
    w ~ q * scale,  q in -127..127,  scale = absmax / 127 rounded up to bf16 (and >= 2^-14)
  written to a GPTQ checkpoint as the unsigned code q + 128 with zero 128 (sym=True).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from heron.quant.weight_only import INT4_GROUP_SIZES, QuantizedWeight, _bf16_round_up

__all__ = [
    "IntWeight",
    "MIN_SCALE",
    "int4_dequantize",
    "int4_params",
    "int4_quantize",
    "int8_params",
    "rtn",
    "rtn_clipped",
]

MIN_SCALE = 2.0 ** -14   # fp16's smallest normal number


def _floor_scale(s: torch.Tensor) -> torch.Tensor:
    return torch.where(s > 0, s.clamp(min=MIN_SCALE), s)


def int4_params(wmin: torch.Tensor, wmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) float32 of groups with these minima and maxima (any matching shapes)."""
    lo = wmin.float().clamp(max=0.0)
    hi = wmax.float().clamp(min=0.0)
    s = _floor_scale(_bf16_round_up(torch.maximum(hi / 15.0 - lo / 15.0, hi / 14.0)))
    nz = s > 0
    safe = torch.where(nz, s, torch.ones_like(s))
    z = torch.where(nz, torch.round(-lo / safe).clamp_(1, 15), torch.full_like(s, 8.0))
    return s, z


def int4_quantize(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 (float32) of w on the grid (s, z) (broadcast against w)."""
    safe = torch.where(s > 0, s, torch.ones_like(s))
    return (torch.round(w / safe) + z).clamp_(0, 15)


def int4_dequantize(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """What heron's int4 kernel computes for codes q with scale s and zero z (float32)."""
    zk = ((8.0 - z) * s).to(torch.bfloat16).float()
    return (q - 8.0) * s + zk


def int8_params(absmax: torch.Tensor) -> torch.Tensor:
    """Per-channel int8 scales (float32) for rows with these absolute maxima."""
    return _floor_scale(_bf16_round_up(absmax.float() / 127.0))


def int8_quantize(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    safe = torch.where(s > 0, s, torch.ones_like(s))
    return torch.round(w / safe).clamp_(-127, 127)


@dataclass
class IntWeight:
    """A linear layer's quantized weight as integer codes, rows in the layer's (fused) order.

    int4: codes [N, K] uint8 0..15, scales / zeros [N, K/group_size] float32,
          w = int4_dequantize(codes, scales, zeros) per group.
    int8: codes [N, K] int8 -127..127, scales [N] float32, zeros None, w = codes * scale."""

    bits: int
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None = None
    group_size: int | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def build(self) -> QuantizedWeight:
        """The packed weight heron's kernels run."""
        if self.bits == 8:
            return QuantizedWeight.from_int8(self.codes, self.scales)
        return QuantizedWeight.from_int4(self.codes, self.scales, self.zeros, self.group_size)

    def dequantize(self) -> torch.Tensor:
        """float32 [N, K]: the values build().dequantize(torch.float32) holds."""
        if self.bits == 8:
            return self.codes.float() * self.scales[:, None]
        n, k = self.codes.shape
        g = self.group_size
        q = self.codes.float().view(n, k // g, g)
        return int4_dequantize(q, self.scales[..., None], self.zeros[..., None]).view(n, k)

    def rows(self, r0: int, r1: int) -> IntWeight:
        """The rows r0:r1 (one projection of a fused layer)."""
        z = None if self.zeros is None else self.zeros[r0:r1]
        return IntWeight(self.bits, self.codes[r0:r1], self.scales[r0:r1], z, self.group_size)

    @staticmethod
    def cat(parts: list[IntWeight]) -> IntWeight:
        """Stack projections along the output dimension (a fused layer's rows)."""
        first = parts[0]
        if any(p.bits != first.bits or p.group_size != first.group_size for p in parts):
            raise ValueError("cannot fuse projections quantized with different bits or group sizes")
        z = None if first.zeros is None else torch.cat([p.zeros for p in parts])
        return IntWeight(first.bits, torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]),
                         z, first.group_size)


def check_int4_group(group_size: int, in_features: int, who: str) -> None:
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"{who}: int4 group size must be one of {', '.join(map(str, INT4_GROUP_SIZES))} "
                         f"(what heron's int4 kernel runs), got {group_size}")
    if in_features % group_size:
        raise ValueError(f"{who}: {in_features} input columns are not a multiple of the group size {group_size}")


def rtn(w: torch.Tensor, bits: int, group_size: int | None = None) -> IntWeight:
    """Round to nearest on the grids above: w [N, K] float -> IntWeight."""
    w = w.detach().float()
    n, k = w.shape
    if bits == 8:
        s = int8_params(w.abs().amax(dim=1))
        return IntWeight(8, int8_quantize(w, s[:, None]).to(torch.int8), s)
    if bits != 4:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    check_int4_group(group_size, k, "rtn")
    wg = w.view(n, k // group_size, group_size)
    s, z = int4_params(wg.amin(dim=-1), wg.amax(dim=-1))
    q = int4_quantize(wg, s[..., None], z[..., None])
    return IntWeight(4, q.view(n, k).to(torch.uint8), s, z, group_size)


CLIP_SHRINKS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)


def rtn_clipped(w: torch.Tensor, group_size: int, hessian: torch.Tensor,
                shrinks: tuple = CLIP_SHRINKS) -> IntWeight:
    """int4 round to nearest on the grid of a clipped range (AWQ's second step, its clip search):
    per group, the range [min, max] * shrink with the shrink in `shrinks` (1.0 first: rtn's grid)
    whose codes give the smallest output error on the calibration inputs, d H_gg d^T with d the
    group's weight error and H_gg the group's diagonal block of the inputs' Hessian [K, K].
    The same integer grid as rtn, so the codes go into the same checkpoint layouts."""
    w = w.detach().float()
    n, k = w.shape
    check_int4_group(group_size, k, "rtn_clipped")
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"rtn_clipped: hessian must be [{k}, {k}], got {tuple(hessian.shape)}")
    g = k // group_size
    wg = w.view(n, g, group_size)
    idx = torch.arange(g)
    hb = hessian.float().view(g, group_size, g, group_size)[idx, :, idx, :]      # [G, gs, gs] diagonal blocks
    wmin, wmax = wg.amin(dim=-1), wg.amax(dim=-1)
    best = None
    for shrink in shrinks:
        s, z = int4_params(wmin * shrink, wmax * shrink)
        q = int4_quantize(wg, s[..., None], z[..., None])
        d = int4_dequantize(q, s[..., None], z[..., None]) - wg                   # [N, G, gs]
        err = torch.einsum("ngi,gij,ngj->ng", d, hb, d)
        if best is None:
            best = [q, s, z, err]
        else:
            better = err < best[3]
            best = [torch.where(better[..., None], q, best[0]), torch.where(better, s, best[1]),
                    torch.where(better, z, best[2]), torch.where(better, err, best[3])]
    return IntWeight(4, best[0].view(n, k).to(torch.uint8), best[1], best[2], group_size)
