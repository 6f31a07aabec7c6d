"""C++ CPU kernels vs their XLA twins, timed interleaved (ours, xla, ours, xla, ...).

    PYTHONPATH=. python scripts/bench_cpu_kernels.py [--quick] [--only attention|matmul|quant]
    PYTHONPATH=. python scripts/bench_cpu_kernels.py --engine [--dtype bfloat16]

Attention: SmolLM2-135M shapes (Hq=9, Hkv=3, D=64, page 16), one layer's paged decode
over a shuffled page pool; contexts drawn uniformly from a range per row.  Prints the
workload, the device, median ms of each, xla/ours (> 1: the kernel is faster) and the
live K/V bytes streamed per second by the kernel.  Matmul: decode-sized ``x [M, K] @ w``
over a whole model's projection weights (so that they stream from memory).
Quant: a GGUF Q4_1 model's worth of weights the same way, then each format (int8 / int4 /
GGUF Q8_0 / Q4_0 / Q4_1) per shape, against the XLA path (dequantize, then the float dot)
and the machine's measured memory bandwidth.  Every pass chains its calls (each fed by
the previous result), as a model's layers are.
``--engine``: the paged engine on the default model with the kernels off and on.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import cpu_kernels  # noqa: E402
from jaxllm import attention as A  # noqa: E402


def _time_pair(f_ours, f_xla, args, reps: int) -> tuple[float, float]:
    """Median wall ms of each, measured alternately so load changes hit both alike."""
    for f in (f_ours, f_xla):
        jax.block_until_ready(f(*args))
        jax.block_until_ready(f(*args))
    ours, xla = [], []
    for _ in range(reps):
        for f, acc in ((f_ours, ours), (f_xla, xla)):
            t = time.perf_counter()
            jax.block_until_ready(f(*args))
            acc.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ours), statistics.median(xla)


def _time_blocks(f_ours, f_xla, args, reps: int, rounds: int = 3) -> tuple[float, float]:
    """Like :func:`_time_pair`, alternating blocks of ``reps`` calls rather than single
    calls: the XLA path over quantized weights allocates and frees a float copy of every
    weight, which measured to double the kernel's time on the call right after it."""
    ours, xla = [], []
    for _ in range(rounds):
        for f, acc in ((f_ours, ours), (f_xla, xla)):
            jax.block_until_ready(f(*args))  # the first call after the switch: not timed
            for _ in range(reps):
                t = time.perf_counter()
                jax.block_until_ready(f(*args))
                acc.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ours), statistics.median(xla)


def bench_attention(quick: bool) -> None:
    hq, hkv, d, page = 9, 3, 64, 16
    cases = [(64, 16, 768), (32, 16, 768), (8, 16, 768), (1, 16, 768), (1, 2048, 2048),
             (64, 128, 128), (8, 512, 512), (2, 16, 768), (4, 16, 768), (16, 16, 768)]
    if quick:
        cases = cases[:4]
    # uint16: bfloat16 bits, the form the engine keeps bf16 pools in on XLA:CPU
    dtypes = ("float32", "bfloat16", "uint16", "int8")
    rng = np.random.default_rng(0)
    print(f"{'workload':34s} {'pool':8s} {'ours ms':>8s} {'xla ms':>8s} {'xla/ours':>8s} "
          f"{'ours GB/s':>9s}")
    for b, lo, hi in cases:
        lengths = rng.integers(lo, hi + 1, b).astype(np.int32)
        width = -(-hi // page)
        num_pages = b * width + 1
        bt = rng.permutation(num_pages)[: b * width].reshape(b, width).astype(np.int32)
        q = jnp.asarray(rng.standard_normal((b, hq, d)), jnp.float32)
        kf = rng.standard_normal((num_pages, page, hkv, d)).astype(np.float32)
        vf = rng.standard_normal((num_pages, page, hkv, d)).astype(np.float32)
        for dt in dtypes:
            if dt == "int8":
                ks = (np.abs(kf).max(-1) / 127).astype(np.float32)
                vs = (np.abs(vf).max(-1) / 127).astype(np.float32)
                kp = jnp.asarray(np.round(kf / ks[..., None]), jnp.int8)
                vp = jnp.asarray(np.round(vf / vs[..., None]), jnp.int8)
                scales = dict(k_scales=jnp.asarray(ks), v_scales=jnp.asarray(vs))
                elem = 1 + 4 / d
            elif dt == "uint16":
                kp, vp = (jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.bfloat16), jnp.uint16)
                          for x in (kf, vf))
                scales = {}
                elem = 2
            else:
                kp, vp = jnp.asarray(kf, dt), jnp.asarray(vf, dt)
                scales = {}
                elem = jnp.dtype(dt).itemsize
            args = (q, kp, vp, jnp.asarray(bt), jnp.asarray(lengths))
            ours = jax.jit(lambda q, k, v, t, n: cpu_kernels.paged_decode_attention(
                q, k, v, t, n, sm_scale=d ** -0.5, **scales)).lower(*args).compile()
            with cpu_kernels.override(False):  # compiled now: the XLA twin, not the kernel
                xla = jax.jit(lambda q, k, v, t, n: A.paged_decode_attention(
                    q, k, v, t, n, impl="xla", **scales)).lower(*args).compile()
            err = float(jnp.max(jnp.abs(ours(*args).astype(jnp.float32)
                                        - xla(*args).astype(jnp.float32))))
            t_ours, t_xla = _time_pair(ours, xla, args, 7 if quick else 15)
            live = float(lengths.sum()) * hkv * d * elem * 2
            name = f"decode B={b} ctx {lo}-{hi}"
            print(f"{name:34s} {dt:8s} {t_ours:8.3f} {t_xla:8.3f} {t_xla / t_ours:8.2f} "
                  f"{live / t_ours / 1e6:9.1f}   (max |diff| {err:.1e})", flush=True)


