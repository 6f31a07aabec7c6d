"""C++ CPU kernels (``cpu_kernels``) against their XLA twins, the build / fallback machinery,
and the engine with the kernels on and off.

Tolerances: float32 and bfloat16 pools (both sides read the same values, widened to
float32) 1e-5; int8 pools 1e-5 relative to the output scale (both dequantize
``int8 * scale`` exactly, only the summation order differs); bfloat16 queries / outputs
one bfloat16 ulp (~8e-3 relative).  Small-M matmul: 1e-5 relative to the output scale
(both accumulate the same widened values in float32, in a different order).
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cpu_kernels
from cpu_kernels import build as B
from jaxllm import attention as A

ROOT = Path(__file__).resolve().parents[1]
PAGE = 16
NUM_PAGES = 160
WIDTH = 2048 // PAGE  # block tables cover contexts up to 2048

pytestmark = pytest.mark.skipif(not cpu_kernels.available(),
                                reason="CPU kernels unavailable (no compiler?)")


def _pools(rng, hkv, d, dtype):
    """Pools [NUM_PAGES, PAGE, hkv, d] of ``dtype`` (+ int8 scales) and their values."""
    k = rng.standard_normal((NUM_PAGES, PAGE, hkv, d)).astype(np.float32)
    v = rng.standard_normal((NUM_PAGES, PAGE, hkv, d)).astype(np.float32)
    if dtype == "int8":
        ks = (np.abs(k).max(-1) / 127 + 1e-6).astype(np.float32)
        vs = (np.abs(v).max(-1) / 127 + 1e-6).astype(np.float32)
        return (jnp.asarray(np.round(k / ks[..., None]), jnp.int8),
                jnp.asarray(np.round(v / vs[..., None]), jnp.int8),
                dict(k_scales=jnp.asarray(ks), v_scales=jnp.asarray(vs)))
    if dtype == "uint16":  # bfloat16 bits, as the engine keeps bf16 pools on XLA:CPU
        as_bits = lambda x: jax.lax.bitcast_convert_type(  # noqa: E731
            jnp.asarray(x, jnp.bfloat16), jnp.uint16)
        return as_bits(k), as_bits(v), {}
    return jnp.asarray(k, dtype), jnp.asarray(v, dtype), {}


def _xla(*args, **kw):
    with cpu_kernels.override(False):
        return A.paged_decode_attention(*args, impl="xla", **kw)


def _ours(q, kp, vp, bt, lens, **kw):
    return cpu_kernels.paged_decode_attention(q, kp, vp, bt, lens,
                                              sm_scale=kw.pop("sm_scale", q.shape[-1] ** -0.5),
                                              **kw)


# Few distinct static shapes (each costs an XLA compile of the twin): rows from
# {1, 5, 64}, GQA ratios 1 / 3 / 8, D 64 (vector path) or 12 (plain loops).
@settings(max_examples=14, deadline=None, suppress_health_check=list(HealthCheck))
@given(rows=st.sampled_from([1, 5, 64]), group=st.sampled_from([1, 3, 8]),
       hkv=st.sampled_from([1, 3]), d=st.sampled_from([64, 64, 12]),
       dtype=st.sampled_from(["float32", "bfloat16", "uint16", "int8"]),
       window=st.sampled_from([None, None, 1, 37, 300]),
       soft_cap=st.sampled_from([None, None, 5.0]),
       seed=st.integers(0, 2**31 - 1))
def test_decode_matches_xla(rows, group, hkv, d, dtype, window, soft_cap, seed):
    rng = np.random.default_rng(seed)
    kp, vp, scales = _pools(rng, hkv, d, dtype)
    q = jnp.asarray(rng.standard_normal((rows, hkv * group, d)), jnp.float32)
    bt = jnp.asarray(rng.integers(0, NUM_PAGES, (rows, WIDTH)), jnp.int32)
    # contexts 0..2048 across page boundaries, some empty
    lens = rng.integers(0, 2049, rows)
    lens[rng.random(rows) < 0.15] = 0
    lens[rng.random(rows) < 0.2] = rng.integers(1, 40)
    lens = jnp.asarray(lens, jnp.int32)
    kw = dict(sliding_window=window, soft_cap=soft_cap, **scales)
    ref = np.asarray(_xla(q, kp, vp, bt, lens, **kw))
    out = np.asarray(jax.jit(lambda *a: _ours(*a, **kw))(q, kp, vp, bt, lens))
    tol = 1e-5 * max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(out, ref, atol=tol, rtol=0)
    np.testing.assert_array_equal(out[np.asarray(lens) == 0], 0.0)


def test_edge_cases_and_bf16_queries():
    rng = np.random.default_rng(1)
    kp, vp, _ = _pools(rng, 2, 64, "float32")
    q = jnp.asarray(rng.standard_normal((4, 6, 64)), jnp.float32)
    bt = jnp.asarray(rng.integers(0, NUM_PAGES, (4, WIDTH)), jnp.int32)
    lens = jnp.asarray([0, 1, PAGE, 2048], jnp.int32)  # empty, one key, page edge, full
    for kw in ({}, dict(sliding_window=1), dict(sliding_window=PAGE + 1, soft_cap=2.0)):
        np.testing.assert_allclose(_ours(q, kp, vp, bt, lens, **kw),
                                   _xla(q, kp, vp, bt, lens, **kw), atol=1e-5)
    out = _ours(q, kp, vp, bt, lens)
    np.testing.assert_array_equal(np.asarray(out[0]), 0.0)
    # one key: the output is that key's value row for every query head
    np.testing.assert_allclose(out[1].reshape(2, 3, 64),
                               np.broadcast_to(vp[bt[1, 0], 0][:, None], (2, 3, 64)), atol=1e-6)
    qb = q.astype(jnp.bfloat16)
    ob = _ours(qb, kp, vp, bt, lens)
    assert ob.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(ob, np.float32),
                               np.asarray(_xla(qb, kp, vp, bt, lens), np.float32),
                               atol=1e-2, rtol=1e-2)


def _xla_matmul(x, w):
    from jaxllm.models import llama

    with cpu_kernels.override(False):
        return llama.matmul(x, w, jnp.float32)


@settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
@given(rows=st.integers(1, 64), k=st.sampled_from([8, 64, 200]),
       n=st.sampled_from([5, 64, 136, 320]),
       dtype=st.sampled_from(["float32", "bfloat16", "uint16"]),
       x_bf16=st.booleans(), transposed=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_matmul_matches_xla(rows, k, n, dtype, x_bf16, transposed, seed):
    """``transposed``: w stored [N, K] (the tied LM head's embedding)."""
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.standard_normal((n, k) if transposed else (k, n)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16 if x_bf16 else jnp.float32)
    if dtype == "uint16":
        w_twin = w.astype(jnp.bfloat16)
        w = jax.lax.bitcast_convert_type(w_twin, jnp.uint16)
    else:
        w = w_twin = w.astype(dtype)
    w_twin = w_twin.T if transposed else w_twin
    ref = np.asarray(_xla_matmul(x.astype(w_twin.dtype) if x_bf16 else x, w_twin))
    out = np.asarray(jax.jit(functools.partial(cpu_kernels.matmul, transposed=transposed))(x, w))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-5 * max(1.0, float(np.abs(ref).max())))


