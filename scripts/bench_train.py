#!/usr/bin/env python
"""Training-step benchmark: tokens/s and peak memory, XLA vs Pallas flash attention, remat.

Workload: the default model (SmolLM2-135M-Instruct) or ``--model``, one jitted
training step (forward + backward + AdamW, donated state) on a random packed
batch of ``--rows`` x ``--seq-lens`` tokens, full fine-tuning (``--lora`` for an
adapter).  Cases: attention ``xla`` and ``pallas`` (the flash-attention kernel
with its custom_vjp backward; on CPU it runs in Pallas interpret mode, so it is
skipped there unless ``--pallas-on-cpu``) x remat ``none`` / ``full`` (/ ``dots``).

Each case runs in its own process so peak memory is per case: RSS high-water
mark on CPU, ``peak_bytes_in_use`` of the device on GPU/TPU.  The report gives
tokens/s, step time, compile time, peak memory, MFU, and ratios against the
baseline case (xla, no remat; the next one when that one is skipped) at the same
sequence length.  A case whose XLA memory analysis exceeds the free host memory is
skipped instead of run (XLA attention at T=2048 without remat needs ~16 GiB).  Rows go to the
results file of ``jaxllm.bench`` (``results/benchmarks.jsonl``) as benchmark
``train``.

    python scripts/bench_train.py                       # 512 and 2048, all cases
    python scripts/bench_train.py --seq-lens 512 --remat none,full --dtype float32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def run_case(case: dict) -> dict:
    """Child process: build the step, compile, time ``case['repeat']`` steps."""
    import resource

    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxllm.bench import time_fn
    from jaxllm.compilation import enable_compilation_cache
    from jaxllm.train import lora as L
    from jaxllm.train import step as S
    from jaxllm.train.metrics import peak_flops, train_flops_per_token
    from jaxllm.train.testing import random_batch
    from jaxllm.weights import load_model

    enable_compilation_cache()
    m = load_model(case["model"], dtype="float32")
    cfg = m.config
    lcfg = L.LoraConfig(rank=16) if case["lora"] else None
    sc = S.StepConfig(cfg, case["dtype"], case["remat"], case["attn"], case["scan_layers"], lcfg,
                      case["loss_chunk"])
    sched = S.make_schedule(1e-4, 1000, 10)
    tx = S.make_optimizer(sched, weight_decay=0.01)
    if lcfg is not None:
        trained = L.init_lora(cfg, lcfg, jax.random.PRNGKey(1))
        frozen = jax.tree.map(lambda x: jnp.asarray(x, S.DTYPES[case["dtype"]]), m.params)
    else:
        trained, frozen = m.params, None
    state = S.init_state(trained, tx)
    del m
    step, _ = S.compile_steps(sc, tx, sched)
    rows, t = case["rows"], case["seq_len"]
    batch = S.split_accum(random_batch(np.random.default_rng(0), rows, t, cfg.vocab_size,
                                       segments=max(1, t // 256)), 1)
    batch = jax.device_put(batch)
    holder = {"state": state}
    t0 = time.perf_counter()
    compiled = step.lower(state, frozen, batch).compile()
    need = None
    try:
        ma = compiled.memory_analysis()
        need = ma.temp_size_in_bytes + ma.argument_size_in_bytes + ma.output_size_in_bytes
    except Exception:  # noqa: BLE001 -- not every backend reports it
        pass
    if need and jax.devices()[0].platform == "cpu":
        import psutil

        avail = psutil.virtual_memory().available
        if need > 0.85 * avail:
            return {"skipped": f"needs ~{need / 2**30:.1f} GiB (XLA memory analysis), "
                               f"{avail / 2**30:.1f} GiB available"}

    def one():
        holder["state"], metrics = compiled(holder["state"], frozen, batch)
        return metrics

    jax.block_until_ready(one())
    compile_s = time.perf_counter() - t0
    timing = time_fn(one, warmup=0, repeat=case["repeat"])
    tokens = rows * t
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        mem_kind = "peak RSS"
    else:
        stats = dev.memory_stats() or {}
        peak_mem = stats.get("peak_bytes_in_use")
        mem_kind = "device peak_bytes_in_use"
    fpt = train_flops_per_token(cfg, t, L.num_lora_params(cfg, lcfg) if lcfg else None)
    peak, peak_src = case.get("peak") or peak_flops(case["dtype"])
    tps = tokens / timing.median
    return {"tokens_per_s": tps, "step_s": timing.median, "p10_s": timing.p10,
            "p90_s": timing.p90, "compile_s": compile_s, "peak_mem_bytes": peak_mem,
            "mem_kind": mem_kind, "mfu": tps * fpt / peak if peak else None,
            "peak_source": peak_src, "model_tflops_per_step": fpt * tokens / 1e12,
            "device": f"{dev.platform}:{dev.device_kind}"}


def _has_pallas() -> bool:
    try:
        import pallas_kernels.flash_attention  # noqa: F401
        return True
    except Exception:  # noqa: BLE001
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    ap.add_argument("--seq-lens", default="512,2048")
    ap.add_argument("--rows", type=int, default=1, help="rows per step (default: 1)")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--attn", default="xla,pallas")
    ap.add_argument("--remat", default="none,full")
    ap.add_argument("--lora", action="store_true", help="train a rank-16 adapter instead")
    ap.add_argument("--unroll-layers", action="store_true",
                    help="layers unrolled instead of lax.scan (on XLA:CPU remat then saves nothing)")
    ap.add_argument("--loss-chunk", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak for MFU (default: datasheet on GPU/TPU, measured matmul on CPU)")
    ap.add_argument("--pallas-on-cpu", action="store_true",
                    help="also run the Pallas kernel on CPU (interpret mode: very slow)")
    ap.add_argument("--timeout", type=int, default=1800, help="per case, seconds")
    ap.add_argument("--results", default=None, help="results JSONL (default: jaxllm.bench's)")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        out = run_case(json.loads(args.child))
        print("RESULT " + json.dumps(out), flush=True)
        return 0

    import jax

    platform = jax.devices()[0].platform
    attns = [a for a in args.attn.split(",") if a]
    if "pallas" in attns and not _has_pallas():
        print("[bench_train] pallas_kernels.flash_attention not importable: skipping pallas")
        attns.remove("pallas")
    if "pallas" in attns and platform == "cpu" and not args.pallas_on_cpu:
        print("[bench_train] CPU: Pallas runs in interpret mode (a correctness tool, not a "
              "kernel); skipping it (pass --pallas-on-cpu to time it anyway)")
        attns.remove("pallas")
    remats = [r for r in args.remat.split(",") if r]
    from jaxllm.train.metrics import peak_flops

    peak = peak_flops(args.dtype, args.peak_tflops)  # once, so every case shares the roof
    print(f"[bench_train] MFU peak: {peak[0] / 1e12 if peak[0] else float('nan'):.3f} TFLOP/s "
          f"({peak[1]})")
    seqs = [int(s) for s in args.seq_lens.split(",") if s]
    mode = "lora-r16" if args.lora else "full"
    results = []
    for t in seqs:
        for attn in attns:
            for remat in remats:
                case = {"model": args.model, "seq_len": t, "rows": args.rows, "dtype": args.dtype,
                        "attn": attn, "remat": remat, "lora": args.lora,
                        "scan_layers": not args.unroll_layers, "loss_chunk": args.loss_chunk,
                        "repeat": args.repeat, "peak": list(peak) if peak[0] else None}
                label = f"T={t} attn={attn} remat={remat}"
                print(f"[bench_train] {label} ...", flush=True)
                try:
                    proc = subprocess.run(
                        [sys.executable, __file__, "--child", json.dumps(case)],
                        capture_output=True, text=True, timeout=args.timeout,
                        env={**os.environ, "JAXLLM_NO_PROGRESS": "1"})
                except subprocess.TimeoutExpired:
                    print(f"  timed out after {args.timeout} s")
                    results.append((case, None, "timeout"))
                    continue
                line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if proc.returncode != 0 or not line:
                    err = (proc.stderr.strip().splitlines() or ["?"])[-1]
                    print(f"  failed: {err}")
                    results.append((case, None, err))
                    continue
                r = json.loads(line[-1][7:])
                if "skipped" in r:
                    print(f"  skipped: {r['skipped']}")
                    results.append((case, None, r["skipped"]))
                    continue
                results.append((case, r, None))
                mem = r["peak_mem_bytes"]
                print(f"  {r['tokens_per_s']:,.0f} tok/s, step {r['step_s']:.2f} s, compile "
                      f"{r['compile_s']:.1f} s, {r['mem_kind']} "
                      f"{mem / 2**30 if mem else float('nan'):.2f} GiB"
                      + (f", MFU {r['mfu']:.1%}" if r.get("mfu") else ""), flush=True)

    ok = [(c, r) for c, r, e in results if r]
    if not ok:
        return 1
    dev = ok[0][1]["device"]
    print(f"\nworkload: {mode} fine-tuning step (fwd+bwd+AdamW), {args.model or 'SmolLM2-135M'}, "
          f"{args.rows} row(s) x T, {args.dtype} compute, float32 master weights; device {dev}")
    print(f"{'T':>6} {'attn':>7} {'remat':>6} {'tok/s':>9} {'step s':>8} {'compile s':>9} "
          f"{'peak GiB':>9} {'MFU':>6} {'speed vs base':>13} {'mem vs base':>11}")
    def baseline(t):
        same = [(cc, rr) for cc, rr in ok if cc["seq_len"] == t]
        for want in (("xla", "none"), ("xla", "dots"), ("xla", "full")):
            for cc, rr in same:
                if (cc["attn"], cc["remat"]) == want:
                    return cc, rr
        return same[0]

    for t in sorted({c["seq_len"] for c, _ in ok}):
        bc, _ = baseline(t)
        print(f"  baseline at T={t}: attn={bc['attn']} remat={bc['remat']}")
    for case, r in ok:
        bcase, base = baseline(case["seq_len"])
        sp = r["tokens_per_s"] / base["tokens_per_s"] if base else None
        mr = (r["peak_mem_bytes"] / base["peak_mem_bytes"]
              if base and base["peak_mem_bytes"] and r["peak_mem_bytes"] else None)
        print(f"{case['seq_len']:>6} {case['attn']:>7} {case['remat']:>6} "
              f"{r['tokens_per_s']:>9,.0f} {r['step_s']:>8.2f} {r['compile_s']:>9.1f} "
              f"{(r['peak_mem_bytes'] or 0) / 2**30:>9.2f} "
              f"{(r['mfu'] or 0):>6.1%} {sp if sp else float('nan'):>12.2f}x "
              f"{mr if mr else float('nan'):>10.2f}x")
        if not args.no_record:
            from jaxllm.bench import Bench

            Bench("train", workload={"model": args.model or "SmolLM2-135M-Instruct", "mode": mode,
                                     "seq_len": case["seq_len"], "rows": args.rows,
                                     "dtype": args.dtype, "attn": case["attn"],
                                     "remat": case["remat"],
                                     "layers": "unrolled" if args.unroll_layers else "scan"},
                  results_file=args.results).record(
                {k: v for k, v in r.items() if k != "device"},
                baseline=f"attn={bcase['attn']} remat={bcase['remat']} (same T)", ratio=sp)
    for case, _, err in results:
        if err:
            print(f"skipped/failed: T={case['seq_len']} attn={case['attn']} remat={case['remat']}: "
                  f"{err}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