def _chained(matmul):
    """A jitted pass over a list of weights, one ``matmul(x, w)`` each, each call fed by
    the previous one's result (as a model's layers are): independent calls would let
    XLA's thunk executor run several at once, which decode never does."""
    def run(xs, ws):
        s = jnp.float32(0)
        for w in ws:
            x = xs[w.shape[0]]
            s = s + matmul(x + (s * 1e-30).astype(x.dtype), w)[0, 0]
        return s
    return jax.jit(run)


def bench_matmul(quick: bool) -> None:
    """One pass over a model's worth of projection weights (SmolLM2-135M's 30 layers of
    fused q/k/v 576x960, o 576x576, gate/up 576x3072, down 1536x576: 425 MB in float32),
    one product per weight in one jitted call.  Timing one weight alone would time it
    hot in the 16 MB L3, which is not what decode does."""
    from jaxllm.models import llama

    rng = np.random.default_rng(0)
    shapes = [(576, 960), (576, 576), (576, 3072), (1536, 576)] * (8 if quick else 30)
    rows = (1, 4) if quick else (1, 2, 4, 8, 16, 32)

    print(f"{'workload':44s} {'ours ms':>8s} {'xla ms':>8s} {'xla/ours':>8s} {'ours GB/s':>9s}")
    for dt in ("float32", "bfloat16"):
        ws = [jnp.asarray(rng.standard_normal(s, np.float32) * 0.05, dt) for s in shapes]
        nbytes = sum(w.size * w.dtype.itemsize for w in ws)
        for m in rows:
            xs = {k: jnp.asarray(rng.standard_normal((m, k)), dt) for k in (576, 1536)}
            ours = _chained(cpu_kernels.matmul).lower(xs, ws).compile()
            with cpu_kernels.override(False):  # llama.matmul's XLA path, compiled now
                xla = _chained(lambda x, w: llama.matmul(x, w, jnp.float32)).lower(
                    xs, ws).compile()
            t_ours, t_xla = _time_pair(ours, xla, (xs, ws), 5 if quick else 11)
            print(f"{f'{dt} M={m}, {len(ws)} weights ({nbytes / 1e6:.0f} MB)':44s} "
                  f"{t_ours:8.2f} {t_xla:8.2f} {t_xla / t_ours:8.2f} "
                  f"{nbytes / t_ours / 1e6:9.1f}", flush=True)


def _quantized_weights(k: int, n: int, rng) -> dict:
    """The formats the quantized-matmul kernel reads, for one ``[K, N]`` weight."""
    import gguf

    from jaxllm.quant import quantize_int4, quantize_int8
    from jaxllm.weights.gguf_blocks import blocks_to_quantized

    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    out = {"int8": quantize_int8(w), "int4-g32": quantize_int4(w, 32)}
    for kind in ("Q8_0", "Q4_0", "Q4_1"):  # GGUF blocks of the [N, K] tensor
        raw = gguf.quants.quantize(np.ascontiguousarray(w.T),
                                   getattr(gguf.GGMLQuantizationType, kind))
        out[kind] = blocks_to_quantized(raw, kind, (n, k))
    return out


