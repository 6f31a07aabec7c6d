"""GPTQ: quantize a linear's input rows one at a time and push each row's rounding error
onto the rows not yet quantized, weighted by the inverse Hessian of the layer's
reconstruction loss ``||X W - X Q||^2`` (``H = 2 X^T X / n`` from calibration inputs).

Layout here is ``W [K, N]`` (``x @ W``), so GPTQ's "columns" (input channels) are rows.
Per block of ``BLOCK`` rows: for each row ``i``, ``q = Q(w_i)``, ``e = (w_i - q) / U_ii``,
``w_j -= U_ij e`` for the block's later rows, where ``U`` is the upper Cholesky factor of
``H^-1`` (``U^T U = H^-1``); after the block the accumulated errors update all later rows
in one matrix product (the lazy batch update).  Dead inputs (``H_ii = 0``) get zero
weights; ``H`` is dampened by ``DAMP * mean(diag H)``.

``Q`` is the project's own grid, so the result is an ordinary ``QuantizedArray``: int8 with
one scale per output channel from the original weight (``max|w| / 127``), or int4 groups of
``g`` along K with float16 scale ``(max - min) / 15`` and offset ``min`` taken from the
group's error-updated rows when the group starts.  ``act_order`` processes rows by
decreasing ``H_ii`` (most-used inputs first, while the most rows remain to absorb their
error) with the group grids fixed from the original weight beforehand ("static groups"),
so groups stay contiguous along K and the storage layout does not change.

NumPy float64 on the host, like the RTN methods: the row loop is sequential (``K``
dependent steps of small rank-1 updates), which a jitted ``fori_loop`` would run no faster
on CPU at these sizes and would compile once per shape; float64 keeps the Cholesky of a
rank-deficient ``H`` (fewer calibration tokens than ``K``) well away from breakdown.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.linalg

from jaxllm.quant.array import QuantizedArray
from jaxllm.quant.methods import pack_int4

BLOCK = 128
DAMP = 0.01


def hessian(x: np.ndarray) -> np.ndarray:
    """``2 X^T X / n`` in float64 from inputs ``x [n, K]``."""
    x64 = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
    return 2.0 * (x64.T @ x64) / max(1, x64.shape[0])


def _inverse_cholesky(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper ``U`` with ``U^T U = (H + damp * mean(diag H) I)^-1``, from one Cholesky and
    one triangular inverse: the Cholesky factor of the index-reversed ``H``, reversed
    back, is an upper ``R`` with ``H = R R^T``, so ``U = R^-1``."""
    h = h + damp * np.mean(np.diag(h)) * np.eye(len(h))
    r = np.linalg.cholesky(np.ascontiguousarray(h[::-1, ::-1]))[::-1, ::-1]
    u, info = scipy.linalg.lapack.dtrtri(np.ascontiguousarray(r), lower=0)
    if info != 0:
        raise ValueError(f"GPTQ: the dampened Hessian is singular (LAPACK dtrtri info {info})")
    return u


