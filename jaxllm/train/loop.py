"""The fine-tuning loop (``Trainer``) and the ``jaxllm finetune`` command.

``Trainer`` ties the pieces together: a deterministic, prefetched, resumable
``DataLoader``; the jitted, donated step of :mod:`jaxllm.train.step` (optionally
over a data/FSDP/tensor mesh); orbax checkpoints every N steps and at the end;
eval loss/perplexity every N steps; a progress bar with loss, tokens/s, learning
rate and MFU; metrics to JSONL (and TensorBoard when installed); a
``jax.profiler`` trace of chosen steps.

``jaxllm finetune`` (:func:`run_finetune`; flags in :mod:`jaxllm.cli`) loads a model with
``jaxllm.weights.load_model``, trains full-parameter SFT or a LoRA adapter, and
exports: ``OUT/adapter`` (PEFT LoRA directory), ``OUT/merged`` (``--merge``: HF
directory with the adapter folded in) or ``OUT/model`` (full fine-tuning, HF
directory), each loadable by jaxllm and by ``transformers``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.attention import resolve_impl
from jaxllm.compilation import enable_compilation_cache
from jaxllm.generation import StaticBatch
from jaxllm.models import llama
from jaxllm.sampling import SamplingParams
from jaxllm.train import data as D
from jaxllm.train import lora as lora_lib
from jaxllm.train import sharding as shd
from jaxllm.train import step as S
from jaxllm.train.checkpoint import Checkpointer
from jaxllm.train.data import DataLoader, Example, eval_batches
from jaxllm.train.lora import LoraConfig
from jaxllm.train.metrics import MetricsWriter, peak_flops, train_flops_per_token
from jaxllm.weights import load_model
from jaxllm.weights.hf import save_hf

__all__ = ["TrainConfig", "Trainer", "run_finetune"]


@dataclasses.dataclass
class TrainConfig:
    """Everything a run needs besides the model and the data (CLI flags map 1:1)."""
    seq_len: int = 512
    batch_size: int = 8             # rows per optimizer step (all micro-batches, all replicas)
    grad_accum: int = 1
    steps: int | None = None        # default: `epochs` (default 1) worth of rows
    epochs: float | None = None
    lr: float = 2e-4
    warmup_steps: int | None = None  # default: 5% of steps
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float = 1.0
    compute_dtype: str = "float32"
    remat: str = "none"
    attn_impl: str = "auto"
    scan_layers: bool = True        # lax.scan over layers (see docs/finetuning.md)
    loss_chunk: int = 0
    lora: LoraConfig | None = None
    dp: int = 1
    fsdp: int = 1
    tp: int = 1
    seed: int = 0
    packing: bool = True
    shuffle: bool = True
    prefetch: int = 2
    output_dir: str | None = None
    save_every: int = 0
    keep: int = 3
    resume: bool = True
    eval_every: int = 0
    eval_batches: int = 0           # 0: the whole eval split
    log_every: int = 1
    metrics_file: str | None = None  # default OUT/metrics.jsonl
    tensorboard: str | None = None
    profile_steps: tuple[int, ...] = ()
    peak_tflops: float | None = None
    progress: bool = True

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["lora"] = dataclasses.asdict(self.lora) if self.lora else None
        d["profile_steps"] = list(self.profile_steps)
        return d


class Trainer:
    """Train ``params`` of ``cfg`` on tokenized examples.

    ``params``: the model's params pytree (stacked layers, any float dtype; numpy or
    jax).  Full fine-tuning trains all of it; with ``tc.lora`` only a fresh adapter
    is trained and ``params`` stay frozen (kept in the compute dtype).
    """

    def __init__(self, tc: TrainConfig, cfg, params: dict, train_examples: Sequence[Example],
                 eval_examples: Sequence[Example] = ()) -> None:
        self.tc, self.cfg = tc, cfg
        if tc.batch_size % tc.grad_accum:
            raise ValueError(f"--batch-size {tc.batch_size} must be a multiple of "
                             f"--grad-accum {tc.grad_accum}")
        self.micro_rows = tc.batch_size // tc.grad_accum
        n_dev = tc.dp * tc.fsdp * tc.tp
        self.mesh = shd.make_mesh(tc.dp, tc.fsdp, tc.tp) if n_dev > 1 else None
        if self.mesh is not None and self.micro_rows % (tc.dp * tc.fsdp):
            raise ValueError(f"micro-batch of {self.micro_rows} rows (--batch-size / --grad-accum)"
                             f" must split over --dp x --fsdp = {tc.dp * tc.fsdp} replicas")
        self.loader = DataLoader(train_examples, tc.seq_len, tc.batch_size, seed=tc.seed,
                                 shuffle=tc.shuffle, packing=tc.packing, prefetch=tc.prefetch)
        if tc.steps is None:
            epochs = tc.epochs if tc.epochs is not None else 1.0
            self.total_steps = max(1, math.ceil(epochs * self.loader.rows_per_epoch / tc.batch_size))
        else:
            self.total_steps = tc.steps
        warmup = tc.warmup_steps if tc.warmup_steps is not None else int(0.05 * self.total_steps)
        self.schedule = S.make_schedule(tc.lr, self.total_steps, warmup, tc.min_lr_ratio,
                                        tc.schedule)
        self.tx = S.make_optimizer(self.schedule, weight_decay=tc.weight_decay, b1=tc.b1,
                                   b2=tc.b2, eps=tc.eps, clip_norm=tc.clip_norm)
        self.sc = S.StepConfig(cfg, tc.compute_dtype, tc.remat, resolve_impl(tc.attn_impl),
                               tc.scan_layers, tc.lora, tc.loss_chunk)
        dt = S.DTYPES[tc.compute_dtype]
        self._base = None
        if tc.lora is not None:
            self._base = lora_lib.strip(params)  # original precision, for merged exports
            trained = lora_lib.init_lora(cfg, tc.lora, jax.random.PRNGKey(tc.seed + 1))
            frozen = jax.tree.map(lambda x: jnp.asarray(x, dt), lora_lib.strip(params))
            if not tc.scan_layers:  # unrolled: keep the frozen weights per layer (no slicing)
                frozen = llama.unstack_layers(frozen)
            self.num_lora = lora_lib.num_lora_params(cfg, tc.lora)
        else:
            trained, frozen, self.num_lora = params, None, None
        state = S.init_state(trained, self.tx, tc.seed)
        self.eval_data = (eval_batches(eval_examples, tc.seq_len, self.micro_rows, tc.packing)
                          if eval_examples else [])
        if tc.eval_batches:
            self.eval_data = self.eval_data[:tc.eval_batches]
        if self.mesh is not None:
            self.state_sharding = shd.state_shardings(state, self.mesh, self.tx)
            self.frozen_sharding = (shd.param_shardings(frozen, self.mesh)
                                    if frozen is not None else None)
            self.batch_sharding = shd.batch_sharding(self.mesh, accum_axis=True)
            self.eval_sharding = shd.batch_sharding(self.mesh, accum_axis=False)
            state = jax.device_put(state, self.state_sharding)
            if frozen is not None:
                frozen = jax.device_put(frozen, self.frozen_sharding)
        else:
            self.state_sharding = self.frozen_sharding = None
            self.batch_sharding = self.eval_sharding = None
        self.state, self.frozen = state, frozen
        self._train_step, self._eval_step = S.compile_steps(
            self.sc, self.tx, self.schedule, self.state_sharding, self.frozen_sharding,
            self.batch_sharding, self.eval_sharding)
        self.history: list[dict] = []
        self.flops_per_token = None

    # ------------------------------------------------------------------ pieces

    def _put(self, batch: dict, sharding) -> dict:
        return jax.device_put(batch, sharding) if sharding is not None else jax.device_put(batch)

    def train_step(self, batch: dict) -> dict:
        """One optimizer step on a host batch ``{field: [batch_size, T]}``; returns device metrics."""
        b = self._put(S.split_accum(batch, self.tc.grad_accum), self.batch_sharding)
        self.state, metrics = self._train_step(self.state, self.frozen, b)
        return metrics

    def evaluate(self) -> dict[str, float]:
        """Mean token NLL and perplexity over the eval split."""
        tot, n = 0.0, 0.0
        for b in self.eval_data:
            l, c = self._eval_step(self.state.params, self.frozen, self._put(b, self.eval_sharding))
            tot, n = tot + float(l), n + float(c)
        loss = tot / max(n, 1.0)
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": n}

    def checkpointer(self):
        if not self.tc.output_dir:
            return None
        if not hasattr(self, "_ckpt"):
            self._ckpt = Checkpointer(Path(self.tc.output_dir) / "checkpoints", keep=self.tc.keep)
        return self._ckpt

    def save(self, data_state: dict) -> None:
        ck = self.checkpointer()
        if ck is None:
            return
        step = int(self.state.step)
        if step in ck.all_steps():
            return
        meta = {"step": step, "data": data_state, "model": self.cfg.to_hf(),
                "lora": self.tc.lora.to_peft() if self.tc.lora else None,
                "train": self.tc.to_json(), "total_steps": self.total_steps}
        ck.save(step, self.state, meta)

    def restore(self, step: int | None = None) -> dict | None:
        """Load the latest (or given) checkpoint into the trainer; returns its meta or None."""
        ck = self.checkpointer()
        if ck is None or (step is None and ck.latest_step() is None):
            return None
        self.state, meta = ck.restore(step, self.state)
        self.loader.epoch, self.loader.row = int(meta["data"]["epoch"]), int(meta["data"]["row"])
        return meta

    def trained_params(self):
        """Host copy of what was trained: full params (float32) or the adapter."""
        return jax.device_get(self.state.params)

    def merged_params(self, dtype=np.float32) -> dict:
        """Full params after training (adapter merged in), numpy, stacked layers."""
        if self.tc.lora is None:
            return jax.tree.map(lambda x: np.asarray(x, dtype), self.trained_params())
        base = jax.tree.map(lambda x: np.asarray(x, np.float32), jax.device_get(self._base))
        merged = lora_lib.merge(llama.stack_layers(base), self.trained_params(), self.tc.lora)
        return jax.tree.map(lambda x: x.astype(dtype), merged)

    # ------------------------------------------------------------------ loop

    def run(self, stop_at: int | None = None) -> list[dict]:
        """Train from the current (or resumed) step up to ``stop_at`` (default: all steps)."""
        tc = self.tc
        if tc.resume:
            meta = self.restore()
            if meta is not None:
                _log(f"resumed from step {meta['step']} (data epoch {meta['data']['epoch']}, "
                     f"row {meta['data']['row']})")
        start, stop = int(self.state.step), min(stop_at or self.total_steps, self.total_steps)
        metrics_path = tc.metrics_file or (Path(tc.output_dir) / "metrics.jsonl"
                                           if tc.output_dir else None)
        writer = MetricsWriter(metrics_path, tc.tensorboard)
        self.flops_per_token = train_flops_per_token(self.cfg, tc.seq_len, self.num_lora)
        peak, peak_src = (peak_flops(tc.compute_dtype, tc.peak_tflops)
                          if tc.progress or metrics_path or tc.peak_tflops else (None, ""))
        n_dev = self.mesh.size if self.mesh is not None else 1
        pbar = _progress(stop - start, start, tc.progress)
        it = iter(self.loader)
        data_state = self.loader.state()
        prof_dir = Path(tc.output_dir or ".") / "profile"
        prof = sorted(tc.profile_steps)
        profiling = False
        t_last, step_last = None, start
        tokens_since = 0
        t_run = time.perf_counter()
        try:
            for step in range(start, stop):
                batch, data_state = next(it)
                tokens_since += int((batch["segment_ids"] > 0).sum())
                if prof and step == prof[0] and not profiling:
                    jax.profiler.start_trace(str(prof_dir), create_perfetto_trace=True)
                    profiling = True
                with jax.profiler.StepTraceAnnotation("train", step_num=step):
                    m = self.train_step(batch)
                if profiling and step >= prof[-1]:
                    jax.block_until_ready(m)
                    jax.profiler.stop_trace()
                    profiling = False
                    _log(f"profile of steps {prof[0]}..{prof[-1]} written to {prof_dir}")
                done = step + 1
                last = done == stop
                if t_last is None:  # first step: includes compilation; time it separately
                    m = jax.device_get(m)
                    compile_s = time.perf_counter() - t_run
                    t_last, tokens_since, step_last = time.perf_counter(), 0, done
                    row = {k: float(v) for k, v in m.items()}
                    row["first_step_s"] = compile_s
                    writer.write(done, row)
                    self.history.append({"step": done, **row})
                    pbar.set_postfix_str(f"loss {row['loss']:.3f} (compiled)")
                elif done % tc.log_every == 0 or last:
                    m = jax.device_get(m)
                    now = time.perf_counter()
                    dt = now - t_last
                    row = {k: float(v) for k, v in m.items()}
                    tps = tokens_since / dt if dt > 0 else float("nan")
                    row.update(tokens_per_s=tps, step_s=dt / max(done - step_last, 1))
                    if peak:
                        row["mfu"] = tps * self.flops_per_token / (peak * n_dev)
                    t_last, tokens_since, step_last = now, 0, done
                    writer.write(done, row)
                    self.history.append({"step": done, **row})
                    post = (f"loss {row['loss']:.3f} | {tps:,.0f} tok/s | lr {row['lr']:.2e}"
                            + (f" | MFU {row['mfu']:.1%}" if "mfu" in row else ""))
                    pbar.set_postfix_str(post)
                pbar.update(1)
                if self.eval_data and ((tc.eval_every and done % tc.eval_every == 0) or last):
                    t = time.perf_counter()
                    ev = self.evaluate()
                    writer.write(done, ev, kind="eval")
                    self.history.append({"step": done, **ev})
                    pbar.write(f"[jaxllm] step {done}: eval loss {ev['eval_loss']:.4f}, "
                               f"ppl {ev['eval_ppl']:.2f}")
                    t_last += time.perf_counter() - t  # keep eval out of the throughput
                if (tc.save_every and done % tc.save_every == 0) or (last and done == self.total_steps):
                    self.save(data_state)
        finally:
            if profiling:
                jax.profiler.stop_trace()
            pbar.close()
            writer.close()
            if hasattr(it, "close"):
                it.close()
            if self.checkpointer() is not None:
                self.checkpointer().wait()
        self.peak_source = peak_src
        return self.history

    def close(self) -> None:
        if hasattr(self, "_ckpt"):
            self._ckpt.close()


def _log(msg: str) -> None:
    print(f"[jaxllm] {msg}", file=sys.stderr)


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix_str(self, s):
        pass

    def write(self, s):
        print(s, file=sys.stderr)

    def close(self):
        pass


def _progress(total: int, initial: int, enabled: bool):
    if not enabled or os.environ.get("JAXLLM_NO_PROGRESS") == "1":
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=initial + total, initial=initial, desc="finetune", unit="step",
                dynamic_ncols=True, file=sys.stderr)


# --------------------------------------------------------------------------- generation


def generate_answers(params: dict, cfg, tokenizer, prompts: Sequence[str], max_tokens: int = 64,
                     max_model_len: int = 1024) -> list[str]:
    """Greedy chat answers (for before/after samples); ``params`` stacked, numpy or jax."""
    p = jax.device_put(llama.unstack_layers(params))
    ids = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q}]),
                            add_special_tokens=False) for q in prompts]
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    eos = tuple(tokenizer.eos_token_ids or cfg.eos_token_ids)
    sb = StaticBatch(p, cfg, ids, [sp] * len(ids), eos, max_model_len=max_model_len, impl="xla")
    sb.step(max_tokens)
    out, num, _ = sb.fetch()
    res = []
    for i in range(len(ids)):
        toks = [int(t) for t in out[i, :num[i]]]
        while toks and toks[-1] in eos:
            toks.pop()
        res.append(tokenizer.decode(toks))
    return res


# --------------------------------------------------------------------------- command

def _parse_steps(s: str | None) -> tuple[int, ...]:
    if not s:
        return ()
    try:
        if "-" in s:
            a, b = s.split("-", 1)
            return tuple(range(int(a), int(b) + 1))
        return tuple(sorted(int(x) for x in s.split(",")))
    except ValueError:
        raise ValueError(f"--profile-steps: expected A, A-B or A,B,..., got {s!r}") from None


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    lora = None
    if args.lora:
        lora = LoraConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                          targets=args.lora_targets)
    lr = args.lr if args.lr is not None else (2e-4 if args.lora else 2e-5)
    return TrainConfig(
        seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum,
        steps=args.steps, epochs=args.epochs, lr=lr, warmup_steps=args.warmup_steps,
        min_lr_ratio=args.min_lr_ratio, schedule=args.lr_schedule, weight_decay=args.weight_decay,
        b1=args.adam_b1, b2=args.adam_b2, eps=args.adam_eps, clip_norm=args.max_grad_norm,
        compute_dtype=args.dtype, remat=args.remat, attn_impl=args.attention_impl,
        scan_layers=not args.unroll_layers, loss_chunk=args.loss_chunk, lora=lora, dp=args.dp,
        fsdp=args.fsdp, tp=args.tp, seed=args.seed, packing=not args.no_pack,
        shuffle=not args.no_shuffle, output_dir=args.output, save_every=args.save_every,
        keep=args.keep, resume=not args.no_resume, eval_every=args.eval_every,
        eval_batches=args.eval_batches, log_every=args.log_every, metrics_file=args.metrics_file,
        tensorboard=args.tensorboard, profile_steps=_parse_steps(args.profile_steps),
        peak_tflops=args.peak_tflops, progress=not args.no_progress)


def _ensure_cpu_devices(n: int) -> None:
    """On CPU, ask for ``n`` host devices if the backend has not started yet."""
    if n <= 1 or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    try:
        if os.environ.get("JAX_PLATFORMS", "cpu").startswith("cpu"):
            jax.config.update("jax_num_cpu_devices", n)
    except Exception:  # noqa: BLE001 -- backend already initialised: make_mesh reports it
        pass


def run_finetune(args: argparse.Namespace) -> int:
    """``jaxllm finetune``: load, train, checkpoint, export.  Returns the exit code."""
    tc = config_from_args(args)
    if tc.seq_len < 2 or tc.batch_size < 1 or tc.grad_accum < 1:
        raise ValueError("--seq-len must be >= 2, --batch-size and --grad-accum >= 1")
    _ensure_cpu_devices(tc.dp * tc.fsdp * tc.tp)
    enable_compilation_cache()
    loaded, train_ex, eval_ex = _load_for_finetune(args, tc)
    cfg, tok = loaded.config, loaded.tokenizer
    out = Path(tc.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples = {"prompts": args.sample_prompt or []}
    if args.sample_prompt:
        t = time.perf_counter()
        samples["before"] = _sample_answers(args, loaded.params, cfg, tok, "before")
        _log(f"sampled in {time.perf_counter() - t:.1f} s")

    trainer = Trainer(tc, cfg, loaded.params, train_ex, eval_ex)
    _log(f"{trainer.total_steps} steps of {tc.batch_size} x {tc.seq_len} tokens "
         f"({trainer.loader.rows_per_epoch} packed rows per epoch); "
         + (f"LoRA r={tc.lora.rank} on {','.join(tc.lora.targets)}: "
            f"{trainer.num_lora / 1e6:.2f}M trainable params" if tc.lora else
            "full fine-tuning")
         + (f"; mesh {dict(trainer.mesh.shape)}" if trainer.mesh is not None else ""))
    if not tc.resume and trainer.checkpointer() is not None and \
            trainer.checkpointer().latest_step() is not None:
        raise ValueError(f"{out / 'checkpoints'} already has checkpoints; remove them or drop "
                         "--no-resume to continue from the latest")
    t_train = time.perf_counter()
    hist = trainer.run()
    train_s = time.perf_counter() - t_train
    trainer.close()
    summary = _run_summary(hist, trainer, train_s)
    if not args.no_export:
        summary.update(_export(args, tc, trainer, loaded, out))
    if args.sample_prompt:
        samples["after"] = _sample_answers(args, trainer.merged_params(), cfg, tok, "after ")
        (out / "samples.json").write_text(json.dumps(samples, indent=2, ensure_ascii=False) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _log("done: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in summary.items()))
    return 0


def _load_for_finetune(args: argparse.Namespace, tc: TrainConfig):
    """``(loaded model, train examples, eval examples)`` from the flags."""
    t0 = time.perf_counter()
    for f in list(args.data) + list(args.eval_data or []):
        if not Path(f).is_file():
            raise FileNotFoundError(f"dataset not found: {f}")
    loaded = load_model(args.model, dtype="float32")
    cfg, tok = loaded.config, loaded.tokenizer
    if tok is None:
        raise ValueError(f"{loaded.source}: no tokenizer (need tokenizer.json or a GGUF vocab)")
    template = Path(args.chat_template).read_text() if args.chat_template else None
    stats = D.DatasetStats()
    examples = D.load_examples(args.data, tok, max_len=tc.seq_len + 1, chat_template=template,
                               stats=stats)
    if args.eval_data:
        train_ex, eval_ex = examples, D.load_examples(args.eval_data, tok, tc.seq_len + 1, template)
    else:
        train_ex, eval_ex = D.split_examples(examples, args.eval_fraction, tc.seed)
    _log(f"model {loaded.source.name}: {cfg.num_params() / 1e6:.1f}M params, loaded in "
         f"{time.perf_counter() - t0:.1f} s; data: {stats.describe()}; "
         f"{len(train_ex)} train / {len(eval_ex)} eval examples")
    return loaded, train_ex, eval_ex


def _sample_answers(args: argparse.Namespace, params: dict, cfg, tok, tag: str) -> list[str]:
    """Greedy answers to ``--sample-prompt``, logged as ``tag | prompt -> answer``."""
    answers = generate_answers(params, cfg, tok, args.sample_prompt, args.sample_max_tokens)
    for q, a in zip(args.sample_prompt, answers):
        _log(f"{tag} | {q!r} -> {a!r}")
    return answers


def _run_summary(hist: list[dict], trainer: Trainer, train_s: float) -> dict[str, Any]:
    """First/final loss, last eval, median tokens/s and MFU of a finished run."""
    summary: dict[str, Any] = {"train_seconds": train_s, "steps": trainer.total_steps}
    losses = [h["loss"] for h in hist if "loss" in h]
    if losses:
        summary.update(first_loss=losses[0], final_loss=losses[-1])
    evals = [h for h in hist if "eval_loss" in h]
    if evals:
        summary.update(eval_loss=evals[-1]["eval_loss"], eval_ppl=evals[-1]["eval_ppl"])
    tps = [h["tokens_per_s"] for h in hist if "tokens_per_s" in h]
    if tps:
        summary["tokens_per_s_median"] = float(np.median(tps))
    mfu = [h["mfu"] for h in hist if "mfu" in h]
    if mfu:
        summary["mfu_median"] = float(np.median(mfu))
        summary["peak_source"] = getattr(trainer, "peak_source", "")
    return summary


def _export(args: argparse.Namespace, tc: TrainConfig, trainer: Trainer, loaded,
            out: Path) -> dict[str, str]:
    """Write ``OUT/adapter`` (LoRA) and/or ``OUT/merged`` / ``OUT/model`` (HF directory)."""
    written = {}
    if tc.lora is not None:
        p = lora_lib.save_adapter(out / "adapter", loaded.config, trainer.trained_params(),
                                  tc.lora, base_model=str(loaded.source))
        _log(f"adapter written to {p}")
        written["adapter"] = str(p)
    if tc.lora is None or args.merge:
        d = out / ("merged" if tc.lora is not None else "model")
        save_hf(d, loaded.config, trainer.merged_params(), tokenizer=loaded.tokenizer)
        _log(f"HF model written to {d}")
        written["model_dir"] = str(d)
    return written
