"""W8A8: int8 weights (symmetric, per output channel) and int8 activations quantized per token
at run time (dynamic, symmetric), multiplied as integers (ZeroQuant / SmoothQuant without the
smoothing step).

    x[m, :] ~ qx[m, :] * sx[m]             qx in [-127, 127], sx = absmax(x[m]) / 127
    w[n, :] ~ qw[n, :] * sw[n]             qw in [-127, 127] (heron.quant.weight_only.quantize_int8)
                                           (7 bits, [-63, 63], on CPUs without VNNI: see WEIGHT_QMAX)
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


def cpu_has_vnni() -> bool:
    """True when the CPU multiplies u8 x s8 with int32 accumulation (AVX512-VNNI, AVX-VNNI or
    AMX-INT8). Without it oneDNN falls back to VPMADDUBSW, which adds pairs of u8 x s8 products
    in int16 and saturates once a pair exceeds 32,767 (255 x 127 x 2 does)."""
    from heron.ops.cpu import cpu_flags
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(cpu_flags().split()))


# Code ranges. With VNNI (or AMX-INT8) both operands take 8 bits. Without it oneDNN multiplies
# with VPMADDUBSW, which adds the u8 x s8 products of input columns (2i, 2i+1) in saturating
# int16: 8-bit codes on both sides overflow it (0.34% off the exact integer product on average,
# random data). So there the weights take 7 bits: 255 x (63 + 63) = 32,130 fits, and the products
# are exact. (7-bit activations instead, the choice until 2026-12-07, cost more: full-text
# perplexity +6.1% against +3.7% for 7-bit weights with alpha 0.5, on a Zen 3 VM.)
ACT_QMAX = 127
WEIGHT_QMAX = 127 if cpu_has_vnni() else 63
_ZERO_POINT = ACT_QMAX + 1


def _onednn_available() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops, "onednn")
            and hasattr(torch.ops.onednn, "qlinear_pointwise") and hasattr(torch.ops.onednn, "qlinear_prepack"))


def quantize_activations(x: torch.Tensor, offset: int = 0, smooth: torch.Tensor | None = None,
                         qmax: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8 of x [M, K] (divided by the per-channel `smooth` [K] first, in
    float32): (codes [M, K] in [-qmax, qmax] as int8, or shifted by `offset` (qmax + 1) into
    [1, 2 qmax + 1] as uint8; scales [M, 1] float32). qmax defaults to ACT_QMAX."""
    qmax = ACT_QMAX if qmax is None else qmax
    xf = x.to(torch.float32, copy=True)           # a copy: x (maybe float32 already) stays as it is
    if smooth is not None:
        xf.div_(smooth)
    s = xf.abs().amax(dim=1, keepdim=True) / float(qmax)
    s = torch.where(s > 0, s, torch.ones_like(s))
    q = xf.div_(s).round_()
    if offset:
        return q.add_(offset).clamp_(offset - qmax, offset + qmax).to(torch.uint8), s
    return q.clamp_(-qmax, qmax).to(torch.int8), s


