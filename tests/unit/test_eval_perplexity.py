"""`heron eval perplexity`: windows, the shipped text, and the number itself against HF transformers."""
from __future__ import annotations

import json
import math

import pytest
import torch

from heron.eval.perplexity import MIN_TOKENS, default_eval_text, html_to_text, windows
from tests.tiny_models import VOCAB, hf_logprobs, make_tiny_model


def test_windows_cover_the_text_once():
    ids = list(range(10, 30))
    wins = windows(ids, 8, bos=1)
    assert all(w[0] == 1 and len(w) <= 8 for w in wins)
    assert [t for w in wins for t in w[1:]] == ids
    assert windows(ids, 5, bos=None)[0] == ids[:5]
    with pytest.raises(ValueError, match="context_len"):
        windows(ids, 1, bos=1)


def test_html_to_text_drops_markup():
    html = "<html><head><title>x</title><style>p{}</style></head><body><p>Hello &amp; <b>bye</b></p>" \
           "<script>var a;</script><li>  two   spaces </li></body></html>"
    assert html_to_text(html) == "Hello & bye\ntwo spaces"


def test_perplexity_equals_hf(tmp_path, capsys):
    from heron.cli import main
    folder = tmp_path / "tiny"
    model = make_tiny_model("llama", folder)
    g = torch.Generator().manual_seed(3)
    words = torch.randint(3, VOCAB, (150,), generator=g).tolist()
    (tmp_path / "text.txt").write_text(" ".join(f"w{w}" for w in words))
    out = tmp_path / "ppl.json"
    assert main(["eval", "perplexity", "--model", str(folder), "--dtype", "float32", "--text-file",
                 str(tmp_path / "text.txt"), "--context-len", "64", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    nll, n = 0.0, 0
    for w in windows(words, 64, bos=1):
        lp = hf_logprobs(model, w)
        nll -= sum(float(lp[i - 1, w[i]]) for i in range(1, len(w)))
        n += len(w) - 1
    assert result["scored_tokens"] == n == 150
    assert result["windows"] == 3
    assert math.isclose(result["perplexity"], math.exp(nll / n), rel_tol=1e-4)


@pytest.mark.slow
def test_default_text_is_long_enough():
    from heron.models.loader import load_tokenizer, resolve_model
    text = default_eval_text()
    assert text.startswith("Gemma Terms of Use") and "GNU GENERAL PUBLIC LICENSE" in text
    tok = load_tokenizer(resolve_model(None))
    assert len(tok(text, add_special_tokens=False)["input_ids"]) >= MIN_TOKENS
