"""``scripts/bench_serving.py``: the name the serving issue uses for
``scripts/bench_serve.py`` (one script; this only runs it with the same arguments).

    python scripts/bench_serving.py --llama-server PATH/TO/llama-server --dataset text ...
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_serve import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
