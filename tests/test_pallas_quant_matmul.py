"""The Pallas quantized matmul (``pallas_kernels/quant_matmul.py``): interpret mode on CPU
against float64 NumPy on the dequantized weight, the ValueErrors, and the CUDA lowering.

Tolerance: the kernel forms ``scale * sum(x q) + offset * sum(x)`` per chunk in float32,
the reference ``sum(x * (q * scale + offset))`` in float64 on the float32-dequantized
weight (``QuantizedArray.dequantize``, the XLA path's weight); both are sums of the same
products, so elementwise ``|kernel - ref| <= 1e-5 * (|x| @ |W|)``.  Shapes are small and
few (each distinct one is an interpret-mode compile): the file runs in ~15 s on 2 cores
(cold compilation cache; ~6 s warm).
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.quant import QuantizedArray, quantize_int4, quantize_int8
from pallas_kernels.quant_matmul import _auto_splits, applies, quantized_matmul

RTOL = 1e-5
GGUF_TYPES = ("Q8_0", "Q4_0", "Q4_1")


def _gguf_quantized(w: np.ndarray, kind: str) -> QuantizedArray:
    """``w [K, N]`` through the gguf package's quantizer into the GGUF loader's layout."""
    import gguf

    from jaxllm.weights.gguf_blocks import blocks_to_quantized

    k, n = w.shape
    raw = gguf.quants.quantize(np.ascontiguousarray(w.T, np.float32),
                               getattr(gguf.GGMLQuantizationType, kind))
    return blocks_to_quantized(raw, kind, (n, k))


def _quantized(fmt: str, w: np.ndarray) -> QuantizedArray:
    if fmt == "int8":
        return quantize_int8(w)
    if fmt == "int8-g16":  # the GGUF loader's widened layout (Q6_K parts: int8, groups of 16)
        k, n = w.shape
        scales = np.abs(w.reshape(k // 16, 16, n)).max(1).astype(np.float32) / 127
        codes = np.clip(np.rint(w / np.repeat(scales, 16, 0)), -127, 127).astype(np.int8)
        return QuantizedArray(codes, scales, None, bits=8, group_size=16)
    if fmt.startswith("int4-g"):
        return quantize_int4(w, int(fmt[6:]))
    return _gguf_quantized(w, fmt)


def _check(x, q: QuantizedArray, **kw) -> float:
    """Run the kernel (interpret mode), compare with float64 NumPy; return the max error
    relative to ``|x| @ |W|``."""
    out = np.asarray(quantized_matmul(x, q, interpret=True, **kw))
    assert out.shape == (*x.shape[:-1], q.shape[-1]) and out.dtype == np.float32
    x64 = np.asarray(x.astype(jnp.float32), np.float64).reshape(-1, x.shape[-1])
    w64 = np.asarray(q.dequantize(jnp.float32), np.float64)
    ref, bound = x64 @ w64, np.abs(x64) @ np.abs(w64)
    err = np.abs(out.reshape(ref.shape) - ref)
    np.testing.assert_array_less(err, RTOL * bound + 1e-30)
    rel = float(np.max(err / bound))
    print(f"max rel err {rel:.2e}")
    return rel


# (format, M, N, K, x dtype, scale dtype (None: as made), kernel kwargs)
CASES = [
    ("int8", 1, 200, 192, "float32", None, {}),             # per channel: G = K = 192, c = 64
    ("int8", 3, 200, 192, "bfloat16", "float16", {}),
    ("int8", 16, 64, 576, "bfloat16", "bfloat16", {"k_splits": 4}),  # 9 chunks in 3 x 3
    ("int8", 3, 200, 96, "float32", None, {"block_n": 16, "block_k": 16}),  # c = 16, N pad
    ("int8-g16", 3, 200, 96, "bfloat16", "bfloat16", {}),     # c = 16, 6 chunks
    ("int4-g32", 1, 200, 128, "float32", None, {}),
    ("int4-g32", 3, 200, 160, "bfloat16", "bfloat16", {"k_splits": 2}),  # 5 chunks: 3 + 2
    ("int4-g64", 16, 200, 192, "float32", None, {}),
    ("int4-g64", 3, 72, 128, "bfloat16", "float32", {}),
    ("int4-g64", 1, 64, 256, "float32", None, {"block_k": 32}),  # a group cut in 2 chunks
    ("Q4_0", 1, 200, 96, "float32", None, {}),
    ("Q4_0", 16, 64, 96, "bfloat16", "bfloat16", {}),
    ("Q4_1", 3, 200, 160, "bfloat16", "bfloat16", {"k_splits": 3}),  # 5 chunks: 2 + 2 + 1
    ("Q4_1", 1, 64, 64, "float32", None, {}),
    ("Q8_0", 3, 200, 96, "float32", None, {}),
    ("Q8_0", 16, 200, 64, "bfloat16", "bfloat16", {}),
]


@pytest.mark.parametrize("fmt,m,n,k,x_dtype,scale_dtype,kw", CASES,
                         ids=[f"{c[0]}-M{c[1]}-N{c[2]}-K{c[3]}-{c[4]}-{c[5]}-{c[6]}"
                              for c in CASES])
def test_matches_dequantized_reference(fmt, m, n, k, x_dtype, scale_dtype, kw):
    """Every layout: M in {1, 3, 16}, N not a multiple of the column tile (200, 72), K a
    multiple of the group split unevenly over K splits, float32 / bfloat16 activations,
    scales and offsets as made (float32 / float16) or cast to bfloat16 / float16 /
    float32."""
    rng = np.random.default_rng(zlib.crc32(repr((fmt, m, n, k)).encode()))
    q = _quantized(fmt, rng.standard_normal((k, n)).astype(np.float32))
    if scale_dtype is not None:
        q = q._replace(scales=jnp.asarray(q.scales, scale_dtype),
                       offsets=None if q.offsets is None else jnp.asarray(q.offsets, scale_dtype))
    x = jnp.asarray(rng.standard_normal((m, k)), x_dtype)
    _check(x, q, **kw)


def test_leading_dims_and_jit():
    """``x [..., K]`` keeps its leading axes; the function traces under an outer jit."""
    rng = np.random.default_rng(1)
    q = quantize_int4(rng.standard_normal((64, 72)), 32)
    x = jnp.asarray(rng.standard_normal((2, 3, 64)), jnp.float32)
    rel = _check(x, q)
    out = jax.jit(functools.partial(quantized_matmul, interpret=True))(x, q)
    np.testing.assert_allclose(np.asarray(out),
                               np.asarray(quantized_matmul(x, q, interpret=True)),
                               rtol=0, atol=0)
    assert rel < RTOL


def test_gradients_match_dequantize_then_dot():
    """The plain-XLA backward: gradients in x, the scales and the offsets equal those of
    the XLA path's dequantize-then-dot."""
    rng = np.random.default_rng(5)
    q = quantize_int4(rng.standard_normal((64, 72)), 32)
    x = jnp.asarray(rng.standard_normal((3, 64)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((3, 72)), jnp.float32)

    def loss(f):
        return lambda x, s, o: jnp.sum(f(x, q._replace(scales=s, offsets=o)) * ct)

    kernel = loss(functools.partial(quantized_matmul, interpret=True))
    xla = loss(lambda x, w: x @ w.dequantize(jnp.float32))
    args = (x, jnp.asarray(q.scales, jnp.float32), jnp.asarray(q.offsets, jnp.float32))
    got = jax.grad(kernel, argnums=(0, 1, 2))(*args)
    want = jax.grad(xla, argnums=(0, 1, 2))(*args)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


def test_auto_split_k():
    """The default split: K only when the N tiles are few and K is long; the result does
    not depend on it."""
    assert _auto_splits(num_chunks=18, chunk=32, n_blocks=24) == 1    # K = 576: no split
    assert _auto_splits(num_chunks=48, chunk=32, n_blocks=9) == 3     # K = 1536, N = 576
    assert _auto_splits(num_chunks=128, chunk=32, n_blocks=384) == 1  # wide N: enough tiles
    rng = np.random.default_rng(2)
    q = quantize_int8(rng.standard_normal((1024, 64)))  # 8 chunks of 128, 2 auto splits
    _check(jnp.asarray(rng.standard_normal((2, 1024)), jnp.float32), q)


def test_bad_input_raises():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 32))
    x = jnp.ones((1, 64), jnp.float32)
    with pytest.raises(ValueError, match="transposed"):
        quantized_matmul(jnp.ones((1, 32)), quantize_int8(w).T)
    with pytest.raises(ValueError, match="stacked"):
        quantized_matmul(x, quantize_int8(rng.standard_normal((2, 64, 32))))
    with pytest.raises(ValueError, match="K mismatch.*48"):
        quantized_matmul(jnp.ones((1, 48)), quantize_int4(w, 32))
    with pytest.raises(ValueError, match="QuantizedArray"):
        quantized_matmul(x, jnp.ones((64, 32)))
    gguf_g64 = quantize_int4(w, 64)._replace(packing="gguf32")
    with pytest.raises(ValueError, match="gguf32 blocks need group size 32"):
        quantized_matmul(x, gguf_g64)
    g48 = quantize_int4(rng.standard_normal((96, 32)), 48)  # pow2 factor 16 < 32 for 4 bits
    with pytest.raises(ValueError, match="group size 48"):
        quantized_matmul(jnp.ones((1, 96)), g48)
    bad_scales = quantize_int8(w)._replace(scales=jnp.ones((2, 32)))
    with pytest.raises(ValueError, match=r"scales must be \[1, 32\]"):
        quantized_matmul(x, bad_scales)
    with pytest.raises(ValueError, match="block_n=100"):
        quantized_matmul(x, quantize_int8(w), block_n=100)


