"""Data parallelism: independent replicas over the ``data`` mesh axis.

Three users:

* **Static generate path** (``sharding.ShardedModel``): the padded batch is split over
  ``data`` inside the model's ``shard_map``; params are replicated over ``data``.  No
  collective crosses replicas.
* **Engine** (continuous batching): run one engine per replica, each on its own
  ``(1, pp, tp)`` sub-mesh (:func:`replica_meshes`), and spread requests over them
  with :func:`partition_requests` / put outputs back in order with
  :func:`gather_results`.  Replicas never synchronise, so a long request on one does
  not stall the others.  In a multi-host job each process drives the replicas whose
  devices it owns (:func:`local_replicas`).
* **Training**: ``jit`` with ``in_shardings=(param_shardings, batch_sharding(mesh))``
  shards the batch over ``data``; XLA inserts the gradient all-reduce (or
  reduce-scatter) over ``data`` by itself.  :func:`shard_batch` builds the global batch
  from host arrays, single- or multi-process.
"""

from __future__ import annotations

import heapq
from typing import Any, Callable, Sequence, TypeVar

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sharding.mesh import AXES, DATA, mesh_shape

T = TypeVar("T")


# --------------------------------------------------------------------------- training / static

def batch_spec(ndim: int = 2) -> P:
    """``P("data", None, ...)``: leading (batch) axis over the replicas."""
    return P(DATA, *([None] * (ndim - 1)))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a ``[batch, ...]`` array split over ``data`` (replicated elsewhere)."""
    return NamedSharding(mesh, batch_spec(ndim))


def shard_batch(batch: Any, mesh: Mesh, *, process_local: bool = False) -> Any:
    """Host arrays -> global arrays sharded over ``data`` on the batch axis.

    ``process_local=False``: every process passes the same *global* batch; each
    device gets its rows.  ``process_local=True``: each process passes only its own
    rows (``global_batch / process_count`` of them, in process order), the usual
    multi-host input pipeline.
    """
    dp = mesh_shape(mesh)[0]

    def put(x):
        x = np.asarray(x)
        sharding = batch_sharding(mesh, x.ndim)
        if process_local:
            return jax.make_array_from_process_local_data(sharding, x)
        if x.shape[0] % dp:
            raise ValueError(f"batch of {x.shape[0]} rows does not split over dp={dp}")
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(put, batch)


# --------------------------------------------------------------------------- engine replicas

def replica_meshes(mesh: Mesh) -> list[Mesh]:
    """One ``(1, pp, tp)`` mesh per data replica, same axis names and types."""
    return [Mesh(mesh.devices[i:i + 1], AXES, axis_types=mesh.axis_types)
            for i in range(mesh.devices.shape[0])]


def local_replicas(mesh: Mesh) -> list[int]:
    """Replica indices whose devices all belong to this process (multi-host engine)."""
    me = jax.process_index()
    return [i for i in range(mesh.devices.shape[0])
            if all(d.process_index == me for d in mesh.devices[i].flat)]


def partition_requests(requests: Sequence[T], dp: int,
                       cost: Callable[[T], float] | None = None) -> list[list[int]]:
    """Spread requests over ``dp`` replicas: indices per replica, balanced by ``cost``
    (default 1 per request; pass e.g. ``lambda r: len(r.prompt) + r.max_tokens``).

    Longest-processing-time-first greedy: each request, costliest first, goes to the
    replica with the least work so far (ties -> lowest replica index).  Within a
    replica, indices keep their original order.  Deterministic, so every process of a
    multi-host job computes the same assignment.
    """
    if dp < 1:
        raise ValueError(f"dp must be >= 1, got {dp}")
    costs = [1.0 if cost is None else float(cost(r)) for r in requests]
    order = sorted(range(len(requests)), key=lambda i: (-costs[i], i))
    heap = [(0.0, k) for k in range(dp)]
    parts: list[list[int]] = [[] for _ in range(dp)]
    for i in order:
        load, k = heapq.heappop(heap)
        parts[k].append(i)
        heapq.heappush(heap, (load + costs[i], k))
    return [sorted(p) for p in parts]


def gather_results(parts: Sequence[Sequence[int]], results: Sequence[Sequence[T]]) -> list[T]:
    """Inverse of :func:`partition_requests`: per-replica results -> original order."""
    n = sum(len(p) for p in parts)
    out: list[Any] = [None] * n
    for idx, res in zip(parts, results):
        if len(idx) != len(res):
            raise ValueError(f"replica returned {len(res)} results for {len(idx)} requests")
        for i, r in zip(idx, res):
            out[i] = r
    return out
