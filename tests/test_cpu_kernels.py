"""C++ CPU kernels (``cpu_kernels``) against their XLA twins, the build / fallback machinery,
and the engine with the kernels on and off.

Tolerances: float32 and bfloat16 pools (both sides read the same values, widened to
float32) 1e-5; int8 pools 1e-5 relative to the output scale (both dequantize
``int8 * scale`` exactly, only the summation order differs); bfloat16 queries / outputs
one bfloat16 ulp (~8e-3 relative).  Small-M matmul: 1e-5 relative to the output scale
(both accumulate the same widened values in float32, in a different order).
"""

from __future__ import annotations

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
@given(rows=st.integers(1, 16), k=st.sampled_from([8, 64, 200]),
       n=st.sampled_from([5, 64, 136, 320]),
       dtype=st.sampled_from(["float32", "bfloat16", "uint16"]),
       x_bf16=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_matmul_matches_xla(rows, k, n, dtype, x_bf16, seed):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.bfloat16 if x_bf16 else jnp.float32)
    if dtype == "uint16":
        w_twin = w.astype(jnp.bfloat16)
        w = jax.lax.bitcast_convert_type(w_twin, jnp.uint16)
    else:
        w = w_twin = w.astype(dtype)
    ref = np.asarray(_xla_matmul(x.astype(w_twin.dtype) if x_bf16 else x, w_twin))
    out = np.asarray(jax.jit(cpu_kernels.matmul)(x, w))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-5 * max(1.0, float(np.abs(ref).max())))


def test_matmul_dispatch_and_grad():
    from jaxllm.models import llama

    w = jnp.asarray(np.random.default_rng(3).standard_normal((64, 96)), jnp.bfloat16)
    x = jnp.ones((4, 64), jnp.float32)
    assert "jaxllm_small_matmul" in str(jax.make_jaxpr(lambda x, w: llama.matmul(x, w))(x, w))
    big = jnp.ones((64, 64), jnp.float32)  # 64 rows: XLA's GEMM
    assert "jaxllm_small_matmul" not in str(
        jax.make_jaxpr(lambda x, w: llama.matmul(x, w))(big, w))
    loss = lambda f: lambda x, w: (f(x, w) ** 2).sum()  # noqa: E731
    g = jax.grad(loss(cpu_kernels.matmul), argnums=(0, 1))(x, w)
    g_ref = jax.grad(loss(_xla_matmul), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(g[0], g_ref[0], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(g[1], np.float32), np.asarray(g_ref[1], np.float32),
                               rtol=1e-2)


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
