"""Tiny random-weight HF models, written to a folder heron can load, plus an HF greedy reference."""
from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 384


def tiny_config(arch: str):
    import transformers as tf
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=0.3, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    if arch == "llama":
        return tf.LlamaConfig(**common, head_dim=16, architectures=["LlamaForCausalLM"])
    if arch == "mistral":
        return tf.MistralConfig(**common, head_dim=16, sliding_window=24, architectures=["MistralForCausalLM"])
    if arch == "qwen2":
        return tf.Qwen2Config(**common, architectures=["Qwen2ForCausalLM"])
    if arch == "qwen3":
        c = dict(common, num_key_value_heads=1)
        return tf.Qwen3Config(**c, head_dim=32, architectures=["Qwen3ForCausalLM"])
    if arch == "gemma3":
        c = dict(common, num_hidden_layers=4, num_key_value_heads=1, tie_word_embeddings=True)
        return tf.Gemma3TextConfig(
            **c, head_dim=32, sliding_window=24, query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
            architectures=["Gemma3ForCausalLM"])
    raise ValueError(arch)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3"]


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for i in range(3, VOCAB):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_tiny_model(arch: str, folder: Path, seed: int = 0):
    """Save a random-weight HF model + tokenizer to `folder`; return the HF model (float32, eval)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    cfg = tiny_config(arch)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager").eval()
    # give norms non-trivial weights so that the norm conventions are actually exercised
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    return model


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Plain greedy decoding with HF's forward and KV cache, EOS ignored."""
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config)
    ids = torch.tensor([prompt])
    out = []
    logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1]
    for _ in range(max_new_tokens):
        tok = int(torch.argmax(logits))
        out.append(tok)
        logits = model(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True).logits[0, -1]
    return out


@torch.inference_mode()
def hf_logprobs(model, tokens: list[int]) -> torch.Tensor:
    """log_softmax over the vocabulary at every position of `tokens` ([len, vocab])."""
    logits = model(input_ids=torch.tensor([tokens])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


PROMPT_LENS = [3, 17, 40, 70, 5, 100]


def make_prompts(seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(3, VOCAB, (n - 1,), generator=g).tolist() for n in PROMPT_LENS]