@pytest.mark.parametrize("rows,n,dtype", [(1, 200, "float32"), (3, 200, "float32"),
                                          (8, 200, "float32"), (1, 200, "bfloat16"),
                                          (5, 203, "float32"), (6, 203, "float32"),
                                          (1, 203, "bfloat16"), (2, 203, "bfloat16"),
                                          (3, 200, "bfloat16"), (5, 203, "bfloat16"),
                                          (20, 203, "bfloat16")])
def test_matmul_split_by_k(rows, n, dtype):
    """float32 weights (and bf16 to 16 rows) are split by K across threads: K = 1001 gives
    uneven ranges and a partial group of weight rows, N = 200 columns past the last
    multiple of 64 (bf16 at one row: its even / odd column order undone).  Rows go in
    groups of 4 and then a 3-, 2- or 1-row tile (rows 2, 3, 5, 6, 8; bf16's leftover row
    in column order); N = 203 also ends in an 8-column strip and 3 single columns.  bf16
    at 20 rows takes the column blocks."""
    rng = np.random.default_rng(rows)
    x = jnp.asarray(rng.standard_normal((rows, 1001)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((1001, n)), dtype)
    ref = np.asarray(x, np.float64) @ np.asarray(w.astype(jnp.float32), np.float64)
    out = np.asarray(jax.jit(cpu_kernels.matmul)(x, w))
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_matmul_dispatch_and_grad():
    from jaxllm.models import llama

    w = jnp.asarray(np.random.default_rng(3).standard_normal((64, 96)), jnp.bfloat16)
    x = jnp.ones((4, 64), jnp.float32)
    assert "jaxllm_small_matmul" in str(jax.make_jaxpr(lambda x, w: llama.matmul(x, w))(x, w))
    big = jnp.ones((65, 64), jnp.float32)  # over 64 rows of bf16 weights: XLA's GEMM
    assert "jaxllm_small_matmul" not in str(
        jax.make_jaxpr(lambda x, w: llama.matmul(x, w))(big, w))
    loss = lambda f: lambda x, w: (f(x, w) ** 2).sum()  # noqa: E731
    nt = lambda x, wt: cpu_kernels.matmul(x, wt, transposed=True)  # noqa: E731
    for ours, twin, w_ in ((cpu_kernels.matmul, _xla_matmul, w),
                           (nt, lambda x, wt: _xla_matmul(x, wt.T), w.T)):
        g = jax.grad(loss(ours), argnums=(0, 1))(x, w_)
        g_ref = jax.grad(loss(twin), argnums=(0, 1))(x, w_)
        np.testing.assert_allclose(g[0], g_ref[0], rtol=1e-5, atol=1e-4)
        assert g[1].shape == w_.shape
        np.testing.assert_allclose(np.asarray(g[1], np.float32),
                                   np.asarray(g_ref[1], np.float32), rtol=1e-2)


def test_tied_lm_head_reads_the_embedding_in_place():
    """A tied bf16 LM head takes the [V, D] kernel in both orientations, equal to XLA's."""
    from jaxllm.config import ModelConfig
    from jaxllm.models import llama

    cfg = ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=16, tie_word_embeddings=True)
    params = llama.init_params(cfg, jax.random.PRNGKey(0), jnp.bfloat16)
    assert "lm_head" not in params
    h = jnp.asarray(np.random.default_rng(4).standard_normal((3, 64)), jnp.bfloat16)
    for vocab_major in (False, True):
        head = lambda p, h: llama.lm_head(p, cfg, h, vocab_major)  # noqa: E731
        assert "jaxllm_small_matmul_nt" in str(jax.make_jaxpr(head)(params, h))
        with cpu_kernels.override(False):
            ref = np.asarray(jax.jit(head)(params, h))
        np.testing.assert_allclose(np.asarray(jax.jit(head)(params, h)), ref,
                                   atol=1e-5 * np.abs(ref).max())


