"""Fixtures for the server tests: the tiny cycle model and a shared `heron serve` on it."""
from __future__ import annotations

import httpx
import pytest

from tests.e2e.server_helpers import TINY_SERVER_ARGS, ServerProcess, make_cycle_model

SERVED_NAME = "tiny-cycle"


@pytest.fixture(scope="session")
def cycle_model(tmp_path_factory):
    return make_cycle_model(tmp_path_factory.mktemp("cycle-model") / "model")


@pytest.fixture(scope="session")
def server(cycle_model, tmp_path_factory):
    """The shared server: no API key, no chat template (requests pass `chat_template`)."""
    log = tmp_path_factory.mktemp("server-logs") / "shared.log"
    proc = ServerProcess([str(cycle_model), *TINY_SERVER_ARGS, "--served-model-name", SERVED_NAME,
                          "--max-num-seqs", "64"], log_path=log)
    try:
        yield proc.start()
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def client(server):
    import openai
    http = httpx.Client(trust_env=False, timeout=60)
    c = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, http_client=http)
    yield c
    http.close()


@pytest.fixture(scope="session")
def http(server):
    with httpx.Client(base_url=server.base_url, trust_env=False, timeout=60) as c:
        yield c
