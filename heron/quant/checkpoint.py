"""GPTQ and AWQ checkpoints in the standard Hugging Face layout: read into heron's quantized
layers, and written by `heron quantize`.

A checkpoint is an HF folder whose config.json has a `quantization_config`, and whose
safetensors hold, for each quantized linear layer `<prefix>` (per projection: q_proj, k_proj,
v_proj, o_proj, gate_proj, up_proj, down_proj), integer tensors instead of `<prefix>.weight`
(K = input features, N = output features, g = group size, G = K / g groups; -1 = one group):

GPTQ (AutoGPTQ's layout; quant_method "gptq"):
    qweight  int32 [K * bits / 32, N]   32/bits codes per word along the INPUT dim, lowest bits
                                        first: code[k, n] = qweight[k // P, n] >> (bits * (k % P))
    qzeros   int32 [G, N * bits / 32]   zero points packed the same way along the OUTPUT dim;
                                        checkpoint_format "gptq" (v1) stores zero - 1,
                                        "gptq_v2" the zero itself
    scales   fp16  [G, N]
    g_idx    int32 [K]                  group of each input column (k // g unless act-order)
    w[n, k] = scales[g_idx[k], n] * (code[k, n] - zero[g_idx[k], n])

AWQ GEMM (AutoAWQ's layout; quant_method "awq", version "gemm", 4-bit):
    qweight  int32 [K, N / 8]           8 codes per word along the OUTPUT dim, interleaved: the
                                        i-th nibble (bits 4i..4i+3) of word j holds column
                                        8j + AWQ_ORDER[i], AWQ_ORDER = 0, 2, 4, 6, 1, 3, 5, 7
    qzeros   int32 [G, N / 8]           zero points, packed the same way (stored as they are)
    scales   fp16  [G, N]
    w[n, k] = scales[k // g, n] * (code[k, n] - zero[k // g, n])

Loading (heron.runner.model_runner, when config.json has a supported quantization_config):
the codes are unpacked, q/k/v and gate/up are concatenated along N into heron's fused
layers (same group layout: one group size per checkpoint), and each layer keeps only a
QuantizedWeight (from_int4 / from_int8); everything else (embeddings, norms, an unquantized
LM head) loads as usual. Scales go fp16 -> bf16, the kernel's scale dtype: bf16 keeps 8
significant bits to fp16's 11, so a third-party scale moves by up to 2^-9 of itself (the
checkpoints `heron quantize` writes hold bf16 values, which fp16 represents exactly, so theirs
do not move). Supported: GPTQ 4-bit group-wise (group sizes heron's int4 kernel takes, 32, 64,
128, 256, or a multiple of one of them that divides K, including per-channel -1, whose
scales are repeated per heron group) and 8-bit (symmetric, per channel or in groups of 16-256,
exactly into heron's int8, per channel or group-wise; other groups or asymmetric 8-bit are
re-quantized to int8 from their exact values, with a warning), desc_act false or a g_idx that is k // g anyway; AWQ 4-bit GEMM with zero
points. Anything else (2/3-bit, act-order with a permuted g_idx, the exllama/marlin/bitblas
formats, AWQ gemv / gemv_fast) is refused with an error naming what is supported.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from heron.quant.grid import IntWeight
from heron.quant.weight_only import INT4_GROUP_SIZES, INT8_GROUP_SIZES, QuantizedWeight, quantize, quantize_int8

logger = logging.getLogger(__name__)

__all__ = [
    "AWQ_ORDER",
    "CHECKPOINT_METHODS",
    "CheckpointSpec",
    "check_checkpoint_options",
    "checkpoint_spec",
    "load_quantized_checkpoint",
    "pack_awq",
    "pack_gptq",
    "parse_quantization_config",
    "read_checkpoint_spec",
    "save_checkpoint",
    "unpack_awq",
    "unpack_gptq",
]

CHECKPOINT_METHODS = ("gptq", "awq")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = tuple(AWQ_ORDER.index(c) for c in range(8))   # (0, 4, 1, 5, 2, 6, 3, 7)
GPTQ_FORMATS = ("gptq", "gptq_v2")
SUPPORTED = ("GPTQ with bits 4 or 8, checkpoint_format gptq or gptq_v2, desc_act false (or a g_idx that is "
             "k // group_size anyway); AWQ with bits 4, version gemm, zero_point true")
_QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


# ---- quantization_config ----------------------------------------------------------------------
@dataclass(frozen=True)
class CheckpointSpec:
    """A checkpoint's quantization_config, validated."""

    method: str               # "gptq" | "awq"
    bits: int                 # 4 | 8 (awq: 4)
    group_size: int           # -1: one group per output channel
    checkpoint_format: str    # "gptq" | "gptq_v2" | "awq_gemm"
    desc_act: bool = False

    @property
    def zero_offset(self) -> int:
        """What to add to the stored zero points (GPTQ v1 stores zero - 1)."""
        return 1 if self.checkpoint_format == "gptq" else 0