def test_dispatch_picks_kernel_on_cpu(monkeypatch):
    rng = np.random.default_rng(2)
    kp, vp, _ = _pools(rng, 3, 64, "float32")
    args = (jnp.ones((2, 9, 64)), kp, vp, jnp.zeros((2, WIDTH), jnp.int32),
            jnp.asarray([3, 30], jnp.int32))
    # a fresh function each time: make_jaxpr caches traces per function
    jaxpr = lambda: str(jax.make_jaxpr(  # noqa: E731
        lambda *a: A.paged_decode_attention(*a))(*args))
    assert "jaxllm_paged_decode" in jaxpr()
    with cpu_kernels.override(False):
        assert "jaxllm_paged_decode" not in jaxpr()
    monkeypatch.setenv("JAXLLM_CPU_KERNELS", "0")
    assert not cpu_kernels.available()
    assert "jaxllm_paged_decode" not in jaxpr()


def test_build_failure_falls_back_once(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("JAXLLM_CPU_KERNELS_CACHE", str(tmp_path))
    monkeypatch.setattr(B, "find_compiler", lambda: None)
    monkeypatch.delenv("JAXLLM_CPU_KERNELS", raising=False)
    cpu_kernels._reset_for_tests()
    try:
        with caplog.at_level(logging.WARNING, logger="jaxllm.cpu_kernels"):
            assert not cpu_kernels.available()
            assert not cpu_kernels.available()
        assert len(caplog.records) == 1 and "using the XLA paths" in caplog.records[0].message
        cpu_kernels._reset_for_tests()
        monkeypatch.setenv("JAXLLM_CPU_KERNELS", "1")
        with pytest.raises(RuntimeError, match="JAXLLM_CPU_KERNELS=1"):
            cpu_kernels.available()
    finally:
        cpu_kernels._reset_for_tests()
        monkeypatch.undo()
    assert cpu_kernels.available()


_CHILD = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, cpu_kernels
    from jaxllm import attention as A
    rng = np.random.default_rng(0)
    kp = jnp.asarray(rng.standard_normal((8, 4, 2, 16)), jnp.float32)
    out = A.paged_decode_attention(jnp.ones((2, 4, 16)), kp, kp, jnp.zeros((2, 3), jnp.int32),
                                   jnp.asarray([5, 0], jnp.int32))
    print("ACTIVE", cpu_kernels.active(), "FINITE", bool(jnp.isfinite(out).all()))
""")


def test_no_compiler_subprocess_runs_on_xla(tmp_path):
    """PATH emptied: no compiler, one log line, attention still runs (XLA path)."""
    env = {**os.environ, "PATH": "", "JAXLLM_CPU_KERNELS_CACHE": str(tmp_path),
           "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("CXX", None)
    env.pop("JAXLLM_CPU_KERNELS", None)
    res = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "ACTIVE False FINITE True" in res.stdout
    assert res.stderr.count("CPU kernels unavailable") == 1, res.stderr


def test_concurrent_builds_make_one_library(tmp_path):
    env = {**os.environ, "JAXLLM_CPU_KERNELS_CACHE": str(tmp_path), "PYTHONPATH": str(ROOT)}
    code = "from cpu_kernels.build import build; print(build())"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    paths = {o[0].strip() for o in outs}
    assert len(paths) == 1
    assert [p.name for p in tmp_path.glob("*.so")] == [Path(paths.pop()).name]
    assert not list(tmp_path.glob("*.tmp"))


def test_engine_same_greedy_tokens_with_kernels_on_and_off():
    from jaxllm.config import ModelConfig
    from jaxllm.engine.engine import LLMEngine
    from jaxllm.models import llama
    from jaxllm.sampling import SamplingParams

    cfg = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2,
                      num_heads=6, num_kv_heads=2, head_dim=16, max_position_embeddings=256)
    params = llama.init_params(cfg, jax.random.key(0))
    params = llama.unstack_layers(jax.tree.map(lambda x: x * 5 if x.ndim > 1 else x, params))
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(4, 97, rng.integers(1, 40))] for _ in range(5)]
    sp = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)

    def tokens():
        eng = LLMEngine(params, cfg, eos_token_ids=(3,), max_model_len=128, page_size=4,
                        num_pages=160, max_num_seqs=8, max_num_batched_tokens=64)
        return [o.token_ids for o in eng.generate(prompts, sp)]

    on = tokens()
    jax.clear_caches()  # the step functions are traced again, now without the kernels
    with cpu_kernels.override(False):
        off = tokens()
    jax.clear_caches()
    assert on == off


# --------------------------------------------------------------------------- quantized matmul
# Tolerance: the kernel forms scale * sum(x q) + offset * sum(x) per group, the twin rounds
# every dequantized weight to float32 and sums x * w: both are float32 sums of the same
# products in another order, so they agree to 2e-5 of sum |x| |w| (the float32 summation
# error bound for K <= 1536 in practice sits near 1e-6).
QUANT_RTOL = 2e-5
GGUF_TYPES = ("Q8_0", "Q4_0", "Q4_1")


def _gguf_quantized(w: np.ndarray, kind: str, transposed: bool = False):
    """``w [K, N]`` through the gguf package's quantizer into the loader's block layout."""
    import gguf

    from jaxllm.quant import QuantizedArray
    from jaxllm.weights.gguf_blocks import blocks_to_quantized

    k, n = w.shape
    raw = gguf.quants.quantize(np.ascontiguousarray(w.T, np.float32),
                               getattr(gguf.GGMLQuantizationType, kind))
    q = blocks_to_quantized(raw, kind, (n, k))
    return (QuantizedArray(q.values, q.scales, q.offsets, bits=q.bits, group_size=32,
                           packing=q.packing, transposed=True) if transposed else q)


def _quantized(fmt: str, w: np.ndarray):
    from jaxllm.quant import quantize_int4, quantize_int8

    if fmt == "int8":
        return quantize_int8(w)
    if fmt.startswith("int4-g"):
        return quantize_int4(w, int(fmt[6:]))
    return _gguf_quantized(w, fmt)


def _xla_quant_twin(x, q):
    """The XLA twin: dequantize to float32, then the float32 dot (llama.matmul's XLA path)."""
    with cpu_kernels.override(False):
        return _xla_matmul(x.astype(jnp.float32), q.astype(jnp.float32))


@settings(max_examples=24, deadline=None, suppress_health_check=list(HealthCheck))
@given(fmt=st.sampled_from(["int8", "int4-g32", "int4-g64", "int4-g128", *GGUF_TYPES]),
       rows=st.integers(1, 16), groups=st.integers(1, 6),
       n=st.sampled_from([1, 5, 8, 13, 64, 72, 200, 1100]),
       x_bf16=st.booleans(), scale_dtype=st.sampled_from([None, "float32", "bfloat16"]),
       seed=st.integers(0, 2**31 - 1))
def test_quantized_matmul_matches_xla(fmt, rows, groups, n, x_bf16, scale_dtype, seed):
    """Every layout over M 1-16, K a multiple of the group, N not a multiple of 8 too;
    bf16 activations; scales stored in float16 (as made) or cast to float32 / bfloat16."""
    rng = np.random.default_rng(seed)
    group = 32 if fmt == "int8" or fmt in GGUF_TYPES else int(fmt[6:])
    k = group * groups
    q = _quantized(fmt, rng.standard_normal((k, n)).astype(np.float32))
    if scale_dtype is not None:
        q = q._replace(scales=jnp.asarray(q.scales, scale_dtype),
                       offsets=None if q.offsets is None else jnp.asarray(q.offsets, scale_dtype))
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16 if x_bf16 else jnp.float32)
    ref = np.asarray(_xla_quant_twin(x, q))
    out = np.asarray(jax.jit(cpu_kernels.quantized_matmul)(x, q))
    assert out.shape == (rows, n) and out.dtype == np.float32
    bound = np.abs(np.asarray(x, np.float32)) @ np.abs(np.asarray(q.dequantize(jnp.float32)))
    np.testing.assert_array_less(np.abs(out - ref), QUANT_RTOL * bound + 1e-30)


@pytest.mark.parametrize("fmt,rows", [("int8", 1), ("int8", 5), ("int4-g32", 1),
                                      ("Q4_1", 3), ("Q8_0", 16), ("int8", 9), ("Q4_1", 32)])
def test_quantized_matmul_split_by_k(fmt, rows):
    """Weights wider than 1024 columns are split by K across threads: 37 groups of 32 give
    uneven item ranges, int8's one per-channel group spans several passes (its sums carried
    between them), N = 1100 leaves a partial 64-column block and 4 columns past the last 8.
    From 8 rows each pass is dequantized into 384-column pieces (1100 leaves a piece of
    332).  Against float64 NumPy on the dequantized weight."""
    rng = np.random.default_rng(rows)
    q = _quantized(fmt, rng.standard_normal((32 * 37, 1100)).astype(np.float32))
    x = jnp.asarray(rng.standard_normal((rows, 32 * 37)), jnp.float32)
    w = np.asarray(q.dequantize(jnp.float32), np.float64)
    ref = np.asarray(x, np.float64) @ w
    out = np.asarray(jax.jit(cpu_kernels.quantized_matmul)(x, q))
    bound = np.abs(np.asarray(x, np.float64)) @ np.abs(w)
    np.testing.assert_array_less(np.abs(out - ref), QUANT_RTOL * bound)


def test_quantized_matmul_rejects_what_it_cannot_read():
    from jaxllm.models import llama
    from jaxllm.quant import QuantizedArray, quantize_int8

    rng = np.random.default_rng(4)
    x = jnp.ones((2, 66), jnp.float32)
    odd = QuantizedArray(jnp.zeros((33, 8), jnp.uint8), jnp.ones((2, 8), jnp.float16),
                         jnp.zeros((2, 8), jnp.float16), bits=4, group_size=33,
                         packing="interleaved")
    with pytest.raises(ValueError, match="group size 33 must divide K=66 and be even"):
        cpu_kernels.quantized_matmul(x, odd)
    assert not cpu_kernels.matmul_applies(2, odd)  # dispatch leaves it to XLA
    gguf_g64 = odd._replace(values=jnp.zeros((64, 8), jnp.uint8), group_size=64,
                            packing="gguf32")
    with pytest.raises(ValueError, match="32 for gguf32"):
        cpu_kernels.quantized_matmul(jnp.ones((1, 128)), gguf_g64)
    q = quantize_int8(rng.standard_normal((2, 64, 8)))  # a stack of layers
    with pytest.raises(ValueError, match="2-D untransposed"):
        cpu_kernels.quantized_matmul(jnp.ones((1, 64)), q)
    with pytest.raises(ValueError, match="2-D untransposed"):
        cpu_kernels.quantized_matmul(jnp.ones((1, 8)), q[0].T)
    np.testing.assert_allclose(llama.matmul(jnp.ones((1, 64)), q[1]),
                               jnp.ones((1, 64)) @ q[1].dequantize(), rtol=1e-5)


def test_quantized_dispatch_head_and_grad():
    from jaxllm.models import llama

    rng = np.random.default_rng(5)
    q = _quantized("Q4_1", rng.standard_normal((64, 96)).astype(np.float32))
    emb = _gguf_quantized(rng.standard_normal((64, 200)).astype(np.float32), "Q8_0",
                          transposed=True)  # a tied embedding [V=200, D=64] stored [D, V]
    x = jnp.asarray(rng.standard_normal((3, 64)), jnp.float32)
    jaxpr = lambda f, *a: str(jax.make_jaxpr(f)(*a))  # noqa: E731
    assert "jaxllm_quant_matmul" in jaxpr(lambda x: llama.matmul(x, q), x)
    # 1-128 rows: the kernel (measured faster than dequantize-then-dot), 129 and up: XLA;
    # an LM head (N > 8192) to 64 rows
    assert "jaxllm_quant_matmul" in jaxpr(lambda x: llama.matmul(x, q), jnp.ones((128, 64)))
    assert "jaxllm_quant_matmul" not in jaxpr(lambda x: llama.matmul(x, q), jnp.ones((129, 64)))
    wide = _quantized("Q8_0", rng.standard_normal((32, 8200)).astype(np.float32))
    assert "jaxllm_quant_matmul" in jaxpr(lambda x: llama.matmul(x, wide), jnp.ones((64, 32)))
    assert "jaxllm_quant_matmul" not in jaxpr(lambda x: llama.matmul(x, wide), jnp.ones((65, 32)))
    with cpu_kernels.override(False):
        assert "jaxllm_quant_matmul" not in jaxpr(lambda x: llama.matmul(x, q), x)
    # the vocab-major LM head passes the quantized weight first: W^T [V, D] @ h^T [D, 3]
    head = jax.jit(lambda h: llama.matmul(emb, h.T, jnp.float32))
    assert "jaxllm_quant_matmul" in jaxpr(lambda h: llama.matmul(emb, h.T, jnp.float32), x)
    np.testing.assert_allclose(head(x), _xla_quant_twin(x, emb.T).T, rtol=1e-5, atol=1e-4)
    # differentiable in x and the scales / offsets (plain-XLA backward)
    loss = lambda f: lambda x, s, o: (f(x, q._replace(scales=s, offsets=o)) ** 2).sum()  # noqa
    args = (x, jnp.asarray(q.scales, jnp.float32), jnp.asarray(q.offsets, jnp.float32))
    g = jax.grad(loss(cpu_kernels.quantized_matmul), argnums=(0, 1, 2))(*args)
    g_ref = jax.grad(loss(_xla_quant_twin), argnums=(0, 1, 2))(*args)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()))


