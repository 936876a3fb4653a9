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
            from heron.quant.apply import LM_HEAD_KERNEL_MAX_ROWS, quantized_linear
            return quantized_linear(self.quant, hidden, LM_HEAD_KERNEL_MAX_ROWS)
        w = self.weight
        ops = small_batch_gemv(hidden, w)
        if ops is not None:  # 1-4 rows: stream the vocabulary matrix once (memory-bound)
            return ops.gemv(hidden, w, None)
        if hidden.shape[0] >= 8 and w.device.type == "cpu" and w.dtype == torch.bfloat16:
            # W @ h^T: for a tall vocabulary matrix oneDNN runs this shape about twice as fast
            # as h @ W^T at 8-128 rows on CPU. The result is a [R, V] view with contiguous
            # columns; the greedy argmax kernel reads it in place, other users copy it.
            return torch.mm(w, hidden.t()).t()
        return F.linear(hidden, w)
