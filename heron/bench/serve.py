"""`heron bench serve`: a load generator for any OpenAI-compatible server (like `vllm bench serve`).

Random prompts (token ids, `--input-len` each) arrive as a Poisson process at `--request-rate`
(gamma-distributed gaps with `--burstiness` != 1), at most `--max-concurrency` in flight; every
request streams, and the client records time to first token (TTFT), inter-token latencies (ITL:
gaps between streamed chunks), time per output token (TPOT = (E2E - TTFT) / (tokens - 1)) and
end-to-end latency (E2E). Output token counts come from the server's usage numbers. It prints
a table and saves the numbers as JSON; `--goodput ttft:500 tpot:100` counts the requests that
meet every given SLO (milliseconds).
"""
from __future__ import annotations

import asyncio
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

WORKLOADS = {  # shared/BENCHMARKS.md W3
    "W3": dict(num_prompts=64, input_len=256, output_len=128, request_rate=2.0),
}


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def _headers(api_key: str | None) -> dict:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


async def send_request(session, url: str, payload: dict, api_key: str | None, prompt_len: int) -> RequestResult:
    """One streaming request; timings from the client's side."""
    result = RequestResult(prompt_len=prompt_len)
    t0 = time.perf_counter()
    last = t0
    got_first = False
    chunks = 0
    try:
        async with session.post(url, json=payload, headers=_headers(api_key)) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return result
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    result.error = f"stream error: {obj['error'].get('message', obj['error'])}"
                    return result
                if obj.get("choices"):
                    now = time.perf_counter()
                    if not got_first:
                        got_first = True
                        result.ttft = now - t0
                    else:
                        result.itl.append(now - last)
                    last = now
                    chunks += 1
                if obj.get("usage"):
                    result.output_tokens = int(obj["usage"].get("completion_tokens") or 0)
        result.latency = time.perf_counter() - t0
        if not got_first:
            result.error = "the stream ended without any output"
            return result
        if result.output_tokens == 0:
            result.output_tokens = chunks
        result.ok = True
    except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
        result.error = f"{type(e).__name__}: {e}"
    return result


def _stats(values: list[float], percentiles: list[float], scale: float = 1000.0) -> dict:
    if not values:
        return {"mean": None, "median": None, **{f"p{_pname(p)}": None for p in percentiles}}
    arr = np.asarray(values) * scale
    out = {"mean": float(arr.mean()), "median": float(np.median(arr)), "std": float(arr.std())}
    for p in percentiles:
        out[f"p{_pname(p)}"] = float(np.percentile(arr, p))
    return out


def _pname(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(p)


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    slos = {}
    for item in items or []:
        key, _, value = item.partition(":")
        if key not in ("ttft", "tpot", "e2el") or not value:
            raise ValueError(f"--goodput takes KEY:MILLISECONDS with KEY in ttft, tpot, e2el; got {item!r}")
        slos[key] = float(value)
    return slos


def meets_slos(r: RequestResult, slos: dict[str, float]) -> bool:
    if not r.ok:
        return False
    values = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2el": r.latency}
    return all(values[k] * 1000.0 <= v for k, v in slos.items())


def summarize(results: list[RequestResult], duration: float, percentiles: list[float],
              slos: dict[str, float]) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    summary = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": out_tokens / duration if duration else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if duration else 0.0,
        "ttft_ms": _stats([r.ttft for r in ok], percentiles),
        "tpot_ms": _stats([t for r in ok if (t := r.tpot) is not None], percentiles),
        "itl_ms": _stats([x for r in ok for x in r.itl], percentiles),
        "e2el_ms": _stats([r.latency for r in ok], percentiles),
    }
    if slos:
        good = sum(1 for r in results if meets_slos(r, slos))
        summary["goodput_slos_ms"] = slos
        summary["goodput"] = good / duration if duration else 0.0
        summary["goodput_fraction"] = good / len(results) if results else 0.0
    errors = [r.error for r in results if not r.ok]
    if errors:
        summary["errors"] = errors[:10]
    return summary


