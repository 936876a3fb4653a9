"""The standard workloads of shared/BENCHMARKS.md, generated exactly as shared/peers/workload.py
does (same procedure, same seed), so that every engine sees the same token ids."""
from __future__ import annotations

import random

WORKLOADS = {
    "W1": dict(n=64, in_lo=32, in_hi=512, out_len=128, prefix=0),
    "W2": dict(n=1, in_lo=256, in_hi=256, out_len=256, prefix=0),
    "W4": dict(n=64, in_lo=32, in_hi=32, out_len=32, prefix=1024),
}


def make_prompts(name: str, n: int | None = None) -> tuple[list[list[int]], int]:
    """(prompts as token-id lists, output length) for workload `name`; ids drawn from
    [1000, 200000) with random.Random(0)."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}")
    w = dict(WORKLOADS[name])
    if n is not None:
        w["n"] = n
    rng = random.Random(0)
    prefix = [rng.randrange(1000, 200000) for _ in range(w["prefix"])]
    prompts = []
    for _ in range(w["n"]):
        length = rng.randint(w["in_lo"], w["in_hi"])
        prompts.append(prefix + [rng.randrange(1000, 200000) for _ in range(length)])
    return prompts, w["out_len"]


def wait_for_kv_pool(llm, timeout: float = 120.0) -> None:
    """Before timing: wait until the engine's KV pool is mapped in (heron.ops.cpu_memory.
    KVPrefaulter, a background thread after start-up on CPU), so that neither its page faults
    nor the thread's memory traffic land in a timed run. vLLM zero-fills its pool at start-up."""
    prefault = getattr(llm.engine.runner, "kv_prefault", None)
    if prefault is not None:
        prefault.wait(timeout=timeout)