def _tiny_quantized_params(method: str):
    """A tiny random Llama (weights x5: clear greedy margins) with quantized weights:
    int8 / int4 through quantize_params, "gguf" through the gguf package's Q4_1 / Q4_0 /
    Q8_0 quantizers into the GGUF loader's layout (as LLM(quantization="gguf") keeps them)."""
    from jaxllm.config import ModelConfig
    from jaxllm.models import llama
    from jaxllm.quant import quantize_params

    cfg = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256)
    params = llama.init_params(cfg, jax.random.key(1))
    params = jax.tree.map(lambda x: x * 5 if x.ndim > 1 else x, params)
    params = llama.fuse_projections(llama.unstack_layers(params))
    if method != "gguf":
        return cfg, quantize_params(params, method)
    kinds = {"w_down": "Q4_0", "wo": "Q8_0"}  # the rest Q4_1, like the default file
    layers = [{k: _gguf_quantized(np.asarray(v), kinds.get(k, "Q4_1")) if np.ndim(v) == 2
               else v for k, v in lp.items()} for lp in params["layers"]]
    out = dict(params, layers=layers)
    out["embed"] = _gguf_quantized(np.asarray(params["embed"]).T, "Q8_0", transposed=True)
    if "lm_head" in params:
        out["lm_head"] = _gguf_quantized(np.asarray(params["lm_head"]), "Q8_0")
    return cfg, out


