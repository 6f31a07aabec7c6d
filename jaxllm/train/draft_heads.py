"""Training Medusa / EAGLE draft heads by self-distillation (``jaxllm finetune --draft-heads``).

Data.  The heads must predict what the *target* will emit, so the training text is the
target's own output: each prompt (a chat record's conversation up to its last user
turn, or a text record used as a raw prompt) is continued greedily with
``LLM.generate``; only generated tokens are labels.  With ``max_tokens=0`` a
dataset's own tokens are used instead (weaker: the target would not have written
them).  The sequences are packed into rows (``jaxllm.train.data.pack``) and one
no-cache forward of the target records its final hidden state ``f_t`` at every
position (:class:`DistillData`).

Examples.  One training example is a start position ``t``: the head input ``f_t``, the
tokens ``x_{t+1} .. x_{t+K+1}`` and, for EAGLE, the target features
``f_{t+1} .. f_{t+K}`` (:func:`gather`).  Head ``j`` (``j = 1..K``) is trained against
``x_{t+1+j}``; a label counts only if it is a generated token of the same packed
sequence.  Positions are drawn at random from the whole set each step, so there is no
padding in a batch and consecutive positions of one text do not share a batch.

Loss.  Medusa: the mean over heads of each head's cross-entropy.  EAGLE: the chain of
:func:`jaxllm.spec.heads.eagle_step` runs ``K`` steps, each fed its own previous output
feature (as at inference) and the target's true token (teacher forcing only matters
after a wrong draft, where speculation stops anyway); loss = mean over steps of
cross-entropy + ``feature_weight`` x smooth-L1 between the step's feature and the
target's.  The target's embedding and LM head are frozen; the step reuses
``jaxllm.train.step``'s schedule, AdamW-with-clipping and ``TrainState``.

Metrics per head ``j``: ``acc_j`` (top-1 == the target's token) and ``accept_j``
(heads ``1..j`` all right: the fraction of proposals whose first ``j`` drafts a greedy
verifier accepts), so ``sum_j accept_j`` is the mean accepted length with ``k = K``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxllm.config import ModelConfig
from jaxllm.models import llama
from jaxllm.sampling import SamplingParams, argmax
from jaxllm.spec import heads as H
from jaxllm.train import data as D
from jaxllm.train import step as S
from jaxllm.train.metrics import MetricsWriter

__all__ = ["DistillData", "HeadsTrainConfig", "distill_examples", "text_examples",
           "target_features", "gather", "heads_loss", "train_heads", "evaluate",
           "run_draft_heads"]


# --------------------------------------------------------------------------- data


def prompts_from_records(paths: Sequence[str]) -> list[tuple[str, Any]]:
    """JSONL records -> prompts: ``("chat", messages up to the last user turn)`` or
    ``("text", str)`` (a raw prompt the target continues)."""
    out = []
    for path in paths:
        for where, rec in D.read_jsonl(path):
            kind, value = D.record_to_messages(rec, where)
            if kind == "chat":
                last_user = max((i for i, m in enumerate(value) if m["role"] == "user"),
                                default=None)
                if last_user is None:
                    raise D.DataError(f"{where}: no user message to prompt the target with")
                value = value[:last_user + 1]
            out.append((kind, value))
    if not out:
        raise D.DataError(f"{', '.join(map(str, paths))}: no prompts")
    return out


def distill_examples(llm: Any, prompts: Sequence[tuple[str, Any]], max_tokens: int
                     ) -> list[D.Example]:
    """The target's greedy continuation of each prompt, as ``Example(tokens, mask)`` with
    the mask on generated tokens.  A prompt is ``("chat", messages)`` (rendered with the
    chat template), ``("text", str)`` (encoded as is) or ``("ids", token ids)``.

    ``llm`` is a ``jaxllm.LLM`` (passed in by the caller: training does not import the
    engine); its ``generate`` runs every prompt through the paged engine in one call.
    """
    ids = [_prompt_ids(llm, kind, v) for kind, v in prompts]
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    outs = llm.generate(ids, sp)
    examples = []
    for i, (p, o) in enumerate(zip(ids, outs)):
        gen = list(o.outputs[0].token_ids)
        tokens = np.asarray(list(p) + gen, np.int32)
        mask = np.arange(len(tokens)) >= len(p)
        examples.append(D.Example(tokens, mask, f"prompt {i}"))
    return examples


def _prompt_ids(llm: Any, kind: str, value: Any) -> list[int]:
    if kind == "chat":
        return llm.apply_chat_template(value)
    if kind == "text":
        return llm.tokenizer.encode(value, add_special_tokens=True)
    if kind == "ids":
        return [int(t) for t in value]
    raise ValueError(f"prompt kind must be chat, text or ids, got {kind!r}")


def text_examples(paths: Sequence[str], tokenizer, max_len: int) -> list[D.Example]:
    """A dataset's own tokens as examples (assistant turns / all text are labels)."""
    return D.load_examples(paths, tokenizer, max_len=max_len)


