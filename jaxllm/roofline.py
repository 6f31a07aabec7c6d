"""Roofline analysis of Llama-family inference: per-op FLOPs, bytes, bound, time.

For a :class:`~jaxllm.config.ModelConfig`, a workload (batch, prompt length,
generated length, weight / KV dtypes) and a :class:`~jaxllm.hardware.HardwareSpec`
this module counts, per operation -- embed, norm, QKV projection, RoPE, KV-cache
write, attention scores, softmax, attention-value, output projection, gate/up,
activation, down, LM head, sampling -- the FLOPs and the HBM bytes moved, and
from them the arithmetic intensity, the bound (memory or compute) and the
attainable time ``max(FLOPs / peak, bytes / bandwidth)``.  Summing gives the
predicted prefill latency and the per-token decode latency at the average
context length over the generation; a search gives the batch size at which
decode turns compute-bound.  Formulas: docs/roofline.md.

Public API::

    from jaxllm.named_configs import NAMED_CONFIGS
    from jaxllm.roofline import analyze
    rep = analyze(NAMED_CONFIGS["llama3-8b"], "H100-SXM", batch=8, prompt_len=1024,
                  gen_len=256, weight_dtype="bf16", kv_dtype="bf16")
    print(rep.table())            # per-op tables + predictions
    rep.prefill.time_s, rep.decode.time_s, rep.crossover

    textbook_figures()            # the Llama-2-7B / A100 numbers, reproduced
    compare_with_xla(cfg, batch=1, prompt_len=32)   # analytic vs compiled.cost_analysis()
    plot_roofline(rep, "roofline.png", measured="results/benchmarks.jsonl")

Command line (``jaxllm roofline``, parser in :mod:`jaxllm.cli`)::

    jaxllm roofline --model llama3-8b --hardware H100-SXM --batch 8 --prompt-len 1024
    jaxllm roofline --model smollm2-135m --hardware cpu --xla --plot roofline.png
    jaxllm roofline --textbook
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp

from jaxllm.bench import read_results
from jaxllm.config import ModelConfig
from jaxllm.hardware import (HardwareSpec, get_hardware, normalize_compute_dtype,
                             textbook_a100_ridge)
from jaxllm.named_configs import NAMED_CONFIGS
from jaxllm.xla_cost import xla_cost

# Default workloads for named configs (the textbook's B=8, T=1024 for Llama-2-7B).
NAMED_WORKLOADS: dict[str, dict[str, int]] = {"llama2-7b": {"batch": 8, "prompt_len": 1024}}

WEIGHT_BYTES = {"f32": 4.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}
KV_BYTES = {"f32": 4.0, "bf16": 2.0, "int8": 1.0}
_DTYPE_ALIASES = {"float32": "f32", "fp32": "f32", "bfloat16": "bf16", "fp16": "bf16",
                  "f16": "bf16", "float16": "bf16", "i8": "int8", "i4": "int4"}

LINEAR_OPS = ("qkv_proj", "o_proj", "gate_up", "down", "lm_head")
OP_ORDER = ("embed", "norm", "qkv_proj", "rope", "kv_write", "attn_scores", "softmax",
            "attn_value", "o_proj", "gate_up", "activation", "down", "lm_head", "sampling")

# Elementwise FLOP counts per element (transcendentals counted as one FLOP each).
NORM_FLOPS = 4       # square, mean-accumulate, scale by rsqrt, scale by weight
ROPE_FLOPS = 3       # x1*cos - x2*sin  (two multiplies, one add per output element)
SOFTMAX_FLOPS = 5    # scale/mask, max, subtract+exp, sum, normalise
ACT_FLOPS = 5        # silu(g) * u = g * sigmoid(g) * u: neg, exp, add, div, two multiplies ~5
SAMPLING_FLOPS = 5   # temperature scale, max, exp, sum, draw/compare per vocab entry


def _norm_dtype(dt: str, table: dict[str, float], what: str) -> str:
    d = str(dt).lower()
    d = _DTYPE_ALIASES.get(d, d)
    if d not in table:
        raise ValueError(f"unknown {what} dtype {dt!r}; expected one of {sorted(table)}")
    return d


def resolve_model_config(spec: str | ModelConfig | None) -> tuple[str, ModelConfig]:
    """``(name, config)`` from a built-in name, a checkpoint dir / config.json / .gguf path."""
    if isinstance(spec, ModelConfig):
        return "custom", spec
    # The loaders and the model code load on use: the analytic roofline (and the CLI
    # parser that reads this module's tables) needs neither.
    from jaxllm.weights import default_model_path
    from jaxllm.weights.gguf import config_from_gguf, read_gguf

    if spec is None or spec.lower() in ("default",):
        spec = str(default_model_path())
    if spec.lower() in NAMED_CONFIGS:
        return spec.lower(), NAMED_CONFIGS[spec.lower()]
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{spec}: no config.json in this directory")
    if path.suffix == ".json" and path.is_file():
        return path.parent.name or path.stem, ModelConfig.from_hf(json.loads(path.read_text()))
    if path.suffix == ".gguf" and path.is_file():
        f = read_gguf(path)
        return path.stem, config_from_gguf(f.metadata, list(f.tensors), source=str(path))
    raise ValueError(f"--model {spec!r}: not a built-in config ({', '.join(NAMED_CONFIGS)}), "
                     "an HF checkpoint directory, a config.json or a .gguf file")


# --------------------------------------------------------------------------- op costs

@dataclasses.dataclass
class OpCost:
    """One operation of one phase, totalled over its ``count`` occurrences (layers)."""

    name: str
    count: int
    flops: float
    bytes: float
    note: str = ""
    t_compute: float = 0.0
    t_memory: float = 0.0

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else math.inf

    @property
    def time_s(self) -> float:
        return max(self.t_compute, self.t_memory)

    @property
    def bound(self) -> str:
        if not self.flops and not self.bytes:
            return "-"
        return "compute" if self.t_compute >= self.t_memory else "memory"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(intensity=None if math.isinf(self.intensity) else self.intensity,
                 time_s=self.time_s, bound=self.bound)
        return d


def _attn_pairs(q_len: int, kv_len: int, causal_skip: bool, window: int | None) -> tuple[float, int]:
    """(query-key pairs per (batch, head), keys read per (batch, kv head)).

    Dense kernels compute every pair of the ``q_len x kv_len`` rectangle and read
    the whole key buffer.  Flash-style kernels (``causal_skip``) compute only the
    causally visible pairs (query ``i`` sits at key ``kv_len - q_len + i``) and,
    with a sliding window, read only the keys some query can see.
    """
    if not causal_skip:
        return float(q_len * kv_len), kv_len
    first = kv_len - q_len + 1  # keys visible to the first query
    if window is None:
        pairs = q_len * first + q_len * (q_len - 1) / 2
        return float(pairs), kv_len
    k = min(max(window - first + 1, 0), q_len)  # queries that see fewer than `window` keys
    pairs = k * first + k * (k - 1) / 2 + (q_len - k) * window
    return float(pairs), min(kv_len, window + q_len - 1)


def phase_ops(cfg: ModelConfig, *, batch: int, q_len: int, kv_len: int,
              weight_dtype: str = "bf16", kv_dtype: str = "bf16", act_dtype: str | None = None,
              attention: str = "flash", lm_head_tokens: int | None = None,
              sampling: bool = True) -> list[OpCost]:
    """FLOPs and bytes of one forward step over ``q_len`` new tokens per row.

    Prefill: ``q_len = kv_len = prompt length``.  Decode: ``q_len = 1``,
    ``kv_len`` = context (keys attended, including the new one).  ``attention``:
    ``"dense"`` (XLA reference: f32 score matrix materialised in memory, every
    query-key pair computed) or ``"flash"`` (fused kernel: scores stay on chip,
    causally masked pairs skipped).  ``lm_head_tokens``: positions projected to
    the vocabulary (default: the last one per row, as generation does).
    Bytes count each op's reads of its inputs and weights and writes of its
    outputs once (no cache reuse between ops); weights are read once per step.
    """
    wd = _norm_dtype(weight_dtype, WEIGHT_BYTES, "weight")
    kd = _norm_dtype(kv_dtype, KV_BYTES, "KV")
    wb, kb = WEIGHT_BYTES[wd], KV_BYTES[kd]
    ab = WEIGHT_BYTES[_norm_dtype(act_dtype, WEIGHT_BYTES, "activation")] if act_dtype else (
        4.0 if wd == "f32" else 2.0)
    if attention not in ("dense", "flash"):
        raise ValueError(f"attention must be 'dense' or 'flash', got {attention!r}")
    L, d, f, v = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    hq, hkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    qd, kvd = hq * hd, hkv * hd
    b, n = batch, batch * q_len
    dense = attention == "dense"
    pairs, keys = _attn_pairs(q_len, kv_len, not dense, cfg.sliding_window)
    score_elems = b * hq * pairs  # total over the batch and heads, one layer
    bias = n * (qd + 2 * kvd) if cfg.attention_bias else 0
    lm_tokens = b if lm_head_tokens is None else lm_head_tokens

    ops = [
        OpCost("embed", 1, 0.0, n * d * (wb + ab), "gather token rows"),
        OpCost("norm", 2 * L + 1, (2 * L + 1) * NORM_FLOPS * n * d,
               (2 * L + 1) * (2 * n * d * ab + d * wb), "RMSNorm x2 per layer + final"),
        OpCost("qkv_proj", L, L * (2 * n * d * (qd + 2 * kvd) + bias),
               L * (n * d * ab + d * (qd + 2 * kvd) * wb + n * (qd + 2 * kvd) * ab),
               "x @ [Wq|Wk|Wv]"),
        OpCost("rope", L, L * ROPE_FLOPS * n * (qd + kvd),
               L * (2 * n * (qd + kvd) * ab + 2 * n * (hd // 2) * 4), "rotate q and k"),
        OpCost("kv_write", L, 0.0, L * n * 2 * kvd * (ab + kb), "store new K, V in the cache"),
        OpCost("attn_scores", L, L * 2 * score_elems * hd,
               L * (n * qd * ab + b * hkv * keys * hd * kb + (score_elems * 4 if dense else 0)),
               "q @ K^T" + (" (f32 scores written)" if dense else "")),
        OpCost("softmax", L, L * SOFTMAX_FLOPS * score_elems,
               L * (2 * score_elems * 4 if dense else 0.0),
               "f32, in memory" if dense else "on chip (fused)"),
        OpCost("attn_value", L, L * 2 * score_elems * hd,
               L * (b * hkv * keys * hd * kb + n * qd * ab + (score_elems * 4 if dense else 0)),
               "P @ V"),
        OpCost("o_proj", L, L * (2 * n * qd * d + n * d),
               L * (n * qd * ab + qd * d * wb + 2 * n * d * ab), "attn @ Wo + residual"),
        OpCost("gate_up", L, L * 2 * n * d * 2 * f,
               L * (n * d * ab + 2 * d * f * wb + 2 * n * f * ab), "h @ [Wgate|Wup]"),
        OpCost("activation", L, L * ACT_FLOPS * n * f, L * 3 * n * f * ab, "silu(g) * u"),
        OpCost("down", L, L * (2 * n * f * d + n * d),
               L * (n * f * ab + f * d * wb + 2 * n * d * ab), "@ Wdown + residual"),
        OpCost("lm_head", 1, 2 * lm_tokens * d * v,
               lm_tokens * d * ab + d * v * wb + lm_tokens * v * 4, "h @ Wvocab, f32 logits"),
    ]
    if sampling:
        ops.append(OpCost("sampling", 1, SAMPLING_FLOPS * b * v, b * v * 4.0 + b * 4,
                          "softmax + draw over the vocab"))
    return ops


@dataclasses.dataclass
class PhaseCost:
    """The ops of one step with their roofline times on a given device."""

    name: str
    batch: int
    q_len: int
    kv_len: float
    ops: list[OpCost]
    peak: float
    mem_bw: float

    @property
    def flops(self) -> float:
        return sum(o.flops for o in self.ops)

    @property
    def bytes(self) -> float:
        return sum(o.bytes for o in self.ops)

    @property
    def time_s(self) -> float:
        """Op-by-op roofline time: each op at its own bound, no overlap between ops."""
        return sum(o.time_s for o in self.ops)

    @property
    def fused_time_s(self) -> float:
        """Lower bound if all ops overlapped perfectly: max(sum FLOPs / peak, sum bytes / BW)."""
        return max(self.flops / self.peak, self.bytes / self.mem_bw)

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else math.inf

    def op(self, name: str) -> OpCost:
        return next(o for o in self.ops if o.name == name)

    def to_dict(self) -> dict:
        return {"name": self.name, "batch": self.batch, "q_len": self.q_len,
                "kv_len": self.kv_len, "flops": self.flops, "bytes": self.bytes,
                "time_s": self.time_s, "fused_time_s": self.fused_time_s,
                "ops": [o.to_dict() for o in self.ops]}


def timed_phase(name: str, ops: list[OpCost], hw: HardwareSpec, compute_dtype: str, *,
                batch: int, q_len: int, kv_len: float) -> PhaseCost:
    peak = hw.peak(compute_dtype)
    for o in ops:
        o.t_compute = o.flops / peak
        o.t_memory = o.bytes / hw.mem_bw
    return PhaseCost(name, batch, q_len, kv_len, ops, peak, hw.mem_bw)


def _default_compute_dtype(weight_dtype: str) -> str:
    return "f32" if _norm_dtype(weight_dtype, WEIGHT_BYTES, "weight") == "f32" else "bf16"


def resolve_attention(attention: str, hw: HardwareSpec) -> str:
    """``"auto"``: dense (the XLA reference) on a measured CPU, flash (Pallas) elsewhere."""
    if attention == "auto":
        return "dense" if hw.measured else "flash"
    return attention


def decode_compute_bound_batch(cfg: ModelConfig, hw: HardwareSpec, *, context: int,
                               weight_dtype: str = "bf16", kv_dtype: str = "bf16",
                               compute_dtype: str | None = None, attention: str = "flash",
                               ops: Sequence[str] | None = None,
                               max_batch: int = 1 << 24) -> int | None:
    """Smallest decode batch whose total FLOPs / peak >= total bytes / bandwidth.

    ``ops``: restrict to these op names (e.g. :data:`LINEAR_OPS`); all ops by
    default.  None when not reached by ``max_batch`` (at long contexts the
    per-sequence KV reads grow with the batch as fast as the FLOPs, so attention
    keeps a whole decode step memory-bound however large the batch).
    """
    cdt = compute_dtype or _default_compute_dtype(weight_dtype)
    peak = hw.peak(cdt)

    def compute_bound(b: int) -> bool:
        sel = phase_ops(cfg, batch=b, q_len=1, kv_len=context, weight_dtype=weight_dtype,
                        kv_dtype=kv_dtype, attention=attention)
        if ops is not None:
            sel = [o for o in sel if o.name in ops]
        return sum(o.flops for o in sel) / peak >= sum(o.bytes for o in sel) / hw.mem_bw

    if not compute_bound(max_batch):
        return None
    lo, hi = 0, 1
    while not compute_bound(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if compute_bound(mid) else (mid, hi)
    return hi


# --------------------------------------------------------------------------- report

@dataclasses.dataclass
class RooflineReport:
    model: str
    config: ModelConfig
    hardware: HardwareSpec
    batch: int
    prompt_len: int
    gen_len: int
    weight_dtype: str
    kv_dtype: str
    compute_dtype: str
    attention: str
    prefill: PhaseCost
    decode: PhaseCost
    crossover: dict[str, int | None]
    memory: dict[str, float]

    @property
    def ridge(self) -> float:
        return self.hardware.ridge(self.compute_dtype)

    @property
    def generation_s(self) -> float:
        """Predicted prefill + (gen_len - 1) decode steps (the first token comes from prefill)."""
        return self.prefill.time_s + max(self.gen_len - 1, 0) * self.decode.time_s

    def predictions(self) -> dict[str, float]:
        return {"prefill_s": self.prefill.time_s, "prefill_fused_s": self.prefill.fused_time_s,
                "decode_step_s": self.decode.time_s, "decode_fused_s": self.decode.fused_time_s,
                "decode_tok_s": self.batch / self.decode.time_s,
                "prefill_tok_s": self.batch * self.prompt_len / self.prefill.time_s,
                "generation_s": self.generation_s}

    def to_dict(self) -> dict:
        return {"model": self.model, "config": dataclasses.asdict(self.config),
                "hardware": self.hardware.to_dict(), "batch": self.batch,
                "prompt_len": self.prompt_len, "gen_len": self.gen_len,
                "weight_dtype": self.weight_dtype, "kv_dtype": self.kv_dtype,
                "compute_dtype": self.compute_dtype, "attention": self.attention,
                "ridge": self.ridge, "prefill": self.prefill.to_dict(),
                "decode": self.decode.to_dict(), "crossover": self.crossover,
                "memory": self.memory, "predictions": self.predictions()}

    def table(self) -> str:
        hw = self.hardware
        lines = [
            f"{self.model} on {hw.name}: {self.compute_dtype} peak {_si(hw.peak(self.compute_dtype))}FLOP/s, "
            f"{_si(hw.mem_bw)}B/s, ridge {self.ridge:.1f} FLOP/byte",
            f"weights {self.weight_dtype}, KV cache {self.kv_dtype}, attention {self.attention}; "
            f"batch {self.batch}, prompt {self.prompt_len}, generate {self.gen_len}",
            "",
            _phase_table(f"PREFILL  (B={self.batch}, T={self.prompt_len})", self.prefill),
            "",
            _phase_table(f"DECODE step  (B={self.batch}, context {self.decode.kv_len:g} = "
                         f"average over the generation)", self.decode),
            "",
        ]
        p = self.predictions()
        lines.append(f"predicted prefill (time to first token): {_ms(p['prefill_s'])}  "
                     f"({p['prefill_tok_s']:,.0f} prompt tok/s; perfect-overlap bound "
                     f"{_ms(p['prefill_fused_s'])})")
        lines.append(f"predicted decode: {_ms(p['decode_step_s'])} per token  "
                     f"({p['decode_tok_s']:,.1f} tok/s total, "
                     f"{p['decode_tok_s'] / self.batch:,.1f} per sequence; perfect-overlap "
                     f"bound {_ms(p['decode_fused_s'])})")
        lines.append(f"predicted generation of {self.gen_len} tokens: {_ms(p['generation_s'])}")
        lin, step = self.crossover.get("linear"), self.crossover.get("step")
        ctx = self.decode.kv_len
        lines.append("decode turns compute-bound at batch >= "
                     + (f"{lin:,}" if lin else "never") + " for the linear layers (weights "
                     "amortised over the batch); whole step: "
                     + (f"batch >= {step:,}" if step else
                        f"never at context {ctx:g} (KV-cache reads grow with the batch)"))
        m = self.memory
        cap = hw.mem_bytes
        fits = "" if not cap else (
            f"; fits in {_si(cap)}B" if m["total"] <= cap else f"; DOES NOT FIT in {_si(cap)}B")
        lines.append(f"memory: weights {_si(m['weights'])}B + KV cache {_si(m['kv_cache'])}B "
                     f"(batch x {self.prompt_len + self.gen_len} tokens){fits}")
        return "\n".join(lines)


def _si(x: float) -> str:
    for unit, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.4g} {unit}"
    return f"{x:.4g} "


def _ms(t: float) -> str:
    return f"{t * 1e3:.3f} ms" if t < 1 else f"{t:.3f} s"


def _t(t: float) -> str:
    if t >= 1:
        return f"{t:.3f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.3f} ms"
    return f"{t * 1e6:.2f} us"


def _phase_table(title: str, ph: PhaseCost) -> str:
    hdr = (f"{'op':<12}{'x':>5}{'GFLOP':>12}{'MB':>12}{'FLOP/B':>10}  {'bound':<8}"
           f"{'time':>12}{'share':>7}  note")
    rows = [title, hdr, "-" * len(hdr)]
    total = ph.time_s
    for o in ph.ops:
        inten = "inf" if math.isinf(o.intensity) else f"{o.intensity:.1f}"
        rows.append(f"{o.name:<12}{o.count:>5}{o.flops / 1e9:>12.4g}{o.bytes / 1e6:>12.4g}"
                    f"{inten:>10}  {o.bound:<8}{_t(o.time_s):>12}"
                    f"{o.time_s / total if total else 0:>7.1%}  {o.note}")
    rows.append("-" * len(hdr))
    rows.append(f"{'total':<17}{ph.flops / 1e9:>12.4g}{ph.bytes / 1e6:>12.4g}"
                f"{ph.intensity:>10.1f}  {'':<8}{_t(total):>12}")
    return "\n".join(rows)


def analyze(cfg: ModelConfig | str, hardware: HardwareSpec | str = "H100-SXM", *,
            batch: int = 1, prompt_len: int = 512, gen_len: int = 128,
            weight_dtype: str = "bf16", kv_dtype: str = "bf16",
            compute_dtype: str | None = None, attention: str = "auto",
            model_name: str | None = None) -> RooflineReport:
    """Roofline of one generation workload: prefill of ``prompt_len`` then ``gen_len`` tokens.

    Decode is evaluated at the average context over the generation,
    ``prompt_len + gen_len / 2`` keys.  ``compute_dtype`` (peak FLOP/s used):
    f32 for f32 weights, else bf16 (int8 / int4 weights are dequantised to bf16);
    pass ``"int8"`` for W8A8.  ``attention``: ``"auto"`` (dense XLA reference on a
    measured CPU, flash elsewhere), ``"dense"`` or ``"flash"``.
    """
    if isinstance(cfg, str):
        model_name, cfg = resolve_model_config(cfg)
    hw = get_hardware(hardware) if isinstance(hardware, str) else hardware
    if min(batch, prompt_len) < 1 or gen_len < 0:
        raise ValueError("batch and prompt_len must be >= 1, gen_len >= 0")
    wd = _norm_dtype(weight_dtype, WEIGHT_BYTES, "weight")
    kd = _norm_dtype(kv_dtype, KV_BYTES, "KV")
    cdt = normalize_compute_dtype(compute_dtype) if compute_dtype else _default_compute_dtype(wd)
    attn = resolve_attention(attention, hw)
    ctx = prompt_len + gen_len / 2
    ctx_int = max(int(round(ctx)), 1)
    pre = timed_phase("prefill", phase_ops(cfg, batch=batch, q_len=prompt_len, kv_len=prompt_len,
                                           weight_dtype=wd, kv_dtype=kd, attention=attn),
                      hw, cdt, batch=batch, q_len=prompt_len, kv_len=prompt_len)
    dec = timed_phase("decode", phase_ops(cfg, batch=batch, q_len=1, kv_len=ctx_int,
                                          weight_dtype=wd, kv_dtype=kd, attention=attn),
                      hw, cdt, batch=batch, q_len=1, kv_len=ctx_int)
    kw = dict(context=ctx_int, weight_dtype=wd, kv_dtype=kd, compute_dtype=cdt, attention=attn)
    crossover = {"linear": decode_compute_bound_batch(cfg, hw, ops=LINEAR_OPS, **kw),
                 "step": decode_compute_bound_batch(cfg, hw, **kw)}
    weights = cfg.num_params() * WEIGHT_BYTES[wd]
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * KV_BYTES[kd] * batch * (
        prompt_len + gen_len)
    memory = {"weights": weights, "kv_cache": kv, "total": weights + kv}
    return RooflineReport(model_name or "custom", cfg, hw, batch, prompt_len, gen_len, wd, kd,
                          cdt, attn, pre, dec, crossover, memory)


# --------------------------------------------------------------------------- textbook

def textbook_figures(B: int = 8, T: int = 1024, H: int = 4096, D: int = 128, H_ff: int = 11008,
                     bytes_per_elem: int = 2) -> dict[str, float]:
    """The Llama-2-7B / A100 textbook intensities, under the textbook's conventions.

    Conventions that reproduce the published figures (derivation: docs/roofline.md):
    a matmul of ``[M,K] @ [K,N]`` costs ``2MKN`` FLOPs and moves its two *input*
    operands once in fp16 (the output write is not counted); the attention figure
    is the per-head softmax-and-value step ``softmax(S) @ V`` that reads the score
    matrix ``[Tq,Tk]`` and ``V [Tk,D]`` and does ``2 Tq Tk D`` (matmul) +
    ``2 Tq Tk`` (exp and row-sum) FLOPs.  The A100 ridge is
    ``312e12 / (2039 * 2**30)`` -- see :func:`jaxllm.hardware.textbook_a100_ridge`.
    """
    e = bytes_per_elem

    def matmul(m: int, k: int, n: int) -> float:
        return 2 * m * k * n / (e * (m * k + k * n))

    def softmax_value(tq: int, tk: int) -> float:
        return (2 * tq * tk * D + 2 * tq * tk) / (e * (tq * tk + tk * D))

    return {
        "prefill_linear": matmul(B * T, H, H),         # B*T*H / (B*T + H) = 2730.7
        "prefill_mlp": matmul(B * T, H, H_ff),         # gate/up: 2*B*T*H*H' / 2(B*T*H + H*H')
        "prefill_attention": softmax_value(T, T),      # T(D+1)/(T+D) = 114.7
        "decode_linear": matmul(B, H, H),              # B*H / (B + H) = 7.98
        "decode_mlp": matmul(B, H, H_ff),
        "decode_attention": softmax_value(1, T),       # (D+1)/(D+1) = 1.0
        "a100_ridge": textbook_a100_ridge(),           # 142.5
        "a100_ridge_si": 312e12 / 2.039e12,            # 153.0 with SI bytes
    }


# --------------------------------------------------------------------------- XLA cross-check

def _xla_costs_exact(cfg: ModelConfig, batch: int, prompt_len: int, cache_len: int,
                     dtype: str) -> dict[str, dict[str, float]]:
    from jaxllm.profiling import abstract_params, model_steps  # loaded on use (jax programs)

    prefill, decode = model_steps(cfg, cache_len=cache_len, impl="xla")
    params = abstract_params(cfg, dtype, unrolled=True)
    tokens = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32)
    state = jax.eval_shape(prefill, params, tokens)
    return {"prefill": xla_cost(prefill, params, tokens),
            "decode": xla_cost(decode, params, state)}


def xla_costs(cfg: ModelConfig, *, batch: int, prompt_len: int, cache_len: int,
              dtype: str = "float32", max_exact_layers: int = 4) -> dict[str, Any]:
    """XLA's cost analysis of the real jitted prefill and one-token decode step.

    Lowered from abstract (ShapeDtypeStruct) parameters, so no weights are
    allocated.  Layers are unrolled (cost analysis counts a ``scan`` body once);
    above ``max_exact_layers`` layers the cost is extrapolated linearly from
    1- and 2-layer programs (``extrapolated: True``) to keep compile time small.
    """
    if cfg.num_layers <= max_exact_layers:
        out: dict[str, Any] = _xla_costs_exact(cfg, batch, prompt_len, cache_len, dtype)
        out["extrapolated"] = False
        return out
    c1 = _xla_costs_exact(dataclasses.replace(cfg, num_layers=1), batch, prompt_len, cache_len, dtype)
    c2 = _xla_costs_exact(dataclasses.replace(cfg, num_layers=2), batch, prompt_len, cache_len, dtype)
    n = cfg.num_layers
    out = {ph: {k: c1[ph][k] + (n - 1) * (c2[ph][k] - c1[ph][k]) for k in c1[ph]}
           for ph in ("prefill", "decode")}
    out["extrapolated"] = True
    return out


def compare_with_xla(cfg: ModelConfig, *, batch: int = 1, prompt_len: int = 32,
                     cache_len: int | None = None, dtype: str = "float32") -> list[dict[str, Any]]:
    """Analytic vs XLA ``cost_analysis()`` FLOPs and bytes, for prefill and one decode step.

    The analytic side is evaluated exactly as the jitted code runs: dense XLA
    attention (every query-key pair, f32 scores), prefill over ``prompt_len``
    keys projecting only the last position, decode over the whole
    ``cache_len``-slot cache buffer, greedy sampling.  XLA counts a multiply-add
    as 2 FLOPs and transcendentals separately; its "bytes accessed" sums every
    fused kernel's operands and outputs, so bytes agree only roughly.
    """
    cache_len = cache_len or -(-(prompt_len + 1) // 128) * 128
    wd = _norm_dtype(dtype, WEIGHT_BYTES, "weight")
    xla = xla_costs(cfg, batch=batch, prompt_len=prompt_len, cache_len=cache_len, dtype=dtype)
    rows = []
    for phase, q_len, kv_len in (("prefill", prompt_len, prompt_len), ("decode", 1, cache_len)):
        ops = phase_ops(cfg, batch=batch, q_len=q_len, kv_len=kv_len, weight_dtype=wd,
                        kv_dtype=wd, attention="dense")
        af, ab = sum(o.flops for o in ops), sum(o.bytes for o in ops)
        xf, xb = xla[phase]["flops"], xla[phase]["bytes"]
        rows.append({"phase": phase, "batch": batch, "q_len": q_len, "kv_len": kv_len,
                     "analytic_flops": af, "xla_flops": xf, "flops_ratio": af / xf if xf else None,
                     "analytic_bytes": ab, "xla_bytes": xb, "bytes_ratio": ab / xb if xb else None,
                     "xla_transcendentals": xla[phase]["transcendentals"],
                     "extrapolated": xla["extrapolated"]})
    return rows


def format_xla_comparison(rows: Iterable[dict[str, Any]]) -> str:
    hdr = (f"{'phase':<9}{'analytic GFLOP':>16}{'XLA GFLOP':>12}{'ratio':>8}"
           f"{'analytic MB':>14}{'XLA MB':>12}{'ratio':>8}")
    out = [hdr, "-" * len(hdr)]
    for r in rows:
        out.append(f"{r['phase']:<9}{r['analytic_flops'] / 1e9:>16.4g}{r['xla_flops'] / 1e9:>12.4g}"
                   f"{(r['flops_ratio'] or 0):>8.3f}{r['analytic_bytes'] / 1e6:>14.4g}"
                   f"{r['xla_bytes'] / 1e6:>12.4g}{(r['bytes_ratio'] or 0):>8.3f}")
    if any(r.get("extrapolated") for r in rows):
        out.append("(XLA figures extrapolated linearly from 1- and 2-layer programs)")
    return "\n".join(out)


# --------------------------------------------------------------------------- plot

def _measured_points(path: str | Path) -> list[tuple[str, float, float]]:
    """(label, intensity, FLOP/s) from a benchmark JSONL file.

    A row is plotted when its metrics carry ``flops`` and ``bytes`` (per call)
    and a time (``median_s``, or ``time_s``), or ``intensity`` and ``flop_s``.
    """
    pts = []
    for row in read_results(path):
        m = row.get("metrics", {})
        t = m.get("median_s", m.get("time_s"))
        if m.get("flops") and m.get("bytes") and t:
            inten, perf = m["flops"] / m["bytes"], m["flops"] / t
        elif m.get("intensity") and m.get("flop_s"):
            inten, perf = m["intensity"], m["flop_s"]
        else:
            continue
        wl = row.get("workload", {})
        label = row.get("benchmark", "?") + (f" {wl.get('case')}" if wl.get("case") else "")
        pts.append((label, float(inten), float(perf)))
    return pts


def _label_op_clusters(ax: Any, points: list[tuple[str, float, float, float]], color: str,
                       up: bool) -> None:
    """One label per cluster of ops at (nearly) the same intensity, listing the ops that
    take >= 3% of the phase's time; the rest would only overlap.  ``points``: (name,
    intensity, FLOP/s, share of the phase's time)."""
    groups: list[list[tuple]] = []
    for p in sorted(points, key=lambda p: p[1]):
        if groups and p[1] <= groups[-1][0][1] * 1.1:
            groups[-1].append(p)
        else:
            groups.append([p])
    labelled = 0
    for g in groups:
        names = [f"{n} {sh:.0%}" for n, _, _, sh in sorted(g, key=lambda p: -p[3]) if sh >= 0.03]
        if names:
            dy = 8 + 22 * (labelled % 3)  # stagger neighbouring labels
            labelled += 1
            ax.annotate("\n".join(names), (g[0][1], g[0][2]), textcoords="offset points",
                        xytext=(-4, dy) if up else (6, -dy), fontsize=7, color=color,
                        ha="right" if up else "left", va="bottom" if up else "top",
                        arrowprops={"arrowstyle": "-", "color": color, "lw": 0.4})


