"""W8A8: int8 weights (one scale per output channel) times int8 activations (one scale per
token, computed at run time), multiplied as ``int8 x int8 -> int32`` and rescaled to float.

Why a sibling of :class:`jaxllm.quant.QuantizedArray` and not a variant of it: the int8 dot
wants the weight stored output-major (``[N, K]``, K contiguous: the form XLA:CPU's int8 dot
ran fastest in, docs/quantization.md), while ``QuantizedArray`` stores ``[K, N]`` with
groups along K for weight-only dequantization; and a separate type keeps the weight-only
path (and the C++ kernels that read ``QuantizedArray``) from ever seeing these weights.

``y = (q_x . q_w) * s_x * s_w`` with ``q_x = round(x * 127 / max|x_row|)``: exact integer
accumulation, so the only errors are the two roundings to int8.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import cpu_kernels


@jax.tree_util.register_pytree_node_class
class W8A8Array:
    """A row-quantized int8 matrix ``M = values * scales[..., :, None]`` standing in for a
    float weight.

    ``values int8 [..., R, C]``, ``scales float32 [..., R]`` (one per row).  The logical
    array is ``M.T`` when ``transposed`` (a projection ``W [K, N]`` stored as ``[N, K]``,
    rows = output channels) or ``M`` itself (an embedding ``[V, D]``: rows are tokens, and
    its ``.T`` is the tied LM head with one scale per vocabulary entry).  A leading layer
    axis on both children makes a stack that ``scan`` slices like any stacked weight.

    ``act_axis``: the mesh axis that splits the contraction dimension (a row-parallel
    projection under tensor parallelism, set by ``sharding.rules``): each token's
    activation scale is then the maximum over all shards (``pmax``), as on one device.
    """

    def __init__(self, values: Any, scales: Any, *, dtype: Any = jnp.float32,
                 transposed: bool = True, act_axis: str | None = None) -> None:
        self.values, self.scales = values, scales
        self.dtype = jnp.dtype(dtype)
        self.transposed = bool(transposed)
        self.act_axis = act_axis

    def tree_flatten(self):
        return (self.values, self.scales), (self.dtype.name, self.transposed, self.act_axis)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, dtype=aux[0], transposed=aux[1], act_axis=aux[2])

    def _replace(self, **kw: Any) -> "W8A8Array":
        f = dict(values=self.values, scales=self.scales, dtype=self.dtype,
                 transposed=self.transposed, act_axis=self.act_axis)
        f.update(kw)
        return W8A8Array(f.pop("values"), f.pop("scales"), **f)

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, r, c = self.values.shape
        return (*lead, c, r) if self.transposed else (*lead, r, c)

    @property
    def ndim(self) -> int:
        return len(self.values.shape)

    @property
    def T(self) -> "W8A8Array":
        """Transpose of a 2-D matrix (metadata only)."""
        if self.ndim != 2:
            raise ValueError(f"W8A8Array.T needs a 2-D array, got shape {self.shape}")
        return self._replace(transposed=not self.transposed)

    def astype(self, dtype: Any) -> "W8A8Array":
        """Same codes, computing in ``dtype``."""
        return self._replace(dtype=dtype)

    def columns(self, lo: int, hi: int) -> "W8A8Array":
        """Logical columns ``lo:hi``: rows of the stored matrix (with their scales) when
        ``transposed``, else a slice of every row (the row scales unchanged)."""
        if self.transposed:
            return self._replace(values=self.values[..., lo:hi, :], scales=self.scales[..., lo:hi])
        return self._replace(values=self.values[..., lo:hi])

    @property
    def nbytes(self) -> int:
        return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
                   for a in (self.values, self.scales))

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """The float array this stands for (float32 product, rounded once)."""
        m = jnp.asarray(self.values, jnp.float32) * jnp.asarray(self.scales, jnp.float32)[..., None]
        m = m.astype(dtype or self.dtype)
        return jnp.swapaxes(m, -1, -2) if self.transposed else m

    def __getitem__(self, index: Any) -> Any:
        """``w[i]`` on a stack: the i-th matrix.  ``w[tokens]`` on a 2-D embedding
        (untransposed): the float rows ``[*tokens.shape, C]``, dequantized after the
        gather."""
        if self.ndim > 2:
            return jax.tree.map(lambda a: a[index], self)
        if self.transposed:
            return self.dequantize()[index]
        idx = jnp.asarray(index)
        rows = jnp.take(jnp.asarray(self.values), idx, axis=0).astype(jnp.float32)
        return (rows * jnp.take(jnp.asarray(self.scales), idx, axis=0)[..., None]).astype(
            self.dtype)

    def __repr__(self) -> str:
        return f"W8A8Array(shape={self.shape}, dtype={self.dtype.name})"


def quantize_w8a8(w: Any, dtype: Any = jnp.float32, rows: bool = False) -> W8A8Array:
    """Symmetric int8 with one scale per output channel of ``w [..., K, N]`` (stored
    ``[..., N, K]``), or with ``rows=True`` one scale per row of an embedding ``[V, D]``
    (stored as it is).  Math in float64 on the host: ``scale = max|row| / 127``."""
    w64 = np.asarray(w, np.float64)
    if w64.ndim < 2:
        raise ValueError(f"quantize_w8a8 needs a [..., K, N] matrix, got shape {w64.shape}")
    m = w64 if rows else np.swapaxes(w64, -1, -2)
    scale = (np.max(np.abs(m), axis=-1) / 127.0).astype(np.float32)
    safe = np.where(scale == 0, 1.0, scale.astype(np.float64))
    q = np.clip(np.rint(m / safe[..., None]), -127, 127).astype(np.int8)
    return W8A8Array(np.ascontiguousarray(q), scale, dtype=dtype, transposed=not rows)


def quantize_activations(x: jax.Array, axis: str | None = None) -> tuple[jax.Array, jax.Array]:
    """Per-row (per-token) symmetric int8 of ``x [M, K]``: ``(codes int8, scale [M, 1])``
    with ``codes = round(x * (127 / max|x_row|))`` (round half to even), ``x ~ codes *
    scale``.  An all-zero row gets scale 0 and codes 0.  ``axis``: a mesh axis over which
    ``x``'s K is split (inside ``shard_map``): the row maximum is taken over all shards."""
    x32 = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=-1, keepdims=True)
    if axis is not None:
        amax = jax.lax.pmax(amax, axis)
    inv = jnp.where(amax > 0, 127.0 / jnp.where(amax > 0, amax, 1.0), 0.0)
    codes = jnp.clip(jnp.round(x32 * inv), -127, 127).astype(jnp.int8)
    return codes, amax / 127.0