@dataclasses.dataclass
class DistillData:
    """Packed rows of target text with the target's hidden states (host numpy).

    ``inputs, targets [R, T]`` int32 (``targets[t] = x_{t+1}``), ``weights [R, T]``
    (1 where ``targets`` is a label token), ``segment_ids [R, T]`` (0 = padding) as
    :func:`jaxllm.train.data.pack` makes them; ``hidden [R, T, D]`` float32 is the
    target's final hidden state at each input position.
    """
    inputs: np.ndarray
    targets: np.ndarray
    weights: np.ndarray
    segment_ids: np.ndarray
    hidden: np.ndarray

    def starts(self) -> np.ndarray:
        """``[S, 2]`` (row, col) of every start position whose first head has a label."""
        ok = np.zeros(self.inputs.shape, bool)
        ok[:, :-1] = ((self.weights[:, 1:] > 0) & (self.segment_ids[:, 1:] > 0)
                      & (self.segment_ids[:, 1:] == self.segment_ids[:, :-1]))
        return np.argwhere(ok).astype(np.int32)

    @property
    def num_labels(self) -> int:
        return int((self.weights > 0).sum())


def target_features(params: Any, cfg: ModelConfig, examples: Sequence[D.Example],
                    seq_len: int, batch_rows: int = 8) -> DistillData:
    """Pack ``examples`` into ``seq_len`` rows and record the target's hidden states with
    one no-cache forward per ``batch_rows`` rows (one compiled shape)."""
    rows = D.pack(examples, seq_len, packing=True)
    n = len(rows["inputs"])
    fwd = jax.jit(functools.partial(_hidden_states, cfg=cfg))
    out = np.zeros((n, seq_len, cfg.hidden_size), np.float32)
    for a in range(0, n, batch_rows):
        part = {k: v[a:a + batch_rows] for k, v in rows.items()}
        m = len(part["inputs"])
        if m < batch_rows:  # pad the last batch: keep one compiled shape
            part = {k: np.concatenate([v, np.zeros((batch_rows - m, seq_len), v.dtype)])
                    for k, v in part.items()}
        h = fwd(params, part["inputs"], part["positions"], part["segment_ids"])
        out[a:a + m] = np.asarray(h[:m], np.float32)
    return DistillData(rows["inputs"], rows["targets"], rows["weights"], rows["segment_ids"], out)


def _hidden_states(params, tokens, positions, segment_ids, *, cfg):
    # segment ids 0 (padding) attend among themselves only: harmless, never a label
    attend = llama.full_attention_fn(cfg, segment_ids, "xla")
    return llama.forward(params, cfg, tokens, positions, attend)[0].astype(jnp.float32)


