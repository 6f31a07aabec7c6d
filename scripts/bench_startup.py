"""Start-up time of ``jaxllm generate``: cold (fresh caches) and warm.

Each run starts ``jaxllm generate PROMPT --max-tokens N`` as a new process and measures,
from the moment the process is spawned (interpreter start-up and imports included):

* first token: the first byte written after the echoed prompt;
* total: the process exit.

``cold``: empty compilation cache and converted-weights cache (``XDG_CACHE_HOME`` and
``JAXLLM_CACHE_DIR`` point at fresh temporary directories), i.e. the first run on a new
machine once the package and the model file are installed.  ``warm``: the same command
again with those caches filled.  Targets: cold <= 20 s, warm <= 5 s.

    python scripts/bench_startup.py [--runs 2] [--model PATH] [--max-tokens 16]
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

TARGETS = {"cold": 20.0, "warm": 5.0}


def run_once(args, env: dict) -> tuple[float, float]:
    cmd = [sys.executable, "-m", "jaxllm.cli", "generate", args.prompt,
           "--max-tokens", str(args.max_tokens), "--temperature", "0"]
    if args.model:
        cmd += ["--model", args.model]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                            cwd=ROOT)
    echoed = args.prompt.encode()
    seen = b""
    first = None
    while True:
        b = proc.stdout.read(1)
        if not b:
            break
        seen += b
        if first is None and len(seen) > len(echoed):
            first = time.perf_counter() - t0
    rc = proc.wait()
    total = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"jaxllm generate exited with {rc}")
    return (first if first is not None else total), total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--prompt", default="The three most useful things to know about JAX are")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--runs", type=int, default=2, help="warm runs after the cold one")
    ap.add_argument("--results", default=None)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="jaxllm-startup-") as tmp:
        env = {**os.environ, "XDG_CACHE_HOME": os.path.join(tmp, "xdg"),
               "JAXLLM_CACHE_DIR": os.path.join(tmp, "params"), "JAX_PLATFORMS":
               os.environ.get("JAX_PLATFORMS", "cpu")}
        env.pop("JAXLLM_COMPILATION_CACHE", None)
        import jax

        dev = jax.devices()[0]
        print(f"jaxllm generate --max-tokens {args.max_tokens}  model "
              f"{args.model or 'default (SmolLM2-135M-Instruct GGUF)'}  device "
              f"{dev.platform}:{dev.device_kind}  cpu cores {os.cpu_count()}")
        print(f"{'run':<8}{'first token (s)':>16}{'total (s)':>11}{'target (s)':>12}{'ratio':>8}")
        for i in range(1 + args.runs):
            kind = "cold" if i == 0 else "warm"
            first, total = run_once(args, env)
            target = TARGETS[kind]
            print(f"{kind:<8}{first:>16.2f}{total:>11.2f}{target:>12.1f}{first / target:>7.2f}x",
                  flush=True)
            Bench("startup", workload={"run": kind, "max_tokens": args.max_tokens},
                  results_file=args.results).record(
                {"first_token_s": first, "total_s": total},
                baseline=f"target {target:.0f} s", ratio=first / target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