def _unsupported(what: str) -> ValueError:
    return ValueError(f"unsupported quantization_config: {what}. heron loads {SUPPORTED}")


def parse_quantization_config(qc) -> CheckpointSpec | None:
    """A config.json `quantization_config` (dict, or a transformers config object) -> CheckpointSpec;
    None when there is none. Raises ValueError for what heron cannot load."""
    if qc is None:
        return None
    if not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else vars(qc)
    method = str(qc.get("quant_method", "")).lower()
    if method == "gptq":
        bits = qc.get("bits")
        if bits not in (4, 8):
            raise _unsupported(f"GPTQ with bits={bits}")
        fmt = str(qc.get("checkpoint_format", "gptq")).lower()
        if fmt not in GPTQ_FORMATS:
            raise _unsupported(f"GPTQ checkpoint_format {fmt!r}")
        return CheckpointSpec("gptq", bits, _group_size(qc.get("group_size", -1)), fmt,
                              bool(qc.get("desc_act", False)))
    if method == "awq":
        bits = qc.get("bits", qc.get("w_bit"))
        if bits != 4:
            raise _unsupported(f"AWQ with bits={bits}")
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise _unsupported(f"AWQ version {version!r}")
        if qc.get("zero_point", True) is not True:
            raise _unsupported("AWQ without zero points (zero_point false)")
        return CheckpointSpec("awq", 4, _group_size(qc.get("group_size", qc.get("q_group_size", -1))), "awq_gemm")
    raise _unsupported(f"quant_method {method!r}")


def _group_size(g) -> int:
    if isinstance(g, bool) or not isinstance(g, int) or (g < 1 and g != -1):
        raise _unsupported(f"group_size {g!r}")
    return g


def checkpoint_spec(hf_config) -> CheckpointSpec | None:
    """The CheckpointSpec of a loaded HF config (None: not a quantized checkpoint)."""
    return parse_quantization_config(getattr(hf_config, "quantization_config", None))


def read_checkpoint_spec(model) -> CheckpointSpec | None:
    """The CheckpointSpec of a model argument, read from its config.json without transformers
    (None for GGUF files, the default model and folders without a quantization_config)."""
    if model is None:
        return None
    path = Path(str(model)).expanduser()
    cfg = path / "config.json"
    if not path.is_dir() or not cfg.is_file():
        return None
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None   # the loader reports an unreadable config
    return parse_quantization_config(qc)


def check_checkpoint_options(method: str | None, model, device: torch.device) -> bool:
    """Engine option checks for GPTQ/AWQ checkpoints; True when the model is one (or `method`
    asks for one), i.e. these checks apply instead of --quantization's usual ones."""
    spec = read_checkpoint_spec(model)
    if spec is None and method not in CHECKPOINT_METHODS:
        return False
    if spec is None:
        raise ValueError(f"--quantization {method} loads a {method.upper()} checkpoint (config.json with a "
                         f"quantization_config), but model {model!r} is not one; make one with "
                         f"`heron quantize MODEL --method {method} --out DIR`")
    if method is not None and method != spec.method:
        raise ValueError(f"model {model!r} is a {spec.method.upper()} checkpoint, whose weights are already "
                         f"quantized; drop --quantization {method} (or pass --quantization {spec.method})")
    if device.type != "cpu":
        raise ValueError(f"{spec.method.upper()} checkpoints run on torch's packed CPU kernels; use --device cpu")
    return True


