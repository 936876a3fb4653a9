"""`heron bench plot`: draws the benchmark page's figure (PNG) from a sitting's JSON file.

The JSON holds one sitting's numbers (heron and the peers, same machine, same hour):
{"machine": "...", "date": "...",
 "W1": {"heron": out_tok_s, "vLLM": ..., ...},
 "W2": {"heron": {"decode_ms": ..., "ttft_ms": ...}, "llama.cpp": {...}},
 "W3": {"heron": {"ttft_p50": ..., "ttft_p99": ..., "tpot_p50": ..., "tpot_p99": ..., "out_tok_s": ...}, "vLLM": {...}}}
Needs matplotlib (`pip install -e .[bench]`).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

COLORS = {"heron": "#1f6f8b", "vLLM": "#e07a5f", "llama.cpp": "#81b29a", "HF": "#9a8c98"}


def plot_sitting(data: dict, output: str | Path) -> Path:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("heron bench plot needs matplotlib: pip install -e '.[bench]'") from None
    panels = [k for k in ("W1", "W2", "W3") if k in data]
    if not panels:
        raise ValueError("the sitting file has none of W1, W2, W3")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2))
    axes = [axes] if len(panels) == 1 else list(axes)
    for ax, key in zip(axes, panels):
        block = data[key]
        if key == "W1":
            names = list(block)
            vals = [block[n] for n in names]
            bars = ax.bar(names, vals, color=[COLORS.get(n, "#888") for n in names])
            ax.bar_label(bars, fmt="%.0f")
            ax.set_title("W1 offline throughput (higher is better)")
            ax.set_ylabel("output tokens/s")
        else:
            metrics = (["decode_ms", "ttft_ms"] if key == "W2" else ["ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99"])
            labels = {"decode_ms": "decode / token", "ttft_ms": "time to first token", "ttft_p50": "TTFT p50",
                      "ttft_p99": "TTFT p99", "tpot_p50": "TPOT p50", "tpot_p99": "TPOT p99"}
            names = list(block)
            width = 0.8 / len(names)
            for i, n in enumerate(names):
                xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(metrics))]
                bars = ax.bar(xs, [block[n][m] for m in metrics], width, label=n, color=COLORS.get(n, "#888"))
                ax.bar_label(bars, fmt="%.0f", fontsize=8)
            ax.set_xticks(range(len(metrics)), [labels[m] for m in metrics])
            ax.set_ylabel("ms")
            ax.set_yscale("log" if key == "W3" else "linear")
            ax.legend()
            ax.set_title("W2 single stream (lower is better)" if key == "W2" else
                         "W3 serving, 2 req/s (lower is better)")
    fig.suptitle(f"heron vs peers — {data.get('machine', '')}, {data.get('date', '')}", fontsize=10)
    fig.tight_layout()
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def run_plot(args) -> None:
    try:
        data = json.loads(Path(args.input).read_text())
    except FileNotFoundError:
        raise ValueError(f"no such sitting file: {args.input}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{args.input} is not valid JSON: {e}") from None
    out = plot_sitting(data, args.output)
    print(f"saved {out}", file=sys.stderr)
