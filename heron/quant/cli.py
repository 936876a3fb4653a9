"""`heron quantize MODEL --method rtn|awq|gptq --bits 4|8 [--group-size 128] --out DIR`
(registered by heron.cli; the work is heron.quant.export.quantize_checkpoint)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from heron.quant.export import DEFAULT_CALIB_TOKENS, DEFAULT_CONTEXT_LEN, DEFAULT_GROUP_SIZE, METHODS


def add_quantize_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `quantize` subcommand to heron's subparsers."""
    p = subparsers.add_parser(
        "quantize", help="quantize a model with RTN, GPTQ or AWQ and write a GPTQ/AWQ checkpoint folder",
        description="Quantizes the linear layers of MODEL (an HF folder, a .gguf file, or the default model when "
                    "omitted) and writes an HF folder in the standard GPTQ layout (rtn, gptq) or AWQ GEMM layout "
                    "(awq) with config.json's quantization_config, loadable with `--model DIR`. gptq and awq "
                    "run a small English calibration text (heron/quant/data/calibration.txt, not the perplexity "
                    "text) through the model first. Embeddings and the LM head stay bf16.")
    p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="HF folder, .gguf file or gemma-3-270m (default: gemma-3-270m)")
    p.add_argument("--method", required=True, choices=METHODS,
                   help="rtn = round to nearest; gptq = GPTQ error feedback; awq = activation-aware scales")
    p.add_argument("--bits", type=int, default=4, choices=[4, 8],
                   help="4 = group-wise asymmetric int4; 8 = per-channel symmetric int8 (rtn, gptq) (default: 4)")
    p.add_argument("--group-size", type=int, default=None,
                   help=f"4-bit: input columns per scale/zero, 32, 64, 128 or 256, dividing every layer's input "
                        f"features (default: {DEFAULT_GROUP_SIZE}); 8-bit is per channel (-1)")
    p.add_argument("--out", required=True, help="output folder (created; must be empty if it exists)")
    p.add_argument("--calib-file", default=None,
                   help="a UTF-8 text file to calibrate on instead of heron/quant/data/calibration.txt")
    p.add_argument("--calib-tokens", type=int, default=DEFAULT_CALIB_TOKENS,
                   help=f"calibration tokens (the text's first N; default: {DEFAULT_CALIB_TOKENS})")
    p.add_argument("--calib-context-len", type=int, default=DEFAULT_CONTEXT_LEN,
                   help=f"tokens per calibration window, BOS included (default: {DEFAULT_CONTEXT_LEN})")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run_quantize)
    return p


def run_quantize(args) -> int:
    from heron.quant.export import quantize_checkpoint
    calib_text = None
    if args.calib_file is not None:
        calib_text = Path(args.calib_file).read_text(encoding="utf-8")
    summary = quantize_checkpoint(args.model, args.method, args.out, bits=args.bits, group_size=args.group_size,
                                  calib_text=calib_text, calib_tokens=args.calib_tokens,
                                  context_len=args.calib_context_len, progress=not args.no_progress,
                                  calib_name=args.calib_file)
    summary.pop("weights")
    print(json.dumps(summary))
    print(f"wrote {summary['out']}; run it with --model {summary['out']}", file=sys.stderr)
    return 0
