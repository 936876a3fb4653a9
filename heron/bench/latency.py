"""`heron bench latency`: one stream (W2 by default: a 256-token prompt, 256 greedy output
tokens), repeated; prints a table and one JSON line with the peers' fields plus the split
into time to first token and decode time per token."""
from __future__ import annotations

import statistics
import sys
import time

from heron.bench.throughput import _peak_rss_mib, save_result
from heron.bench.workloads import make_prompts, wait_for_kv_pool


def run_latency(args, engine_kwargs: dict) -> dict:
    from heron import LLM, SamplingParams

    if args.iters < 1:
        raise ValueError(f"--iters must be at least 1, got {args.iters}")
    prompts, out_len = make_prompts(args.workload, 1)
    prompt = prompts[0]
    if args.input_len is not None:
        if args.input_len < 1:
            raise ValueError(f"--input-len must be at least 1, got {args.input_len}")
        prompt = (prompt * (args.input_len // len(prompt) + 1))[:args.input_len]
    if args.output_len is not None:
        if args.output_len < 2:
            raise ValueError(f"--output-len must be at least 2 (one prefill token, one decode), got {args.output_len}")
        out_len = args.output_len
    t_load = time.perf_counter()
    llm = LLM(model=args.model, **engine_kwargs)
    load_s = time.perf_counter() - t_load
    bos = llm.tokenizer.bos_token_id
    if bos is not None:
        prompt = [bos] + prompt  # as the peers' runners do
    params = SamplingParams(temperature=0.0, max_tokens=out_len, min_tokens=out_len, ignore_eos=True)
    for _ in range(args.warmup_iters):
        llm.generate([prompt[:32]], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    wait_for_kv_pool(llm)

    runs = []
    for i in range(args.iters):
        llm.engine.reset_prefix_cache()   # every iteration computes the prompt (no hit on the previous one)
        t0 = time.perf_counter()
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        secs = time.perf_counter() - t0
        gen = len(out.outputs[0].token_ids)
        ttft = out.metrics.time_to_first_token
        decode_ms = 1000 * (secs - ttft) / (gen - 1)
        runs.append(dict(secs=secs, gen=gen, ttft=ttft, decode_ms=decode_ms))
        if not args.quiet:
            print(f"iter {i + 1}/{args.iters}: {gen / secs:7.2f} tok/s  TTFT {1000 * ttft:7.1f} ms  "
                  f"decode {decode_ms:6.2f} ms/token", file=sys.stderr)

    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    secs, ttft, decode_ms = med("secs"), med("ttft"), med("decode_ms")
    gen = runs[0]["gen"]
    eng = llm.engine
    result = dict(
        engine="heron", workload=args.workload, dtype=str(eng.config.torch_dtype).replace("torch.", ""),
        quantization=eng.config.quantization,
        secs=round(secs, 3), out_tok_s=round(gen / secs, 2), total_tok_s=round((gen + len(prompt)) / secs, 2),
        mean_ttft_s=round(statistics.mean(r["ttft"] for r in runs), 4), ttft_ms=round(1000 * ttft, 1),
        decode_ms_per_token=round(decode_ms, 2), decode_tok_s=round(1000 / decode_ms, 2),
        input_tokens=len(prompt), output_tokens=gen, iters=args.iters, load_s=round(load_s, 2),
        threads=__import__("torch").get_num_threads(), peak_rss_mib=round(_peak_rss_mib(), 1),
        device=str(eng.config.torch_device),
    )
    if not args.quiet:
        print(f"\n{'input tokens':<24}{len(prompt):>10}\n{'output tokens':<24}{gen:>10}\n"
              f"{'out tok/s (incl. TTFT)':<24}{result['out_tok_s']:>10.2f}\n{'TTFT ms':<24}{result['ttft_ms']:>10.1f}\n"
              f"{'decode ms/token':<24}{decode_ms:>10.2f}\n{'decode tok/s':<24}{result['decode_tok_s']:>10.2f}\n"
              f"(median of {args.iters} runs)\n", file=sys.stderr)
    save_result(result, args.output, f"heron_{args.workload}_latency.json")
    return result
