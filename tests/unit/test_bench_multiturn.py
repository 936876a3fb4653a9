"""`heron bench multiturn` on a tiny model: the replay resends whole conversations, and the cached
fraction of prompt tokens is what the prefix cache should make it."""
from __future__ import annotations

import json

from heron.cli import main
from tests.tiny_models import make_tiny_model


def test_multiturn_replay_cache_on_and_off(tmp_path, capsys):
    folder = tmp_path / "tiny"
    make_tiny_model("llama", folder)
    out = tmp_path / "mt.json"
    rc = main(["bench", "multiturn", "--model", str(folder), "--dtype", "float32", "--conversations", "2",
               "--turns", "3", "--system-len", "40", "--user-len", "8", "--answer-len", "8", "--quiet",
               "--output", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    on, off = result["cache_on"], result["cache_off"]
    # prompts: 41 (BOS + system) + 8, then + 16 per turn: 49, 65, 81 tokens per chat
    assert on["prompt_tokens"] == off["prompt_tokens"] == 2 * (49 + 65 + 81)
    assert off["cached_prompt_fraction"] == 0.0
    # turn 2 reuses the 3 full blocks of turn 1's 57-token conversation (48 tokens), turn 3 the 4 of
    # turn 2's 73 (64 tokens); the first turn shares nothing between the two chats
    assert on["cached_prompt_fraction"] == round(2 * (48 + 64) / on["prompt_tokens"], 3)
    assert result["later_turn_ttft_ratio"] == round(on["mean_ttft_later_turns_ms"] / off["mean_ttft_later_turns_ms"], 3)
