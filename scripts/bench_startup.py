"""Start-up time: ``jaxllm generate`` and ``LLM()`` + first ``generate``, cold and warm.

Each run starts a new process and measures from the moment it is spawned (interpreter
start-up and imports included):

* first token: ``cli`` -- the first byte written after the echoed prompt of
  ``jaxllm generate PROMPT --max-tokens N``; ``python`` -- the first piece streamed by
  ``LLM().stream(PROMPT)`` with ``LLM``'s defaults (its 4 GiB page pool included);
* after: the seconds from the first token to the last of N, as tokens/s.

``cold``: empty compilation cache and converted-weights cache (``XDG_CACHE_HOME`` and
``JAXLLM_CACHE_DIR`` point at fresh temporary directories), i.e. the first run on a new
machine once the package and the model file are installed.  ``warm``: the same command
again with those caches filled.  Baseline for the tokens after the first: the static
path's steady batch-1 decode rate (``LLM(static_batching=True)``, warm), measured in the
same run, interleaved with the warm runs.  Targets: first token cold <= 10 s, warm <= 3 s;
tokens after the first >= 0.85x the static rate.

    python scripts/bench_startup.py [--runs 3] [--api cli|python|both] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jaxllm.bench import Bench  # noqa: E402

TARGETS = {"cold": 10.0, "warm": 3.0}
RATE_TARGET = 0.85

# The Python-API child: prints nothing but the streamed pieces, like the CLI.
PYTHON_CHILD = """
import sys
from jaxllm import LLM, SamplingParams
prompt, n = sys.argv[1], int(sys.argv[2])
llm = LLM()
sp = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
sys.stdout.write(prompt)
for piece in llm.stream(prompt, sp):
    sys.stdout.write(piece)
    sys.stdout.flush()
"""

# Static path's steady decode rate: (t(N+1 tokens) - t(1 token)) / N, after a warm-up.
STATIC_CHILD = """
import sys, time
from jaxllm import LLM, SamplingParams
prompt, n = sys.argv[1], int(sys.argv[2])
llm = LLM(static_batching=True)
def run(k):
    t = time.perf_counter()
    llm.generate([prompt], SamplingParams(max_tokens=k, temperature=0, ignore_eos=True))
    return time.perf_counter() - t
run(n + 1), run(1)
best = min(run(n + 1) - run(1) for _ in range(2))
print(n / best)
"""


def _command(args, api: str) -> list[str]:
    if api == "python":
        return [sys.executable, "-c", PYTHON_CHILD, args.prompt, str(args.max_tokens)]
    cmd = [sys.executable, "-m", "jaxllm.cli", "generate", args.prompt,
           "--max-tokens", str(args.max_tokens), "--temperature", "0", "--ignore-eos"]
    return cmd + (["--model", args.model] if args.model else [])


def run_once(args, api: str, env: dict) -> tuple[float, float]:
    """``(first token s, last token s)`` of one process, from spawn."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(_command(args, api), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    echoed = args.prompt.encode()
    seen = b""
    first = last = None
    while True:
        b = proc.stdout.read(1)
        if not b:
            break
        seen += b
        if len(seen) > len(echoed) and not b.isspace():
            last = time.perf_counter() - t0
            first = first or last
    if proc.wait() != 0:
        raise SystemExit(f"{api} run exited with {proc.returncode}")
    if first is None:
        raise SystemExit(f"{api} run generated nothing")
    return first, last


def static_rate(args, env: dict) -> float:
    """The static path's steady batch-1 decode tokens/s (warm caches)."""
    out = subprocess.run([sys.executable, "-c", STATIC_CHILD, args.prompt, str(args.max_tokens)],
                         env=env, cwd=ROOT, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompt", default="The three most useful things to know about JAX are")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3, help="warm runs after the cold one")
    ap.add_argument("--api", choices=("cli", "python", "both"), default="both")
    ap.add_argument("--results", default=None)
    args = ap.parse_args()
    if args.model and args.api != "cli":
        ap.error("--model is measured through the CLI only (--api cli)")
    apis = ("cli", "python") if args.api == "both" else (args.api,)

    with tempfile.TemporaryDirectory(prefix="jaxllm-startup-") as tmp:
        env = {**os.environ, "XDG_CACHE_HOME": os.path.join(tmp, "xdg"),
               "JAXLLM_CACHE_DIR": os.path.join(tmp, "params"), "JAX_PLATFORMS":
               os.environ.get("JAX_PLATFORMS", "cpu"), "PYTHONPATH": ROOT}
        env.pop("JAXLLM_COMPILATION_CACHE", None)
        import jax

        dev = jax.devices()[0]
        print(f"start-up, {args.max_tokens} tokens  model "
              f"{args.model or 'default (SmolLM2-135M-Instruct GGUF)'}  device "
              f"{dev.platform}:{dev.device_kind}  cpu cores {os.cpu_count()}  "
              f"load {os.getloadavg()[0]:.1f}")
        print(f"{'api':<8}{'run':<6}{'first token (s)':>16}{'target':>8}{'after (tok/s)':>15}"
              f"{'static (tok/s)':>16}{'ratio':>7}")
        for i in range(1 + args.runs):
            kind = "cold" if i == 0 else "warm"
            for api in apis:
                if i == 0 and api != apis[0]:
                    kind = "warm"  # the first API's cold run filled the caches
                first, last = run_once(args, api, env)
                rate = (args.max_tokens - 1) / max(last - first, 1e-9)
                static = static_rate(args, env) if kind == "warm" else float("nan")
                ratio = rate / static
                print(f"{api:<8}{kind:<6}{first:>16.2f}{TARGETS[kind]:>8.1f}{rate:>15.1f}"
                      f"{static:>16.1f}{ratio:>6.2f}x", flush=True)
                Bench("startup", workload={"api": api, "run": kind,
                                           "max_tokens": args.max_tokens},
                      results_file=args.results).record(
                    {"first_token_s": first, "last_token_s": last, "after_tok_s": rate,
                     "static_tok_s": static},
                    baseline=f"first token target {TARGETS[kind]:.0f} s; static decode",
                    ratio=ratio)
        print(f"targets: first token cold <= {TARGETS['cold']:.0f} s, warm <= "
              f"{TARGETS['warm']:.0f} s; after / static >= {RATE_TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
