"""Benchmark the Pallas attention kernels against JAX's shipped kernels.

    PYTHONPATH=. python scripts/bench_kernels.py            # full GPU run (H100/H200)
    PYTHONPATH=. python scripts/bench_kernels.py --quick    # a small subset
    PYTHONPATH=. python scripts/bench_kernels.py --only decode,ragged
    PYTHONPATH=. python scripts/bench_kernels.py --xla      # CPU: time the XLA paged paths

On a GPU it measures the device's peaks first (large bf16 matmul TFLOP/s, large device
copy GB/s), then for every workload prints: shape, median time, achieved TFLOP/s or
GB/s and the fraction of the measured peak, max error vs ``pallas_kernels.reference``,
and the time ratio ``baseline / ours`` (> 1: ours is faster) against, in the same run:

* prefill fwd / bwd: ``jax.experimental.pallas.ops.gpu.attention.mha`` (no GQA: K/V are
  repeated to Hq heads outside the timed region) and
  ``jax.nn.dot_product_attention(implementation="cudnn")``;
* decode: ``pallas.ops.gpu.paged_attention.paged_attention`` (pool transposed to
  ``[Hkv, P, page, D]`` and q pre-scaled outside the timed region) and
  ``pallas.ops.gpu.decode_attention.gqa`` over a contiguous cache;
* ragged: the XLA path of ``jaxllm.attention.ragged_paged_attention`` (no JAX GPU
  ragged kernel ships).

Without a GPU it runs a smoke mode: the same code paths (ours and the baseline
adapters) in Pallas interpret mode on tiny float32 shapes, plus ``--xla`` CPU timings.
Results go to ``$OUT/bench_kernels.jsonl`` if ``$OUT`` is set, else
``results/bench_kernels_<device>_<time>.jsonl`` (one JSON object per line).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxllm import attention as A  # noqa: E402
from pallas_kernels import reference as R  # noqa: E402
from pallas_kernels.flash_attention import flash_attention  # noqa: E402
from pallas_kernels.paged_attention import paged_decode_attention  # noqa: E402
from pallas_kernels.ragged_attention import ragged_paged_attention  # noqa: E402

SECTIONS = ("peaks", "prefill", "bwd", "decode", "ragged", "xla")


# ----------------------------------------------------------------------------- utils


class Recorder:
    def __init__(self, path: Path, device: str, mode: str):
        self.path, self.device, self.mode = path, device, mode
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "a")

    def __call__(self, **row):
        row = {"device": self.device, "mode": self.mode, "time": time.time(), **row}
        self.f.write(json.dumps(row, default=float) + "\n")
        self.f.flush()
        parts = [f"{k}={_fmt(v)}" for k, v in row.items() if k not in ("device", "mode", "time")]
        print("  " + " ".join(parts), flush=True)


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timeit(fn, *args, warmup=3, reps=10, target_s=2e-3):
    """Median seconds per call.  Short calls are batched (``inner`` back-to-back calls,
    one ``block_until_ready``) so dispatch overhead does not dominate."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    one = time.perf_counter() - t0
    inner = max(1, min(100, int(target_s / max(one, 1e-7))))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = None
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        ts.append((time.perf_counter() - t0) / inner)
    return statistics.median(ts)


def timeit_cpu(fn, *args, reps=10):
    """(min wall s, median process-CPU s) per call: CPU time is robust to other
    processes time-slicing the (shared, 2-core) machine."""
    jax.block_until_ready(fn(*args))
    ws, cs = [], []
    for _ in range(reps):
        c0, t0 = _cpu_seconds(), time.perf_counter()
        jax.block_until_ready(fn(*args))
        ws.append(time.perf_counter() - t0)
        cs.append(_cpu_seconds() - c0)
    return min(ws), statistics.median(cs)


def maxerr(a, b):
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


def try_run(label, fn):
    try:
        return fn()
    except Exception as e:  # a baseline that does not apply must not stop the run
        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        print(f"  [{label} skipped] {msg}", flush=True)
        return None


