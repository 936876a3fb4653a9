"""A request as the scheduler sees it: token ids, how many of them have KV computed, its blocks."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from heron.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3      # EOS, stop token id or stop string
    FINISHED_LENGTH = 4       # max_tokens or the model's length limit
    FINISHED_ABORTED = 5

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass(eq=False)
class Request:
    """One sequence being generated. With `n > 1` each of the n samples is its own Request
    (`parent_id` groups them, `index` orders them); samples after the first fork the first
    one's prompt KV instead of recomputing it (`fork_source`)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int]
    max_tokens: int                              # resolved: params.max_tokens or room left in the model
    arrival_time: float = field(default_factory=time.monotonic)
    parent_id: str | None = None
    index: int = 0
    fork_source: Request | None = None
    generator: torch.Generator | None = None
    priority: int = 0
    cache_salt: str | None = None                # requests with different salts never share cached KV

    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    # prompt logprobs are produced once, even if the prompt is recomputed after a preemption
    num_prompt_logprobs_done: int = 0
    prompt_logprobs: list = field(default_factory=list)
    output_logprobs: list = field(default_factory=list)
    cumulative_logprob: float = 0.0
    # prefix cache
    block_hashes: list[bytes] = field(default_factory=list)   # chained hashes of the full blocks so far
    num_registered_blocks: int = 0               # leading blocks registered in the prefix cache
    num_cached_tokens: int | None = None         # prompt tokens served from cache at first admission
    num_times_passed: int = 0                    # times later requests were admitted first (cache-aware order)
    # speculative decoding
    spec_token_ids: list[int] = field(default_factory=list)   # draft tokens to verify in the next step
    spec_parents: list[int] | None = None        # a token tree's parent per draft (heron.spec.tree); None: a chain
    spec_state: object = None                    # the proposer's per-request state (e.g. an n-gram index)
    num_spec_proposed: int = 0                   # draft tokens verified so far
    num_spec_accepted: int = 0                   # ... of which the target accepted
    spec_accept_ema: float | None = None         # recent accepted drafts per step (sets the next length)

    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids)

    @property
    def cache_key(self) -> bytes:
        """Extra bytes folded into the first block's hash (the cache salt)."""
        return self.cache_salt.encode() if self.cache_salt else b""

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def truncate_output(self, num_output_tokens: int) -> None:
        """Drop output tokens after the first `num_output_tokens` (a stop string ended the
        request inside a run of tokens accepted in one speculative step)."""
        del self.output_token_ids[num_output_tokens:]
        del self.all_token_ids[self.num_prompt_tokens + num_output_tokens:]
        del self.output_logprobs[num_output_tokens:]
