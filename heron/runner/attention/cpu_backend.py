"""CPU backend: decode rows through a C++ paged-attention kernel that reads the KV blocks in
place (no gathered copy of the context); prefill chunks as in the torch backend. With an
8-bit cache (`--kv-cache-dtype int8|fp8`) the kernel quantizes the step's K/V into their slots
and reads the codes and scales directly, dequantizing in registers.

The kernel lives in heron.ops.cpu (compiled once per machine and cached); if no compiler
is available the engine falls back to the portable torch backend.
"""
from __future__ import annotations

import torch

from heron.ops.cpu import kernel_error, load_kernel
from heron.runner.attention.base import AttentionMetadata, AttentionSpec
from heron.runner.attention.torch_backend import TorchAttentionBackend


class CpuAttentionBackend(TorchAttentionBackend):
    name = "cpu"

    def __init__(self) -> None:
        self.kernel = load_kernel()
        if self.kernel is None:
            raise RuntimeError(f"the CPU attention kernel could not be built: {kernel_error()}")

    def forward(self, spec: AttentionSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if meta.num_prefills == 0 and spec.logit_softcap is None and q.device.type == "cpu":
            # decode-only step: the kernel writes this step's keys/values into their slots and
            # attends, one call per layer
            return self.kernel.paged_decode(q.contiguous(), kv_cache, meta.decode_block_tables,
                                            meta.decode_seq_lens, spec.sliding_window or 0, spec.scale, k, v,
                                            meta.slot_mapping)
        return super().forward(spec, q, k, v, kv_cache, meta)

    def _decode(self, spec: AttentionSpec, q: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        if spec.logit_softcap is not None or q.device.type != "cpu":
            return super()._decode(spec, q, kv_cache, meta)
        return self.kernel.paged_decode(q.contiguous(), kv_cache, meta.decode_block_tables, meta.decode_seq_lens,
                                        spec.sliding_window or 0, spec.scale, None, None, None)
