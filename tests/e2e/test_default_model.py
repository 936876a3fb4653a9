"""The real default model (Gemma 3 270M GGUF) against transformers loading the same GGUF."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from heron import LLM, SamplingParams
from tests.tiny_models import hf_greedy

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
]
NEW_TOKENS = 24

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def heron_fp32():
    return LLM(dtype="float32", load_progress=False)


@pytest.fixture(scope="module")
def hf_reference(heron_fp32):
    from transformers import AutoModelForCausalLM
    path = heron_fp32.engine.source.path
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return model


def test_greedy_equals_transformers_on_default_model(heron_fp32, hf_reference):
    tok = heron_fp32.tokenizer
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = heron_fp32.generate(PROMPTS, params, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        ids = tok(prompt)["input_ids"]
        assert ids[0] == tok.bos_token_id and out.prompt_token_ids == ids
        assert out.outputs[0].token_ids == hf_greedy(hf_reference, ids, NEW_TOKENS), prompt


def test_batched_chunked_equals_single(heron_fp32):
    """The same greedy tokens whether a prompt runs alone or chunked inside a batch."""
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    alone = [heron_fp32.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]
    small = LLM(dtype="float32", load_progress=False, max_num_batched_tokens=5, num_kv_blocks=64)
    together = [o.outputs[0].token_ids for o in small.generate(PROMPTS, params, use_tqdm=False)]
    assert together == alone
    assert small.engine.runner.stats.num_chunked_prefills > 0


def test_cli_generate_prints_coherent_text(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "heron.cli", "generate", "--max-tokens", "12", "--dtype", "float32",
           "Monday, Tuesday, Wednesday,"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300,
                         cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("Monday, Tuesday, Wednesday,")
    continuation = res.stdout[len("Monday, Tuesday, Wednesday,"):]
    assert "Thursday" in continuation, continuation
    assert "tok/s" in res.stderr

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("One, two, three,\nRed, green,\n")
    cmd = [sys.executable, "-m", "heron.cli", "generate", "--max-tokens", "6", "--file", str(prompts)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300,
                         cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "=== 'One, two, three,'" in res.stdout and "output tok/s" in res.stderr


def test_chat_with_gemma_turn_format(heron_fp32):
    """The base model's GGUF has no chat template; heron falls back to Gemma's turn format."""
    out = heron_fp32.chat([{"role": "user", "content": "What is the capital of France?"}],
                          SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)[0]
    tok = heron_fp32.tokenizer
    text = tok.decode(out.prompt_token_ids)
    assert text.startswith("<bos><start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n")
    assert text.endswith("<start_of_turn>model\n")
    assert out.prompt_token_ids.count(tok.bos_token_id) == 1
    assert out.outputs[0].text.strip()


def test_gemma_end_of_turn_is_an_eos(heron_fp32):
    tok = heron_fp32.tokenizer
    assert tok.convert_tokens_to_ids("<end_of_turn>") in heron_fp32.engine.eos_token_ids
    assert tok.eos_token_id in heron_fp32.engine.eos_token_ids
