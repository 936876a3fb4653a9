"""The synchronous engine: add requests, call step() until done.

step() = Scheduler.schedule() -> ModelRunner.execute() -> Scheduler.update() -> detokenize
and stop strings -> RequestOutputs for the requests that changed.
"""
from __future__ import annotations

import atexit
import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from heron.config import EngineConfig
from heron.core.kv_cache_manager import KVCacheManager
from heron.core.scheduler import Scheduler
from heron.engine.detokenizer import IncrementalDetokenizer
from heron.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from heron.request import FINISH_REASONS, Request, RequestStatus
from heron.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class RequestGroup:
    """A user request: one prompt, `n` samples (each a scheduler Request)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    children: list[Request]
    detokenizers: list[IncrementalDetokenizer]
    texts: list[str]
    arrival_time: float
    prompt_logprobs: list | None = None
    finished: bool = False


def _to_position_logprobs(tlp, tokenizer) -> dict[int, Logprob]:
    """TokenLogprobs -> {token_id: Logprob}, the chosen token first, then the top-k."""
    entries = {tlp.token_id: Logprob(tlp.logprob, tlp.rank, tokenizer.decode([tlp.token_id]))}
    for rank, (tid, lp) in enumerate(tlp.top, start=1):
        if tid not in entries:
            entries[tid] = Logprob(lp, rank, tokenizer.decode([tid]))
    return entries


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        from heron.models.loader import iter_weights, load_config, load_tokenizer, resolve_model
        from heron.models.registry import get_model_class
        from heron.runner.model_runner import ModelRunner

        self.config = config
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        if config.torch_device.type == "cpu":
            from heron.ops.cpu_memory import tune_malloc
            tune_malloc()   # big per-step temporaries reuse memory instead of faulting in fresh pages
        torch.manual_seed(config.seed)
        t0 = time.monotonic()
        self.source = resolve_model(config.model)
        self.hf_config = load_config(self.source)
        # Every import the model side needs happens on this thread first (the model's modules,
        # and on CPU the kernel extension, whose build imports torch.utils.cpp_extension and
        # setuptools, which patches the import machinery): once, importing those while another
        # thread imported the model failed with "No module named heron.layers.linear". After
        # that only the tokenizer's construction (2-3 s, mostly outside the GIL) runs on a second
        # thread, while this one reads the weights.
        get_model_class(self.hf_config)
        if config.torch_device.type == "cpu" and config.attention_backend in ("auto", "cpu"):
            from heron.ops.cpu import load_kernel
            load_kernel()
        with ThreadPoolExecutor(1, thread_name_prefix="heron-tokenizer") as pool:
            tokenizer = pool.submit(load_tokenizer, self.source) if config.tokenizer is None else \
                pool.submit(_load_tokenizer_dir, config.tokenizer)
            weights = iter_weights(self.source, config.torch_dtype, progress=config.load_progress)
            self.runner = ModelRunner(config, self.hf_config, weights)
            self.tokenizer = tokenizer.result()
        model_max = int(getattr(self.hf_config, "max_position_embeddings", 0) or 0) or 2048
        if config.max_model_len is not None and config.max_model_len > model_max:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's maximum of {model_max}")
        self.max_model_len = config.max_model_len or model_max
        num_blocks = self.runner.allocate_kv_cache(config.kv_cache_memory, config.num_kv_blocks)
        if self.runner.needs_smoothquant:
            from heron.quant.w8a8 import smoothquant_model
            t1 = time.monotonic()
            self.runner.quant_summary = smoothquant_model(self.runner, self.tokenizer, config.smoothquant_alpha)
            self.runner.needs_smoothquant = False
            alphas = list(self.runner.quant_summary["alphas"].values())
            logger.info("w8a8 with SmoothQuant (alpha %s: %.2f-%.2f over %d layers, mean %.2f): calibrated on %d "
                        "tokens in %.1fs", config.smoothquant_alpha, min(alphas), max(alphas), len(alphas),
                        sum(alphas) / len(alphas), self.runner.quant_summary["calibration_tokens"],
                        time.monotonic() - t1)
        self.kv_tiers = self._make_kv_tiers()
        self.kv_cache_manager = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching,
                                               self.kv_tiers)
        self.scheduler = Scheduler(self.kv_cache_manager, config.max_num_batched_tokens, config.max_num_seqs,
                                   self.max_model_len)
        self.eos_token_ids = self._eos_ids()
        self.spec = None
        if config.speculative is not None:
            from heron.spec import make_speculator
            self.spec = make_speculator(config, self)
        self.groups: dict[str, RequestGroup] = {}
        self._child_to_group: dict[str, RequestGroup] = {}
        self._ids = itertools.count()
        self.num_steps = 0
        self.load_time = time.monotonic() - t0
        logger.info("engine ready in %.1fs: %s, %s, %d KV blocks of %d tokens", self.load_time, self.source.name,
                    config.torch_dtype, num_blocks, config.block_size)

    def _make_kv_tiers(self) -> list:
        """The prefix cache's lower tiers: CPU memory (--kv-offload-cpu-gib), then disk (--kv-offload-dir)."""
        cfg = self.config
        if not cfg.enable_prefix_caching or not (cfg.kv_offload_dir or cfg.kv_offload_cpu_gib):
            return []
        from heron.core.kv_tiers import DiskKVTier, KVLayout, MemoryKVTier
        model = self.runner.model
        code_dtype = self.runner.kv_code_dtype   # an 8-bit cache: codes + a float32 scale per row
        # the weights as run: a quantized model's KV differs from the same files' in bf16
        from heron.quant.apply import QUANT_REVISION
        quant = "" if cfg.quantization is None else (f"|{cfg.quantization}:{cfg.quantization_group_size}:"
                                                     f"{cfg.quantization_lm_head}:{cfg.smoothquant_alpha}"
                                                     f":r{QUANT_REVISION}")
        layout = KVLayout(model_id=_model_fingerprint(self.source) + quant, dtype=code_dtype or cfg.torch_dtype,
                          num_layers=self.runner.num_layers, block_size=cfg.block_size,
                          num_kv_heads=model.num_kv_heads, head_dim=model.head_dim,
                          scale_dtype=None if code_dtype is None else torch.float32)
        tiers: list = []
        if cfg.kv_offload_cpu_gib:
            tiers.append(MemoryKVTier(cfg.kv_offload_cpu_gib, layout))
        if cfg.kv_offload_dir:
            tiers.append(DiskKVTier(cfg.kv_offload_dir, cfg.kv_offload_gib, layout))
        for tier in tiers:
            atexit.register(tier.close)   # queued disk writes reach the disk before the process exits
        return tiers

    def shutdown(self) -> None:
        """Write out what the KV tiers still have queued and stop their threads (idempotent)."""
        for tier in self.kv_tiers:
            tier.close()
        if self.runner.kv_prefault is not None:
            self.runner.kv_prefault.stop()

    def kv_tier_stats(self) -> dict[str, dict[str, int]]:
        return {tier.name: tier.stats() for tier in self.kv_tiers}

    def reset_prefix_cache(self) -> int:
        """Forget the cached blocks no request holds (the lower tiers keep theirs)."""
        return self.kv_cache_manager.reset_prefix_cache()

    # ---- requests ---------------------------------------------------------------------
    def _eos_ids(self) -> frozenset[int]:
        """EOS ids: the config's, the tokenizer's, an HF folder's generation_config.json (as vLLM
        reads it), and for Gemma GGUFs `<end_of_turn>`, which Gemma's generation config lists."""
        ids: set[int] = set()

        def add(value) -> None:
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(x) for x in value)

        add(getattr(self.hf_config, "eos_token_id", None))
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        if self.source.kind == "hf":
            gen_cfg = self.source.path / "generation_config.json"
            if gen_cfg.is_file():
                import json
                add(json.loads(gen_cfg.read_text()).get("eos_token_id"))
        elif str(getattr(self.hf_config, "model_type", "")).startswith("gemma"):
            end_of_turn = self.tokenizer.convert_tokens_to_ids("<end_of_turn>")
            if isinstance(end_of_turn, int) and end_of_turn != self.tokenizer.unk_token_id:
                ids.add(end_of_turn)
        return frozenset(ids)

    def tokenize(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def new_request_id(self) -> str:
        return str(next(self._ids))

    def add_request(self, request_id: str | None, prompt: str | list[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None, cache_salt: str | None = None) -> str:
        """Validate and queue a request; returns its id. Raises ValueError on bad input.
        Requests with different `cache_salt`s never share cached KV (tenant isolation)."""
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else self.new_request_id()
        if request_id in self.groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            text, token_ids = prompt, self.tokenize(prompt)
        else:
            text, token_ids = None, [int(t) for t in prompt]
        self._validate_prompt(token_ids)
        room = self.max_model_len - len(token_ids)
        max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        children, detoks = [], []
        for i in range(params.n):
            child_params = params
            gen = None
            if params.seed is not None:
                gen = torch.Generator(device=self.runner.device).manual_seed(params.seed + i)
            child = Request(
                request_id=request_id if params.n == 1 else f"{request_id}#{i}",
                prompt_token_ids=token_ids, sampling_params=child_params, eos_token_ids=self.eos_token_ids,
                max_tokens=max_tokens, arrival_time=arrival, parent_id=request_id, index=i,
                fork_source=children[0] if i > 0 else None, generator=gen, cache_salt=cache_salt)
            if i > 0:
                child.num_prompt_logprobs_done = len(token_ids)  # the first sample reports them
            children.append(child)
            detoks.append(IncrementalDetokenizer(self.tokenizer, token_ids, params))
        group = RequestGroup(request_id, text, token_ids, params, children, detoks, [""] * params.n, arrival)
        if params.prompt_logprobs is not None:
            group.prompt_logprobs = [None]
        for child in children:
            self.scheduler.add_request(child)
            self._child_to_group[child.request_id] = group
        self.groups[request_id] = group
        return request_id

    def _validate_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("prompt is empty; give at least one token")
        vocab = self.runner.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {vocab}); got {bad[:5]}")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(token_ids)} tokens but the maximum model length is "
                             f"{self.max_model_len} (prompt plus at least one generated token); shorten the prompt")

    def abort_request(self, request_id: str) -> None:
        group = self.groups.pop(request_id, None)
        if group is None:
            return
        for child in group.children:
            self.scheduler.finish_request(child, RequestStatus.FINISHED_ABORTED)
            self._child_to_group.pop(child.request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.groups)

    # ---- the step ---------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched_out = self.scheduler.schedule()
        if sched_out.is_empty:
            if self.scheduler.has_unfinished_requests():
                # cannot happen by construction (add_request checks that a request fits the
                # pool); fail loudly rather than spin forever
                raise RuntimeError(f"scheduler made no progress with {len(self.scheduler.waiting)} waiting and "
                                   f"{len(self.scheduler.running)} running requests")
            return []
        runner_out = self.runner.execute(sched_out)
        self.num_steps += 1
        for rid, entries in runner_out.prompt_logprobs.items():
            group = self._child_to_group[rid]
            if group.prompt_logprobs is not None:
                group.prompt_logprobs.extend(_to_position_logprobs(e, self.tokenizer) for e in entries)
        got_token = self.scheduler.update(sched_out, runner_out.sampled)
        if self.kv_cache_manager.pending_offload:
            self._offload_blocks()
        touched: dict[str, RequestGroup] = {}
        for request, count in got_token:
            group = self._child_to_group[request.request_id]
            touched[group.request_id] = group
            lps = runner_out.logprobs.get(request.request_id)
            first = request.num_output_tokens - count
            for j in range(count):
                if lps is not None:
                    request.output_logprobs.append(_to_position_logprobs(lps[j], self.tokenizer))
                    request.cumulative_logprob += lps[j].logprob
                if self._detokenize(group, request, first + j, j == count - 1):
                    break   # a stop string ended the request at this token
        if self.spec is not None:
            self.spec.update_stats(sched_out, runner_out.sampled)
            self.spec.propose(self.scheduler.running)
        outputs = []
        for group in touched.values():
            out = self._make_output(group)
            outputs.append(out)
            if out.finished:
                self._retire(group)
        return outputs

    def _offload_blocks(self) -> None:
        """Write the blocks computed this step through to the lower tiers (copied now, before
        a later step can reuse them; the disk tier writes its files on its own thread)."""
        for bid, block_hash, prefix, extra in self.kv_cache_manager.take_pending_offload():
            payload = self.runner.read_block(bid)
            for tier in self.kv_tiers:
                tier.store(block_hash, prefix, extra, payload)

    def _detokenize(self, group: RequestGroup, request: Request, index: int, last: bool) -> bool:
        """Detokenize output token `index` (`last`: the newest). True when a stop string ended
        the request there; tokens after it (accepted in the same speculative step) are dropped."""
        detok = group.detokenizers[request.index]
        token = request.output_token_ids[index]
        ended = last and request.is_finished
        # like vLLM: the EOS / stop token that ended the request is not part of the text
        new = [] if ended and request.status == RequestStatus.FINISHED_STOPPED else [token]
        delta = detok.add_tokens(new) if new else ""
        if ended or detok.stopped:
            delta += detok.finish() if not detok.stopped else ""
        group.texts[request.index] += delta
        if not detok.stopped:
            return False
        request.stop_reason = detok.stop_reason
        if not last:
            request.truncate_output(index + 1)
        if request.is_finished:
            request.status = RequestStatus.FINISHED_STOPPED  # a stop string wins over the length limit
        else:
            self.scheduler.finish_request(request, RequestStatus.FINISHED_STOPPED)
        return True

    def _make_output(self, group: RequestGroup) -> RequestOutput:
        completions = []
        for req in group.children:
            completions.append(CompletionOutput(
                index=req.index, text=group.texts[req.index], token_ids=list(req.output_token_ids),
                cumulative_logprob=req.cumulative_logprob if group.params.logprobs is not None else None,
                logprobs=list(req.output_logprobs) if group.params.logprobs is not None else None,
                finish_reason=FINISH_REASONS.get(req.status), stop_reason=req.stop_reason))
        first = group.children[0]
        metrics = RequestMetrics(
            arrival_time=group.arrival_time,
            first_scheduled_time=min((c.first_scheduled_time for c in group.children if c.first_scheduled_time),
                                     default=None),
            first_token_time=min((c.first_token_time for c in group.children if c.first_token_time), default=None),
            last_token_time=max((c.last_token_time for c in group.children if c.last_token_time), default=None),
            finished_time=max((c.finished_time or 0.0) for c in group.children) or None,
            num_generated_tokens=first.num_output_tokens)
        finished = all(c.is_finished for c in group.children)
        return RequestOutput(request_id=group.request_id, prompt=group.prompt,
                             prompt_token_ids=group.prompt_token_ids, outputs=completions, finished=finished,
                             prompt_logprobs=group.prompt_logprobs, metrics=metrics,
                             num_cached_tokens=first.num_cached_tokens or 0)

    def _retire(self, group: RequestGroup) -> None:
        self.groups.pop(group.request_id, None)
        for child in group.children:
            self._child_to_group.pop(child.request_id, None)


def _model_fingerprint(source) -> str:
    """Identifies the weights for the disk tier, so that another model never reads these blocks."""
    from heron.models.loader.tokenizer import file_fingerprint
    files = [source.path] if source.path.is_file() else sorted(source.path.glob("*.safetensors"))
    return f"{source.name}:" + ",".join(file_fingerprint(f, "kv-tier") for f in files)


def _load_tokenizer_dir(path: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)
