"""Tensor, pipeline and data parallelism on one ``("data", "pipeline", "tensor")`` mesh.

>>> import sharding
>>> sm, params = sharding.setup(cfg, host_params, dp=2, tp=2, pp=2)   # 8 devices
>>> batch = StaticBatch(params, cfg, prompts, sps, eos, max_model_len=..., impl=...,
...                     model=sm)                                     # jaxllm.generation

* :mod:`sharding.mesh`        -- ``make_mesh(dp, tp, pp)``
* :mod:`sharding.rules`       -- logical axes, the rules table, ``param_shardings``,
  ``place_params`` (weights cut straight into their shards)
* :mod:`sharding.model`       -- ``ShardedModel``: the decoder inside one ``shard_map``
* :mod:`sharding.tensor_parallel`, :mod:`sharding.pipeline` -- the per-shard pieces
* :mod:`sharding.data_parallel` -- batch shardings (training), request partitioning (engine)
* :mod:`sharding.distributed` -- ``jax.distributed`` set-up from flags / environment

docs/parallelism.md says which layout to pick.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax

from jaxllm.attention import resolve_impl
from jaxllm.generation import StaticBatch
from sharding.mesh import AXES, DATA, PIPELINE, TENSOR, describe, make_mesh, mesh_shape
from sharding.model import ShardedModel, paged_forward
from sharding.pipeline import bubble_fraction
from sharding.rules import (RULES, logical_axes, make_plan, param_shardings, param_specs,
                            per_device_bytes, place_params)

__all__ = ["AXES", "DATA", "PIPELINE", "TENSOR", "RULES", "ShardedModel", "bubble_fraction",
           "describe", "logical_axes", "make_mesh", "make_plan", "mesh_shape", "param_shardings",
           "paged_forward", "param_specs", "per_device_bytes", "place_params", "setup", "generate"]


def setup(cfg, params: Any, dp: int = 1, tp: int = 1, pp: int = 1, *,
          microbatches: int | None = None,
          devices: Sequence[jax.Device] | None = None) -> tuple[ShardedModel, Any]:
    """Build the mesh, check the model fits it, and place ``params`` (host numpy or jax
    arrays, stacked or per-layer list) straight into their shards.

    Returns ``(model, placed_params)``; pass ``model=`` to ``jaxllm.generation``'s
    ``StaticBatch`` / ``prefill`` / ``decode`` together with ``placed_params``.

    ``devices``: default every device (all processes) when ``dp*tp*pp`` equals their
    number; in a single process a smaller layout takes the first ``dp*tp*pp`` devices.
    ``microbatches``: pipeline microbatches per forward (default ``pp``; capped to a
    divisor of the per-replica batch).  Raises ``ValueError`` when the mesh does not fit
    the devices or the model.
    """
    plan = make_plan(cfg, dp=dp, tp=tp, pp=pp)  # model checks first: clearer errors
    if devices is None and jax.process_count() == 1 and dp * tp * pp < jax.device_count():
        devices = jax.devices()[:dp * tp * pp]
    mesh = make_mesh(dp=dp, tp=tp, pp=pp, devices=devices)
    model = ShardedModel(mesh=mesh, plan=plan, microbatches=microbatches)
    return model, model.place(params)


def generate(model: ShardedModel, params: Any, prompts: Sequence[Sequence[int]], sampling_params,
             *, eos_ids: Sequence[int] = (), max_model_len: int | None = None,
             impl: str = "auto", steps: int | None = None) -> list[list[int]]:
    """Token ids in, token ids out: one static batch on the mesh (tests, benchmarks)."""
    sps = (list(sampling_params) if isinstance(sampling_params, (list, tuple))
           else [sampling_params] * len(prompts))
    batch = StaticBatch(params, model.cfg, prompts, sps, eos_ids,
                        max_model_len=max_model_len or model.cfg.max_position_embeddings,
                        impl=resolve_impl(impl), model=model)
    batch.step(steps or batch.cache_len)
    out, num, _ = batch.fetch()
    return [[int(t) for t in out[i, :num[i]]] for i in range(len(prompts))]
