"""Serving benchmark in the style of ``vllm bench serve``: an OpenAI-protocol load generator
against ``jaxllm serve`` -- alone (with the same workload run offline through
``LLM.generate`` as the named baseline), or side by side with llama.cpp's ``llama-server``
serving the same GGUF file at the same precision (``--llama-server``).

Workload (reproducible, ``--seed``), ``--num-prompts`` requests, sent as token ids:

* ``--dataset random`` (default): vLLM's "random" dataset: input lengths uniform in
  ``input_len * [1 - r, 1 + r]``, output lengths likewise around ``--output-len``,
  ``r = --range-ratio``; ids drawn uniformly from the vocabulary minus the first 100 ids,
  so no special token appears.
* ``--dataset text``: real English text with a heavy-tailed (ShareGPT-like) length mix.
  The text is the Python Language Reference shipped inside CPython
  (``pydoc_data.topics``: 79 topics, ~465k characters; fixed for a given Python version),
  split into paragraphs and tokenized with the model's tokenizer.  Input lengths are
  log-normal with median ``--input-len`` and sigma ``--input-sigma`` (default 0.7: p10
  ~0.4x, p90 ~2.5x the median, mean 1.28x), output lengths log-normal with median
  ``--output-len`` and sigma ``--output-sigma`` (default 0.6), both rounded, at least 4,
  and input + output within ``--max-model-len``.  Each prompt is the run of tokens of
  that length starting at a randomly drawn paragraph start (wrapping at the end).

Every request sets ``ignore_eos`` and its ``max_tokens``, so it generates exactly its
output length; greedy.  Requests go to ``/v1/completions`` with ``stream: true`` and
``stream_options.include_usage``; the prompt and completion token counts each server
reports in ``usage`` are checked against the ids sent and the ``max_tokens`` asked for
(printed per run).  Arrivals are a Poisson process at ``--request-rate`` (``inf``: all at
once; ``--burstiness`` != 1 draws gamma gaps as vLLM does), capped at
``--max-concurrency`` in flight; ``--concurrency N ...`` adds fixed-concurrency runs (all
requests queued at once, at most N in flight).

Measured per request (client side): TTFT (send -> first text), ITL (gaps between
streamed chunks; jaxllm emits up to ``num_scheduler_steps`` tokens per chunk, llama.cpp
one), TPOT ((E2E - TTFT) / (output tokens - 1)), E2E.  Reported: mean / p50 / p90 / p99,
request and token throughput, goodput (requests/s within the SLO ``--slo-ttft-ms`` /
``--slo-tpot-ms``).  One row per run goes to the results file through ``jaxllm.bench``
(``$JAXLLM_RESULTS`` redirects it).

Alone: the ratio of the served output throughput to the offline ``LLM.generate`` of the
same requests, run right before each served run (an untimed pass of each compiles first;
``--repeat`` alternates them).  That ratio compares like with like only at
``--request-rate inf``: at a finite rate the served run also waits for its arrivals.

Side by side (``--llama-server PATH``; docs/benchmarks.md "Serving vs llama.cpp" says how
llama.cpp was built): the GGUF file jaxllm loads (default: SmolLM2-135M-Instruct Q4_1)
is converted once to the precision jaxllm computes in -- ``llama-quantize
--allow-requantize IN OUT F32`` (``BF16`` with ``--dtype bfloat16``), cached in
``--llama-cache-dir`` (default ``~/.cache/jaxllm/llamacpp``) -- and ``llama-server``
serves it on a free loopback port with the settings matched where both have one:
``-t/-tb --llama-threads`` (2), ``-np`` = ``--max-num-seqs`` slots, ``-c`` = slots *
``--max-model-len`` (each slot gets ``--max-model-len``), ``-b/-ub`` =
``--max-num-batched-tokens``, continuous batching on, KV cache in the same dtype as
jaxllm's pool (``-ctk/-ctv f32`` or ``bf16``), prompt cache on (``--cache-prompt``) only
with ``--enable-prefix-caching``, else ``--no-cache-prompt --cache-ram 0``.  Each
server gets an untimed warm-up pass of the workload (all at once; jaxllm also one per
``--warmup-rates`` rate, since staggered arrivals make step shapes the all-at-once pass
does not compile, or every shape with ``--engine-warmup``), then per rate (and per
``--concurrency``) the runs alternate: jaxllm, llama.cpp, jaxllm, llama.cpp, ... (``--repeat``
pairs), all with the same requests and arrival times.  The XLA programs jaxllm compiled
during each timed run are counted (JAX's monitoring events) and printed: a compile there
stalls its engine for seconds.  The offline baseline is skipped.
At the end: a side-by-side table, the plot (``--plot``: p50/p99 TTFT and TPOT against
rate, both servers) and a summary line: the highest Poisson rate at which llama.cpp's p99
TTFT (median over repeats) stays under ``--slo-ttft-ms``, jaxllm's output throughput over
llama.cpp's there, and each one's p50 TPOT.  The client runs in the same Python process
as the in-process ``jaxllm serve`` (sharing its GIL), which costs jaxllm, not llama.cpp.

    python scripts/bench_serve.py                       # default model, 32 prompts
    python scripts/bench_serve.py --request-rate 1 2 inf --max-concurrency 16
    python scripts/bench_serve.py --base-url http://127.0.0.1:8000 --no-baseline
    python scripts/bench_serve.py --llama-server /path/to/llama.cpp/build/bin/llama-server \\
        --dataset text --request-rate 1 2 4 --concurrency 8 --repeat 2 --engine-warmup \
        --plot vs.png                                   # docs/benchmarks.md: the quiet run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

JAXLLM, LLAMACPP = "jaxllm", "llama.cpp"


@dataclass
class Result:
    """One request, measured by the client."""

    input_len: int
    max_tokens: int = 0
    output_len: int = 0
    usage_prompt_tokens: int | None = None  # as the server reported it
    ttft: float = math.nan
    e2e: float = math.nan
    itl: list[float] = field(default_factory=list)
    ok: bool = False
    error: str = ""


# --------------------------------------------------------------------------- workloads

def make_workload(n: int, input_len: int, output_len: int, ratio: float, vocab: int,
                  seed: int) -> list[tuple[list[int], int]]:
    """``n`` (prompt ids, output length) pairs of random tokens (module docstring)."""
    rng = np.random.default_rng(seed)

    def lengths(mean: int) -> np.ndarray:
        lo, hi = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
        return rng.integers(lo, hi + 1, n)

    ins, outs = lengths(input_len), lengths(output_len)
    return [([int(t) for t in rng.integers(100, vocab, int(i))], int(o))
            for i, o in zip(ins, outs)]


def text_paragraphs() -> list[str]:
    """The ``--dataset text`` corpus: CPython's ``pydoc_data.topics`` in paragraphs."""
    from pydoc_data.topics import topics

    paras = []
    for key in sorted(topics):
        for p in topics[key].split("\n\n"):
            if len(p.strip()) >= 40:
                paras.append(p.strip("\n") + "\n\n")
    return paras