def gather(data: DistillData, starts: np.ndarray, k: int, future: bool) -> dict[str, np.ndarray]:
    """Training examples at ``starts [M, 2]`` (row, col ``t``) for ``k`` heads:

    ``hidden [M, D]`` = ``f_t``; ``tokens [M, k+1]`` = ``x_{t+1} .. x_{t+k+1}``;
    ``weights [M, k]``: head ``j``'s label ``x_{t+1+j}`` exists, is a label token and
    lies in ``t``'s sequence; with ``future``, ``future [M, k, D]`` = ``f_{t+1} .. f_{t+k}``.
    """
    r, t = starts[:, 0], starts[:, 1]
    T = data.inputs.shape[1]
    cols = t[:, None] + np.arange(k + 1)[None, :]            # targets[t + i] = x_{t+1+i}
    inside = cols < T
    c = np.minimum(cols, T - 1)
    same = data.segment_ids[r[:, None], c] == data.segment_ids[r, t][:, None]
    w = (data.weights[r[:, None], c] > 0) & same & inside
    batch = {"hidden": data.hidden[r, t], "tokens": data.targets[r[:, None], c],
             "weights": w[:, 1:].astype(np.float32)}
    if future:
        batch["future"] = data.hidden[r[:, None], c[:, 1:]]
    return batch


# --------------------------------------------------------------------------- loss


def _nll_hits(hcfg: H.HeadsConfig, frozen: Any, states: jax.Array, labels: jax.Array,
              w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(sum of w * NLL, top-1 == label [M] bool)`` of the LM head on ``states [M, D]``."""
    logits = H.head_logits(frozen, hcfg, states)
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
    return jnp.sum((lse - tgt) * w), argmax(logits) == labels


def _smooth_l1(x: jax.Array) -> jax.Array:
    a = jnp.abs(x)
    return jnp.where(a < 1.0, 0.5 * x * x, a - 0.5)


def heads_loss(head_params: Any, frozen: Any, hcfg: H.HeadsConfig, batch: dict,
               feature_weight: float = 1.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``(loss, per-head sums)`` of one batch (see the module docstring).

    The sums are ``[K]`` arrays: ``nll``, ``hits`` (top-1 right), ``accept`` (heads
    ``1..j`` all right), ``count`` (labels) and, for EAGLE, ``feature`` (smooth-L1 sum).
    """
    dt = frozen["embed"].dtype
    hidden = batch["hidden"].astype(dt)
    tokens, w = batch["tokens"], batch["weights"]
    # [M, V] float32 logits per head stay alive for the backward pass (M x V x 4 bytes
    # each); recomputing them instead would add a third LM-head matmul per head
    nll_fn = functools.partial(_nll_hits, hcfg)
    k = hcfg.num_heads
    if hcfg.method == "medusa":
        states = H.medusa_hidden(head_params, hidden)
        steps = [nll_fn(frozen, states[:, j], tokens[:, j + 1], w[:, j]) for j in range(k)]
        feats = None
    else:
        steps, feats, feature, cache = [], [], hidden, None
        for j in range(k):
            feature, cache = H.eagle_step(head_params, frozen, hcfg, feature, tokens[:, j],
                                          cache, j)
            steps.append(nll_fn(frozen, feature, tokens[:, j + 1], w[:, j]))
            err = _smooth_l1(feature.astype(jnp.float32) - batch["future"][:, j])
            feats.append(jnp.sum(jnp.mean(err, axis=-1) * w[:, j]))
    nll = jnp.stack([s[0] for s in steps])
    hit = jnp.stack([s[1] for s in steps], axis=1) & (w > 0)       # [M, K]
    count = jnp.sum(w, axis=0)
    accept = jnp.cumprod(hit.astype(jnp.float32), axis=1) * w
    denom = jnp.maximum(count, 1.0)
    loss = jnp.mean(nll / denom)
    aux = {"nll": nll, "hits": jnp.sum(hit, axis=0).astype(jnp.float32),
           "accept": jnp.sum(accept, axis=0), "count": count}
    if feats is not None:
        aux["feature"] = jnp.stack(feats)
        loss = loss + feature_weight * jnp.mean(aux["feature"] / denom)
    return loss, aux


# --------------------------------------------------------------------------- step and loop


@dataclasses.dataclass
class HeadsTrainConfig:
    """Optimisation settings of a heads run (``jaxllm finetune`` flags map onto it)."""
    steps: int = 500
    batch_size: int = 1024          # start positions per step
    lr: float = 1e-3
    warmup_steps: int | None = None  # default: 5% of steps
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    feature_weight: float = 1.0     # EAGLE: weight of the feature regression
    compute_dtype: str = "float32"  # the frozen LM head / embedding and the head math
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0             # 0: evaluate at the end only

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"draft heads: steps and batch size must be >= 1, "
                             f"got {self.steps}, {self.batch_size}")
        if self.compute_dtype not in S.DTYPES:
            raise ValueError(f"compute dtype must be one of {sorted(S.DTYPES)}, "
                             f"got {self.compute_dtype!r}")


