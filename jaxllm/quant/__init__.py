"""Weight quantization: a quantized array type model code uses like a float weight,
round-to-nearest int8 / int4 methods, and the calibrated AWQ, GPTQ and SmoothQuant W8A8.
Layout and measurements: docs/quantization.md.

>>> from jaxllm.quant import quantize_params
>>> qparams = quantize_params(params, "int4-g64")   # then llama.forward(qparams, ...)
"""

from jaxllm.quant import ops
from jaxllm.quant.array import QuantizedArray, is_quantized, tree_nbytes
from jaxllm.quant.calibration import Calibration, split_tokens
from jaxllm.quant.methods import (DEFAULT_INT4_GROUP, INT4_GROUP_SIZES, QuantConfig, quantize,
                                  quantize_int4, quantize_int8, quantize_params)
from jaxllm.quant.w8a8 import W8A8Array, quantize_w8a8

__all__ = ["QuantizedArray", "QuantConfig", "is_quantized", "tree_nbytes", "quantize",
           "quantize_int8", "quantize_int4", "quantize_params", "INT4_GROUP_SIZES",
           "DEFAULT_INT4_GROUP", "Calibration", "split_tokens", "W8A8Array", "quantize_w8a8",
           "ops"]