def plot_roofline(report: RooflineReport, path: str | Path,
                  measured: str | Path | Sequence[tuple[str, float, float]] | None = None,
                  title: str | None = None) -> Path:
    """Log-log roofline with every prefill / decode op as a point on the roof."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("plotting needs matplotlib: pip install 'jaxllm[plot]' "
                           "(or pip install matplotlib)") from None
    hw, cdt = report.hardware, report.compute_dtype
    peak, bw = hw.peak(cdt), hw.mem_bw
    ridge = peak / bw
    # (name, intensity, attainable FLOP/s, share of the phase's time)
    pts = {ph.name: [(o.name, o.intensity, hw.attainable(o.intensity, cdt),
                      o.time_s / ph.time_s if ph.time_s else 0.0)
                     for o in ph.ops if o.flops > 0 and o.bytes > 0]
           for ph in (report.prefill, report.decode)}
    meas = list(_measured_points(measured) if isinstance(measured, (str, Path)) else (measured or []))
    xs = [p[1] for v in pts.values() for p in v] + [m[1] for m in meas] + [ridge]
    lo = 10 ** math.floor(math.log10(max(min(xs), 1e-3)) - 0.5)
    hi = 10 ** math.ceil(math.log10(max(xs)) + 0.5)

    fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
    grid = [lo * (hi / lo) ** (i / 400) for i in range(401)]
    ax.loglog(grid, [min(peak, bw * x) for x in grid], color="black", lw=2, label="roofline")
    ax.axvline(ridge, color="gray", ls="--", lw=1)
    ax.annotate(f"ridge {ridge:.1f} FLOP/B", (ridge, peak), textcoords="offset points",
                xytext=(6, -14), fontsize=9, color="gray")
    style = {"prefill": ("tab:blue", "o"), "decode": ("tab:orange", "s")}
    for phase, plist in pts.items():
        color, marker = style[phase]
        ax.scatter([p[1] for p in plist], [p[2] for p in plist], c=color, marker=marker, s=40,
                   zorder=3, label=f"{phase} ops", edgecolors="black", linewidths=0.5)
        _label_op_clusters(ax, plist, color, up=phase == "prefill")
    if meas:
        ax.scatter([m[1] for m in meas], [m[2] for m in meas], c="tab:green", marker="*", s=90,
                   zorder=4, label="measured", edgecolors="black", linewidths=0.5)
        for name, x, y in meas:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7,
                        color="tab:green")
    ax.set_xlim(lo, hi)
    ax.set_ylim(min(bw * lo, peak) / 3, peak * 10)
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("attainable FLOP/s  (labels: share of the phase's predicted time)")
    ax.set_title(title or f"{report.model} on {hw.name} ({cdt}); B={report.batch}, "
                 f"prompt {report.prompt_len}, decode ctx {report.decode.kv_len:g}", fontsize=10)
    ax.grid(True, which="both", ls=":", lw=0.5)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
