#!/usr/bin/env python
"""Render the benchmark results file as markdown tables, one per benchmark.

    python scripts/report.py                              # all rows -> stdout
    python scripts/report.py --latest --bench generate    # newest row per workload+device
    python scripts/report.py --latest --write docs/benchmarks.md
        # replaces each <!-- report:NAME --> ... <!-- /report:NAME --> block in the file
        # with the table of benchmark NAME (--add-missing appends blocks for the others)

The results file defaults to results/benchmarks.jsonl ($JAXLLM_RESULTS overrides);
rows are written by jaxllm.bench.Bench.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxllm.bench import (latest_rows, read_results, render_markdown, results_path,  # noqa: E402
                          update_markdown_sections)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=None, help="JSON-lines results file")
    ap.add_argument("--bench", action="append", default=None,
                    help="only this benchmark (repeatable)")
    ap.add_argument("--latest", action="store_true",
                    help="keep only the newest row per (benchmark, workload, device)")
    ap.add_argument("--write", default=None, metavar="MD",
                    help="replace the <!-- report:NAME --> sections of this markdown file")
    ap.add_argument("--add-missing", action="store_true",
                    help="with --write: append sections for benchmarks that have none")
    args = ap.parse_args(argv)

    path = results_path(args.results)
    if not path.is_file():
        print(f"report: no results file at {path}", file=sys.stderr)
        return 1
    rows = read_results(path)
    if args.latest:
        rows = latest_rows(rows)
    if args.write is None:
        tables = render_markdown(rows, args.bench, heading_level=2)
        print("\n\n".join(tables.values()))
        return 0
    md = Path(args.write)
    text = md.read_text() if md.is_file() else ""
    tables = render_markdown(rows, args.bench, headings=False)
    new, done = update_markdown_sections(text, tables, add_missing=args.add_missing)
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(new)
    skipped = [n for n in tables if n not in done]
    print(f"report: updated {md}: {', '.join(done) or 'nothing'}"
          + (f"; no section for: {', '.join(skipped)} (use --add-missing)" if skipped else ""),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
