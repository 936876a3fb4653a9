"""SamplingParams: defaults, normalisation, validation messages."""

from __future__ import annotations

import pytest

from heron.sampling_params import SamplingParams


def test_defaults_match_vllm() -> None:
    p = SamplingParams()
    assert p.n == 1
    assert p.temperature == 1.0
    assert p.top_p == 1.0
    assert p.top_k == 0
    assert p.min_p == 0.0
    assert p.presence_penalty == 0.0
    assert p.frequency_penalty == 0.0
    assert p.repetition_penalty == 1.0
    assert p.logit_bias is None
    assert p.seed is None
    assert p.stop == []
    assert p.stop_token_ids == []
    assert p.ignore_eos is False
    assert p.max_tokens == 16
    assert p.min_tokens == 0
    assert p.logprobs is None
    assert p.prompt_logprobs is None
    assert p.skip_special_tokens is True
    assert p.include_stop_str_in_output is False
    assert not p.greedy
    assert not p.has_penalties


def test_normalisation() -> None:
    p = SamplingParams(stop="###", top_k=-1, logit_bias={"5": 1, 7: -2.5}, stop_token_ids=(3, 4))
    assert p.stop == ["###"]
    assert p.top_k == 0
    assert p.logit_bias == {5: 1.0, 7: -2.5}
    assert all(isinstance(k, int) for k in p.logit_bias)
    assert p.stop_token_ids == [3, 4]
    p = SamplingParams(temperature=0, max_tokens=None, stop=("a", "b"))
    assert isinstance(p.temperature, float)
    assert p.max_tokens is None
    assert p.stop == ["a", "b"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 0.0},
        {"temperature": 1e-6},  # below 1e-5 counts as greedy
        {"top_k": 1},
        {"temperature": 0.7, "top_k": 1},
    ],
)
def test_greedy(kwargs: dict) -> None:
    assert SamplingParams(**kwargs).greedy


@pytest.mark.parametrize("kwargs", [{}, {"temperature": 1e-4}, {"top_k": 2}, {"top_p": 0.1}])
def test_not_greedy(kwargs: dict) -> None:
    assert not SamplingParams(**kwargs).greedy


def test_clone_is_deep() -> None:
    p = SamplingParams(stop=["x"], logit_bias={1: 2.0}, seed=3)
    q = p.clone()
    assert q == p and q is not p
    q.stop.append("y")
    q.logit_bias[2] = 1.0
    assert p.stop == ["x"] and p.logit_bias == {1: 2.0}


@pytest.mark.parametrize(
    "kwargs, fragments",
    [
        ({"n": 0}, ["n", "0", ">= 1"]),
        ({"n": 1.5}, ["n", "1.5"]),
        ({"temperature": -1.0}, ["temperature must be >= 0, got -1.0"]),
        ({"temperature": float("inf")}, ["temperature", "inf"]),
        ({"temperature": "hot"}, ["temperature", "'hot'"]),
        ({"temperature": None}, ["temperature", "None"]),
        ({"top_p": 1.5}, ["top_p must be in (0, 1], got 1.5"]),
        ({"top_p": 0.0}, ["top_p", "0.0", "(0, 1]"]),
        ({"top_k": -2}, ["top_k", "-2", ">= 0"]),
        ({"top_k": 2.5}, ["top_k", "2.5"]),
        ({"min_p": -0.1}, ["min_p", "-0.1", "[0, 1]"]),
        ({"min_p": 1.1}, ["min_p", "1.1", "[0, 1]"]),
        ({"presence_penalty": 2.5}, ["presence_penalty", "2.5", "[-2, 2]"]),
        ({"presence_penalty": -2.1}, ["presence_penalty", "-2.1", "[-2, 2]"]),
        ({"frequency_penalty": -3}, ["frequency_penalty", "-3", "[-2, 2]"]),
        ({"repetition_penalty": 0.0}, ["repetition_penalty", "0.0", "> 0"]),
        ({"repetition_penalty": -1.0}, ["repetition_penalty", "-1.0", "> 0"]),
        ({"max_tokens": 0}, ["max_tokens", "0", ">= 1"]),
        ({"max_tokens": "many"}, ["max_tokens", "'many'"]),
        ({"min_tokens": -1}, ["min_tokens", "-1", ">= 0"]),
        ({"min_tokens": 20, "max_tokens": 10}, ["min_tokens", "20", "max_tokens=10"]),
        ({"logprobs": 21}, ["logprobs", "21", "[0, 20]"]),
        ({"logprobs": -1}, ["logprobs", "-1", "[0, 20]"]),
        ({"prompt_logprobs": 100}, ["prompt_logprobs", "100", "[0, 20]"]),
        ({"logit_bias": {1: 101.0}}, ["logit_bias", "101.0", "[-100, 100]"]),
        ({"logit_bias": {1: -100.5}}, ["logit_bias", "-100.5", "[-100, 100]"]),
        ({"logit_bias": {"abc": 1.0}}, ["logit_bias", "'abc'"]),
        ({"logit_bias": {-1: 1.0}}, ["logit_bias", "-1"]),
        ({"logit_bias": [1, 2]}, ["logit_bias", "[1, 2]"]),
        ({"stop": ""}, ["stop", "non-empty"]),
        ({"stop": ["ok", ""]}, ["stop", "non-empty"]),
        ({"stop": ["ok", 3]}, ["stop", "3"]),
        ({"stop": 3}, ["stop", "3"]),
        ({"seed": "abc"}, ["seed", "'abc'"]),
        ({"seed": 1.5}, ["seed", "1.5"]),
        ({"stop_token_ids": [-5]}, ["stop_token_ids", "-5"]),
        ({"stop_token_ids": ["x"]}, ["stop_token_ids", "'x'"]),
        ({"stop_token_ids": 7}, ["stop_token_ids", "7"]),
        ({"ignore_eos": "yes"}, ["ignore_eos", "'yes'"]),
        ({"n": True}, ["n", "True"]),
    ],
)
def test_invalid_values_raise(kwargs: dict, fragments: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(**kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 0},
        {"top_p": 1},
        {"top_k": 0},
        {"min_p": 1.0},
        {"presence_penalty": -2, "frequency_penalty": 2},
        {"repetition_penalty": 0.5},
        {"max_tokens": 1, "min_tokens": 1},
        {"logprobs": 0, "prompt_logprobs": 20},
        {"logit_bias": {0: -100, 3: 100}},
        {"seed": 0},
        {"seed": -7},
        {"stop_token_ids": [0, 1]},
    ],
)
def test_boundary_values_accepted(kwargs: dict) -> None:
    SamplingParams(**kwargs)


def test_verify_vocab_size() -> None:
    SamplingParams(logit_bias={9: 1.0}, stop_token_ids=[9]).verify_vocab_size(10)
    with pytest.raises(ValueError, match="logit_bias.*10"):
        SamplingParams(logit_bias={10: 1.0}).verify_vocab_size(10)
    with pytest.raises(ValueError, match="stop_token_ids.*12"):
        SamplingParams(stop_token_ids=[12]).verify_vocab_size(10)
