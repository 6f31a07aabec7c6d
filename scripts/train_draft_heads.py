"""Train Medusa and EAGLE draft heads for the default model (SmolLM2-135M-Instruct) on this
machine and measure their greedy acceptance on held-out chat prompts.

Stages (each cached under ``--out``, default ``results/draft_heads/``):

1. self-distillation: templated chat prompts (topics x instructions) for training and a
   separate hand-written list of held-out chat prompts, each continued greedily by the
   target with ``LLM.generate`` -> ``distill.npz`` (token ids and prompt lengths);
2. the target's hidden states at every position (``train.draft_heads.target_features``);
3. per method: a short calibration run times a step, then ``--minutes`` of training
   (steps = budget / step time) -> ``OUT/<method>/`` (a heads directory);
4. acceptance measured with ``jaxllm.spec.heads.propose`` itself (jitted, as the engine
   calls it) at every position of the held-out continuations: per head, the fraction
   of proposals whose first ``j`` drafts all equal the target's greedy tokens ->
   ``OUT/acceptance.json``.

    python scripts/train_draft_heads.py --minutes 10 --methods medusa eagle
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import LLM
from jaxllm.spec import heads as H
from jaxllm.train import data as D
from jaxllm.train import draft_heads as DH
from jaxllm.train.metrics import MetricsWriter

TOPICS = [
    "photosynthesis", "the French Revolution", "black holes", "machine learning", "the water cycle",
    "volcanoes", "the stock market", "vaccines", "climate change", "the Roman Empire",
    "quantum computing", "honey bees", "the internet", "plate tectonics", "democracy",
    "sleep", "coffee", "the Moon", "electric cars", "recycling", "the human heart",
    "chess", "jazz music", "the Great Wall of China", "rainbows", "solar panels",
    "dinosaurs", "the immune system", "inflation", "meditation", "the printing press",
    "earthquakes", "DNA", "renewable energy", "the Olympic Games", "bread baking",
    "the ocean tides", "gravity", "smartphones", "ancient Egypt", "antibiotics",
    "the Amazon rainforest", "time management", "public speaking", "gardening",
    "the solar system", "cryptography", "friendship", "learning a new language",
]
TEMPLATES = [
    "Explain {t} in simple terms.",
    "What are three interesting facts about {t}?",
    "Write a short paragraph about {t} for a ten-year-old.",
    "Why is {t} important?",
    "Give me a brief history of {t}.",
    "What are the pros and cons of {t}?",
    "Write a short poem about {t}.",
    "How would you describe {t} to someone who has never heard of it?",
    "List some common misconceptions about {t}.",
    "Summarize what everyone should know about {t}.",
]
# held out: different wording, tasks and subjects from the training templates
HELD_OUT = [
    "How do I make a good cup of tea?",
    "Can you suggest a name for my new puppy?",
    "What should I pack for a weekend camping trip?",
    "Write a haiku about autumn leaves.",
    "What is the difference between weather and climate?",
    "How can I improve my handwriting?",
    "Tell me a short story about a robot who learns to paint.",
    "What are some tips for staying focused while studying?",
    "How does a refrigerator keep food cold?",
    "Write a thank-you note to a teacher.",
    "Why do cats purr?",
    "What is a prime number? Give examples.",
    "How do airplanes stay in the air?",
    "Suggest a healthy breakfast for a busy morning.",
    "What causes the seasons on Earth?",
    "Write a Python function that reverses a string.",
    "How can I save money on groceries?",
    "What was the Renaissance?",
    "Describe a sunset over the ocean.",
    "What are the benefits of drinking water?",
    "How do I start learning to play the guitar?",
    "Explain what a budget is and how to make one.",
    "Why is the sky blue?",
    "Give me three ideas for a rainy day activity.",
    "What does a software engineer do?",
    "How do plants know which way to grow?",
    "Write a limerick about a forgetful wizard.",
    "What is the tallest mountain in the world and how tall is it?",
    "How do I politely decline an invitation?",
    "Explain how a bicycle works.",
    "What makes a good friend?",
    "How do birds migrate?",
]


def log(msg: str) -> None:
    print(f"[train_draft_heads] {msg}", file=sys.stderr, flush=True)


def train_prompts(n: int, seed: int) -> list[str]:
    pairs = [tpl.format(t=t) for t in TOPICS for tpl in TEMPLATES]
    idx = np.random.default_rng(seed).permutation(len(pairs))[:n]
    return [pairs[i] for i in sorted(idx)]


def distill(llm: LLM, out: Path, n_train: int, max_tokens: int, seed: int
            ) -> tuple[list[D.Example], list[D.Example], dict]:
    """Stage 1, cached in ``distill.npz``: ``(train, held-out)`` examples."""
    f = out / "distill.npz"
    if f.is_file():
        z = np.load(f)
        exs = [D.Example(z["tokens"][a:b], np.arange(b - a) >= p)
               for a, b, p in zip(z["starts"], z["ends"], z["prompt_len"])]
        n = int(z["n_train"])
        log(f"distilled data from {f}: {n} train / {len(exs) - n} held-out sequences")
        return exs[:n], exs[n:], json.loads(str(z["info"]))
    prompts = train_prompts(n_train, seed) + HELD_OUT
    t = time.perf_counter()
    exs = DH.distill_examples(llm, [("chat", [{"role": "user", "content": p}]) for p in prompts],
                              max_tokens)
    dt = time.perf_counter() - t
    gen = sum(int(e.mask.sum()) for e in exs)
    info = {"prompts": len(prompts), "generated_tokens": gen, "seconds": dt,
            "tokens_per_s": gen / dt, "max_tokens": max_tokens}
    log(f"generated {gen} tokens for {len(prompts)} prompts in {dt:.0f} s ({gen / dt:.0f} tok/s)")
    lens = np.array([len(e) for e in exs])
    ends = np.cumsum(lens)
    np.savez(f, tokens=np.concatenate([e.tokens for e in exs]), starts=ends - lens, ends=ends,
             prompt_len=np.array([int((~e.mask).sum()) for e in exs]), n_train=n_train,
             info=json.dumps(info))
    return exs[:n_train], exs[n_train:], info


def features(llm: LLM, out: Path, train_ex, held_ex, seq_len: int
             ) -> tuple[DH.DistillData, DH.DistillData, float]:
    """Stage 2, cached in ``features.npz`` (float32 hidden states: ~150 MB, not in git)."""
    f = out / "features.npz"
    fields = [x.name for x in dataclasses.fields(DH.DistillData)]
    if f.is_file():
        z = np.load(f)
        sets = [DH.DistillData(*(z[f"{s}_{k}"] for k in fields)) for s in ("train", "held")]
        log(f"target features from {f}")
        return sets[0], sets[1], float(z["seconds"])
    t = time.perf_counter()
    train = DH.target_features(llm.params, llm.config, train_ex, seq_len)
    held = DH.target_features(llm.params, llm.config, held_ex, seq_len)
    dt = time.perf_counter() - t
    np.savez(f, seconds=dt, **{f"{s}_{k}": getattr(d, k) for s, d in (("train", train),
                                                                      ("held", held))
                               for k in fields})
    return train, held, dt


@functools.partial(jax.jit, static_argnames=("hcfg", "k"))
def _propose(hp, tp, hidden, last, *, hcfg, k):
    return H.propose(hp, tp, hcfg, hidden, last, k)[0]


def acceptance(hcfg: H.HeadsConfig, params, target_params, data: DH.DistillData, k: int,
               batch: int = 256) -> dict:
    """Greedy acceptance of ``propose``'s drafts at every start position of ``data``:
    ``accept_j`` = share of proposals whose drafts ``1..j`` all equal the target's tokens
    (positions whose ``j``-th label lies past the text are left out of ``accept_j``)."""
    starts = data.starts()
    hp = jax.device_put(params)
    ok_sum, counts = np.zeros(k), np.zeros(k)
    for a in range(0, len(starts), batch):
        part = starts[a:a + batch]
        n = len(part)
        b = DH.gather(data, np.concatenate([part, np.repeat(part[:1], batch - n, 0)]), k, False)
        drafts = np.asarray(_propose(hp, target_params, jnp.asarray(b["hidden"]),
                                     jnp.asarray(b["tokens"][:, 0]), hcfg=hcfg, k=k))[:n]
        w = b["weights"][:n] > 0
        hit = np.cumprod(drafts == b["tokens"][:n, 1:], axis=1).astype(bool)
        ok_sum += (hit & w).sum(0)
        counts += w.sum(0)
    acc = ok_sum / np.maximum(counts, 1)
    return {"proposals": int(counts[0]), **{f"accept_{j + 1}": float(acc[j]) for j in range(k)},
            "mean_accepted_drafts": float(ok_sum.sum() / max(counts[0], 1))}


def train_method(method: str, args, llm: LLM, train: DH.DistillData, held: DH.DistillData
                 ) -> dict:
    out = Path(args.out) / method
    hcfg = H.HeadsConfig(method, args.num_heads, llm.config, "SmolLM2-135M-Instruct")
    base = dict(batch_size=args.batch_size, lr=args.lr, seed=args.seed, log_every=args.log_every,
                feature_weight=args.feature_weight, compute_dtype=args.dtype)
    _, hist = DH.train_heads(hcfg, llm.params, train,
                             DH.HeadsTrainConfig(**{**base, "steps": 4, "log_every": 1}),
                             log=lambda s: None)
    step_s = float(np.median([h["step_s"] for h in hist[1:]]))
    steps = max(10, int(args.minutes * 60 / step_s))
    log(f"{method}: {step_s:.2f} s/step measured -> {steps} steps for {args.minutes} min")
    tc = DH.HeadsTrainConfig(steps=steps, **base)  # held-out eval at the end only
    writer = MetricsWriter(out / "metrics.jsonl")
    t = time.perf_counter()
    params, hist = DH.train_heads(hcfg, llm.params, train, tc, held, writer, log)
    train_s = time.perf_counter() - t
    writer.close()
    losses = [h for h in hist if "loss" in h]
    summary = {"method": method, "num_heads": args.num_heads, "steps": steps,
               "positions_per_step": args.batch_size, "train_seconds": train_s,
               "step_seconds": step_s, "loss_curve": [(h["step"], round(h["loss"], 4))
                                                      for h in losses],
               "eval": [h for h in hist if "eval_mean_accepted" in h][-1]}
    H.save_heads(out, hcfg, params, extra={k: v for k, v in summary.items() if k != "loss_curve"})
    t = time.perf_counter()
    summary["acceptance"] = acceptance(hcfg, params, llm.params, held, args.num_heads)
    log(f"{method}: acceptance via propose ({time.perf_counter() - t:.0f} s): "
        + json.dumps(summary["acceptance"]))
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    summary["dir_bytes"] = size
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/draft_heads")
    ap.add_argument("--methods", nargs="+", default=["medusa", "eagle"], choices=H.METHODS)
    ap.add_argument("--num-heads", type=int, default=4)
    ap.add_argument("--train-prompts", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens generated per prompt")
    ap.add_argument("--seq-len", type=int, default=256, help="packed row length (features)")
    ap.add_argument("--minutes", type=float, default=10.0, help="training budget per method")
    ap.add_argument("--batch-size", type=int, default=1024, help="start positions per step")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--feature-weight", type=float, default=1.0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--distill-only", action="store_true", help="stop after stage 1")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    llm = LLM(max_model_len=1024, num_pages=1024, max_num_seqs=64)
    train_ex, held_ex, info = distill(llm, out, args.train_prompts, args.max_tokens, args.seed)
    if args.distill_only:
        return 0
    train, held, feat_s = features(llm, out, train_ex, held_ex, args.seq_len)
    log(f"target features: {train.hidden.shape[0]} + {held.hidden.shape[0]} rows of "
        f"{args.seq_len} in {feat_s:.0f} s; {len(train.starts())} train / "
        f"{len(held.starts())} held-out start positions")
    report = {"distill": info, "feature_seconds": feat_s, "train_starts": len(train.starts()),
              "held_out_starts": len(held.starts()), "held_out_prompts": len(HELD_OUT),
              "device": jax.devices()[0].device_kind, "methods": {}}
    for method in args.methods:
        report["methods"][method] = train_method(method, args, llm, train, held)
        (out / "acceptance.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"report written to {out / 'acceptance.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
