"""The contract between the model runner and attention backends.

The flat batch holds decodes first (query length 1, rows [0, num_decodes)) and then
prefill chunks (query length >= 1 each, in the order of `prefill_*`). Every backend reads
and writes the same paged KV cache layout: per layer a tensor
`[2, num_blocks, block_size, num_kv_heads, head_dim]` (0 = keys, 1 = values). With
`--kv-cache-dtype int8|fp8` the tensor's dtype is torch.int8 / torch.float8_e4m3fn and its last
dimension is `head_dim + 4`: each row's codes, then its float32 scale (heron.runner.kv_cache);
backends quantize the step's K/V on write and dequantize what they read.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    block_size: int
    slot_mapping: torch.Tensor            # [T] long: cache slot (block_id * block_size + offset) of each token
    num_decodes: int                      # requests (= tokens) in the decode part
    decode_block_tables: torch.Tensor     # [num_decodes, max_blocks] long, padded with the null block 0
    decode_seq_lens: torch.Tensor         # [num_decodes] long: tokens in the cache after this step
    prefill_query_starts: list[int]       # row offset of each prefill chunk in the flat batch
    prefill_query_lens: list[int]
    prefill_context_lens: list[int]       # tokens already cached before this chunk
    prefill_block_tables: list[torch.Tensor]  # [num_blocks_i] long each
    backend: AttentionBackend | None = None
    # per prefill chunk: None, or a token tree being verified (heron.spec.tree): (query
    # positions [qlen] long, mask [qlen, qlen] bool over the chunk's own keys); the chunk's
    # queries see all of the context and, among the chunk's keys, only what the mask allows
    prefill_trees: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)
    cache: dict = field(default_factory=dict)  # per-step scratch shared by layers (masks, gather indices)

    @property
    def num_prefills(self) -> int:
        return len(self.prefill_query_lens)


@dataclass(frozen=True)
class AttentionSpec:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    sliding_window: int | None = None    # attend to keys with q_pos - k_pos < sliding_window
    logit_softcap: float | None = None


class AttentionBackend(ABC):
    name: str = "base"

    @abstractmethod
    def forward(self, spec: AttentionSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] for this step's tokens -> output [T, Hq, D].
        Writes k/v into `kv_cache` at `meta.slot_mapping` first."""


BACKENDS = ("auto", "torch", "cpu")


def get_attention_backend(name: str = "auto", device: torch.device | None = None) -> AttentionBackend:
    """`auto`: the C++ kernel backend on CPU when it builds, else the portable torch backend."""
    from heron.runner.attention.torch_backend import TorchAttentionBackend
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {', '.join(BACKENDS)}")
    if name == "torch" or (name == "auto" and device is not None and device.type != "cpu"):
        return TorchAttentionBackend()
    from heron.ops.cpu import load_kernel
    from heron.runner.attention import cpu_backend
    if name == "cpu":
        return cpu_backend.CpuAttentionBackend()
    return cpu_backend.CpuAttentionBackend() if load_kernel() is not None else TorchAttentionBackend()
