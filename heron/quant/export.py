"""`heron quantize`: quantize a model's linear layers with RTN, GPTQ or AWQ and write a standard
GPTQ / AWQ checkpoint (heron.quant.checkpoint) that heron, and other GPTQ/AWQ loaders, read.

Steps: load the model through heron's engine in float32; for gptq/awq run the calibration text
through it once, keeping each linear layer's input statistics (heron.quant.calibration); per
decoder layer, quantize its four linear layers (q/k/v and gate/up fused as heron holds them):
    rtn   round to nearest on heron's grid (heron.quant.grid), no calibration
    gptq  heron.quant.gptq (error feedback through the calibration Hessian)
    awq   heron.quant.awq (activation-aware input-channel scales folded into the norms / v / up,
          then round to nearest)
and write config.json (the model's HF config, synthesized from the GGUF header for a GGUF
model, plus quantization_config), the tokenizer, and model.safetensors (quantized projections
in the GPTQ layout for rtn and gptq, AWQ's GEMM layout for awq; embeddings, norms and an
untied LM head in bf16). The LM head and embeddings stay unquantized, as GPTQ/AWQ tools leave
them; `--quantization-lm-head` quantizes them at load time.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from heron.quant.weight_only import INT4_GROUP_SIZES

logger = logging.getLogger(__name__)

__all__ = ["METHODS", "check_quantize_args", "quantize_checkpoint"]

METHODS = ("rtn", "gptq", "awq")
DEFAULT_GROUP_SIZE = 128
DEFAULT_CALIB_TOKENS = 4096
DEFAULT_CONTEXT_LEN = 512


def check_quantize_args(method: str, bits: int, group_size: int | None) -> int:
    """Validate the method/bits/group size combination; returns the group size to use (-1 for 8-bit)."""
    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}; got {method!r}")
    if bits not in (4, 8):
        raise ValueError(f"--bits must be 4 or 8 (what heron's int4 / int8 kernels run); got {bits}")
    if method == "awq" and bits != 4:
        raise ValueError("AWQ is 4-bit only (AWQ's GEMM checkpoint layout has no 8-bit form); use --bits 4, "
                         "or --method gptq / rtn for 8-bit")
    if bits == 8:
        if group_size not in (None, -1):
            raise ValueError(f"8-bit is per output channel (heron's int8 kernel has one scale per row): omit "
                             f"--group-size or pass -1; got {group_size}")
        return -1
    g = DEFAULT_GROUP_SIZE if group_size is None else group_size
    if g not in INT4_GROUP_SIZES:
        raise ValueError(f"--group-size for 4-bit must be one of {', '.join(map(str, INT4_GROUP_SIZES))} (what "
                         f"heron's int4 kernel runs); got {g}")
    return g


def _check_shapes(model, linears: dict, bits: int, group_size: int) -> None:
    from heron.quant.checkpoint import projections
    for name, m in linears.items():
        k = m.in_features
        if bits == 4 and k % group_size:
            fits = [g for g in INT4_GROUP_SIZES if k % g == 0]
            raise ValueError(f"layer {name} has {k} input features, not a multiple of --group-size {group_size}"
                             f"{f' (group sizes that divide it: {fits})' if fits else ''}")
        if k % (32 // bits):
            raise ValueError(f"layer {name}: {k} input features cannot be packed {32 // bits} to an int32 word")
        for prefix, r0, r1 in projections(model, name, m):
            if (r1 - r0) % 8:
                raise ValueError(f"{prefix}: {r1 - r0} output features is not a multiple of 8 (the packed zero "
                                 f"points hold 8 per word)")


def quantize_checkpoint(model: str | None, method: str, out: str | Path, bits: int = 4, group_size: int | None = None,
                        calib_text: str | None = None, calib_tokens: int = DEFAULT_CALIB_TOKENS,
                        context_len: int = DEFAULT_CONTEXT_LEN, progress: bool = True,
                        calib_name: str | None = None) -> dict:
    """Quantize `model` (a heron model argument; None: the default model) and write the checkpoint
    to `out`. Returns a summary; `summary["weights"]` maps heron module names to the IntWeights
    written (IntWeight.build() is what heron will run after loading the folder)."""
    from tqdm.auto import tqdm

    from heron import LLM
    from heron.layers.linear import LinearBase
    from heron.quant.awq import apply_awq
    from heron.quant.calibration import calibration_windows, collect_input_stats, default_calibration_text
    from heron.quant.checkpoint import save_checkpoint
    from heron.quant.gptq import gptq_quantize
    from heron.quant.grid import rtn

    g = check_quantize_args(method, bits, group_size)
    if context_len < 2:
        raise ValueError(f"--calib-context-len must be >= 2, got {context_len}")
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out} exists and is not an empty folder")
    t0 = time.perf_counter()
    llm = LLM(model=model, dtype="float32", load_progress=progress, enable_prefix_caching=False,
              max_num_batched_tokens=max(context_len, 512), kv_cache_memory=0.5)
    engine = llm.engine
    net = engine.runner.model
    linears = {name: m for name, m in net.named_modules() if isinstance(m, LinearBase)}
    _check_shapes(net, linears, bits, g)

    stats, num_calib = None, 0
    if method != "rtn":
        text = default_calibration_text() if calib_text is None else calib_text
        wins = calibration_windows(llm.tokenizer, text, calib_tokens, context_len)
        num_calib = sum(len(w) for w in wins)
        t1 = time.perf_counter()
        stats = collect_input_stats(llm, linears, wins, with_gram=True, progress=progress)
        logger.info("calibration: %d tokens in %d windows, %.1fs", num_calib, len(wins), time.perf_counter() - t1)

    layers = net.model.layers
    qweights, alphas = {}, {}
    with torch.no_grad():
        for i, layer in enumerate(tqdm(layers, desc=f"{method} {bits}-bit", unit="layer", disable=not progress)):
            prefix = f"model.layers.{i}."
            names = [n for n in linears if n.startswith(prefix)]
            if method == "awq":
                for sub, (iw, alpha) in apply_awq(layer, {n[len(prefix):]: stats[n] for n in names}, g).items():
                    qweights[prefix + sub] = iw
                    alphas[prefix + sub] = alpha
                continue
            for n in names:
                w = linears[n].weight
                gs = g if bits == 4 else None
                qweights[n] = rtn(w, bits, gs) if method == "rtn" else \
                    gptq_quantize(w, stats[n].hessian(), bits, gs)
    left = sorted(set(linears) - set(qweights))
    if left:
        raise ValueError(f"linear layers outside the decoder layers are not quantized by heron quantize: {left[:4]}")

    source = engine.source
    meta = dict(method=method, bits=bits, group_size=g, source=source.name,
                calibration=None if method == "rtn" else dict(text=calib_name or "heron/quant/data/calibration.txt",
                                                              tokens=num_calib, context_len=context_len))
    save_checkpoint(out, net, engine.hf_config, llm.tokenizer, qweights, method, bits, g,
                    source_dir=source.path if source.kind == "hf" else None, metadata=meta)
    secs = time.perf_counter() - t0
    summary = dict(out=str(out), model=source.name, method=method, bits=bits, group_size=g,
                   layers=len(qweights), calibration_tokens=num_calib, secs=round(secs, 1))
    if alphas:
        summary["awq_mean_alpha"] = round(sum(alphas.values()) / len(alphas), 3)
    summary["weights"] = qweights
    return summary
