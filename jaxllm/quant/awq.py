"""AWQ: activation-aware per-input-channel scaling, then int4 round to nearest.

For each linear group sharing an input ``x`` (``wqkv``, ``wo``, ``w_gate_up``, ``w_down``;
``jaxllm.quant.smoothing``), channels that carry large activations matter more, so their
weights are scaled up before quantization (finer relative grid) and the inverse scale is
folded into the op before the linear.  The scale is ``s = mean|x|^alpha`` per input
channel (normalized to straddle 1), with ``alpha`` searched on a grid of ``GRID`` points in
``[0, 1)`` to minimize ``||x W - (x / s) Q(s W)||^2`` on calibration activations of the
float model.  ``Q`` is the project's int4 RTN (asymmetric, groups along K, float16 scale
and offset), so the result is an ordinary int4 ``QuantizedArray``.

AWQ's second step then shrinks each (group, output column)'s range: the weight is
clipped to ``[r_lo min, r_hi max]`` with each ratio on a grid ``1, 0.95, ..., 0.55`` (100
pairs) chosen to minimize that group's share of the output error, ``d^T G_g d`` with
``d = w_g - Q(clip(w_g))`` and ``G_g`` the group's ``X_g^T X_g / n`` over all calibration rows
(outliers inside a group otherwise stretch its 16 levels for every other weight).

The searches run jitted in float32 (one compile per weight shape, candidates mapped with
``lax.map``); the final quantization is ``quantize_int4`` in float64 on the host.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.quant.methods import quantize_int4
from jaxllm.quant.smoothing import expand_heads, fold, normalized, pool_heads

GRID = 20
SEARCH_TOKENS = 512  # calibration rows the loss is measured on (evenly spaced subset)
CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(10))
log = logging.getLogger(__name__)


@partial(jax.jit, static_argnames="group_size")
def _losses(x: jax.Array, w: jax.Array, cands: jax.Array, group_size: int) -> jax.Array:
    """Mean squared output error of each candidate scale vector ``cands [G, K]``."""
    ref = x @ w

    def one(s: jax.Array) -> jax.Array:
        wq = fake_int4(w * s[:, None], group_size) / s[:, None]
        return jnp.mean(jnp.square((x @ wq) - ref))

    return jax.lax.map(one, cands)


def fake_int4(w: jax.Array, group_size: int) -> jax.Array:
    """Quantize-dequantize ``w [K, N]`` like ``quantize_int4`` (float16 scale and offset,
    codes 0..15), in float32."""
    k, n = w.shape
    g = w.reshape(k // group_size, group_size, n)
    lo, hi = g.min(axis=1, keepdims=True), g.max(axis=1, keepdims=True)
    scale = ((hi - lo) / 15.0).astype(jnp.float16).astype(jnp.float32)
    off = lo.astype(jnp.float16).astype(jnp.float32)
    q = jnp.clip(jnp.round((g - off) / jnp.where(scale == 0, 1.0, scale)), 0, 15)
    return (q * scale + off).reshape(k, n)


@partial(jax.jit, static_argnames="group_size")
def group_gram(x: jax.Array, group_size: int) -> jax.Array:
    """``[K/g, g, g]``: each K group's ``X_g^T X_g / n`` over the rows of ``x [n, K]``, so a
    group's share of the output error is ``d^T G_g d`` for a weight error ``d [g]``."""
    n, k = x.shape
    xg = x.reshape(n, k // group_size, group_size)
    return jnp.einsum("tgk,tgl->gkl", xg, xg, precision=jax.lax.Precision.HIGHEST) / n


@partial(jax.jit, static_argnames="group_size")
def _clip_errors(gram: jax.Array, w: jax.Array, ratios: jax.Array,
                 group_size: int) -> jax.Array:
    """``[R, K/g, N]``: each group's output error ``d^T G_g d`` with its range
    ``[min, max]`` shrunk to ``[r_lo min, r_hi max]`` for each ratio pair ``ratios [R, 2]``."""
    k, n = w.shape
    wg = w.reshape(k // group_size, group_size, n)
    lo, hi = wg.min(axis=1, keepdims=True), wg.max(axis=1, keepdims=True)

    def one(r: jax.Array) -> jax.Array:
        wc = jnp.clip(wg, lo * r[0], hi * r[1]).reshape(k, n)
        d = wg - fake_int4(wc, group_size).reshape(wg.shape)
        return jnp.sum(d * jnp.einsum("gkl,gln->gkn", gram, d), axis=1)

    return jax.lax.map(one, ratios)


def clip_ratios(x: np.ndarray, w: np.ndarray, group_size: int) -> np.ndarray:
    """``[K/g, 2, N]``: for each (group, column) of ``w [K, N]`` the ratios ``(r_lo, r_hi)``
    in ``CLIP_RATIOS`` whose range ``[r_lo min, r_hi max]`` gives the least output error on
    the rows of ``x``."""
    pairs = np.array([(a, b) for a in CLIP_RATIOS for b in CLIP_RATIOS], np.float32)
    gram = group_gram(jnp.asarray(x, jnp.float32), group_size)
    errs = np.asarray(_clip_errors(gram, jnp.asarray(w, jnp.float32), jnp.asarray(pairs),
                                   group_size))
    return np.moveaxis(pairs[np.argmin(errs, axis=0)], -1, 1).astype(np.float64)


def clip_weights(x: np.ndarray, w: np.ndarray, group_size: int) -> np.ndarray:
    """``w [K, N]`` with each (group, column) clipped to its :func:`clip_ratios` range."""
    r = clip_ratios(x, w, group_size)  # [K/g, 2, N]
    k, n = w.shape
    wg = np.asarray(w, np.float64).reshape(k // group_size, group_size, n)
    lo, hi = wg.min(axis=1, keepdims=True), wg.max(axis=1, keepdims=True)
    return np.clip(wg, lo * r[:, :1], hi * r[:, 1:]).reshape(k, n)


def search_scale(x: np.ndarray, w: np.ndarray, group_size: int, stat: np.ndarray,
                 expand: Any = None, grid: int = GRID) -> tuple[np.ndarray, float]:
    """``(s, alpha)`` minimizing the group's output error, ``s = normalized(stat^alpha)``.
    ``stat``: ``mean|x|`` per channel the scale is shared by (``[Hkv*hd]`` for ``wo``,
    with ``expand`` mapping it onto ``x``'s channels)."""
    alphas = np.arange(grid) / grid
    cands = np.stack([normalized(stat ** a) for a in alphas])
    full = np.stack([expand(c) for c in cands]) if expand is not None else cands
    step = max(1, x.shape[0] // SEARCH_TOKENS)
    losses = np.asarray(_losses(jnp.asarray(x[::step], jnp.float32),
                                jnp.asarray(w, jnp.float32),
                                jnp.asarray(full, jnp.float32), group_size))
    best = int(np.argmin(losses))
    return cands[best], float(alphas[best])


def scale_layer(lp: dict, acts: dict, cfg: Any, group_size: int) -> tuple[dict, dict]:
    """AWQ's scale search on one fused float layer: ``(lp with every group's scale folded
    in, {name: s [K]})``.  ``acts[name][0]``: the input ``[n, K]`` each linear saw on the
    calibration text.  ``wo`` and ``w_down`` go first: their scales fold into ``wqkv`` /
    ``w_gate_up`` columns, which are then searched as they will be quantized."""
    alphas, scales = {}, {}
    for name in ("wo", "w_down", "wqkv", "w_gate_up"):
        x = acts[name][0]
        mean = np.mean(np.abs(x.astype(np.float64)), axis=0)
        if name == "wo":
            s, alphas[name] = search_scale(x, lp[name], group_size,
                                           pool_heads(mean, cfg, np.mean),
                                           expand=lambda c: expand_heads(c, cfg))
        else:
            s, alphas[name] = search_scale(x, lp[name], group_size, mean)
        lp = fold(lp, name, s, cfg)
        scales[name] = (expand_heads(s, cfg) if name == "wo" else s).astype(np.float32)
    log.info("awq alphas %s", alphas)
    return lp, scales


def quantize_layer(lp: dict, acts: dict, cfg: Any, group_size: int, dtype: Any) -> dict:
    """One fused float layer ``lp`` -> its AWQ int4 layer: :func:`scale_layer`, then each
    scaled weight's clipping search and RTN."""
    lp, scales = scale_layer(lp, acts, cfg, group_size)
    out = dict(lp)
    for name in ("wqkv", "wo", "w_gate_up", "w_down"):
        x = acts[name][0] / scales[name][None, :]  # what the folded layer feeds s W
        try:
            out[name] = quantize_int4(clip_weights(x, lp[name], group_size), group_size, dtype)
        except ValueError as e:
            raise ValueError(f"cannot quantize weight {name!r} with awq-g{group_size}: {e}") \
                from None
    return out
