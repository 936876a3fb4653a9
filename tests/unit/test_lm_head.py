"""The bf16 LM head's W @ h^T path (32 rows and more) writes its logits into a buffer the head
keeps: results equal a plain matmul, successive calls with other row counts are right, the buffer
is reused rather than allocated per step, and whole batches on it sample what the F.linear path
samples."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import heron.layers.embedding as emb
from heron import LLM, SamplingParams
from tests.tiny_models import VOCAB, make_tiny_model


def _head(vocab=4096, hidden=64):
    torch.manual_seed(0)
    head = emb.ParallelLMHead(vocab, hidden)
    head.weight.data = (torch.randn(vocab, hidden) * 0.1).to(torch.bfloat16)
    return head


def test_buffer_path_matches_matmul_and_is_reused():
    head = _head()
    w = head.weight
    h64 = torch.randn(64, w.shape[1], dtype=torch.bfloat16)
    h40 = torch.randn(40, w.shape[1], dtype=torch.bfloat16)
    out64 = head(h64)
    assert out64.shape == (64, w.shape[0])
    torch.testing.assert_close(out64, torch.mm(w, h64.t()).t(), rtol=0, atol=0)
    torch.testing.assert_close(out64.float(), F.linear(h64.float(), w.float()), rtol=2e-2, atol=2e-2)
    expect64 = out64.clone()
    ptr = head._out.data_ptr()

    out40 = head(h40)   # fewer rows: the same buffer, and the right values for these rows
    assert head._out.data_ptr() == ptr
    torch.testing.assert_close(out40, torch.mm(w, h40.t()).t(), rtol=0, atol=0)
    assert torch.equal(head(h64), expect64)   # and back to 64 rows: still exact
    assert head._out.data_ptr() == ptr

    h128 = torch.randn(128, w.shape[1], dtype=torch.bfloat16)
    out128 = head(h128)  # more rows than the buffer holds: it grows
    assert head._out.numel() >= 128 * w.shape[0]
    torch.testing.assert_close(out128, torch.mm(w, h128.t()).t(), rtol=0, atol=0)


def test_few_rows_and_other_dtypes_do_not_use_the_buffer():
    head = _head()
    head(torch.randn(8, 64, dtype=torch.bfloat16))     # GEMV / F.linear sizes
    assert head._out is None
    head32 = emb.ParallelLMHead(4096, 64)
    head32.weight.data = head.weight.data.float()
    out = head32(torch.randn(48, 64))
    assert head32._out is None and out.dtype == torch.float32


def test_batch_of_40_samples_what_the_linear_path_samples(tmp_path, monkeypatch):
    """40 requests decode together (40 sampled rows a step, the buffer path); the same run with the
    head forced onto F.linear gives the same greedy tokens and logprobs within bf16 rounding."""
    make_tiny_model("gemma3", tmp_path / "m")
    g = torch.Generator().manual_seed(3)
    prompts = [[1] + torch.randint(3, VOCAB, (int(n),), generator=g).tolist()
               for n in torch.randint(4, 20, (40,), generator=g)]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=0)

    def run():
        llm = LLM(model=str(tmp_path / "m"), dtype="bfloat16", num_kv_blocks=128, load_progress=False)
        outs = llm.generate(prompts, params, use_tqdm=False)
        return llm, [(o.outputs[0].token_ids, [next(iter(d.values())).logprob for d in o.outputs[0].logprobs])
                     for o in outs]

    llm, buffered = run()
    assert llm.engine.runner.model.lm_head._out is not None   # the buffer path ran
    monkeypatch.setattr(emb, "MM_MIN_ROWS", 10 ** 9)
    llm, linear = run()
    assert llm.engine.runner.model.lm_head._out is None
    for (tb, lb), (tl, ll) in zip(buffered, linear):
        assert tb == tl
        torch.testing.assert_close(torch.tensor(lb), torch.tensor(ll), atol=0.05, rtol=0.02)
