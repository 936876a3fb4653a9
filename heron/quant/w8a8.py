"""W8A8: int8 weights (symmetric, per output channel) and int8 activations quantized per token
at run time (dynamic, asymmetric), multiplied as integers (ZeroQuant / SmoothQuant).

    x[m, :] ~ (ux[m, :] - zx[m]) * sx[m]     ux in [0, 255], sx = (max(x[m], 0) - min(x[m], 0)) / 255,
                                            zx = round(-min(x[m], 0) / sx) (an integer zero point per token)
    w[n, :] ~ qw[n, :] * sw[n]               qw in [-127, 127] (heron.quant.weight_only.quantize_int8)
                                            (7 bits, [-63, 63], on CPUs without VNNI: see WEIGHT_QMAX)
    y[m, n] = sx[m] * (sw[n] * sum_k ux[m, k] qw[n, k] - zx[m] * sw[n] * sum_k qw[n, k])   (int32 sums)

A per-token zero point spends all 256 codes on the token's own range [min, max] instead of the
symmetric [-absmax, absmax] (on the default model, full text, 7-bit weights: +3.06% perplexity
against +3.73% with symmetric codes). The integer matmul is oneDNN's quantized linear
(`onednn::qlinear_pointwise`, VNNI / AMX-INT8 on CPUs that have them) on a weight prepacked once,
taking the unsigned codes with zero point 0 and applying the per-channel weight scale in its
float32 output; the zero-point term (a rank-1 product with the weight rows' code sums, kept from
quantization) and the per-token scale follow in place, then one rounding to the model dtype.
(Asking the kernel for bf16 output directly is ~10-20% faster at 1,024 rows but adds errors up to
~0.8% of an element, more than its rounding explains.) Without oneDNN, torch._int_mm on the
codes shifted by -128 into int8, in float32.

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


# Code ranges. Activations always take 8 bits (0..255 with a zero point per token). With VNNI (or
# AMX-INT8) the weights take 8 bits too. Without it oneDNN multiplies with VPMADDUBSW, which adds
# the u8 x s8 products of input columns (2i, 2i+1) in saturating int16: 8-bit codes on both sides
# overflow it (0.34% off the exact integer product on average, random data). So there the
# weights take 7 bits: 255 x (63 + 63) = 32,130 fits, and the products are exact. (7-bit
# activations instead, the choice until 2026-12-07, cost more: full-text perplexity +6.1%
# against +3.7% for 7-bit weights with alpha 0.5, symmetric activations, on a Zen 3 VM.)
ACT_LEVELS = 255
WEIGHT_QMAX = 127 if cpu_has_vnni() else 63


def _onednn_available() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops, "onednn")
            and hasattr(torch.ops.onednn, "qlinear_pointwise") and hasattr(torch.ops.onednn, "qlinear_prepack"))


def quantize_activations(x: torch.Tensor, smooth: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token asymmetric 8-bit codes of x [M, K] (divided by the per-channel `smooth` [K]
    first, in float32): (codes [M, K] uint8 in [0, 255], scales [M, 1] float32, zero points
    [M, 1] float32 holding integers in [0, 255]); x ~ (codes - zero) * scale. Each token's range
    is [min(x, 0), max(x, 0)], so 0 is a code (an all-zero token: scale 1, zero 0)."""
    xf = x.to(torch.float32, copy=True)           # a copy: x (maybe float32 already) stays as it is
    if smooth is not None:
        xf.div_(smooth)
    lo, hi = torch.aminmax(xf, dim=1, keepdim=True)           # one pass over x for both
    lo, hi = lo.clamp_(max=0.0), hi.clamp_(min=0.0)
    s = (hi - lo) / float(ACT_LEVELS)
    s = torch.where(s > 0, s, torch.ones_like(s))
    z = lo.div_(s).neg_().round_().clamp_(0, ACT_LEVELS)
    q = xf.div_(s).round_().add_(z).clamp_(0, ACT_LEVELS)
    return q.to(torch.uint8), s, z


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
        # sw[n] * sum_k qw[n, k]: the zero points' term, y -= zx[m] * this (exact integer sums)
        self.w_code_sums = (q.sum(dim=1, dtype=torch.int64).double() * self.w_scale.double()).float()
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
        ux, sx, zx = quantize_activations(x2, self.smooth)
        if self._onednn:
            # the kernel applies the weight scales; the zero points' term and the per-token scales
            # follow in place
            out = torch.ops.onednn.qlinear_pointwise(ux, 1.0, 0, self.packed, self.w_scale, self._w_zero,
                                                     None, 1.0, 0, torch.float32, "none", [], "")
        else:   # int8 x int8: the codes and zero points shifted by -128 (the same differences)
            qx = (ux.to(torch.int16) - 128).to(torch.int8)
            out = torch._int_mm(qx, self.packed).float().mul_(self.w_scale)
            zx = zx - 128.0
        out = out.addr_(zx.view(-1), self.w_code_sums, alpha=-1.0).mul_(sx).to(x.dtype)
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
        return self.int8.nbytes() + packed + self.w_code_sums.numel() * self.w_code_sums.element_size()


