"""The offline API, shaped like vLLM's `LLM` so that users can switch without rewriting."""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from heron.config import EngineConfig
from heron.engine.chat_templates import fallback_chat_template
from heron.engine.engine import Engine
from heron.outputs import RequestOutput
from heron.sampling_params import SamplingParams

PromptType = str | list[int] | dict


class LLM:
    """`LLM(model=None)` loads the embedded default model (Gemma 3 270M).

    Engine options are keyword arguments with the same names as the CLI flags
    (`dtype`, `block_size`, `kv_cache_memory`, `max_num_batched_tokens`, `max_num_seqs`,
    `max_model_len`, `seed`, `device`, `num_threads`, ...)."""

    def __init__(self, model: str | None = None, dtype: str = "auto", **kwargs: Any) -> None:
        self.engine = Engine(EngineConfig(model=model, dtype=dtype, **kwargs))
        self.tokenizer = self.engine.tokenizer

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Run prompts (strings, token-id lists, or dicts with `prompt` / `prompt_token_ids`) to
        completion and return one RequestOutput each, in the order given."""
        prompt_list = _normalise_prompts(prompts)
        if sampling_params is None:
            params_list = [SamplingParams()] * len(prompt_list)
        elif isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(f"got {len(prompt_list)} prompts but {len(params_list)} sampling_params; "
                                 "pass one SamplingParams or one per prompt")
        ids = []
        try:
            for prompt, params in zip(prompt_list, params_list):
                ids.append(self.engine.add_request(None, prompt, params))
        except Exception:
            for rid in ids:  # a bad prompt leaves nothing half-queued
                self.engine.abort_request(rid)
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Apply the tokenizer's chat template (or `chat_template`) to one conversation or a list
        of them and generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [self.apply_chat_template(c, chat_template, add_generation_prompt) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def apply_chat_template(self, messages: list[dict], chat_template: str | None = None,
                            add_generation_prompt: bool = True) -> list[int]:
        template = chat_template or getattr(self.tokenizer, "chat_template", None) or \
            fallback_chat_template(getattr(self.engine.hf_config, "model_type", None))
        if template is None:
            raise ValueError("this model's tokenizer has no chat template; pass chat_template=... (a Jinja string)")
        text = self.tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finals: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm
            bar = tqdm(total=len(ids), desc="Generating", unit="req", dynamic_ncols=True)
        t0, out_tokens = time.monotonic(), 0
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    finals[out.request_id] = out
                    out_tokens += sum(len(c.token_ids) for c in out.outputs)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix_str(f"{out_tokens / max(time.monotonic() - t0, 1e-9):.1f} out tok/s")
        if bar is not None:
            bar.close()
        return [finals[i] for i in ids]


def _normalise_prompts(prompts) -> list[str | list[int]]:
    if isinstance(prompts, (str, dict)):
        prompts = [prompts]
    elif isinstance(prompts, list) and prompts and isinstance(prompts[0], int):
        prompts = [prompts]
    out = []
    for p in prompts:
        if isinstance(p, dict):
            if "prompt_token_ids" in p:
                out.append(list(p["prompt_token_ids"]))
            elif "prompt" in p:
                out.append(p["prompt"])
            else:
                raise ValueError("a dict prompt needs 'prompt' or 'prompt_token_ids'")
        elif isinstance(p, str):
            out.append(p)
        elif isinstance(p, (list, tuple)) and all(isinstance(t, int) for t in p):
            out.append(list(p))
        else:
            raise ValueError(f"prompts must be strings or lists of token ids; got {type(p).__name__}")
    return out
