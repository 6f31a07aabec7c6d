"""The device mesh: one 3-D mesh ``("data", "pipeline", "tensor")`` for every layout.

``tensor`` is the innermost (fastest-varying) axis, so a tensor-parallel group is a
run of consecutive devices -- the devices of one host / one NVLink island in the
usual ``jax.devices()`` order -- and its per-layer all-reduces stay on the fast
links.  ``pipeline`` is next (stages may sit on different hosts: only activations
cross), ``data`` outermost (replicas never talk during inference).

All axes are ``AxisType.Auto`` (classic GSPMD propagation outside ``shard_map``);
``jax.make_mesh`` would default to Explicit axes.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

DATA, PIPELINE, TENSOR = "data", "pipeline", "tensor"
AXES = (DATA, PIPELINE, TENSOR)


def make_mesh(dp: int = 1, tp: int = 1, pp: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(dp, pp, tp)`` mesh with axes ``("data", "pipeline", "tensor")``.

    ``devices`` defaults to ``jax.devices()`` -- every device of every process after
    :func:`sharding.distributed.initialize` -- and ``dp * pp * tp`` must equal their
    number.  Pass ``devices=jax.devices()[:n]`` to use a subset (single process only).
    """
    for name, n in (("dp", dp), ("tp", tp), ("pp", pp)):
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {n!r}")
    explicit = devices is not None
    devices = list(jax.devices() if devices is None else devices)
    need = dp * pp * tp
    if need != len(devices):
        where = "the given devices" if explicit else (
            f"jax.devices() ({jax.process_count()} process(es), backend {jax.default_backend()})")
        hint = "" if need > len(devices) or explicit else (
            f"; pass devices=jax.devices()[:{need}] to use a subset")
        raise ValueError(
            f"dp*pp*tp = {dp}*{pp}*{tp} = {need} devices requested but {where} has "
            f"{len(devices)}{hint}")
    if explicit or jax.process_count() > 1:
        # keep the caller's (or process-major) order: tensor groups = consecutive devices
        arr = np.asarray(devices, dtype=object).reshape(dp, pp, tp)
    else:
        from jax.experimental import mesh_utils
        try:  # topology-aware on TPU/GPU; a plain reshape on CPU
            arr = mesh_utils.create_device_mesh((dp, pp, tp), devices)
        except (ValueError, NotImplementedError, AssertionError):
            arr = np.asarray(devices, dtype=object).reshape(dp, pp, tp)
    return Mesh(arr, AXES, axis_types=(AxisType.Auto,) * 3)


def mesh_shape(mesh: Mesh) -> tuple[int, int, int]:
    """``(dp, pp, tp)`` of a mesh made by :func:`make_mesh` (missing axes count as 1)."""
    shape = dict(mesh.shape)
    return shape.get(DATA, 1), shape.get(PIPELINE, 1), shape.get(TENSOR, 1)


def describe(mesh: Mesh) -> str:
    dp, pp, tp = mesh_shape(mesh)
    procs = sorted({d.process_index for d in mesh.devices.flat})
    return (f"mesh data={dp} x pipeline={pp} x tensor={tp} over {mesh.devices.size} "
            f"{mesh.devices.flat[0].platform} device(s) in {len(procs)} process(es)")
