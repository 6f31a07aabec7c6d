"""Benchmark harness: one way to time, one results file, one report.

Every benchmark script (bench_generate, bench_engine, bench_kernels, bench_train,
``jaxllm bench``) times through :class:`Bench` and appends rows to a JSON-lines
results file (default ``results/benchmarks.jsonl``; ``$JAXLLM_RESULTS`` or
``results_file=`` override it).  ``scripts/report.py`` renders the file as
markdown tables grouped by benchmark.

Usage::

    from jaxllm.bench import Bench

    with Bench("kernels", workload={"case": "flash fwd", "T": 1024, "dtype": "bf16"}) as b:
        t = b.time(fn, q, k, v, warmup=1, repeat=5)      # -> Timing (median, p10, p90 seconds)
        b.record({"tok_s": 1024 / t.median}, baseline="jnp reference", ratio=ref / t.median)

    # or without timing through the harness:
    Bench("generate", workload={...}).record({"value": 41.2, "unit": "tok/s"},
                                             baseline="hf-transformers", ratio=2.3)

* :meth:`Bench.time` calls ``fn(*args)`` ``warmup`` times (compiles), then
  ``repeat`` times, each followed by ``jax.block_until_ready`` on the result, and
  returns a :class:`Timing`.  Its stats are added to the row's metrics as
  ``median_s``, ``p10_s``, ``p90_s``, ``mean_s``, ``min_s``, ``repeat``.  With
  ``xla_cost=True`` (``fn`` jitted) the compiled program's ``flops`` and ``bytes``
  go in too, which puts the row on ``jaxllm roofline --plot --measured FILE``.
* :meth:`Bench.record` appends one row.  Leaving a ``with Bench(...)`` block after
  ``time()`` without calling ``record()`` records the timing alone.

A row::

    {"benchmark": "kernels", "workload": {...}, "metrics": {"median_s": ..., ...},
     "baseline": "jnp reference" | null, "ratio": 1.7 | null,
     "date": "2026-01-01T12:00:00+00:00", "git_commit": "abc123..." | null,
     "env": {"platform": "cpu", "device_kind": "cpu", "device_count": 1,
             "cpu_model": "AMD EPYC", "threads": 2, "jax": "0.10.2", "jaxlib": "0.10.2",
             "python": "3.12.3", "hostname": "..."}}

Rendering (used by ``scripts/report.py``): :func:`render_markdown` and
:func:`update_markdown_sections` (replaces ``<!-- report:NAME -->`` ...
``<!-- /report:NAME -->`` blocks).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jaxlib
import numpy as np

from jaxllm.hardware import cpu_model_name, cpu_threads
from jaxllm.xla_cost import xla_cost as xla_cost_of

DEFAULT_RESULTS = "results/benchmarks.jsonl"


def results_path(path: str | os.PathLike | None = None) -> Path:
    """``path``, else ``$JAXLLM_RESULTS``, else ``results/benchmarks.jsonl`` (cwd-relative)."""
    return Path(path or os.environ.get("JAXLLM_RESULTS") or DEFAULT_RESULTS)


# --------------------------------------------------------------------------- timing

@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of ``repeat`` timed calls."""

    times: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def p10(self) -> float:
        return _quantile(self.times, 0.1)

    @property
    def p90(self) -> float:
        return _quantile(self.times, 0.9)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.times)

    @property
    def min(self) -> float:
        return min(self.times)

    def metrics(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}median_s": self.median, f"{prefix}p10_s": self.p10,
                f"{prefix}p90_s": self.p90, f"{prefix}mean_s": self.mean,
                f"{prefix}min_s": self.min, f"{prefix}repeat": len(self.times)}

    def __str__(self) -> str:
        return (f"median {self.median * 1e3:.3f} ms (p10 {self.p10 * 1e3:.3f}, "
                f"p90 {self.p90 * 1e3:.3f}, n={len(self.times)})")


