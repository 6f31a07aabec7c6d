"""Engine decode speed by dtype and page-pool size, against the static path.

What a user calls (``LLM.generate``), greedy, ``ignore_eos``, on the default model:

  pool size   engine batch-1 decode with ``num_pages`` 64 and 8192 (``max_model_len`` 512,
              so 64 pages fit): a step must cost the tokens it attends, not the pool, so
              the two should be within 10%;
  batch 1     the engine (8192 pages: about the default 4 GiB pool in bfloat16) vs the
              static path (``static_batching=True``);
  batch 32    engine (1024 pages), float32 vs bfloat16.

Decode time = time(1 + N new tokens) - time(1 new token) for the same prompts (the
prompt is served from the prefix cache after the first call, and the one-token call
isolates the prefill), so tok/s counts decode tokens only.  Configurations run
interleaved, ``--repeat`` rounds, median per configuration; programs are compiled
before timing.

    python scripts/bench_engine_dtype.py                 # float32 and bfloat16
    python scripts/bench_engine_dtype.py --dtype bfloat16 --repeat 5
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402

from jaxllm import LLM, SamplingParams  # noqa: E402
from jaxllm.bench import Bench  # noqa: E402


def _prompts(batch: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(100, 40000, length)] for _ in range(batch)]


def decode_rate(llm: LLM, prompts: list[list[int]], new: int) -> float:
    """Decode tokens/s over all rows: (time for 1 + new tokens) - (time for 1 token)."""
    def run(n: int) -> float:
        sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        t = time.perf_counter()
        outs = llm.generate(prompts, sp)
        dt = time.perf_counter() - t
        assert all(len(o.outputs[0].token_ids) == n for o in outs)
        return dt

    return len(prompts) * new / max(run(1 + new) - run(1), 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", action="append", choices=["float32", "bfloat16"])
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--results", default=None)
    args = ap.parse_args()
    dtypes = args.dtype or ["float32", "bfloat16"]
    device = jax.devices()[0]
    print(f"device {device.platform}: {device.device_kind}  cores {os.cpu_count()}  "
          f"workload: prompt {args.prompt_len} tokens, {args.new_tokens} new, greedy, "
          f"median of {args.repeat} interleaved rounds")
    one, batch32 = _prompts(1, args.prompt_len, 0), _prompts(32, args.prompt_len, 1)
    results: dict[tuple[str, str], float] = {}
    for dtype in dtypes:
        configs = {
            "engine b1, 64 pages": (dict(num_pages=64, max_model_len=512), one),
            "engine b1, 8192 pages": (dict(num_pages=8192, max_model_len=512), one),
            "static b1": (dict(static_batching=True), one),
            "engine b32": (dict(max_num_seqs=32, num_pages=1024, max_model_len=512), batch32),
        }
        llms = {name: LLM(args.model, dtype=dtype, quantization=None, **kw)  # float weights
                for name, (kw, _) in configs.items()}
        for name, (_, prompts) in configs.items():  # compile + fill the prefix cache
            decode_rate(llms[name], prompts, args.new_tokens)
            print(f"  {dtype} {name}: {llms[name].engine.pool.describe()}"
                  if not name.startswith("static") else f"  {dtype} {name}", flush=True)
        rates: dict[str, list[float]] = {name: [] for name in configs}
        for _ in range(args.repeat):
            for name, (_, prompts) in configs.items():
                rates[name].append(decode_rate(llms[name], prompts, args.new_tokens))
        for name in configs:
            results[dtype, name] = statistics.median(rates[name])
        del llms
        gc.collect()
    print(f"\n{'dtype':9s} {'configuration':26s} {'decode tok/s':>12s}")
    for (dtype, name), r in results.items():
        print(f"{dtype:9s} {name:26s} {r:12.1f}")
    print()
    for dtype in dtypes:
        r = {name: results[dtype, name] for (d, name) in results if d == dtype}
        pool = r["engine b1, 8192 pages"] / r["engine b1, 64 pages"]
        vs_static = r["engine b1, 8192 pages"] / r["static b1"]
        print(f"{dtype}: 8192 / 64 pages {pool:.2f}x (target within 10%)  "
              f"engine / static batch 1 {vs_static:.2f}x (bf16 target >= 0.85x)")
        Bench("engine_dtype", workload={"dtype": dtype, "prompt": args.prompt_len,
                                        "new": args.new_tokens},
              results_file=args.results).record(
            {**{k.replace(" ", "_").replace(",", ""): round(v, 2) for k, v in r.items()},
             "pool_8192_vs_64": round(pool, 3), "load": round(os.getloadavg()[0], 2)},
            baseline="static b1", ratio=vs_static)
    if {"float32", "bfloat16"} <= set(dtypes):
        ratio = results["bfloat16", "engine b32"] / results["float32", "engine b32"]
        print(f"engine batch 32: bfloat16 / float32 {ratio:.2f}x (target >= 1.0x)")


if __name__ == "__main__":
    main()
