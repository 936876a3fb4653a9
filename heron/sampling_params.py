"""Per-request sampling parameters (vLLM-compatible names and defaults)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

# Temperatures below this are treated as greedy decoding (argmax). Dividing logits by a
# tiny temperature overflows/underflows float32 and is numerically the same as argmax
# anyway; vLLM uses the same epsilon (_SAMPLING_EPS).
GREEDY_TEMPERATURE_EPS = 1e-5

# OpenAI limits for the number of returned logprobs per position.
MAX_LOGPROBS = 20


def _is_int(value: Any) -> bool:
    # bool is a subclass of int; `n=True` is almost certainly a bug, so reject it.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) or (
        hasattr(value, "__float__") and not isinstance(value, (str, bytes, bool))
    )


def _as_float(name: str, value: Any) -> float:
    if not _is_number(value):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    out = float(value)
    if math.isnan(out):
        raise ValueError(f"{name} must not be NaN, got {value!r}")
    return out


def _as_int(name: str, value: Any) -> int:
    if not _is_int(value):
        # Accept integral floats/numpy ints (e.g. 5.0 from JSON) but nothing lossy.
        if _is_number(value) and float(value).is_integer():
            return int(value)
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)


@dataclass
class SamplingParams:
    """How to sample the output of one request.

    Names, defaults and semantics follow vLLM / the OpenAI API:

    * ``temperature``: 0 (anything below ``1e-5``) means greedy decoding (argmax); the
      ``top_p``/``top_k``/``min_p`` filters and ``seed`` are then irrelevant.
    * ``top_k``: 0 or -1 disables it (-1 is normalised to 0); ``top_k == 1`` is greedy.
    * ``top_p``: nucleus sampling, keep the smallest set of tokens whose cumulative
      probability is >= ``top_p``. ``min_p``: drop tokens whose probability is below
      ``min_p`` times the most likely token's.
    * ``presence_penalty`` / ``frequency_penalty`` (OpenAI, in [-2, 2]) act on tokens of the
      *output* only; ``repetition_penalty`` (HF/CTRL, > 0) acts on prompt + output tokens.
    * ``logit_bias``: token id -> bias in [-100, 100] added to the logits.
    * ``stop``: stop strings (the matched string is excluded from the output unless
      ``include_stop_str_in_output``). ``stop_token_ids``: extra token ids that end the
      request. ``ignore_eos``: keep generating after the model's EOS.
    * ``max_tokens``: None means "up to the model's context length" (the engine resolves
      it). ``min_tokens``: EOS and ``stop_token_ids`` are masked until this many tokens
      have been generated.
    * ``logprobs`` / ``prompt_logprobs``: number of top alternatives to return per
      position (0 = only the chosen token's logprob), at most 20.
    * ``seed``: per-request RNG seed; a seeded request samples the same tokens whatever
      else is in the batch.

    ``__post_init__`` normalises and validates; invalid values raise ``ValueError`` naming
    the parameter, the value and the allowed range.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        self._normalise()
        self._validate()

    # ------------------------------------------------------------------ normalisation
    def _normalise(self) -> None:
        self.n = _as_int("n", self.n)
        self.temperature = _as_float("temperature", self.temperature)
        self.top_p = _as_float("top_p", self.top_p)
        self.top_k = _as_int("top_k", self.top_k)
        if self.top_k == -1:  # vLLM's spelling of "disabled"
            self.top_k = 0
        self.min_p = _as_float("min_p", self.min_p)
        self.presence_penalty = _as_float("presence_penalty", self.presence_penalty)
        self.frequency_penalty = _as_float("frequency_penalty", self.frequency_penalty)
        self.repetition_penalty = _as_float("repetition_penalty", self.repetition_penalty)
        self.min_tokens = _as_int("min_tokens", self.min_tokens)
        if self.max_tokens is not None:
            self.max_tokens = _as_int("max_tokens", self.max_tokens)
        if self.logprobs is not None:
            self.logprobs = _as_int("logprobs", self.logprobs)
        if self.prompt_logprobs is not None:
            self.prompt_logprobs = _as_int("prompt_logprobs", self.prompt_logprobs)
        if self.seed is not None:
            self.seed = _as_int("seed", self.seed)
        for flag in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be a bool, got {getattr(self, flag)!r}")

        # stop: str -> [str]; None -> []
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, (list, tuple)):
            self.stop = list(self.stop)
        else:
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")

        # stop_token_ids: None -> []
        if self.stop_token_ids is None:
            self.stop_token_ids = []
        elif isinstance(self.stop_token_ids, (list, tuple, set, frozenset)):
            self.stop_token_ids = [
                _as_int("stop_token_ids", t) for t in self.stop_token_ids
            ]
        else:
            raise ValueError(
                f"stop_token_ids must be a list of token ids, got {self.stop_token_ids!r}"
            )

        # logit_bias: keys may arrive as strings from JSON ({"50256": -100}).
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError(f"logit_bias must be a dict, got {self.logit_bias!r}")
            bias: dict[int, float] = {}
            for key, value in self.logit_bias.items():
                try:
                    if isinstance(key, bool) or (
                        isinstance(key, float) and not key.is_integer()
                    ):
                        raise ValueError
                    tok = int(key)
                except (TypeError, ValueError):
                    raise ValueError(
                        f"logit_bias keys must be token ids, got {key!r}"
                    ) from None
                bias[tok] = _as_float(f"logit_bias[{tok}]", value)
            self.logit_bias = bias

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if math.isinf(self.temperature):
            raise ValueError(f"temperature must be finite, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (or -1/0 to disable), got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(
                f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"
            )
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(
                f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"
            )
        if not 0.0 < self.repetition_penalty < math.inf:
            raise ValueError(
                f"repetition_penalty must be > 0 and finite, got {self.repetition_penalty}"
            )
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 or None, got {self.max_tokens}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens must be in [0, max_tokens={self.max_tokens}], "
                f"got {self.min_tokens}"
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(
                    f"{name} must be in [0, {MAX_LOGPROBS}] or None, got {value}"
                )
        assert isinstance(self.stop, list)
        for s in self.stop:
            if not isinstance(s, str):
                raise ValueError(f"stop must contain strings, got {s!r}")
            if s == "":
                raise ValueError("stop strings must be non-empty, got ''")
        assert isinstance(self.stop_token_ids, list)
        for t in self.stop_token_ids:
            if t < 0:
                raise ValueError(f"stop_token_ids must be non-negative, got {t}")
        if self.logit_bias:
            for tok, value in self.logit_bias.items():
                if tok < 0:
                    raise ValueError(f"logit_bias token ids must be >= 0, got {tok}")
                if not -100.0 <= value <= 100.0:
                    raise ValueError(
                        f"logit_bias values must be in [-100, 100], got {value} for token {tok}"
                    )

    def verify_vocab_size(self, vocab_size: int) -> None:
        """Check the token ids in ``logit_bias``/``stop_token_ids`` against the model.

        The engine should call this when a request is added: the sampler silently ignores
        out-of-range ids rather than failing a whole batch in the hot path.
        """
        for tok in self.logit_bias or {}:
            if tok >= vocab_size:
                raise ValueError(
                    f"logit_bias token id must be in [0, {vocab_size}), got {tok}"
                )
        for tok in self.stop_token_ids or []:
            if tok >= vocab_size:
                raise ValueError(
                    f"stop_token_ids must be in [0, {vocab_size}), got {tok}"
                )

    # ------------------------------------------------------------------ helpers
    @property
    def greedy(self) -> bool:
        """True when sampling reduces to argmax (temperature < 1e-5 or top_k == 1)."""
        return self.temperature < GREEDY_TEMPERATURE_EPS or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        """True when any of the repetition/frequency/presence penalties is active."""
        return (
            self.repetition_penalty != 1.0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
        )

    def clone(self) -> "SamplingParams":
        """A deep copy (safe to mutate, e.g. to give each of ``n`` samples its own seed)."""
        return copy.deepcopy(self)