class _Grid:
    """The quantization grid of the rows being processed: ``int8`` (static per-column
    scales) or ``int4`` groups (set per group, statically or when the group starts)."""

    def __init__(self, w: np.ndarray, bits: int, group_size: int, static: bool,
                 clip: np.ndarray | None = None) -> None:
        self.bits, self.g, self.clip = bits, group_size, clip
        k, n = w.shape
        if bits == 8:
            self.scale = (np.max(np.abs(w), axis=0, keepdims=True) / 127.0).astype(np.float32)
        else:
            self.scale = np.zeros((k // group_size, n), np.float16)
            self.offset = np.zeros((k // group_size, n), np.float16)
            if static:
                for gi in range(k // group_size):
                    self.set_group(gi, w[gi * group_size:(gi + 1) * group_size])

    def set_group(self, gi: int, rows: np.ndarray) -> None:
        """Scale and offset of int4 group ``gi`` from its current ``rows [g, N]``."""
        lo, hi = rows.min(axis=0), rows.max(axis=0)
        if self.clip is not None:
            lo, hi = lo * self.clip[gi, 0], hi * self.clip[gi, 1]
        self.scale[gi] = ((hi - lo) / 15.0).astype(np.float16)
        self.offset[gi] = lo.astype(np.float16)

    def quantize(self, row: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(codes, dequantized)`` of weight row ``k`` (original index)."""
        if self.bits == 8:
            s = self.scale[0].astype(np.float64)
            codes = np.clip(np.rint(row / np.where(s == 0, 1.0, s)), -127, 127)
            return codes, codes * s
        s = self.scale[k // self.g].astype(np.float64)
        off = self.offset[k // self.g].astype(np.float64)
        codes = np.clip(np.rint((row - off) / np.where(s == 0, 1.0, s)), 0, 15)
        return codes, codes * s + off


def gptq_quantize(w: Any, h: np.ndarray, bits: int = 4, group_size: int = 128,
                  act_order: bool = False, dtype: Any = np.float32, damp: float = DAMP,
                  block: int = BLOCK, clip: np.ndarray | None = None) -> QuantizedArray:
    """GPTQ of one weight ``w [K, N]`` with Hessian ``h [K, K]`` (module docstring).
    ``bits``: 8 (per output channel) or 4 (groups of ``group_size`` along K).  ``clip``
    (int4 only): ``[K/g, 2, N]`` ratios ``(r_lo, r_hi)`` that shrink each group's grid to
    ``[r_lo min, r_hi max]`` (``awq.clip_ratios``)."""
    w = np.array(w, np.float64)
    k, n = w.shape
    if h.shape != (k, k):
        raise ValueError(f"Hessian shape {h.shape} does not match weight rows {k}")
    if bits == 4 and (group_size <= 0 or group_size % 2 or k % group_size
                      or block % group_size):
        raise ValueError(f"group_size {group_size} must be even and divide the contraction "
                         f"dimension {k} of a weight of shape {w.shape} (and block {block})")
    if bits not in (4, 8):
        raise ValueError(f"gptq bits must be 4 or 8, got {bits}")
    if clip is not None and (bits != 4 or np.shape(clip) != (k // group_size, 2, n)):
        raise ValueError(f"gptq clip ratios must be [K/g, 2, N] = {(k // group_size, 2, n)} "
                         f"with 4-bit groups, got shape {np.shape(clip)} at {bits} bits")
    h = np.array(h, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    grid = _Grid(w, bits, group_size, static=act_order, clip=clip)
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    u = _inverse_cholesky(h[np.ix_(order, order)], damp)
    wp = w[order]
    codes = np.zeros((k, n), np.float64)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        wb, err = wp[b0:b1].copy(), np.zeros((b1 - b0, n))
        for i in range(b1 - b0):
            row = order[b0 + i]
            if bits == 4 and not act_order and row % group_size == 0:
                grid.set_group(row // group_size, wb[i:i + group_size])
            c, deq = grid.quantize(wb[i], row)
            codes[row] = c
            err[i] = (wb[i] - deq) / u[b0 + i, b0 + i]
            wb[i + 1:] -= np.outer(u[b0 + i, b0 + i + 1:b1], err[i])
        wp[b1:] -= u[b0:b1, b1:].T @ err
    if bits == 8:
        return QuantizedArray(codes.astype(np.int8), grid.scale, None, bits=8, group_size=k,
                              packing="none", dtype=dtype)
    return QuantizedArray(pack_int4(codes.astype(np.uint8)), grid.scale, grid.offset, bits=4,
                          group_size=group_size, packing="interleaved", dtype=dtype)


def dequantize64(q: QuantizedArray) -> np.ndarray:
    """Float64 NumPy dequantization of a 2-D ``QuantizedArray`` from its codes."""
    codes = np.asarray(q.codes(), np.float64)
    k, n = codes.shape
    w = codes.reshape(k // q.group_size, q.group_size, n) * np.asarray(
        q.scales, np.float64)[:, None, :]
    if q.offsets is not None:
        w = w + np.asarray(q.offsets, np.float64)[:, None, :]
    return w.reshape(k, n)


def quantize_layer(lp: dict, run: Any, bits: int, group_size: int, act_order: bool,
                   dtype: Any) -> tuple[dict, np.ndarray]:
    """GPTQ of the four linears of a fused float layer, in execution order, each on the
    inputs produced with the earlier ones already quantized (``run(lp) -> {name: (x, y)}``
    runs the layer on the calibration hidden states).  Returns the quantized layer and the
    layer's output delta ``y_wo + y_down`` with every linear quantized (the next layer's
    input is ``x`` plus it)."""
    cur, out = dict(lp), dict(lp)
    for name in ("wqkv", "wo", "w_gate_up", "w_down"):
        acts = run(cur)
        x = acts[name][0]
        try:
            q = gptq_quantize(lp[name], hessian(x), bits, group_size, act_order, dtype)
        except ValueError as e:
            raise ValueError(f"cannot quantize weight {name!r} with gptq: {e}") from None
        out[name] = q
        cur[name] = dequantize64(q).astype(np.float32)
    y = acts["wo"][1].astype(np.float64) + x.astype(np.float64) @ cur["w_down"]
    return out, y.astype(np.float32)
