"""AWQ (Lin et al., 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration"): per-input-channel scales chosen from the activations, then round to nearest.

For linear layers sharing one input x [T, K] (fused into one heron layer: q/k/v, gate/up) with
weight W [N, K], AWQ multiplies the weight's input channels by s and divides the input by s,
which leaves the layer's output unchanged in exact arithmetic but lets the channels that carry
large activations keep more precision on the int4 grid:

    s = a^alpha / sqrt(max(a^alpha) * min(a^alpha)),  a = mean |x| per input channel
    W_stored = RTN(W diag(s)),   the runtime input is x / s (folded into the op before)

alpha is searched over ALPHA_GRID points in [0, 1) (alpha = 0 is s = 1, plain RTN), minimising
the output error on the calibration inputs, sum_t |x_t (W_eff - W)^T|^2 = trace(D H D^T) with
H = X^T X and D = W_eff - W, W_eff the weight the scaled model really computes with. So the
search never scores worse than RTN on its own objective. (Heron searches on H rather than on
stored inputs: the same numbers, and K x K memory instead of T x K.)

Where 1/s goes (heron.quant.awq.apply_awq), exact with heron's layers:
  * q/k/v (input: input_layernorm) and gate/up (input: the norm before the MLP, Gemma's
    pre_feedforward_layernorm, Llama's post_attention_layernorm): into the norm's weight.
    Llama RMSNorm multiplies by w, so w' = w / s; Gemma's RMSNorm multiplies by (1 + w), so
    w' = (1 + w) / s - 1. The checkpoint stores norms in bf16, and the search scores the
    realized factor (1 + bf16(w')) / (1 + w) (resp. bf16(w') / w) instead of 1 / s, so the
    rounding of the folded norm is part of the objective.
  * down_proj (input: act(gate) * up): into the rows of up_proj (and its bias): exact, since
    the input is linear in up's output; gate/up is quantized after this fold.
  * o_proj (input: the attention output, linear in v): into the rows of v_proj (and its bias).
    With grouped-query attention one v channel feeds an o_proj input channel in each of the
    query heads of its group, so those channels share one scale: `a` is averaged over the
    heads of each group first. q/k/v is quantized after this fold.
Then AWQ's second step, its clip search: each scaled weight is rounded on the clipped range per
group with the smallest output error on the calibration inputs (heron.quant.grid.rtn_clipped,
with the Hessian of the inputs the runtime really sees, x times the realized factor).

Calibration is non-sequential: all statistics come from one pass of the unquantized model
(heron.quant.calibration). Deterministic.
"""
from __future__ import annotations

import torch
from torch import nn

from heron.quant.gptq import output_error
from heron.quant.grid import rtn, rtn_clipped

__all__ = ["ALPHA_GRID", "apply_awq", "awq_scales", "search_scale"]

ALPHA_GRID = 20
_MIN_SCALE = 1e-4


