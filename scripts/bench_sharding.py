#!/usr/bin/env python
"""Sharding benchmark: collectives per decode step from the compiled HLO, and a measured
pipeline bubble.

    python scripts/bench_sharding.py                          # tiny model, all layouts <= 8 devices
    python scripts/bench_sharding.py --model llama3-8b --layouts 1,1,8 1,2,4 1,4,2 2,1,4
    python scripts/bench_sharding.py --bubble                 # pp=2 on 2 single-threaded CPU devices

**collectives**: for each ``dp,pp,tp`` layout, one greedy decode step (the same
``ShardedModel.forward`` + vocab-parallel LM head + argmax the generate path runs) is
compiled for ``--devices`` virtual CPU devices and every all-reduce / all-gather /
reduce-scatter / collective-permute / all-to-all in the HLO is listed with its shape.
Reported per device and step: op count, payload bytes, and ring "wire" bytes
(all-reduce ``2(n-1)/n x size``, all-gather / reduce-scatter ``(n-1)/n x size``,
permute ``size``).  Ops inside the pipeline's per-step ``conditional`` run only in
``M`` of the ``M+pp-1`` steps; they are weighted accordingly.  Large models are
compiled from abstract shapes (no weights allocated) with ``pp`` and ``2*pp`` layers and
extrapolated linearly to the real depth (per-layer collectives are identical).

**bubble** (``--bubble``): GPipe forward (no-cache, prefill-like, compute-bound) with
pp=2 over 2 CPU devices, each single-threaded, for M = 1, 2, 4, 8 microbatches.  Ideal
time = M x (one stage on one microbatch, measured alone on one device); measured bubble =
1 - ideal / measured.  That only means something if the two devices' programs run at the
same time, so a probe runs first: the same independent work on 1 device, then on each of
2 devices in one ``shard_map`` (2 concurrent devices: same wall time; serialised: 2x).
With JAX 0.10.2's CPU client the probe shows the devices run one after another, i.e. the
measured "bubble" is then dominated by that serialisation, not by the schedule.

What one machine can and cannot show: virtual CPU devices (or a single GPU) give exact
collective *counts and sizes*, per-device memory, numerical equality with the
single-device model, and the schedule's structure.  They cannot show interconnect time
(NVLink / InfiniBand bandwidth and latency), compute/communication overlap, NCCL
behaviour, or multi-GPU scaling; the bubble measurement needs as many real cores as
stages.  Times across layouts on one CPU are NOT a proxy for a multi-GPU speedup.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODELS = {
    # name: (vocab, hidden, intermediate, layers, heads, kv_heads, head_dim, tied)
    "tiny": (128, 64, 128, 4, 8, 4, 8, False),
    "smollm2-135m": (49152, 576, 1536, 30, 9, 3, 64, True),
    "llama3-8b": (128256, 4096, 14336, 32, 32, 8, 128, False),
    "llama3-70b": (128256, 8192, 28672, 80, 64, 8, 128, False),
}
COLLECTIVE = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.+?) (all-reduce|all-gather|reduce-scatter|"
                        r"collective-permute|all-to-all)(?:-start)?\((.*)$")
DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1,
               "f64": 8, "s64": 8}


def model_config(name: str, layers: int | None = None):
    from jaxllm.config import ModelConfig

    v, d, f, n, h, kv, hd, tied = MODELS[name]
    return ModelConfig(vocab_size=v, hidden_size=d, intermediate_size=f,
                       num_layers=layers or n, num_heads=h, num_kv_heads=kv, head_dim=hd,
                       tie_word_embeddings=tied, max_position_embeddings=8192)


# --------------------------------------------------------------------------- HLO parsing

def _shape_bytes(type_str: str) -> int:
    total = 0
    for dt, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", type_str):
        n = 1
        for x in filter(None, dims.split(",")):
            n *= int(x)
        total += n * DTYPE_BYTES.get(dt, 4)
    return total


def _group_size(rest: str, default: int) -> int:
    m = re.search(r"replica_groups=\{\{([\d,]+)\}", rest)
    if m:
        return len(m.group(1).split(","))
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", rest)
    if m:
        return int(m.group(2))
    m = re.search(r"source_target_pairs=", rest)
    if m:
        return 2
    return default


def parse_collectives(hlo: str, cond_weight: float, default_group: int,
                      act_bytes: int = 4) -> list[dict]:
    """Every collective op: kind, shape, bytes, group size, and how often it runs per
    call (``cond_weight`` for ops inside a conditional branch, else 1).  ``act_bytes``:
    bytes per element of the model's activations (all-reduces / permutes carry them)."""
    branch_comps: set[str] = set()
    for m in re.finditer(r"branch_computations=\{([^}]*)\}", hlo):
        branch_comps |= {c.strip().lstrip("%") for c in m.group(1).split(",")}
    for m in re.finditer(r"(?:true|false)_computation=%?([\w.\-]+)", hlo):
        branch_comps.add(m.group(1))
    ops, comp = [], None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$", line)
        if head:
            comp = head.group(1)
            continue
        m = COLLECTIVE.match(line)
        if not m:
            continue
        _, type_str, kind, rest = m.groups()
        n = _group_size(rest, default_group)
        size = _shape_bytes(type_str)
        if act_bytes == 2 and kind in ("all-reduce", "collective-permute") and \
                type_str.startswith(("f32", "(f32")):
            size //= 2  # XLA:CPU widens bf16 activation collectives to f32; GPUs/TPUs do not
        wire = {"all-reduce": 2 * (n - 1) / n * size, "all-gather": (n - 1) / n * size,
                "reduce-scatter": (n - 1) * size, "all-to-all": (n - 1) / n * size,
                "collective-permute": size}[kind]
        ops.append({"kind": kind, "type": type_str.split("{")[0], "bytes": size, "group": n,
                    "wire": wire, "runs": cond_weight if comp in branch_comps else 1.0})
    return ops


