"""`heron bench multiturn`: a multi-turn chat replay, each turn resending the whole conversation.

`--conversations` chats run side by side (every chat's next turn is sent as soon as all chats
have their previous answer, like users who reply at once). Turn t's prompt is the system
prompt, then every earlier user message and answer, then the new user message; the answer
is what the engine generated (greedy), so a later turn's prompt starts with everything the
engine has seen before. The figure of merit is the mean time to first token of turns 2 and
later. By default the replay runs twice in one process, with the prefix cache on and off,
and prints the ratio; token ids are random in [1000, 200000) from a fixed seed, so every run
and every engine sees the same conversations
(for vocabularies of at least 200,000 tokens).
"""
from __future__ import annotations

import random
import statistics
import sys
import time


def _conversations(args, vocab_size: int) -> tuple[list[list[int]], list[list[list[int]]]]:
    rng = random.Random(args.seed_conversations)
    hi = min(200000, vocab_size)          # (a small test vocabulary gets ids in [hi/4, hi))
    lo = min(1000, hi // 4)

    def toks(n: int) -> list[int]:
        return [rng.randrange(lo, hi) for _ in range(n)]

    systems = [toks(args.system_len) for _ in range(args.conversations)]
    users = [[toks(args.user_len) for _ in range(args.turns)] for _ in range(args.conversations)]
    return systems, users


def replay(llm, args, bos: int | None) -> dict:
    """Run the replay on `llm`; returns per-turn TTFTs (seconds) and token counts."""
    from heron import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=args.answer_len, min_tokens=args.answer_len, ignore_eos=True)
    systems, users = _conversations(args, llm.engine.runner.vocab_size)
    histories = [([bos] if bos is not None else []) + s for s in systems]
    ttfts: list[list[float]] = []
    cached = prompt_tokens = out_tokens = 0
    t0 = time.perf_counter()
    for turn in range(args.turns):
        prompts = [h + users[c][turn] for c, h in enumerate(histories)]
        outs = llm.generate(prompts, params, use_tqdm=False)
        ttfts.append([o.metrics.time_to_first_token for o in outs])
        for c, o in enumerate(outs):
            histories[c] = prompts[c] + list(o.outputs[0].token_ids)
            cached += o.num_cached_tokens
            prompt_tokens += len(prompts[c])
            out_tokens += len(o.outputs[0].token_ids)
        if not args.quiet:
            print(f"  turn {turn + 1}: prompt {len(prompts[0])} tokens, mean TTFT "
                  f"{1000 * statistics.mean(ttfts[-1]):.0f} ms, cached {sum(o.num_cached_tokens for o in outs)} "
                  f"tokens", file=sys.stderr)
    secs = time.perf_counter() - t0
    later = [t for turn in ttfts[1:] for t in turn]
    return dict(mean_ttft_first_turn_ms=round(1000 * statistics.mean(ttfts[0]), 1),
                mean_ttft_later_turns_ms=round(1000 * statistics.mean(later), 1) if later else None,
                cached_prompt_fraction=round(cached / prompt_tokens, 3), prompt_tokens=prompt_tokens,
                output_tokens=out_tokens, secs=round(secs, 2))


def run_multiturn(args, engine_kwargs: dict) -> dict:
    from heron import LLM
    from heron.bench.workloads import wait_for_kv_pool
    from heron.bench.throughput import save_result

    if args.turns < 2:
        raise ValueError(f"--turns must be >= 2 (later turns are what is measured); got {args.turns}")
    modes = [engine_kwargs.get("enable_prefix_caching", True)]
    if not args.no_compare:
        modes = [True, False]
    result: dict = dict(engine="heron", workload="multiturn", conversations=args.conversations, turns=args.turns,
                        system_len=args.system_len, user_len=args.user_len, answer_len=args.answer_len)
    for on in modes:
        kwargs = dict(engine_kwargs, enable_prefix_caching=on)
        if not on:
            kwargs.update(kv_offload_dir=None, kv_offload_cpu_gib=0.0)
        if not args.quiet:
            print(f"prefix caching {'on' if on else 'off'}:", file=sys.stderr)
        llm = LLM(model=args.model, **kwargs)
        wait_for_kv_pool(llm)
        r = replay(llm, args, llm.tokenizer.bos_token_id)
        llm.engine.shutdown()
        result["cache_on" if on else "cache_off"] = r
        result["dtype"] = str(llm.engine.config.torch_dtype).replace("torch.", "")
        del llm
    if "cache_on" in result and "cache_off" in result:
        on, off = result["cache_on"]["mean_ttft_later_turns_ms"], result["cache_off"]["mean_ttft_later_turns_ms"]
        result["later_turn_ttft_ratio"] = round(on / off, 3)
    save_result(result, args.output, "heron_multiturn.json")
    return result