def bench_quant_stream(quick: bool) -> None:
    """One pass over a GGUF Q4_1 model's worth of quantized weights -- SmolLM2-135M's 30
    layers of Q4_1 projections (fused qkv 576x960, o 576x576, gate/up 576x3072, down
    1536x576) and the Q8_0 tied LM head 576x49152, 96 MB, streamed from memory as in
    decode -- through the kernel and through the XLA path, interleaved."""
    from jaxllm.models import llama

    rng = np.random.default_rng(0)
    shapes = [(576, 960), (576, 576), (576, 3072), (1536, 576)]
    one = {sh: _quantized_weights(*sh, rng)["Q4_1"] for sh in shapes}
    layers = 8 if quick else 30  # copies: each layer its own buffers, as in a model
    ws = [jax.tree.map(lambda a: jnp.array(a, copy=True), one[sh])
          for _ in range(layers) for sh in shapes]
    ws.append(jax.tree.map(jnp.asarray, _quantized_weights(576, 49152, rng)["Q8_0"]))
    nbytes = sum(w.nbytes for w in ws)
    print(f"{'workload':44s} {'ours ms':>8s} {'xla ms':>8s} {'xla/ours':>8s} {'ours GB/s':>9s}")
    for m in ((1, 4) if quick else (1, 2, 4, 8, 16, 32, 64, 128)):
        xs = {k: jnp.asarray(rng.standard_normal((m, k)), jnp.float32) for k in (576, 1536)}
        ours = _chained(cpu_kernels.quantized_matmul).lower(xs, ws).compile()
        with cpu_kernels.override(False):  # llama.matmul's XLA path, compiled now
            xla = _chained(lambda x, w: llama.matmul(x, w, jnp.float32)).lower(xs, ws).compile()
        t_ours, t_xla = _time_blocks(ours, xla, (xs, ws), 3 if quick else 5)
        print(f"{f'Q4_1 model + Q8_0 head, M={m} ({nbytes / 1e6:.0f} MB)':44s} {t_ours:8.2f} "
              f"{t_xla:8.2f} {t_xla / t_ours:8.2f} {nbytes / t_ours / 1e6:9.1f}", flush=True)


def bench_quant_matmul(quick: bool) -> None:
    """Quantized weights: the kernel vs llama.matmul's XLA path (dequantize, then the float
    dot), interleaved; GB/s = stored bytes (codes + scales + offsets) per kernel call time,
    against the machine's measured bandwidth."""
    from jaxllm.hardware import measure_cpu
    from jaxllm.models import llama

    bw = measure_cpu(matmul_n=512, copy_mib=256).mem_bw / 1e9
    print(f"measured bandwidth (jaxllm.hardware.measure_cpu, x+1 copy, read+write): "
          f"{bw:.1f} GB/s")
    rng = np.random.default_rng(0)
    # SmolLM2-135M: fused qkv 576x960, o 576x576, fused gate/up 576x3072, down 1536x576,
    # and the tied 49152-wide LM head (the default GGUF file's is Q8_0)
    shapes = [(576, 960), (576, 576), (576, 3072), (1536, 576), (576, 49152)]
    rows = (1, 2, 4, 8, 16)
    if quick:
        shapes, rows = [(576, 3072), (576, 49152)], (1, 8)
    print(f"{'workload':44s} {'ours ms':>8s} {'xla ms':>8s} {'xla/ours':>8s} {'ours GB/s':>9s} "
          f"{'% bw':>5s}")
    for k, n in shapes:
        for fmt, q in _quantized_weights(k, n, rng).items():
            q = jax.tree.map(jnp.asarray, q)
            for m in rows:
                x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
                ours = jax.jit(cpu_kernels.quantized_matmul).lower(x, q).compile()
                with cpu_kernels.override(False):  # llama.matmul's XLA path, compiled now
                    xla = jax.jit(lambda x, w: llama.matmul(x, w, jnp.float32)).lower(
                        x, q).compile()
                ref = np.asarray(xla(x, q))
                err = float(np.max(np.abs(np.asarray(ours(x, q)) - ref)) / np.abs(ref).max())
                reps = 5 if n > 8192 else (9 if quick else 25)
                t_ours, t_xla = _time_pair(ours, xla, (x, q), reps)
                gbs = q.nbytes / t_ours / 1e6
                print(f"{f'{fmt} M={m} K={k} N={n}':44s} {t_ours:8.3f} {t_xla:8.3f} "
                      f"{t_xla / t_ours:8.2f} {gbs:9.1f} {100 * gbs / bw:5.0f}   "
                      f"(max rel diff {err:.1e})", flush=True)