def rand(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


# ----------------------------------------------------------------------------- peaks


def measure_peaks(rec, cfg):
    n = cfg["matmul_n"]
    k1, k2 = jax.random.split(jax.random.key(0))
    a, b = rand(k1, (n, n), cfg["dtype"]), rand(k2, (n, n), cfg["dtype"])
    mm = jax.jit(lambda a, b: a @ b)
    t = timeit(mm, a, b)
    tflops = 2 * n ** 3 / t / 1e12
    x = rand(k1, (cfg["copy_elems"],), cfg["dtype"])
    cp = jax.jit(lambda x: x + jnp.asarray(1, x.dtype))
    tc = timeit(cp, x)
    gbps = 2 * x.size * x.dtype.itemsize / tc / 1e9
    rec(kernel="peak_matmul", shape=f"{n}x{n}x{n} {jnp.dtype(cfg['dtype']).name}",
        time_ms=t * 1e3, tflops=tflops)
    rec(kernel="peak_copy", shape=f"{x.size * x.dtype.itemsize / 2**20:.0f} MiB",
        time_ms=tc * 1e3, gbps=gbps)
    return tflops, gbps


# ----------------------------------------------------------------------------- prefill


def _flash_flops(b, t, s, hq, d, causal=True):
    pairs = t * s - (t * (t - 1) // 2 if causal and t == s else 0) if causal else t * s
    return 4 * b * hq * d * pairs


def bench_prefill(rec, cfg, peaks, backward=False):
    from jax.experimental.pallas.ops.gpu import attention as jax_attn

    hq, hkv, d = cfg["heads"]
    dtype, interpret = cfg["dtype"], cfg["interpret"]
    g = hq // hkv
    scale = d ** -0.5
    for b, s in cfg["prefill"]:
        key = jax.random.key(b * 100003 + s)
        kq, kk, kv, kd = jax.random.split(key, 4)
        q, k, v = rand(kq, (b, s, hq, d), dtype), rand(kk, (b, s, hkv, d), dtype), rand(kv, (b, s, hkv, d), dtype)
        ours = functools.partial(flash_attention, causal=True, sm_scale=scale, interpret=interpret)
        k_rep, v_rep = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
        mha = functools.partial(jax_attn.mha, segment_ids=None, sm_scale=scale, causal=True,
                                interpret=interpret)
        cudnn = functools.partial(jax.nn.dot_product_attention, is_causal=True, scale=scale,
                                  implementation="cudnn")
        fl = _flash_flops(b, s, s, hq, d)
        shape = f"B={b} S={s} Hq={hq} Hkv={hkv} D={d} {jnp.dtype(dtype).name} causal"

        if not backward:
            f = jax.jit(ours)
            t = timeit(f, q, k, v)
            out = f(q, k, v)
            rows = min(s, 256)  # end-aligned causal: the last rows vs a T=rows reference
            ref = R.flash_attention_ref(q[:1, -rows:].astype(jnp.float32), k[:1].astype(jnp.float32),
                                        v[:1].astype(jnp.float32), causal=True, sm_scale=scale)
            err = maxerr(out[:1, -rows:], ref)
            t_mha = try_run("mha", lambda: timeit(jax.jit(mha), q, k_rep, v_rep))
            t_cudnn = (try_run("cudnn", lambda: timeit(jax.jit(cudnn), q, k, v))
                       if cfg["gpu"] else None)
            rec(kernel="flash_fwd", shape=shape, time_ms=t * 1e3, tflops=fl / t / 1e12,
                frac_peak=fl / t / 1e12 / peaks[0], max_err=err,
                mha_ms=None if t_mha is None else t_mha * 1e3,
                ratio_vs_mha=None if t_mha is None else t_mha / t,
                cudnn_ms=None if t_cudnn is None else t_cudnn * 1e3,
                ratio_vs_cudnn=None if t_cudnn is None else t_cudnn / t)
        else:
            do = rand(kd, (b, s, hq, d), dtype)

            def vjp_of(fn):
                return jax.jit(lambda q, k, v, do: jax.vjp(fn, q, k, v)[1](do))

            fwd_t = timeit(jax.jit(ours), q, k, v)
            t = timeit(vjp_of(ours), q, k, v, do) - fwd_t
            grads = vjp_of(ours)(q, k, v, do)
            err = None
            if s <= cfg["bwd_check_max_s"]:
                ref_grads = vjp_of(functools.partial(R.flash_attention_ref, causal=True, sm_scale=scale))(
                    *(x[:1].astype(jnp.float32) for x in (q, k, v, do)))
                err = max(maxerr(a[:1], r) for a, r in zip(grads, ref_grads))
            t_mha = try_run("mha bwd", lambda: timeit(vjp_of(mha), q, k_rep, v_rep, do)
                            - timeit(jax.jit(mha), q, k_rep, v_rep))
            t_cudnn = (try_run("cudnn bwd", lambda: timeit(vjp_of(cudnn), q, k, v, do)
                               - timeit(jax.jit(cudnn), q, k, v)) if cfg["gpu"] else None)
            bfl = 2.5 * fl  # FA2 accounting: 5 of the 7 bwd matmuls are "useful"
            rec(kernel="flash_bwd", shape=shape, time_ms=t * 1e3, tflops=bfl / t / 1e12,
                frac_peak=bfl / t / 1e12 / peaks[0], max_err=err,
                mha_ms=None if t_mha is None else t_mha * 1e3,
                ratio_vs_mha=None if t_mha is None else t_mha / t,
                cudnn_ms=None if t_cudnn is None else t_cudnn * 1e3,
                ratio_vs_cudnn=None if t_cudnn is None else t_cudnn / t)


# ----------------------------------------------------------------------------- decode


def _pow2_divisor(n, cap):
    x = 1
    while x * 2 <= cap and n % (x * 2) == 0:
        x *= 2
    return x


def bench_decode(rec, cfg, peaks):
    from jax.experimental.pallas.ops.gpu import decode_attention as jax_decode
    from jax.experimental.pallas.ops.gpu import paged_attention as jax_paged

    hq, hkv, d = cfg["heads"]
    dtype, interpret = cfg["dtype"], cfg["interpret"]
    scale = d ** -0.5
    for b, length, ps in cfg["decode"]:
        mp = length // ps
        num_pages = b * mp
        key = jax.random.key(b * 7919 + length + ps)
        kq, kk, kv, kperm = jax.random.split(key, 4)
        q = rand(kq, (b, hq, d), dtype)
        k_pages = rand(kk, (num_pages, ps, hkv, d), dtype)
        v_pages = rand(kv, (num_pages, ps, hkv, d), dtype)
        bt = jax.random.permutation(kperm, num_pages).reshape(b, mp).astype(jnp.int32)
        lengths = jnp.full((b,), length, jnp.int32)
        f = jax.jit(functools.partial(paged_decode_attention, sm_scale=scale, interpret=interpret))
        t = timeit(f, q, k_pages, v_pages, bt, lengths)
        out = f(q, k_pages, v_pages, bt, lengths)
        nb = min(b, 4)
        ref = R.paged_decode_attention_ref(q[:nb].astype(jnp.float32), k_pages, v_pages, bt[:nb],
                                           lengths[:nb], sm_scale=scale)
        err = maxerr(out[:nb], ref)
        nbytes = 2 * b * length * hkv * d * jnp.dtype(dtype).itemsize + 2 * q.size * q.dtype.itemsize

        # JAX paged_attention: [Hkv, P, page, D] pool, q pre-scaled (prep not timed).
        def jax_paged_time():
            kt, vt = jnp.transpose(k_pages, (2, 0, 1, 3)), jnp.transpose(v_pages, (2, 0, 1, 3))
            k_splits = _pow2_divisor(mp, 16)
            ppcb = _pow2_divisor(mp // k_splits, 8)
            fn = jax.jit(functools.partial(jax_paged.paged_attention, k_splits=k_splits,
                                           pages_per_compute_block=ppcb, interpret=interpret))
            qs = (q.astype(jnp.float32) * scale).astype(dtype)
            o = fn(qs, kt, vt, bt, lengths)
            return timeit(fn, qs, kt, vt, bt, lengths), maxerr(o[:nb], ref)

        def jax_gqa_time():
            kc, vc = R.gather_kv(k_pages, bt), R.gather_kv(v_pages, bt)  # contiguous [B,L,Hkv,D]
            fn = jax.jit(functools.partial(jax_decode.gqa, sm_scale=scale, interpret=interpret,
                                           k_splits=_pow2_divisor(length // 16, 16)))
            return timeit(fn, q, kc, vc, None, lengths)

        jp = try_run("jax paged_attention", jax_paged_time)
        jg = try_run("jax decode gqa", jax_gqa_time)
        rec(kernel="paged_decode", shape=f"B={b} L={length} page={ps} Hq={hq} Hkv={hkv} D={d} "
            f"{jnp.dtype(dtype).name}", time_ms=t * 1e3, gbps=nbytes / t / 1e9,
            frac_peak=nbytes / t / 1e9 / peaks[1], max_err=err,
            jax_paged_ms=None if jp is None else jp[0] * 1e3,
            ratio_vs_jax_paged=None if jp is None else jp[0] / t,
            jax_paged_err=None if jp is None else jp[1],
            jax_gqa_ms=None if jg is None else jg * 1e3,
            ratio_vs_jax_gqa=None if jg is None else jg / t)


# ----------------------------------------------------------------------------- ragged


def _ragged_problem(cfg, q_lens, kv_lens, ps, key):
    hq, hkv, d = cfg["heads"]
    dtype = cfg["dtype"]
    mps = [-(-kl // ps) for kl in kv_lens]
    mp = max(mps)
    num_pages = sum(mps) + 1
    kq, kk, kv, kperm = jax.random.split(key, 4)
    n = sum(q_lens)
    q = rand(kq, (n, hq, d), dtype)
    k_pages = rand(kk, (num_pages, ps, hkv, d), dtype)
    v_pages = rand(kv, (num_pages, ps, hkv, d), dtype)
    perm = np.asarray(jax.random.permutation(kperm, num_pages))
    bt = np.zeros((len(q_lens), mp), np.int32)
    o = 0
    for s, m in enumerate(mps):
        bt[s, :m] = perm[o:o + m]
        o += m
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    return q, k_pages, v_pages, jnp.asarray(bt), cu, jnp.asarray(kv_lens, jnp.int32)


def bench_ragged(rec, cfg, peaks):
    hq, hkv, d = cfg["heads"]
    scale = d ** -0.5
    for name, q_lens, kv_lens, ps in cfg["ragged"]:
        args = _ragged_problem(cfg, q_lens, kv_lens, ps, jax.random.key(len(q_lens)))
        f = jax.jit(functools.partial(ragged_paged_attention, sm_scale=scale,
                                      interpret=cfg["interpret"]))
        t = timeit(f, *args)
        out = f(*args)
        xla = jax.jit(functools.partial(A._ragged_xla, sm_scale=scale, soft_cap=None,
                                        sliding_window=None))
        ref_out = xla(*(a.astype(jnp.float32) if a.dtype == cfg["dtype"] else a for a in args))
        err = maxerr(out, ref_out)
        t_xla = try_run("xla path", lambda: timeit(xla, *args))
        itemsize = jnp.dtype(cfg["dtype"]).itemsize
        nbytes = 2 * sum(kv_lens) * hkv * d * itemsize
        flops = sum(4 * hq * d * (ql * kl - ql * (ql - 1) // 2) for ql, kl in zip(q_lens, kv_lens))
        rec(kernel="ragged_paged", shape=f"{name} N={sum(q_lens)} seqs={len(q_lens)} page={ps} "
            f"Hq={hq} Hkv={hkv} D={d} {jnp.dtype(cfg['dtype']).name}", time_ms=t * 1e3,
            gbps=nbytes / t / 1e9, frac_peak_bw=nbytes / t / 1e9 / peaks[1],
            tflops=flops / t / 1e12, frac_peak_flops=flops / t / 1e12 / peaks[0], max_err=err,
            xla_ms=None if t_xla is None else t_xla * 1e3,
            ratio_vs_xla=None if t_xla is None else t_xla / t)


# ----------------------------------------------------------------------------- CPU XLA paths


def bench_xla_cpu(rec, cfg):
    """The CPU engine's XLA paths at SmolLM2-135M attention shapes (Hq=9, Hkv=3, D=64,
    f32, page 16, a 16k-token pool per layer), vs the gather-everything references and
    dense attention over a contiguous cache.  Times: min wall / median process CPU."""
    hq, hkv, d, ps, num_pages = 9, 3, 64, 16, 1024
    key = jax.random.key(0)
    kk, kv, kq = jax.random.split(key, 3)
    k_pages = rand(kk, (num_pages, ps, hkv, d), jnp.float32)
    v_pages = rand(kv, (num_pages, ps, hkv, d), jnp.float32)
    rng = np.random.default_rng(0)
    reps = cfg["cpu_reps"]

    def table(ns, mp):
        return jnp.asarray(rng.permutation(num_pages)[: ns * mp].reshape(ns, mp) if ns * mp <= num_pages
                           else rng.integers(0, num_pages, (ns, mp)), jnp.int32)

    # decode: B sequences of length L, block table 2048 tokens wide (max_model_len)
    for b, length in cfg["xla_decode"]:
        q = rand(kq, (b, hq, d), jnp.float32)
        bt = table(b, 2048 // ps)
        lens = jnp.full((b,), length, jnp.int32)
        ours = jax.jit(functools.partial(A.paged_decode_attention, impl="xla"))
        w, c = timeit_cpu(ours, q, k_pages, v_pages, bt, lens, reps=reps)
        ref = jax.jit(R.paged_decode_attention_ref)
        wr, cr = timeit_cpu(ref, q, k_pages, v_pages, bt, lens, reps=max(3, reps // 3))
        kc = R.gather_kv(k_pages, bt[:, : -(-length // ps)])[:, :length]
        vc = R.gather_kv(v_pages, bt[:, : -(-length // ps)])[:, :length]
        dense = jax.jit(functools.partial(A.attention, impl="xla"))
        wd, cd = timeit_cpu(dense, q[:, None], kc, vc, reps=reps)
        err = maxerr(ours(q, k_pages, v_pages, bt, lens), ref(q, k_pages, v_pages, bt, lens))
        rec(kernel="xla_paged_decode", shape=f"B={b} L={length} table=2048 Hq={hq} Hkv={hkv} D={d} f32",
            wall_ms=w * 1e3, cpu_ms=c * 1e3, ref_gather_wall_ms=wr * 1e3, ref_gather_cpu_ms=cr * 1e3,
            dense_contiguous_wall_ms=wd * 1e3, dense_contiguous_cpu_ms=cd * 1e3, max_err=err)

    for name, q_lens, kv_lens in cfg["xla_ragged"]:
        n = sum(q_lens)
        q = rand(kq, (n, hq, d), jnp.float32)
        bt = table(len(q_lens), 2048 // ps)
        cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
        kvl = jnp.asarray(kv_lens, jnp.int32)
        ours = jax.jit(functools.partial(A.ragged_paged_attention, impl="xla"))
        w, c = timeit_cpu(ours, q, k_pages, v_pages, bt, cu, kvl, reps=reps)
        bq = A._ragged_block_q(n, len(q_lens), hq // hkv)
        row = dict(kernel="xla_ragged", shape=f"{name} N={n} seqs={len(q_lens)} table=2048",
                   block_q=bq, wall_ms=w * 1e3, cpu_ms=c * 1e3)
        # dense reference point: each non-empty sequence through attention() on contiguous K/V
        dense = jax.jit(functools.partial(A.attention, impl="xla"))
        dw = dc = 0.0
        for s, (ql, kl) in enumerate(zip(q_lens, kv_lens)):
            if ql == 0:
                continue
            kc = R.gather_kv(k_pages, bt[s:s + 1])[:, :kl]
            vc = R.gather_kv(v_pages, bt[s:s + 1])[:, :kl]
            ws_, cs_ = timeit_cpu(dense, q[None, int(cu[s]):int(cu[s]) + ql], kc, vc, reps=3)
            dw, dc = dw + ws_, dc + cs_
        row.update(dense_per_seq_wall_ms=dw * 1e3, dense_per_seq_cpu_ms=dc * 1e3)
        if n * 2048 * hkv * d * 4 < 2e9:  # O(N*S) reference: only when it fits
            ref = jax.jit(R.ragged_paged_attention_ref)
            wr, cr = timeit_cpu(ref, q, k_pages, v_pages, bt, cu, kvl, reps=3)
            row.update(ref_wall_ms=wr * 1e3, ref_cpu_ms=cr * 1e3,
                       max_err=maxerr(ours(q, k_pages, v_pages, bt, cu, kvl),
                                      ref(q, k_pages, v_pages, bt, cu, kvl)))
        rec(**row)

    # cache write: N new tokens into both pools, in place (donated) and copying
    for n in cfg["xla_write"]:
        knew, vnew = rand(kq, (n, hkv, d), jnp.float32), rand(kv, (n, hkv, d), jnp.float32)
        slots = jnp.asarray(rng.permutation(num_pages * ps)[:n], jnp.int32)
        donated = jax.jit(A.write_kv_pages, donate_argnums=(0, 1))
        kp, vp = k_pages + 0, v_pages + 0
        kp, vp = donated(kp, vp, knew, vnew, slots)
        jax.block_until_ready(kp)
        for _ in range(3):  # warm the donated buffers
            kp, vp = donated(kp, vp, knew, vnew, slots)
        jax.block_until_ready(kp)
        ws, cs = [], []
        for _ in range(5 * reps):
            c0, t0 = _cpu_seconds(), time.perf_counter()
            kp, vp = donated(kp, vp, knew, vnew, slots)
            jax.block_until_ready(kp)
            ws.append(time.perf_counter() - t0)
            cs.append(_cpu_seconds() - c0)
        copying = jax.jit(A.write_kv_pages)
        wc, cc = timeit_cpu(copying, k_pages, v_pages, knew, vnew, slots, reps=reps)
        rec(kernel="xla_write_kv_pages", shape=f"N={n} pool={num_pages}x{ps}x{hkv}x{d} f32 "
            f"({2 * k_pages.size * 4 / 2**20:.0f} MiB K+V)", donated_wall_ms=min(ws) * 1e3,
            donated_cpu_ms=statistics.median(cs) * 1e3, copying_wall_ms=wc * 1e3,
            copying_cpu_ms=cc * 1e3)


# ----------------------------------------------------------------------------- configs


def make_config(gpu: bool, quick: bool, interpret: bool):
    if gpu and not interpret:
        cfg = dict(
            gpu=True, interpret=False, dtype=jnp.bfloat16, heads=(32, 8, 128),
            matmul_n=8192, copy_elems=1 << 29, bwd_check_max_s=4096, cpu_reps=10,
            prefill=[(1, 1024), (1, 4096), (1, 16384), (4, 2048), (8, 1024), (8, 4096)],
            bwd=[(1, 2048), (4, 4096), (1, 16384)],
            decode=[(1, 1024, 16), (1, 32768, 16), (8, 4096, 16), (32, 1024, 16), (32, 4096, 16),
                    (32, 4096, 64), (32, 32768, 16), (64, 2048, 64), (128, 2048, 16),
                    (256, 1024, 16), (256, 4096, 64)],
            ragged=[("4x512prefill(+1536ctx)+124decode@2k", [512] * 4 + [1] * 124,
                     [2048] * 4 + [2048] * 124, 16),
                    ("1x2048prefill", [2048], [2048], 16),
                    ("256decode@1k", [1] * 256, [1024] * 256, 16)],
        )
        if quick:
            cfg.update(prefill=[(1, 4096), (8, 1024)], bwd=[(1, 2048)],
                       decode=[(1, 32768, 16), (32, 4096, 16), (256, 1024, 64)],
                       ragged=cfg["ragged"][:1])
    else:  # smoke: same code, interpret mode, tiny float32 shapes
        cfg = dict(
            gpu=gpu, interpret=True, dtype=jnp.float32, heads=(4, 2, 32),
            matmul_n=256, copy_elems=1 << 22, bwd_check_max_s=128, cpu_reps=5,
            prefill=[(1, 128)], bwd=[(1, 64)], decode=[(2, 64, 16)],
            ragged=[("2prefill+2decode", [24, 16, 1, 1], [40, 16, 33, 7], 16)],
        )
    cfg.update(
        xla_decode=[(1, 512), (8, 512), (32, 256), (32, 1024)] if not quick else [(8, 512)],
        xla_ragged=([("prefill512", [512], [512]),
                     ("prefill512+ctx512,8seq", [512] + [0] * 7, [1024] + [0] * 7),
                     ("2x200(+300ctx)+30decode@400", [200, 200] + [1] * 30, [500, 500] + [400] * 30),
                     ("32decode@256", [1] * 32, [256] * 32)]
                    if not quick else [("2x200(+300ctx)+30decode@400", [200, 200] + [1] * 30,
                                        [500, 500] + [400] * 30)]),
        xla_write=[1, 32, 512] if not quick else [32],
    )
    return cfg


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small subset of the workloads")
    p.add_argument("--interpret", action="store_true",
                   help="smoke mode: Pallas interpret mode, tiny float32 shapes")
    p.add_argument("--only", default=None, help=f"comma list of sections from {SECTIONS}")
    p.add_argument("--xla", action="store_true", help="also time the CPU XLA paged paths")
    p.add_argument("--out", default=None, help="output .jsonl path")
    args = p.parse_args(argv)

    backend = jax.default_backend()
    gpu = backend == "gpu"
    if not gpu and not args.interpret:
        print(f"No GPU backend (jax.default_backend()={backend!r}): running the CPU smoke mode "
              "(Pallas interpret=True, tiny float32 shapes; timings are NOT kernel performance). "
              "GPU numbers need an NVIDIA H100/H200: run this script there.", flush=True)
        args.interpret = True
    cfg = make_config(gpu, args.quick, args.interpret)
    sections = SECTIONS if args.only is None else tuple(s.strip() for s in args.only.split(","))
    if args.only is None and not (args.xla or not gpu):
        sections = tuple(s for s in sections if s != "xla")
    dev = jax.devices()[0]
    device = f"{dev.platform}:{getattr(dev, 'device_kind', '?')}"
    mode = "gpu" if not cfg["interpret"] else "smoke-interpret"
    if args.out:
        path = Path(args.out)
    elif os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "bench_kernels.jsonl"
    else:
        tag = device.replace(" ", "_").replace(":", "_")
        path = Path("results") / f"bench_kernels_{tag}_{time.strftime('%Y%m%d_%H%M%S')}.jsonl"
    rec = Recorder(path, device, mode)
    print(f"device={device} mode={mode} jax={jax.__version__} -> {path}", flush=True)

    peaks = (float("nan"), float("nan"))
    if "peaks" in sections or any(s in sections for s in ("prefill", "bwd", "decode", "ragged")):
        print("== peaks", flush=True)
        peaks = measure_peaks(rec, cfg)
    if "prefill" in sections:
        print("== prefill forward (flash_attention vs pallas mha, cuDNN)", flush=True)
        bench_prefill(rec, cfg, peaks)
    if "bwd" in sections:
        print("== prefill backward (time of vjp minus forward)", flush=True)
        bench_prefill(rec, dict(cfg, prefill=cfg["bwd"]), peaks, backward=True)
    if "decode" in sections:
        print("== paged decode (vs pallas paged_attention, decode_attention.gqa)", flush=True)
        bench_decode(rec, cfg, peaks)
    if "ragged" in sections:
        print("== ragged paged attention (vs the XLA path)", flush=True)
        bench_ragged(rec, cfg, peaks)
    if "xla" in sections:
        if gpu:
            print("== xla section is for CPU; skipped on GPU", flush=True)
        else:
            print("== CPU XLA paged paths (min wall ms / median process-CPU ms)", flush=True)
            bench_xla_cpu(rec, cfg)
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