@pytest.mark.parametrize("method", ["int8", "int4", "gguf"])
def test_quantized_model_same_greedy_tokens_with_kernels_on_and_off(method, monkeypatch):
    from jaxllm.engine.engine import LLMEngine
    from jaxllm.sampling import SamplingParams

    cfg, params = _tiny_quantized_params(method)
    rng = np.random.default_rng(2)
    prompts = [[int(t) for t in rng.integers(4, 97, rng.integers(1, 30))] for _ in range(4)]
    sp = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)

    def tokens():
        eng = LLMEngine(params, cfg, eos_token_ids=(3,), max_model_len=128, page_size=4,
                        num_pages=96, max_num_seqs=4, max_num_batched_tokens=64)
        return [o.token_ids for o in eng.generate(prompts, sp)]

    traced = []  # count the kernel calls traced into the model's steps
    kernel = cpu_kernels.quantized_matmul
    monkeypatch.setattr(cpu_kernels, "quantized_matmul",
                        lambda x, w: traced.append(w.packing) or kernel(x, w))
    jax.clear_caches()
    on = tokens()
    assert traced, "the quantized kernel was not used"
    jax.clear_caches()  # the step functions are traced again, now without the kernels
    with cpu_kernels.override(False):
        n = len(traced)
        off = tokens()
        assert len(traced) == n
    jax.clear_caches()
    assert on == off


