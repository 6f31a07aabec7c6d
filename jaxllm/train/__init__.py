"""Fine-tuning: SFT and LoRA with optax, mixed precision, remat, accumulation, sharding,
orbax checkpoints.  See docs/finetuning.md.

Modules (loaded on first use of their names):

* :mod:`jaxllm.train.data`       -- JSONL records -> masked token rows, packing, loader
* :mod:`jaxllm.train.step`       -- the jitted, donated training step (AdamW, accumulation)
* :mod:`jaxllm.train.lora`       -- adapters: init, merge, PEFT format, :func:`load_lora`
* :mod:`jaxllm.train.sharding`   -- data / FSDP / tensor-parallel mesh and shardings
* :mod:`jaxllm.train.checkpoint` -- orbax CheckpointManager wrapper (exact resume)
* :mod:`jaxllm.train.metrics`    -- MFU, JSONL / TensorBoard metrics
* :mod:`jaxllm.train.loop`       -- ``Trainer`` and the ``jaxllm finetune`` command
"""

from __future__ import annotations

__all__ = ["Trainer", "TrainConfig", "LoraConfig", "load_lora"]


def __getattr__(name):  # lazy: `import jaxllm.train.lora` must not load optax and the loop
    if name in ("Trainer", "TrainConfig"):
        from jaxllm.train import loop
        return getattr(loop, name)
    if name in ("LoraConfig", "load_lora"):
        from jaxllm.train import lora
        return getattr(lora, name)
    raise AttributeError(f"module 'jaxllm.train' has no attribute {name!r}")
