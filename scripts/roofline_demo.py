#!/usr/bin/env python
"""Reproduce the numbers in docs/roofline.md.

    python scripts/roofline_demo.py [--plot-dir DIR]

Prints the textbook figures (Llama-2-7B, A100), the smollm2-135m roofline on H100-SXM
(bf16) and on this CPU (f32, roofs measured now), the XLA cost-analysis cross-check, and
optionally writes the two roofline plots.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxllm.named_configs import NAMED_CONFIGS  # noqa: E402
from jaxllm.roofline import (analyze, compare_with_xla, format_xla_comparison,  # noqa: E402
                             plot_roofline, textbook_figures)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plot-dir", default=None)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--gen-len", type=int, default=128)
    args = ap.parse_args(argv)

    print("Textbook figures (B=8, T=1024, H=4096, D=128, H'=11008, fp16):")
    for k, v in textbook_figures().items():
        print(f"  {k:<20}{v:10.2f}")
    runs = [("H100-SXM", "bf16", "bf16"), ("cpu", "f32", "f32")]
    for hw, wd, kd in runs:
        rep = analyze("smollm2-135m", hw, batch=1, prompt_len=args.prompt_len,
                      gen_len=args.gen_len, weight_dtype=wd, kv_dtype=kd)
        print()
        print(rep.table())
        if rep.hardware.measured:
            print(f"({rep.hardware.source})")
        if args.plot_dir:
            path = plot_roofline(rep, Path(args.plot_dir) / f"roofline_smollm2_{hw.lower()}.png")
            print(f"plot: {path}")
    print("\nXLA cross-check, smollm2-135m f32, B=1, T=128:")
    print(format_xla_comparison(compare_with_xla(NAMED_CONFIGS["smollm2-135m"], batch=1,
                                                 prompt_len=128, dtype="float32")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
