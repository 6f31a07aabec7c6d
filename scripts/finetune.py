#!/usr/bin/env python
"""Fine-tune a model (full or LoRA) on JSONL data: the same as ``jaxllm finetune``.

    python scripts/finetune.py --lora --data tests/data/captain_byte.jsonl -o runs/byte
    python scripts/finetune.py --help
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jaxllm.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