def engine_child(dtype: str, requests: int, out_len: int) -> None:
    """One engine run in this process (JAXLLM_CPU_KERNELS as inherited): generate the
    workload once to compile every shape it reaches, then time it again; prints JSON."""
    import json

    from jaxllm import LLM, SamplingParams
    from jaxllm.engine.engine import LLMEngine

    llm = LLM(dtype=dtype, quantization=None)  # the float kernels
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(100, 40000, rng.integers(16, 513))]
               for _ in range(requests)]
    sp = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    eng = LLMEngine(llm.params, llm.config, eos_token_ids=llm.eos_token_ids,
                    max_model_len=llm.max_model_len, max_num_seqs=requests,
                    max_num_batched_tokens=512, num_scheduler_steps=8,
                    num_pages=requests * (512 + out_len) // 16 + 64)
    eng.generate(prompts, sp)  # compiles
    t = time.perf_counter()
    outs = eng.generate(prompts, sp)
    wall = time.perf_counter() - t
    n = sum(len(o.token_ids) for o in outs)
    print(json.dumps(dict(kernels=cpu_kernels.active(), dtype=dtype, wall_s=round(wall, 2),
                          tok_s=round(n / wall, 1), tokens=[o.token_ids[:8] for o in outs[:2]],
                          load=os.getloadavg()[0])), flush=True)


def bench_engine(dtype: str, requests: int, out_len: int, rounds: int) -> None:
    """Engine output tok/s with the kernels off / on, in alternating child processes."""
    import json
    import sys

    print(f"engine: {requests} requests at once, prompts 16-512, {out_len} output tokens, "
          f"greedy, {dtype}; second generate() of the same workload timed")
    res: dict[str, list[float]] = {"0": [], "1": []}
    for _ in range(rounds):
        for mode in ("0", "1"):
            env = {**os.environ, "JAXLLM_CPU_KERNELS": mode}
            out = subprocess.run([sys.executable, __file__, "--engine-child", dtype,
                                  str(requests), str(out_len)], env=env, capture_output=True,
                                 text=True)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
            if not line:
                print(out.stderr[-2000:])
                continue
            r = json.loads(line[-1])
            res[mode].append(r["tok_s"])
            print(f"JAXLLM_CPU_KERNELS={mode}: {r}", flush=True)
    if res["0"] and res["1"]:
        off, on = statistics.median(res["0"]), statistics.median(res["1"])
        print(f"engine tok/s median: off {off:.1f}, on {on:.1f}, on/off {on / off:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=("attention", "matmul", "quant"))
    ap.add_argument("--engine", action="store_true",
                    help="instead: the engine with kernels off / on (alternating processes)")
    ap.add_argument("--dtype", default="float32", help="--engine: model dtype")
    ap.add_argument("--requests", type=int, default=16, help="--engine: requests at once")
    ap.add_argument("--out-len", type=int, default=64, help="--engine: output tokens")
    ap.add_argument("--rounds", type=int, default=2, help="--engine: off/on pairs")
    ap.add_argument("--engine-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.engine_child:
        engine_child(args.engine_child[0], int(args.engine_child[1]),
                     int(args.engine_child[2]))
        return
    if not cpu_kernels.available():
        raise SystemExit("CPU kernels unavailable (see the log line above)")
    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo"],
                         capture_output=True, text=True).stdout.strip()
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"device: {jax.devices()[0].device_kind} ({cpu}), {os.cpu_count()} cores; jax "
          f"{jax.__version__}\nuptime: {load}")
    if args.engine:
        bench_engine(args.dtype, args.requests, args.out_len, args.rounds)
    elif args.only in (None, "attention"):
        bench_attention(args.quick)
    if args.only in (None, "matmul") and not args.engine:
        bench_matmul(args.quick)
    if args.only in (None, "quant") and not args.engine:
        bench_quant_stream(args.quick)
        bench_quant_matmul(args.quick)
    print("uptime:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
