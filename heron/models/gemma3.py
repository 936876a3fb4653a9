"""Gemma 3 text models (`gemma3_text`) in heron's layers: QK-norm, sliding/global layers with
their own RoPE bases, GeGLU, sandwich norms, scaled embeddings, tied LM head."""
from __future__ import annotations

import torch
from torch import nn

from heron.layers.activation import get_act_and_mul
from heron.layers.attention import Attention
from heron.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from heron.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from heron.layers.norm import GemmaRMSNorm
from heron.layers.rotary import RotaryEmbedding, apply_rotary
from heron.models.utils import layer_sliding_windows, load_weights
from heron.ops.cpu import fused_ops


class Gemma3Attention(nn.Module):
    fused_float32 = False   # float32 q/k norms and rope in one fused op (quantized models: heron.quant.apply)

    def __init__(self, config, sliding_window: int | None) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        bias = bool(getattr(config, "attention_bias", False))
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, self.num_heads, self.num_kv_heads, bias)
        self.o_proj = RowParallelLinear(self.q_size, config.hidden_size, bias=bias)
        self.q_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = GemmaRMSNorm(self.head_dim, config.rms_norm_eps)
        self.is_sliding = sliding_window is not None
        self.attn = Attention(self.num_heads, self.head_dim, config.query_pre_attn_scalar ** -0.5, self.num_kv_heads,
                              sliding_window, getattr(config, "attn_logit_softcapping", None))

    def forward(self, hidden, cos, sin, kv_cache, meta):
        t = hidden.shape[0]
        qkv = self.qkv_proj(hidden)
        ops = fused_ops(qkv, self.fused_float32) if qkv.dtype == torch.float32 else None
        if ops is not None and qkv.dim() == 2 and cos.dtype == torch.float32:
            # quantized models, float32: both norms and the rope in one call (the same values)
            q, k = ops.qk_norm_rope(qkv, self.q_norm.weight, self.k_norm.weight, cos, sin, self.q_norm.eps,
                                    self.num_heads, self.num_kv_heads)
            v = qkv[:, self.q_size + self.kv_size:]
            return self.o_proj(self.attn(q.view(t, -1), k.view(t, -1), v, kv_cache, meta))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.reshape(t, self.num_heads, self.head_dim))
        k = self.k_norm(k.reshape(t, self.num_kv_heads, self.head_dim))
        q, k = apply_rotary(q, cos, sin, self.fused_float32), apply_rotary(k, cos, sin, self.fused_float32)
        out = self.attn(q.reshape(t, -1), k.reshape(t, -1), v, kv_cache, meta)
        return self.o_proj(out)


class Gemma3MLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size)
        self.act = get_act_and_mul(config.hidden_activation)

    def forward(self, x):
        return self.down_proj(self.act(self.gate_up_proj(x)))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config, sliding_window: int | None) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = Gemma3Attention(config, sliding_window)
        self.mlp = Gemma3MLP(config)
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(config.hidden_size, eps)

    def forward(self, hidden, cos, sin, kv_cache, meta):
        residual = hidden
        hidden = self.self_attn(self.input_layernorm(hidden), cos, sin, kv_cache, meta)
        hidden = self.post_attention_layernorm(hidden, residual=residual)
        residual = hidden
        hidden = self.mlp(self.pre_feedforward_layernorm(hidden))
        return self.post_feedforward_layernorm(hidden, residual=residual)


class Gemma3TextModel(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        windows = layer_sliding_windows(config)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, windows[i]) for i in range(config.num_hidden_layers))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_global = RotaryEmbedding(config, config.head_dim, "full_attention")
        self.rotary_local = RotaryEmbedding(config, config.head_dim, "sliding_attention")
        self.embed_scale = config.hidden_size ** 0.5

    def forward(self, input_ids, positions, kv_caches, meta):
        hidden = self.embed_tokens(input_ids)
        # HF multiplies by the scale cast to the weights' dtype (sqrt(640) is 25.25 in bfloat16)
        hidden = hidden * torch.tensor(self.embed_scale, dtype=hidden.dtype)
        cos_g, sin_g = self.rotary_global.cos_sin(positions, hidden.dtype)
        cos_l, sin_l = self.rotary_local.cos_sin(positions, hidden.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches):
            if layer.self_attn.is_sliding:
                hidden = layer(hidden, cos_l, sin_l, kv_cache, meta)
            else:
                hidden = layer(hidden, cos_g, sin_g, kv_cache, meta)
        return self.norm(hidden)


class Gemma3ForCausalLM(nn.Module):
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.model = Gemma3TextModel(config)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                      tied_to=self.model.embed_tokens if self.tie_word_embeddings else None)
        self.final_logit_softcapping = getattr(config, "final_logit_softcapping", None)
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim

    def forward(self, input_ids, positions, kv_caches, meta):
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.final_logit_softcapping is not None:
            cap = self.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits

    def load_weights(self, weights) -> None:
        skip = ("lm_head.weight",) if self.tie_word_embeddings else ()
        load_weights(self, weights, self.packed_modules_mapping, skip=skip)
