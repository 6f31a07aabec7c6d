"""The quantized weight type: a pytree that stands in for a float ``[..., K, N]`` weight.

Layout (``docs/quantization.md``): the logical weight is ``W [..., K, N]`` used as
``x @ W`` (K contracted); quantization groups run along K.

- ``values``: ``int8 [..., K, N]`` (8 bits) or ``uint8 [..., K/2, N]`` holding two 4-bit
  codes per byte (4 bits; ``packing`` says which K index goes in which nibble).
- ``scales``: ``[..., K/group_size, N]``; per output channel when ``group_size == K``.
- ``offsets``: like ``scales`` or None; ``W = codes * scales + offsets`` (the asymmetric
  zero point kept in the float domain: ``offset = -scale * zero_point``, GGUF Q4_1's ``m``).

Static metadata (bits, group size, packing, compute dtype, transposed) is the pytree's aux
data, so ``jit``/``scan`` see only the arrays; a leading layer axis on every child is
sliced by ``scan`` like any stacked weight.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PACKINGS = ("none", "interleaved", "gguf32")


def unpack_codes(values: Any, packing: str) -> Any:
    """Codes stored with ``packing`` (see :class:`QuantizedArray`) unpacked to
    ``[..., K, N]``: numpy in, numpy out (loaders); jax in, jax out."""
    xp = np if isinstance(values, np.ndarray) else jnp
    if packing == "none":
        return values
    lo, hi = values & 0xF, values >> 4
    *lead, kh, n = values.shape
    if packing == "interleaved":
        return xp.stack([lo, hi], axis=-2).reshape(*lead, 2 * kh, n)
    # gguf32: per 32-element block, 16 bytes; low nibbles are elements 0..15
    lo = lo.reshape(*lead, kh // 16, 16, n)
    hi = hi.reshape(*lead, kh // 16, 16, n)
    return xp.concatenate([lo, hi], axis=-2).reshape(*lead, 2 * kh, n)


@jax.tree_util.register_pytree_node_class
class QuantizedArray:
    """A quantized matrix (or stack of matrices) that model code uses like a float weight.

    ``llama.matmul`` dequantizes it before the dot (XLA fuses the convert on GPU);
    ``w[tokens]`` on a 2-D embedding returns float rows; ``w[i]`` on a stack returns the
    i-th quantized matrix; ``w.T`` and ``w.astype(dtype)`` are free metadata changes.

    Args:
        values: the codes (see module docstring for shapes).
        scales: per-group scales ``[..., K/group_size, N]``.
        offsets: per-group additive zero points (same shape as ``scales``) or None
            (symmetric).
        bits: 8 or 4.
        group_size: K elements sharing one scale.
        packing: ``"none"`` (8 bits), ``"interleaved"`` (4 bits: byte i holds K index
            2i low, 2i+1 high) or ``"gguf32"`` (4 bits, GGUF Q4 blocks of 32: byte j of a
            block holds index j low, j+16 high).
        dtype: the float dtype it dequantizes to and reports as ``.dtype``.
        transposed: the logical array is the stored matrix's transpose (a tied embedding
            ``[V, D]`` stored as the head ``[D, V]`` so groups run along D).
    """

    def __init__(self, values: Any, scales: Any, offsets: Any = None, *, bits: int = 8,
                 group_size: int, packing: str = "none", dtype: Any = jnp.float32,
                 transposed: bool = False) -> None:
        self.values, self.scales, self.offsets = values, scales, offsets
        self.bits, self.group_size, self.packing = int(bits), int(group_size), packing
        self.dtype = jnp.dtype(dtype)
        self.transposed = bool(transposed)

    # ------------------------------------------------------------------ pytree
    def tree_flatten(self):
        aux = (self.bits, self.group_size, self.packing, self.dtype.name, self.transposed)
        return (self.values, self.scales, self.offsets), aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        bits, group, packing, dtype, transposed = aux
        return cls(*children, bits=bits, group_size=group, packing=packing, dtype=dtype,
                   transposed=transposed)

    def _replace(self, **kw: Any) -> "QuantizedArray":
        f = dict(values=self.values, scales=self.scales, offsets=self.offsets, bits=self.bits,
                 group_size=self.group_size, packing=self.packing, dtype=self.dtype,
                 transposed=self.transposed)
        f.update(kw)
        return QuantizedArray(f.pop("values"), f.pop("scales"), f.pop("offsets"), **f)

    # ------------------------------------------------------------------ array-like
    @property
    def stored_shape(self) -> tuple[int, ...]:
        """Shape of the stored (untransposed) matrix ``[..., K, N]``."""
        *lead, k, n = self.values.shape
        return (*lead, k * (8 // self.bits) if self.packing != "none" else k, n)

    @property
    def shape(self) -> tuple[int, ...]:
        s = self.stored_shape
        return (*s[:-2], s[-1], s[-2]) if self.transposed else s

    @property
    def ndim(self) -> int:
        return len(self.values.shape)

    @property
    def T(self) -> "QuantizedArray":
        """Transpose of a 2-D quantized matrix (metadata only)."""
        if self.ndim != 2:
            raise ValueError(f"QuantizedArray.T needs a 2-D array, got shape {self.shape}")
        return self._replace(transposed=not self.transposed)

    def astype(self, dtype: Any) -> "QuantizedArray":
        """Same codes, dequantizing to ``dtype``."""
        return self._replace(dtype=dtype)

    def columns(self, lo: int, hi: int) -> "QuantizedArray":
        """Logical columns ``lo:hi`` (the output axis N: every child's last axis)."""
        if self.transposed:
            raise ValueError("QuantizedArray.columns: a transposed array's columns cut "
                             "across its quantization groups")
        return jax.tree.map(lambda a: a[..., lo:hi], self)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored codes, scales and offsets."""
        return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
                   for a in (self.values, self.scales, self.offsets) if a is not None)

    def __getitem__(self, index: Any) -> Any:
        """``w[i]`` on a stack: the i-th quantized matrix.  ``w[tokens]`` on a 2-D
        (embedding) array: the float rows ``[*tokens.shape, D]``, dequantized after the
        gather so only the looked-up rows are expanded."""
        if self.ndim > 2:
            return jax.tree.map(lambda a: a[index], self)
        if not self.transposed:  # rows of the stored [K, N] cut across groups
            return self.dequantize()[index]
        idx = jnp.asarray(index)
        cols = jax.tree.map(lambda a: jnp.take(a, idx.reshape(-1), axis=-1), self)
        rows = cols._replace(transposed=False).dequantize().T  # [M, D]
        return rows.reshape(*idx.shape, rows.shape[-1])

    def __repr__(self) -> str:
        return (f"QuantizedArray(shape={self.shape}, bits={self.bits}, "
                f"group_size={self.group_size}, packing={self.packing!r}, "
                f"dtype={self.dtype.name}, symmetric={self.offsets is None})")

    # ------------------------------------------------------------------ dequantize
    def codes(self) -> jax.Array:
        """The integer codes unpacked to ``[..., K, N]`` (int8 or uint8 0..15)."""
        return unpack_codes(jnp.asarray(self.values), self.packing)

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """The float array this stands for (``dtype``: default ``self.dtype``); the
        product is formed in float32 and rounded once."""
        q = self.codes().astype(jnp.float32)
        *lead, k, n = q.shape
        g = self.group_size
        q = q.reshape(*lead, k // g, g, n)
        w = q * jnp.asarray(self.scales, jnp.float32)[..., :, None, :]
        if self.offsets is not None:
            w = w + jnp.asarray(self.offsets, jnp.float32)[..., :, None, :]
        w = w.reshape(*lead, k, n).astype(dtype or self.dtype)
        return jnp.swapaxes(w, -1, -2) if self.transposed else w


def is_quantized(x: Any) -> bool:
    """Whether ``x`` is a :class:`QuantizedArray`."""
    return isinstance(x, QuantizedArray)


def tree_nbytes(tree: Any) -> int:
    """Bytes of all arrays in a params pytree (quantized leaves at their stored size)."""
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
               for a in jax.tree.leaves(tree))
