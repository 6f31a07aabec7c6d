"""Training checkpoints with orbax ``CheckpointManager``.

A checkpoint at step ``s`` is ``DIR/<s>/`` with two items: ``state`` (the
``TrainState``: step, float32 master params or adapter, optimizer state, RNG key)
and ``meta`` (JSON: data-loader position, model/LoRA config, run settings).
Restoring onto the current shardings resumes exactly: same parameters, same
optimizer moments, same learning-rate step, same next batch, same dropout keys.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Save every ``save_every`` steps (and when forced), keep the last ``keep``."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3) -> None:
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "meta"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict, force: bool = True) -> bool:
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

    def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict]:
        """``(state, meta)`` of ``step`` (latest when None) placed like ``abstract_state``
        (a pytree of ``jax.ShapeDtypeStruct`` with shardings, or of arrays)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = jax.tree.map(_abstract, abstract_state)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        return out["state"], dict(out["meta"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _abstract(x: Any) -> Any:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
