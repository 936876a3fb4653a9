"""`heron bench spec`: single-stream decode speed with and without speculative decoding, in
one process (the same engine, speculation switched on and off between runs, in alternation),
on two tasks:

- `grounded`: the prompt holds a passage of the shipped English text (heron/eval/data, the
  Gemma terms of use) and asks for it to be repeated word for word; the answer quotes the
  prompt, which is where prompt lookup (`--speculative ngram`) pays;
- `free`: W2's prompt (256 random token ids), free generation.

Greedy decoding, EOS ignored, a fixed number of output tokens; the outputs with and without
speculation must be identical (checked and reported). Prints a table and one JSON line with
decode ms/token for both, the speed-up, the acceptance rate and the mean tokens per
verifying step.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

from heron.bench.throughput import save_result

TASKS = ("grounded", "free")
PASSAGE_CHARS = 1800


def grounded_prompt(llm) -> str | list[int]:
    text = (Path(__file__).resolve().parent.parent / "eval" / "data" / "eval_text.txt").read_text()
    passage = text[:PASSAGE_CHARS].rsplit("\n", 1)[0]
    ask = "Repeat the following text exactly, word for word:\n\n" + passage
    tok = llm.get_tokenizer()
    if getattr(tok, "chat_template", None):
        return llm.apply_chat_template([{"role": "user", "content": ask}])
    return ask + "\n\nThe text again, word for word:\n\n"


def _prompt(llm, task: str):
    if task == "grounded":
        return grounded_prompt(llm)
    from heron.bench.workloads import make_prompts
    prompt = make_prompts("W2", 1)[0][0]
    vocab = llm.engine.runner.vocab_size
    if max(prompt) >= vocab:                 # a small test vocabulary: fold the ids into it
        prompt = [3 + t % (vocab - 3) for t in prompt]
    bos = llm.tokenizer.bos_token_id
    return ([bos] if bos is not None else []) + prompt


def run_spec_bench(args, engine_kwargs: dict) -> dict:
    from heron import LLM, SamplingParams
    from heron.bench.workloads import wait_for_kv_pool

    if args.iters < 1:
        raise ValueError(f"--iters must be at least 1, got {args.iters}")
    if args.output_len < 2:
        raise ValueError(f"--output-len must be at least 2, got {args.output_len}")
    if not engine_kwargs.get("speculative"):
        engine_kwargs = dict(engine_kwargs, speculative="ngram")
    tasks = TASKS if args.task == "both" else (args.task,)
    llm = LLM(model=args.model, **engine_kwargs)
    eng = llm.engine
    spec = eng.spec
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, min_tokens=args.output_len, ignore_eos=True)
    llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)   # warm-up
    wait_for_kv_pool(llm)

    result = dict(engine="heron", bench="spec", speculative=eng.config.speculative,
                  num_speculative_tokens=eng.config.num_speculative_tokens,
                  tree_width=eng.config.speculative_tree_width,
                  dtype=str(eng.config.torch_dtype).replace("torch.", ""), quantization=eng.config.quantization,
                  output_tokens=args.output_len, iters=args.iters, tasks={})
    for task in tasks:
        prompt = _prompt(llm, task)
        runs = {"off": [], "on": []}
        outputs = {}
        before = (spec.stats.num_steps, spec.stats.num_proposed, spec.stats.num_accepted, spec.stats.num_emitted)
        for _ in range(args.iters):
            for mode in ("off", "on"):
                eng.spec = spec if mode == "on" else None
                eng.reset_prefix_cache()
                t0 = time.perf_counter()
                out = llm.generate([prompt], params, use_tqdm=False)[0]
                secs = time.perf_counter() - t0
                ttft = out.metrics.time_to_first_token
                gen = len(out.outputs[0].token_ids)
                runs[mode].append(1000 * (secs - ttft) / (gen - 1))
                outputs.setdefault(mode, out.outputs[0].token_ids)
        eng.spec = spec
        steps, proposed, accepted, emitted = (a - b for a, b in zip(
            (spec.stats.num_steps, spec.stats.num_proposed, spec.stats.num_accepted, spec.stats.num_emitted), before))
        off, on = statistics.median(runs["off"]), statistics.median(runs["on"])
        row = dict(prompt_tokens=len(out.prompt_token_ids),
                   decode_ms_off=round(off, 2), decode_ms_on=round(on, 2), speedup=round(off / on, 2),
                   decode_tok_s_off=round(1000 / off, 2), decode_tok_s_on=round(1000 / on, 2),
                   acceptance_rate=round(accepted / proposed, 3) if proposed else 0.0,
                   tokens_per_step=round(emitted / steps, 2) if steps else 0.0,
                   identical=outputs["on"] == outputs["off"])
        result["tasks"][task] = row
        if not args.quiet:
            print(f"{task:<10} prompt {row['prompt_tokens']:>5} tok   decode {off:6.2f} -> {on:6.2f} ms/token "
                  f"({row['speedup']:.2f}x)   acceptance {row['acceptance_rate']:.2f}   "
                  f"{row['tokens_per_step']:.2f} tokens/verify step   identical outputs: "
                  f"{'yes' if row['identical'] else 'NO'}", file=sys.stderr)
    save_result(result, args.output, "heron_spec.json")
    return result
