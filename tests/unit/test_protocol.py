"""The server's wire-format models and request -> engine helpers (no server, no model)."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from heron.outputs import Logprob
from heron.server.protocol import ChatCompletionRequest, CompletionRequest, ModelCard
from heron.server.serving_base import APIError, completion_logprobs, chat_logprobs, resolve_max_tokens, split_stop


def test_unknown_fields_are_accepted():
    req = CompletionRequest(prompt="hi", model="m", best_of=None, some_future_option={"x": 1}, guided_json=None)
    assert req.model_extra["some_future_option"] == {"x": 1}
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "x", "tool_call_id": None}], parallel_tool_calls=False)
    assert chat.messages[0].content == "x"


@pytest.mark.parametrize("prompt, kind", [("text", str), (["a", "b"], str), ([1, 2, 3], int), ([[1, 2], [3]], list)])
def test_prompt_forms(prompt, kind):
    req = CompletionRequest(prompt=prompt)
    first = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
    assert isinstance(first, kind)


def test_defaults_follow_openai():
    req = CompletionRequest(prompt="x")
    assert req.max_tokens == 16 and req.n == 1 and req.stream is False and req.echo is False
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}])
    assert chat.max_tokens is None and chat.logprobs is False and chat.add_generation_prompt is True


def test_invalid_types_are_rejected():
    with pytest.raises(ValidationError):
        CompletionRequest(prompt={"not": "a prompt"})
    with pytest.raises(ValidationError):
        CompletionRequest(prompt="x", seed=2**64)
    with pytest.raises(ValidationError):
        ChatCompletionRequest(messages="hello")


def test_split_stop_mixes_strings_and_token_ids():
    assert split_stop(None) == ([], [])
    assert split_stop("\n") == (["\n"], [])
    assert split_stop(["a", 7, "b", 9]) == (["a", "b"], [7, 9])


def test_resolve_max_tokens_messages():
    assert resolve_max_tokens(100, 10, None) == 90
    assert resolve_max_tokens(100, 10, 90) == 90
    with pytest.raises(APIError) as e:
        resolve_max_tokens(100, 10, 95)
    assert e.value.status == 400 and all(s in e.value.message for s in ("100", "105", "10", "95"))
    with pytest.raises(APIError) as e:
        resolve_max_tokens(100, 100, None)
    assert "100" in e.value.message and e.value.code == "context_length_exceeded"


class _Tok:
    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)


def test_completion_and_chat_logprobs_formats():
    positions = [{5: Logprob(-0.1, 1, "a"), 6: Logprob(-2.5, 2, "b")},
                 {7: Logprob(-3.0, 3, "c"), 8: Logprob(-0.2, 1, "d"), 9: Logprob(-1.0, 2, "e")}]
    lp, end = completion_logprobs([5, 7], positions, 2, 10, _Tok())
    assert lp.tokens == ["a", "c"] and lp.token_logprobs == [-0.1, -3.0]
    assert lp.text_offset == [10, 11] and end == 12
    assert lp.top_logprobs[1] == {"c": -3.0, "d": -0.2, "e": -1.0}  # chosen + top 2
    lp, _ = completion_logprobs([1, 5], [None, positions[0]], 0, 0, _Tok())
    assert lp.tokens[0] == "<1>" and lp.token_logprobs[0] is None and lp.top_logprobs[1] == {"a": -0.1}
    chat = chat_logprobs([7], [positions[1]], 2)
    entry = chat.content[0]
    assert entry.token == "c" and entry.bytes == [99]
    assert [t.token for t in entry.top_logprobs] == ["d", "e"]


def test_minus_infinity_is_sent_as_a_number():
    lp, _ = completion_logprobs([5], [{5: Logprob(float("-inf"), 9, "z")}], 0, 0, _Tok())
    assert lp.token_logprobs == [-9999.0]


def test_model_card_extras():
    card = ModelCard(id="m", max_model_len=10, vocab_size=7).model_dump()
    assert card["object"] == "model" and card["max_model_len"] == 10 and card["vocab_size"] == 7
