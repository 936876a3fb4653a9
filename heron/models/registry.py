"""HF `architectures` -> heron model class."""
from __future__ import annotations

import importlib

_MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("heron.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("heron.models.llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("heron.models.llama", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("heron.models.llama", "Qwen3ForCausalLM"),
    "Gemma3ForCausalLM": ("heron.models.gemma3", "Gemma3ForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(_MODELS)


def get_model_class(config):
    archs = list(getattr(config, "architectures", None) or [])
    if not archs and getattr(config, "model_type", None) == "gemma3_text":
        archs = ["Gemma3ForCausalLM"]
    for arch in archs:
        if arch in _MODELS:
            module, name = _MODELS[arch]
            return getattr(importlib.import_module(module), name)
    raise ValueError(f"unsupported model architecture {archs or getattr(config, 'model_type', None)}; "
                     f"supported: {', '.join(supported_architectures())}")
