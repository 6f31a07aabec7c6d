"""Weight quantization on the default model: weight memory, quality and decode speed.

For float32, bfloat16, int8 (RTN, per channel), int4 (RTN, group 32, int8 embedding),
int4-e4 (group 32, int4 embedding too) and gguf (the file's own Q4_1 / Q8_0 blocks)
weights, all through ``LLM(..., quantization=...)``:

  memory    bytes of the params pytree on the device (quantized leaves at stored size);
  quality   mean negative log-likelihood and perplexity of the assistant replies in
            tests/data/captain_byte.jsonl (the project's SFT sample, joined with blank
            lines, first ``--text-tokens`` tokens, scored in ``--window``-token windows),
            and the greedy agreement with float32: the fraction of next-token argmaxes over
            that text equal to float32's;
  speed     batch-1 greedy decode tok/s through ``LLM.generate`` (time(1 + N tokens) -
            time(1 token), so prefill is excluded), configurations interleaved,
            median of ``--repeat`` rounds.

Ratios are against float32 in the same run.

    python scripts/bench_quant.py
    python scripts/bench_quant.py --method float32 --method int8 --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402

from jaxllm import LLM, SamplingParams  # noqa: E402
from jaxllm.quant import QuantConfig, tree_nbytes  # noqa: E402

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "captain_byte.jsonl"
METHODS = {"float32": ("float32", None), "bfloat16": ("bfloat16", None),
           "int8": ("float32", "int8"), "int4": ("float32", "int4"),
           "int4-g64": ("float32", "int4-g64"), "int4-g128": ("float32", "int4-g128"),
           "int4-e4": ("float32", QuantConfig("int4", 32, embed_bits=4)),
           "gguf": ("float32", "gguf"), "int8-bf16": ("bfloat16", "int8")}


def text_tokens(llm: LLM, n: int) -> list[int]:
    """The first ``n`` tokens of the replies in tests/data/captain_byte.jsonl."""
    replies = []
    for line in TEXT.read_text().splitlines():
        ex = json.loads(line) if line.strip() else {}
        replies += ([ex["output"]] if "output" in ex else
                    [m["content"] for m in ex.get("messages", []) if m["role"] == "assistant"])
    ids = llm.tokenizer.encode("\n\n".join(replies), add_special_tokens=False)
    return ids[:n]


def score(llm: LLM, ids: list[int], window: int) -> tuple[float, np.ndarray]:
    """(mean NLL in nats per predicted token, argmax per predicted position)."""
    nll, picks = [], []
    for s in range(0, len(ids) - 1, window):
        chunk = ids[s:s + window + 1]
        lg = llm.logits(chunk)[:-1].astype(np.float64)
        lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
        tgt = np.asarray(chunk[1:])
        nll.append(lse - lg[np.arange(len(tgt)), tgt])
        picks.append(lg.argmax(-1))
    return float(np.concatenate(nll).mean()), np.concatenate(picks)


def decode_rate(llm: LLM, prompt: list[int], new: int) -> float:
    """Decode tok/s: (time for 1 + new tokens) - (time for 1 token)."""
    def run(n: int) -> float:
        sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        t = time.perf_counter()
        out = llm.generate([prompt], sp)
        assert len(out[0].outputs[0].token_ids) == n
        return time.perf_counter() - t

    return new / max(run(1 + new) - run(1), 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", action="append", choices=sorted(METHODS))
    ap.add_argument("--model", default=None)
    ap.add_argument("--text-tokens", type=int, default=1024)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    methods = args.method or ["float32", "bfloat16", "int8", "int4", "int4-e4", "gguf"]
    if "float32" not in methods:
        methods.insert(0, "float32")
    dev = jax.devices()[0]
    print(f"device {dev.platform}: {dev.device_kind}  cores {os.cpu_count()}  "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"workload: model {args.model or 'default (SmolLM2-135M-Instruct Q4_1 GGUF)'}; "
          f"quality on the first {args.text_tokens} tokens of {TEXT.relative_to(TEXT.parents[2])} "
          f"replies in {args.window}-token windows; decode batch 1, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, greedy, median of {args.repeat} interleaved rounds")
    llms, rows = {}, {}
    ref_picks = None
    for m in methods:
        dtype, q = METHODS[m]
        t = time.perf_counter()
        llms[m] = LLM(args.model, dtype=dtype, quantization=q, max_model_len=1024,
                      num_pages=80, max_num_seqs=1)
        load_s = time.perf_counter() - t
        ids = text_tokens(llms[m], args.text_tokens)
        nll, picks = score(llms[m], ids, args.window)
        ref_picks = picks if ref_picks is None else ref_picks
        rows[m] = dict(bytes=tree_nbytes(llms[m].params), nll=nll, ppl=float(np.exp(nll)),
                       agree=float(np.mean(picks == ref_picks)), load_s=load_s, tok_s=[])
        print(f"  {m}: loaded in {load_s:.1f} s, {rows[m]['bytes'] / 2**20:.1f} MiB, "
              f"nll {nll:.4f}", flush=True)
    prompt = [int(t) for t in np.random.default_rng(0).integers(100, 40000, args.prompt_len)]
    for m in methods:  # compile + fill the prefix cache
        decode_rate(llms[m], prompt, args.new_tokens)
    for _ in range(args.repeat):
        for m in methods:
            rows[m]["tok_s"].append(decode_rate(llms[m], prompt, args.new_tokens))
    f32 = rows["float32"]
    tok0 = statistics.median(f32["tok_s"])
    print(f"\n{'weights':10s} {'MiB':>8s} {'vs f32':>7s} {'NLL':>8s} {'ppl':>8s} "
          f"{'d-ppl':>7s} {'agree':>6s} {'tok/s':>7s} {'vs f32':>7s}")
    for m, r in rows.items():
        tok = statistics.median(r["tok_s"])
        print(f"{m:10s} {r['bytes'] / 2**20:8.1f} {r['bytes'] / f32['bytes']:7.3f} "
              f"{r['nll']:8.4f} {r['ppl']:8.3f} {100 * (r['ppl'] / f32['ppl'] - 1):+6.2f}% "
              f"{r['agree']:6.3f} {tok:7.1f} {tok / tok0:7.2f}")
    print(f"load at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
