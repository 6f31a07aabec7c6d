"""The matmul branch for weights that are not dequantized before the dot: W8A8 int8 weights
(an int8 x int8 -> int32 dot with per-token activation scales) and calibration probes.

``llama.matmul`` asks :func:`applies` first and hands such operands to :func:`matmul`.
"""

from __future__ import annotations

from typing import Any

import jax

from jaxllm.quant.calibration import Probe, probe_matmul
from jaxllm.quant.w8a8 import W8A8Array
from jaxllm.quant.w8a8 import matmul as w8a8_matmul


def applies(x: Any, w: Any) -> bool:
    """Whether ``x @ w`` belongs to :func:`matmul`: ``w`` (or, for the vocab-major LM
    head, ``x``) is a ``W8A8Array`` or a calibration ``Probe``."""
    return isinstance(w, (W8A8Array, Probe)) or isinstance(x, W8A8Array)


def matmul(x: Any, w: Any, out_dtype: Any = None) -> jax.Array:
    """``x @ w`` for the operands :func:`applies` accepts."""
    if isinstance(w, Probe):
        return probe_matmul(x, w, out_dtype)
    return w8a8_matmul(x, w, out_dtype)