# ---- SmoothQuant (Xiao et al., 2023) ---------------------------------------------------------------
# The migration strength alpha per layer. "auto" (the default) tries every value of ALPHA_GRID on
# each linear layer and the LM head, and keeps the one whose quantized product (this CPU's weight
# bits, the activation codes above) is closest to the float product on a sample of the
# calibration inputs: SmoothQuant's own per-model alpha, searched per layer as its follow-ups
# (e.g. Intel Neural Compressor's auto-alpha) do. 0 means no smoothing for that layer. On the
# default model (full text, Zen 3 VM, 7-bit weights) the chosen alphas span 0-0.8 and perplexity
# is +2.46% against +3.06% for alpha 0.5 everywhere.
ALPHA_GRID = (0.0, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
SEARCH_ROWS = 512            # calibration rows per layer the alpha search compares outputs on
SEARCH_HEAD_ROWS = 16384     # weight rows of a wider layer (the LM head) it compares, evenly spaced

CALIBRATION_TOKENS = 4096    # of heron/quant/data/calibration.txt (not the perplexity text)
CALIBRATION_CONTEXT = 1024


def check_alpha(alpha) -> float | str:
    """`smoothquant_alpha` as given: "auto" (None too) or a number in [0, 1)."""
    if alpha is None or alpha == "auto":
        return "auto"
    try:
        a = float(alpha)
    except (TypeError, ValueError):
        a = None
    if isinstance(alpha, bool) or a is None or not 0.0 <= a < 1.0:
        raise ValueError(f"smoothquant_alpha must be 'auto' or a number in [0, 1), got {alpha!r}")
    return a


def smooth_scales(act_max: torch.Tensor, weight: torch.Tensor | None, alpha: float,
                  w_max: torch.Tensor | None = None) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha) per input channel j (clamped to [1e-3, 1e3]):
    x / s and W diag(s) give the same product, with activation outliers moved into the weight.
    A channel the calibration barely saw active counts as 1% of the mean channel's maximum, so
    its weights are not scaled down to nothing (it may be active on other text). `w_max`: the
    weight's column maxima max|W_:,j|, if known (then `weight` is not read)."""
    if w_max is None:
        w_max = weight.detach().float().abs().amax(dim=0)
    w_max = w_max.float().clamp(min=1e-5)
    a = act_max.float()
    a = a.clamp(min=max(float(a.mean()) * 1e-2, 1e-5))
    return (a.pow(alpha) / w_max.pow(1.0 - alpha)).clamp(1e-3, 1e3)