# --------------------------------------------------------------------------- decode step HLO

def decode_step_hlo(cfg, dp: int, pp: int, tp: int, batch: int, context: int, dtype,
                    microbatches: int | None, devices) -> tuple[str, object]:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    import sharding
    from jaxllm import generation as G
    from jaxllm.attention import cached_attention

    plan = sharding.make_plan(cfg, dp=dp, tp=tp, pp=pp)
    mesh = sharding.make_mesh(dp=dp, tp=tp, pp=pp, devices=devices[:dp * tp * pp])
    model = sharding.ShardedModel(mesh=mesh, plan=plan, microbatches=microbatches)
    b = model.pad_batch(batch)
    shapes = sharding.rules.global_param_shapes(plan)
    per = cfg.num_layers // pp

    def sds(shape, spec):
        return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=NamedSharding(mesh, spec))

    specs = model.param_specs()
    params = {k: sds(shapes[k], specs[k]) for k in shapes if k != "layers"}
    params["layers"] = [{k: sds((pp,) + tuple(shapes["layers"][k][1:]), specs["layers"][i][k])
                         for k in shapes["layers"]} for i in range(per)]
    caches = jax.eval_shape(lambda: model.empty_caches(cfg, b, context, dtype))
    k_spec, v_spec = model.cache_specs()
    caches = [[(sds(k.shape, k_spec), sds(v.shape, v_spec)) for k, v in layer] for layer in caches]
    row = NamedSharding(mesh, P("data"))
    last = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=row)
    kv_start = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=row)
    slot = jax.ShapeDtypeStruct((), jnp.int32)

    def step(params, caches, last_token, kv_start, slot):
        positions = (slot - kv_start)[:, None]

        def attend(rows, q, k, v, cache):
            cache = G._write_cache(cache, k, v, slot)
            out = cached_attention(q, *cache, q_slot=slot, kv_start=rows["kv_start"],
                                   sliding_window=cfg.sliding_window)
            return out, cache

        hidden, caches = model.forward(params, cfg, last_token[:, None], positions, attend,
                                       {"kv_start": kv_start}, caches)
        logits = model.lm_head(params, cfg, hidden[:, -1])
        return jnp.argmax(logits, axis=-1), caches

    fn = jax.jit(step, donate_argnums=(1,))
    return fn.lower(params, caches, last, kv_start, slot).compile().as_text(), model


def summarize(ops: list[dict]) -> dict:
    out = defaultdict(lambda: {"count": 0.0, "bytes": 0.0, "wire": 0.0})
    for op in ops:
        s = out[op["kind"]]
        s["count"] += op["runs"]
        s["bytes"] += op["runs"] * op["bytes"]
        s["wire"] += op["runs"] * op["wire"]
    return dict(out)


