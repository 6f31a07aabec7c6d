"""Serving benchmark in the style of ``vllm bench serve``: an OpenAI-protocol load generator
against ``jaxllm serve``, with the same workload run offline through ``LLM.generate`` as
the named baseline.

Workload (reproducible, ``--seed``): ``--num-prompts`` requests of random token ids (vLLM's
"random" dataset: input lengths uniform in ``input_len * [1 - r, 1 + r]``, output lengths
likewise around ``--output-len``, ``r = --range-ratio``; ids drawn uniformly from the
vocabulary minus the first 100 ids, so no special token appears).  Every request sets
``ignore_eos`` and its ``max_tokens``, so it generates exactly its output length; greedy.
Requests are sent to ``/v1/completions`` with ``stream: true``; arrivals are a Poisson
process at ``--request-rate`` (``inf``: all at once; ``--burstiness`` != 1 draws gamma
gaps as vLLM does), capped at ``--max-concurrency`` in flight.

Measured per request (client side): TTFT (send -> first text), ITL (gaps between
streamed chunks; the engine emits up to ``num_scheduler_steps`` tokens per chunk),
TPOT ((E2E - TTFT) / (output tokens - 1)), E2E.  Reported: mean / p50 / p90 / p99,
request and token throughput, goodput (requests/s within the SLO ``--slo-ttft-ms`` /
``--slo-tpot-ms``), and the ratio of the served output throughput to the
offline ``LLM.generate`` of the same requests, run right before each served run
(an untimed pass of each compiles first; ``--repeat`` alternates them).  The ratio
compares like with like only at ``--request-rate inf``: at a finite rate the served run
also waits for its arrivals.  One row
per run goes to the results file through ``jaxllm.bench``.

    python scripts/bench_serve.py                       # default model, 32 prompts
    python scripts/bench_serve.py --request-rate 1 2 inf --max-concurrency 16
    python scripts/bench_serve.py --base-url http://127.0.0.1:8000 --no-baseline
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


@dataclass
class Result:
    """One request, measured by the client."""

    input_len: int
    output_len: int = 0
    ttft: float = math.nan
    e2e: float = math.nan
    itl: list[float] = field(default_factory=list)
    ok: bool = False
    error: str = ""


def make_workload(n: int, input_len: int, output_len: int, ratio: float, vocab: int,
                  seed: int) -> list[tuple[list[int], int]]:
    """``n`` (prompt ids, output length) pairs (see the module docstring)."""
    rng = np.random.default_rng(seed)

    def lengths(mean: int) -> np.ndarray:
        lo, hi = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
        return rng.integers(lo, hi + 1, n)

    ins, outs = lengths(input_len), lengths(output_len)
    return [([int(t) for t in rng.integers(100, vocab, int(i))], int(o))
            for i, o in zip(ins, outs)]


async def one_request(client, url: str, model: str, prompt: list[int], out_len: int,
                      headers: dict[str, str]) -> Result:
    res = Result(input_len=len(prompt))
    body = {"model": model, "prompt": prompt, "max_tokens": out_len, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if "error" in ev:
                    res.error = ev["error"]["message"]
                    return res
                now = time.perf_counter()
                if ev.get("usage"):
                    res.output_len = ev["usage"]["completion_tokens"]
                if ev["choices"] and ev["choices"][0]["text"]:
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last = now
        res.e2e = time.perf_counter() - t0
        res.ok = res.output_len > 0
    except Exception as e:  # a failed request is counted, not fatal
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run_load(base_url: str, model: str, work: list[tuple[list[int], int]], rate: float,
                   burstiness: float, max_concurrency: int | None, api_key: str | None,
                   seed: int) -> tuple[list[Result], float]:
    import httpx

    rng = np.random.default_rng(seed)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    limits = httpx.Limits(max_connections=max(len(work), 1) + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=None, limits=limits) as client:

        async def guarded(p, o):
            if sem is None:
                return await one_request(client, "/v1/completions", model, p, o, headers)
            async with sem:
                return await one_request(client, "/v1/completions", model, p, o, headers)

        tasks = []
        t0 = time.perf_counter()
        for p, o in work:
            tasks.append(asyncio.create_task(guarded(p, o)))
            if math.isfinite(rate):
                # gamma gaps with mean 1/rate (burstiness 1: exponential = Poisson arrivals)
                await asyncio.sleep(rng.gamma(burstiness, 1.0 / (rate * burstiness)))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - t0


def summarize(results: list[Result], duration: float, slo_ttft_ms: float,
              slo_tpot_ms: float) -> dict[str, float]:
    ok = [r for r in results if r.ok]
    out: dict[str, float] = {"completed": len(ok), "failed": len(results) - len(ok),
                             "duration_s": duration}
    good = [r for r in ok if 1e3 * r.ttft <= slo_ttft_ms and
            (r.output_len <= 1 or 1e3 * (r.e2e - r.ttft) / (r.output_len - 1) <= slo_tpot_ms)]
    out["goodput"] = len(good) / duration  # requests/s that met the SLO
    n_in = sum(r.input_len for r in ok)
    n_out = sum(r.output_len for r in ok)
    out.update(input_tokens=n_in, output_tokens=n_out,
               request_throughput=len(ok) / duration, output_throughput=n_out / duration,
               total_token_throughput=(n_in + n_out) / duration)
    series = {
        "ttft_ms": [1e3 * r.ttft for r in ok],
        "tpot_ms": [1e3 * (r.e2e - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1],
        "itl_ms": [1e3 * x for r in ok for x in r.itl],
        "e2e_ms": [1e3 * r.e2e for r in ok],
    }
    for name, xs in series.items():
        if not xs:
            continue
        a = np.asarray(xs)
        out[f"mean_{name}"] = float(a.mean())
        for q in (50, 90, 99):
            out[f"p{q}_{name}"] = float(np.percentile(a, q))
    return out


def print_result(title: str, s: dict[str, float], workload: str, device: str,
                 baseline: tuple[str, float] | None) -> None:
    w = 50
    print("=" * w)
    print(title.center(w))
    print("=" * w)
    print(f"workload: {workload}")
    print(f"device:   {device}; load average {os.getloadavg()[0]:.2f} at the end")
    rows = [("Successful requests", s["completed"], "d"), ("Failed requests", s["failed"], "d"),
            ("Benchmark duration (s)", s["duration_s"], ".2f"),
            ("Total input tokens", s["input_tokens"], "d"),
            ("Total generated tokens", s["output_tokens"], "d"),
            ("Request throughput (req/s)", s["request_throughput"], ".2f"),
            ("Request goodput (req/s, in SLO)", s["goodput"], ".2f"),
            ("Output token throughput (tok/s)", s["output_throughput"], ".2f"),
            ("Total token throughput (tok/s)", s["total_token_throughput"], ".2f")]
    for k, v, f in rows:
        print(f"{k:<36}{format(int(v) if f == 'd' else v, f):>14}")
    for name, label in (("ttft_ms", "Time to First Token"), ("tpot_ms", "Time per Output Token"),
                        ("itl_ms", "Inter-token Latency (per chunk)"), ("e2e_ms", "End-to-end")):
        if f"mean_{name}" not in s:
            continue
        print(f" {label} ".center(w, "-"))
        for stat in ("mean", "p50", "p90", "p99"):
            print(f"{stat.upper() if stat != 'mean' else 'Mean'} {name.split('_')[0].upper()} (ms)"
                  f"{s[f'{stat}_{name}']:>{w - 12 - len(name.split('_')[0])}.2f}")
    if baseline is not None:
        name, tput = baseline
        print(" Baseline ".center(w, "-"))
        print(f"{name}: {tput:.2f} output tok/s")
        print(f"served / baseline output throughput: {s['output_throughput'] / tput:.2f}x")
    print("=" * w, flush=True)


def plot(summaries: list[dict], path: str, workload: str) -> None:
    """p50 / p99 TTFT and TPOT against the request rate (``inf`` drawn at the right end)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def x_of(r):
        return r if r != "inf" else None

    finite = [s["request_rate"] for s in summaries if s["request_rate"] != "inf"]
    x_inf = (max(finite) * 1.5) if finite else 1.0
    xs = [x_of(s["request_rate"]) or x_inf for s in summaries]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, name in zip(axes, ("ttft_ms", "tpot_ms")):
        for q in ("p50", "p99"):
            ys = [s.get(f"{q}_{name}") for s in summaries]
            dots = ax.scatter(xs, ys, label=q)  # every run (repeats included)
            grid = sorted(set(xs))
            med = [float(np.median([y for x, y in zip(xs, ys) if x == g])) for g in grid]
            ax.plot(grid, med, color=dots.get_facecolor()[0])  # through the medians
        ax.set_xlabel("request rate (req/s; rightmost = all at once)" if x_inf in xs
                      else "request rate (req/s)")
        ax.set_ylabel(name.split("_")[0].upper() + " (ms)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(workload[:110], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def start_server(llm, port: int, api_key: str | None):
    """``jaxllm serve`` for ``llm`` in a background thread of this process."""
    from jaxllm.serve import ServeConfig, make_server

    server = make_server(llm, ServeConfig(["bench"], api_key=api_key,
                                          max_waiting_requests=100000,
                                          request_timeout=None),
                         port=port, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    return server, thread


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model (default: SmolLM2-135M-Instruct GGUF)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--base-url", default=None,
                    help="benchmark a running server instead of starting one in-process")
    ap.add_argument("--served-model-name", default="bench",
                    help="model name to send (with --base-url)")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--range-ratio", type=float, default=0.5)
    ap.add_argument("--request-rate", type=float, nargs="+", default=[math.inf],
                    help="requests/s (Poisson); several values: one run each (default: inf)")
    ap.add_argument("--burstiness", type=float, default=1.0,
                    help="gamma shape of inter-arrival gaps (1: Poisson)")
    ap.add_argument("--max-concurrency", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--num-pages", type=int, default=1024)
    ap.add_argument("--enable-prefix-caching", action="store_true",
                    help="off by default: random prompts share no prefix, and the warm-up "
                         "pass would otherwise serve the timed prompts from the cache")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per rate, each after its own baseline run")
    ap.add_argument("--no-warmup", action="store_true",
                    help="skip the untimed offline and served passes that compile first")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip the offline LLM.generate baseline")
    ap.add_argument("--slo-ttft-ms", type=float, default=2000.0,
                    help="goodput counts requests with TTFT at most this (default: 2000)")
    ap.add_argument("--slo-tpot-ms", type=float, default=200.0,
                    help="... and TPOT at most this (default: 200)")
    ap.add_argument("--json-out", default=None, help="also write the summaries here")
    ap.add_argument("--plot", default=None,
                    help="PNG of p50/p99 TTFT and TPOT against request rate (matplotlib)")
    args = ap.parse_args(argv)
    if args.num_prompts < 1:
        ap.error("--num-prompts must be >= 1")
    if any(not r > 0 for r in args.request_rate):
        ap.error("--request-rate values must be > 0 (inf: all at once)")

    import jax

    from jaxllm import LLM, SamplingParams
    from jaxllm.bench import Bench, environment

    env = environment()
    device = (f"{env.get('platform')} ({env.get('device_kind')}, {env.get('cpu_model')}, "
              f"{env.get('threads')} threads), jax {jax.__version__}")
    llm = server = None
    if args.base_url is None:
        llm = LLM(args.model, dtype=args.dtype, max_model_len=args.max_model_len,
                  max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens, num_pages=args.num_pages,
                  enable_prefix_caching=args.enable_prefix_caching)
        vocab = llm.config.vocab_size
    else:
        import httpx

        hdr = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        models = httpx.get(args.base_url + "/v1/models", headers=hdr).json()["data"]
        vocab = 32000  # a remote model's vocabulary is unknown: stay inside common ones
        print(f"remote model: {models[0]['id']}")
    work = make_workload(args.num_prompts, args.input_len, args.output_len, args.range_ratio,
                         vocab, args.seed)
    workload = (f"{args.num_prompts} random-token prompts, input {args.input_len} "
                f"(x[{1 - args.range_ratio:g}, {1 + args.range_ratio:g}]), output "
                f"{args.output_len} (same range), ignore_eos, greedy, streaming; model "
                f"{args.model or 'SmolLM2-135M-Instruct (Q4_1 GGUF)'} {args.dtype}; engine "
                f"max_num_seqs={args.max_num_seqs}, "
                f"max_num_batched_tokens={args.max_num_batched_tokens}")

    sps = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for _, o in work]
    prompts = [p for p, _ in work]
    base_name = "LLM.generate offline (same prompts, all at once)"

    def offline() -> float:
        """Output tok/s of the workload through LLM.generate (the server idle meanwhile)."""
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sps)
        dt = time.perf_counter() - t0
        n_out = sum(len(o.token_ids) for o in outs)
        print(f"baseline: {n_out} tokens in {dt:.2f} s = {n_out / dt:.2f} output tok/s "
              f"(load average {os.getloadavg()[0]:.2f})", flush=True)
        return n_out / dt

    use_baseline = llm is not None and not args.no_baseline
    if use_baseline and not args.no_warmup:
        llm.generate(prompts, sps)  # compiles what the runs need (untimed)

    base_url = args.base_url
    if llm is not None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server, thread = start_server(llm, port, args.api_key)
        base_url = f"http://127.0.0.1:{port}"
        model = "bench"
        if not args.no_warmup:  # one untimed pass through the server too: compiles
            asyncio.run(run_load(base_url, model, work, math.inf, 1.0, None, args.api_key,
                                 args.seed))
    else:
        model = args.served_model_name

    summaries = []
    try:
        for rate in [r for r in args.request_rate for _ in range(args.repeat)]:
            # the baseline runs right before each served run: on a shared machine the load
            # moves, and the ratio should compare like with like
            baseline = (base_name, offline()) if use_baseline else None
            results, duration = asyncio.run(run_load(
                base_url, model, work, rate, args.burstiness, args.max_concurrency,
                args.api_key, args.seed))
            s = summarize(results, duration, args.slo_ttft_ms, args.slo_tpot_ms)
            errors = sorted({r.error for r in results if not r.ok})
            title = (f"Serving Benchmark Result (rate {rate:g} req/s"
                     + (f", concurrency {args.max_concurrency}" if args.max_concurrency else "")
                     + ")")
            print_result(title, s, workload, device, baseline)
            if errors:
                print("errors:", errors[:5])
            wl = {"num_prompts": args.num_prompts, "input_len": args.input_len,
                  "output_len": args.output_len, "range_ratio": args.range_ratio,
                  "request_rate": rate if math.isfinite(rate) else "inf",
                  "burstiness": args.burstiness, "max_concurrency": args.max_concurrency,
                  "model": args.model or "SmolLM2-135M-Instruct", "dtype": args.dtype,
                  "max_num_seqs": args.max_num_seqs}
            ratio = s["output_throughput"] / baseline[1] if baseline else None
            Bench("serve", workload=wl).record(
                s, baseline=baseline[0] if baseline else None, ratio=ratio)
            summaries.append({"request_rate": wl["request_rate"], **s,
                              "baseline_output_throughput": baseline[1] if baseline else None})
    finally:
        if server is not None:
            server.should_exit = True
            thread.join(60)
    if args.plot:
        plot(summaries, args.plot, workload)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"workload": workload, "device": device, "runs": summaries}, f, indent=2)
    return 0 if all(s["failed"] == 0 for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
