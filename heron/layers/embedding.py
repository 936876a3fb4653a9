"""Vocab embedding and LM head (vocab-parallel in name; one rank today)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from heron.layers.linear import default_weight_loader, empty_parameter
from heron.ops.cpu import small_batch_gemv


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    quant = None   # set by --quantization when the LM head is tied to this table

    def set_quantized(self, qweight) -> None:
        """Look rows up in the (tied) LM head's quantized weight; the plain table is dropped."""
        self.quant = qweight
        self.weight = empty_parameter(self.weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.quant is not None:
            return self.quant.dequantize_rows(input_ids, self.weight.dtype).view(*input_ids.shape, -1)
        return F.embedding(input_ids, self.weight)


# LM head rows on the streaming GEMV kernel (a row's logits are then the same bits whatever the
# number of rows, 1 to 8). Measured on the 262k x 640 head (ms, medians of 5, one process):
#   rows      1     4     8     9    12    16    32    64
#   gemv    9.9  11.8  16.7  22.0  32.3  36.3
#   W @ h^T 17.5  30.1  32.8  30.0  31.6  29.7  24.7  55.6
#   h @ W^T 17.9  18.6  19.8  19.8  20.5  22.2  28.7  54.4
# W @ h^T writes into a buffer the head keeps (_mm_into_buffer); with a 2 GiB block resident, as
# the KV pool is, a fresh output took 20.0 / 97.7 / 169.3 ms at 32 / 64 / 128 rows, the reused
# buffer 21.8 / 36.3 / 58.8.
GEMV_MAX_ROWS = 8
MM_MIN_ROWS = 32


class ParallelLMHead(nn.Module):
    """hidden -> logits; shares the embedding's weight when the model ties them."""

    def __init__(self, vocab_size: int, hidden_size: int, tied_to: VocabParallelEmbedding | None = None) -> None:
        super().__init__()
        if tied_to is not None:
            self.weight = tied_to.weight
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
            self.weight.weight_loader = default_weight_loader

    quant = None   # a heron.quant QuantizedWeight once --quantization has swapped the weight

    def set_quantized(self, qweight) -> None:
        """Compute the logits with the quantized weight (quantize_model gives a tied embedding
        the same one for its lookups)."""
        self.quant = qweight
        self.weight = empty_parameter(self.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.quant is not None:
            from heron.quant.apply import quantized_linear
            return quantized_linear(self.quant, hidden, lm_head=True)
        w = self.weight
        ops = small_batch_gemv(hidden, w, GEMV_MAX_ROWS)
        if ops is not None:  # a few rows: stream the vocabulary matrix once (memory-bound)
            return ops.gemv(hidden, w, None)
        if hidden.shape[0] >= MM_MIN_ROWS and w.device.type == "cpu" and w.dtype == torch.bfloat16:
            # W @ h^T: for a tall vocabulary matrix oneDNN runs this shape faster than h @ W^T
            # from ~32 rows on (table above). The result is a [R, V] view with contiguous
            # columns; the greedy argmax kernel reads it in place, other users copy it.
            return self._mm_into_buffer(w, hidden)
        return F.linear(hidden, w)

    _out = None  # flat reusable output of the W @ h^T path (see _mm_into_buffer)

    def _mm_into_buffer(self, w: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        # The [V, R] result (34 MB at 64 rows) is bigger than glibc's largest mmap threshold
        # (32 MiB), so a fresh one is a fresh mmap every step, page-faulted in again: with the KV
        # pool resident that doubled the LM head's time here (64 rows: ~110 ms against ~40 ms
        # into a reused buffer). So the result lives in one buffer kept by the head and grown
        # on demand; the logits returned are valid until the next call (the runner samples
        # from them before it computes any others).
        n = w.shape[0] * hidden.shape[0]
        if self._out is None or self._out.numel() < n or self._out.dtype != w.dtype:
            self._out = torch.empty(n, dtype=w.dtype, device=w.device)
        out = self._out[:n].view(w.shape[0], hidden.shape[0])
        torch.mm(w, hidden.t(), out=out)
        return out.t()
