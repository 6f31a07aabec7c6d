"""XLA's own cost analysis of a jitted function: FLOPs, bytes accessed, transcendentals."""

from __future__ import annotations

from typing import Any, Callable

import jax

import cpu_kernels

__all__ = ["xla_cost"]


def _cost_dict(ca: Any) -> dict[str, float]:
    """``cost_analysis()`` returns a dict, a one-element list of dicts, or None by version."""
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    return {k: float(v) for k, v in dict(ca or {}).items() if isinstance(v, (int, float))}


def xla_cost(fn: Callable, *args: Any) -> dict[str, float]:
    """FLOPs / bytes accessed / transcendentals of the jitted ``fn`` compiled for ``args``.

    Traced with the C++ CPU kernels off: XLA cannot see inside an FFI call, so the cost
    is that of the XLA twins (the same work)."""
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    with cpu_kernels.override(False):
        lowered = jitted.lower(*args)
    try:
        cost = _cost_dict(lowered.compile().cost_analysis())
    except Exception:  # noqa: BLE001 - some backends cannot analyse a compiled executable
        cost = {}
    if "flops" not in cost:
        cost = _cost_dict(lowered.cost_analysis())
    return {"flops": cost.get("flops", 0.0), "bytes": cost.get("bytes accessed", 0.0),
            "transcendentals": cost.get("transcendentals", 0.0)}
