"""Round-to-nearest (RTN) weight quantization on the host (NumPy, float64 math).

``quantize_int8``: symmetric, one float32 scale per output channel (column of ``[K, N]``):
``scale = max|w| / 127``, codes in [-127, 127]; error <= scale / 2 per element.

``quantize_int4``: asymmetric, group-wise along K (group 32/64/128), float16 scale and
offset per group: ``scale = (max - min) / 15``, ``offset = min``, codes 0..15 packed two
per byte; error <= scale / 2 per element (up to float16 rounding of scale and offset).

The calibrated methods (``awq``, ``gptq``, ``w8a8``) need activations on calibration text:
``quantize_params(..., calibration=jaxllm.quant.Calibration(...))`` runs them layer by layer
(``jaxllm.quant.calibration``) before the embedding and LM head are quantized here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxllm.quant.array import QuantizedArray
from jaxllm.quant.w8a8 import W8A8Array, quantize_w8a8

INT4_GROUP_SIZES = (32, 64, 128)
DEFAULT_INT4_GROUP = 32  # g64 on the default Q4_1 model: +37% perplexity (docs/quantization.md)
CALIBRATED_GROUP = 128  # awq / gptq default, as in their papers
CALIBRATED = ("awq", "gptq", "w8a8")  # need activations on calibration text
METHODS = ("int8", "int4", "gguf", *CALIBRATED)


@dataclass(frozen=True)
class QuantConfig:
    """A weight-quantization method: ``method`` ("int8" | "int4" | "gguf" | "awq" | "gptq"
    | "w8a8"), the int4 group size, and the bits of the embedding / tied LM head
    (``embed_bits``: 8 keeps them int8 per token under ``int4``, as llama.cpp keeps
    ``token_embd`` at 8 bits; 4 quantizes them like the projections).  ``gptq`` only:
    ``bits`` (4 with a group size, 8 per channel) and ``act_order`` (default on: far better
    held-out perplexity with the small calibration set, docs/quantization.md); ``w8a8``
    only: ``alpha``, SmoothQuant's migration strength."""
    method: str
    group_size: int | None = None
    embed_bits: int = 8
    bits: int | None = None
    act_order: bool | None = None
    alpha: float = 0.5

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"QuantConfig.method must be one of {METHODS}, "
                             f"got {self.method!r}")
        if self.method == "gptq" and self.bits is None:
            object.__setattr__(self, "bits", 8 if self.group_size is None else 4)
        if self.act_order is None:
            object.__setattr__(self, "act_order", self.method == "gptq")
        grouped = self.method in ("int4", "awq") or (self.method == "gptq" and self.bits == 4)
        if grouped and self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"QuantConfig.group_size must be one of {INT4_GROUP_SIZES} for "
                             f"{self.method}, got {self.group_size}")
        if not grouped and self.method in CALIBRATED and self.group_size is not None:
            raise ValueError(f"{self.method} with {self.bits or 8}-bit weights is per output "
                             f"channel and takes no group size, got {self.group_size}")
        implied = {"int8": 8, "w8a8": 8, "int4": 4, "awq": 4, "gptq": self.bits}.get(self.method)
        if self.bits not in (None, 4, 8) or self.bits not in (None, implied):
            raise ValueError(f"QuantConfig.bits {self.bits} does not fit method "
                             f"{self.method!r} (gptq: 4 or 8)")
        if self.act_order and self.method != "gptq":
            raise ValueError(f"act_order applies to gptq only, got method {self.method!r}")
        if self.method == "w8a8" and not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"w8a8 migration strength alpha must be in [0, 1], "
                             f"got {self.alpha}")
        if self.embed_bits not in (8, 4) or (self.method != "int4" and self.embed_bits != 8):
            raise ValueError(f"QuantConfig.embed_bits must be 8 (or 4 with int4), got "
                             f"{self.embed_bits}")

    @classmethod
    def parse(cls, spec: "str | QuantConfig") -> "QuantConfig":
        """``"int8"``, ``"int4"`` (group 32), ``"int4-g32"`` / ``"int4-g64"`` /
        ``"int4-g128"``, ``"gguf"`` (a GGUF file's own blocks, chosen at load), ``"awq"`` /
        ``"gptq"`` (int4, group 128; ``-g32`` / ``-g64`` / ``-g128`` pick the group),
        ``"gptq-int8"``, or ``"w8a8"``."""
        if isinstance(spec, QuantConfig):
            return spec
        if spec in ("gguf", "w8a8"):  # gguf: keep a GGUF file's own blocks (weights.gguf_blocks)
            return cls(str(spec))
        if spec == "gptq-int8":
            return cls("gptq", None, bits=8)
        m = re.fullmatch(r"(int8|int4|awq|gptq)(?:-g(\d+))?", str(spec))
        if m is None:
            raise ValueError(f"quantization must be one of 'int8', 'int4', 'int4-g32', "
                             f"'int4-g64', 'int4-g128', 'gguf', 'awq', 'gptq', 'gptq-int8', "
                             f"'w8a8' (awq / gptq also with -g32, -g64, -g128), got {spec!r}")
        method, g = m.group(1), m.group(2)
        if method == "int8" and g is not None:
            raise ValueError(f"quantization 'int8' is per output channel and takes no group "
                             f"size, got {spec!r}")
        default = {"int4": DEFAULT_INT4_GROUP, "awq": CALIBRATED_GROUP,
                   "gptq": CALIBRATED_GROUP}.get(method)
        group = int(g) if g is not None else default
        if method != "int8" and group not in INT4_GROUP_SIZES:
            raise ValueError(f"quantization group size must be one of {INT4_GROUP_SIZES}, "
                             f"got {group} in {spec!r}")
        return cls(method, group)

    @property
    def calibrated(self) -> bool:
        """Whether the method needs activations on calibration text."""
        return self.method in CALIBRATED

    @property
    def name(self) -> str:
        """The method string (``int8``, ``int4-g32``, ``awq-g128``, ``gptq-int8``, ``w8a8``;
        ``-e4`` with a 4-bit embedding, ``-noact`` for gptq without act_order, ``-a<alpha>``
        with a non-default w8a8 alpha)."""
        if self.method in ("int8", "gguf"):
            return self.method
        if self.method == "w8a8":
            return "w8a8" + (f"-a{self.alpha:g}" if self.alpha != 0.5 else "")
        if self.method == "gptq":
            base = "gptq-int8" if self.bits == 8 else f"gptq-g{self.group_size}"
            return base + ("" if self.act_order else "-noact")
        return (f"{self.method}-g{self.group_size}"
                + ("-e4" if self.embed_bits == 4 else ""))


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
    packed = pack_int4(q.astype(np.uint8).reshape(*lead, k, n))
    return QuantizedArray(packed, scale, offset, bits=4, group_size=group_size,
                          packing="interleaved", dtype=dtype, transposed=transposed)


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """4-bit codes ``[..., K, N]`` (0..15) -> ``uint8 [..., K/2, N]``, ``interleaved``:
    byte i holds K index 2i in the low nibble and 2i+1 in the high one."""
    *lead, k, n = codes.shape
    q = codes.astype(np.uint8).reshape(*lead, k // 2, 2, n)
    return (q[..., 0, :] | (q[..., 1, :] << 4)).astype(np.uint8)


def quantize(w: Any, config: "str | QuantConfig", dtype: Any = jnp.float32,
             transposed: bool = False) -> QuantizedArray:
    """Quantize one ``[..., K, N]`` weight with ``config`` (``w8a8``: without smoothing,
    which needs activations; ``awq`` / ``gptq`` need them too: ValueError)."""
    cfg = QuantConfig.parse(config)
    if cfg.method == "int8":
        return quantize_int8(w, dtype, transposed)
    if cfg.method == "w8a8":
        if transposed:
            raise ValueError("w8a8 stores an embedding row-quantized: quantize_w8a8(e, rows=True)")
        return quantize_w8a8(w, dtype)
    if cfg.method in ("awq", "gptq", "gguf"):
        raise ValueError(f"quantization {cfg.name!r} does not apply to a single weight: "
                         f"use quantize_params(..., calibration=...)" if cfg.calibrated else
                         "quantization='gguf' is chosen at load")
    return quantize_int4(w, cfg.group_size, dtype, transposed)


WEIGHT_KEYS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "wqkv", "w_gate_up")


