"""`heron bench serve` against the shared tiny server: completes, reports percentiles and goodput
as JSON."""
from __future__ import annotations

import json
import subprocess
import sys

from heron.bench.serve import RequestResult, meets_slos, parse_goodput, summarize
from tests.e2e.server_helpers import REPO


def test_bench_serve_runs_and_saves_json(server, tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "heron.cli", "bench", "serve", "--base-url", server.base_url, "--num-prompts", "12",
           "--input-len", "24", "--output-len", "16", "--request-rate", "40", "--max-concurrency", "4",
           "--goodput", "ttft:60000", "tpot:60000", "--percentiles", "50,99", "--output", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Successful requests:" in proc.stdout and "P99 TTFT (ms):" in proc.stdout
    s = json.loads(out.read_text())
    assert s["completed"] == 12 and s["failed"] == 0
    assert s["total_output_tokens"] == 12 * 16 and s["total_input_tokens"] == 12 * 24
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        assert s[key]["p50"] is not None and s[key]["p99"] >= s[key]["p50"] > 0
    assert s["goodput"] > 0 and s["goodput_fraction"] == 1.0


def test_summary_and_goodput():
    ok = RequestResult(ok=True, prompt_len=10, output_tokens=5, ttft=0.1, latency=0.5, itl=[0.1] * 4)
    slow = RequestResult(ok=True, prompt_len=10, output_tokens=5, ttft=2.0, latency=3.0, itl=[0.25] * 4)
    failed = RequestResult(ok=False, error="HTTP 500")
    slos = parse_goodput(["ttft:500", "tpot:200"])
    assert meets_slos(ok, slos) and not meets_slos(slow, slos) and not meets_slos(failed, slos)
    s = summarize([ok, slow, failed], duration=2.0, percentiles=[50.0], slos=slos)
    assert (s["completed"], s["failed"]) == (2, 1)
    assert s["output_throughput"] == 5.0 and s["goodput"] == 0.5
    assert s["tpot_ms"]["mean"] == (100.0 + 250.0) / 2
    assert s["errors"] == ["HTTP 500"]
