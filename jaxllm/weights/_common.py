"""Helpers shared by the weight loaders: dtype names, the params pytree shapes, and a tqdm
progress bar (stderr; only for large files or slow loads; off when ``JAXLLM_NO_PROGRESS=1``)."""

from __future__ import annotations

import contextlib
import os
import sys

import ml_dtypes
import numpy as np

from jaxllm.models.llama import param_shapes  # noqa: F401  (re-exported: one definition)


class _Null:
    def update(self, n=1):
        pass


def progress_disabled() -> bool:
    return os.environ.get("JAXLLM_NO_PROGRESS", "").strip().lower() not in ("", "0", "false", "no")


@contextlib.contextmanager
def progress_bar(total_bytes: int, desc: str, *, enabled: bool | None = None, large: bool = False):
    """``enabled=None``: show for large inputs at once, for others only after 2 s."""
    if enabled is False or (enabled is None and progress_disabled()):
        yield _Null()
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        yield _Null()
        return
    bar = tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
               file=sys.stderr, leave=False, delay=0.0 if (large or enabled) else 2.0,
               dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


def resolve_dtype(dtype) -> np.dtype:
    """``"float32" | "bfloat16" | "bf16" | "float16" | np.dtype`` -> numpy dtype (ml_dtypes for bf16)."""
    if isinstance(dtype, str):
        key = dtype.lower().replace("jnp.", "").replace("np.", "")
        key = {"bf16": "bfloat16", "f32": "float32", "fp32": "float32", "f16": "float16",
               "fp16": "float16", "half": "float16", "float": "float32"}.get(key, key)
        if key == "bfloat16":
            return np.dtype(ml_dtypes.bfloat16)
        try:
            dt = np.dtype(key)
        except TypeError:
            raise ValueError(f"unsupported dtype {dtype!r}; use float32, bfloat16 or float16") from None
    else:
        dt = np.dtype(dtype)
    if dt not in (np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16)):
        raise ValueError(f"unsupported dtype {dtype!r}; use float32, bfloat16 or float16")
    return dt


def alloc_params(shapes: dict, dtype) -> dict:
    return {k: alloc_params(v, dtype) if isinstance(v, dict) else np.empty(v, dtype)
            for k, v in shapes.items()}


def transpose_into(dst: np.ndarray, w: np.ndarray, block: int = 128) -> None:
    """``dst[...] = w.T`` (with a cast), in column blocks: faster than numpy's plain strided
    transpose-copy for the [out, in] -> [in, out] matrices of a checkpoint."""
    rows = w.shape[0]
    if rows <= block:
        dst[...] = w.T
        return
    for r in range(0, rows, block):
        dst[:, r:r + block] = w[r:r + block].T
