"""heron: an LLM inference and serving engine on PyTorch."""
from heron.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from heron.sampling_params import SamplingParams

__version__ = "0.1.0"


def __getattr__(name):
    # LLM pulls in torch models and transformers; import it lazily so `import heron` is light
    if name == "LLM":
        from heron.llm import LLM
        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "RequestMetrics"]