def make_text_workload(n: int, input_len: int, output_len: int, sigma_in: float,
                       sigma_out: float, max_model_len: int, paragraph_ids: list[list[int]],
                       seed: int) -> list[tuple[list[int], int]]:
    """``n`` (prompt ids, output length) pairs of real text (module docstring)."""
    rng = np.random.default_rng(seed)
    flat = np.concatenate([np.asarray(p, dtype=np.int64) for p in paragraph_ids])
    starts = np.cumsum([0] + [len(p) for p in paragraph_ids[:-1]])
    ins = np.clip(np.rint(input_len * np.exp(sigma_in * rng.standard_normal(n))),
                  4, max_model_len - 4).astype(int)
    outs = np.clip(np.rint(output_len * np.exp(sigma_out * rng.standard_normal(n))),
                   4, None).astype(int)
    outs = np.minimum(outs, max_model_len - ins)
    work = []
    for i, o in zip(ins, outs):
        s = int(starts[rng.integers(len(starts))])
        ids = np.take(flat, np.arange(s, s + i), mode="wrap")
        work.append(([int(t) for t in ids], int(o)))
    return work


# --------------------------------------------------------------------------- client

async def one_request(client, url: str, model: str, prompt: list[int], out_len: int,
                      headers: dict[str, str]) -> Result:
    res = Result(input_len=len(prompt), max_tokens=out_len)
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
                    res.error = str(ev["error"].get("message", ev["error"]))
                    return res
                now = time.perf_counter()
                if ev.get("usage"):
                    res.output_len = ev["usage"]["completion_tokens"]
                    res.usage_prompt_tokens = ev["usage"].get("prompt_tokens")
                if ev.get("choices") and ev["choices"][0].get("text"):
                    if last is None:
                        res.ttft = now - t0
                    else:
                        res.itl.append(now - last)
                    last = now
        res.e2e = time.perf_counter() - t0
        res.ok = res.output_len > 0 and not math.isnan(res.ttft)
        if not res.ok:
            res.error = "no usage or no text in the stream"
    except Exception as e:  # a failed request is counted, not fatal
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run_load(base_url: str, model: str, work: list[tuple[list[int], int]], rate: float,
                   burstiness: float, max_concurrency: int | None, api_key: str | None,
                   seed: int) -> tuple[list[Result], float]:
    import httpx

    rng = np.random.default_rng(seed)  # same seed: same arrival times for every server
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    # a new connection per request: a kept-alive one can be closed by the server just as
    # the next request goes out on it (seen with llama-server at fixed concurrency)
    limits = httpx.Limits(max_connections=max(len(work), 1) + 4, max_keepalive_connections=0)
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