@pytest.mark.parametrize("rows,k,n", [(1, 576, 200), (2, 1000, 67), (3, 37, 8), (8, 1536, 131)])
def test_int8_matmul_is_exact(rows, k, n):
    """The W8A8 int8 dot equals XLA's int32 dot_general bit for bit: K past the last 32
    (the scalar tail), N past the last 8 / 4 weight rows, codes at +-127."""
    rng = np.random.default_rng(k)
    x = jnp.asarray(rng.integers(-127, 128, (rows, k)), jnp.int8)
    w = jnp.asarray(rng.integers(-127, 128, (n, k)), jnp.int8)
    x = x.at[0, :5].set(127).at[0, 5:10].set(-127)
    w = w.at[:, :5].set(-127).at[:, 5:10].set(-127)
    ref = jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
    out = jax.jit(cpu_kernels.int8_matmul)(x, w)
    assert out.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))


def test_w8a8_matmul_takes_the_int8_kernel_with_the_same_result():
    from jaxllm.quant.w8a8 import matmul, quantize_w8a8

    rng = np.random.default_rng(11)
    w = quantize_w8a8(rng.standard_normal((96, 40)))
    emb = quantize_w8a8(rng.standard_normal((50, 96)), rows=True)  # tied embedding [V, D]
    for rows in (1, 5, 33):
        x = jnp.asarray(rng.standard_normal((rows, 96)), jnp.float32)
        for f in (lambda x: matmul(x, w), lambda x: matmul(emb, x.T)):  # projection, LM head
            jaxpr = str(jax.make_jaxpr(f)(x))
            assert ("jaxllm_int8_matmul" in jaxpr) == (rows <= 32), rows
            with cpu_kernels.override(False):
                ref = jax.jit(f)(x)
            np.testing.assert_array_equal(np.asarray(jax.jit(f)(x)), np.asarray(ref))
