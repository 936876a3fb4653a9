"""Engine configuration: one dataclass, validated once, with errors a user can act on."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has AVX512-BF16 or AMX, where bfloat16 matmuls beat float32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on CUDA and on CPUs with AVX512-BF16/AMX, float32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be one of auto, bfloat16, float16, float32; got {dtype}")
        return dtype
    name = _DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).lower())
    if name == "auto":
        if device.type == "cuda" or cpu_has_fast_bf16():
            return torch.bfloat16
        return torch.float32
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, bfloat16, float16, float32; got {dtype!r}")
    return _DTYPES[name]


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda; got {device!r}")
    return dev


def default_kv_cache_gib(device: torch.device) -> float:
    """CPU: 2 GiB, or less on a small machine. CUDA: 60% of the free memory after the weights
    (the caller passes the already-loaded state through torch.cuda.mem_get_info)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.6 * free / 2**30
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        total = 8.0
    return max(0.25, min(2.0, total * 0.1))


@dataclass
class EngineConfig:
    """Everything the engine needs to know, checked in `__post_init__`."""

    model: str | None = None                  # None: the embedded default model
    dtype: str = "auto"
    device: str | None = None                 # None/auto: cuda if available, else cpu
    block_size: int = 16
    kv_cache_memory: float | None = None      # GiB for the KV pool; None: default_kv_cache_gib
    num_kv_blocks: int | None = None          # overrides kv_cache_memory (tests, tuning)
    max_num_batched_tokens: int = 2048        # per-step token budget (chunk size for long prompts)
    max_num_seqs: int = 128                   # running requests per step
    max_model_len: int | None = None          # None: the model's max_position_embeddings
    seed: int = 0                             # seeds the global RNG used by unseeded requests
    num_threads: int | None = None            # torch intra-op threads on CPU; None: torch's default
    tokenizer: str | None = None              # tokenizer folder; None: from the model
    load_progress: bool = True
    attention_backend: str = "auto"           # auto | torch | cpu (C++ paged kernel)
    enable_prefix_caching: bool = True        # reuse the KV of cached leading blocks across requests
    kv_offload_dir: str | None = None         # disk tier of the prefix cache (kept across restarts)
    kv_offload_gib: float = 8.0               # disk tier capacity
    kv_offload_cpu_gib: float = 0.0           # CPU-memory tier capacity (for CUDA pools; 0 = off)
    kv_cache_dtype: str = "auto"              # auto (the model dtype) | int8 | fp8 (8-bit codes + a scale per token and head)
    quantization: str | None = None           # None | int8 | int4 | w8a8 | gguf | gptq | awq (applied after loading)
    quantization_group_size: int | None = None  # int4: columns per scale/zero group (None: 64); int8: None = per channel, else group-wise
    smoothquant_alpha: float | str | None = None  # w8a8: SmoothQuant migration strength in [0, 1) (0 = no smoothing, no
                                              # calibration), or "auto" (None too): searched per layer (heron.quant.w8a8)
    quantization_lm_head: str = "auto"        # auto | int8 | int4: the LM head's (and a tied embedding's) format
    speculative: str | None = None            # None | ngram | self-int4 | draft:MODEL (heron/spec)
    num_speculative_tokens: int | None = None # most drafts per request and step; None: 8 for ngram, 5 for self-int4, 3 for draft:MODEL
    speculative_max_batch: int = 4            # no drafts while more requests than this are decoding
    speculative_ngram_min: int = 2            # ngram: shortest / longest suffix matched
    speculative_ngram_max: int = 4
    speculative_tree_width: int = 1           # ngram: candidate continuations verified together as a token tree

    def __post_init__(self) -> None:
        if self.block_size not in (8, 16, 32, 64, 128):
            raise ValueError(f"block_size must be one of 8, 16, 32, 64, 128; got {self.block_size}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.kv_cache_memory is not None and not self.kv_cache_memory > 0:
            raise ValueError(f"kv_cache_memory must be > 0 GiB, got {self.kv_cache_memory}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError(f"num_kv_blocks must be >= 2, got {self.num_kv_blocks}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if self.attention_backend not in ("auto", "torch", "cpu"):
            raise ValueError(f"attention_backend must be auto, torch or cpu; got {self.attention_backend!r}")
        if not self.kv_offload_gib > 0:
            raise ValueError(f"kv_offload_gib must be > 0 GiB, got {self.kv_offload_gib}")
        if not self.kv_offload_cpu_gib >= 0:
            raise ValueError(f"kv_offload_cpu_gib must be >= 0 GiB, got {self.kv_offload_cpu_gib}")
        if not self.enable_prefix_caching and (self.kv_offload_dir or self.kv_offload_cpu_gib):
            raise ValueError("the KV offload tiers extend the prefix cache; they need prefix caching on "
                             "(drop --no-prefix-caching or the --kv-offload-* options)")
        from heron.runner.kv_cache import kv_code_dtype
        from heron.quant.w8a8 import check_alpha
        self.smoothquant_alpha = check_alpha(self.smoothquant_alpha)   # "auto" or a float in [0, 1)
        kv_code_dtype(self.kv_cache_dtype)  # ValueError naming the allowed values (and fp8 without torch support)
        if self.speculative in ("none", ""):
            self.speculative = None
        if self.speculative is not None:
            from heron.spec import METHODS
            if self.speculative not in METHODS[:-1] and not (self.speculative.startswith("draft:")
                                                              and len(self.speculative) > len("draft:")):
                raise ValueError(f"speculative must be one of {', '.join(METHODS)} (or None); "
                                 f"got {self.speculative!r}")
            if self.num_speculative_tokens is None:   # a draft token costs a draft-model forward
                # (self-int4 at k = 3 / 5: 1.21x / 1.44x on W2, 1.17x / 1.16x on the grounded task)
                self.num_speculative_tokens = {"ngram": 8, "self-int4": 5}.get(self.speculative, 3)
            if not 1 <= self.num_speculative_tokens <= 16:
                raise ValueError(f"num_speculative_tokens must be in [1, 16], got {self.num_speculative_tokens}")
            if self.speculative_max_batch < 1:
                raise ValueError(f"speculative_max_batch must be >= 1, got {self.speculative_max_batch}")
            if not 1 <= self.speculative_ngram_min <= self.speculative_ngram_max:
                raise ValueError("ngram sizes need 1 <= speculative_ngram_min <= speculative_ngram_max; got "
                                 f"{self.speculative_ngram_min} and {self.speculative_ngram_max}")
            if not 1 <= self.speculative_tree_width <= 8:
                raise ValueError(f"speculative_tree_width must be in [1, 8], got {self.speculative_tree_width}")
            if self.speculative_tree_width > 1 and self.speculative != "ngram":
                raise ValueError("speculative_tree_width > 1 (token trees) needs speculative='ngram'; "
                                 f"{self.speculative} proposes one chain")
        self.torch_device = resolve_device(self.device)
        self.torch_dtype = resolve_dtype(self.dtype, self.torch_device)
        if self.quantization in ("none", ""):
            self.quantization = None
        if self.quantization_group_size is None and self.quantization != "int8":
            self.quantization_group_size = 64      # int4's default (also a checkpoint's int4 LM head)
        from heron.quant.apply import check_quantization
        check_quantization(self.quantization, self.quantization_group_size, self.torch_device, self.model,
                           self.quantization_lm_head)
