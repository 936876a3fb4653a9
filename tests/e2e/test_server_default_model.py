"""`heron serve` with no model argument: the real default model (Gemma 3 270M). Slow."""
from __future__ import annotations

import httpx
import openai
import pytest

from tests.e2e.server_helpers import ServerProcess

pytestmark = pytest.mark.slow

STARTUP_LIMIT_S = 15.0  # once the model's files exist (the first start ever also converts/compiles)


@pytest.fixture(scope="module")
def gemma_server(tmp_path_factory):
    log = tmp_path_factory.mktemp("gemma") / "server.log"
    # warm start: model file, tokenizer cache and attention kernel are built by an untimed first run
    first = ServerProcess([], log_path=log).start(timeout=600)
    first.stop()
    proc = ServerProcess([], log_path=log)
    try:
        yield proc.start(timeout=120)
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def gemma(gemma_server):
    return openai.OpenAI(base_url=f"{gemma_server.base_url}/v1", api_key="x", max_retries=0,
                         http_client=httpx.Client(trust_env=False, timeout=120))


def test_ready_quickly_with_one_line(gemma_server):
    assert gemma_server.startup_s < STARTUP_LIMIT_S, gemma_server.log()
    lines = [line for line in gemma_server.log().splitlines() if line.strip()]
    assert lines[-1].startswith("heron: serving gemma-3-270m on http://127.0.0.1:"), lines


def test_default_model_completion_and_chat(gemma):
    assert [m.id for m in gemma.models.list().data] == ["gemma-3-270m"]
    out = gemma.completions.create(model="gemma-3-270m", prompt="The capital of France is", max_tokens=8,
                                   temperature=0)
    assert "France" in out.choices[0].text or "Paris" in out.choices[0].text  # " the capital of the country ..."
    assert out.usage.prompt_tokens == 6 and out.usage.completion_tokens == 8  # <bos> + 5 words
    chat = gemma.chat.completions.create(model="gemma-3-270m", max_tokens=16, temperature=0,
                                         messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert chat.choices[0].message.content and chat.usage.prompt_tokens > 10  # the Gemma turn template


@pytest.mark.parametrize("prompt", ["Écris une phrase en français sur l'été :", "日本の首都は", "Emoji party: 🎉🎈"])
def test_stream_equals_non_stream_on_real_text(gemma, prompt):
    kw = dict(model="gemma-3-270m", prompt=prompt, max_tokens=24, temperature=0.8, seed=42)
    full = gemma.completions.create(**kw).choices[0].text
    texts = [c.choices[0].text for c in gemma.completions.create(stream=True, **kw) if c.choices]
    assert "".join(texts) == full
    assert not any("\ufffd" in t for t in texts) or "\ufffd" in full
