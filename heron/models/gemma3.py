"""Gemma 3 text models (`gemma3_text`) in heron's layers: QK-norm, sliding/global layers with
their own RoPE bases, GeGLU, sandwich norms, scaled embeddings, tied LM head."""
from __future__ import annotations

import torch
from torch import nn

from heron.layers.activation import get_act_and_mul
from heron.layers.attention import Attention
from heron.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from heron.layers.linear import QUANT_EPOCH, MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
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


# ---- quantized float32 decode without the modules' per-call Python ---------------------------
# A decode step of a quantized float32 model on CPU is a few C++ kernel calls per layer (fused
# norms, the quantized GEMVs, q/k norm + rope, paged attention, GeGLU), and at one row the
# modules' Python around them (nn.Module calls, the layers' dispatch checks) cost about as much
# as the attention. For calls that would take those kernels anyway (few rows, every linear on
# its GEMV kernel, every fused op switched on, no hooks), the layer loop calls them directly with
# the modules' own tensors: the same kernels with the same arguments, so the same values.
DIRECT_DECODE = True   # False: always the modules (tests compare the two)


class _DirectLayer:
    """One decoder layer's kernel arguments (the modules' own tensors, not copies)."""
    __slots__ = ("in_w", "qkv", "q_w", "k_w", "qk_eps", "o", "post_attn_w", "pre_ff_w", "gate_up", "down",
                 "post_ff_w", "eps", "spec", "hq", "hkv", "d", "v0", "sliding")

    def __init__(self, layer: "Gemma3DecoderLayer") -> None:
        a, m = layer.self_attn, layer.mlp
        self.in_w, self.post_attn_w = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
        self.pre_ff_w, self.post_ff_w = layer.pre_feedforward_layernorm.weight, layer.post_feedforward_layernorm.weight
        self.eps = layer.input_layernorm.eps
        self.qkv, self.o, self.gate_up, self.down = (a.qkv_proj.quant, a.o_proj.quant, m.gate_up_proj.quant,
                                                     m.down_proj.quant)
        self.q_w, self.k_w, self.qk_eps = a.q_norm.weight, a.k_norm.weight, a.q_norm.eps
        self.spec, self.hq, self.hkv, self.d = a.attn.spec, a.num_heads, a.num_kv_heads, a.head_dim
        self.v0, self.sliding = a.q_size + a.kv_size, a.is_sliding


def _direct_layers(model: "Gemma3TextModel"):
    """The layers' kernel arguments when every layer runs its decode steps on the kernels (see
    above), else None; with the modules the path stands in for (whose hooks must stay empty), one
    quantized weight per method (heron.quant.apply's row limit is per method), and the (module,
    attribute, value) triples the plan was built on (a later step checks they still hold)."""
    from heron.layers.linear import LinearBase
    from heron.layers.activation import GeluTanhAndMul
    from heron.layers.norm import GemmaRMSNorm
    from heron.ops.cpu import load_kernel
    from heron.quant.weight_only import QuantizedWeight
    if fused_ops(torch.zeros(0), True) is None or load_kernel() is None:
        return None
    modules, reps, built_on = [], {}, []
    for layer in model.layers:
        a, m = layer.self_attn, layer.mlp
        norms = (layer.input_layernorm, layer.post_attention_layernorm, layer.pre_feedforward_layernorm,
                 layer.post_feedforward_layernorm, a.q_norm, a.k_norm)
        lins = (a.qkv_proj, a.o_proj, m.gate_up_proj, m.down_proj)
        if (type(layer) is not Gemma3DecoderLayer or type(a) is not Gemma3Attention or type(m) is not Gemma3MLP
                or not a.fused_float32 or type(m.act) is not GeluTanhAndMul or not m.act.fused_float32
                or any(type(n) is not GemmaRMSNorm or not n.fused_float32 or n.weight.dtype != torch.float32
                       for n in norms)):
            return None
        built_on += [(mod, "fused_float32", True) for mod in (a, m.act) + norms]
        for lin in lins:
            q = lin.quant
            built_on.append((lin, "quant", q))
            if (not isinstance(lin, LinearBase) or type(lin).forward is not LinearBase.forward
                    or type(q) is not QuantizedWeight or q._fast is None or lin.has_bias
                    or lin.full_precision is not None):
                return None
            reps.setdefault((q.method, getattr(q, "matmul_large", None) is None), q)
        modules += [layer, a, m, a.attn, m.act, *norms, *lins]
    return [_DirectLayer(layer) for layer in model.layers], modules, list(reps.values()), built_on


def _direct_layer(p: _DirectLayer, ops, hidden, cos, sin, kv_cache, meta):
    """Gemma3DecoderLayer.forward through the kernels its modules would call (see above)."""
    t = hidden.shape[0]
    qkv = p.qkv._fast_call(p.qkv._fast[0], ops.rms_norm(hidden, p.in_w, p.eps, True, None))
    q, k = ops.qk_norm_rope(qkv, p.q_w, p.k_w, cos, sin, p.qk_eps, p.hq, p.hkv)
    v = qkv[:, p.v0:].view(t, p.hkv, p.d)
    out = meta.backend.forward(p.spec, q, k, v, kv_cache, meta).reshape(t, p.hq * p.d)
    hidden = ops.rms_norm(p.o._fast_call(p.o._fast[0], out), p.post_attn_w, p.eps, True, hidden)
    h = ops.rms_norm(hidden, p.pre_ff_w, p.eps, True, None)
    g = ops.act_and_mul(p.gate_up._fast_call(p.gate_up._fast[0], h), True)
    return ops.rms_norm(p.down._fast_call(p.down._fast[0], g), p.post_ff_w, p.eps, True, hidden)


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
        direct = self._direct(hidden)
        if direct is not None:
            ops = fused_ops(hidden, True)
            for p, kv_cache in zip(direct, kv_caches):
                hidden = _direct_layer(p, ops, hidden, cos_l if p.sliding else cos_g, sin_l if p.sliding else sin_g,
                                       kv_cache, meta)
            return self.norm(hidden)
        for layer, kv_cache in zip(self.layers, kv_caches):
            if layer.self_attn.is_sliding:
                hidden = layer(hidden, cos_l, sin_l, kv_cache, meta)
            else:
                hidden = layer(hidden, cos_g, sin_g, kv_cache, meta)
        return self.norm(hidden)

    _direct_plan = (-1, None)   # (heron.layers.linear.QUANT_EPOCH when planned, _direct_layers' plan or None)

    def _direct(self, hidden: torch.Tensor):
        """The direct path's per-layer arguments when this call can take it, else None."""
        if not DIRECT_DECODE or hidden.dtype != torch.float32 or hidden.dim() != 2 or not hidden.is_cpu:
            return None
        epoch, plan = self._direct_plan
        if epoch != QUANT_EPOCH[0] or plan is not None and not all(getattr(m, n) is v for m, n, v in plan[3]):
            plan = _direct_layers(self)   # a weight swapped or a flag switched since: plan again
            self._direct_plan = (QUANT_EPOCH[0], plan)
        if plan is None:
            return None
        layers, modules, reps, _ = plan
        rows = hidden.shape[0]
        from heron.quant.apply import kernel_max_rows
        if (rows < 1 or any(rows > min(kernel_max_rows(q), q._fast[1]) for q in reps)
                or _module_hooks_set() or any(m._forward_pre_hooks or m._forward_hooks for m in modules)):
            return None
        return layers


def _module_hooks_set() -> bool:
    from torch.nn.modules import module as mod
    return bool(mod._global_forward_pre_hooks or mod._global_forward_hooks)


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