def test_applies():
    """The dispatch predicate: GPU backend with one device, few rows, a layout the kernel
    reads."""
    rng = np.random.default_rng(4)
    q = quantize_int4(rng.standard_normal((64, 32)), 32)
    one = jax.device_count() == 1
    assert applies(1, q, backend="gpu") == one and applies(16, q, backend="gpu") == one
    assert not applies(17, q, backend="gpu")
    assert not applies(1, q, backend="cpu")
    assert not applies(1, q.T, backend="gpu")
    assert not applies(1, jnp.ones((64, 32)), backend="gpu")
    assert not applies(1, quantize_int4(rng.standard_normal((96, 32)), 48), backend="gpu")


def test_lowers_to_triton_for_cuda():
    """No GPU needed: export for CUDA runs the Pallas -> Triton lowering (unsupported
    primitives, non-power-of-two tensors, unsigned dot operands) at the production shapes
    (SmolLM2: K = 576, the fused gate/up N = 3072, the LM head N = 49152; the down
    projection K = 1536 with its split-K), bfloat16 activations, one row.  interpret=False
    is forced: on this CPU backend the default would be the interpreter."""
    from jax import export

    S, bf, f16 = jax.ShapeDtypeStruct, jnp.bfloat16, jnp.float16

    def lower(bits, packing, group, k, n, scale_dtype, offsets, x_dtype=bf):
        def f(x, values, scales, *off):
            w = QuantizedArray(values, scales, off[0] if off else None, bits=bits,
                               group_size=group, packing=packing)
            return quantized_matmul(x, w, interpret=False)

        values = S((k, n), jnp.int8) if bits == 8 else S((k // 2, n), jnp.uint8)
        scales = S((k // group, n), scale_dtype)
        args = [S((1, k), x_dtype), values, scales] + ([scales] if offsets else [])
        exp = export.export(jax.jit(f), platforms=["cuda"], disabled_checks=[
            export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
        return exp.mlir_module().count("__gpu$xla.gpu.triton")

    for n in (3072, 49152):
        assert lower(8, "none", 576, 576, n, jnp.float32, False) == 1      # int8 per channel
        assert lower(4, "interleaved", 32, 576, n, f16, True) == 1         # int4 g32
        assert lower(4, "gguf32", 32, 576, n, f16, True) == 1              # GGUF Q4_1
    assert lower(8, "none", 32, 1536, 576, f16, False) == 1                # Q8_0, split K
    assert lower(4, "gguf32", 32, 1536, 576, f16, True, jnp.float32) == 1  # float32 x


@pytest.mark.skipif(jax.device_count() != 1, reason="the kernel serves one device only")
def test_model_dispatch_routes_projection_and_lm_head(monkeypatch):
    """``llama.matmul``'s GPU branch (``_pallas_quantized``), with ``applies`` answering as on
    a GPU: a projection goes to the kernel, the vocab-major LM head ``W^T @ h^T`` as
    ``(h @ W)^T``, and more than 16 rows fall through (None) to the XLA path."""
    from jaxllm.models import llama
    from pallas_kernels import quant_matmul as pallas_qmm

    monkeypatch.setattr(pallas_qmm, "applies", functools.partial(applies, backend="gpu"))
    rng = np.random.default_rng(7)
    q = quantize_int4(rng.standard_normal((64, 96)).astype(np.float32), 32)
    x = jnp.asarray(rng.standard_normal((3, 64)), jnp.float32)
    w64 = np.asarray(q.dequantize(jnp.float32), np.float64)
    ref = np.asarray(x, np.float64) @ w64
    np.testing.assert_allclose(llama._pallas_quantized(x, q), ref, rtol=1e-5, atol=1e-5)
    head = llama._pallas_quantized(q.T, x.T)  # W^T [96, 64] @ h^T [64, 3]
    np.testing.assert_allclose(head, ref.T, rtol=1e-5, atol=1e-5)
    assert llama._pallas_quantized(jnp.ones((17, 64)), q) is None
