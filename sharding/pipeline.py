"""GPipe-style pipeline parallelism inside ``jax.shard_map`` (forward only: inference).

The stacked layer axis is split into ``pp`` stages (``layers -> "pipeline"``).  A
batch is cut into ``M`` microbatches; at time step ``t`` stage ``s`` runs microbatch
``j = t - s`` (when ``0 <= j < M``) and hands its activations to stage ``s + 1`` with
``jax.lax.ppermute``.  ``M + pp - 1`` steps in all; in ``pp - 1`` of them each stage
idles (the *bubble*), a fraction ``(pp - 1) / (M + pp - 1)`` of the time.

Idle steps are skipped with ``lax.cond`` (nothing is computed or written).

KV caches are kept per microbatch *position* (a separate buffer each, so every
update is an in-place ``dynamic_update_slice``) and laid out *skewed*: stage ``s``
keeps microbatch ``j`` at position ``(j + s) % M``, so at step ``t`` every stage
touches position ``t % M`` -- a static index, no dynamic slicing of the cache.
Prefill and decode use the same schedule, hence the same layout.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from sharding.mesh import PIPELINE


def bubble_fraction(pp: int, microbatches: int) -> float:
    """Fraction of stage-time spent idle in one GPipe forward: ``(pp-1)/(M+pp-1)``."""
    return (pp - 1) / (microbatches + pp - 1)


def choose_microbatches(local_batch: int, pp: int, target: int | None = None) -> int:
    """Largest microbatch count ``<= target`` (default ``pp``) that divides the batch."""
    if pp == 1:
        return 1
    m = max(1, min(target or pp, local_batch))
    while local_batch % m:
        m -= 1
    return m


def gpipe(stage_fn: Callable[[jax.Array, jax.Array, Any], tuple[jax.Array, Any]],
          xs: jax.Array, caches: list[Any], num_stages: int,
          axis: str = PIPELINE) -> tuple[jax.Array, list[Any]]:
    """Run the GPipe schedule on one stage (call inside ``shard_map`` over ``axis``).

    ``xs [M, mb, ...]``: the microbatched inputs of stage 0 (other stages ignore them).
    ``caches``: one cache pytree per microbatch position (length ``M``; entries may be None).
    ``stage_fn(x, j, cache) -> (y, cache)`` runs this stage's layers on microbatch ``j``
    (a traced int) with the cache at its position.
    Returns the last stage's outputs ``[M, mb, ...]`` on every stage, and the caches.
    """
    m = xs.shape[0]
    caches = list(caches)
    if num_stages == 1:
        ys = []
        for j in range(m):
            y, caches[j] = stage_fn(xs[j], jnp.asarray(j, jnp.int32), caches[j])
            ys.append(y)
        return jnp.stack(ys), caches

    stage = jax.lax.axis_index(axis)
    last = num_stages - 1
    shift = [(i, i + 1) for i in range(last)]
    state = jnp.zeros_like(xs[0])
    out = jnp.zeros_like(xs)
    for t in range(m + last):
        with jax.named_scope(f"pipeline_step_{t}"):
            j = t - stage
            jc = jnp.clip(j, 0, m - 1)
            valid = (j >= 0) & (j < m)
            x = jnp.where(stage == 0, xs[min(t, m - 1)], state)
            pos = t % m

            def run(args, jc=jc):
                x, cache = args
                return stage_fn(x, jc, cache)

            def skip(args):
                return args

            y, caches[pos] = jax.lax.cond(valid, run, skip, (x, caches[pos]))
            keep = valid & (stage == last)
            out = jax.lax.dynamic_update_index_in_dim(
                out, jnp.where(keep, y, jax.lax.dynamic_index_in_dim(out, jc, 0, False)), jc, 0)
            if t < m + last - 1:
                state = jax.lax.ppermute(y, axis, shift)
    # the last stage holds the result; a masked psum hands it to every stage
    out = jax.lax.psum(jnp.where(stage == last, out, jnp.zeros_like(out)), axis)
    return out, caches
