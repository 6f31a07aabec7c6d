"""Small-M (decode) matmul over quantized weights in Pallas: ``y = x @ dequantize(W)``.

``x [..., K]`` (float32 / bfloat16 / float16) times a 2-D untransposed
``jaxllm.quant.QuantizedArray`` ``W [K, N]`` read in its own layout (docs/quantization.md;
no repacking, no dequantized copy in HBM) -> ``y [..., N]`` float32, like the CPU kernel
``cpu_kernels.quantized_matmul``.  GPU: Pallas' Triton lowering; CPU: ``interpret=True``.

Weight layouts read:

* 8 bits, packing ``none``: ``values int8 [K, N]``;
* 4 bits, ``values uint8 [K/2, N]``: ``interleaved`` (byte r holds K index 2r in the low
  nibble, 2r+1 in the high one) or ``gguf32`` (byte 16b+j holds 32b+j low, 32b+j+16 high);
* ``scales [K/G, N]`` and ``offsets`` (same shape, or None) in float32 / float16 /
  bfloat16; ``W[k, n] = code[k, n] * scales[k // G, n] + offsets[k // G, n]``.

Arithmetic (the CPU kernel's): per *chunk* of ``c`` K rows inside one group ``g``,
``acc += scale[g] * (x_c @ codes_c) + offset[g] * sum(x_c)``.  The codes are converted to
``x``'s dtype in registers -- exact: |code| <= 127 fits bfloat16's 8-bit significand --
so the code dot runs at ``x``'s precision with float32 accumulation (bfloat16 / float16
``x``: tensor cores; float32 ``x``: IEEE, Pallas' default for float32 dots, not TF32), and
only the two per-chunk FMAs see the scales.  ``c`` is the largest power of two dividing ``G``, capped at ``block_k``
(int8 per channel, ``G = K = 576``: 9 chunks of 64); splitting a group is exact because
the epilogue is linear.  ``sum(x_c)`` is precomputed in float32 outside the kernel.

4-bit tiles: each program loads the ``[c/2, block_n]`` byte tile once and splits it with
``& 0xF`` / ``>> 4`` into a low-nibble and a high-nibble tile, each dotted with the
matching activations.  The wrapper reorders ``x`` once into *storage order* (``x_lo``
pairs with low nibbles, ``x_hi`` with high ones, both ``[Mp, K/2]``), so both packings
share one kernel and nothing is interleaved in registers.

Grid ``(N / block_n, splits)``: a program owns ``block_n`` output columns and a
contiguous range of chunks (split-K); each split writes a float32 partial
``[Mp, block_n]`` and XLA sums the splits.  ``M`` is padded to ``Mp = max(16, pow2(M))``
rows (a Triton dot needs >= 16); the padded rows are zero and dropped.  ``block_n`` is the
largest power of two dividing ``N`` (capped at ``block_n``), so production widths read
the weight in place; an ``N`` without a power-of-two factor >= 64 (or ``N`` itself, when
smaller) is padded, which copies the weight once per call.

Constraints (ValueError otherwise, so a dispatcher can fall back to XLA): ``G`` divides
``K`` and has a power-of-two factor >= 16 (8 bits) / >= 32 (4 bits: >= 16 byte rows per
dot); ``gguf32`` needs ``G == 32``.  docs/kernels.md, "Pallas quantized matmul (GPU)".
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import cdiv, compiler_params, dot_nn, next_pow2, pad_axis, round_up

# Split K only while the N tiles alone leave the GPU short of programs (~2 per SM on a
# 132-SM H100), and keep >= _MIN_SPLIT_K rows per split so the float32 partials stay small
# next to the codes.  Not measured on a GPU yet (no GPU in the session that wrote this).
_TARGET_PROGRAMS = 256
_MIN_SPLIT_K = 512
_MIN_BLOCK_N = 64  # below this a tile row is < 64 bytes of codes: pad N instead
MAX_ROWS = 16  # applies(): the decode sizes, one 16-row tile (the Triton dot minimum)


@dataclasses.dataclass(frozen=True)
class _Cfg:
    four_bit: bool
    has_offsets: bool
    group: int       # G: K rows sharing a scale
    chunk: int       # c: K rows per inner step (power of two, divides G)
    num_chunks: int  # K / c
    chunks_per_split: int


def _kernel(*refs, cfg: _Cfg) -> None:
    it = iter(refs)
    if cfg.four_bit:
        xlo_ref, xhi_ref = next(it), next(it)
    else:
        x_ref = next(it)
    w_ref, s_ref = next(it), next(it)
    if cfg.has_offsets:
        o_ref, xs_ref = next(it), next(it)
    out_ref = next(it)

    c = cfg.chunk
    first = pl.program_id(1) * cfg.chunks_per_split
    last = jnp.minimum(first + cfg.chunks_per_split, cfg.num_chunks)
    rows, bn = out_ref.shape

    def body(j, acc):
        g = lax.div(j * c, cfg.group)  # the chunk's group: its scale / offset row
        if cfg.four_bit:
            h = c // 2  # byte rows of the chunk
            b = w_ref[pl.ds(j * h, h), :]  # uint8 [h, bn]
            xlo = xlo_ref[:, pl.ds(j * h, h)]
            xhi = xhi_ref[:, pl.ds(j * h, h)]
            # Triton dots take signed operands only: widen the nibbles before converting.
            lo = (b & 0xF).astype(jnp.int32).astype(xlo.dtype)
            hi = (b >> 4).astype(jnp.int32).astype(xhi.dtype)
            part = dot_nn(xlo, lo) + dot_nn(xhi, hi)
        else:
            xc = x_ref[:, pl.ds(j * c, c)]
            part = dot_nn(xc, w_ref[pl.ds(j * c, c), :].astype(xc.dtype))
        acc = acc + part * s_ref[g, :].astype(jnp.float32)[None, :]
        if cfg.has_offsets:
            acc = acc + xs_ref[j, :][:, None] * o_ref[g, :].astype(jnp.float32)[None, :]
        return acc

    out_ref[...] = lax.fori_loop(first, last, body, jnp.zeros((rows, bn), jnp.float32))


def _is_quantized(w: Any) -> bool:
    """``w`` is a ``jaxllm.quant.QuantizedArray``, recognised by its fields: kernels sit
    below ``jaxllm`` and never import it (as ``cpu_kernels``)."""
    return all(hasattr(w, f) for f in ("values", "scales", "offsets", "bits", "group_size",
                                        "packing", "transposed", "stored_shape"))


def check_weight(w: Any, k: int | None = None, *, block_k: int = 128) -> None:
    """Raise ValueError naming what :func:`quantized_matmul` cannot read in ``w`` (and a
    contraction size ``k`` of ``x`` that does not match)."""
    if not _is_quantized(w):
        raise ValueError(f"quantized_matmul needs a QuantizedArray weight, got {type(w).__name__}")
    if w.transposed:
        raise ValueError(f"quantized_matmul needs an untransposed weight [K, N], got a "
                         f"transposed one: {w!r}")
    if w.ndim != 2:
        raise ValueError(f"quantized_matmul needs a 2-D weight [K, N], got a stacked one with "
                         f"stored shape {tuple(w.values.shape)} (slice the layer first)")
    if (w.bits, w.packing) not in ((8, "none"), (4, "interleaved"), (4, "gguf32")):
        raise ValueError(f"quantized_matmul reads 8-bit 'none' and 4-bit 'interleaved' / "
                         f"'gguf32' codes, got bits={w.bits} packing={w.packing!r}")
    want = jnp.dtype(jnp.int8 if w.bits == 8 else jnp.uint8)
    if jnp.dtype(w.values.dtype) != want:
        raise ValueError(f"quantized_matmul: {w.bits}-bit codes must be {want.name}, "
                         f"got {w.values.dtype}")
    kw, n = w.stored_shape
    if k is not None and k != kw:
        raise ValueError(f"quantized_matmul: K mismatch, x has {k} features but the weight "
                         f"is [{kw}, {n}]")
    g = w.group_size
    if g <= 0 or kw % g:
        raise ValueError(f"quantized_matmul: group size {g} must divide K={kw}")
    if w.packing == "gguf32" and g != 32:
        raise ValueError(f"quantized_matmul: gguf32 blocks need group size 32, got {g}")
    min_chunk = 32 if w.bits == 4 else 16
    if _chunk(g, block_k) < min_chunk:
        raise ValueError(f"quantized_matmul: group size {g} needs a power-of-two factor >= "
                         f"{min_chunk} for {w.bits}-bit codes (Triton dots take >= 16 rows)")
    for name in ("scales", "offsets"):
        a = getattr(w, name)
        if a is not None and tuple(a.shape) != (kw // g, n):
            raise ValueError(f"quantized_matmul: {name} must be [{kw // g}, {n}] "
                             f"(K/group, N), got {tuple(a.shape)}")


def applies(rows: int, w: Any, *, backend: str | None = None) -> bool:
    """Whether ``x [rows, K] @ w`` should take :func:`quantized_matmul`: a GPU backend
    with one device (a ``pallas_call`` has no sharding rule: a sharded weight would be
    gathered), at most :data:`MAX_ROWS` rows (decode) and a weight the kernel reads.
    Speed against XLA's fused dequantize-then-dot is not measured yet (no GPU so far)."""
    if (backend or jax.default_backend()) != "gpu" or not 0 < rows <= MAX_ROWS:
        return False
    if jax.device_count() != 1:
        return False
    if not _is_quantized(w):
        return False
    try:
        check_weight(w)
    except ValueError:
        return False
    return True