def run_collectives(args) -> list[dict]:
    import jax
    import jax.numpy as jnp

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    devices = jax.devices()
    rows = []
    for layout in args.layouts:
        dp, pp, tp = (int(x) for x in layout.split(","))
        if dp * pp * tp > len(devices):
            print(f"skip {layout}: needs {dp * pp * tp} devices", file=sys.stderr)
            continue
        full = MODELS[args.model][3]
        truncate = args.model != "tiny" and not args.full_depth
        depths = [pp, 2 * pp] if truncate else [full]
        sums = []
        t0 = time.perf_counter()
        for depth in depths:
            cfg = model_config(args.model, depth)
            try:
                hlo, model = decode_step_hlo(cfg, dp, pp, tp, args.batch, args.context, dtype,
                                             args.microbatches, devices)
            except ValueError as e:
                print(f"skip {layout}: {e}", file=sys.stderr)
                break
            b = model.pad_batch(args.batch)
            m = model.num_microbatches(b)
            weight = m / (m + pp - 1) if pp > 1 else 1.0
            sums.append(summarize(parse_collectives(hlo, weight, tp,
                                                    jnp.dtype(dtype).itemsize)))
        else:
            if truncate:  # linear in depth: s(L) = s(pp) + (L - pp) / pp * (s(2pp) - s(pp))
                a, c = sums
                scale = (full - pp) / pp
                total = {k: {f: a.get(k, {}).get(f, 0) + scale * (c.get(k, {}).get(f, 0)
                                                                  - a.get(k, {}).get(f, 0))
                             for f in ("count", "bytes", "wire")} for k in set(a) | set(c)}
            else:
                total = sums[0]
            rows.append({"layout": layout, "dp": dp, "pp": pp, "tp": tp, "microbatches": m,
                         "bubble": (pp - 1) / (m + pp - 1), "collectives": total,
                         "compile_s": time.perf_counter() - t0})
    return rows


