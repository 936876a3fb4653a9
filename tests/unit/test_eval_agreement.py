"""heron eval agreement: greedy agreement of a configuration with a reference on a fixed prompt set."""
from __future__ import annotations

import argparse

import pytest

from heron.eval import agreement
from tests.tiny_models import make_tiny_model


def test_compare_counts_whole_agreement_and_common_prefixes():
    ref = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    cand = [[1, 2, 3], [4, 0, 6], [0, 8, 9]]
    assert agreement.compare(ref, cand) == dict(prompts=3, agree=1, agree_fraction=0.333, mean_common_prefix=1.33)
    with pytest.raises(ValueError, match="different prompt counts"):
        agreement.compare(ref, cand[:2])
    assert agreement.compare([], [])["agree_fraction"] is None


def _args(**kw):
    base = dict(model=None, tokens=6, reference_dtype="auto", output=None, quiet=True)
    base.update(kw)
    return argparse.Namespace(**base)


def _engine_kwargs(**kw):
    base = dict(dtype="float32", kv_cache_dtype="auto", quantization=None, speculative=None, num_kv_blocks=256,
                load_progress=False)
    base.update(kw)
    return base


def test_agreement_of_a_run_with_itself_and_with_int8(tmp_path, monkeypatch):
    make_tiny_model("llama", tmp_path / "m")
    prompts = [[1] + [(7 * i + 3 * j) % 380 + 3 for j in range(20)] for i in range(6)]
    monkeypatch.setattr(agreement, "default_prompts", lambda tok, vocab: prompts)
    args = _args(model=str(tmp_path / "m"), reference_dtype="float32", output=str(tmp_path / "out.json"))
    with pytest.raises(ValueError, match="equals the reference"):
        agreement.run_agreement(args, _engine_kwargs())
    same = agreement.run_agreement(args, _engine_kwargs(kv_cache_dtype="int8", dtype="float32"))
    assert same["prompts"] == 6 and same["candidate"]["kv_cache_dtype"] == "int8"
    assert 0 <= same["agree"] <= 6 and (tmp_path / "out.json").exists()
    # a candidate that differs in every step: agreement is counted from the tokens, not assumed
    calls = []
    real = agreement.greedy_tokens

    def shifted(llm, ps, n):
        out = real(llm, ps, n)
        calls.append(len(calls))
        return out if len(calls) == 1 else [[(t + 1) % 384 for t in o] for o in out]

    monkeypatch.setattr(agreement, "greedy_tokens", shifted)
    none = agreement.run_agreement(args, _engine_kwargs(kv_cache_dtype="int8"))
    assert none["agree"] == 0 and none["mean_common_prefix"] == 0


def test_default_prompt_set_is_fixed():
    class Tok:
        bos_token_id = 2

        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text]
    prompts = agreement.default_prompts(Tok(), 262144)
    assert len(prompts) == 64 and all(p[0] == 2 for p in prompts)
    assert all(33 <= len(p) <= 64 for p in prompts[:32]) and all(len(p) == 49 for p in prompts[32:])
    assert prompts == agreement.default_prompts(Tok(), 262144)