def _chunk(group: int, block_k: int) -> int:
    """Largest power of two dividing ``group``, capped at ``block_k``."""
    return min(group & -group, block_k)


def _block_n(n: int, block_n: int) -> tuple[int, int]:
    """``(bn, padded N)``: a power-of-two column tile dividing N when N has a large enough
    power-of-two factor, else N padded up to the tile."""
    bn = min(n & -n, block_n)
    if bn >= min(_MIN_BLOCK_N, block_n, next_pow2(n)) and bn >= 16:
        return bn, n
    bn = min(block_n, max(16, next_pow2(n)))
    return bn, round_up(n, bn)


def _auto_splits(num_chunks: int, chunk: int, n_blocks: int) -> int:
    by_programs = cdiv(_TARGET_PROGRAMS, n_blocks)
    by_size = max(1, num_chunks * chunk // _MIN_SPLIT_K)
    return max(1, min(num_chunks, by_programs, by_size))


def _storage_order(x: jax.Array, packing: str) -> tuple[jax.Array, jax.Array]:
    """``x [M, K]`` -> ``(x_lo, x_hi) [M, K/2]``: column r of each multiplies byte row r's
    low / high nibble."""
    m, k = x.shape
    if packing == "interleaved":  # byte r: K indices 2r (low), 2r+1 (high)
        pairs = x.reshape(m, k // 2, 2)
        return pairs[:, :, 0], pairs[:, :, 1]
    blocks = x.reshape(m, k // 32, 2, 16)  # gguf32: byte 16b+j: 32b+j (low), 32b+j+16 (high)
    return blocks[:, :, 0].reshape(m, k // 2), blocks[:, :, 1].reshape(m, k // 2)


@functools.partial(jax.jit, static_argnames=("block_n", "block_k", "k_splits", "interpret"))
def _quantized_matmul(x, w, *, block_n: int, block_k: int, k_splits: int | None,
                      interpret: bool):
    m, k = x.shape
    n = w.stored_shape[1]
    g = w.group_size
    c = _chunk(g, block_k)
    num_chunks = k // c
    mp = max(16, next_pow2(m))
    bn, np_ = _block_n(n, block_n)
    n_blocks = np_ // bn
    splits = k_splits or _auto_splits(num_chunks, c, n_blocks)
    cps = cdiv(num_chunks, min(splits, num_chunks))
    splits = cdiv(num_chunks, cps)  # no empty splits
    cfg = _Cfg(four_bit=w.bits == 4, has_offsets=w.offsets is not None, group=g, chunk=c,
               num_chunks=num_chunks, chunks_per_split=cps)

    xp = pad_axis(x, 0, mp)
    if cfg.four_bit:
        xs_in = list(_storage_order(xp, w.packing))
        x_spec = pl.BlockSpec((mp, k // 2), lambda i, s: (0, 0))
        in_specs = [x_spec, x_spec]
    else:
        xs_in = [xp]
        in_specs = [pl.BlockSpec((mp, k), lambda i, s: (0, 0))]
    vals = pad_axis(jnp.asarray(w.values), 1, np_)
    scales = jnp.asarray(w.scales)
    if scales.dtype not in (jnp.float32, jnp.float16, jnp.bfloat16):
        scales = scales.astype(jnp.float32)
    in_specs += [pl.BlockSpec((vals.shape[0], bn), lambda i, s: (0, i)),
                 pl.BlockSpec((k // g, bn), lambda i, s: (0, i))]
    args = [*xs_in, vals, pad_axis(scales, 1, np_)]
    if cfg.has_offsets:
        offsets = jnp.asarray(w.offsets)
        if offsets.dtype not in (jnp.float32, jnp.float16, jnp.bfloat16):
            offsets = offsets.astype(jnp.float32)
        # per-chunk activation sums (float32, once per call) for the offset term
        xsum = xp.astype(jnp.float32).reshape(mp, num_chunks, c).sum(-1).T  # [chunks, Mp]
        in_specs += [pl.BlockSpec((k // g, bn), lambda i, s: (0, i)),
                     pl.BlockSpec((num_chunks, mp), lambda i, s: (0, 0))]
        args += [pad_axis(offsets, 1, np_), xsum]

    partial = pl.pallas_call(
        functools.partial(_kernel, cfg=cfg),
        grid=(n_blocks, splits),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, mp, bn), lambda i, s: (s, 0, i)),
        out_shape=jax.ShapeDtypeStruct((splits, mp, np_), jnp.float32),
        compiler_params=compiler_params(interpret, num_warps=4, num_stages=2),
        interpret=interpret,
        name="jaxllm_quant_matmul",
    )(*args)
    y = partial[0] if splits == 1 else jnp.sum(partial, axis=0)
    return y[:m, :n]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _differentiable(x, w, block_n, block_k, k_splits, interpret):
    return _quantized_matmul(x, w, block_n=block_n, block_k=block_k, k_splits=k_splits,
                             interpret=interpret)


def _differentiable_fwd(x, w, block_n, block_k, k_splits, interpret):
    return _differentiable(x, w, block_n, block_k, k_splits, interpret), (x, w)


def _differentiable_bwd(block_n, block_k, k_splits, interpret, res, dy):
    """Plain XLA (training through a quantized weight is not the decode case): the
    gradients of dequantize-then-dot in ``x``, the scales and the offsets (float0 for the
    integer codes)."""
    x, w = res
    _, vjp = jax.vjp(lambda x, w: x.astype(jnp.float32) @ w.dequantize(jnp.float32), x, w)
    return vjp(dy)


_differentiable.defvjp(_differentiable_fwd, _differentiable_bwd)


def quantized_matmul(x: jax.Array, w: Any, *, block_n: int = 128, block_k: int = 128,
                     k_splits: int | None = None, interpret: bool | None = None) -> jax.Array:
    """``x [..., K] @ w`` -> ``[..., N]`` float32, ``w`` a 2-D untransposed
    ``jaxllm.quant.QuantizedArray`` dequantized tile by tile in registers (module doc).

    ``block_n`` / ``block_k``: powers of two capping the column tile and the K rows per
    inner step; ``k_splits``: K splits (default: only when the N tiles are too few);
    ``interpret``: default True on the CPU backend.  Differentiable in ``x``, the scales
    and the offsets (plain-XLA backward, as the CPU kernel).  Raises ValueError
    (:func:`check_weight`) for a weight it cannot read or a K mismatch.  Meant for few
    rows (decode); it works for any M but keeps all ``Mp`` rows in one tile.
    """
    for name, blk in (("block_n", block_n), ("block_k", block_k)):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"{name}={blk} must be a power of two >= 16")
    if k_splits is not None and k_splits < 1:
        raise ValueError(f"k_splits={k_splits} must be >= 1")
    check_weight(w, x.shape[-1], block_k=block_k)
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    if x.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        x = x.astype(jnp.float32)
    lead = x.shape[:-1]
    y = _differentiable(x.reshape(-1, x.shape[-1]), w, block_n, block_k, k_splits,
                        bool(interpret))
    return y.reshape(*lead, y.shape[-1])
