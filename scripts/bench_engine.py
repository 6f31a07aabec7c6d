"""Static batching vs continuous batching over a paged KV cache (vs + prefix caching).

Workload (fixed seed): N requests submitted at once, prompt lengths uniform in
[16, 512], output lengths uniform in [16, 256] (``ignore_eos``: every request generates
exactly its length), greedy, float32 (``--dtype bfloat16``: weights and KV pool in
bfloat16), on the default model (SmolLM2-135M).

  (a) static batching: ``LLM(static_batching=True)``: batches of ``--max-num-seqs`` rows in
      arrival order, left-padded, dense cache preallocated for the batch's longest
      prompt + longest output (``jaxllm.generation``);
  (b) continuous batching over the paged KV cache (``LLMEngine``, prefix caching off);
  (c) (b) with prefix caching, on a workload whose prompts share a 256-token system
      prompt (prompt = 256 shared + uniform [16, 256] own tokens), compared with (b) on
      that same workload.

Metrics: output tokens/s and requests/s over the whole run (compilation excluded: the
programs are compiled before timing), and KV memory utilisation = used token slots /
allocated token slots, averaged over steps (static: the batch's dense cache; paged: the
pages held by running sequences).  Rows go to the results file via ``jaxllm.bench``.

    python scripts/bench_engine.py --quick      # 48 requests, 16 at a time
    python scripts/bench_engine.py --quick --dtype bfloat16
    python scripts/bench_engine.py              # 200 requests, 64 at a time
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402

from jaxllm import LLM, SamplingParams  # noqa: E402
from jaxllm import generation as G  # noqa: E402
from jaxllm.bench import Bench  # noqa: E402
from jaxllm.engine.engine import LLMEngine  # noqa: E402
from jaxllm.sampling import SamplerFlags, SamplingTensors  # noqa: E402


def make_workload(n: int, seed: int, shared_prefix: int = 0):
    rng = np.random.default_rng(seed)
    system = [int(t) for t in rng.integers(100, 40000, shared_prefix)]
    prompts, sps = [], []
    for _ in range(n):
        if shared_prefix:
            own = int(rng.integers(16, 257))
        else:
            own = int(rng.integers(16, 513))
        prompts.append(system + [int(t) for t in rng.integers(100, 40000, own)])
        sps.append(SamplingParams(temperature=0.0, max_tokens=int(rng.integers(16, 257)),
                                  ignore_eos=True))
    return prompts, sps


def loadavg() -> float:
    return round(os.getloadavg()[0], 2)


# ------------------------------------------------------------------------------ static


def static_batches(prompts, sps, batch: int, max_model_len: int):
    """The batches ``LLM.generate(static_batching=True)`` forms, with their cache shapes."""
    out = []
    for s in range(0, len(prompts), batch):
        ps, ss = prompts[s:s + batch], sps[s:s + batch]
        p = G.bucket(max(len(x) for x in ps))
        max_new = max(sp.max_tokens for sp in ss)
        cache_len = min(G.cache_bucket(p + max_new), G.cache_bucket(max(max_model_len, p + 1)))
        out.append((ps, ss, G.batch_bucket(len(ps)), p, cache_len))
    return out


def static_kv_util(batches) -> float:
    used = alloc = 0
    for ps, ss, b, _, cache_len in batches:
        lens = np.array([len(x) for x in ps])
        outs = np.array([sp.max_tokens for sp in ss])
        for step in range(int(outs.max())):
            used += int((lens + np.minimum(step + 1, outs)).sum())
            alloc += b * cache_len
    return used / alloc


def precompile_static(llm: LLM, batches) -> float:
    """AOT-compile the static programs (they land in the persistent compilation cache,
    so the timed run loads instead of compiling)."""
    t0 = time.perf_counter()
    seen = set()
    for _, ss, b, p, cache_len in batches:
        if (b, p, cache_len) in seen:
            continue
        seen.add((b, p, cache_len))
        flags = SamplerFlags.for_params(ss)
        i32 = lambda *s: jax.ShapeDtypeStruct(s, np.int32)  # noqa: E731
        k = max(1, len(llm.eos_token_ids))
        args = (llm.params, i32(b, p), i32(b), i32(b), i32(b), i32(b, k),
                SamplingTensors.build([ss[0]] * b, b))
        kw = dict(cfg=llm.config, cache_len=cache_len, flags=flags, impl=llm.attention_impl)
        G.prefill.lower(*args, **kw).compile()
        state = jax.eval_shape(lambda *a: G.prefill(*a, **kw), *args)
        G.decode.lower(llm.params, state, np.int32(1), cfg=llm.config, flags=flags).compile()
    return time.perf_counter() - t0


def run_static(llm: LLM, prompts, sps, batch: int) -> dict:
    batches = static_batches(prompts, sps, batch, llm.max_model_len)
    compile_s = precompile_static(llm, batches)
    llm.static_batching, llm.max_batch_size = True, batch
    la0 = loadavg()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sps)
    wall = time.perf_counter() - t0
    llm.static_batching = False
    n_out = sum(len(o.token_ids) for o in outs)
    return dict(wall_s=wall, output_tokens=n_out, output_tok_s=n_out / wall,
                req_s=len(prompts) / wall, kv_util=static_kv_util(batches),
                compile_s=compile_s, loadavg_start=la0, loadavg_end=loadavg())


# ------------------------------------------------------------------------------ engine


def run_engine(llm: LLM, prompts, sps, *, max_num_seqs: int, max_num_batched_tokens: int,
               prefix_caching: bool, num_scheduler_steps: int, num_pages: int) -> dict:
    eng = LLMEngine(llm.params, llm.config, tokenizer=llm.tokenizer,
                    eos_token_ids=llm.eos_token_ids, max_model_len=llm.max_model_len,
                    num_pages=num_pages,
                    max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                    enable_prefix_caching=prefix_caching,
                    num_scheduler_steps=num_scheduler_steps)
    t0 = time.perf_counter()
    n_warm = eng.warmup()
    compile_s = time.perf_counter() - t0
    eng.track_kv_usage = True
    la0 = loadavg()
    t0 = time.perf_counter()
    outs = eng.generate(prompts, sps)
    wall = time.perf_counter() - t0
    n_out = sum(len(o.token_ids) for o in outs)
    st = eng.stats
    return dict(wall_s=wall, output_tokens=n_out, output_tok_s=n_out / wall,
                req_s=len(prompts) / wall, kv_util=eng.kv_utilization(),
                compile_s=compile_s, warmup_shapes=n_warm, steps=st.steps,
                multi_step_dispatches=st.multi_step_dispatches,
                prefill_tokens=st.prefill_tokens, preemptions=eng.num_preemptions,
                prefix_cache_hit_rate=eng.allocator.stats.hit_rate,
                pool_pages=eng.pool.num_pages, loadavg_start=la0, loadavg_end=loadavg())


# ------------------------------------------------------------------------------ main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="48 requests, 16 at a time")
    ap.add_argument("--num-requests", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=None,
                    help="engine sequences per step = static batch size")
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--num-scheduler-steps", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="weights and KV pool dtype (run both: bf16 is a first-class path)")
    ap.add_argument("--only", default="abc", help="which of a, b, c to run (default: abc)")
    ap.add_argument("--results", default=None, help="results file (default: results/benchmarks.jsonl)")
    args = ap.parse_args(argv)
    n = args.num_requests or (48 if args.quick else 200)
    seqs = args.max_num_seqs or (16 if args.quick else 64)

    llm = LLM(args.model, dtype=args.dtype, quantization=None)  # float weights, as recorded
    base_wl = dict(requests=n, prompt_len="16-512", output_len="16-256", seed=args.seed,
                   model=str(llm.model_path.name), dtype=args.dtype, concurrency=seqs,
                   max_num_batched_tokens=args.max_num_batched_tokens,
                   num_scheduler_steps=args.num_scheduler_steps, cpu_count=os.cpu_count())
    prompts, sps = make_workload(n, args.seed)
    shared_p, shared_sp = make_workload(n, args.seed + 1, shared_prefix=256)
    # one pool size for every engine run (it is part of the compiled shapes): room for
    # `seqs` sequences of the longest request (768 tokens), as the static batch has
    longest = max(len(p) + sp.max_tokens for p, sp in zip(prompts + shared_p, sps + shared_sp))
    num_pages = max(seqs * -(-longest // 16) + 1, llm.max_model_len // 16 + 1)
    eng_kw = dict(max_num_seqs=seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                  num_scheduler_steps=args.num_scheduler_steps, num_pages=num_pages)
    res = {}
    print(f"# {n} requests, concurrency {seqs}, load average {loadavg()} "
          f"on {os.cpu_count()} CPUs (shared machine)", flush=True)
    if "a" in args.only:
        res["a"] = run_static(llm, prompts, sps, seqs)
        print("(a) static    ", res["a"], flush=True)
    if "b" in args.only:
        res["b"] = run_engine(llm, prompts, sps, prefix_caching=False, **eng_kw)
        print("(b) paged     ", res["b"], flush=True)
    if "c" in args.only:
        res["b_shared"] = run_engine(llm, shared_p, shared_sp, prefix_caching=False, **eng_kw)
        print("(b) shared    ", res["b_shared"], flush=True)
        res["c"] = run_engine(llm, shared_p, shared_sp, prefix_caching=True, **eng_kw)
        print("(c) +prefix   ", res["c"], flush=True)

    def rec(key, mode, wl_extra=None, baseline=None, ratio=None):
        metrics = {k: v for k, v in res[key].items()}
        Bench("engine", workload={**base_wl, **(wl_extra or {}), "mode": mode},
              results_file=args.results).record(metrics, baseline=baseline, ratio=ratio)

    print("\n| run | output tok/s | req/s | KV util | wall s | load avg |")
    print("|---|---|---|---|---|---|")
    for key, name in [("a", "(a) static batching"), ("b", "(b) continuous, paged"),
                      ("b_shared", "(b) on shared-prefix workload"),
                      ("c", "(c) + prefix caching")]:
        if key in res:
            r = res[key]
            print(f"| {name} | {r['output_tok_s']:.1f} | {r['req_s']:.3f} | "
                  f"{r['kv_util']:.3f} | {r['wall_s']:.1f} | {r['loadavg_start']}-{r['loadavg_end']} |")
    if "a" in res:
        rec("a", "static batching")
    if "b" in res:
        ratio = res["b"]["output_tok_s"] / res["a"]["output_tok_s"] if "a" in res else None
        rec("b", "continuous batching, paged KV", baseline="static batching", ratio=ratio)
        if ratio:
            wa, wb = 1 - res["a"]["kv_util"], 1 - res["b"]["kv_util"]
            print(f"\n(b)/(a) throughput: {ratio:.2f}x; KV waste: static {wa:.1%}, "
                  f"paged {wb:.1%}")
    if "c" in res:
        wl = {"prompt_len": "256 shared + 16-256", "shared_prefix": 256}
        rec("b_shared", "continuous batching, paged KV", wl)
        ratio = res["c"]["output_tok_s"] / res["b_shared"]["output_tok_s"]
        rec("c", "continuous batching + prefix caching", wl,
            baseline="continuous batching, paged KV (same workload)", ratio=ratio)
        print(f"(c)/(b) throughput on the shared-prefix workload: {ratio:.2f}x "
              f"(prefix-cache hit rate {res['c']['prefix_cache_hit_rate']:.1%})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