def _train_step(state: S.TrainState, frozen: Any, batch: dict, *, hcfg: H.HeadsConfig,
                tx: optax.GradientTransformation, schedule: optax.Schedule,
                feature_weight: float) -> tuple[S.TrainState, dict]:
    """One AdamW step on the heads; the target's embedding / LM head stay frozen."""
    grad_fn = jax.value_and_grad(heads_loss, has_aux=True)
    (loss, aux), grads = grad_fn(state.params, frozen, hcfg, batch, feature_weight)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
               "lr": schedule(state.step), **aux}
    return S.TrainState(state.step + 1, params, opt_state, state.rng), metrics


def frozen_params(target_params: Any, dtype: Any = jnp.float32) -> dict:
    """The part of the target the heads use: embedding and (untied) LM head."""
    keep = {k: target_params[k] for k in ("embed", "lm_head") if k in target_params}
    return jax.device_put(jax.tree.map(lambda x: jnp.asarray(x, dtype), keep))


def summarize(sums: dict[str, np.ndarray], prefix: str = "") -> dict[str, float]:
    """Per-head sums -> scalars ``{prefix}nll_j, acc_j, accept_j[, feature_j]`` (j from 1)
    plus ``{prefix}mean_accepted`` (expected accepted drafts per greedy proposal of K)."""
    count = np.maximum(np.asarray(sums["count"], np.float64), 1.0)
    out: dict[str, float] = {}
    names = {"nll": "nll", "hits": "acc", "accept": "accept", "feature": "feature"}
    for key, name in names.items():
        if key in sums:
            for j, v in enumerate(np.asarray(sums[key], np.float64) / count, 1):
                out[f"{prefix}{name}_{j}"] = float(v)
    first = max(float(sums["count"][0]), 1.0)  # proposals: starts with a first label
    out[f"{prefix}mean_accepted"] = float(np.sum(sums["accept"]) / first)
    return out


def evaluate(head_params: Any, frozen: Any, hcfg: H.HeadsConfig, data: DistillData,
             batch_size: int = 1024, feature_weight: float = 1.0) -> dict[str, float]:
    """Per-head NLL, top-1 accuracy and greedy acceptance over every start position of
    ``data`` (fixed batch shape; the last batch padded with zero-weight examples)."""
    starts = data.starts()
    if not len(starts):
        raise ValueError("evaluate: the data has no start position with a label")
    fn = _eval_fn(hcfg, feature_weight)
    total: dict[str, np.ndarray] = {}
    for a in range(0, len(starts), batch_size):
        part = starts[a:a + batch_size]
        n = len(part)
        batch = gather(data, np.concatenate([part, np.repeat(part[:1], batch_size - n, 0)]),
                       hcfg.num_heads, hcfg.method == "eagle")
        batch["weights"][n:] = 0.0
        _, sums = fn(head_params, frozen, batch=batch)
        for k, v in jax.device_get(sums).items():
            total[k] = total.get(k, 0.0) + np.asarray(v, np.float64)
    return summarize(total, "eval_")


@functools.lru_cache(maxsize=8)
def _eval_fn(hcfg: H.HeadsConfig, feature_weight: float) -> Callable:
    return jax.jit(functools.partial(heads_loss, hcfg=hcfg, feature_weight=feature_weight))


