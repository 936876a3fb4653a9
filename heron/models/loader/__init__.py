"""Model loading: resolve a model argument, build its HF config, stream its weights, load its tokenizer."""
from heron.models.loader.gguf import iter_gguf_tensors, load_gguf_config, read_gguf_header
from heron.models.loader.safetensors import iter_safetensors, load_hf_config
from heron.models.loader.source import DEFAULT_MODEL, ModelSource, iter_weights, load_config, resolve_model
from heron.models.loader.tokenizer import load_tokenizer

__all__ = [
    "DEFAULT_MODEL",
    "ModelSource",
    "iter_gguf_tensors",
    "iter_safetensors",
    "iter_weights",
    "load_config",
    "load_gguf_config",
    "load_hf_config",
    "load_tokenizer",
    "read_gguf_header",
    "resolve_model",
]
