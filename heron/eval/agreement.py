"""`heron eval agreement`: how often a configuration's greedy output equals a reference's.

The fixed prompt set (64 prompts): the first 32 prompts of workload W1 cut to at most 64 tokens (BOS
first), and 32 passages of 48 tokens of the shipped English text (heron/eval/data/eval_text.txt)
at token offsets 0, 300, 600, ... Each prompt is decoded greedily for `--tokens` tokens (16 by
default, EOS ignored) by the reference (the same model without quantization, in
`--reference-dtype`) and by the configuration under test (the engine options given, e.g.
`--quantization int8`). A prompt agrees when all its tokens are equal. Also reported: the mean
number of leading tokens that agree.

Greedy paths of a small model part at the first near-tie, so the fraction depends on how close
the two numerics are, not only on quality; `--quantization` left out and `--reference-dtype
float32` measures the floor that bf16 rounding alone gives.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

NUM_W1 = 32
NUM_TEXT = 32
W1_LEN = 64
TEXT_LEN = 48
TEXT_STRIDE = 300


def default_prompts(tokenizer, vocab_size: int) -> list[list[int]]:
    """The fixed prompt set as token ids (see the module docstring)."""
    from heron.bench.workloads import make_prompts
    from heron.eval.perplexity import default_eval_text
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    w1, _ = make_prompts("W1", NUM_W1)
    prompts = [bos + [t % vocab_size for t in p[:W1_LEN - len(bos)]] for p in w1]
    ids = tokenizer.encode(default_eval_text(), add_special_tokens=False)
    need = (NUM_TEXT - 1) * TEXT_STRIDE + TEXT_LEN
    if len(ids) < need:
        raise ValueError(f"the eval text has {len(ids)} tokens with this tokenizer; the prompt set needs {need}")
    prompts += [bos + ids[i * TEXT_STRIDE:i * TEXT_STRIDE + TEXT_LEN] for i in range(NUM_TEXT)]
    return prompts


def greedy_tokens(llm, prompts: list[list[int]], num_tokens: int) -> list[list[int]]:
    from heron import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=num_tokens, min_tokens=num_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def compare(reference: list[list[int]], candidate: list[list[int]]) -> dict:
    """Agreement of two sets of greedy outputs, prompt by prompt."""
    if len(reference) != len(candidate):
        raise ValueError("compare: the two runs have different prompt counts")
    common = []
    for ref, cand in zip(reference, candidate):
        n = 0
        while n < min(len(ref), len(cand)) and ref[n] == cand[n]:
            n += 1
        common.append(n)
    agree = sum(1 for n, ref, cand in zip(common, reference, candidate) if n == len(ref) == len(cand))
    if not reference:
        return dict(prompts=0, agree=0, agree_fraction=None, mean_common_prefix=None)
    return dict(prompts=len(reference), agree=agree, agree_fraction=round(agree / len(reference), 3),
                mean_common_prefix=round(sum(common) / len(common), 2))


def run_agreement(args, engine_kwargs: dict) -> dict:
    from heron import LLM
    if args.tokens < 1:
        raise ValueError(f"--tokens must be at least 1, got {args.tokens}")
    # the reference: the same engine options without quantization, an 8-bit KV cache or speculation
    ref_kwargs = dict(engine_kwargs, quantization=None, dtype=args.reference_dtype, kv_cache_dtype="auto",
                      speculative=None)
    if all(ref_kwargs[k] == engine_kwargs.get(k) for k in ("quantization", "dtype", "kv_cache_dtype", "speculative")):
        raise ValueError("the configuration under test equals the reference: give --quantization, "
                         "--kv-cache-dtype, --speculative, or a --reference-dtype other than --dtype")
    runs = {}
    for name, kwargs in (("reference", ref_kwargs), ("candidate", engine_kwargs)):
        llm = LLM(model=args.model, **kwargs)
        cfg = llm.engine.config
        if name == "reference":
            prompts = default_prompts(llm.tokenizer, llm.engine.runner.vocab_size)
        runs[name] = dict(dtype=str(cfg.torch_dtype).replace("torch.", ""), quantization=cfg.quantization,
                          group_size=cfg.quantization_group_size if cfg.quantization in ("int4", "int8") else None,
                          kv_cache_dtype=cfg.kv_cache_dtype, tokens=greedy_tokens(llm, prompts, args.tokens))
        llm.engine.shutdown()
        del llm
    ref, cand = runs["reference"], runs["candidate"]
    result = dict(reference={k: v for k, v in ref.items() if k != "tokens"},
                  candidate={k: v for k, v in cand.items() if k != "tokens"}, tokens=args.tokens)
    result.update(compare(ref["tokens"], cand["tokens"]))
    result["w1_agree"] = compare(ref["tokens"][:NUM_W1], cand["tokens"][:NUM_W1])["agree"]
    result["text_agree"] = compare(ref["tokens"][NUM_W1:], cand["tokens"][NUM_W1:])["agree"]
    line = json.dumps(result)
    print(line)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(line + "\n")
    if not args.quiet:
        print(f"{result['agree']}/{result['prompts']} prompts agree on all {args.tokens} tokens "
              f"(W1 {result['w1_agree']}/{NUM_W1}, text {result['text_agree']}/{NUM_TEXT}); "
              f"mean common prefix {result['mean_common_prefix']} tokens", file=sys.stderr)
    return result