def train_heads(hcfg: H.HeadsConfig, target_params: Any, train: DistillData,
                tc: HeadsTrainConfig, eval_data: DistillData | None = None,
                writer: MetricsWriter | None = None, log: Callable[[str], None] | None = None,
                init: Any = None) -> tuple[Any, list[dict]]:
    """Train heads on ``train``; returns ``(host float32 params, history rows)``.

    Each step draws ``tc.batch_size`` start positions at random (seeded).  A row of
    metrics is logged every ``tc.log_every`` steps (the first includes compilation),
    evaluation runs every ``tc.eval_every`` steps and at the end when ``eval_data`` is
    given.  ``init``: starting head params (default :func:`jaxllm.spec.heads.init_heads`).
    """
    log = log or (lambda s: print(f"[jaxllm] {s}", file=sys.stderr))
    starts = train.starts()
    if not len(starts):
        raise ValueError("draft heads: the training data has no position with a label")
    warmup = tc.warmup_steps if tc.warmup_steps is not None else int(0.05 * tc.steps)
    schedule = S.make_schedule(tc.lr, tc.steps, warmup, tc.min_lr_ratio, tc.schedule)
    tx = S.make_optimizer(schedule, weight_decay=tc.weight_decay, clip_norm=tc.clip_norm)
    params = init if init is not None else H.init_heads(hcfg, jax.random.PRNGKey(tc.seed))
    state = S.init_state(params, tx, tc.seed)
    frozen = frozen_params(target_params, S.DTYPES[tc.compute_dtype])
    step = jax.jit(functools.partial(_train_step, hcfg=hcfg, tx=tx, schedule=schedule,
                                     feature_weight=tc.feature_weight), donate_argnums=(0,))
    rng = np.random.default_rng([tc.seed, 0xD4AF7])
    eagle = hcfg.method == "eagle"
    history: list[dict] = []
    t0 = t_last = time.perf_counter()
    i_last = 0
    for i in range(1, tc.steps + 1):
        batch = gather(train, starts[rng.integers(0, len(starts), tc.batch_size)],
                       hcfg.num_heads, eagle)
        state, m = step(state, frozen, batch)
        if i == 1 or i % tc.log_every == 0 or i == tc.steps:
            m = jax.device_get(m)
            now = time.perf_counter()
            row = {"step": i, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
                   "lr": float(m["lr"]), "elapsed_s": now - t0,
                   **summarize({k: m[k] for k in ("nll", "hits", "accept", "count",
                                                  *(("feature",) if eagle else ()))})}
            row["step_s"] = (now - t_last) / (i - i_last)  # step 1 includes compilation
            t_last, i_last = now, i
            history.append(row)
            if writer:
                writer.write(i, row)
            log(f"step {i}/{tc.steps}: loss {row['loss']:.4f}, acc "
                + " ".join(f"{row[f'acc_{j}']:.2f}" for j in range(1, hcfg.num_heads + 1))
                + f", {row['step_s']:.2f} s/step")
        if eval_data is not None and ((tc.eval_every and i % tc.eval_every == 0)
                                      or i == tc.steps):
            ev = evaluate(state.params, frozen, hcfg, eval_data, tc.batch_size,
                          tc.feature_weight)
            history.append({"step": i, **ev})
            if writer:
                writer.write(i, ev, kind="eval")
            log(f"step {i}: eval acceptance "
                + " ".join(f"{ev[f'eval_accept_{j}']:.3f}" for j in range(1, hcfg.num_heads + 1))
                + f", mean accepted {ev['eval_mean_accepted']:.2f}")
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), jax.device_get(state.params))
    return params, history


# --------------------------------------------------------------------------- command


