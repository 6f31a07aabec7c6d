"""Multi-host set-up: ``jax.distributed.initialize`` from flags or the environment.

Every process runs the same program (multi-controller JAX).  After
:func:`initialize`, ``jax.devices()`` lists the devices of *all* processes, so
``sharding.make_mesh`` spans hosts; each process loads the same weights from disk
and ``sharding.place_params`` only materialises the shards its own devices hold.
Only process 0 should talk to the user (:func:`is_main_process`).

Sources, first match wins: explicit arguments / CLI flags, then ``JAXLLM_COORDINATOR``,
``JAXLLM_NUM_PROCESSES``, ``JAXLLM_PROCESS_ID``, ``JAXLLM_LOCAL_DEVICE_IDS``, then JAX's own
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``.  With none of
them set it is a single-process run and nothing is initialised -- unless
``JAXLLM_DISTRIBUTED=auto``, which lets JAX detect the cluster (SLURM, Open MPI,
Kubernetes/GKE, Cloud TPU) itself.

Example, two hosts (or two processes on one host)::

    jaxllm generate "..." --tp 4 --pp 2 --coordinator host0:1234 --num-processes 2 --process-id 0
    jaxllm generate "..." --tp 4 --pp 2 --coordinator host0:1234 --num-processes 2 --process-id 1
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

import jax

ENV = {
    "coordinator": ("JAXLLM_COORDINATOR", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("JAXLLM_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    "process_id": ("JAXLLM_PROCESS_ID", "JAX_PROCESS_ID"),
    "local_device_ids": ("JAXLLM_LOCAL_DEVICE_IDS", "JAX_LOCAL_DEVICE_IDS"),
}

_initialized_here = False


def _env(name: str) -> str | None:
    for var in ENV[name]:
        val = os.environ.get(var)
        if val not in (None, ""):
            return val
    return None


def _as_int(name: str, val: Any) -> int | None:
    if val is None:
        return None
    try:
        return int(val)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {val!r}") from None


def resolve(coordinator: str | None = None, num_processes: int | None = None,
            process_id: int | None = None,
            local_device_ids: Sequence[int] | str | None = None) -> dict[str, Any] | None:
    """Merge arguments and environment; None for a single-process run.  Validates."""
    coordinator = coordinator or _env("coordinator")
    num_processes = _as_int("num_processes", num_processes if num_processes is not None
                            else _env("num_processes"))
    process_id = _as_int("process_id", process_id if process_id is not None
                         else _env("process_id"))
    ids = local_device_ids if local_device_ids is not None else _env("local_device_ids")
    if isinstance(ids, str):
        ids = [int(x) for x in ids.split(",") if x.strip()]
    if coordinator is None and num_processes in (None, 1) and process_id in (None, 0):
        return None
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if num_processes == 1 and not coordinator:
        return None
    missing = [n for n, v in (("coordinator", coordinator), ("num_processes", num_processes),
                              ("process_id", process_id)) if v is None]
    if missing:
        raise ValueError(
            "multi-process run needs a coordinator address, the number of processes and this "
            f"process's id; missing: {', '.join(missing)} (flags --coordinator/--num-processes/"
            "--process-id or env JAXLLM_COORDINATOR/JAXLLM_NUM_PROCESSES/JAXLLM_PROCESS_ID)")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    if ":" not in coordinator:
        raise ValueError(f"coordinator must be HOST:PORT, got {coordinator!r}")
    return {"coordinator_address": coordinator, "num_processes": num_processes,
            "process_id": process_id, "local_device_ids": list(ids) if ids else None}


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *,
               local_device_ids: Sequence[int] | str | None = None,
               timeout_s: int = 300) -> bool:
    """Call ``jax.distributed.initialize`` when this is a multi-process run.

    Must run before anything touches a JAX device.  Returns True when the process is
    part of a multi-process job (already initialised counts), False for a single process.
    """
    global _initialized_here
    if jax.distributed.is_initialized():
        return True
    kw = resolve(coordinator, num_processes, process_id, local_device_ids)
    if kw is None:
        if os.environ.get("JAXLLM_DISTRIBUTED", "").lower() == "auto":
            jax.distributed.initialize(initialization_timeout=timeout_s)
            _initialized_here = True
            return True
        return False
    jax.distributed.initialize(initialization_timeout=timeout_s, **kw)
    _initialized_here = True
    return True


def shutdown() -> None:
    """Leave the job (only if :func:`initialize` joined it)."""
    global _initialized_here
    if _initialized_here and jax.distributed.is_initialized():
        jax.distributed.shutdown()
    _initialized_here = False


def init_from_args(args: argparse.Namespace) -> bool:
    """:func:`initialize` from the flags of :func:`jaxllm.cli.add_distributed_args` (and the env)."""
    return initialize(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
                      getattr(args, "process_id", None))


def parallel_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``dict(tp=..., pp=..., dp=..., microbatches=...)`` from the flags, for ``LLM(...)``."""
    return {k: getattr(args, k, None) for k in ("tp", "pp", "dp", "microbatches")
            if getattr(args, k, None) is not None}


def process_index() -> int:
    return jax.process_index()


def process_count() -> int:
    return jax.process_count()


def is_main_process() -> bool:
    """True on process 0 (and in single-process runs): the one that prints and serves."""
    return jax.process_index() == 0


def broadcast_object(obj: Any = None) -> Any:
    """Process 0's ``obj`` (any picklable value) on every process.

    For a multi-host server: process 0 receives requests and decides each engine step;
    the other processes run a follower loop ``while True: step(broadcast_object())`` so
    that every process launches the same jitted programs in the same order.  Collective:
    every process must call it.  Single process: returns ``obj`` unchanged."""
    if jax.process_count() == 1:
        return obj
    import pickle

    import numpy as np
    from jax.experimental import multihost_utils

    data = np.frombuffer(pickle.dumps(obj), np.uint8) if is_main_process() else np.zeros(0, np.uint8)
    n = int(multihost_utils.broadcast_one_to_all(np.int64(data.size)))
    buf = data if is_main_process() else np.zeros(n, np.uint8)
    buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    return obj if is_main_process() else pickle.loads(buf.tobytes())


def main_print(*args: Any, file=None, **kwargs: Any) -> None:
    """``print`` on the main process only."""
    if is_main_process():
        print(*args, file=file or sys.stdout, **kwargs)
