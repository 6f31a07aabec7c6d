"""Per-input-channel scales folded exactly into what precedes a linear (AWQ, SmoothQuant).

``x @ W == (x / s) @ (s[:, None] * W)`` for any positive ``s``; the division is folded into
the op that produces ``x`` so the model stays the same function, and only ``s * W`` meets
the quantizer.  The four linear groups of a fused llama layer (``llama.fuse_projections``)
and where each one's ``1 / s`` goes:

- ``wqkv`` (input: ``attn_norm``'s output): into ``attn_norm``'s weight;
- ``wo`` (input: attention output, a mix of V rows): into V's columns of ``wqkv`` (and of
  ``bqkv``).  Under GQA one V head serves ``Hq / Hkv`` query heads, so ``s`` must be equal
  across the heads sharing a V head: it is given per (kv head, dim), ``[Hkv * hd]``;
- ``w_gate_up`` (input: ``mlp_norm``'s output): into ``mlp_norm``'s weight;
- ``w_down`` (input: ``silu(gate) * up``): into the ``up`` half of ``w_gate_up``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

GROUPS = ("wqkv", "wo", "w_gate_up", "w_down")


def check_fused(lp: dict, method: str) -> None:
    """ValueError unless ``lp`` is a fused inference layer (``wqkv``, ``w_gate_up``)."""
    missing = [k for k in GROUPS if k not in lp]
    if missing:
        raise ValueError(f"quantization {method!r} needs the fused inference layout "
                         f"(llama.fuse_projections: wqkv, w_gate_up); the layer lacks "
                         f"{missing} (keys: {sorted(lp)})")


def pool_heads(v: np.ndarray, cfg: Any, reduce: Any) -> np.ndarray:
    """A per-channel statistic of ``wo``'s input ``[Hq * hd]`` reduced (``np.mean`` /
    ``np.max``) over the query heads that share a kv head: ``[Hkv * hd]``."""
    g = cfg.num_heads // cfg.num_kv_heads
    return reduce(v.reshape(cfg.num_kv_heads, g, cfg.head_dim), axis=1).reshape(-1)


def expand_heads(s_kv: np.ndarray, cfg: Any) -> np.ndarray:
    """``[Hkv * hd] -> [Hq * hd]``: each query head gets its kv head's values."""
    g = cfg.num_heads // cfg.num_kv_heads
    s = s_kv.reshape(cfg.num_kv_heads, 1, cfg.head_dim)
    return np.broadcast_to(s, (cfg.num_kv_heads, g, cfg.head_dim)).reshape(-1)


def fold(lp: dict, name: str, s: np.ndarray, cfg: Any) -> dict:
    """A copy of the float layer ``lp`` with ``W_name``'s rows times ``s`` and its input
    divided by ``s`` (module docstring; ``s`` is ``[Hkv * hd]`` for ``wo``).  The copy's
    changed leaves are float32 NumPy arrays; the layer computes the same function."""
    out = dict(lp)
    s = np.asarray(s, np.float64)
    rows = expand_heads(s, cfg) if name == "wo" else s
    out[name] = (np.asarray(lp[name], np.float64) * rows[:, None]).astype(np.float32)
    if name == "wqkv":
        out["attn_norm"] = _div(lp["attn_norm"], s)
    elif name == "w_gate_up":
        out["mlp_norm"] = _div(lp["mlp_norm"], s)
    elif name == "wo":
        start = (cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim  # V's columns of wqkv
        out["wqkv"] = _div_columns(out["wqkv"], start, s)
        if "bqkv" in lp:
            out["bqkv"] = _div_columns(lp["bqkv"], start, s)
    elif name == "w_down":
        f = np.asarray(lp["w_gate_up"]).shape[-1] // 2  # [gate | up]
        out["w_gate_up"] = _div_columns(out["w_gate_up"], f, s)
    else:
        raise ValueError(f"no foldable input for {name!r}; expected one of {GROUPS}")
    return out


def _div(v: Any, s: np.ndarray) -> np.ndarray:
    return (np.asarray(v, np.float64) / s).astype(np.float32)


def _div_columns(w: Any, start: int, s: np.ndarray) -> np.ndarray:
    """``w[..., start:start + len(s)] / s`` (other columns unchanged), float32."""
    out = np.array(w, np.float64)
    out[..., start:start + len(s)] /= s
    return out.astype(np.float32)


def normalized(s: np.ndarray, floor: float = 1e-4) -> np.ndarray:
    """``s`` clipped to ``>= floor`` and divided by ``sqrt(max * min)`` so the scales
    straddle 1 (AWQ's normalization; keeps ``s * W`` and ``x / s`` in range)."""
    s = np.maximum(np.asarray(s, np.float64), floor)
    return s / np.sqrt(s.max() * s.min())
