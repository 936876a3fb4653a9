"""GPTQ (Frantar et al., 2022, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers") for one linear layer, on the CPU in float32.

Given calibration inputs X [T, K] of a layer with weight W [N, K], GPTQ quantizes W one input
column at a time and spreads each column's rounding error over the columns not yet quantized,
weighted by the inverse of the Hessian of the layer's output error, H = 2 X^T X (the factor 2
and the number of rows do not change the result; heron passes X^T X summed over the rows):

    H += damp * mean(diag H) * I                 (dampening, default 1%)
    U = cholesky(H^-1, upper)                     (the rows of H^-1 as the columns go)
    for each block of 128 columns, for each column j in it:
        (at the first column of a group: scale and zero of the group from its current values)
        q_j = quantize(w_j);  e_j = (w_j - dequant(q_j)) / U[j, j]
        w_{j+1..block end} -= e_j U[j, j+1..block end]
    after the block: w_{later columns} -= E_block U[block, later]   (lazy batch update)

The grid is heron.quant.grid's (int4: asymmetric group-wise with the zero point, the range
including 0; int8: symmetric per output channel, scales from the original row maxima), and
"dequant" is exactly what heron's kernel computes, so the error fed back is the one that runs.
Columns are taken in their natural order (no act-order / desc_act), group parameters are
computed as each group is reached (not "static groups").

Calibration is non-sequential in heron: every layer's H comes from one pass of the unquantized
model (heron.quant.calibration), not from inputs that went through the already-quantized
earlier layers as in the paper. Deterministic: no randomness, fixed operation order, one thread.
"""
from __future__ import annotations

import contextlib

import torch

from heron.quant.grid import (
    IntWeight,
    check_int4_group,
    int4_dequantize,
    int4_params,
    int4_quantize,
    int8_params,
    int8_quantize,
)

__all__ = ["gptq_quantize", "output_error"]

BLOCK = 128


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of the inverse of the dampened H (float64 for the factorizations)."""
    h = h.double().clone()
    k = h.shape[0]
    diag = torch.diagonal(h)
    dead = diag <= 0
    diag[dead] = 1.0   # inputs that were always 0: their columns get plain rounding
    mean = float(diag.mean())
    for attempt in range(6):
        hd = h + torch.eye(k, dtype=h.dtype) * (damp * 10 ** attempt * mean)
        chol, info = torch.linalg.cholesky_ex(hd)
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0:
                return u.float()
    raise ValueError("GPTQ: the calibration Hessian is not positive definite even with 1e5x the dampening")


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int = 4, group_size: int | None = 128,
                  damp: float = 0.01, block: int = BLOCK) -> IntWeight:
    """Quantize weight [N, K] with GPTQ given hessian [K, K] (X^T X of the calibration inputs).

    bits 4: group-wise asymmetric (group_size one of heron's int4 sizes); bits 8: per output
    channel, symmetric (group_size None). Returns the integer codes (heron.quant.grid.IntWeight)."""
    w = weight.detach().float().clone()
    n, k = w.shape
    if tuple(hessian.shape) != (k, k):
        raise ValueError(f"GPTQ: hessian must be [{k}, {k}] for a weight of {k} input columns, "
                         f"got {tuple(hessian.shape)}")
    if bits == 4:
        check_int4_group(group_size, k, "GPTQ")
        block = max(block, group_size) // group_size * group_size   # groups never straddle blocks
        groups = k // group_size
        codes = torch.empty(n, k, dtype=torch.uint8)
        scales = torch.empty(n, groups)
        zeros = torch.empty(n, groups)
    elif bits == 8:
        if group_size is not None:
            raise ValueError("GPTQ: 8-bit is per output channel; it takes no group size")
        codes = torch.empty(n, k, dtype=torch.int8)
        s8 = int8_params(w.abs().amax(dim=1))
    else:
        raise ValueError(f"GPTQ: bits must be 4 or 8, got {bits}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("GPTQ: weight has NaN or inf values")
    with _one_thread():
        u = _inverse_cholesky(hessian, damp)
        _quantize_columns(w, u, codes, scales if bits == 4 else None, zeros if bits == 4 else None,
                          s8 if bits == 8 else None, group_size, block)
    if bits == 8:
        return IntWeight(8, codes, s8)
    return IntWeight(4, codes, scales, zeros, group_size)


@contextlib.contextmanager
def _one_thread():
    """The column loop is thousands of small ops: on one thread it runs ~3x (idle machine) to
    30x (busy machine) faster than on a pool whose every op synchronises its threads; and its
    float results do not depend on the machine's thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _quantize_columns(w, u, codes, scales, zeros, s8, group_size, block) -> None:
    """GPTQ's loop over the columns of w (updated in place), filling codes (and scales/zeros)."""
    n, k = w.shape
    for b0 in range(0, k, block):
        b1 = min(k, b0 + block)
        wb = w[:, b0:b1].clone()
        err = torch.empty(n, b1 - b0)
        ub = u[b0:b1, b0:b1]
        for i in range(b1 - b0):
            j = b0 + i
            col = wb[:, i]
            if s8 is None:
                if j % group_size == 0:   # the group's parameters from its current (error-updated) values
                    grp = wb[:, i:i + group_size]
                    s, z = int4_params(grp.amin(dim=1), grp.amax(dim=1))
                    scales[:, j // group_size], zeros[:, j // group_size] = s, z
                q = int4_quantize(col, s, z)
                deq = int4_dequantize(q, s, z)
            else:
                q = int8_quantize(col, s8)
                deq = q * s8
            codes[:, j] = q.to(codes.dtype)
            e = (col - deq) / ub[i, i]
            wb[:, i:] -= e[:, None] * ub[i, i:][None, :]
            err[:, i] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]


def output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """sum over calibration rows of |x (approx - weight)^T|^2 = trace(D H D^T), D = approx - weight."""
    d = (approx.float() - weight.float())
    return float(((d @ hessian.float()) * d).sum())
