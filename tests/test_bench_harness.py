"""Benchmark harness: timing, JSONL rows, markdown report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxllm.bench import (Bench, Timing, latest_rows, read_results, render_markdown, time_fn,
                          update_markdown_sections)

ROOT = Path(__file__).resolve().parents[1]


def test_timing_stats():
    t = Timing((0.5, 0.1, 0.2, 0.4, 0.3))
    assert t.median == 0.3 and abs(t.p10 - 0.14) < 1e-12 and abs(t.p90 - 0.46) < 1e-12
    calls = []
    t = time_fn(lambda: calls.append(1), warmup=2, repeat=3)
    assert len(calls) == 5 and len(t.times) == 3


def test_bench_writes_jsonl_row_and_report_renders(tmp_path):
    results = tmp_path / "bench.jsonl"
    f = jax.jit(lambda x: jnp.tanh(x @ x))
    x = jnp.ones((128, 128))
    with Bench("dummy", workload={"case": "tanh matmul", "n": 128}, results_file=results) as b:
        t = b.time(f, x, warmup=1, repeat=4, xla_cost=True)
        b.record({"items_s": 128 / t.median}, baseline="numpy", ratio=1.5)
    Bench("dummy", workload={"case": "other", "n": 1}, results_file=results).record({"value": 3.0})

    rows = read_results(results)
    assert len(rows) == 2
    row = rows[0]
    for key in ("benchmark", "workload", "metrics", "baseline", "ratio", "date", "git_commit",
                "env"):
        assert key in row
    assert row["benchmark"] == "dummy" and row["baseline"] == "numpy" and row["ratio"] == 1.5
    m = row["metrics"]
    assert m["repeat"] == 4 and m["p10_s"] <= m["median_s"] <= m["p90_s"]
    assert m["flops"] == 2 * 128**3 and m["bytes"] > 0
    env = row["env"]
    for key in ("platform", "device_kind", "cpu_model", "threads", "jax"):
        assert env.get(key) not in (None, ""), key

    tables = render_markdown(rows)
    assert "tanh matmul" in tables["dummy"] and "median (ms)" in tables["dummy"]
    assert "1.50x" in tables["dummy"]

    # scripts/report.py: stdout and in-place section replacement
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "report.py"), "--results",
                          str(results)], capture_output=True, text=True, check=True).stdout
    assert "## dummy" in out and "| case |" in out
    md = tmp_path / "benchmarks.md"
    md.write_text("# Benchmarks\n\n<!-- report:dummy -->\nstale\n<!-- /report:dummy -->\n\nend\n")
    subprocess.run([sys.executable, str(ROOT / "scripts" / "report.py"), "--results",
                    str(results), "--latest", "--write", str(md)], check=True,
                   capture_output=True)
    text = md.read_text()
    assert "stale" not in text and "tanh matmul" in text and text.endswith("end\n")


def test_bench_exit_records_timing_only(tmp_path):
    results = tmp_path / "r.jsonl"
    with Bench("auto", workload={"k": 1}, results_file=results) as b:
        b.time(lambda: None, warmup=0, repeat=2)
    rows = read_results(results)
    assert len(rows) == 1 and rows[0]["metrics"]["repeat"] == 2


def test_latest_rows_and_sections():
    rows = [{"benchmark": "a", "workload": {"x": 1}, "metrics": {"v": 1.0}, "date": "1"},
            {"benchmark": "a", "workload": {"x": 1}, "metrics": {"v": 2.0}, "date": "2"},
            {"benchmark": "b", "workload": {"x": 1}, "metrics": {"v": 3.0}, "date": "3"}]
    latest = latest_rows(rows)
    assert len(latest) == 2 and latest[0]["metrics"]["v"] == 2.0
    tables = render_markdown(latest, headings=False)
    text, done = update_markdown_sections("<!-- report:a -->x<!-- /report:a -->", tables,
                                          add_missing=True)
    assert done == ["a", "b"] and "<!-- report:b -->" in text
    json.dumps(tables)


def test_results_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLLM_RESULTS", str(tmp_path / "env.jsonl"))
    Bench("envtest").record({"v": 1})
    assert (tmp_path / "env.jsonl").is_file()