def matmul(x: jax.Array, w: Any, out_dtype: Any = None) -> jax.Array:
    """``x @ w`` where ``w`` is a :class:`W8A8Array` (``x [..., K]``), or, for the
    vocab-major LM head, ``x`` is the (untransposed) ``W8A8Array [V, D]`` and ``w`` the
    activations ``[D, M]`` (result ``[V, M]``).  Activations are quantized per token."""
    if isinstance(x, W8A8Array):  # weight on the left: M @ h^T, contracting both minor axes
        if x.transposed or x.ndim != 2:
            raise ValueError(f"W8A8 matmul with the weight on the left needs an untransposed "
                             f"2-D weight, got {x!r}")
        return _int8_dot(w.T, x, out_major=True).astype(out_dtype or x.dtype)
    if not w.transposed or w.ndim != 2:
        raise ValueError(f"W8A8 matmul needs a 2-D weight with one scale per output channel "
                         f"(transposed storage), got {w!r}")
    lead = x.shape[:-1]
    y = _int8_dot(x.reshape(math.prod(lead), x.shape[-1]), w)
    return y.reshape(*lead, y.shape[-1]).astype(out_dtype or x.dtype)


def _int8_dot(x2: jax.Array, w: W8A8Array, out_major: bool = False) -> jax.Array:
    """``x2 [M, K]`` times the weight whose rows are the output channels: float32
    ``[M, N]`` (``[N, M]`` with ``out_major``, computed in that order rather than
    transposed).  Decode rows on CPU take the C++ int8 kernel (``cpu_kernels.int8_matmul``:
    the same int32 sums); otherwise XLA's dot, with a single row padded to two on CPU
    (XLA:CPU's int8 dot with one row took ~25x longer than with two: docs/quantization.md)."""
    codes, sx = quantize_activations(x2, None if out_major else w.act_axis)
    ws = jnp.asarray(w.scales, jnp.float32)
    acc = _int32_dot(codes, jnp.asarray(w.values), out_major)
    if out_major:
        return acc.astype(jnp.float32) * sx.T * ws[:, None]
    return acc.astype(jnp.float32) * sx * ws[None, :]


def _int32_dot(codes: jax.Array, values: jax.Array, out_major: bool) -> jax.Array:
    """The exact int32 sums ``codes [M, K] . values [N, K]^T`` (``[N, M]`` with
    ``out_major``): the C++ kernel for decode rows on CPU, else XLA's ``dot_general``."""
    rows = codes.shape[0]
    if cpu_kernels.int8_applies(rows):  # same int32s as XLA's, faster (decode)
        acc = cpu_kernels.int8_matmul(codes, values)
        return acc.T if out_major else acc
    if rows == 1 and jax.default_backend() == "cpu":
        codes = jnp.concatenate([codes, jnp.zeros_like(codes)])
    dims = (((1,), (1,)), ((), ()))
    if out_major:
        return jax.lax.dot_general(values, codes, dims,
                                   preferred_element_type=jnp.int32)[:, :rows]
    return jax.lax.dot_general(codes, values, dims, preferred_element_type=jnp.int32)[:rows]