# ---- bit packing ------------------------------------------------------------------------------
def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words in 0..2^32-1 -> int32 with the same bits."""
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def _pack(values: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack codes [R, C] (0..2^bits-1) into int32 words along `dim`, lowest bits first."""
    per = 32 // bits
    v = values.to(torch.int64)
    r, c = v.shape
    shifts = torch.arange(per, dtype=torch.int64) * bits
    if dim == 0:
        if r % per:
            raise ValueError(f"{r} rows cannot be packed {per} to a word")
        return _to_int32((v.view(r // per, per, c) << shifts.view(1, per, 1)).sum(dim=1))
    if c % per:
        raise ValueError(f"{c} columns cannot be packed {per} to a word")
    return _to_int32((v.view(r, c // per, per) << shifts).sum(dim=2))


def _unpack(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The inverse of _pack: int32 words -> int32 codes."""
    per = 32 // bits
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per, dtype=torch.int64) * bits
    r, c = w.shape
    mask = (1 << bits) - 1
    if dim == 0:
        return ((w[:, None, :] >> shifts.view(1, per, 1)) & mask).reshape(r * per, c).to(torch.int32)
    return ((w[:, :, None] >> shifts) & mask).reshape(r, c * per).to(torch.int32)


def pack_gptq(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
              checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """GPTQ tensors of one projection: codes [N, K] (0..2^bits-1), scales and zeros [N, G]
    (integer zeros in 0..2^bits-1; v1 needs zero >= 1), group_size g (-1: one group)."""
    n, k = codes.shape
    g = k if group_size == -1 else group_size
    z = zeros.round().to(torch.int64) - (1 if checkpoint_format == "gptq" else 0)
    if int(z.min()) < 0 or int(z.max()) >= 1 << bits:
        raise ValueError(f"zero points out of range for {bits}-bit {checkpoint_format} (v1 needs zero >= 1)")
    return {
        "qweight": _pack(codes.t(), bits, dim=0),
        "qzeros": _pack(z.t(), bits, dim=1),
        "scales": scales.t().to(torch.float16).contiguous(),
        "g_idx": (torch.arange(k, dtype=torch.int32) // g),
    }


def unpack_gptq(tensors: dict[str, torch.Tensor], bits: int, checkpoint_format: str = "gptq"
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(codes [N, K] int32, scales [N, G] float32, zeros [N, G] float32, g_idx [K] or None)."""
    codes = _unpack(tensors["qweight"], bits, dim=0).t()
    zeros = _unpack(tensors["qzeros"], bits, dim=1).t().float() + (1 if checkpoint_format == "gptq" else 0)
    scales = tensors["scales"].t().float()
    return codes.contiguous(), scales.contiguous(), zeros.contiguous(), tensors.get("g_idx")


def _awq_pack(values: torch.Tensor) -> torch.Tensor:
    r, c = values.shape
    return _pack(values.view(r, c // 8, 8)[..., list(AWQ_ORDER)].reshape(r, c), 4, dim=1)


def _awq_unpack(words: torch.Tensor) -> torch.Tensor:
    v = _unpack(words, 4, dim=1)
    r, c = v.shape
    return v.view(r, c // 8, 8)[..., list(AWQ_REVERSE_ORDER)].reshape(r, c)


def pack_awq(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> dict[str, torch.Tensor]:
    """AWQ GEMM tensors of one projection: codes [N, K] 0..15, scales and zeros [N, G]."""
    n, k = codes.shape
    if n % 8:
        raise ValueError(f"AWQ packs 8 output features to a word; {n} is not a multiple of 8")
    return {
        "qweight": _awq_pack(codes.t().contiguous()),
        "qzeros": _awq_pack(zeros.round().to(torch.int64).t().contiguous()),
        "scales": scales.t().to(torch.float16).contiguous(),
    }


def unpack_awq(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes [N, K] int32, scales [N, G] float32, zeros [N, G] float32)."""
    codes = _awq_unpack(tensors["qweight"]).t()
    zeros = _awq_unpack(tensors["qzeros"]).t().float()
    return codes.contiguous(), tensors["scales"].t().float().contiguous(), zeros.contiguous()


# ---- heron modules <-> checkpoint projections ---------------------------------------------------
def projections(model: nn.Module, module_name: str, module: nn.Module) -> list[tuple[str, int, int]]:
    """(checkpoint prefix, first row, end row) of each projection of a heron linear layer."""
    mapping = getattr(model, "packed_modules_mapping", {}) or {}
    parent, _, leaf = module_name.rpartition(".")
    out = []
    for src, (dst, shard) in mapping.items():
        if dst != leaf:
            continue
        index = {"q": 0, "k": 1, "v": 2}.get(shard, shard)
        sizes = module.output_sizes
        out.append((f"{parent}.{src}", sum(sizes[:index]), sum(sizes[:index + 1]), index))
    if not out:
        return [(module_name, 0, module.out_features)]
    return [(p, r0, r1) for p, r0, r1, _ in sorted(out, key=lambda t: t[3])]


def _checkpoint_targets(model: nn.Module, prefixes: list[str]) -> dict[str, tuple[str, int]]:
    """checkpoint prefix -> (heron module name, shard index)."""
    mapping = getattr(model, "packed_modules_mapping", {}) or {}
    out = {}
    for prefix in prefixes:
        parent, _, leaf = prefix.rpartition(".")
        if leaf in mapping:
            dst, shard = mapping[leaf]
            out[prefix] = (f"{parent}.{dst}", {"q": 0, "k": 1, "v": 2}.get(shard, shard))
        else:
            out[prefix] = (prefix, 0)
    return out


# ---- loading ----------------------------------------------------------------------------------
def _checkpoint_tensor_names(model_arg) -> list[str]:
    from safetensors import safe_open

    from heron.models.loader import resolve_model
    from heron.models.loader.safetensors import safetensors_files
    names = []
    for path in safetensors_files(resolve_model(model_arg).path):
        with safe_open(str(path), framework="pt") as f:
            names.extend(f.keys())
    return names


def _heron_group(group_size: int, k: int) -> int:
    """The heron int4 group holding a checkpoint group exactly (a divisor of it and of K)."""
    g = k if group_size == -1 else group_size
    for cand in sorted(INT4_GROUP_SIZES, reverse=True):
        if g % cand == 0 and k % cand == 0:
            return cand
    raise ValueError(f"int4 group size {group_size} over {k} input columns cannot be run by heron's int4 kernel "
                     f"(group sizes {', '.join(map(str, INT4_GROUP_SIZES))}, or a multiple of one that divides "
                     f"the input features)")


def _unpack_part(spec: CheckpointSpec, prefix: str, t: dict, k: int) -> tuple:
    missing = [s for s in ("qweight", "qzeros", "scales") if s not in t]
    if missing:
        raise ValueError(f"checkpoint tensors {', '.join(f'{prefix}.{m}' for m in missing)} are missing")
    if spec.method == "awq":
        codes, scales, zeros = unpack_awq(t)
        g_idx = None
    else:
        codes, scales, zeros, g_idx = unpack_gptq(t, spec.bits, spec.checkpoint_format)
    if codes.shape[1] != k:
        raise ValueError(f"{prefix}: the checkpoint has {codes.shape[1]} input features, the model {k}")
    g = k if spec.group_size == -1 else spec.group_size
    groups = -(-k // g)
    if scales.shape != (codes.shape[0], groups) or zeros.shape != scales.shape:
        raise ValueError(f"{prefix}: scales/qzeros give {tuple(scales.shape)} groups per row, expected "
                         f"[{codes.shape[0]}, {groups}] for group_size {spec.group_size}")
    if g_idx is not None and not torch.equal(g_idx.to(torch.int64), torch.arange(k) // g):
        raise _unsupported(f"{prefix}.g_idx is not k // group_size (act-order / desc_act with a permuted g_idx)")
    return codes, scales, zeros


def _build(spec: CheckpointSpec, name: str, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
           ) -> QuantizedWeight:
    n, k = codes.shape
    if spec.bits == 4:
        hg = _heron_group(spec.group_size, k)
        g = k if spec.group_size == -1 else spec.group_size
        if hg != g:   # heron group j lies inside checkpoint group j * hg // g (hg divides g)
            idx = torch.arange(k // hg) * hg // g
            scales, zeros = scales[:, idx], zeros[:, idx]
        return QuantizedWeight.from_int4(codes, scales, zeros, hg)
    g = k // scales.shape[1]
    grouped = scales.shape[1] > 1 and g in INT8_GROUP_SIZES      # heron's group-wise int8 holds these groups
    symmetric = bool((zeros == 128).all())
    if symmetric and (scales.shape[1] == 1 or grouped):          # the codes as they are
        return QuantizedWeight.from_int8((codes - 128).to(torch.int8), scales[:, 0] if scales.shape[1] == 1 else scales)
    logger.warning("%s: 8-bit with %d group(s) per row and %s is re-quantized to heron's int8 %s (round to "
                   "nearest from its exact values)", name, scales.shape[1],
                   f"groups of {g}" if symmetric else "asymmetric zeros",
                   f"in groups of {g}" if grouped else "per output channel")
    w = (codes.float().view(n, -1, g) - zeros[..., None]) * scales[..., None]
    return quantize_int8(w.view(n, k), g if grouped else None)


@torch.no_grad()
def load_quantized_checkpoint(model: nn.Module, weights, spec: CheckpointSpec, model_arg, lm_head: str = "auto",
                              group_size: int = 64) -> dict:
    """Load a GPTQ/AWQ checkpoint's `weights` ((name, tensor) pairs) into `model`: the quantized
    projections become QuantizedWeights of heron's (fused) layers, every other tensor goes through
    model.load_weights. `lm_head` int8|int4 quantizes an unquantized LM head (and a tied
    embedding) too (int4 with `group_size`). Returns the summary the runner keeps."""
    from heron.layers.embedding import ParallelLMHead, VocabParallelEmbedding
    from heron.layers.linear import LinearBase
    prefixes = sorted(n[: -len(".qweight")] for n in _checkpoint_tensor_names(model_arg) if n.endswith(".qweight"))
    if not prefixes:
        raise ValueError(f"the config of {model_arg!r} declares {spec.method.upper()} quantization but its "
                         f"safetensors have no *.qweight tensors")
    targets = _checkpoint_targets(model, prefixes)
    modules = dict(model.named_modules())
    embeddings = [m for m in model.modules() if isinstance(m, VocabParallelEmbedding)]
    saved = {}
    for prefix, (mname, _) in targets.items():
        module = modules.get(mname)
        if not isinstance(module, (LinearBase, ParallelLMHead)):
            raise ValueError(f"checkpoint tensor {prefix}.qweight has no linear layer in the model (looked for "
                             f"{mname})")
        if isinstance(module, ParallelLMHead) and any(e.weight is module.weight for e in embeddings):
            raise _unsupported("a quantized LM head on a model that ties it to the token embedding")
        if mname not in saved:
            saved[mname] = module.weight
            module.register_parameter("weight", None)   # filled below, not by load_weights

    parts: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)

    def unquantized():
        for name, tensor in weights:
            prefix, _, suffix = name.rpartition(".")
            if suffix in _QUANT_SUFFIXES and prefix in targets:
                parts[prefix][suffix] = tensor
            else:
                yield name, tensor

    try:
        model.load_weights(unquantized())
    finally:
        for mname, param in saved.items():
            modules[mname].weight = param

    by_module: dict[str, list] = defaultdict(list)
    for prefix, (mname, index) in targets.items():
        by_module[mname].append((index, prefix))
    before = after = 0
    for mname, shard_list in by_module.items():
        module = modules[mname]
        expected = len(getattr(module, "output_sizes", [None]))
        if len(shard_list) != expected:
            have = [p for _, p in sorted(shard_list)]
            raise ValueError(f"layer {mname} fuses {expected} projections but the checkpoint quantizes only {have}")
        unpacked = [_unpack_part(spec, prefix, parts[prefix], module.in_features) for _, prefix in sorted(shard_list)]
        codes, scales, zeros = (torch.cat([u[i] for u in unpacked]) for i in range(3))
        if codes.shape[0] != module.out_features:
            raise ValueError(f"layer {mname}: the checkpoint has {codes.shape[0]} output features, the model "
                             f"{module.out_features}")
        qw = _build(spec, mname, codes, scales, zeros)
        before += module.weight.numel() * 2
        after += qw.nbytes()
        module.set_quantized(qw)
    layers = len(by_module)

    if lm_head != "auto":
        head = next((m for m in model.modules() if isinstance(m, ParallelLMHead)), None)
        if head is not None and head.quant is None:
            tied = [e for e in embeddings if e.weight is head.weight]
            qw = quantize(head.weight.detach(), lm_head, group_size if lm_head == "int4" else None, grid="mse")
            before += head.weight.numel() * 2
            after += qw.nbytes()
            head.set_quantized(qw)
            for e in tied:
                e.set_quantized(qw)
            layers += 1
    logger.info("%s checkpoint: %d quantized layers (%d-bit, group size %d), %.0f MB -> %.0f MB", spec.method,
                layers, spec.bits, spec.group_size, before / 1e6, after / 1e6)
    return dict(method=spec.method, bits=spec.bits, group_size=spec.group_size, layers=layers,
                bytes_before=before, bytes_after=after)


# ---- writing ----------------------------------------------------------------------------------
def quantization_config(method: str, bits: int, group_size: int) -> dict:
    """The config.json quantization_config of a checkpoint `heron quantize` writes (rtn: GPTQ's)."""
    if method == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}
    return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": False, "sym": bits == 8,
            "checkpoint_format": "gptq"}


def _projection_tensors(method: str, iw: IntWeight) -> dict[str, torch.Tensor]:
    if method == "awq":
        return pack_awq(iw.codes, iw.scales, iw.zeros)
    if iw.bits == 8:   # unsigned codes q + 128, zero 128, one group per output channel
        n = iw.codes.shape[0]
        return pack_gptq(iw.codes.to(torch.int32) + 128, iw.scales[:, None], torch.full((n, 1), 128.0), 8, -1)
    return pack_gptq(iw.codes, iw.scales, iw.zeros, 4, iw.group_size)


def save_checkpoint(out_dir: str | os.PathLike, model: nn.Module, hf_config, tokenizer,
                    qweights: dict[str, IntWeight], method: str, bits: int, group_size: int,
                    source_dir: Path | None = None, metadata: dict | None = None) -> Path:
    """Write an HF folder: config.json with quantization_config, the tokenizer, model.safetensors
    with the quantized projections of `qweights` (heron module name -> IntWeight, rows in the
    fused order) in the GPTQ (method gptq/rtn) or AWQ layout and every other parameter of
    `model` in bf16 (norm weights included: an AWQ fold is scored as stored, see heron.quant.awq)."""
    from safetensors.torch import save_file
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    modules = dict(model.named_modules())
    tensors: dict[str, torch.Tensor] = {}
    done = set()
    for mname, iw in qweights.items():
        module = modules[mname]
        for prefix, r0, r1 in projections(model, mname, module):
            for key, t in _projection_tensors(method, iw.rows(r0, r1)).items():
                tensors[f"{prefix}.{key}"] = t
            if module.bias is not None:
                tensors[f"{prefix}.bias"] = module.bias.detach()[r0:r1].to(torch.bfloat16).contiguous()
        done.update((f"{mname}.weight", f"{mname}.bias"))
    for name, p in model.named_parameters():
        if name not in done and p.numel():
            tensors[name] = p.detach().to(torch.bfloat16).contiguous()
    meta = {"format": "pt"}
    if metadata:
        meta["heron_quantize"] = json.dumps(metadata, sort_keys=True)
    save_file(tensors, str(out / "model.safetensors"), metadata=meta)

    config = copy.deepcopy(hf_config)
    config.quantization_config = quantization_config(method, bits, group_size)
    config.dtype = torch.bfloat16
    config.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    if source_dir is not None and (Path(source_dir) / "generation_config.json").is_file():
        shutil.copyfile(Path(source_dir) / "generation_config.json", out / "generation_config.json")
    return out
