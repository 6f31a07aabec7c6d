"""Native CPU kernels called through ``jax.ffi``, beside their XLA twins.

Used only on the CPU backend and only where they measured faster than XLA:CPU (the
dispatch in ``jaxllm.attention`` / ``jaxllm.models.llama`` decides; see
docs/cpu_kernels.md).  The C++ sources are compiled with the system compiler on first
use (:mod:`cpu_kernels.build`).  ``JAXLLM_CPU_KERNELS``:

* unset -- build on first use; if that fails, log one line and use XLA;
* ``0`` -- never use the kernels;
* ``1`` -- raise if they cannot be built, and also take the small-M matmul for float32
  weights at every row count it supports (the measured threshold is 1-16 rows).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["active", "available", "check_quantized", "forced", "int8_applies", "int8_matmul",
           "matmul", "matmul_applies", "override", "paged_decode_attention", "quantized_matmul"]

_log = logging.getLogger("jaxllm.cpu_kernels")
_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool, "lib": ctypes handle (kept alive)
_TARGETS = {"paged_decode": "JaxllmPagedDecodeAttention", "small_matmul": "JaxllmSmallMatmul",
            "small_matmul_nt": "JaxllmSmallMatmulNT", "quant_matmul": "JaxllmQuantMatmul",
            "int8_matmul": "JaxllmInt8Matmul"}
_override: list[bool] = []  # innermost override() wins


def _mode() -> str:
    return os.environ.get("JAXLLM_CPU_KERNELS", "").strip().lower()


def forced() -> bool:
    """True when ``JAXLLM_CPU_KERNELS=1`` (see the module docstring)."""
    return _mode() in ("1", "on", "true", "yes")


def available() -> bool:
    """Whether the kernels can be used in this process (builds and registers on first call).

    False when ``JAXLLM_CPU_KERNELS=0`` or the build failed (logged once); a failed build
    raises instead when ``JAXLLM_CPU_KERNELS=1``.
    """
    if _override:
        if not _override[-1]:
            return False
    elif _mode() in ("0", "off", "false", "no"):
        return False
    with _lock:
        if "ok" not in _state:
            _state["ok"] = _load()
        return bool(_state["ok"])


def active() -> bool:
    """Whether dispatch sites should use the kernels now: CPU backend with one device
    (the FFI calls have no sharding rule: a sharded operand would be gathered) and
    :func:`available`."""
    return (jax.default_backend() == "cpu" and jax.device_count() == 1 and available())


@contextlib.contextmanager
def override(enabled: bool):
    """Force the kernels on or off while tracing inside the block, whatever
    ``JAXLLM_CPU_KERNELS`` says (tests and benchmarks use it to trace the XLA twins)."""
    _override.append(enabled)
    try:
        yield
    finally:
        _override.pop()


def _load() -> bool:
    from cpu_kernels.build import BuildError, build

    try:
        path = build()
        lib = ctypes.cdll.LoadLibrary(str(path))
        for name, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(f"jaxllm_{name}",
                                        jax.ffi.pycapsule(getattr(lib, symbol)),
                                        platform="cpu")
    except (BuildError, OSError, AttributeError) as e:
        if forced():
            raise RuntimeError(f"JAXLLM_CPU_KERNELS=1 but the CPU kernels failed: {e}") from e
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        reason = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
        _log.warning("CPU kernels unavailable, using the XLA paths (JAXLLM_CPU_KERNELS=0 "
                     "skips the build): %s", reason)
        return False
    _state["lib"] = lib
    return True


def _reset_for_tests() -> None:
    """Forget the cached availability (tests toggle the environment)."""
    with _lock:
        _state.pop("ok", None)


def paged_decode_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    lengths: jax.Array,
    *,
    sm_scale: float,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
    k_scales: jax.Array | None = None,
    v_scales: jax.Array | None = None,
) -> jax.Array:
    """Decode attention over the page pool; same contract as
    ``jaxllm.attention.paged_decode_attention`` (``q [B,Hq,D]``, pools
    ``[P,page,Hkv,D]`` float32, bfloat16 (or its bits as uint16) or int8 with float32
    scales ``[P,page,Hkv]``).  Pools are read in place and widened in registers.

    Call :func:`available` first.  Returns ``[B,Hq,D]`` in ``q``'s dtype.
    """
    if q.dtype not in (jnp.float32, jnp.bfloat16):
        q = q.astype(jnp.float32)
    if k_pages.dtype == jnp.int8:
        if k_scales is None or v_scales is None:
            raise ValueError("int8 pools need k_scales and v_scales")
        ks, vs = k_scales.astype(jnp.float32), v_scales.astype(jnp.float32)
    else:
        ks = vs = jnp.zeros((0,), jnp.float32)  # unused by the kernel
    if k_pages.dtype not in (jnp.float32, jnp.bfloat16, jnp.uint16, jnp.int8):
        k_pages, v_pages = k_pages.astype(jnp.float32), v_pages.astype(jnp.float32)
    v_pages = v_pages.astype(k_pages.dtype)
    call = jax.ffi.ffi_call("jaxllm_paged_decode",
                            jax.ShapeDtypeStruct(q.shape, jnp.float32),
                            vmap_method="sequential")
    out = call(q, k_pages, v_pages, block_tables.astype(jnp.int32),
               lengths.astype(jnp.int32), ks, vs, sm_scale=np.float32(sm_scale),
               soft_cap=np.float32(soft_cap or 0.0),
               window=np.int64(sliding_window or 0))
    return out.astype(q.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _small_matmul(x: jax.Array, w: jax.Array, transposed: bool) -> jax.Array:
    n = w.shape[0] if transposed else w.shape[1]
    return jax.ffi.ffi_call("jaxllm_small_matmul_nt" if transposed else "jaxllm_small_matmul",
                            jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32),
                            vmap_method="sequential")(x, w)


def _small_matmul_fwd(x, w, transposed):
    return _small_matmul(x, w, transposed), (x, w)


def _small_matmul_bwd(transposed, res, dy):  # training never needs a kernel here: plain XLA
    x, w = res
    wf = w.astype(jnp.float32)
    if transposed:  # y = x @ w.T
        return (dy @ wf).astype(x.dtype), (dy.T @ x.astype(jnp.float32)).astype(w.dtype)
    dx = (dy @ wf.T).astype(x.dtype)
    dw = (x.astype(jnp.float32).T @ dy).astype(w.dtype)
    return dx, dw


_small_matmul.defvjp(_small_matmul_fwd, _small_matmul_bwd)


def matmul(x: jax.Array, w: jax.Array, *, transposed: bool = False) -> jax.Array:
    """``x [..., K] @ w [K, N]`` in float32 for few rows (the decode case): weights float32
    or bfloat16 (or its bits as uint16), read in place and widened in registers, float32
    accumulation.  ``transposed``: ``w`` is stored ``[N, K]`` and the product is
    ``x @ w.T`` (the tied embedding as LM head), each of its rows read once, contiguously.
    Differentiable (the backward pass is plain XLA).  Call :func:`available` first.
    """
    if x.dtype not in (jnp.float32, jnp.bfloat16):
        x = x.astype(jnp.float32)
    lead = x.shape[:-1]
    y = _small_matmul(x.reshape(-1, x.shape[-1]), w, transposed)
    return y.reshape(*lead, y.shape[-1])


# Where the small-M matmul measured faster than XLA:CPU (docs/cpu_kernels.md):
_MATMUL_BF16_MAX_ROWS = 64  # bf16 weights: 1.4-2.9x to 64 rows, ~1.0x at 96-256 (XLA widens w)
_MATMUL_MAX_N = 8192  # the 49152-wide LM head: our column blocks stride 196 KB rows (slower)
_MATMUL_F32_ROWS = (1, 32)  # float32 weights (split by K, register tiles over rows): a model
# pass 1.4x XLA at 32 rows, 0.87x at 64; engine batch 32 1.2-1.3x (docs/cpu_kernels.md)
_MATMUL_NT_MAX_ROWS = 64  # bf16 [N, K] weights (tied LM head): XLA transposes w per call (1.3-8x)
_MATMUL_NT_F32_ROWS = (2, 16)  # float32: 1 row ties XLA's dot, 32 rows lose


def matmul_applies(rows: int, w, *, transposed: bool = False) -> bool:
    """Whether ``x [rows, K] @ w`` should take :func:`matmul` (float weights) or
    :func:`quantized_matmul` (a ``QuantizedArray`` the kernel reads): only the shapes where
    it measured faster (``JAXLLM_CPU_KERNELS=1`` adds float32 weights at any row count).
    ``transposed``: ``w`` is stored ``[N, K]`` (:func:`matmul`'s ``transposed``)."""
    if transposed:
        lo, hi = _MATMUL_NT_F32_ROWS if w.dtype == jnp.float32 else (1, _MATMUL_NT_MAX_ROWS)
        return (isinstance(w, jax.Array) and w.ndim == 2 and lo <= rows <= hi
                and w.dtype in (jnp.float32, jnp.bfloat16, jnp.uint16) and active())
    if _is_quantized(w):
        return quantized_applies(rows, w)
    if not (isinstance(w, jax.Array) and w.ndim == 2 and 1 <= rows <= _MATMUL_BF16_MAX_ROWS
            and w.dtype in (jnp.float32, jnp.bfloat16, jnp.uint16)):
        return False
    if w.shape[1] > _MATMUL_MAX_N:
        return False
    f32_rows = _MATMUL_F32_ROWS[0] <= rows <= _MATMUL_F32_ROWS[1]
    if w.dtype == jnp.float32 and not (f32_rows or forced()):
        return False
    return active()


# --------------------------------------------------------------------------- quantized

_PACKINGS = {"none": 0, "interleaved": 1, "gguf32": 2}
# Where the quantized kernel measured faster than XLA's dequantize-then-dot (docs/kernels.md):
# From 8 rows the kernel dequantizes once per pass and runs float register tiles: a
# model's worth of Q4_1 projections 3.1x XLA at 32 rows, 1.6x at 64, 1.2x at 128, 0.9x
# at 256; the 49152-wide Q8_0 LM head 4.2x at 32, 1.3x at 64, 0.74x at 128.
_QUANT_MAX_ROWS = 128
_QUANT_WIDE_N = 8192  # an LM head
_QUANT_WIDE_MAX_ROWS = 64


_QUANTIZED_FIELDS = ("values", "scales", "offsets", "bits", "group_size", "packing",
                     "transposed", "dequantize")


def _is_quantized(w) -> bool:
    """``w`` is a ``jaxllm.quant.QuantizedArray`` -- recognised by its fields, so this
    package stays importable without (and below) ``jaxllm``."""
    return all(hasattr(w, f) for f in _QUANTIZED_FIELDS)


def check_quantized(w) -> None:
    """Raise ValueError naming what :func:`quantized_matmul` cannot read in ``w``: it takes a
    2-D, untransposed ``QuantizedArray`` with int8 codes (packing ``none``) or 4-bit codes
    (``interleaved``, or ``gguf32`` with groups of 32), an even group size dividing K for
    4 bits (a byte holds two codes of one group), and scales / offsets ``[K/group, N]``."""
    if not _is_quantized(w):
        raise ValueError(f"quantized_matmul needs a QuantizedArray, got {type(w).__name__}")
    if w.ndim != 2 or w.transposed:
        raise ValueError(f"quantized_matmul needs a 2-D untransposed weight [K, N], got "
                         f"{w!r} with stored shape {w.values.shape}")
    if (w.bits, w.packing) not in ((8, "none"), (4, "interleaved"), (4, "gguf32")):
        raise ValueError(f"quantized_matmul reads 8-bit 'none' and 4-bit 'interleaved' / "
                         f"'gguf32' codes, got bits={w.bits} packing={w.packing!r}")
    k, n = w.stored_shape
    g = w.group_size
    if g <= 0 or k % g or (w.bits == 4 and g % 2) or (w.packing == "gguf32" and g != 32):
        raise ValueError(f"quantized_matmul: group size {g} must divide K={k}"
                         + (" and be even for 4-bit codes" if w.bits == 4 else "")
                         + (" (32 for gguf32 blocks)" if w.packing == "gguf32" else ""))
    for name in ("scales", "offsets"):
        a = getattr(w, name)
        if a is not None and tuple(a.shape) != (k // g, n):
            raise ValueError(f"quantized_matmul: {name} must be [{k // g}, {n}] "
                             f"(K/group, N), got {tuple(a.shape)}")


def quantized_applies(rows: int, w) -> bool:
    """Whether ``x [rows, K] @ w`` (``w`` a ``QuantizedArray``) should take
    :func:`quantized_matmul`: the row counts where it measured faster (1-128; 1-64 on an
    LM head) and a layout the kernel reads."""
    wide = getattr(w, "shape", (0,))[-1] > _QUANT_WIDE_N
    if not 1 <= rows <= (_QUANT_WIDE_MAX_ROWS if wide else _QUANT_MAX_ROWS):
        return False
    try:
        check_quantized(w)
    except ValueError:
        return False  # e.g. a stacked or transposed weight: the XLA path handles it
    return active()


def _quant_call(x, values, scales, offsets, meta):
    bits, group, packing, _ = meta
    return jax.ffi.ffi_call("jaxllm_quant_matmul",
                            jax.ShapeDtypeStruct((x.shape[0], values.shape[1]), jnp.float32),
                            vmap_method="sequential")(
        x, values, scales, offsets, bits=np.int64(bits), group_size=np.int64(group),
        packing=np.int64(_PACKINGS[packing]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _quant_matmul(x, values, scales, offsets, meta):
    return _quant_call(x, values, scales, offsets, meta)


def _quant_matmul_fwd(x, values, scales, offsets, meta):
    return _quant_call(x, values, scales, offsets, meta), (x, values, scales, offsets)


def _quant_matmul_bwd(meta, res, dy):  # plain XLA (QLoRA-style training, not decode)
    x, values, scales, offsets = res
    bits, group, packing, cls = meta
    q = cls(values, scales, offsets if offsets.size else None, bits=bits,
            group_size=group, packing=packing, dtype=jnp.float32)
    dx = (dy @ q.dequantize().T).astype(x.dtype)
    dw = x.astype(jnp.float32).T @ dy  # [K, N]
    dw_groups = dw.reshape(-1, group, dw.shape[-1])
    codes = q.codes().astype(jnp.float32).reshape(dw_groups.shape)
    dscales = (codes * dw_groups).sum(1).astype(scales.dtype)
    doffsets = (dw_groups.sum(1).astype(offsets.dtype) if offsets.size
                else jnp.zeros_like(offsets))
    return dx, np.zeros(values.shape, jax.dtypes.float0), dscales, doffsets


_quant_matmul.defvjp(_quant_matmul_fwd, _quant_matmul_bwd)


def quantized_matmul(x: jax.Array, w) -> jax.Array:
    """``x [..., K] @ w`` in float32 for few rows, ``w`` a ``jaxllm.quant.QuantizedArray``
    read in its own layout and dequantized in registers (weight-only numerics: ``x`` stays
    float32 / bfloat16, float32 accumulation).  Differentiable in ``x`` (and the scales /
    offsets) through a plain-XLA backward.  Call :func:`available` first; raises ValueError
    (:func:`check_quantized`) for a layout the kernel does not read.
    """
    check_quantized(w)
    if x.dtype not in (jnp.float32, jnp.bfloat16):
        x = x.astype(jnp.float32)
    scales, offsets = jnp.asarray(w.scales), w.offsets
    if scales.dtype not in (jnp.float32, jnp.float16, jnp.bfloat16):
        scales = scales.astype(jnp.float32)
    if offsets is None:
        offsets = jnp.zeros((0,), scales.dtype)  # symmetric: the kernel skips the term
    elif offsets.dtype != scales.dtype:
        scales, offsets = scales.astype(jnp.float32), jnp.asarray(offsets, jnp.float32)
    lead = x.shape[:-1]
    y = _quant_matmul(x.reshape(-1, x.shape[-1]), jnp.asarray(w.values), scales,
                      jnp.asarray(offsets), (w.bits, w.group_size, w.packing, type(w)))
    return y.reshape(*lead, w.shape[-1])


# --------------------------------------------------------------------------- int8 x int8

_INT8_MAX_ROWS = 32  # W8A8 over a model pass: 1.9x XLA's int8 dot at 1 row, 1.1x at 16, 1.0-1.08x at 32


def int8_applies(rows: int) -> bool:
    """Whether the W8A8 product of ``rows`` activation rows should take
    :func:`int8_matmul` (CPU, one device, kernels built, 1-32 rows)."""
    return 1 <= rows <= _INT8_MAX_ROWS and active()


def int8_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x [M, K] int8 . w [N, K] int8 -> [M, N] int32`` (contracting both minor axes, as
    W8A8's ``dot_general``), exact integer accumulation: equals XLA's result bit for bit.
    Codes must lie in [-127, 127].  Call :func:`available` first."""
    if x.dtype != jnp.int8 or w.dtype != jnp.int8 or x.ndim != 2 or w.ndim != 2 \
            or x.shape[1] != w.shape[1]:
        raise ValueError(f"int8_matmul needs int8 x [M, K] and w [N, K], got "
                         f"{x.dtype}{list(x.shape)} and {w.dtype}{list(w.shape)}")
    return jax.ffi.ffi_call("jaxllm_int8_matmul",
                            jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.int32),
                            vmap_method="sequential")(x, w)
