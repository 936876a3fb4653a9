"""Token sampling: the batched :class:`Sampler` and its logits processors."""

from heron.sample.sampler import (
    Sampler,
    SamplerOutput,
    SamplingRow,
    TokenLogprobs,
    compute_prompt_logprobs,
)

__all__ = [
    "Sampler",
    "SamplerOutput",
    "SamplingRow",
    "TokenLogprobs",
    "compute_prompt_logprobs",
]