def awq_scales(act_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = a^alpha normalised by sqrt(max * min) (all ones for alpha = 0)."""
    s = act_mean.float().clamp(min=_MIN_SCALE).pow(alpha).clamp(min=_MIN_SCALE)
    return s / (s.max() * s.min()).sqrt()


def search_scale(weight: torch.Tensor, hessian: torch.Tensor, act_mean: torch.Tensor, group_size: int,
                 realize=None, grid: int = ALPHA_GRID) -> tuple[torch.Tensor, torch.Tensor, float, list[float]]:
    """The best per-input-channel scale for weight [N, K] with inputs of Hessian [K, K] and mean
    |x| act_mean [K], over alpha in {0, 1/grid, ..., (grid-1)/grid}.

    `realize(s)` gives the factor the runtime really multiplies the input by (default 1/s;
    a fold into a bf16 norm weight rounds it). Returns (s, factor, alpha, losses per alpha)."""
    w = weight.detach().float()
    h = hessian.float()
    losses = []
    best = None
    for i in range(grid):
        alpha = i / grid
        s = awq_scales(act_mean, alpha)
        factor = 1.0 / s if realize is None else realize(s)
        w_eff = rtn(w * s, 4, group_size).dequantize() * factor
        loss = output_error(w, w_eff, h)
        losses.append(loss)
        if best is None or loss < best[0]:
            best = (loss, s, factor, alpha)
    return best[1], best[2], best[3], losses


# ---- whole decoder layers ----------------------------------------------------------------------
def _norm_realize(norm: nn.Module):
    """realize(s) and fold(s) for a scale folded into this RMSNorm's weight (stored in bf16)."""
    from heron.layers.norm import GemmaRMSNorm, RMSNorm
    w = norm.weight.detach().float()
    if isinstance(norm, GemmaRMSNorm):
        def new_weight(s):
            return ((1.0 + w) / s - 1.0).to(torch.bfloat16).float()
        m = 1.0 + w

        def realize(s):
            return torch.where(m != 0, (1.0 + new_weight(s)) / torch.where(m != 0, m, 1.0), 1.0 / s)
    elif isinstance(norm, RMSNorm):
        def new_weight(s):
            return (w / s).to(torch.bfloat16).float()

        def realize(s):
            return torch.where(w != 0, new_weight(s) / torch.where(w != 0, w, 1.0), 1.0 / s)
    else:
        raise ValueError(f"AWQ: cannot fold a scale into a {type(norm).__name__}")

    def fold(s):
        norm.weight.data.copy_(new_weight(s).to(norm.weight.dtype))
    return realize, fold


def _scaled_hessian(h: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """The Hessian of the inputs x * factor (per channel) the scaled weight multiplies."""
    f = factor.float()
    return h.float() * f[:, None] * f[None, :]


def _scale_and_quantize(lin: nn.Module, st, a: torch.Tensor, group_size: int, grid, realize=None) -> tuple:
    """AWQ on one linear layer: search its input-channel scale s (search_scale), multiply its
    weight by s, and round it on clipped ranges (rtn_clipped) against the Hessian of the inputs
    it will see. Returns (s, the realized factor, alpha, IntWeight); the caller folds 1/s."""
    h = st.hessian()
    s, factor, alpha, _ = search_scale(lin.weight, h, a, group_size, realize, grid)
    lin.weight.data *= s[None, :].to(lin.weight.dtype)
    return s, factor, alpha, rtn_clipped(lin.weight, group_size, _scaled_hessian(h, factor))


def _scale_rows(layer: nn.Module, r0: int, r1: int, factor: torch.Tensor) -> None:
    """Multiply output rows r0:r1 of a linear layer (weight and bias) by factor [r1 - r0]."""
    layer.weight.data[r0:r1] *= factor[:, None].to(layer.weight.dtype)
    if layer.bias is not None:
        layer.bias.data[r0:r1] *= factor.to(layer.bias.dtype)


def _mlp_norm(layer: nn.Module) -> nn.Module:
    norm = getattr(layer, "pre_feedforward_layernorm", None)   # Gemma 3: sandwich norms
    return norm if norm is not None else layer.post_attention_layernorm


@torch.no_grad()
def apply_awq(layer: nn.Module, stats: dict, group_size: int, grid: int = ALPHA_GRID) -> dict[str, tuple]:
    """Search and fold AWQ scales for one decoder layer (heron's Gemma 3 / Llama layers, float32),
    then quantize its four linear layers by RTN on clipped ranges (rtn_clipped). `stats` maps the
    layer's linear modules ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj",
    "mlp.down_proj") to their heron.quant.calibration.InputStats. Modifies the layer's float
    weights (the folds); returns {module: (IntWeight, alpha)}."""
    attn, mlp = layer.self_attn, layer.mlp
    if not all(hasattr(attn, a) for a in ("qkv_proj", "o_proj", "num_heads", "num_kv_heads", "head_dim")) or \
            not all(hasattr(mlp, a) for a in ("gate_up_proj", "down_proj")):
        raise ValueError(f"AWQ: unsupported decoder layer {type(layer).__name__}")
    out: dict[str, tuple] = {}

    # o_proj: 1/s into v's rows; one scale per v channel, shared by the query heads of its group
    st = stats["self_attn.o_proj"]
    hq, hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    a = st.abs_mean().view(hkv, hq // hkv, d).mean(dim=1)                       # [Hkv, D]
    a = a[:, None, :].expand(hkv, hq // hkv, d).reshape(-1)
    _, factor, alpha, q = _scale_and_quantize(attn.o_proj, st, a, group_size, grid)
    out["self_attn.o_proj"] = (q, alpha)
    v0 = attn.q_size + attn.kv_size
    _scale_rows(attn.qkv_proj, v0, v0 + attn.kv_size, factor.view(hkv, hq // hkv, d)[:, 0].reshape(-1))

    # down_proj: 1/s into up's rows (the second half of gate_up)
    st = stats["mlp.down_proj"]
    down, gate_up = mlp.down_proj, mlp.gate_up_proj
    _, factor, alpha, q = _scale_and_quantize(down, st, st.abs_mean(), group_size, grid)
    out["mlp.down_proj"] = (q, alpha)
    inter = down.in_features
    _scale_rows(gate_up, inter, 2 * inter, factor)

    # q/k/v and gate/up: 1/s into the norm before them
    for name, lin, norm in (("self_attn.qkv_proj", attn.qkv_proj, layer.input_layernorm),
                            ("mlp.gate_up_proj", gate_up, _mlp_norm(layer))):
        st = stats[name]
        realize, fold = _norm_realize(norm)
        s, _, alpha, q = _scale_and_quantize(lin, st, st.abs_mean(), group_size, grid, realize)
        fold(s)
        out[name] = (q, alpha)
    return out
