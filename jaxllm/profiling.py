"""Profiler traces of real prefill and decode steps (run by ``jaxllm profile``).

* :func:`trace` -- context manager around ``jax.profiler.trace`` (Perfetto trace
  on) that prints where the trace went and how to open it.
* :func:`model_steps` -- the generate path's own jitted prefill and one-token decode
  (greedy), used by the profiler and by the XLA cost cross-check in
  :mod:`jaxllm.roofline`.
* :func:`profile_model` -- compile, then trace ``steps`` prefills or decode
  steps, each inside ``jax.profiler.TraceAnnotation("prefill" / "decode")``,
  and summarise the trace: wall time per step, device-busy time and host gap,
  and op time per named scope (``attention/qkv_proj``, ``mlp``, ``lm_head``...).
* :func:`profile_engine` -- trace ``LLM.generate`` on a few prompts.

The model code carries ``jax.named_scope``\\ s (``layer_i``, ``attention``,
``norm``, ``qkv_proj``, ``rope``, ``attend``, ``o_proj``, ``mlp``, ``lm_head``).
They end up in each HLO instruction's ``op_name`` metadata, which the trace's
``.xplane.pb`` carries.  The Perfetto JSON names events by HLO instruction only
(``hlo_op`` / ``hlo_module`` args), so :func:`scope_times` maps them back
through the compiled HLO text.  See docs/profiling.md for what to look for.

Command line (parser in :mod:`jaxllm.cli`)::

    jaxllm profile --model smollm2-135m --phase decode --steps 8 --out /tmp/prof
    jaxllm profile --model path/to/ckpt --phase prefill --prompt-len 512 --out /tmp/prof
    jaxllm profile --model path/to/ckpt --phase engine --steps 32 --out /tmp/prof
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gzip
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import generation
from jaxllm.llm import LLM
from jaxllm.models import llama
from jaxllm.named_configs import NAMED_CONFIGS
from jaxllm.sampling import SamplerFlags, SamplingParams, SamplingTensors
from jaxllm.weights import load_model

PHASES = ("prefill", "decode", "engine")


# --------------------------------------------------------------------------- trace

@dataclasses.dataclass
class TraceInfo:
    """Where a trace went (filled in when the :func:`trace` block exits)."""

    log_dir: Path
    run_dir: Path | None = None
    xplane: Path | None = None
    perfetto: Path | None = None

    def files(self) -> list[Path]:
        return sorted(self.run_dir.iterdir()) if self.run_dir else []


def _run_dirs(log_dir: Path) -> set[Path]:
    root = log_dir / "plugins" / "profile"
    return set(root.iterdir()) if root.is_dir() else set()


@contextlib.contextmanager
def trace(out_dir: str | Path, *, create_perfetto_trace: bool = True,
          quiet: bool = False) -> Iterator[TraceInfo]:
    """Profile the block into ``out_dir`` (``plugins/profile/<timestamp>/``).

    Yields a :class:`TraceInfo` whose paths are set once the block exits; prints
    them and the viewer commands unless ``quiet``.
    """
    log_dir = Path(out_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    before = _run_dirs(log_dir)
    info = TraceInfo(log_dir)
    with jax.profiler.trace(str(log_dir), create_perfetto_trace=create_perfetto_trace):
        yield info
    new = sorted(_run_dirs(log_dir) - before, key=lambda p: p.stat().st_mtime)
    if new:
        info.run_dir = new[-1]
        info.xplane = next(iter(sorted(info.run_dir.glob("*.xplane.pb"))), None)
        perf = sorted(info.run_dir.glob("perfetto_trace.json.gz")) or sorted(
            info.run_dir.glob("*.trace.json.gz"))
        info.perfetto = perf[0] if perf else None
    if not quiet:
        print(f"[profile] trace written to {info.run_dir or log_dir}", file=sys.stderr)
        print(f"[profile]   view in XProf:    xprof --logdir {log_dir}   "
              "(pip install xprof; then open http://localhost:8791)", file=sys.stderr)
        if info.perfetto:
            print(f"[profile]   or in Perfetto:   open {info.perfetto} at https://ui.perfetto.dev",
                  file=sys.stderr)


# --------------------------------------------------------------------------- model steps

def model_steps(cfg, *, cache_len: int, impl: str = "xla") -> tuple[Callable, Callable]:
    """``(prefill, decode)``: the static generate path's own jitted programs
    (:func:`jaxllm.generation.prefill` and :func:`jaxllm.generation.decode`), greedy.

    * ``prefill(params, tokens [B,P]) -> DecodeState`` -- runs the prompt into a dense
      cache of ``cache_len`` slots and picks the first token;
    * ``decode(params, state) -> DecodeState`` -- one more token: the body of the
      generate loop (:func:`jaxllm.generation.decode_step`; ``state`` donated).

    Both are jitted functions (``.lower`` works on them), so profiles and the roofline's
    XLA cost cross-check measure exactly what ``generate`` runs.
    """
    flags = SamplerFlags(all_greedy=True, penalties=False, top_k_p=False, min_p=False)

    def prefill(params, tokens):
        b, p = tokens.shape
        sampling = SamplingTensors.build([SamplingParams(temperature=0.0)] * b, b)
        return generation.prefill(
            params, tokens, jnp.zeros((b,), jnp.int32),
            jnp.full((b,), cache_len - p, jnp.int32), jnp.zeros((b,), jnp.int32),
            jnp.full((b, 1), -1, jnp.int32), sampling, cfg=cfg, cache_len=cache_len,
            flags=flags, impl=impl)

    def decode(params, state):  # the loop body (XLA's cost analysis skips while loops)
        return generation.decode_step(params, cfg, state, flags)

    return jax.jit(prefill), jax.jit(decode, donate_argnums=1)


def abstract_params(cfg, dtype: Any = "float32", unrolled: bool = True):
    """``jax.ShapeDtypeStruct`` parameter pytree (lowering and cost analysis without weights)."""
    dt = jnp.dtype(dtype)
    shapes = llama.param_shapes(cfg)
    tree = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dt), shapes,
                        is_leaf=lambda x: isinstance(x, tuple))
    if unrolled:
        layers = tree["layers"]
        tree = {**tree, "layers": [
            {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype) for k, v in layers.items()}
            for _ in range(cfg.num_layers)]}
    return tree


# --------------------------------------------------------------------------- trace analysis

_LINE_RE = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_MODULE_RE = re.compile(r"^HloModule\s+([\w.\-]+)")
_OPNAME_RE = re.compile(r'op_name="([^"]*)"')
_OPERAND_RE = re.compile(r"%([\w.\-]+)")
_WEIGHT_RE = re.compile(r"%params__(?:layers___\d+___)?(\w+?)__")
# Weight parameter -> scope, for instructions XLA left without metadata (e.g. M=1 dots on CPU).
WEIGHT_SCOPES = {"wq": "attention/qkv_proj", "wk": "attention/qkv_proj", "wv": "attention/qkv_proj",
                 "bq": "attention/qkv_proj", "bk": "attention/qkv_proj", "bv": "attention/qkv_proj",
                 "wo": "attention/o_proj", "attn_norm": "attention/norm", "mlp_norm": "mlp/norm",
                 "w_gate": "mlp", "w_up": "mlp", "w_down": "mlp", "lm_head": "lm_head",
                 "embed": "embed", "final_norm": "final_norm"}
KV_CACHE_SCOPE = "kv_cache (copies)"


def hlo_scope_map(hlo_text: str, depth: int = 2) -> tuple[str, dict[str, str]]:
    """(module name, {HLO instruction name: scope}) from compiled HLO text.

    The scope comes from the instruction's ``op_name`` metadata (see
    :func:`scope_of`).  XLA drops metadata from some instructions (matrix-vector
    dots on CPU, copies it inserts); those are attributed by the weight they
    read (``w_up`` -> ``mlp`` ...), by reading a KV cache (``kv_cache (copies)``),
    or else by their first attributed operand.
    """
    module = ""
    out: dict[str, str] = {}
    for line in hlo_text.splitlines():
        if not module:
            m = _MODULE_RE.match(line)
            if m:
                module = m.group(1)
                continue
        m = _LINE_RE.match(line)
        if not m:
            continue
        name, rest = m.group(1), m.group(2)
        if " parameter(" in rest:
            continue
        op = _OPNAME_RE.search(rest)
        if op and not op.group(1).startswith(("params[", "caches[")):
            out[name] = scope_of(op.group(1), depth)
            continue
        w = _WEIGHT_RE.search(rest)
        if w and w.group(1) in WEIGHT_SCOPES:
            out[name] = WEIGHT_SCOPES[w.group(1)]
        elif "%caches_" in rest or "cache" in (op.group(1) if op else ""):
            out[name] = KV_CACHE_SCOPE
        else:
            body = rest.split("metadata=")[0]
            for operand in _OPERAND_RE.findall(body):
                if operand in out:
                    out[name] = out[operand]
                    break
    return module, out


def scope_of(op_name: str, depth: int = 2) -> str:
    """``jit(f)/prefill/layer_3/attention/qkv_proj/dot_general`` -> ``attention/qkv_proj``.

    Drops the ``jit(...)`` / ``prefill`` / ``decode_step`` / ``layer_i`` / ``while``
    wrappers and the trailing primitive, keeps ``depth`` scope levels.
    """
    parts = [p for p in op_name.split("/") if p]
    if len(parts) < 2:
        return "(other)"
    parts = parts[:-1]  # the primitive (dot_general, add, ...)
    keep = [p for p in parts
            if not re.fullmatch(r"p?jit\(.*\)|layer(_\d+)?|prefill|decode_step|while|body|"
                                r"cond|scan|checkpoint|remat|jvp\(.*\)|transpose\(.*\)", p)]
    return "/".join(keep[:depth]) or "(top level)"


def load_trace_events(info_or_path: TraceInfo | str | Path) -> list[dict]:
    """Events of the Perfetto ``*.json.gz`` trace (``ph == "X"`` complete events)."""
    path = info_or_path.perfetto if isinstance(info_or_path, TraceInfo) else Path(info_or_path)
    if path is None:
        raise FileNotFoundError("no Perfetto trace was written (create_perfetto_trace=False?)")
    with gzip.open(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X"]


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


@dataclasses.dataclass
class StepStat:
    name: str
    wall_ms: float
    busy_ms: float  # union of XLA op intervals inside the step

    @property
    def host_ms(self) -> float:
        return max(self.wall_ms - self.busy_ms, 0.0)


def step_stats(events: list[dict], names: Sequence[str] = ("prefill", "decode")) -> list[StepStat]:
    """Per ``TraceAnnotation`` step: wall time, time with an XLA op running, and the rest."""
    ops = [(e["ts"], e["ts"] + e.get("dur", 0.0)) for e in events
           if "hlo_op" in (e.get("args") or {})]
    out = []
    for e in sorted((e for e in events if e.get("name") in names), key=lambda e: e["ts"]):
        s, t = e["ts"], e["ts"] + e.get("dur", 0.0)
        inside = [(max(a, s), min(b, t)) for a, b in ops if b > s and a < t]
        out.append(StepStat(e["name"], (t - s) / 1e3, _union_us(inside) / 1e3))
    return out


def scope_times(events: list[dict], hlo_texts: Sequence[str], depth: int = 2) -> dict[str, float]:
    """Op time (ms) per named scope, summed over all XLA op events of the given modules."""
    maps: dict[str, dict[str, str]] = {}
    for text in hlo_texts:
        module, m = hlo_scope_map(text, depth)
        maps[module] = m
    acc: dict[str, float] = collections.defaultdict(float)
    for e in events:
        args = e.get("args") or {}
        op, module = args.get("hlo_op"), args.get("hlo_module")
        if op is None or module not in maps:
            continue
        acc[maps[module].get(op, "(unattributed)")] += e.get("dur", 0.0) / 1e3
    return dict(sorted(acc.items(), key=lambda kv: -kv[1]))


def module_times(events: list[dict]) -> dict[str, float]:
    """Op time (ms) per compiled XLA program (``hlo_module``: ``jit_prefill``, ``jit_decode``...)."""
    acc: dict[str, float] = collections.defaultdict(float)
    for e in events:
        args = e.get("args") or {}
        if "hlo_op" in args:
            acc[str(args.get("hlo_module"))] += e.get("dur", 0.0) / 1e3
    return dict(sorted(acc.items(), key=lambda kv: -kv[1]))


def busy_ms(events: list[dict]) -> float:
    """Time (ms) during which at least one XLA op ran, over the whole trace."""
    return _union_us([(e["ts"], e["ts"] + e.get("dur", 0.0)) for e in events
                      if "hlo_op" in (e.get("args") or {})]) / 1e3


def trace_contains(info: TraceInfo, needles: Sequence[str]) -> dict[str, bool]:
    """Which strings occur in the trace files (the ``.xplane.pb`` keeps op_name metadata)."""
    blobs = []
    for p in info.files():
        data = p.read_bytes()
        blobs.append(gzip.decompress(data) if p.suffix == ".gz" else data)
    return {n: any(n.encode() in b for b in blobs) for n in needles}


# --------------------------------------------------------------------------- drivers

@dataclasses.dataclass
class ProfileResult:
    phase: str
    trace: TraceInfo
    steps: list[StepStat]
    scopes: dict[str, float]
    workload: dict

    modules: dict[str, float] = dataclasses.field(default_factory=dict)
    busy_ms: float = 0.0

    def summary(self) -> str:
        lines = [f"phase {self.phase}: " + ", ".join(f"{k}={v}" for k, v in self.workload.items())]
        if self.phase == "engine":
            wall = self.workload.get("wall_s", 0.0) * 1e3
            lines.append(f"  generate: {wall:.1f} ms wall, {self.busy_ms:.1f} ms with an XLA op "
                         f"running ({self.busy_ms / max(wall, 1e-9):.0%}); the rest is host work "
                         "(scheduling, tokenizer, dispatch) and waiting")
            for k, v in self.modules.items():
                lines.append(f"    {k:<28} {v:9.2f} ms")
            n = collections.Counter(s.name for s in self.steps)
            if n:
                lines.append("  TraceAnnotations: " + ", ".join(f"{k} x{v}" for k, v in n.items())
                             + " (an annotation that closes before the device finishes covers "
                               "the dispatch only)")
            return "\n".join(lines)
        if self.steps:
            wall = sum(s.wall_ms for s in self.steps)
            busy = sum(s.busy_ms for s in self.steps)
            n = len(self.steps)
            lines.append(f"  {n} annotated steps: {wall / n:.2f} ms/step wall, "
                         f"{busy / n:.2f} ms with an XLA op running, "
                         f"{(wall - busy) / n:.2f} ms host/other ({(wall - busy) / max(wall, 1e-9):.0%})")
        if self.scopes:
            total = sum(self.scopes.values())
            lines.append(f"  op time by named scope (summed over layers, {total:.2f} ms total):")
            for k, v in self.scopes.items():
                lines.append(f"    {k:<28} {v:9.2f} ms  {v / total:6.1%}")
        return "\n".join(lines)


def _prompt_tokens(batch: int, length: int, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(min(3, vocab - 1), vocab, size=(batch, length), dtype=np.int32)


def profile_model(cfg, params, *, phase: str, out_dir: str | Path, steps: int = 4,
                  batch: int = 1, prompt_len: int = 64, impl: str = "xla",
                  quiet: bool = False) -> ProfileResult:
    """Trace ``steps`` real prefills (``phase="prefill"``) or decode steps (``"decode"``).

    Compiles (and runs once) outside the trace, then records each step inside a
    ``TraceAnnotation`` with a host sync after it, the way a generation loop
    reads back its tokens, so the gaps between steps are visible.
    """
    if phase not in ("prefill", "decode"):
        raise ValueError(f"phase must be 'prefill' or 'decode' here, got {phase!r}")
    cache_len = -(-(prompt_len + steps + 1) // 128) * 128
    prefill, decode = model_steps(cfg, cache_len=cache_len, impl=impl)
    tokens = jnp.asarray(_prompt_tokens(batch, prompt_len, cfg.vocab_size))

    texts = [prefill.lower(params, tokens).compile().as_text()]
    state = jax.block_until_ready(prefill(params, tokens))
    if phase == "decode":
        texts.append(decode.lower(params, state).compile().as_text())
        state = jax.block_until_ready(decode(params, state))  # warm-up

    with trace(out_dir, quiet=quiet) as info:
        for _ in range(steps):
            if phase == "prefill":
                with jax.profiler.TraceAnnotation("prefill"):
                    jax.device_get(prefill(params, tokens).last_token)
            else:
                with jax.profiler.TraceAnnotation("decode"):
                    state = decode(params, state)
                    jax.device_get(state.last_token)
    events = load_trace_events(info) if info.perfetto else []
    work = {"batch": batch, "prompt_len": prompt_len, "steps": steps, "cache_len": cache_len,
            "layers": "scan" if isinstance(params["layers"], dict) else "unrolled"}
    return ProfileResult(phase, info, step_stats(events, (phase,)),
                         scope_times(events, texts), work, modules=module_times(events),
                         busy_ms=busy_ms(events))


def profile_engine(model: str | None, *, out_dir: str | Path, steps: int = 16, batch: int = 4,
                   prompt_len: int = 64, dtype: str = "float32", quiet: bool = False,
                   llm: Any = None) -> ProfileResult:
    """Trace ``LLM.generate`` on ``batch`` prompts of ~``prompt_len`` tokens, ``steps`` new tokens.

    The generation loop wraps its phases in ``TraceAnnotation("prefill"/"decode")``.
    """
    if llm is None:
        llm = LLM(model, dtype=dtype)
    vocab = llm.config.vocab_size
    prompts = [list(map(int, row)) for row in _prompt_tokens(batch, prompt_len, vocab, seed=1)]
    sp = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
    llm.generate(prompts, sp)  # compile outside the trace
    with trace(out_dir, quiet=quiet) as info:
        t0 = time.perf_counter()
        llm.generate(prompts, sp)
        wall = time.perf_counter() - t0
    events = load_trace_events(info) if info.perfetto else []
    work = {"model": str(getattr(llm, "model_path", model)), "batch": batch,
            "prompt_len": prompt_len, "new_tokens": steps, "wall_s": round(wall, 4)}
    return ProfileResult("engine", info, step_stats(events), {}, work,
                         modules=module_times(events), busy_ms=busy_ms(events))


# --------------------------------------------------------------------------- loading

def load_for_profile(model: str | None, dtype: str = "float32", unrolled: bool = True,
                     seed: int = 0):
    """``(config, params)`` from a built-in config name (random weights) or a checkpoint path."""
    if model is None or model.lower() in NAMED_CONFIGS:
        cfg = NAMED_CONFIGS[(model or "smollm2-135m").lower()]
        params = llama.init_params(cfg, jax.random.PRNGKey(seed), jnp.dtype(dtype))
    else:
        loaded = load_model(model, dtype=dtype)
        cfg, params = loaded.config, loaded.params
    if unrolled:
        params = llama.unstack_layers(params)
    else:
        params = llama.stack_layers(params)
    return cfg, jax.device_put(params)