def print_table(s: dict, percentiles: list[float]) -> None:
    w = 50
    print("=" * w)
    print(f"{'Serving Benchmark Result':^{w}}")
    print("=" * w)
    rows = [("Successful requests:", s["completed"]), ("Failed requests:", s["failed"]),
            ("Benchmark duration (s):", f"{s['duration_s']:.2f}"),
            ("Total input tokens:", s["total_input_tokens"]), ("Total generated tokens:", s["total_output_tokens"]),
            ("Request throughput (req/s):", f"{s['request_throughput']:.2f}"),
            ("Output token throughput (tok/s):", f"{s['output_throughput']:.2f}"),
            ("Total token throughput (tok/s):", f"{s['total_token_throughput']:.2f}")]
    if "goodput" in s:
        rows.append(("Request goodput (req/s):", f"{s['goodput']:.2f}"))
    for k, v in rows:
        print(f"{k:<40}{v:>10}")
    for key, title in (("ttft_ms", "Time to First Token"), ("tpot_ms", "Time per Output Token (excl. 1st token)"),
                       ("itl_ms", "Inter-token Latency"), ("e2el_ms", "End-to-end Latency")):
        st = s[key]
        print(f"{title:-^{w}}")
        name = key.split("_")[0].upper()
        for label, stat in [("Mean", "mean"), ("Median", "median")] + [(f"P{_pname(p)}", f"p{_pname(p)}")
                                                                        for p in percentiles]:
            v = st.get(stat)
            print(f"{f'{label} {name} (ms):':<40}{('-' if v is None else f'{v:.2f}'):>10}")
    print("=" * w)
    for err in s.get("errors", [])[:3]:
        print(f"error: {err}", file=sys.stderr)


async def _get_json(session, url: str, api_key: str | None) -> dict:
    async with session.get(url, headers=_headers(api_key)) as resp:
        resp.raise_for_status()
        return await resp.json()


