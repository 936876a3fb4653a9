"""`heron eval perplexity`: perplexity of a model on a fixed English text, through the engine.

The text is split into windows of `--context-len` tokens (each starting with BOS when the
tokenizer has one); every window is one request whose prompt logprobs give the log
probability of each of its tokens after the first, so all but the first token of every
window are scored, each with the window's earlier tokens as context (llama.cpp's
`perplexity` tool and lm-eval's rolling windows score the same way, up to where the windows
start). Perplexity = exp(mean negative log-likelihood).

The default text ships with heron (heron/eval/data/eval_text.txt, sources in SOURCES.md
next to it): the Gemma terms of use from the default model's package as plain text, then the
Apache-2.0 and GPL-3 license texts, about 12,000 Gemma tokens; `--text-file` scores any UTF-8
file instead.
"""
from __future__ import annotations

import html.parser
import json
import math
import re
import sys
import time
from pathlib import Path

MIN_TOKENS = 8000


class _TextOnly(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs) -> None:
        if tag in ("script", "style", "head"):
            self._skip += 1
        elif tag in ("p", "div", "li", "h1", "h2", "h3", "h4", "br", "tr"):
            self.parts.append("\n")

    def handle_endtag(self, tag) -> None:
        if tag in ("script", "style", "head") and self._skip:
            self._skip -= 1

    def handle_data(self, data) -> None:
        if not self._skip:
            self.parts.append(data)


def html_to_text(markup: str) -> str:
    parser = _TextOnly()
    parser.feed(markup)
    text = "".join(parser.parts)
    lines = [re.sub(r"[ \t\r\f\v]+", " ", line).strip() for line in text.split("\n")]
    return "\n".join(line for line in lines if line)


DEFAULT_TEXT = Path(__file__).parent / "data" / "eval_text.txt"


def default_eval_text() -> str:
    return DEFAULT_TEXT.read_text(encoding="utf-8")


def windows(token_ids: list[int], context_len: int, bos: int | None) -> list[list[int]]:
    """Consecutive windows of the text's tokens, each at most `context_len` long including BOS."""
    step = context_len - (1 if bos is not None else 0)
    if step < 1:
        raise ValueError(f"context_len must leave room for at least one text token; got {context_len}")
    out = []
    for start in range(0, len(token_ids), step):
        chunk = token_ids[start:start + step]
        out.append(([bos] if bos is not None else []) + chunk)
    return out


def perplexity(llm, text: str, context_len: int, max_tokens: int | None = None) -> dict:
    """Score `text` with `llm` (a heron LLM); returns tokens scored, mean NLL and perplexity."""
    from heron import SamplingParams
    tokenizer = llm.tokenizer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError("the text has fewer than 2 tokens; nothing to score")
    context_len = min(context_len, llm.engine.max_model_len - 1)
    wins = [w for w in windows(ids, context_len, tokenizer.bos_token_id) if len(w) >= 2]
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    t0 = time.perf_counter()
    outs = llm.generate(wins, params, use_tqdm=False)
    nll, n = 0.0, 0
    for w, out in zip(wins, outs):
        for pos in range(1, len(w)):
            entry = out.prompt_logprobs[pos]
            nll -= entry[w[pos]].logprob
            n += 1
    mean = nll / n
    return dict(text_tokens=len(ids), scored_tokens=n, windows=len(wins), context_len=context_len,
                mean_nll=round(mean, 6), perplexity=round(math.exp(mean), 4), secs=round(time.perf_counter() - t0, 2))


def run_perplexity(args, engine_kwargs: dict) -> dict:
    from heron import LLM
    text = Path(args.text_file).read_text(encoding="utf-8") if args.text_file else default_eval_text()
    # prompt logprobs materialise float32 logits per step: a smaller token budget bounds that memory
    kwargs = dict(engine_kwargs)
    kwargs["max_num_batched_tokens"] = min(kwargs.get("max_num_batched_tokens") or 512, 512)
    llm = LLM(model=args.model, **kwargs)
    cfg = llm.engine.config
    result = dict(model=llm.engine.source.name, dtype=str(cfg.torch_dtype).replace("torch.", ""),
                  quantization=cfg.quantization, group_size=cfg.quantization_group_size if cfg.quantization in ("int4", "int8")
                  else None, kv_cache_dtype=cfg.kv_cache_dtype,
                  text=args.text_file or "heron/eval/data/eval_text.txt")
    result.update(perplexity(llm, text, args.context_len, args.max_tokens))
    if not args.text_file and args.max_tokens is None and result["text_tokens"] < MIN_TOKENS:
        print(f"warning: the default text has only {result['text_tokens']} tokens with this tokenizer",
              file=sys.stderr)
    line = json.dumps(result)
    print(line)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(line + "\n")
    return result
