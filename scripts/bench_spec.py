"""Speculative decoding vs plain decoding in the engine, in the same run, interleaved.

Workload: the default model (SmolLM2-135M-Instruct), float32, greedy, chat-templated
prompts of two kinds:

  (a) input-grounded: a given passage to rewrite / correct / summarise / copy with an
      edit (the output re-uses spans of the prompt: prompt lookup's case);
  (b) open chat: questions and writing tasks with nothing to copy from.

For batch 1 and batch 8 (``--batches``) and each method (``--spec``, one vLLM
``speculative_config`` JSON each; default: n-gram prompt lookup), the same prompts run on
a plain engine and on a speculative one (same weights, same engine arguments), alternating
plain / speculative ``--repeat`` times after a warm-up run that compiles.  Reported: the
speedup (median plain time / median speculative time for the whole batch), output
tokens/s, the acceptance rate and the mean accepted length (tokens per verify, the
target's own token included).  The speculative outputs must equal the plain ones token
for token (asserted: greedy float32).  Then at batch 32 (``--large-batch``) the mixed
prompts run once more per method: the load-aware switch must keep every method within
3% of plain decoding (reported as PASS / FAIL).

Rows go to the results file through ``jaxllm.bench`` (benchmark "spec").

    python scripts/bench_spec.py                       # n-gram, batch 1 and 8, then 32
    python scripts/bench_spec.py --repeat 1 --new-tokens 64 --large-batch 0   # quick
    python scripts/bench_spec.py --spec '{"method": "ngram", "num_speculative_tokens": 6}'
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from jaxllm import LLM, SamplingParams  # noqa: E402
from jaxllm.bench import Bench  # noqa: E402
from jaxllm.engine.engine import LLMEngine  # noqa: E402
from jaxllm.spec.config import SpeculativeConfig  # noqa: E402

PASSAGES = [
    "The lighthouse at Pointe Noire was built in 1884 from granite quarried on the island "
    "itself. Its lamp, first fuelled by whale oil and later by kerosene, was electrified in "
    "1931. Three keepers lived there in rotation until 1979, when the light was automated. "
    "Today the tower is a museum, and visitors can climb its 212 steps to the gallery.",
    "To repot a houseplant, water it the day before so the root ball holds together. Choose "
    "a pot one size larger with a drainage hole, add a layer of fresh compost, then ease the "
    "plant out by tipping the old pot sideways. Loosen circling roots gently, set the plant "
    "at the same depth as before, fill around it with compost and water thoroughly.",
    "Our quarterly report shows revenue of 4.2 million euros, up 12 percent on the same "
    "quarter last year. Costs rose 7 percent, mainly from the new warehouse in Lyon. The "
    "online shop now makes up 38 percent of sales. We expect the warehouse to reduce "
    "delivery times from five days to two by the end of the year.",
    "Honey bees communicate the location of flowers through the waggle dance. A forager "
    "returning to the hive runs in a straight line while waggling its body, then circles "
    "back and repeats. The angle of the run relative to vertical shows the direction of "
    "the food relative to the sun, and the length of the waggle shows the distance.",
]
TASKS = [
    "Rewrite the following passage in plain, simple English, keeping every fact:\n\n{}",
    "Fix any spelling or grammar mistakes in this text and return the full corrected "
    "text:\n\n{}",
    "Summarise this passage in three sentences:\n\n{}",
    "Copy this passage exactly, but write every number in words:\n\n{}",
]
CHAT = [
    "Write a short story about a robot who learns to paint.",
    "What are the main differences between a virus and a bacterium?",
    "Give me five ideas for a birthday party for a ten-year-old.",
    "Explain how a bicycle stays upright when it is moving.",
    "Write a poem about the sea at night.",
    "How do I make a good cup of tea?",
    "What should I pack for a week of hiking in the mountains?",
    "Describe the life cycle of a star.",
]


def prompts(kind: str, n: int) -> list[list[dict[str, str]]]:
    """``n`` conversations of ``kind`` ("grounded" or "chat"), cycling through the sets."""
    if kind == "grounded":
        texts = [TASKS[i % len(TASKS)].format(PASSAGES[(i // len(TASKS) + i) % len(PASSAGES)])
                 for i in range(n)]
    else:
        texts = [CHAT[i % len(CHAT)] for i in range(n)]
    return [[{"role": "user", "content": t}] for t in texts]


def timed(engine: LLMEngine, ids: list[list[int]], sp: SamplingParams):
    """``(seconds, outputs)`` of one batch run to completion."""
    t0 = time.perf_counter()
    outs = engine.generate(ids, sp)
    return time.perf_counter() - t0, outs


def compare(plain: LLMEngine, spec: LLMEngine, ids, sp, repeat: int) -> dict:
    """Warm both engines (twice: the second run hits the prefix cache, which is what the
    timed runs see, and compiles those prefill shapes), then alternate plain /
    speculative ``repeat`` times; assert equal outputs; return times, tokens and the
    speculative counters of the timed runs."""
    for _ in range(2):
        _, want = timed(plain, ids, sp)
        _, got = timed(spec, ids, sp)
    tokens = [o.outputs[0].token_ids for o in want]
    assert [o.outputs[0].token_ids for o in got] == tokens, "speculative output differs"
    st = next(iter(spec.stats.spec.values()))
    before = dataclasses.replace(st)
    t_plain, t_spec = [], []
    for _ in range(repeat):
        t, _ = timed(plain, ids, sp)
        t_plain.append(t)
        t, got = timed(spec, ids, sp)
        t_spec.append(t)
        assert [o.outputs[0].token_ids for o in got] == tokens, "speculative output differs"
    delta = {f.name: getattr(st, f.name) - getattr(before, f.name)
             for f in dataclasses.fields(st)}
    drafted, accepted, verifies = (delta["drafted_tokens"], delta["accepted_tokens"],
                                   delta["verifies"])
    n_tok = sum(len(t) for t in tokens)
    return dict(plain_s=statistics.median(t_plain), spec_s=statistics.median(t_spec),
                tokens=n_tok, acceptance_rate=accepted / drafted if drafted else 0.0,
                mean_accepted_length=delta["emitted_tokens"] / verifies if verifies else 0.0,
                drafted=drafted, accepted=accepted, verifies=verifies,
                disabled_steps=delta["disabled_steps"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--spec", action="append", default=None, metavar="JSON",
                    help="a speculative_config to compare (repeatable; default: n-gram)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--kinds", default="grounded,chat")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--large-batch", type=int, default=32, help="0: skip the switch-off check")
    ap.add_argument("--num-pages", type=int, default=1024)
    args = ap.parse_args()
    specs = [SpeculativeConfig.parse(s) for s in (args.spec or [
        '{"method": "ngram", "num_speculative_tokens": 4}'])]
    batches = [int(b) for b in args.batches.split(",") if b]
    largest = max(batches + [args.large_batch])
    llm = LLM(args.model, dtype="float32", quantization=None, max_model_len=2048,
              num_pages=args.num_pages,
              max_num_seqs=largest)
    base = llm.engine_config

    def engine(spec=None):
        return LLMEngine(llm.params, llm.config, tokenizer=llm.tokenizer,
                         config=dataclasses.replace(base, speculative_config=spec))

    plain = engine()
    sp = SamplingParams(temperature=0.0, max_tokens=args.new_tokens)
    print(f"load average at start: {os.getloadavg()}", flush=True)
    for cfg in specs:
        spec = engine(cfg)
        for kind in args.kinds.split(","):
            for b in batches:
                ids = [llm.apply_chat_template(m) for m in prompts(kind, b)]
                r = compare(plain, spec, ids, sp, args.repeat)
                speedup = r["plain_s"] / r["spec_s"]
                print(f"{cfg.method:10s} k={cfg.num_speculative_tokens} {kind:8s} batch {b:2d}: "
                      f"plain {r['tokens'] / r['plain_s']:6.1f} tok/s, spec "
                      f"{r['tokens'] / r['spec_s']:6.1f} tok/s, speedup {speedup:.2f}x, "
                      f"acceptance {r['acceptance_rate']:.2f}, mean accepted length "
                      f"{r['mean_accepted_length']:.2f}  (load {os.getloadavg()[0]:.1f})",
                      flush=True)
                Bench("spec", workload=dict(method=cfg.method, k=cfg.num_speculative_tokens,
                                            kind=kind, batch=b, new_tokens=args.new_tokens,
                                            dtype="float32", config=dataclasses.asdict(cfg))
                      ).record({**r, "load_avg": os.getloadavg()[0]},
                               baseline="plain engine decoding", ratio=speedup)
        if args.large_batch:
            ids = [llm.apply_chat_template(m) for m in
                   prompts("grounded", args.large_batch // 2)
                   + prompts("chat", args.large_batch - args.large_batch // 2)]
            r = compare(plain, spec, ids, sp, args.repeat)
            slowdown = r["spec_s"] / r["plain_s"]
            verdict = "PASS" if slowdown <= 1.03 else "FAIL"
            print(f"{cfg.method:10s} batch {args.large_batch}: spec / plain time "
                  f"{slowdown:.3f} ({verdict}: within 3%), disabled steps "
                  f"{r['disabled_steps']}, verifies {r['verifies']}", flush=True)
            Bench("spec", workload=dict(method=cfg.method, k=cfg.num_speculative_tokens,
                                        kind="mixed", batch=args.large_batch,
                                        new_tokens=args.new_tokens, dtype="float32",
                                        config=dataclasses.asdict(cfg))
                  ).record({**r, "load_avg": os.getloadavg()[0], "within_3pct": slowdown <= 1.03},
                           baseline="plain engine decoding", ratio=1 / slowdown)
    print(json.dumps({"load_avg_end": os.getloadavg()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
