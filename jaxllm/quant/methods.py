"""Round-to-nearest (RTN) weight quantization on the host (NumPy, float64 math).

``quantize_int8``: symmetric, one float32 scale per output channel (column of ``[K, N]``):
``scale = max|w| / 127``, codes in [-127, 127]; error <= scale / 2 per element.

``quantize_int4``: asymmetric, group-wise along K (group 32/64/128), float16 scale and
offset per group: ``scale = (max - min) / 15``, ``offset = min``, codes 0..15 packed two
per byte; error <= scale / 2 per element (up to float16 rounding of scale and offset).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxllm.quant.array import QuantizedArray

INT4_GROUP_SIZES = (32, 64, 128)
DEFAULT_INT4_GROUP = 32  # g64 on the default Q4_1 model: +37% perplexity (docs/quantization.md)


@dataclass(frozen=True)
class QuantConfig:
    """A weight-quantization method: ``method`` ("int8" | "int4"), the int4 group size, and
    the bits of the embedding / tied LM head (``embed_bits``: 8 keeps them int8 per token
    under ``int4``, as llama.cpp keeps ``token_embd`` at 8 bits; 4 quantizes them like the
    projections)."""
    method: str
    group_size: int | None = None
    embed_bits: int = 8

    def __post_init__(self) -> None:
        if self.method not in ("int8", "int4", "gguf"):
            raise ValueError(f"QuantConfig.method must be 'int8', 'int4' or 'gguf', "
                             f"got {self.method!r}")
        if self.method == "int4" and self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"QuantConfig.group_size must be one of {INT4_GROUP_SIZES} for "
                             f"int4, got {self.group_size}")
        if self.embed_bits not in (8, 4) or (self.method != "int4" and self.embed_bits != 8):
            raise ValueError(f"QuantConfig.embed_bits must be 8 (or 4 with int4), got "
                             f"{self.embed_bits}")

    @classmethod
    def parse(cls, spec: "str | QuantConfig") -> "QuantConfig":
        """``"int8"``, ``"int4"`` (group 32), ``"int4-g32"`` / ``"int4-g64"`` /
        ``"int4-g128"``, or ``"gguf"`` (a GGUF file's own blocks, chosen at load)."""
        if isinstance(spec, QuantConfig):
            return spec
        if spec == "gguf":  # keep a GGUF file's own blocks (jaxllm.weights.gguf_blocks)
            return cls("gguf")
        m = re.fullmatch(r"(int8|int4)(?:-g(\d+))?", str(spec))
        if m is None:
            raise ValueError(f"quantization must be one of 'int8', 'int4', 'int4-g32', "
                             f"'int4-g64', 'int4-g128', 'gguf', got {spec!r}")
        method, g = m.group(1), m.group(2)
        if method == "int8" and g is not None:
            raise ValueError(f"quantization 'int8' is per output channel and takes no group "
                             f"size, got {spec!r}")
        group = int(g) if g is not None else (DEFAULT_INT4_GROUP if method == "int4" else None)
        if method == "int4" and group not in INT4_GROUP_SIZES:
            raise ValueError(f"quantization group size must be one of {INT4_GROUP_SIZES}, "
                             f"got {group} in {spec!r}")
        return cls(method, group)

    @property
    def name(self) -> str:
        """The method string (``int8``, ``int4-g32``; ``-e4`` with a 4-bit embedding)."""
        if self.method in ("int8", "gguf"):
            return self.method
        return f"int4-g{self.group_size}" + ("-e4" if self.embed_bits == 4 else "")


def quantize_int8(w: Any, dtype: Any = jnp.float32, transposed: bool = False) -> QuantizedArray:
    """Symmetric per-output-channel int8 of ``w [..., K, N]`` (scales ``[..., 1, N]``)."""
    w64 = np.asarray(w, np.float64)
    if w64.ndim < 2:
        raise ValueError(f"quantize_int8 needs a [..., K, N] matrix, got shape {w64.shape}")
    amax = np.max(np.abs(w64), axis=-2, keepdims=True)
    scale = (amax / 127.0).astype(np.float32)
    safe = np.where(scale == 0, 1.0, scale.astype(np.float64))
    q = np.clip(np.rint(w64 / safe), -127, 127).astype(np.int8)
    return QuantizedArray(q, scale, None, bits=8, group_size=w64.shape[-2], packing="none",
                          dtype=dtype, transposed=transposed)


def quantize_int4(w: Any, group_size: int = DEFAULT_INT4_GROUP, dtype: Any = jnp.float32,
                  transposed: bool = False) -> QuantizedArray:
    """Asymmetric group-wise int4 of ``w [..., K, N]``: groups of ``group_size`` along K,
    float16 scale and offset per group, codes packed two per byte (``interleaved``)."""
    w64 = np.asarray(w, np.float64)
    if w64.ndim < 2:
        raise ValueError(f"quantize_int4 needs a [..., K, N] matrix, got shape {w64.shape}")
    *lead, k, n = w64.shape
    if group_size <= 0 or group_size % 2 or k % group_size:
        raise ValueError(f"group_size {group_size} must be even and divide the contraction "
                         f"dimension {k} of a weight of shape {w64.shape}")
    g = w64.reshape(*lead, k // group_size, group_size, n)
    lo, hi = g.min(axis=-2), g.max(axis=-2)
    # round scale/offset to float16 first so the codes are chosen against stored values
    scale = ((hi - lo) / 15.0).astype(np.float16)
    offset = lo.astype(np.float16)
    s64 = scale.astype(np.float64)
    safe = np.where(s64 == 0, 1.0, s64)
    q = np.clip(np.rint((g - offset.astype(np.float64)[..., None, :]) / safe[..., None, :]), 0, 15)
    q = q.astype(np.uint8).reshape(*lead, k // 2, 2, n)
    packed = (q[..., 0, :] | (q[..., 1, :] << 4)).astype(np.uint8)
    return QuantizedArray(packed, scale, offset, bits=4, group_size=group_size,
                          packing="interleaved", dtype=dtype, transposed=transposed)


def quantize(w: Any, config: "str | QuantConfig", dtype: Any = jnp.float32,
             transposed: bool = False) -> QuantizedArray:
    """Quantize one ``[..., K, N]`` weight with ``config``."""
    cfg = QuantConfig.parse(config)
    if cfg.method == "int8":
        return quantize_int8(w, dtype, transposed)
    return quantize_int4(w, cfg.group_size, dtype, transposed)


WEIGHT_KEYS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "wqkv", "w_gate_up")


def quantize_params(params: dict, config: "str | QuantConfig",
                    dtype: Any = None) -> dict:
    """Quantize every projection, the embedding and the LM head of a llama params pytree
    (stacked or per-layer, fused or not); norms and biases stay float.  The embedding and
    LM head use int8 unless ``config.embed_bits == 4``.

    The embedding ``[V, D]`` is stored transposed (groups along D) so the same codes serve
    the lookup and a tied LM head.  ``dtype``: the compute dtype the weights dequantize to
    (default: the embedding's dtype).  Raises ValueError naming the weight whose
    contraction dimension the group size does not divide.
    """
    cfg = QuantConfig.parse(config)
    if cfg.method == "gguf":
        raise ValueError("quantization='gguf' is chosen at load (the GGUF file's own blocks), "
                         "not applied to float params")
    dt = jnp.dtype(dtype or params["embed"].dtype)

    def q(name: str, w: Any, transposed: bool = False, c: QuantConfig = cfg) -> QuantizedArray:
        if isinstance(w, QuantizedArray):
            return w
        try:
            return quantize(np.swapaxes(np.asarray(w), -1, -2) if transposed else w, c,
                            dt, transposed)
        except ValueError as e:
            raise ValueError(f"cannot quantize weight {name!r} with {c.name}: {e}") from None

    def layer(lp: dict) -> dict:
        return {k: q(k, v) if k in WEIGHT_KEYS else v for k, v in lp.items()}

    layers = params["layers"]
    out = dict(params)
    out["layers"] = ([layer(lp) for lp in layers] if isinstance(layers, (list, tuple))
                     else layer(layers))
    ecfg = cfg if cfg.embed_bits == 4 else QuantConfig("int8")
    out["embed"] = q("embed", params["embed"], transposed=True, c=ecfg)
    if "lm_head" in params:
        out["lm_head"] = q("lm_head", params["lm_head"], c=ecfg)
    return out
