"""Generation benchmark: jaxllm vs HF transformers, same model, dtype and threads.

The same as ``jaxllm bench`` (see ``jaxllm/benchmarks/generate.py`` for the workloads):

    python scripts/bench_generate.py --threads 2
    python scripts/bench_generate.py --threads 2 --dtype bfloat16
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jaxllm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
