"""`--quantization gguf`: run a quantized GGUF with its weights kept quantized, in the closest of
heron's weight-only formats (heron.quant.weight_only), decoded from the file's own ggml blocks.

Mapping (GGML type of the stored tensor -> heron format of the layer):

  Q4_0, Q4_1, Q4_K      int4, group 32, EXACT: these are 4-bit codes with an affine map per 32
                        values (Q4_K: w = d*sc*q - dmin*m per 32-value sub-block; Q4_0:
                        w = d*(q - 8); Q4_1: w = d*q + m), which int4-g32 holds as it is: the
                        codes are copied, scale = d*sc and offset = -dmin*m go into the kernel's
                        bf16 scale/zero (QuantizedWeight.from_int4_affine), so the only change is
                        bf16 rounding of the scale and zero: |error| <= 2^-8 (8|scale| + |8 scale + offset|).
  Q5_0, Q5_1, Q5_K,     int8 per output channel, re-quantized (round to nearest) from the exact
  Q6_K, Q8_0, other     dequantized values: |error| <= scale/2 = absmax(row)/254. int4 g32 would
  types of >= 5 bits    be ~1.8x faster on these layers but 4 bits on top of a 5-6 bit grid costs
                        far more: default model, first 3,071 tokens of the eval text, bf16 9.823,
                        this mapping 9.835, with Q5_0 -> int4 11.410 (+16%), everything int4 12.639.
  other types below     int4 group 32, re-quantized (round to nearest) from the dequantized values
  5 bits (Q2_K, IQ*)    (more bits than the source; the kernel has no smaller format).
  F32, F16, BF16        kept: the layer keeps its weight in the model dtype.

A fused layer (q/k/v, gate/up) whose parts map to different formats takes the most precise of
them for all its rows (kept > int8 > int4), decoding the other parts from their exact values.

The LM head, tied to the token embedding on Gemma (262,144 x 640, read once per decoded token,
so its format decides single-stream speed): see LM_HEAD_FORMATS below for the choice and its numbers.

llama.cpp's export conventions are applied to the quantized form: llama q/k rows are stored in
its rotary order, and un-permuting moves whole rows, so codes and per-row scales are permuted
alike (heron.models.loader.gguf.unpermute_rotary_rows). Gemma's norms (+1) are F32 and kept.

The model is first loaded as usual (model dtype) and each linear layer's weight is then replaced
by the one decoded here (the plain weight is dropped, as with int8/int4), after a spot check that
both agree within the quantization error (a guard against a wrong row order or convention).

`python -m heron.quant.gguf_native [MODEL]` prints the per-tensor plan without loading a model;
an engine keeps the same table in `engine.runner.quant_summary["tensors"]` (also logged at DEBUG).
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from heron.quant.weight_only import QuantizedWeight, _bf16_round_up, rtn_int4_codes, rtn_int8_codes

logger = logging.getLogger(__name__)

__all__ = [
    "GROUP_SIZE",
    "IntForm",
    "decode_exact_int4",
    "dequantize_raw_rows",
    "heron_format",
    "int_form",
    "plan",
    "quantize_gguf_model",
]

GROUP_SIZE = 32    # int4 group: the sub-block size of Q4_0 / Q4_1 / Q4_K

# The LM head (and a tied embedding, which looks its rows up in the head's quantized table) follows
# the mapping like any layer under "auto"; "int8" / "int4" (group 32) force a format. Measured on
# the default model (Q8_0 head, 262,144 x 640), 2-core CPU, W2 decode and `heron eval perplexity`
# (bf16: 50.5 ms/token, 12.778):
#   head int8 (auto)  37.5 ms/token, perplexity 12.804 (+0.20%), 260 MB of weights
#   head int4 g32     30.7 ms/token, perplexity 13.762 (+7.7%),  196 MB
# The head kernel alone: int8 19.5 ms, int4 11.7 ms per token (bf16 GEMV 28 ms). Looking the
# embedding rows up in the exact Q8_0 blocks instead of the int4 table (+178 MB) won back only
# ~0.4 of those 7.7 points: the error that matters is in the logits.
LM_HEAD_FORMATS = ("auto", "int8", "int4")

_FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}
_EXACT_INT4 = {"Q4_0", "Q4_1", "Q4_K"}
_INT8_MIN_BITS = 5.0   # bits per weight (block bytes * 8 / block values) at and above which int8 is closer
_ROW_CHUNK = 8192      # rows decoded per step (bounds float32 temporaries of a 262k-row table)
_FORMAT_RANK = {"int4": 0, "int8": 1, "keep": 2}


def _bits_per_weight(qtype) -> float:
    from gguf import GGML_QUANT_SIZES
    block, size = GGML_QUANT_SIZES[qtype]
    return size * 8 / block


def heron_format(qtype) -> str:
    """The heron format closest to a GGML type: "int4" (group 32), "int8" (per channel) or "keep"."""
    name = qtype.name
    if name in _FLOAT_TYPES or name.startswith("I") and name[1:].isdigit():
        return "keep"
    if name in _EXACT_INT4:
        return "int4"
    return "int8" if _bits_per_weight(qtype) >= _INT8_MIN_BITS else "int4"


def is_exact(qtype, fmt: str) -> bool:
    """Whether `fmt` holds the type's values exactly (up to the bf16 rounding of scales)."""
    return fmt == "keep" or (fmt == "int4" and qtype.name in _EXACT_INT4)