def quantize_params(params: dict, config: "str | QuantConfig",
                    dtype: Any = None, *, calibration: Any = None) -> dict:
    """Quantize every projection, the embedding and the LM head of a llama params pytree
    (stacked or per-layer, fused or not); norms and biases stay float.  The embedding and
    LM head use int8 unless ``config.embed_bits == 4`` (``w8a8``: int8 W8A8 weights, one
    scale per token row, so the tied LM head runs the int8 dot too).

    ``awq``, ``gptq`` and ``w8a8`` need ``calibration`` (a
    ``jaxllm.quant.calibration.Calibration``) and the fused layout
    (``llama.fuse_projections``); they change norm weights / V and ``up`` columns
    (folded scales) as well as the projections.

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
    if cfg.calibrated:
        if calibration is None:
            raise ValueError(f"quantization {cfg.name!r} is calibrated on text: pass "
                             f"calibration=jaxllm.quant.Calibration(...) (LLM(..., "
                             f"quantization=...) and `jaxllm quantize` do)")
        params = calibration.quantize_layers(params, cfg, dt)

    def q(name: str, w: Any, transposed: bool = False, c: QuantConfig = cfg) -> Any:
        if isinstance(w, (QuantizedArray, W8A8Array)):
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
    if cfg.method == "w8a8":
        out["embed"] = quantize_w8a8(params["embed"], dt, rows=True)
        if "lm_head" in params:
            out["lm_head"] = quantize_w8a8(params["lm_head"], dt)
        return out
    ecfg = cfg if cfg.embed_bits == 4 else QuantConfig("int8")
    out["embed"] = q("embed", params["embed"], transposed=True, c=ecfg)
    if "lm_head" in params:
        out["lm_head"] = q("lm_head", params["lm_head"], c=ecfg)
    return out