@torch.no_grad()
def search_alpha(act_max: torch.Tensor, weight: torch.Tensor, x: torch.Tensor,
                 grid: tuple = ALPHA_GRID) -> tuple[float, torch.Tensor | None]:
    """The alpha of `grid` whose W8A8 product on the calibration rows x [T, K] has the smallest
    squared error against the float product x W^T; returns (alpha, its smooth scales, or None
    for alpha 0). A weight of more than SEARCH_HEAD_ROWS rows is compared on that many evenly
    spaced rows (the scales come from the whole weight's column maxima either way)."""
    w = weight.detach()
    rows = w[::-(-w.shape[0] // SEARCH_HEAD_ROWS)] if w.shape[0] > SEARCH_HEAD_ROWS else w
    x = x.float()
    want = x @ rows.float().T
    w_max = w.float().abs().amax(dim=0)
    best = None
    for alpha in grid:
        smooth = smooth_scales(act_max, None, alpha, w_max) if alpha > 0 else None
        q = W8A8Weight.quantize(rows, smooth)
        err = float((q.matmul_large(x) - want).square().sum())
        if best is None or err < best[0]:
            best = (err, alpha, smooth)
    return best[1], best[2]


@torch.no_grad()
def calibrate_inputs(runner, windows: list[list[int]], chunk: int, sample_every: int = 0
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """max |x| per input channel of every linear layer and the LM head, over `windows` (token id
    lists) run through `runner`'s unquantized model with its own KV cache (one window at a
    time, prefill chunks of at most `chunk` tokens; nothing is kept in the cache), and (with
    `sample_every` > 0) every sample_every-th input row of each, float32 [T, K]. The LM head's
    are of every token's final hidden state (the model's output), not only the rows sampled."""
    from heron.core.kv_cache_manager import KVCacheManager
    from heron.core.scheduler import SchedulerOutput
    from heron.layers.embedding import ParallelLMHead
    from heron.layers.linear import LinearBase
    from heron.request import Request
    from heron.sampling_params import SamplingParams

    model = runner.model
    linears = {n: m for n, m in model.named_modules() if isinstance(m, LinearBase)}
    heads = [n for n, m in model.named_modules() if isinstance(m, ParallelLMHead)]
    act_max: dict[str, torch.Tensor] = {}
    samples: dict[str, list[torch.Tensor]] = {}
    seen = [0]

    def record(name, x):
        x = x.detach().reshape(-1, x.shape[-1])
        m = x.float().abs().amax(dim=0)
        act_max[name] = m if name not in act_max else torch.maximum(act_max[name], m)
        if sample_every:   # the rows of this call whose index in the whole text is a multiple of sample_every
            samples.setdefault(name, []).append(x[-seen[0] % sample_every::sample_every].float().clone())

    def pre_hook(name):
        return lambda module, args: record(name, args[0])

    def model_hook(module, args, output):
        # the LM head sees only the rows sampled from (the last of a prompt); its inputs are
        # the model's final hidden states, every row of which it would score
        for name in heads:
            record(name, output)

    handles = [m.register_forward_pre_hook(pre_hook(n)) for n, m in linears.items()]
    if heads:
        handles.append(model.register_forward_hook(model_hook))
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
                seen[0] += n
            kv.free(req)
    finally:
        for h in handles:
            h.remove()
    return act_max, {name: torch.cat(parts) for name, parts in samples.items()}


def smoothquant_model(runner, tokenizer, alpha: float | str = "auto", text: str | None = None,
                      num_tokens: int = CALIBRATION_TOKENS, context_len: int = CALIBRATION_CONTEXT) -> dict:
    """`--quantization w8a8` with smoothing: calibrate activation maxima on the calibration text
    (alpha "auto": and keep a sample of each layer's inputs to pick its alpha, search_alpha),
    then give every linear layer and the LM head a W8A8Weight with its smooth scales (a tied
    embedding looks rows up in the LM head's, dividing the scales back out)."""
    from heron.quant.apply import quantize_model
    from heron.quant.calibration import calibration_windows, default_calibration_text

    alpha = check_alpha(alpha)
    # (windows no longer than the KV pool holds)
    context_len = max(2, min(context_len, (runner.num_blocks - 1) * runner.block_size))
    windows = calibration_windows(tokenizer, default_calibration_text() if text is None else text,
                                  num_tokens, context_len)
    tokens = sum(len(w) for w in windows)
    every = max(1, tokens // SEARCH_ROWS) if alpha == "auto" else 0
    act_max, samples = calibrate_inputs(runner, windows, runner.config.max_num_batched_tokens, every)
    from heron.layers.embedding import ParallelLMHead
    lm_head = runner.config.quantization_lm_head
    smooth, alphas = {}, {}
    for name, module in runner.model.named_modules():
        if name not in act_max or (isinstance(module, ParallelLMHead) and lm_head != "auto"):
            continue      # (an LM head given its own format with --quantization-lm-head is not w8a8)
        if alpha == "auto":
            alphas[name], s = search_alpha(act_max[name], module.weight, samples.pop(name))
            if s is not None:
                smooth[name] = s
        else:
            alphas[name] = alpha
            smooth[name] = smooth_scales(act_max[name], module.weight, alpha)
    summary = quantize_model(runner.model, "w8a8", smooth=smooth, lm_head=lm_head)
    summary.update(smoothquant_alpha=alpha, alphas=alphas, calibration_tokens=tokens)
    return summary
