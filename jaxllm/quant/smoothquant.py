"""SmoothQuant W8A8: migrate activation outliers into the weights, then int8 both.

Per input channel ``j`` of a linear group, ``s_j = max|x_j|^alpha / max|W_j|^(1 - alpha)``
(``alpha``: migration strength, 0.5 by default); ``x / s`` and ``s * W`` then have
comparable per-channel ranges, so per-token int8 activations lose less to a few outlier
channels.  ``1 / s`` folds exactly into what precedes each group
(``jaxllm.quant.smoothing``): the two RMSNorm weights, V's columns for ``wo`` and the
``up`` half for ``w_down`` (the paper smooths the norm-preceded groups; the two column
folds are exact too and cover ``w_down``'s inputs, where Llama's activation outliers are
largest).  The smoothed weights are stored as :class:`jaxllm.quant.w8a8.W8A8Array`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxllm.quant.smoothing import fold, pool_heads
from jaxllm.quant.w8a8 import quantize_w8a8

DEFAULT_ALPHA = 0.5


def smoothing_scale(x_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    """``max|x|^alpha / max|W|^(1-alpha)`` per channel; channels that are zero on either
    side get scale 1 (nothing to migrate)."""
    x_max, w_max = np.asarray(x_max, np.float64), np.asarray(w_max, np.float64)
    ok = (x_max > 0) & (w_max > 0)
    s = np.ones_like(x_max)
    s[ok] = x_max[ok] ** alpha / w_max[ok] ** (1.0 - alpha)
    return np.clip(s, 1e-5, 1e5)


def quantize_layer(lp: dict, acts: dict, cfg: Any, alpha: float, dtype: Any) -> dict:
    """One fused float layer -> its smoothed W8A8 layer; ``acts[name][0]``: each linear's
    calibration input ``[n, K]`` in the float model."""
    for name in ("wo", "w_down", "wqkv", "w_gate_up"):
        x_max = np.max(np.abs(acts[name][0]), axis=0)
        w_max = np.max(np.abs(np.asarray(lp[name], np.float64)), axis=1)
        if name == "wo":  # one scale per (kv head, dim): see jaxllm.quant.smoothing
            x_max, w_max = pool_heads(x_max, cfg, np.max), pool_heads(w_max, cfg, np.max)
        lp = fold(lp, name, smoothing_scale(x_max, w_max, alpha), cfg)
    out = dict(lp)
    for name in ("wqkv", "wo", "w_gate_up", "w_down"):
        out[name] = quantize_w8a8(lp[name], dtype)
    return out