class W8A8Weight:
    method = "w8a8"

    def __init__(self, int8: QuantizedWeight, smooth: torch.Tensor | None = None) -> None:
        if int8.method != "int8":
            raise ValueError(f"W8A8Weight wraps an int8 QuantizedWeight, got {int8.method}")
        self.int8 = int8
        # SmoothQuant: the codes are of W diag(smooth), and x is divided by smooth per channel
        self.smooth = None if smooth is None else smooth.detach().float().contiguous()
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
    def quantize(cls, weight: torch.Tensor, smooth: torch.Tensor | None = None) -> W8A8Weight:
        """`smooth` [K] (SmoothQuant's per-input-channel s, positive): quantize W diag(s) and
        divide activations by s, moving their outlier channels' range into the weight."""
        if smooth is None:
            return cls(quantize_int8(weight, qmax=WEIGHT_QMAX))
        if smooth.shape != (weight.shape[1],) or not bool((smooth > 0).all()):
            raise ValueError(f"smooth must be {weight.shape[1]} positive per-input-channel scales")
        return cls(quantize_int8(weight.float() * smooth.float()[None, :], qmax=WEIGHT_QMAX), smooth)

    def __repr__(self) -> str:
        return f"W8A8Weight(out_features={self.out_features}, in_features={self.in_features}, nbytes={self.nbytes()})"

    # ---- matmuls ----------------------------------------------------------------------------
    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """Few rows: the int8 weight-only kernel (activations unquantized)."""
        if self.smooth is not None:
            x = (x.float() / self.smooth).to(x.dtype)
        return self.int8.matmul(x)

    def matmul_large(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N] with per-token int8 activations and an integer matmul."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self._onednn:
            ux, sx = quantize_activations(x2, _ZERO_POINT, self.smooth)
            # the kernel applies the weight scales; the per-token scales follow in place
            out = torch.ops.onednn.qlinear_pointwise(ux, 1.0, _ZERO_POINT, self.packed, self.w_scale, self._w_zero,
                                                     None, 1.0, 0, torch.float32, "none", [], "")
            out = out.mul_(sx).to(x.dtype)
        else:
            qx, sx = quantize_activations(x2, smooth=self.smooth)
            out = (torch._int_mm(qx, self.packed).float() * sx * self.w_scale).to(x.dtype)
        return out.reshape(*shape[:-1], self.out_features)

    # ---- what other code asks of a quantized weight ----------------------------------------------
    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        w = self.int8.dequantize(dtype if self.smooth is None else torch.float32)
        return w if self.smooth is None else (w / self.smooth[None, :]).to(dtype)

    def dequantize_rows(self, rows: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        w = self.int8.dequantize_rows(rows, dtype if self.smooth is None else torch.float32)
        return w if self.smooth is None else (w / self.smooth).to(dtype)

    def codes(self):
        return self.int8.codes()

    def nbytes(self) -> int:
        packed = self.packed.numel() * self.packed.element_size()
        return self.int8.nbytes() + packed


# ---- SmoothQuant (Xiao et al., 2023) ---------------------------------------------------------------
SMOOTH_ALPHA = 0.65          # migration strength (see smooth_scales), 8-bit weights (VNNI)
SMOOTH_ALPHA_7BIT = 0.5      # 7-bit weights (no VNNI): less of the activations' range moved into them


def default_smooth_alpha() -> float:
    """`smoothquant_alpha`'s default: 0.65 where weights take 8 bits, 0.5 where they take 7 (full
    text, Zen 3 VM, 7-bit weights: alpha 0.35 / 0.5 / 0.65 gave +5.2% / +3.7% / +4.5%)."""
    return SMOOTH_ALPHA if WEIGHT_QMAX == 127 else SMOOTH_ALPHA_7BIT


CALIBRATION_TOKENS = 4096    # of heron/quant/data/calibration.txt (not the perplexity text)
CALIBRATION_CONTEXT = 1024


def smooth_scales(act_max: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha) per input channel j (clamped to [1e-3, 1e3]):
    x / s and W diag(s) give the same product, with activation outliers moved into the weight.
    A channel the calibration barely saw active counts as 1% of the mean channel's maximum, so
    its weights are not scaled down to nothing (it may be active on other text)."""
    w_max = weight.detach().float().abs().amax(dim=0).clamp(min=1e-5)
    a = act_max.float()
    a = a.clamp(min=max(float(a.mean()) * 1e-2, 1e-5))
    return (a.pow(alpha) / w_max.pow(1.0 - alpha)).clamp(1e-3, 1e3)


@torch.no_grad()
def calibrate_input_max(runner, windows: list[list[int]], chunk: int) -> dict[str, torch.Tensor]:
    """max |x| per input channel of every linear layer and the LM head, over `windows` (token id
    lists) run through `runner`'s unquantized model with its own KV cache (one window at a
    time, prefill chunks of at most `chunk` tokens; nothing is kept in the cache)."""
    from heron.core.kv_cache_manager import KVCacheManager
    from heron.core.scheduler import SchedulerOutput
    from heron.layers.embedding import ParallelLMHead
    from heron.layers.linear import LinearBase
    from heron.request import Request
    from heron.sampling_params import SamplingParams

    layers = {n: m for n, m in runner.model.named_modules() if isinstance(m, (LinearBase, ParallelLMHead))}
    act_max: dict[str, torch.Tensor] = {}

    def hook(name):
        def pre_hook(module, args):
            x = args[0].detach()
            m = x.reshape(-1, x.shape[-1]).float().abs().amax(dim=0)
            act_max[name] = m if name not in act_max else torch.maximum(act_max[name], m)
        return pre_hook

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    kv = KVCacheManager(runner.num_blocks, runner.block_size, enable_prefix_caching=False)
    params = SamplingParams(temperature=0.0, max_tokens=1)
    try:
        for i, ids in enumerate(windows):
            req = Request(f"calibration-{i}", list(ids), params, frozenset(), max_tokens=1)
            while req.num_computed_tokens < req.num_tokens:
                n = min(chunk, req.num_tokens - req.num_computed_tokens)
                if not kv.allocate_slots(req, n):
                    raise RuntimeError("the KV cache is too small for a calibration window; raise kv_cache_memory")
                runner.execute(SchedulerOutput(scheduled=[(req, n)]))
                req.num_computed_tokens += n
            kv.free(req)
    finally:
        for h in handles:
            h.remove()
    return act_max


def smoothquant_model(runner, tokenizer, alpha: float = SMOOTH_ALPHA, text: str | None = None,
                      num_tokens: int = CALIBRATION_TOKENS, context_len: int = CALIBRATION_CONTEXT) -> dict:
    """`--quantization w8a8` with smoothing: calibrate activation maxima on the calibration text,
    then give every linear layer and the LM head a W8A8Weight with its smooth scales (a tied
    embedding looks rows up in the LM head's, dividing the scales back out)."""
    from heron.quant.apply import quantize_model
    from heron.quant.calibration import calibration_windows, default_calibration_text

    # (windows no longer than the KV pool holds)
    context_len = max(2, min(context_len, (runner.num_blocks - 1) * runner.block_size))
    windows = calibration_windows(tokenizer, default_calibration_text() if text is None else text,
                                  num_tokens, context_len)
    act_max = calibrate_input_max(runner, windows, runner.config.max_num_batched_tokens)
    smooth = {}
    for name, module in runner.model.named_modules():
        if name in act_max:
            smooth[name] = smooth_scales(act_max[name], module.weight, alpha)
    summary = quantize_model(runner.model, "w8a8", smooth=smooth, lm_head=runner.config.quantization_lm_head)
    summary.update(smoothquant_alpha=alpha, calibration_tokens=sum(len(w) for w in windows))
    return summary