# ---- decoding the stored blocks -----------------------------------------------------------------
def _f16(b: np.ndarray) -> np.ndarray:
    """Two bytes [..., 2] (little-endian fp16) -> float32 [...]."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return qs & 0x0F, qs >> 4


def decode_exact_int4(blocks: np.ndarray, qtype, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_0 / Q4_1 / Q4_K blocks [N, bytes per row] -> (codes [N, K] uint8 0..15, scales [N, K/32],
    offsets [N, K/32] float32) with w = codes * scale + offset per group of 32 values, equal to
    the type's dequantization (the products of fp16 and 6-bit integers are exact in float32)."""
    name = qtype.name
    n = blocks.shape[0]
    if name in ("Q4_0", "Q4_1"):
        head = 2 if name == "Q4_0" else 4
        b = blocks.reshape(n, k // 32, head + 16)
        d = _f16(b[..., 0:2])
        lo, hi = _nibbles(b[..., head:])
        codes = np.concatenate([lo, hi], axis=-1)                       # values 0..15 then 16..31
        offsets = -8.0 * d if name == "Q4_0" else _f16(b[..., 2:4])
        scales = d
    elif name == "Q4_K":
        b = blocks.reshape(n, k // 256, 144)
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        sc6 = b[..., 4:16].astype(np.uint8)                             # 8 scales and 8 mins, 6 bits each
        first, mid, last = sc6[..., 0:4], sc6[..., 4:8], sc6[..., 8:12]
        sc = np.concatenate([first & 63, (last & 0x0F) | ((first >> 6) << 4)], axis=-1)   # [N, S, 8]
        mn = np.concatenate([mid & 63, (last >> 4) | ((mid >> 6) << 4)], axis=-1)
        lo, hi = _nibbles(b[..., 16:144].reshape(n, k // 256, 4, 32))  # 4 pairs of sub-blocks
        codes = np.stack([lo, hi], axis=3)                              # [N, S, 4, 2, 32]: sub-block 2j, 2j+1
        scales = d[..., None] * sc.astype(np.float32)
        offsets = -(dmin[..., None] * mn.astype(np.float32))
    else:
        raise ValueError(f"decode_exact_int4: {name} is not a 4-bit type with one affine map per 32 values "
                         f"(allowed: {', '.join(sorted(_EXACT_INT4))})")
    return (torch.from_numpy(np.ascontiguousarray(codes).reshape(n, k)),
            torch.from_numpy(np.ascontiguousarray(scales, dtype=np.float32).reshape(n, k // 32)),
            torch.from_numpy(np.ascontiguousarray(offsets, dtype=np.float32).reshape(n, k // 32)))


def _decode_q8_0(blocks: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 blocks [N, bytes per row] -> (codes [N, K] int8, scales [N, K/32] float16): w = d * q."""
    n = blocks.shape[0]
    b = blocks.reshape(n, k // 32, 34)
    d = np.ascontiguousarray(b[..., 0:2]).view(np.float16)[..., 0]
    q = np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(n, k)
    return torch.from_numpy(q), torch.from_numpy(np.ascontiguousarray(d))


def _decode_q5_0(blocks: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q5_0 blocks -> (codes [N, K] int8 in -16..15, scales [N, K/32] float32): w = d * q."""
    n = blocks.shape[0]
    b = blocks.reshape(n, k // 32, 22)
    d = _f16(b[..., 0:2])
    high = np.ascontiguousarray(b[..., 2:6]).view("<u4")               # bit j: the 5th bit of value j
    bits = (high >> np.arange(32, dtype=np.uint32)).astype(np.uint8) & 1
    lo, hi = _nibbles(b[..., 6:22])
    q = (np.concatenate([lo, hi], axis=-1) | (bits << 4)).astype(np.int8) - 16
    return torch.from_numpy(q.reshape(n, k)), torch.from_numpy(d)


def _decode_q6_k(blocks: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q6_K blocks -> (codes [N, K] int8 in -32..31, scales [N, K/16] float32): w = d * sc * q per 16 values.
    Each half (128 values) of a 256-value block: value 32t + l (t = 0..3, l = 0..31) takes its low
    4 bits from ql[l] (t even) or ql[l + 32] (t odd), low nibble for t < 2, and bits 2t, 2t+1 of qh[l]."""
    n = blocks.shape[0]
    b = blocks.reshape(n, k // 256, 210)
    ql = b[..., 0:128].reshape(n, k // 256, 2, 64)
    qh = b[..., 128:192].reshape(n, k // 256, 2, 32)
    sc = np.ascontiguousarray(b[..., 192:208]).view(np.int8).astype(np.float32)   # [N, S, 16]
    d = _f16(b[..., 208:210])
    a, c = ql[..., :32], ql[..., 32:]
    q = np.stack([(a & 15) | ((qh & 3) << 4), (c & 15) | (((qh >> 2) & 3) << 4),
                  (a >> 4) | (((qh >> 4) & 3) << 4), (c >> 4) | (((qh >> 6) & 3) << 4)], axis=3)
    q = q.astype(np.int8) - 32                                         # [N, S, 2, 4, 32]
    return torch.from_numpy(q.reshape(n, k)), torch.from_numpy((d[..., None] * sc).reshape(n, k // 16))


# types stored as integer codes times one scale per block: name -> (decoder, block)
_BLOCK_SCALED = {"Q8_0": (_decode_q8_0, 32), "Q5_0": (_decode_q5_0, 32), "Q6_K": (_decode_q6_k, 16)}


def _rtn_int8_from_blocks(codes: torch.Tensor, bscales: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 per channel (quantize_int8's rule: scale = absmax/127 rounded up to bf16, round to nearest)
    from block-scaled codes w = bscale * code, in one pass over the codes: q = round(code * (bscale / scale))."""
    r, k = codes.shape
    c = codes.view(r, k // block, block)
    cmin, cmax = torch.aminmax(c, dim=-1)    # one pass over the int8 codes (float reductions are slower)
    cabs = torch.maximum(cmax.float().abs(), cmin.float().abs())
    bs = bscales.float()
    s = _bf16_round_up((bs.abs() * cabs).amax(-1) / 127.0)
    factor = bs / torch.where(s > 0, s, torch.ones_like(s))[:, None]
    q = c.float().mul_(factor[..., None]).round_().clamp_(-127, 127)
    return q.to(torch.int8).view(r, k), s


def _rtn_int4_from_blocks(codes: torch.Tensor, bscales: torch.Tensor, block: int
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int4 group 32 by quantize_int4's rule (range [min(wmin, 0), max(wmax, 0)], scale = range/15
    rounded up to bf16, integer zero) from block-scaled codes w = bscale * code (block divides 32),
    in one pass over the codes. Returns (q uint8, scales, offsets = -zero * scale)."""
    r, k = codes.shape
    groups, per = k // GROUP_SIZE, GROUP_SIZE // block
    c = codes.view(r, groups, per, block)
    cmin, cmax = torch.aminmax(c, dim=-1)
    bs = bscales.float().view(r, groups, per)
    a, b = bs * cmin.float(), bs * cmax.float()
    lo = torch.minimum(a, b).amin(-1).clamp_(max=0.0)
    hi = torch.maximum(a, b).amax(-1).clamp_(min=0.0)
    s = _bf16_round_up(hi / 15.0 - lo / 15.0)
    nz = s > 0
    safe = torch.where(nz, s, torch.ones_like(s))
    z = torch.where(nz, torch.round(-lo / safe).clamp_(0, 15), torch.full_like(s, 8.0))
    factor = bs / safe[..., None]
    q = c.float().mul_(factor[..., None]).round_().add_(z[..., None, None]).clamp_(0, 15)
    return q.to(torch.uint8).view(r, k), s, -z * s


def dequantize_raw_rows(raw, r0: int, r1: int) -> torch.Tensor:
    """Rows r0:r1 of a raw 2-D tensor (GGUF row order, no conventions applied) as exact float32."""
    k = raw.shape[1]
    blocks = raw.blocks[r0:r1]
    name = raw.qtype.name
    if name in _BLOCK_SCALED:
        decode, block = _BLOCK_SCALED[name]
        q, d = decode(np.asarray(blocks), k)
        return (q.view(r1 - r0, k // block, block).float() * d.float()[..., None]).view(r1 - r0, k)
    if name in _EXACT_INT4:
        q, s, o = decode_exact_int4(blocks, raw.qtype, k)
        g = q.float().view(r1 - r0, k // 32, 32)
        return (g * s[..., None] + o[..., None]).view(r1 - r0, k)
    from gguf.quants import dequantize
    try:
        values = dequantize(np.asarray(blocks), raw.qtype)
    except NotImplementedError:
        raise ValueError(f"tensor {raw.hf_name}: ggml type {name} cannot be decoded by the installed gguf "
                         f"package") from None
    return torch.from_numpy(np.array(values, dtype=np.float32, order="C").reshape(r1 - r0, k))


# ---- integer forms ------------------------------------------------------------------------------
@dataclass
class IntForm:
    """A weight's integer form, rows in HF order.
    int4: codes [N, K] uint8, scales/offsets [N, K/32] float32, w = codes * scale + offset per group.
    int8: codes [N, K] int8, scales [N] float32, w = codes * scale."""

    method: str
    codes: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None = None

    def build(self) -> QuantizedWeight:
        if self.method == "int8":
            return QuantizedWeight.from_int8(self.codes, self.scales)
        return QuantizedWeight.from_int4_affine(self.codes, self.scales, self.offsets, GROUP_SIZE)

    def permuted(self, n_head: int) -> IntForm:
        from heron.models.loader.gguf import unpermute_rotary_rows
        return IntForm(self.method, unpermute_rotary_rows(self.codes, n_head),
                       unpermute_rotary_rows(self.scales, n_head),
                       None if self.offsets is None else unpermute_rotary_rows(self.offsets, n_head))

    @staticmethod
    def cat(forms: list[IntForm]) -> IntForm:
        if len(forms) == 1:
            return forms[0]
        method = forms[0].method
        assert all(f.method == method for f in forms)
        return IntForm(method, torch.cat([f.codes for f in forms]), torch.cat([f.scales for f in forms]),
                       None if method == "int8" else torch.cat([f.offsets for f in forms]))


def int_form(raw, method: str) -> IntForm:
    """A raw GGUF tensor (heron.models.loader.gguf.GGUFRawTensor, 2-D) in heron's integer form for
    `method` ("int8" or "int4"), llama.cpp's row permutation undone. Exact for the 4-bit types
    to int4; otherwise round to nearest from the exact dequantized values."""
    if len(raw.shape) != 2:
        raise ValueError(f"tensor {raw.hf_name}: expected a 2-D weight, got shape {raw.shape}")
    n, k = raw.shape
    if method == "int4" and k % GROUP_SIZE:
        raise ValueError(f"tensor {raw.hf_name}: {k} input columns is not a multiple of the int4 group "
                         f"{GROUP_SIZE}")
    if raw.norm_offset:
        raise ValueError(f"tensor {raw.hf_name} is stored with an offset (a norm weight); it has no integer form")
    if method == "int4" and raw.qtype.name in _EXACT_INT4:
        codes, scales, offsets = decode_exact_int4(np.asarray(raw.blocks), raw.qtype, k)
        form = IntForm("int4", codes, scales, offsets)
    elif method in ("int4", "int8"):
        codes = torch.empty(n, k, dtype=torch.int8 if method == "int8" else torch.uint8)
        scales = torch.empty((n,) if method == "int8" else (n, k // GROUP_SIZE), dtype=torch.float32)
        offsets = None if method == "int8" else torch.empty(n, k // GROUP_SIZE, dtype=torch.float32)
        for r0 in range(0, n, _ROW_CHUNK):
            r1 = min(n, r0 + _ROW_CHUNK)
            if raw.qtype.name in _BLOCK_SCALED:   # one pass over the integer codes
                decode, block = _BLOCK_SCALED[raw.qtype.name]
                q, d = decode(np.asarray(raw.blocks[r0:r1]), k)
                if method == "int8":
                    codes[r0:r1], scales[r0:r1] = _rtn_int8_from_blocks(q, d.float(), block)
                else:
                    codes[r0:r1], scales[r0:r1], offsets[r0:r1] = _rtn_int4_from_blocks(q, d.float(), block)
                if not bool(torch.isfinite(scales[r0:r1]).all()):
                    raise ValueError(f"tensor {raw.hf_name} has NaN or inf scales")
                continue
            w = dequantize_raw_rows(raw, r0, r1)
            if not bool(torch.isfinite(w).all()):
                raise ValueError(f"tensor {raw.hf_name} has NaN or inf values")
            if method == "int8":
                codes[r0:r1], scales[r0:r1] = rtn_int8_codes(w)
            else:
                q, s, z = rtn_int4_codes(w, GROUP_SIZE)
                codes[r0:r1], scales[r0:r1], offsets[r0:r1] = q, s, -z * s
        form = IntForm(method, codes, scales, offsets)
    else:
        raise ValueError(f"int_form: method must be int8 or int4, got {method!r}")
    return form if raw.rotary_heads is None else form.permuted(raw.rotary_heads)


# ---- the plan -----------------------------------------------------------------------------------
@dataclass
class LayerPlan:
    module: str                # heron module name ("model.layers.0.self_attn.qkv_proj", "lm_head")
    parts: list                # GGUFRawTensor per shard, in the layer's row order
    fmt: str                   # "int4" | "int8" | "keep"
    tied: bool = False         # the LM head of a tied embedding (which then looks rows up in its table)


def _module_parts(model: nn.Module, raws: dict) -> dict[str, list]:
    """heron module name -> the raw GGUF tensors that make up its weight, in row order."""
    mapping = getattr(model, "packed_modules_mapping", {}) or {}
    order = {"q": 0, "k": 1, "v": 2}
    parts: dict[str, list] = {}
    for name, raw in raws.items():
        if not name.endswith(".weight"):
            continue
        target, shard = name[: -len(".weight")], None
        for src, (dst, shard_id) in mapping.items():
            if f".{src}." in name:
                target, shard = target.replace(f".{src}", f".{dst}"), shard_id
                break
        parts.setdefault(target, []).append((order.get(shard, shard) if shard is not None else 0, raw))
    return {k: [r for _, r in sorted(v, key=lambda t: t[0])] for k, v in parts.items()}


def plan(model: nn.Module, raws: dict, lm_head: str = "auto") -> list[LayerPlan]:
    """Which format each linear layer and the LM head get (see the module docstring); `lm_head`
    "int8" / "int4" overrides the mapping for the LM head (and so for a tied embedding)."""
    from heron.layers.embedding import ParallelLMHead, VocabParallelEmbedding
    from heron.layers.linear import LinearBase
    if lm_head not in LM_HEAD_FORMATS:
        raise ValueError(f"lm_head must be one of {', '.join(LM_HEAD_FORMATS)}, got {lm_head!r}")
    parts = _module_parts(model, raws)
    embeddings = [m for m in model.modules() if isinstance(m, VocabParallelEmbedding)]
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, (LinearBase, ParallelLMHead)):
            continue
        tied = isinstance(module, ParallelLMHead) and any(e.weight is module.weight for e in embeddings)
        key = "model.embed_tokens" if tied and name not in parts else name
        if key not in parts:
            raise ValueError(f"--quantization gguf: no GGUF tensor for layer {name!r} (looked for {key}.weight)")
        ps = parts[key]
        fmt = max((heron_format(p.qtype) for p in ps), key=_FORMAT_RANK.__getitem__)
        if isinstance(module, ParallelLMHead) and lm_head != "auto":
            fmt = lm_head
        out.append(LayerPlan(name, ps, fmt, tied))
    return out


def _describe(lp: LayerPlan) -> list[dict]:
    """The summary rows of one layer's GGUF tensors."""
    fmt = {"keep": "kept", "int4": "int4 g32", "int8": "int8 per channel"}[lp.fmt]
    rows = []
    for p in lp.parts:
        exact = is_exact(p.qtype, lp.fmt)
        name = p.hf_name + (" (LM head, tied)" if lp.tied else "")
        rows.append(dict(name=name, ggml=p.qtype.name, heron=fmt if lp.fmt == "keep" else
                         f"{fmt} {'exact' if exact else 're-quantized'}", exact=exact, shape=list(p.shape)))
    return rows


def _spot_check(name: str, qw, loaded: torch.Tensor) -> None:
    """The decoded weight must match the loaded (dequantized) one within its quantization error on
    a sample of rows: a permutation or convention mismatch is an O(1) difference."""
    if loaded is None or loaded.numel() == 0:
        return
    n = loaded.shape[0]
    rows = torch.unique(torch.linspace(0, n - 1, min(n, 64)).round().long())
    got = qw.dequantize_rows(rows, torch.float32)
    want = loaded[rows].float()
    amax = want.abs().amax(dim=1).clamp_min(1e-30)
    rel = ((got - want).abs().amax(dim=1) / amax).max().item()
    if not rel <= 0.2:   # int4 re-quantization of a row's widest group can reach ~0.1 of its absmax
        raise RuntimeError(f"--quantization gguf: layer {name} decoded from the GGUF blocks differs from the "
                           f"loaded weights by {rel:.3g} of the row maximum (a row order or convention "
                           f"mismatch); please report this model")


def quantize_gguf_model(model: nn.Module, path, lm_head: str = "auto", check: bool = True) -> dict:
    """Replace every linear layer's weight (and the LM head's) of a model loaded from the GGUF file
    `path` by heron's closest format, decoded from the file's blocks. Returns the summary
    (bytes before/after and a per-tensor table)."""
    from heron.models.loader.gguf import gguf_raw_tensors
    raws = gguf_raw_tensors(path)
    modules = dict(model.named_modules())
    from heron.layers.embedding import VocabParallelEmbedding
    embeddings = {id(m.weight): m for m in model.modules() if isinstance(m, VocabParallelEmbedding)}
    before = after = layers = 0
    tensors = []
    for lp in plan(model, raws, lm_head):
        module = modules[lp.module]
        w = module.weight.detach()
        nbytes_before = w.numel() * w.element_size()
        before += nbytes_before
        layers += 1
        if lp.fmt == "keep":
            after += nbytes_before
            tensors += _describe(lp)
            continue
        qw = IntForm.cat([int_form(p, lp.fmt) for p in lp.parts]).build()
        if qw.out_features != w.shape[0] or qw.in_features != w.shape[1]:
            raise ValueError(f"--quantization gguf: layer {lp.module} is {tuple(w.shape)} but its GGUF tensors "
                             f"give {qw.out_features} x {qw.in_features}")
        if check:
            _spot_check(lp.module, qw, w)
        after += qw.nbytes()
        emb = embeddings.get(id(module.weight)) if lp.tied else None
        module.set_quantized(qw)
        if emb is not None:
            emb.set_quantized(qw)
        tensors += _describe(lp)
    by_type: dict[str, dict[str, int]] = {}
    for t in tensors:
        by_type.setdefault(t["ggml"], {}).setdefault(t["heron"], 0)
        by_type[t["ggml"]][t["heron"]] += 1
    logger.info("--quantization gguf: %d layers, %.0f MB -> %.0f MB; %s", layers, before / 1e6, after / 1e6,
                "; ".join(f"{g} -> {', '.join(f'{h} ({c})' for h, c in m.items())}" for g, m in by_type.items()))
    for t in tensors:
        logger.debug("  %-48s %-5s -> %s", t["name"], t["ggml"], t["heron"])
    return dict(method="gguf", layers=layers, bytes_before=before, bytes_after=after, tensors=tensors,
                by_type=by_type)


def format_summary(summary: dict) -> str:
    """The per-tensor table of a quant_summary (or of `plan_table`) as text."""
    lines = [f"{'tensor':<52} {'ggml':<6} heron"]
    lines += [f"{t['name']:<52} {t['ggml']:<6} {t['heron']}" for t in summary["tensors"]]
    if "bytes_after" in summary:
        lines.append(f"{summary['layers']} layers: {summary['bytes_before'] / 1e6:.0f} MB -> "
                     f"{summary['bytes_after'] / 1e6:.0f} MB")
    return "\n".join(lines)


def plan_table(model_arg=None, lm_head: str = "auto") -> dict:
    """The per-tensor mapping of a GGUF model from its header alone (no weights are loaded)."""
    from heron.models.loader import load_config, resolve_model
    from heron.models.loader.gguf import gguf_raw_tensors
    from heron.models.registry import get_model_class
    source = resolve_model(model_arg)
    if source.kind != "gguf":
        raise ValueError(f"{source.path} is not a GGUF file")
    hf_config = load_config(source)
    with torch.device("meta"):
        model = get_model_class(hf_config)(hf_config)
    tensors = [t for lp in plan(model, gguf_raw_tensors(source.path), lm_head) for t in _describe(lp)]
    return dict(model=str(source.path), tensors=tensors)


if __name__ == "__main__":  # pragma: no cover - a small inspection tool
    import argparse
    ap = argparse.ArgumentParser(prog="python -m heron.quant.gguf_native",
                                 description="Print how --quantization gguf maps each tensor of a GGUF model.")
    ap.add_argument("model", nargs="?", default=None, help="a .gguf file (default: the default model)")
    ap.add_argument("--lm-head", default="auto", choices=LM_HEAD_FORMATS)
    a = ap.parse_args()
    t = plan_table(a.model, a.lm_head)
    print(t["model"])
    print(format_summary(t))
    sys.exit(0)
