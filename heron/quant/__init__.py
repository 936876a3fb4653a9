"""Weight-only quantization (int8 per output channel, int4 group-wise) on PyTorch's packed CPU kernels."""
from heron.quant.weight_only import (
    INT4_GROUP_SIZES,
    METHODS,
    QuantizedWeight,
    quantize,
    quantize_int4,
    quantize_int8,
)

__all__ = ["INT4_GROUP_SIZES", "METHODS", "QuantizedWeight", "quantize", "quantize_int4", "quantize_int8"]
