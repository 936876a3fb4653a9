"""A server with `--speculative ngram` on the cycle model (whose greedy output repeats a cycle,
so prompt lookup's drafts are accepted): the same completions as the non-speculative shared
server, streamed and not, with stop strings, and the speculative-decoding metrics."""
from __future__ import annotations

import httpx
import openai
import pytest

from tests.e2e.conftest import SERVED_NAME
from tests.e2e.server_helpers import CYCLE_TEXT, TINY_SERVER_ARGS, ServerProcess, greedy_text


@pytest.fixture(scope="module")
def spec_server(cycle_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("spec-server") / "server.log"
    proc = ServerProcess([str(cycle_model), *TINY_SERVER_ARGS, "--served-model-name", SERVED_NAME,
                          "--speculative", "ngram", "--num-speculative-tokens", "5"], log_path=log)
    try:
        yield proc.start()
    finally:
        proc.stop()


def _client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0,
                         http_client=httpx.Client(trust_env=False, timeout=60))


def test_speculative_server_matches_and_reports_metrics(spec_server, server):
    spec, plain = _client(spec_server), _client(server)
    prompt = CYCLE_TEXT * 2 + CYCLE_TEXT[:5]
    cases = [dict(max_tokens=60), dict(max_tokens=60, stop=["中!"]), dict(max_tokens=7)]
    for kw in cases:
        a = spec.completions.create(model=SERVED_NAME, prompt=prompt, temperature=0, **kw)
        b = plain.completions.create(model=SERVED_NAME, prompt=prompt, temperature=0, **kw)
        assert (a.choices[0].text, a.choices[0].finish_reason) == (b.choices[0].text, b.choices[0].finish_reason)
        assert a.usage.completion_tokens == b.usage.completion_tokens
    full = spec.completions.create(model=SERVED_NAME, prompt=prompt, temperature=0, max_tokens=60)
    assert full.choices[0].text.encode() == greedy_text(prompt[-1], 60)
    stream = spec.completions.create(model=SERVED_NAME, prompt=prompt, temperature=0, max_tokens=60, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == full.choices[0].text
    m = spec_server.metrics()
    assert m["heron:spec_decode_num_draft_tokens_total"] > 0
    assert m["heron:spec_decode_num_accepted_tokens_total"] > 0.8 * m["heron:spec_decode_num_draft_tokens_total"]
    assert m["heron:spec_decode_mean_accepted_length"] > 3
    assert 0.8 < m["heron:spec_decode_acceptance_rate"] <= 1.0