def _quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default method)."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def time_fn(fn: Callable, *args, warmup: int = 1, repeat: int = 5, **kwargs) -> Timing:
    """Run ``fn(*args, **kwargs)`` ``warmup`` times, then time ``repeat`` calls (blocking on results)."""
    if repeat < 1:
        raise ValueError("repeat must be >= 1")
    for _ in range(warmup):
        jax.block_until_ready(fn(*args, **kwargs))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args, **kwargs))
        times.append(time.perf_counter() - t0)
    return Timing(tuple(times))


# --------------------------------------------------------------------------- environment

def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    """HEAD's commit hash (read-only git query); None outside a repository or before a commit."""
    try:
        out = subprocess.run(["git", "--no-optional-locks", "rev-parse", "HEAD"], cwd=cwd,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{7,64}", sha) else None


@functools.lru_cache(maxsize=1)
def environment() -> dict[str, Any]:
    """Device, CPU, thread count and versions, recorded with every row."""
    env: dict[str, Any] = {"cpu_model": cpu_model_name(), "threads": cpu_threads(),
                           "python": platform.python_version(), "hostname": socket.gethostname()}
    try:
        dev = jax.devices()[0]
        env.update(platform=dev.platform, device_kind=dev.device_kind,
                   device_count=jax.device_count(), jax=jax.__version__,
                   jaxlib=getattr(jaxlib, "__version__", None))
    except Exception as e:  # noqa: BLE001 - record what we can
        env["jax_error"] = repr(e)
    return env


# --------------------------------------------------------------------------- Bench

class Bench:
    """A named benchmark with a workload description; times calls and appends result rows."""

    def __init__(self, name: str, workload: Mapping[str, Any] | None = None, *,
                 results_file: str | os.PathLike | None = None, verbose: bool = False) -> None:
        if not name:
            raise ValueError("a benchmark needs a name")
        self.name = name
        self.workload = dict(workload or {})
        self.results_file = results_path(results_file)
        self.verbose = verbose
        self.metrics: dict[str, Any] = {}
        self.timings: dict[str, Timing] = {}
        self.rows: list[dict[str, Any]] = []

    def __enter__(self) -> "Bench":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self.metrics and not self.rows:
            self.record()

    def time(self, fn: Callable, *args, warmup: int = 1, repeat: int = 5, name: str = "",
             xla_cost: bool = False, **kwargs) -> Timing:
        """Time ``fn(*args, **kwargs)``; add its stats (prefixed ``name_`` if given) to the metrics."""
        t = time_fn(fn, *args, warmup=warmup, repeat=repeat, **kwargs)
        prefix = f"{name}_" if name else ""
        self.timings[name or "time"] = t
        self.metrics.update(t.metrics(prefix))
        if xla_cost:
            if not hasattr(fn, "lower"):
                raise TypeError("xla_cost=True needs a jax.jit-ed fn")
            c = xla_cost_of(functools.partial(fn, **kwargs) if kwargs else fn, *args)
            self.metrics.update({f"{prefix}flops": c["flops"], f"{prefix}bytes": c["bytes"]})
        if self.verbose:
            print(f"[bench] {self.name} {name or ''} {t}")
        return t

    def record(self, metrics: Mapping[str, Any] | None = None, *, baseline: str | None = None,
               ratio: float | None = None, **extra: Any) -> dict[str, Any]:
        """Append one row: the collected timing metrics plus ``metrics``; returns the row."""
        merged = {**self.metrics, **dict(metrics or {})}
        row = {
            "benchmark": self.name,
            "workload": self.workload,
            "metrics": merged,
            "baseline": baseline,
            "ratio": None if ratio is None else float(ratio),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": git_commit(),
            "env": environment(),
            **extra,
        }
        append_row(row, self.results_file)
        self.rows.append(row)
        return row


def append_row(row: Mapping[str, Any], path: str | os.PathLike | None = None) -> Path:
    p = results_path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(row, default=_json_default, sort_keys=False)
    with open(p, "a", encoding="utf-8") as f:
        f.write(line + "\n")
    return p


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def read_results(path: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """All rows of a results file (blank and malformed lines are skipped)."""
    p = results_path(path)
    rows = []
    with open(p, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


# --------------------------------------------------------------------------- rendering

def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        if v == 0:
            return "0"
        a = abs(v)
        if a >= 1e5 or a < 1e-3:
            return f"{v:.3g}"
        return f"{v:.4g}" if a < 100 else f"{v:,.1f}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, separators=(",", ":"))
    return str(v).replace("|", "\\|")


def _is_time(key: str) -> bool:
    """Metrics named ``*_s`` are seconds; tables show them in milliseconds."""
    return key.endswith("_s") and not key.endswith(("tok_s", "flop_s", "per_s"))


def _device(row: Mapping[str, Any]) -> str:
    env = row.get("env") or {}
    kind = env.get("device_kind") or env.get("platform") or "?"
    if env.get("platform") == "cpu":
        kind = f"cpu {env.get('cpu_model', '')} x{env.get('threads', '?')}".strip()
    return kind


def latest_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Keep the newest row per (benchmark, workload, device)."""
    keep: dict[str, dict] = {}
    for r in rows:
        key = json.dumps([r.get("benchmark"), r.get("workload"), _device(r)], sort_keys=True,
                         default=str)
        keep[key] = dict(r)  # later lines win
    return list(keep.values())


def render_markdown(rows: Iterable[Mapping[str, Any]], benchmarks: Sequence[str] | None = None,
                    *, heading_level: int = 3, headings: bool = True) -> dict[str, str]:
    """Markdown table per benchmark name: workload columns, metric columns, baseline, ratio,
    device, date, commit.  Returns ``{benchmark: markdown}`` in first-seen order."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r.get("benchmark", "?"), []).append(r)
    out = {}
    for name, rs in groups.items():
        if benchmarks and name not in benchmarks:
            continue
        wkeys = list(dict.fromkeys(k for r in rs for k in (r.get("workload") or {})))
        mkeys = list(dict.fromkeys(k for r in rs for k in (r.get("metrics") or {})))
        has_base = any(r.get("baseline") for r in rs)
        mcols = [f"{k[:-2]} (ms)" if _is_time(k) else k for k in mkeys]
        cols = wkeys + mcols + (["baseline", "ratio"] if has_base else []) + [
            "device", "date", "commit"]
        lines = []
        if headings:
            lines += [f"{'#' * heading_level} {name}", ""]
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("|" + "|".join("---" for _ in cols) + "|")
        for r in rs:
            wl, m = r.get("workload") or {}, r.get("metrics") or {}
            cells = [_fmt(wl.get(k)) for k in wkeys] + [
                _fmt(m.get(k) * 1e3 if _is_time(k) and isinstance(m.get(k), (int, float))
                     else m.get(k)) for k in mkeys]
            if has_base:
                ratio = r.get("ratio")
                cells += [_fmt(r.get("baseline")), "" if ratio is None else f"{ratio:.2f}x"]
            cells += [_device(r), str(r.get("date", ""))[:10], (r.get("git_commit") or "")[:8]]
            lines.append("| " + " | ".join(cells) + " |")
        out[name] = "\n".join(lines)
    return out


def update_markdown_sections(text: str, tables: Mapping[str, str], *,
                             add_missing: bool = False) -> tuple[str, list[str]]:
    """Replace ``<!-- report:NAME -->...<!-- /report:NAME -->`` blocks with ``tables[NAME]``.

    Returns ``(new_text, names_replaced)``; with ``add_missing`` benchmarks without
    a block get one appended at the end.
    """
    done = []
    for name, table in tables.items():
        pat = re.compile(rf"(<!-- report:{re.escape(name)} -->)(.*?)(<!-- /report:{re.escape(name)} -->)",
                         re.S)
        if pat.search(text):
            text = pat.sub(lambda m: f"{m.group(1)}\n{table}\n{m.group(3)}", text)
            done.append(name)
        elif add_missing:
            text = text.rstrip("\n") + (f"\n\n## {name}\n\n<!-- report:{name} -->\n{table}\n"
                                        f"<!-- /report:{name} -->\n")
            done.append(name)
    return text, done