def run_draft_heads(args: argparse.Namespace, llm: Any) -> int:
    """``jaxllm finetune --draft-heads medusa|eagle``: distil, train, save to ``--output``.

    ``llm`` is the target as a ``jaxllm.LLM`` (built by the CLI from ``--model``).
    """
    if args.lora:
        raise ValueError("--draft-heads trains heads on a frozen target; drop --lora")
    for f in list(args.data) + list(args.eval_data or []):
        if not Path(f).is_file():
            raise FileNotFoundError(f"dataset not found: {f}")
    hcfg = H.HeadsConfig(args.draft_heads, args.num_heads, llm.config, str(llm.model_path))
    tc = HeadsTrainConfig(
        steps=args.steps or 500, batch_size=args.batch_size * args.seq_len,
        lr=args.lr if args.lr is not None else 1e-3, warmup_steps=args.warmup_steps,
        min_lr_ratio=args.min_lr_ratio, schedule=args.lr_schedule,
        weight_decay=args.weight_decay, clip_norm=args.max_grad_norm,
        feature_weight=args.feature_weight, compute_dtype=args.dtype, seed=args.seed,
        log_every=args.log_every, eval_every=args.eval_every)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train_ex, eval_ex = _heads_examples(args, llm)
    t_data = time.perf_counter() - t0
    train = target_features(llm.params, llm.config, train_ex, args.seq_len)
    evald = target_features(llm.params, llm.config, eval_ex, args.seq_len) if eval_ex else None
    t_feat = time.perf_counter() - t0 - t_data
    _log(f"{len(train_ex)} train / {len(eval_ex)} eval sequences, {train.num_labels} label "
         f"tokens; text {t_data:.1f} s, target features {t_feat:.1f} s")
    writer = MetricsWriter(args.metrics_file or out / "metrics.jsonl")
    t1 = time.perf_counter()
    try:
        params, hist = train_heads(hcfg, llm.params, train, tc, evald, writer, _log)
    finally:
        writer.close()
    train_s = time.perf_counter() - t1
    evals = [h for h in hist if "eval_mean_accepted" in h]
    summary = {"method": hcfg.method, "num_heads": hcfg.num_heads, "steps": tc.steps,
               "train_seconds": train_s, "data_seconds": t_data + t_feat,
               "first_loss": hist[0]["loss"], "final_loss": [h for h in hist if "loss" in h][-1]["loss"],
               **(evals[-1] if evals else {})}
    save_heads_dir = H.save_heads(out, hcfg, params, extra={
        "train": dataclasses.asdict(tc), "data": list(map(str, args.data)),
        "distill_max_tokens": args.distill_max_tokens, **summary})
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _log(f"{hcfg.method} heads written to {save_heads_dir}; load with speculative_config="
         f"{{'method': '{hcfg.method}', 'model': '{save_heads_dir}'}}")
    return 0


def _heads_examples(args: argparse.Namespace, llm: Any) -> tuple[list, list]:
    """``(train, eval)`` examples: self-distilled continuations of the records' prompts, or
    the records' own tokens with ``--distill-max-tokens 0``."""
    max_len = args.seq_len + 1
    if args.distill_max_tokens <= 0:
        train = text_examples(args.data, llm.tokenizer, max_len)
        held = text_examples(args.eval_data, llm.tokenizer, max_len) if args.eval_data else []
        if not args.eval_data:
            train, held = D.split_examples(train, args.eval_fraction, args.seed)
        return train, held
    prompts = prompts_from_records(args.data)
    if args.eval_data:
        held_prompts = prompts_from_records(args.eval_data)
    else:
        idx = np.random.default_rng([args.seed, 0x5EED]).permutation(len(prompts))
        n_eval = int(round(len(prompts) * args.eval_fraction)) if args.eval_fraction > 0 else 0
        held_prompts = [prompts[i] for i in idx[:n_eval]]
        prompts = [prompts[i] for i in idx[n_eval:]]
    examples = distill_examples(llm, prompts + held_prompts, args.distill_max_tokens)
    cut = [e if len(e) <= max_len else D.Example(e.tokens[:max_len], e.mask[:max_len], e.source)
           for e in examples]
    return cut[:len(prompts)], cut[len(prompts):]


def _log(msg: str) -> None:
    print(f"[jaxllm] {msg}", file=sys.stderr)
