"""Generation benchmark: jaxllm vs HF transformers on the same model, same dtype, same threads.

Workloads (flags in :func:`jaxllm.cli.add_bench_args`):
  prefill   one 512-token prompt, latency
  decode    batch 1 / 8 / 32, 128-token prompts, 128 new tokens, decode tokens/s
  no-cache  the recompute-everything baseline vs the KV cache at 256 new tokens (batch 1)

Every jaxllm number is a median over ``--repeat`` runs after a warm-up run
(compiles excluded); HF runs once per workload after a warm-up (it is slower).
Rows are appended to the benchmark results file through ``jaxllm.bench``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import numpy as np

from jaxllm.bench import Bench
from jaxllm.generation import StaticBatch, generate_without_cache
from jaxllm.llm import LLM
from jaxllm.sampling import SamplingParams


def _median_time(fn, repeat: int) -> float:
    fn()  # warm-up (compiles)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [list(map(int, rng.integers(100, vocab - 100, length))) for _ in range(batch)]


class _Jax:
    def __init__(self, args):
        # float weights: the peers run the same weights at the same precision
        self.llm = LLM(args.model, dtype=args.dtype, scan_layers=args.scan_layers,
                       quantization=None)

    def prefill(self, prompts):
        sp = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        llm = self.llm

        def run():
            b = StaticBatch(llm.params, llm.config, prompts, [sp] * len(prompts), (),
                            max_model_len=llm.max_model_len, impl=llm.attention_impl)
            jax.block_until_ready(b.state.last_token)

        return run

    def decode(self, prompts, new_tokens):
        """Returns a function timing only the decode loop (prefill excluded)."""
        sp = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        llm = self.llm
        box = {}

        def run():
            b = StaticBatch(llm.params, llm.config, prompts, [sp] * len(prompts), (),
                            max_model_len=llm.max_model_len, impl=llm.attention_impl)
            jax.block_until_ready(b.state.last_token)
            t = time.perf_counter()
            b.step(new_tokens)
            jax.block_until_ready(b.state.out_tokens)
            box["t"] = time.perf_counter() - t
            out, num, _ = b.fetch()
            assert (num == new_tokens).all(), num

        def timed():
            run()
            return box["t"]

        return timed

    def nocache(self, prompts, new_tokens):
        sp = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        llm = self.llm
        return lambda: generate_without_cache(llm.params, llm.config, prompts, sp,
                                              impl=llm.attention_impl)


class _HF:
    def __init__(self, args, path):
        # torch and transformers load only for the baseline (--no-hf skips them).
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(args.threads)
        self.torch = torch
        dtype = torch.float32 if args.dtype == "float32" else torch.bfloat16
        if str(path).endswith(".gguf"):
            self.model = AutoModelForCausalLM.from_pretrained(
                os.path.dirname(path), gguf_file=os.path.basename(path), dtype=dtype)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        self.model.eval()

    def prefill(self, prompts):
        ids = self.torch.tensor(prompts)

        def run():
            with self.torch.no_grad():
                self.model(ids, use_cache=True)

        return run

    def decode(self, prompts, new_tokens):
        ids = self.torch.tensor(prompts)
        prefill = self.prefill(prompts)

        def timed():
            t = time.perf_counter()
            prefill()
            t_prefill = time.perf_counter() - t
            t = time.perf_counter()
            with self.torch.no_grad():
                self.model.generate(ids, attention_mask=self.torch.ones_like(ids),
                                    max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                    do_sample=False, pad_token_id=0)
            return time.perf_counter() - t - t_prefill

        return timed


def run(args: argparse.Namespace) -> int:
    jx = _Jax(args)
    vocab = jx.llm.config.vocab_size
    hf = None if args.no_hf else _HF(args, jx.llm.model_path)
    device = jax.devices()[0]
    print(f"model {jx.llm.model_path.name}  dtype {args.dtype}  device {device.platform}:"
          f"{device.device_kind}  threads {args.threads}  layers "
          f"{'scan' if args.scan_layers else 'unrolled'}")
    print(f"{'workload':<34}{'jaxllm':>14}{'HF':>14}{'ratio':>9}")

    def report(name, workload, ours, theirs, unit):
        ratio = ours / theirs if theirs else None
        line = f"{name:<34}{ours:>10.1f} {unit:<4}"
        line += f"{theirs:>10.1f} {unit:<4}{ratio:>8.2f}x" if theirs else ""
        print(line, flush=True)
        Bench("generate", workload={"case": name, "dtype": args.dtype, **workload},
              results_file=args.results).record(
            {"value": ours, "unit": unit, "baseline_value": theirs},
            baseline="hf-transformers" if theirs else None, ratio=ratio)

    prompts = _prompts(1, args.prefill_len, vocab)
    ours = _median_time(jx.prefill(prompts), args.repeat)
    theirs = _median_time(hf.prefill(prompts), 1) if hf else None
    report(f"prefill {args.prefill_len} tok, batch 1", {"prompt": args.prefill_len},
           args.prefill_len / ours, theirs and args.prefill_len / theirs, "tok/s")

    for b in [int(x) for x in args.batches.split(",")]:
        prompts = _prompts(b, args.prompt_len, vocab, seed=b)
        n = args.new_tokens - 1  # the first token comes from prefill
        fn = jx.decode(prompts, args.new_tokens)
        fn()
        ours = statistics.median([fn() for _ in range(args.repeat)])
        theirs = None
        if hf:
            hfn = hf.decode(prompts, args.new_tokens)
            hfn() if b == 1 else None
            theirs = hfn()
        report(f"decode batch {b} ({args.prompt_len}+{args.new_tokens})",
               {"batch": b, "prompt": args.prompt_len, "new": args.new_tokens},
               b * n / ours, theirs and b * args.new_tokens / theirs, "tok/s")

    if args.nocache_tokens:
        _bench_nocache(jx, args, vocab)
    return 0


def _bench_nocache(jx: _Jax, args: argparse.Namespace, vocab: int) -> None:
    """Decode with the KV cache vs recomputing the whole sequence per token (batch 1)."""
    prompts = _prompts(1, args.prompt_len, vocab, seed=7)
    fn = jx.decode(prompts, args.nocache_tokens)
    fn()
    cached = statistics.median([fn() for _ in range(args.repeat)])
    nc = jx.nocache(prompts, args.nocache_tokens)
    nc()
    t = time.perf_counter()
    nc()
    recompute = time.perf_counter() - t
    n = args.nocache_tokens
    print(f"{'KV cache vs no-cache (' + str(n) + ' new)':<34}{(n - 1) / cached:>10.1f} tok/s"
          f"{n / recompute:>10.1f} tok/s{recompute / cached * (n - 1) / n:>8.2f}x  "
          f"(baseline: recompute)", flush=True)
    Bench("generate", workload={"case": "kv-cache vs recompute", "dtype": args.dtype,
                                "prompt": args.prompt_len, "new": n},
          results_file=args.results).record(
        {"value": (n - 1) / cached, "unit": "tok/s", "baseline_value": n / recompute},
        baseline="no-cache recompute", ratio=recompute / cached * (n - 1) / n)
