"""`heron bench throughput`: a standard workload offline, one JSON line like the peers' runners."""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

from heron.bench.workloads import make_prompts, wait_for_kv_pool


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_throughput(args, engine_kwargs: dict) -> dict:
    from heron import LLM, SamplingParams

    prompts, out_len = make_prompts(args.workload, args.num_prompts)
    t_load = time.perf_counter()
    llm = LLM(model=args.model, **engine_kwargs)
    load_s = time.perf_counter() - t_load
    bos = llm.tokenizer.bos_token_id
    if bos is not None:
        prompts = [[bos] + p for p in prompts]  # as the peers' runners do
    params = SamplingParams(temperature=0.0, max_tokens=out_len, min_tokens=out_len, ignore_eos=True)
    if args.warmup:
        llm.generate([prompts[0][:16]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
                     use_tqdm=False)
        llm.engine.reset_prefix_cache()   # the timed run starts with an empty prefix cache
        wait_for_kv_pool(llm)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=not args.no_progress)
    secs = time.perf_counter() - t0
    gen = sum(len(o.outputs[0].token_ids) for o in outs)
    tot_in = sum(len(p) for p in prompts)
    ttfts = sorted(o.metrics.time_to_first_token for o in outs)
    tpots = sorted(t for o in outs if (t := o.metrics.time_per_output_token) is not None)
    eng = llm.engine
    result = dict(
        engine="heron", workload=args.workload, dtype=str(eng.config.torch_dtype).replace("torch.", ""),
        quantization=eng.config.quantization,
        secs=round(secs, 2), out_tok_s=round(gen / secs, 2), total_tok_s=round((gen + tot_in) / secs, 2),
        num_prompts=len(prompts), input_tokens=tot_in, output_tokens=gen,
        ttft_p50_ms=round(1000 * ttfts[len(ttfts) // 2], 1),
        tpot_p50_ms=round(1000 * tpots[len(tpots) // 2], 1) if tpots else None,
        cached_tokens=sum(o.num_cached_tokens for o in outs), prefix_caching=eng.config.enable_prefix_caching,
        load_s=round(load_s, 2), steps=eng.num_steps, preemptions=eng.scheduler.num_preemptions_total,
        max_num_batched_tokens=eng.config.max_num_batched_tokens, max_num_seqs=eng.config.max_num_seqs,
        threads=__import__("torch").get_num_threads(), peak_rss_mib=round(_peak_rss_mib(), 1),
        device=str(eng.config.torch_device),
    )
    save_result(result, args.output, f"heron_{args.workload}_throughput.json")
    return result


def save_result(result: dict, output: str | None, default_name: str) -> None:
    """Print the result as one JSON line and save it (default: bench_results/<default_name>)."""
    line = json.dumps(result)
    print(line)
    out = Path(output) if output else Path("bench_results") / default_name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(line + "\n")
    print(f"saved {out}", file=sys.stderr)