def _arrival_gaps(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> list[float]:
    if math.isinf(rate):
        return [0.0] * n
    theta = 1.0 / (rate * burstiness)  # gamma(shape=burstiness) gaps with mean 1/rate; 1.0 = Poisson
    return rng.gamma(shape=burstiness, scale=theta, size=n).tolist()


async def run_benchmark(args) -> dict:
    import aiohttp

    base = args.base_url.rstrip("/")
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=60)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector, trust_env=False) as session:
        models = await _get_json(session, f"{base}/v1/models", args.api_key)
        card = models["data"][0]
        model = args.model or card["id"]
        server_engine = card.get("owned_by") or "unknown"
        vocab = card.get("vocab_size") or args.vocab_size
        if vocab is None:
            raise ValueError("the server does not report vocab_size in /v1/models; pass --vocab-size")
        rng = random.Random(args.seed)
        lo = min(1000, vocab // 10)
        prompts = []
        for _ in range(args.num_prompts):
            n_in = max(1, round(args.input_len * rng.uniform(1 - args.range_ratio, 1 + args.range_ratio)))
            n_out = max(1, round(args.output_len * rng.uniform(1 - args.range_ratio, 1 + args.range_ratio)))
            prompts.append(([rng.randrange(lo, vocab) for _ in range(n_in)], n_out))
        chat = args.endpoint.rstrip("/").endswith("chat/completions")
        url = base + args.endpoint

        async def payload(ids: list[int], n_out: int) -> dict:
            body = {"model": model, "max_tokens": n_out, "stream": True, "temperature": 0.0,
                    "stream_options": {"include_usage": True}, "ignore_eos": args.ignore_eos}
            if chat:
                async with session.post(f"{base}/detokenize", json={"tokens": ids},
                                        headers=_headers(args.api_key)) as resp:
                    text = (await resp.json())["prompt"]
                body["messages"] = [{"role": "user", "content": text}]
            else:
                body["prompt"] = ids
            return body

        bodies = [await payload(ids, n_out) for ids, n_out in prompts]
        if not args.no_warmup:
            warm = await send_request(session, url, dict(bodies[0], max_tokens=4), args.api_key, len(prompts[0][0]))
            if not warm.ok:
                raise RuntimeError(f"the warm-up request failed: {warm.error}")
        gaps = _arrival_gaps(len(bodies), args.request_rate, args.burstiness, np.random.default_rng(args.seed))
        limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

        async def one(body: dict, prompt_len: int) -> RequestResult:
            if limit is None:
                return await send_request(session, url, body, args.api_key, prompt_len)
            async with limit:
                return await send_request(session, url, body, args.api_key, prompt_len)

        print(f"benchmarking {url}: {len(bodies)} prompts of ~{args.input_len} tokens, {args.output_len} out, "
              f"rate {args.request_rate}/s, max concurrency {args.max_concurrency or 'unlimited'}", file=sys.stderr)
        t0 = time.perf_counter()
        tasks = []
        for (ids, _), body, gap in zip(prompts, bodies, gaps):
            tasks.append(asyncio.create_task(one(body, len(ids))))
            if gap > 0:
                await asyncio.sleep(gap)
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    percentiles = [float(p) for p in args.percentiles.split(",")]
    summary = summarize(results, duration, percentiles, parse_goodput(args.goodput))
    # the fields every heron bench JSON has (shared/BENCHMARKS.md), then the details
    summary = dict(engine=server_engine, workload=args.workload or "random", secs=round(duration, 2),
                   out_tok_s=round(summary["output_throughput"], 2),
                   total_tok_s=round(summary["total_token_throughput"], 2), **summary)
    summary.update(client="heron bench serve", base_url=base, endpoint=args.endpoint, model=model,
                   num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len,
                   request_rate=args.request_rate, max_concurrency=args.max_concurrency, burstiness=args.burstiness,
                   seed=args.seed, date=time.strftime("%Y-%m-%d %H:%M:%S"))
    return summary


def run_serve_benchmark(args) -> dict:
    if args.workload:
        for key, value in WORKLOADS[args.workload].items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    defaults = dict(num_prompts=64, input_len=256, output_len=128, request_rate=math.inf)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    summary = asyncio.run(run_benchmark(args))
    print_table(summary, [float(p) for p in args.percentiles.split(",")])
    out = Path(args.output) if args.output else Path("bench_results") / f"heron_serve_{args.workload or 'random'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, default=_json_default) + "\n")
    print(f"saved {out}", file=sys.stderr)
    return summary


def _json_default(x):
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return str(x)


def add_bench_serve_args(p) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (default: http://127.0.0.1:8000)")
    p.add_argument("--endpoint", default="/v1/completions", help="/v1/completions or /v1/chat/completions")
    p.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--workload", default=None, choices=sorted(WORKLOADS),
                   help="preset: W3 = 64 prompts, 256 in, 128 out, 2 req/s (explicit flags win)")
    p.add_argument("--num-prompts", type=int, default=None, help="requests to send (default: 64)")
    p.add_argument("--input-len", type=int, default=None, help="prompt tokens (default: 256)")
    p.add_argument("--output-len", type=int, default=None, help="max_tokens per request (default: 128)")
    p.add_argument("--range-ratio", type=float, default=0.0,
                   help="lengths drawn uniformly from [len*(1-r), len*(1+r)] (default: 0)")
    p.add_argument("--request-rate", type=float, default=None,
                   help="mean arrivals per second (Poisson); inf = all at once (default: inf)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps; 1 = Poisson")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight (default: none)")
    p.add_argument("--ignore-eos", action=__import__("argparse").BooleanOptionalAction, default=True,
                   help="ask for exactly --output-len tokens (default: on)")
    p.add_argument("--goodput", nargs="*", default=None, metavar="KEY:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:100 e2el:20000 (milliseconds)")
    p.add_argument("--percentiles", default="50,90,99", help="comma-separated (default: 50,90,99)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=None, help="token-id range when the server does not say")
    p.add_argument("--timeout", type=float, default=3600.0, help="per-request timeout in seconds")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed first request")
    p.add_argument("--output", default=None, help="JSON file (default: bench_results/heron_serve_<workload>.json)")
