"""Calibration for `heron quantize --method gptq|awq`: run a small English text through the
unquantized model and keep, for every linear layer, statistics of its inputs:

    X^T X  [K, K]  (GPTQ's Hessian up to a factor; AWQ's output error is trace(D X^T X D^T))
    sum |x| [K]    (AWQ's per-channel activation magnitude)

The text goes through heron's own engine the way `heron eval perplexity` scores its text
(heron.eval.perplexity.windows: windows of `context_len` tokens, each starting with BOS, one
request each, prefix caching off), with forward pre-hooks on the linear layers. One pass of
the unquantized model gives every layer's statistics ("non-sequential" calibration: a layer
does not see the error of the quantized layers before it, as the GPTQ/AWQ papers' sequential
procedure would). Deterministic: the same text, model and options give the same statistics.

The default text (heron/quant/data/calibration.txt, see SOURCES.md there) is English prose
written for heron; it is deliberately not the perplexity text (heron/eval/data/), so a
perplexity comparison of quantization methods stays honest.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_CALIBRATION_TEXT", "InputStats", "calibration_windows", "collect_input_stats",
           "default_calibration_text"]

DEFAULT_CALIBRATION_TEXT = Path(__file__).parent / "data" / "calibration.txt"


def default_calibration_text() -> str:
    return DEFAULT_CALIBRATION_TEXT.read_text(encoding="utf-8")


@dataclass
class InputStats:
    """Running statistics of one linear layer's inputs (float64 accumulators)."""

    in_features: int
    gram: torch.Tensor | None = None          # X^T X [K, K]
    abs_sum: torch.Tensor = field(default=None)
    rows: int = 0

    def __post_init__(self) -> None:
        if self.abs_sum is None:
            self.abs_sum = torch.zeros(self.in_features, dtype=torch.float64)

    def add(self, x: torch.Tensor, with_gram: bool = True) -> None:
        x = x.detach().reshape(-1, self.in_features).float()
        if with_gram:
            g = (x.t() @ x).double()
            self.gram = g if self.gram is None else self.gram.add_(g)
        self.abs_sum.add_(x.abs().sum(dim=0).double())
        self.rows += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """X^T X as float32 [K, K]."""
        if self.gram is None:
            raise ValueError("no calibration inputs reached this layer")
        return self.gram.float()

    def abs_mean(self) -> torch.Tensor:
        """mean |x| per input channel, float32 [K]."""
        return (self.abs_sum / max(self.rows, 1)).float()


def calibration_windows(tokenizer, text: str, num_tokens: int, context_len: int) -> list[list[int]]:
    """The first `num_tokens` tokens of `text`, in windows of `context_len` (BOS included)."""
    from heron.eval.perplexity import windows
    if num_tokens < 1:
        raise ValueError(f"calibration tokens must be >= 1, got {num_tokens}")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < num_tokens:
        logger.warning("the calibration text has %d tokens, fewer than the %d asked for; using them all",
                       len(ids), num_tokens)
    ids = ids[:num_tokens]
    if len(ids) < 2:
        raise ValueError("the calibration text has fewer than 2 tokens")
    return [w for w in windows(ids, context_len, tokenizer.bos_token_id) if len(w) >= 2]


def collect_input_stats(llm, modules: dict[str, nn.Module], wins: list[list[int]], with_gram: bool = True,
                        progress: bool = False) -> dict[str, InputStats]:
    """Run the windows through `llm` (a heron LLM) and return the input statistics of `modules`
    (name -> a linear layer of llm's model)."""
    from heron import SamplingParams
    stats = {name: InputStats(m.in_features) for name, m in modules.items()}

    def hook(name):
        def pre_hook(module, args):
            stats[name].add(args[0], with_gram)
        return pre_hook

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in modules.items()]
    try:
        params = SamplingParams(temperature=0.0, max_tokens=1)
        llm.generate(wins, params, use_tqdm=progress)
    finally:
        for h in handles:
            h.remove()
    missing = [name for name, s in stats.items() if s.rows == 0]
    if missing:
        raise RuntimeError(f"calibration inputs never reached {missing[:4]}")
    return stats
