"""Weight quantization on the default model: weight memory, quality and decode speed.

For float32, bfloat16, int8 (RTN, per channel), int4 (RTN, group 32, int8 embedding),
int4-e4 (group 32, int4 embedding too), gguf (the file's own Q4_1 / Q8_0 blocks) and the
calibrated awq / gptq (int4 group 64: 128 does not divide the default model's hidden size
576), gptq-int8 and w8a8 (SmoothQuant) weights, all through ``LLM(..., quantization=...)``:

  memory    bytes of the params pytree on the device (quantized leaves at stored size);
  quality   mean negative log-likelihood and perplexity of a text, first ``--text-tokens``
            tokens scored in ``--window``-token windows: ``--text heldout`` (default) is the
            held-out part of the calibration text (the GNU GPL v3 after its first 2048
            tokens, ``jaxllm.quant.calibration``), ``--text captain`` the assistant replies
            of tests/data/captain_byte.jsonl (the project's SFT sample); and the greedy
            agreement with float32: the fraction of next-token argmaxes over that text
            equal to float32's;
  speed     greedy decode tok/s (all sequences together) at each ``--batch`` (default 1
            and 32) through ``LLM.generate`` (time(1 + N tokens) - time(1 token), so
            prefill is excluded), configurations interleaved, median of ``--repeat`` rounds.

Ratios are against float32 in the same run.  ``--speed-only`` skips the quality pass.
``--llama-bench PATH`` (or ``$LLAMA_BENCH``) adds llama.cpp's ``llama-bench`` on the same
GGUF file (``-t 2``, tg64 and pp512, one repetition per round) to every round, interleaved
with ours (build: docs/benchmarks.md); rows ``llama.cpp tg64`` / ``llama.cpp pp512`` report
its tok/s.  When ``float32`` / ``bfloat16`` are among the methods and ``llama-quantize``
sits next to ``llama-bench`` (or ``--llama-quantize PATH``), the same weights converted to
F32 / BF16 (``llama-quantize --allow-requantize``, cached like ``bench_serve.py`` does) are
benchmarked too, so every precision has its llama.cpp twin in the same rounds.

    python scripts/bench_quant.py
    python scripts/bench_quant.py --method float32 --method int8 --repeat 5
    python scripts/bench_quant.py --speed-only --method bfloat16 --method int8 \
        --method int4 --method gguf --llama-bench /path/to/llama-bench
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402

from jaxllm import LLM, SamplingParams  # noqa: E402
from jaxllm.quant import QuantConfig, split_tokens, tree_nbytes  # noqa: E402
from jaxllm.weights import default_model_path  # noqa: E402

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "captain_byte.jsonl"
METHODS = {"float32": ("float32", None), "bfloat16": ("bfloat16", None),
           "int8": ("float32", "int8"), "int4": ("float32", "int4"),
           "int4-g64": ("float32", "int4-g64"), "int4-g128": ("float32", "int4-g128"),
           "int4-e4": ("float32", QuantConfig("int4", 32, embed_bits=4)),
           "gguf": ("float32", "gguf"), "gguf-bf16": ("bfloat16", "gguf"),
           "int8-bf16": ("bfloat16", "int8"),
           "awq": ("float32", "awq-g64"), "gptq": ("float32", "gptq-g64"),
           "gptq-int8": ("float32", "gptq-int8"), "w8a8": ("float32", "w8a8")}


def text_tokens(llm: LLM, n: int, text: str = "heldout") -> list[int]:
    """The first ``n`` tokens of the held-out calibration text, or (``captain``) of the
    replies in tests/data/captain_byte.jsonl."""
    if text == "heldout":
        return split_tokens(llm.tokenizer)[1][:n]
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


def decode_rate(llm: LLM, prompts: list[list[int]], new: int) -> float:
    """Decode tok/s of all ``prompts`` together: (time for 1 + new tokens) - (time for 1)."""
    def run(n: int) -> float:
        sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        t = time.perf_counter()
        out = llm.generate(prompts, sp)
        assert all(len(o.outputs[0].token_ids) == n for o in out)
        return time.perf_counter() - t

    return len(prompts) * new / max(run(1 + new) - run(1), 1e-9)


def llama_models(gguf_file: str, methods: list[str], bench: str,
                 quantize: str | None) -> dict[str, str]:
    """``{label: gguf path}`` for llama-bench: the file itself, plus F32 / BF16 copies for
    the float methods when ``llama-quantize`` is at hand."""
    from bench_serve import llamacpp_gguf  # scripts/: the same cached conversion

    models = {Path(gguf_file).stem.split(".")[-1]: gguf_file}
    quantize = quantize or str(Path(bench).with_name("llama-quantize"))
    if not Path(quantize).is_file():
        print(f"(no llama-quantize at {quantize}: llama.cpp runs only {gguf_file})")
        return models
    cache = Path.home() / ".cache" / "jaxllm" / "llamacpp"
    for m, ftype in (("float32", "F32"), ("bfloat16", "BF16")):
        if m in methods:
            models[ftype] = str(llamacpp_gguf(Path(gguf_file), m, Path(quantize), cache, 2))
    return models


def llama_bench(binary: str, model: str) -> dict[str, float]:
    """One llama-bench repetition of tg64 and pp512 on ``model`` with 2 threads: tok/s."""
    out = subprocess.run([binary, "-m", model, "-t", "2", "-p", "512", "-n", "64", "-r", "1",
                          "-o", "json"], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"llama-bench failed (exit {out.returncode}): {out.stderr[-500:]}")
    rows = {}
    for r in json.loads(out.stdout):
        rows["llama.cpp " + (f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}")] = (
            float(r["avg_ts"]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", action="append", choices=sorted(METHODS))
    ap.add_argument("--model", default=None)
    ap.add_argument("--text-tokens", type=int, default=1024)
    ap.add_argument("--text", choices=["heldout", "captain"], default="heldout")
    ap.add_argument("--batch", type=int, action="append",
                    help="decode batch sizes (repeatable; default: 1 and 32)")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--speed-only", action="store_true", help="skip the quality pass")
    ap.add_argument("--llama-bench", default=os.environ.get("LLAMA_BENCH"),
                    help="llama-bench binary: run it on the same GGUF file each round")
    ap.add_argument("--llama-quantize", default=None,
                    help="llama-quantize binary (default: next to llama-bench) for the "
                         "F32 / BF16 copies")
    args = ap.parse_args()
    methods = args.method or ["float32", "bfloat16", "int8", "int4", "int4-e4", "gguf"]
    batches = args.batch or [1, 32]
    if "float32" not in methods:
        methods.insert(0, "float32")
    dev = jax.devices()[0]
    print(f"device {dev.platform}: {dev.device_kind}  cores {os.cpu_count()}  "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"workload: model {args.model or 'default (SmolLM2-135M-Instruct Q4_1 GGUF)'}; "
          f"quality on the first {args.text_tokens} tokens of "
          f"{'the held-out GPL v3 text' if args.text == 'heldout' else TEXT.name} "
          f"in {args.window}-token windows; decode batch {batches}, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, greedy, median of {args.repeat} interleaved rounds")
    llms, rows = {}, {}
    ref_picks = None
    for m in methods:
        dtype, q = METHODS[m]
        t = time.perf_counter()
        pages = max(batches) * (-(-(args.prompt_len + args.new_tokens + 1) // 16) + 1) + 16
        llms[m] = LLM(args.model, dtype=dtype, quantization=q, max_model_len=1024,
                      num_pages=max(80, pages), max_num_seqs=max(batches))
        load_s = time.perf_counter() - t
        if args.speed_only:
            nll, picks = float("nan"), np.zeros(0)
        else:
            ids = text_tokens(llms[m], args.text_tokens, args.text)
            nll, picks = score(llms[m], ids, args.window)
        ref_picks = picks if ref_picks is None else ref_picks
        agree = float(np.mean(picks == ref_picks)) if picks.size else float("nan")
        rows[m] = dict(bytes=tree_nbytes(llms[m].params), nll=nll, ppl=float(np.exp(nll)),
                       agree=agree, load_s=load_s, tok_s={b: [] for b in batches})
        print(f"  {m}: loaded in {load_s:.1f} s, {rows[m]['bytes'] / 2**20:.1f} MiB, "
              f"nll {nll:.4f}", flush=True)
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(100, 40000, args.prompt_len)]
               for _ in range(max(batches))]
    for m in methods:  # compile + fill the prefix cache
        for b in batches:
            decode_rate(llms[m], prompts[:b], args.new_tokens)
    gguf_file = str(args.model or default_model_path())
    lcpp: dict[str, list[float]] = {}
    if args.llama_bench and not gguf_file.endswith(".gguf"):
        raise SystemExit(f"--llama-bench needs a .gguf model, got {gguf_file}")
    lmodels = (llama_models(gguf_file, methods, args.llama_bench, args.llama_quantize)
               if args.llama_bench else {})
    for _ in range(args.repeat):
        for m in methods:
            for b in batches:
                rows[m]["tok_s"][b].append(decode_rate(llms[m], prompts[:b], args.new_tokens))
        for label, path in lmodels.items():  # same round: load changes hit both alike
            for name, tok in llama_bench(args.llama_bench, path).items():
                lcpp.setdefault(f"{name} {label}", []).append(tok)
    f32 = rows["float32"]
    tok0 = {b: statistics.median(f32["tok_s"][b]) for b in batches}
    print(f"\n{'weights':10s} {'MiB':>8s} {'vs f32':>7s} {'NLL':>8s} {'ppl':>8s} "
          f"{'d-ppl':>7s} {'agree':>6s}" + "".join(f" {'b' + str(b) + ' tok/s':>11s} {'vs f32':>7s}"
                                                  for b in batches))
    for m, r in rows.items():
        tok = {b: statistics.median(r["tok_s"][b]) for b in batches}
        print(f"{m:10s} {r['bytes'] / 2**20:8.1f} {r['bytes'] / f32['bytes']:7.3f} "
              f"{r['nll']:8.4f} {r['ppl']:8.3f} {100 * (r['ppl'] / f32['ppl'] - 1):+6.2f}% "
              f"{r['agree']:6.3f}" + "".join(f" {tok[b]:11.1f} {tok[b] / tok0[b]:7.2f}"
                                             for b in batches))
    for name, toks in lcpp.items():
        print(f"{name:22s} {'':>39s} {statistics.median(toks):7.1f}   (rounds: "
              f"{', '.join(f'{t:.1f}' for t in toks)})")
    print("ours per round (tok/s): " + "; ".join(
        f"{m} b{b} {', '.join(f'{t:.1f}' for t in ts)}" for m, r in rows.items()
        for b, ts in r["tok_s"].items()))
    print(f"load at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