def print_collectives(rows, args) -> None:
    print(f"\n# Collectives per decode step, per device -- model {args.model} ({args.dtype}), "
          f"batch {args.batch}, context {args.context}, from compiled HLO on "
          f"{args.devices} virtual CPU devices (XLA:CPU widens bf16 all-reduces / permutes to "
          "f32; they are counted at 2 bytes/element, as a GPU/TPU sends them)")
    print("| dp,pp,tp | M | all-reduce n / KiB | all-gather n / KiB | permute n / KiB | "
          "wire KiB/step | wire B/token | bubble |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        c = r["collectives"]

        def cell(k):
            s = c.get(k, {"count": 0, "bytes": 0})
            return f"{s['count']:.1f} / {s['bytes'] / 1024:.1f}"

        wire = sum(s["wire"] for s in c.values())
        tokens = args.batch // r["dp"]  # tokens this device's replica handles per step
        print(f"| {r['layout']} | {r['microbatches']} | {cell('all-reduce')} | "
              f"{cell('all-gather')} | {cell('collective-permute')} | {wire / 1024:.1f} | "
              f"{wire / max(tokens, 1):.0f} | {r['bubble']:.2f} |")


# --------------------------------------------------------------------------- measured bubble

def run_bubble(args) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import sharding
    from jaxllm.config import ModelConfig
    from jaxllm.models import llama

    cfg = ModelConfig(vocab_size=512, hidden_size=512, intermediate_size=1536, num_layers=8,
                      num_heads=8, num_kv_heads=8, head_dim=64, max_position_embeddings=1024)
    half = ModelConfig(**{**cfg.__dict__, "num_layers": cfg.num_layers // 2})
    host = jax.tree.map(np.asarray, llama.init_params(cfg, jax.random.key(0)))
    host_half = {**host, "layers": {k: v[:half.num_layers] for k, v in host["layers"].items()}}
    b, t = args.bubble_batch, args.bubble_seq
    rng = np.random.default_rng(0)

    def timeit(model, params, tokens):
        f = lambda: jax.block_until_ready(model.logits(params, tokens, attn_impl="xla"))  # noqa
        f()
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            f()
            best = min(best, time.perf_counter() - t0)
        return best

    dev = jax.devices()
    full1, p_full = sharding.setup(cfg, host, devices=dev[:1])
    t_single = timeit(full1, p_full, jnp.asarray(rng.integers(0, 512, (b, t)), jnp.int32))
    stage1, p_stage = sharding.setup(half, host_half, devices=dev[:1])
    conc = device_concurrency()
    rows = []
    for m in args.bubble_microbatches:
        if b % m:
            continue
        tau = timeit(stage1, p_stage, jnp.asarray(rng.integers(0, 512, (b // m, t)), jnp.int32))
        pipe, p_pipe = sharding.setup(cfg, host, pp=2, microbatches=m, devices=dev[:2])
        t_pipe = timeit(pipe, p_pipe, jnp.asarray(rng.integers(0, 512, (b, t)), jnp.int32))
        rows.append({"microbatches": m, "stage_time_s": tau, "pipeline_s": t_pipe,
                     "single_device_s": t_single, "theory_bubble": 1 / (m + 1),
                     "measured_bubble": 1 - m * tau / t_pipe,
                     "speedup_vs_1_device": t_single / t_pipe, "device_concurrency": conc})
    return rows


def device_concurrency() -> float:
    """Wall time of one unit of work on each of 2 devices (one ``shard_map``) over one
    unit on 1 device: ~1 when the devices run concurrently, ~2 when serialised."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    def work(a):
        for _ in range(4):
            a = jnp.tanh(a @ a)
        return a

    def best(f, a):
        jax.block_until_ready(f(a))
        out = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            jax.block_until_ready(f(a))
            out = min(out, time.perf_counter() - t0)
        return out

    mesh = Mesh(jax.devices()[:2], ("x",))
    one = best(jax.jit(jax.vmap(work)), jnp.ones((1, 768, 768)))
    two = jax.jit(jax.shard_map(jax.vmap(work), mesh=mesh, in_specs=P("x"), out_specs=P("x")))
    a2 = jax.device_put(jnp.ones((2, 768, 768)), NamedSharding(mesh, P("x")))
    return best(two, a2) / one


def print_bubble(rows, args) -> None:
    c = rows[0]["device_concurrency"] if rows else float("nan")
    verdict = ("the 2 devices run concurrently" if c < 1.3 else
               "the 2 devices run ONE AFTER ANOTHER: no stage overlap is possible here, so the "
               "measured bubble below is not the schedule's")
    print(f"\n# Device concurrency probe: 2 devices x 1 unit / 1 device x 1 unit = {c:.2f} "
          f"(1 = concurrent, 2 = serialised): {verdict}")
    print(f"\n# Pipeline bubble, pp=2 on 2 single-threaded CPU devices (2 cores), no-cache "
          f"forward of batch {args.bubble_batch} x {args.bubble_seq} tokens, 8 layers D=512; "
          f"best of {args.repeats}")
    print("| M | stage x microbatch (s) | ideal M*stage (s) | pipeline (s) | bubble theory | "
          "bubble measured | speedup vs 1 device (ideal 2) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        m = r["microbatches"]
        print(f"| {m} | {r['stage_time_s']:.4f} | {m * r['stage_time_s']:.4f} | "
              f"{r['pipeline_s']:.4f} | {r['theory_bubble']:.3f} | {r['measured_bubble']:.3f} | "
              f"{r['speedup_vs_1_device']:.2f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", choices=sorted(MODELS))
    ap.add_argument("--layouts", nargs="+", default=None, help="dp,pp,tp ... (default: all <= 8)")
    ap.add_argument("--devices", type=int, default=8, help="virtual CPU devices")
    ap.add_argument("--batch", type=int, default=8, help="decode batch (global)")
    ap.add_argument("--context", type=int, default=1024, help="KV cache length")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="default: float32 for tiny, bfloat16 otherwise")
    ap.add_argument("--microbatches", type=int, default=None)
    ap.add_argument("--full-depth", action="store_true", help="compile every layer (slow)")
    ap.add_argument("--bubble", action="store_true", help="measure the pipeline bubble instead")
    ap.add_argument("--bubble-batch", type=int, default=8)
    ap.add_argument("--bubble-seq", type=int, default=128)
    ap.add_argument("--bubble-microbatches", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    args.dtype = args.dtype or ("float32" if args.model == "tiny" else "bfloat16")
    if args.layouts is None:
        args.layouts = [f"{dp},{pp},{tp}" for dp in (1, 2) for pp in (1, 2, 4)
                        for tp in (1, 2, 4, 8) if dp * pp * tp <= args.devices]

    n_dev = 2 if args.bubble else args.devices
    flags = os.environ.get("XLA_FLAGS", "")
    if args.bubble:  # one thread per device: the 2 stages run on the 2 cores in parallel
        flags += " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    os.environ["XLA_FLAGS"] = flags.strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.config.update("jax_num_cpu_devices", n_dev)
    print(f"device: {jax.devices()[0].device_kind} x {jax.device_count()} "
          f"({os.cpu_count()} host cores), jax {jax.__version__}")
    if args.bubble:
        rows = run_bubble(args)
        print_bubble(rows, args)
    else:
        rows = run_collectives(args)
        print_collectives(rows, args)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
