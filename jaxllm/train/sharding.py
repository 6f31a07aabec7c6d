"""Training mesh and parameter shardings (data, FSDP/ZeRO-3, tensor parallel).

Mesh axes ``("data", "fsdp", "tensor")`` of sizes ``(dp, fsdp, tp)``.  The batch is
split over ``data`` x ``fsdp``.  Parameters carry the logical axis names of
docs/design.md (embed, vocab, heads, kv_heads, mlp, layers) and a rules table maps
them to mesh axes: ``embed -> fsdp`` (every matrix, its gradient and its AdamW
moments are split across the FSDP group -- ZeRO-3; XLA all-gathers weights for the
matmuls and reduce-scatters gradients) and ``heads/kv_heads/mlp/vocab -> tensor``
(Megatron column/row parallel projections).  A dimension that does not divide by
its mesh axis stays replicated on that axis.  Everything else is left to XLA's
SPMD partitioner (``Auto`` axes) through the ``in/out_shardings`` of the jitted
step.  Single-host only: batches are placed with ``jax.device_put``.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
RULES: dict[str, str | None] = {"embed": "fsdp", "vocab": "tensor", "heads": "tensor",
                                "kv_heads": "tensor", "mlp": "tensor", "layers": None}

_LAYER_AXES = {
    "attn_norm": ("layers", None), "mlp_norm": ("layers", None),
    "wq": ("layers", "embed", "heads"), "wk": ("layers", "embed", "kv_heads"),
    "wv": ("layers", "embed", "kv_heads"), "wo": ("layers", "heads", "embed"),
    "w_gate": ("layers", "embed", "mlp"), "w_up": ("layers", "embed", "mlp"),
    "w_down": ("layers", "mlp", "embed"),
    "bq": ("layers", "heads"), "bk": ("layers", "kv_heads"), "bv": ("layers", "kv_heads"),
}
_TOP_AXES = {"embed": ("vocab", "embed"), "lm_head": ("embed", "vocab"), "final_norm": (None,)}


def make_mesh(dp: int = 1, fsdp: int = 1, tp: int = 1, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    n = dp * fsdp * tp
    if n > len(devices):
        raise ValueError(f"--dp {dp} x --fsdp {fsdp} x --tp {tp} = {n} devices, but only "
                         f"{len(devices)} are available ({devices[0].platform}); on CPU set "
                         "XLA_FLAGS=--xla_force_host_platform_device_count=N")
    arr = np.asarray(devices[:n], dtype=object).reshape(dp, fsdp, tp)
    return Mesh(arr, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def logical_axes(path: tuple, ndim: int) -> tuple:
    """Logical axis names of the param at ``path`` (a tree path), by its key."""
    keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    name = keys[-1]
    if "layers" in keys[:-1] and any(isinstance(k, jax.tree_util.SequenceKey) for k in path):
        # per-layer (list) layout: same names without the leading layer axis
        return logical_axes(tuple(k for k in path if not isinstance(k, jax.tree_util.SequenceKey)),
                            ndim + 1)[1:]
    if "layers" in keys[:-1]:
        if name in _LAYER_AXES:
            return _LAYER_AXES[name]
        base, _, part = name.partition("_lora_")
        if part in ("a", "b") and base in _LAYER_AXES:
            _, din, dout = _LAYER_AXES[base]
            return ("layers", din, None) if part == "a" else ("layers", None, dout)
        return ("layers",) + (None,) * (ndim - 1)
    return _TOP_AXES.get(name, (None,) * ndim)


def spec_for(axes: tuple, shape: tuple, mesh: Mesh) -> P:
    out = []
    for ax, dim in zip(axes, shape):
        m = RULES.get(ax) if ax else None
        out.append(m if m and dim % mesh.shape[m] == 0 and mesh.shape[m] > 1 else None)
    out += [None] * (len(shape) - len(out))
    return P(*out)


def param_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedSharding for every leaf of a params / adapter pytree (stacked layers)."""
    def one(path, x):
        return NamedSharding(mesh, spec_for(logical_axes(path, x.ndim), x.shape, mesh))
    return jax.tree_util.tree_map_with_path(one, tree)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def state_shardings(state_shape: Any, mesh: Mesh, tx: optax.GradientTransformation) -> Any:
    """Shardings of a ``TrainState``: params by the rules, optimizer moments like their
    params, scalars (step, count, rng) replicated."""
    p_sh = param_shardings(state_shape.params, mesh)
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, state_shape.opt_state, p_sh,
                                   transform_non_params=lambda _: replicated(mesh))
    return type(state_shape)(step=replicated(mesh), params=p_sh, opt_state=opt_sh,
                             rng=replicated(mesh))


def batch_sharding(mesh: Mesh, accum_axis: bool = True) -> NamedSharding:
    """``[accum, rows, T]`` (or ``[rows, T]``) batches: rows split over data x fsdp."""
    return NamedSharding(mesh, P(None, BATCH_AXES, None) if accum_axis else P(BATCH_AXES, None))


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]
