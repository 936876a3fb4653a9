"""`heron bench spec` on a tiny model: both tasks run with speculation off and on, the outputs
are compared, and the JSON carries the acceptance figures."""
from __future__ import annotations

import json

import pytest

from heron.cli import main
from tests.tiny_models import make_tiny_model


def test_spec_bench_runs_both_modes_and_checks_outputs(tmp_path):
    folder = tmp_path / "tiny"
    make_tiny_model("gemma3", folder)
    out = tmp_path / "spec.json"
    rc = main(["bench", "spec", "--model", str(folder), "--dtype", "float32", "--output-len", "24",
               "--iters", "1", "--quiet", "--output", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["speculative"] == "ngram" and set(result["tasks"]) == {"grounded", "free"}
    for row in result["tasks"].values():
        assert row["identical"] is True
        assert row["decode_ms_off"] > 0 and row["decode_ms_on"] > 0
        # the speedup comes from the unrounded medians; the ms fields are rounded to 0.01
        assert row["speedup"] == pytest.approx(row["decode_ms_off"] / row["decode_ms_on"], rel=0.03)
        assert 0.0 <= row["acceptance_rate"] <= 1.0
    # the tiny tokenizer splits the English passage into unknown-word tokens: the prompt is long
    assert result["tasks"]["grounded"]["prompt_tokens"] > 100