def usage_check(results: list[Result]) -> str:
    """Whether the server's ``usage`` counts match the ids sent and ``max_tokens`` asked."""
    ok = [r for r in results if r.ok]
    same_in = sum(r.usage_prompt_tokens == r.input_len for r in ok)
    same_out = sum(r.output_len == r.max_tokens for r in ok)
    return (f"usage check: prompt_tokens == ids sent in {same_in}/{len(ok)}, "
            f"completion_tokens == max_tokens (ignore_eos) in {same_out}/{len(ok)}")


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
               total_token_throughput=(n_in + n_out) / duration,
               usage_prompt_match=sum(r.usage_prompt_tokens == r.input_len for r in ok),
               usage_output_match=sum(r.output_len == r.max_tokens for r in ok))
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


# --------------------------------------------------------------------------- report

def _x_positions(summaries: list[dict]) -> tuple[list[float], float | None]:
    finite = [s["request_rate"] for s in summaries if s["request_rate"] != "inf"]
    x_inf = (max(finite) * 1.5) if finite else 1.0
    xs = [s["request_rate"] if s["request_rate"] != "inf" else x_inf for s in summaries]
    return xs, (x_inf if "inf" in [s["request_rate"] for s in summaries] else None)


def plot(summaries: list[dict], path: str, workload: str) -> None:
    """p50 / p99 TTFT and TPOT against the request rate (``inf`` drawn at the right end),
    one colour per server; fixed-concurrency runs are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [s for s in summaries if s.get("max_concurrency") is None]
    if not runs:
        print("plot: no Poisson runs to plot")
        return
    servers = list(dict.fromkeys(s.get("server", JAXLLM) for s in runs))
    xs_all, x_inf = _x_positions(runs)
    colours = {JAXLLM: "tab:blue", LLAMACPP: "tab:orange"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, name in zip(axes, ("ttft_ms", "tpot_ms")):
        for srv in servers:
            sel = [(x, s) for x, s in zip(xs_all, runs) if s.get("server", JAXLLM) == srv]
            xs = [x for x, _ in sel]
            for q, style in (("p50", "-"), ("p99", "--")):
                ys = [s.get(f"{q}_{name}", math.nan) for _, s in sel]
                c = colours.get(srv)
                ax.scatter(xs, ys, color=c, marker="o" if q == "p50" else "^", s=18)
                grid = sorted(set(xs))
                med = [float(np.median([y for x, y in zip(xs, ys) if x == g])) for g in grid]
                ax.plot(grid, med, style, color=c, label=f"{srv} {q}")  # through the medians
        ax.set_xlabel("request rate (req/s, Poisson; rightmost = all at once)" if x_inf
                      else "request rate (req/s, Poisson)")
        ax.set_ylabel(name.split("_")[0].upper() + " (ms)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(workload[:160], fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def _median(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return float(np.median(xs)) if xs else math.nan


def side_by_side(summaries: list[dict], slo_ttft_ms: float) -> str:
    """A markdown table (medians over repeats) and the summary line."""
    def key(s):
        return (s["request_rate"], s.get("max_concurrency"))

    configs = list(dict.fromkeys(key(s) for s in summaries))
    lines = ["| arrivals | server | runs | req/s | output tok/s | goodput | "
             "TTFT p50 / p90 / p99 (ms) | TPOT p50 / p90 / p99 (ms) | "
             "ITL p50 / p99 (ms) | E2E p50 / p99 (ms) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    med: dict[tuple, dict[str, float]] = {}
    for cfg in configs:
        rate, conc = cfg
        label = (f"concurrency {conc}" + (f", Poisson {rate}/s" if rate != "inf" else "")
                 if conc else ("all at once" if rate == "inf" else f"Poisson {rate:g}/s"))
        for srv in (JAXLLM, LLAMACPP):
            runs = [s for s in summaries if key(s) == cfg and s.get("server", JAXLLM) == srv]
            if not runs:
                continue
            m = {k: _median([r.get(k, math.nan) for r in runs])
                 for k in runs[0] if isinstance(runs[0][k], (int, float))}
            med[(cfg, srv)] = m

            def trio(n, qs=("p50", "p90", "p99")):
                return " / ".join(f"{m.get(f'{q}_{n}', math.nan):.0f}" for q in qs)

            nc = m.get("xla_compiles", 0)
            who = srv + (f" ({nc:.0f} compiles)" if nc else "")
            lines.append(f"| {label} | {who} | {len(runs)} | {m['request_throughput']:.2f} | "
                         f"{m['output_throughput']:.1f} | {m['goodput']:.2f} | {trio('ttft_ms')} | "
                         f"{trio('tpot_ms')} | {trio('itl_ms', ('p50', 'p99'))} | "
                         f"{trio('e2e_ms', ('p50', 'p99'))} |")
    poisson = [c for c in configs if c[1] is None and (c, LLAMACPP) in med and (c, JAXLLM) in med]
    poisson.sort(key=lambda c: math.inf if c[0] == "inf" else c[0])
    within = [c for c in poisson if med[(c, LLAMACPP)].get("p99_ttft_ms", math.inf) < slo_ttft_ms]
    if not poisson:
        summary = "SUMMARY: no Poisson rate ran on both servers"
    elif not within:
        c = poisson[0]
        summary = (f"SUMMARY: llama.cpp's p99 TTFT exceeded {slo_ttft_ms / 1e3:g} s at every "
                   f"rate (lowest, {c[0]} req/s: {med[(c, LLAMACPP)]['p99_ttft_ms'] / 1e3:.1f} s); "
                   f"there, jaxllm / llama.cpp output throughput = "
                   f"{med[(c, JAXLLM)]['output_throughput'] / med[(c, LLAMACPP)]['output_throughput']:.2f}x, "
                   f"p50 TPOT jaxllm {med[(c, JAXLLM)].get('p50_tpot_ms', math.nan):.0f} ms vs "
                   f"llama.cpp {med[(c, LLAMACPP)].get('p50_tpot_ms', math.nan):.0f} ms")
    else:
        c = within[-1]
        j, l_ = med[(c, JAXLLM)], med[(c, LLAMACPP)]
        ratio = j["output_throughput"] / l_["output_throughput"]
        tj, tl = j.get("p50_tpot_ms", math.nan), l_.get("p50_tpot_ms", math.nan)
        summary = (f"SUMMARY: highest rate where llama.cpp keeps p99 TTFT < "
                   f"{slo_ttft_ms / 1e3:g} s: {c[0]} req/s "
                   f"(llama.cpp p99 TTFT {l_['p99_ttft_ms'] / 1e3:.2f} s, jaxllm "
                   f"{j['p99_ttft_ms'] / 1e3:.2f} s); there jaxllm / llama.cpp output "
                   f"throughput = {ratio:.2f}x ({j['output_throughput']:.1f} vs "
                   f"{l_['output_throughput']:.1f} tok/s; target >= 1.2x: "
                   f"{'met' if ratio >= 1.2 else 'NOT met'}), p50 TPOT jaxllm {tj:.0f} ms vs "
                   f"llama.cpp {tl:.0f} ms (target lower: {'met' if tj < tl else 'NOT met'})")
    return "\n".join(lines) + "\n\n" + summary


# --------------------------------------------------------------------------- servers

class CompileCounter:
    """XLA programs compiled (or loaded from the persistent cache) in this process, from
    JAX's monitoring events: a compile inside a timed run stalls jaxllm's engine."""

    EVENT = "/jax/core/compile/backend_compile_duration"

    def __init__(self) -> None:
        import jax.monitoring

        self.n, self.secs, self.names = 0, 0.0, []
        jax.monitoring.register_event_duration_secs_listener(self._on)

    def _on(self, event: str, duration: float, **kw) -> None:
        if event == self.EVENT:
            self.n += 1
            self.secs += duration
            self.names.append(f"{kw.get('fun_name', '?')} {duration:.1f}s")

    def snapshot(self) -> tuple[int, float]:
        return self.n, self.secs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def llamacpp_gguf(src: Path, dtype: str, quantize: Path, cache_dir: Path,
                  threads: int) -> Path:
    """``src`` converted to jaxllm's compute precision for llama.cpp, cached in ``cache_dir``
    (keyed by the source's name, size and mtime): ``llama-quantize --allow-requantize src
    out F32|BF16`` dequantizes every tensor (Q4_1 blocks -> their float values) exactly as
    jaxllm's loader does."""
    ftype = {"float32": "F32", "bfloat16": "BF16"}[dtype]
    st = src.stat()
    out = cache_dir / f"{src.stem}.{ftype}.{st.st_size}-{int(st.st_mtime)}.gguf"
    if out.is_file():
        print(f"llama.cpp model: {out} (cached)")
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    cmd = [str(quantize), "--allow-requantize", str(src), str(tmp), ftype, str(threads)]
    print("converting:", shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"llama-quantize failed ({p.returncode}):\n{p.stdout[-2000:]}"
                           f"\n{p.stderr[-2000:]}")
    os.replace(tmp, out)
    print(f"llama.cpp model: {out} ({out.stat().st_size / 2**20:.0f} MiB, "
          f"{time.perf_counter() - t0:.1f} s)", flush=True)
    return out


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when this process dies (Linux), so a killed
    benchmark leaves no llama-server behind."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class LlamaServer:
    """``llama-server`` on a free loopback port, its log in a temp file."""

    def __init__(self, binary: Path, gguf: Path, args, extra: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        kv = {"float32": "f32", "bfloat16": "bf16"}[args.dtype]
        cache = (["--cache-prompt"] if args.enable_prefix_caching
                 else ["--no-cache-prompt", "--cache-ram", "0"])
        self.cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1",
                    "--port", str(self.port), "-a", "bench",
                    "-t", str(args.llama_threads), "-tb", str(args.llama_threads),
                    "-np", str(args.max_num_seqs),
                    "-c", str(args.max_num_seqs * args.max_model_len),
                    "-b", str(args.max_num_batched_tokens),
                    "-ub", str(args.max_num_batched_tokens),
                    "--cont-batching", "-ctk", kv, "-ctv", kv, *cache,
                    "--no-webui", "--metrics", *extra]
        fd, self.log = tempfile.mkstemp(prefix="llama-server-", suffix=".log")
        self.logf = os.fdopen(fd, "w")
        print("starting:", shlex.join(self.cmd), f"(log: {self.log})", flush=True)
        self.proc = subprocess.Popen(self.cmd, stdout=self.logf, stderr=subprocess.STDOUT,
                                     preexec_fn=_die_with_parent)

    def wait_ready(self, timeout: float = 600.0) -> None:
        import httpx

        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited ({self.proc.returncode}):\n"
                                   + self.tail())
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    print(f"llama-server ready in {time.perf_counter() - t0:.1f} s on "
                          f"{self.url}", flush=True)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("llama-server did not become ready:\n" + self.tail())

    def tail(self, n: int = 30) -> str:
        self.logf.flush()
        with open(self.log, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def settings(self) -> str:
        """The lines of its log that say what it chose (threads, ctx, flash attention)."""
        self.logf.flush()
        keys = ("n_ctx_slot", "n_threads", "flash_attn", "system_info", "build_info",
                "kv_unified", "n_batch", "n_ubatch", "type_k")
        with open(self.log, errors="replace") as f:
            return "".join(line for line in f if any(k in line for k in keys))[:3000]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.logf.close()


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--model", default=None, help="model (default: SmolLM2-135M-Instruct GGUF)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--base-url", default=None,
                    help="benchmark a running server instead of starting one in-process")
    ap.add_argument("--served-model-name", default="bench",
                    help="model name to send (with --base-url)")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--dataset", default="random", choices=["random", "text"],
                    help="random token ids (vLLM's random) or real text with log-normal "
                         "lengths (see above)")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128,
                    help="random: mean input length; text: median")
    ap.add_argument("--output-len", type=int, default=64,
                    help="random: mean output length; text: median")
    ap.add_argument("--range-ratio", type=float, default=0.5, help="random: length range")
    ap.add_argument("--input-sigma", type=float, default=0.7,
                    help="text: sigma of the log-normal input lengths")
    ap.add_argument("--output-sigma", type=float, default=0.6,
                    help="text: sigma of the log-normal output lengths")
    ap.add_argument("--request-rate", type=float, nargs="+", default=[math.inf],
                    help="requests/s (Poisson); several values: one run each (default: inf)")
    ap.add_argument("--burstiness", type=float, default=1.0,
                    help="gamma shape of inter-arrival gaps (1: Poisson)")
    ap.add_argument("--max-concurrency", type=int, default=None,
                    help="cap on requests in flight in the --request-rate runs")
    ap.add_argument("--concurrency", type=int, nargs="*", default=[],
                    help="also: fixed-concurrency runs (all queued at once, at most N in flight)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--num-pages", type=int, default=1024)
    ap.add_argument("--enable-prefix-caching", action="store_true",
                    help="off by default: random prompts share no prefix, and the warm-up "
                         "pass would otherwise serve the timed prompts from the cache "
                         "(with --llama-server: llama.cpp's prompt cache follows it)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs per rate (alone: each after its own baseline run; side by "
                         "side: jaxllm and llama.cpp alternate)")
    ap.add_argument("--no-warmup", action="store_true",
                    help="skip the untimed passes that compile (and warm llama.cpp) first")
    ap.add_argument("--warmup-rates", type=float, nargs="*", default=[],
                    help="extra untimed passes through jaxllm at these Poisson rates: "
                         "staggered arrivals make mixed prefill+decode steps whose shapes "
                         "the all-at-once pass does not compile (llama.cpp compiles nothing)")
    ap.add_argument("--engine-warmup", action="store_true",
                    help="before serving, compile every step shape of the engine "
                         "(LLMEngine.warmup(); minutes the first time, then read from the "
                         "persistent compilation cache)")
    ap.add_argument("--no-baseline", action="store_true",
                    help="skip the offline LLM.generate baseline")
    ap.add_argument("--llama-server", default=None, metavar="PATH",
                    help="also run llama.cpp's llama-server, side by side (see above)")
    ap.add_argument("--llama-quantize", default=None, metavar="PATH",
                    help="llama-quantize (default: next to --llama-server)")
    ap.add_argument("--llama-cache-dir", default=None, metavar="DIR",
                    help="where the converted GGUF is kept (default: ~/.cache/jaxllm/llamacpp)")
    ap.add_argument("--llama-threads", type=int, default=2)
    ap.add_argument("--llama-args", default="",
                    help="extra llama-server arguments (one string, shell-split)")
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
    if any(c < 1 for c in args.concurrency):
        ap.error("--concurrency values must be >= 1")
    llama_bin = llama_q = None
    if args.llama_server:
        if args.base_url:
            ap.error("--llama-server runs side by side with the in-process jaxllm server; "
                     "drop --base-url")
        llama_bin = Path(args.llama_server).expanduser().resolve()
        llama_q = Path(args.llama_quantize or llama_bin.parent / "llama-quantize").expanduser()
        for b in (llama_bin, llama_q):
            if not os.access(b, os.X_OK):
                ap.error(f"{b} is not an executable (see docs/benchmarks.md for the build)")

    import signal

    # SIGTERM unwinds like Ctrl-C: the servers are stopped in the finally below
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    import jax

    from jaxllm import LLM, SamplingParams
    from jaxllm.bench import Bench, environment

    env = environment()
    device = (f"{env.get('platform')} ({env.get('device_kind')}, {env.get('cpu_model')}, "
              f"{env.get('threads')} threads), jax {jax.__version__}")
    llm = server = llama = None
    tokenizer = None
    compiles = CompileCounter()
    if args.base_url is None:
        llm = LLM(args.model, dtype=args.dtype, quantization=None,  # llama-server: same precision
                  max_model_len=args.max_model_len,
                  max_num_seqs=args.max_num_seqs,
                  max_num_batched_tokens=args.max_num_batched_tokens, num_pages=args.num_pages,
                  enable_prefix_caching=args.enable_prefix_caching)
        vocab, tokenizer = llm.config.vocab_size, llm.tokenizer
    else:
        import httpx

        hdr = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        models = httpx.get(args.base_url + "/v1/models", headers=hdr).json()["data"]
        vocab = 32000  # a remote model's vocabulary is unknown: stay inside common ones
        print(f"remote model: {models[0]['id']}")
        if args.dataset == "text":  # the tokenizer of the GGUF file the remote serves
            from jaxllm.weights import default_model_path
            from jaxllm.weights.gguf import tokenizer_from_gguf

            tokenizer = tokenizer_from_gguf(args.model or default_model_path())
    model_name = args.model or "SmolLM2-135M-Instruct (Q4_1 GGUF)"
    if args.dataset == "random":
        work = make_workload(args.num_prompts, args.input_len, args.output_len,
                             args.range_ratio, vocab, args.seed)
        data = (f"{args.num_prompts} random-token prompts, input {args.input_len} "
                f"(x[{1 - args.range_ratio:g}, {1 + args.range_ratio:g}]), output "
                f"{args.output_len} (same range)")
    else:
        paras = text_paragraphs()
        ids = tokenizer.encode_batch(paras, add_special_tokens=False)
        work = make_text_workload(args.num_prompts, args.input_len, args.output_len,
                                  args.input_sigma, args.output_sigma, args.max_model_len,
                                  ids, args.seed)
        data = (f"{args.num_prompts} text prompts (pydoc_data.topics, Python "
                f"{sys.version.split()[0]}; {len(paras)} paragraphs, {sum(map(len, ids))} "
                f"tokens), input lognormal(median {args.input_len}, sigma {args.input_sigma:g}), "
                f"output lognormal(median {args.output_len}, sigma {args.output_sigma:g})")
    n_in, n_out = sum(len(p) for p, _ in work), sum(o for _, o in work)
    ins = np.array([len(p) for p, _ in work])
    outs = np.array([o for _, o in work])
    print(f"workload: {len(work)} requests, {n_in} input / {n_out} output tokens; input "
          f"p10/p50/p90/max {np.percentile(ins, 10):.0f}/{np.median(ins):.0f}/"
          f"{np.percentile(ins, 90):.0f}/{ins.max()}, output {np.percentile(outs, 10):.0f}/"
          f"{np.median(outs):.0f}/{np.percentile(outs, 90):.0f}/{outs.max()}", flush=True)
    workload = (f"{data}, seed {args.seed}; {n_in} in / {n_out} out tokens; ignore_eos, greedy, "
                f"streaming; model {model_name} {args.dtype}; max_num_seqs={args.max_num_seqs}, "
                f"max_num_batched_tokens={args.max_num_batched_tokens}, "
                f"max_model_len={args.max_model_len}, prefix caching "
                f"{'on' if args.enable_prefix_caching else 'off'}")

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

    use_baseline = llm is not None and not args.no_baseline and llama_bin is None
    if use_baseline and not args.no_warmup:
        llm.generate(prompts, sps)  # compiles what the runs need (untimed)

    if args.engine_warmup and llm is not None:  # before the server's engine loop starts
        t0 = time.perf_counter()
        n = llm.engine.warmup()
        print(f"engine warm-up: {n} step shapes in {time.perf_counter() - t0:.1f} s "
              f"({compiles.n} XLA programs so far)", flush=True)

    servers: list[tuple[str, str, str]] = []  # (name, base url, model name to send)
    summaries = []
    try:
        if llm is not None:
            port = free_port()
            server, thread = start_server(llm, port, args.api_key)
            servers.append((JAXLLM, f"http://127.0.0.1:{port}", "bench"))
        else:
            servers.append((JAXLLM, args.base_url, args.served_model_name))
        if llama_bin is not None:
            cache_dir = Path(args.llama_cache_dir or Path.home() / ".cache" / "jaxllm" / "llamacpp")
            src = Path(llm.model_path)
            if src.suffix != ".gguf":
                raise SystemExit(f"--llama-server needs a .gguf model; jaxllm loaded {src}")
            gguf = llamacpp_gguf(src, args.dtype, llama_q, cache_dir.expanduser(),
                                 args.llama_threads)
            llama = LlamaServer(llama_bin, gguf, args, shlex.split(args.llama_args))
            llama.wait_ready()
            print(llama.settings(), flush=True)
            servers.append((LLAMACPP, llama.url, "bench"))
            workload += (f"; llama.cpp: {gguf.name}, -t {args.llama_threads} "
                         f"-np {args.max_num_seqs} -c {args.max_num_seqs * args.max_model_len}")
        if not args.no_warmup:  # one untimed pass through each server: compiles, warms
            for name, url, model in servers:
                t0 = time.perf_counter()
                res, _ = asyncio.run(run_load(url, model, work, math.inf, 1.0, None,
                                              args.api_key, args.seed))
                print(f"warm-up pass, {name}: {time.perf_counter() - t0:.1f} s, "
                      f"{sum(r.ok for r in res)}/{len(res)} ok; {usage_check(res)}"
                      + (f"; {compiles.n} XLA programs so far" if name == JAXLLM else ""),
                      flush=True)
                for wr in (args.warmup_rates if name == JAXLLM else []):
                    t0 = time.perf_counter()
                    res, _ = asyncio.run(run_load(url, model, work, wr, args.burstiness,
                                                  args.max_concurrency, args.api_key,
                                                  args.seed))
                    print(f"warm-up pass at {wr:g} req/s, {name}: "
                          f"{time.perf_counter() - t0:.1f} s; {compiles.n} XLA programs so far",
                          flush=True)

        configs = [(r, args.max_concurrency) for r in args.request_rate]
        configs += [(math.inf, c) for c in args.concurrency]
        for rate, conc in configs:
            for rep in range(args.repeat):
                # alone, the baseline runs right before each served run: on a shared machine
                # the load moves, and the ratio should compare like with like
                baseline = (base_name, offline()) if use_baseline else None
                pair: dict[str, dict] = {}
                for name, url, model in servers:
                    c0 = compiles.snapshot()
                    results, duration = asyncio.run(run_load(
                        url, model, work, rate, args.burstiness, conc, args.api_key,
                        args.seed))
                    s = summarize(results, duration, args.slo_ttft_ms, args.slo_tpot_ms)
                    if name == JAXLLM and llm is not None:
                        s["xla_compiles"] = compiles.n - c0[0]
                        s["xla_compile_s"] = compiles.secs - c0[1]
                    errors = sorted({r.error for r in results if not r.ok})
                    title = (f"{name}: rate {rate:g} req/s"
                             + (f", concurrency {conc}" if conc else "")
                             + (f", run {rep + 1}" if args.repeat > 1 else ""))
                    print_result(title, s, workload, device, baseline)
                    print(usage_check(results))
                    if "xla_compiles" in s:
                        print(f"XLA programs compiled or loaded from the persistent cache "
                              f"during this run: {s['xla_compiles']} "
                              f"({s['xla_compile_s']:.1f} s)"
                              + (f": {', '.join(compiles.names[c0[0]:][:8])}"
                                 if s["xla_compiles"] else ""))
                    if errors:
                        print("errors:", errors[:5])
                    wl = {"dataset": args.dataset, "num_prompts": args.num_prompts,
                          "input_len": args.input_len, "output_len": args.output_len,
                          "request_rate": rate if math.isfinite(rate) else "inf",
                          "burstiness": args.burstiness, "max_concurrency": conc,
                          "model": args.model or "SmolLM2-135M-Instruct", "dtype": args.dtype,
                          "max_num_seqs": args.max_num_seqs, "server": name}
                    if args.dataset == "random":
                        wl["range_ratio"] = args.range_ratio
                    else:
                        wl.update(input_sigma=args.input_sigma, output_sigma=args.output_sigma)
                    pair[name] = {"wl": wl, "s": s}
                    summaries.append({"server": name, "request_rate": wl["request_rate"],
                                      "max_concurrency": conc, "run": rep + 1, **s,
                                      "baseline_output_throughput":
                                          baseline[1] if baseline else None})
                for name, row in pair.items():  # one results row per run
                    if baseline is not None:
                        b, ratio = baseline[0], row["s"]["output_throughput"] / baseline[1]
                    elif name == JAXLLM and LLAMACPP in pair:
                        b = "llama.cpp llama-server (same prompts, run right after)"
                        ratio = (row["s"]["output_throughput"]
                                 / pair[LLAMACPP]["s"]["output_throughput"])
                    else:
                        b = ratio = None
                    Bench("serve", workload=row["wl"]).record(row["s"], baseline=b, ratio=ratio)
    finally:
        if server is not None:
            server.should_exit = True
            thread.join(60)
        if llama is not None:
            llama.stop()
    if llama is not None:
        print(side_by_side(summaries, args.slo_ttft_ms))
    if args.plot:
        plot(summaries, args.plot, workload)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"workload": workload, "device": device, "runs": summaries}, f, indent=2)
    return 0 if all(s["failed"] == 0 for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
