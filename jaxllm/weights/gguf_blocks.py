"""GGUF block-quantized tensors loaded as :class:`jaxllm.quant.QuantizedArray` with no float
copy of the weights: ``LLM(path.gguf, quantization="gguf")``.

A GGUF matrix is ``[N, K]`` (K contiguous) in numpy order; the quantized array stores
``[K, N]`` (codes transposed, scales ``[K/group, N]``) so groups run along K as for every
quantized weight.  Each block type maps onto ``W = codes * scales + offsets``:

- Q8_0: int8 codes, group 32, float16 ``d``.
- Q4_0 / Q4_1: 4-bit codes in GGUF's nibble order (``packing="gguf32"``), group 32, float16
  ``d`` and offsets ``-8 d`` (exact: a power-of-two multiple) / ``m``.
- Q5_0 / Q5_1 (llama.cpp's stand-ins for Q4_K / Q5_K when K is not a multiple of 256):
  int8 codes ``q - 16`` / ``q``, group 32, float16 ``d`` (and ``m``).
- Q4_K: 4-bit codes repacked to ``gguf32``, group 32, float32 scales ``d * sc`` and offsets
  ``-(dmin * m)`` from the super-block's 6-bit sub-block scales and mins.
- Q5_K: as Q4_K with 5-bit codes held as int8.
- Q6_K: int8 codes ``q - 32``, group 16, float32 scales ``d * sc``, no offsets.

Dequantization reproduces ``gguf.quants.dequantize`` bit for bit: every product above is
exact in float32 (at most 24 significant bits: an 11-bit float16 times 6-7-bit scales times
4-6-bit codes), so the only rounding is the final ``+ offset`` that gguf-py does too (its
``- dmin * m`` is the same IEEE operation).  Q4_0's ``d * 8 + (-8 d)`` gives +0 where gguf-py
gives ``d * 0 = -0`` for a negative ``d``; every other value is identical.

Fused projections and layer stacks whose parts differ in type (llama.cpp's ``_M`` mixes,
e.g. Q6_K ``ffn_down`` in some layers of a Q4_K_M file) are widened to the narrowest
layout expressing every part exactly (:func:`_combine`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.quant import QuantizedArray
from jaxllm.quant.array import unpack_codes
from jaxllm.weights._common import resolve_dtype
from jaxllm.weights.gguf import (_LAYER_TENSORS, GGUFTokenizerInfo, SUPPORTED_GGUF_ARCHITECTURES,
                                 _unpermute_rope, config_from_gguf, read_gguf, read_tensor)

_FUSED = {"wqkv": ("wq", "wk", "wv"), "w_gate_up": ("w_gate", "w_up"),
          "bqkv": ("bq", "bk", "bv")}

# A decoder maps the blocks ``[N, K/block, bytes]`` of an ``[N, K]`` tensor to
# (codes int8 [N, K] or gguf32-packed uint8 [N, K/2], scales [N, K/group],
#  offsets [N, K/group] or None, bits, group).
_Decoded = tuple[np.ndarray, np.ndarray, np.ndarray | None, int, int]


def _f16(b: np.ndarray) -> np.ndarray:
    """The little-endian float16 held in the last axis's 2 bytes."""
    return np.ascontiguousarray(b).view("<f2")[..., 0]


def _nibbles(b: np.ndarray) -> np.ndarray:
    """``[..., B]`` bytes -> ``[..., 2, B]`` codes: the low nibbles, then the high ones."""
    return np.stack([b & 0xF, b >> 4], axis=-2)


def _pack_gguf32(codes: np.ndarray) -> np.ndarray:
    """4-bit codes ``[N, K]`` -> ``[N, K/2]`` bytes, per 32: byte j = code j | code j+16 << 4."""
    c = codes.reshape(codes.shape[0], -1, 2, 16)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(codes.shape[0], -1)


def _scale_min_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K's 12 bytes ``[..., 12]`` -> the 6-bit scales and mins ``[..., 8]``:
    sub-blocks 0-3 in the low 6 bits of bytes 0-3 / 4-7, sub-blocks 4-7 in the nibbles of
    bytes 8-11 plus the top 2 bits of bytes 0-3 / 4-7."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0xF) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _k_scales(b: np.ndarray, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: float32 scales ``d * sc`` and offsets ``-(dmin * m)`` ``[N, K/32]``."""
    d, dmin = _f16(b[..., 0:2]).astype(np.float32), _f16(b[..., 2:4]).astype(np.float32)
    sc, mn = _scale_min_k4(b[..., 4:16])
    scales = d[..., None] * sc.astype(np.float32)
    offsets = -(dmin[..., None] * mn.astype(np.float32))
    return scales.reshape(n, k // 32), offsets.reshape(n, k // 32)


def _q8_0(b: np.ndarray, n: int, k: int) -> _Decoded:  # d f16, qs int8[32]
    return b[..., 2:].view(np.int8).reshape(n, k), _f16(b[..., 0:2]), None, 8, 32


def _q4_0(b: np.ndarray, n: int, k: int) -> _Decoded:  # d f16, qs[16]
    d = _f16(b[..., 0:2])
    offsets = (-8 * d.astype(np.float32)).astype(np.float16)  # exact: a power-of-two scale
    return b[..., 2:].reshape(n, k // 2), d, offsets, 4, 32


def _q4_1(b: np.ndarray, n: int, k: int) -> _Decoded:  # d f16, m f16, qs[16]
    return b[..., 4:].reshape(n, k // 2), _f16(b[..., 0:2]), _f16(b[..., 2:4]), 4, 32


def _q5(b: np.ndarray, n: int, k: int, start: int) -> np.ndarray:
    """Q5_0 / Q5_1 codes 0..31 ``[N, K/32, 32]``: nibbles of qs[16] (elements j, j+16) and
    bit j of the little-endian uint32 qh at ``start``."""
    high = np.unpackbits(b[..., start:start + 4], axis=-1, bitorder="little")
    return _nibbles(b[..., start + 4:]).reshape(n, k // 32, 32) | (high << 4)


def _q5_0(b: np.ndarray, n: int, k: int) -> _Decoded:  # d f16, qh[4], qs[16]
    codes = _q5(b, n, k, 2).astype(np.int8) - np.int8(16)
    return codes.reshape(n, k), _f16(b[..., 0:2]), None, 8, 32


def _q5_1(b: np.ndarray, n: int, k: int) -> _Decoded:  # d f16, m f16, qh[4], qs[16]
    codes = _q5(b, n, k, 4).view(np.int8)
    return codes.reshape(n, k), _f16(b[..., 0:2]), _f16(b[..., 2:4]), 8, 32


def _q4_k(b: np.ndarray, n: int, k: int) -> _Decoded:
    # d f16, dmin f16, scales[12], qs[128]: per 64 elements, byte j holds j (low), 32+j (high)
    codes = _nibbles(b[..., 16:].reshape(n, k // 256, 4, 32)).reshape(n, k)
    return (_pack_gguf32(codes), *_k_scales(b, n, k), 4, 32)


def _q5_k(b: np.ndarray, n: int, k: int) -> _Decoded:
    # d f16, dmin f16, scales[12], qh[32], qs[128]: Q4_K's nibbles, 5th bit of element
    # 32i + j in bit i of qh[j]
    low = _nibbles(b[..., 48:].reshape(n, k // 256, 4, 32)).reshape(n, k // 256, 8, 32)
    high = (b[..., None, 16:48] >> np.arange(8, dtype=np.uint8)[:, None]) & 1
    codes = (low | (high << 4)).view(np.int8).reshape(n, k)
    return (codes, *_k_scales(b, n, k), 8, 32)


def _q6_k(b: np.ndarray, n: int, k: int) -> _Decoded:
    # ql[128], qh[64], scales int8[16], d f16.  Element 128h + 32t + j (j < 32): low 4 bits
    # = nibble t // 2 of ql[64h + 32 (t % 2) + j], high 2 bits = bits 2t, 2t+1 of qh[32h + j]
    nb = k // 256
    low = _nibbles(b[..., 0:128].reshape(n, nb, 2, 64)).reshape(n, nb, 8, 32)
    qh = b[..., 128:192].reshape(n, nb, 2, 1, 32)
    high = ((qh >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & 3).reshape(n, nb, 8, 32)
    codes = (low | (high << 4)).astype(np.int8) - np.int8(32)
    sc = b[..., 192:208].view(np.int8).astype(np.float32)
    scales = _f16(b[..., 208:210]).astype(np.float32)[..., None] * sc
    return codes.reshape(n, k), scales.reshape(n, k // 16), None, 8, 16


# type -> (elements per block, bytes per block, decoder); sizes as gguf.GGML_QUANT_SIZES
_BLOCKS: dict[str, tuple[int, int, Callable[[np.ndarray, int, int], _Decoded]]] = {
    "Q8_0": (32, 34, _q8_0), "Q4_0": (32, 18, _q4_0), "Q4_1": (32, 20, _q4_1),
    "Q5_0": (32, 22, _q5_0), "Q5_1": (32, 24, _q5_1),
    "Q4_K": (256, 144, _q4_k), "Q5_K": (256, 176, _q5_k), "Q6_K": (256, 210, _q6_k)}
BLOCK_TYPES = tuple(_BLOCKS)


def _t(a: np.ndarray | None) -> np.ndarray | None:
    return None if a is None else np.ascontiguousarray(a.T)


def blocks_to_quantized(raw: np.ndarray, qtype_name: str, shape: tuple[int, int],
                        dtype: Any = np.float32) -> QuantizedArray:
    """Raw GGUF bytes of a ``[N, K]`` (numpy order) tensor of one of :data:`BLOCK_TYPES`
    -> the quantized ``[K, N]`` weight it is the transpose of."""
    n, k = shape
    if qtype_name not in _BLOCKS:
        raise ValueError(f"GGUF block type must be one of {BLOCK_TYPES}, got {qtype_name}")
    block, size, decode = _BLOCKS[qtype_name]
    if k % block:
        raise ValueError(f"GGUF {qtype_name} tensor of shape {shape}: K={k} is not a "
                         f"multiple of {block}")
    b = np.asarray(raw, np.uint8).reshape(n, k // block, size)
    values, scales, offsets, bits, group = decode(b, n, k)
    return QuantizedArray(_t(values), _t(scales), _t(offsets), bits=bits, group_size=group,
                          packing="gguf32" if bits == 4 else "none", dtype=dtype)


def _permute_columns(q: QuantizedArray, perm: np.ndarray) -> QuantizedArray:
    return QuantizedArray(q.values[..., perm], q.scales[..., perm],
                          None if q.offsets is None else q.offsets[..., perm], bits=q.bits,
                          group_size=q.group_size, packing=q.packing, dtype=q.dtype,
                          transposed=q.transposed)


def _widen(q: QuantizedArray, bits: int, group: int, offsets: bool,
           dtype: np.dtype) -> QuantizedArray:
    """``q`` in a layout at least as wide, holding the same weights exactly (itself when it
    already has it): gguf32 codes unpacked to int8, each scale / offset repeated over the
    smaller groups, float16 scales widened, and offsets of -0.0 added to a symmetric ``q``
    (``x + -0.0 == x`` for every float ``x``, signed zeros included)."""
    values = q.values
    if bits != q.bits:  # gguf32 [K/2, N] -> int8 [K, N]
        values = unpack_codes(np.asarray(values), q.packing).astype(np.int8)

    def regroup(a: np.ndarray) -> np.ndarray:
        reps = q.group_size // group
        return (np.repeat(a, reps, axis=-2) if reps > 1 else a).astype(dtype, copy=False)

    scales = regroup(q.scales)
    if q.offsets is not None:
        off = regroup(q.offsets)
    else:
        off = np.full_like(scales, -0.0) if offsets else None
    return QuantizedArray(values, scales, off, bits=bits, group_size=group,
                          packing=q.packing if bits == 4 else "none", dtype=q.dtype,
                          transposed=q.transposed)


def _combine(parts: list[QuantizedArray], fn) -> QuantizedArray:
    """Concatenate (fused projections) or stack (layers) quantized arrays child by child.

    Parts of different types are first widened (:func:`_widen`) to one layout: 4-bit codes
    only if every part has them, else int8; the smallest group (16 or 32: it divides the
    others); offsets if any part has them; float32 scales if any part has them."""
    bits = 4 if all(p.bits == 4 for p in parts) else 8
    group = math.gcd(*(p.group_size for p in parts))
    offsets = any(p.offsets is not None for p in parts)
    dtype = np.result_type(*(a.dtype for p in parts for a in (p.scales, p.offsets)
                             if a is not None))
    parts = [_widen(p, bits, group, offsets, dtype) for p in parts]
    first = parts[0]
    return QuantizedArray(fn([p.values for p in parts]), fn([p.scales for p in parts]),
                          fn([p.offsets for p in parts]) if offsets else None,
                          bits=bits, group_size=group, packing=first.packing,
                          dtype=first.dtype, transposed=first.transposed)


def keeps_blocks(path: str | os.PathLike) -> bool:
    """Whether :func:`load_gguf_blocks` reads the GGUF file ``path`` as it is: a supported
    architecture whose matmul tensors are all of :data:`BLOCK_TYPES`.  Reads the header."""
    from gguf import GGMLQuantizationType

    gf = read_gguf(path)
    if gf.metadata.get("general.architecture") not in SUPPORTED_GGUF_ARCHITECTURES:
        return False
    mats = {suffix for suffix, (_, is_mat, _) in _LAYER_TENSORS.items() if is_mat}
    for name, info in gf.tensors.items():
        if name == "output.weight" or (name.startswith("blk.") and name.split(".", 2)[-1] in mats):
            if GGMLQuantizationType(info.qtype).name not in BLOCK_TYPES:
                return False
    return True


def load_gguf_blocks(path: str | os.PathLike, dtype: Any = "float32"
                     ) -> tuple[ModelConfig, dict, GGUFTokenizerInfo]:
    """Load a llama/qwen2 GGUF file keeping its blocks (any of :data:`BLOCK_TYPES`):
    ``(config, stacked params with fused projections, tokenizer info)``.  Norms and biases
    (and a float embedding) are cast to ``dtype``.  ValueError names any matmul tensor of
    another type."""
    from gguf import GGMLQuantizationType

    dt = resolve_dtype(dtype)
    path = Path(path)
    gf = read_gguf(path)
    src = str(path)
    arch = gf.metadata.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise ValueError(f"{src}: GGUF architecture {arch!r} is not supported; "
                         f"supported: {list(SUPPORTED_GGUF_ARCHITECTURES)}")
    with open(path, "rb") as f:
        def read_float(name: str) -> np.ndarray:
            return read_tensor(f, gf.tensors[name], src)

        def read_q(name: str, perm_heads: int | None = None) -> QuantizedArray:
            info = gf.tensors[name]
            qt = GGMLQuantizationType(info.qtype).name
            if qt not in BLOCK_TYPES:
                raise ValueError(f"{src}: tensor {name!r} is {qt}; quantization='gguf' keeps "
                                 f"{', '.join(BLOCK_TYPES)} tensors (load the file without "
                                 "quantization='gguf' to dequantize it)")
            f.seek(info.offset)
            q = blocks_to_quantized(np.frombuffer(f.read(info.nbytes), np.uint8), qt,
                                    tuple(info.shape), dt)
            if perm_heads:  # llama.cpp permutes q/k rows (output channels, our N)
                q = _permute_columns(q, _unpermute_rope(np.arange(info.shape[0]), perm_heads))
            return q

        cfg = config_from_gguf(gf.metadata, gf.tensors.keys(), source=src,
                               tensor_reader=read_float)
        layers: list[dict[str, Any]] = []
        for i in range(cfg.num_layers):
            lp: dict[str, Any] = {}
            for suffix, (key, is_mat, perm) in _LAYER_TENSORS.items():
                name = f"blk.{i}.{suffix}"
                if name not in gf.tensors:
                    continue
                heads = None
                if perm and arch == "llama":
                    heads = cfg.num_heads if perm == "q" else cfg.num_kv_heads
                if is_mat:
                    lp[key] = read_q(name, heads)
                else:
                    w = read_float(name)
                    lp[key] = (_unpermute_rope(w, heads) if heads else w).astype(dt)
            for fused, parts in _FUSED.items():
                if all(p in lp for p in parts):
                    xs = [lp.pop(p) for p in parts]
                    lp[fused] = (_combine(xs, lambda a: np.concatenate(a, axis=-1))
                                 if isinstance(xs[0], QuantizedArray) else np.concatenate(xs, -1))
            layers.append(lp)
        stacked = {k: (_combine([lp[k] for lp in layers], np.stack)
                       if isinstance(layers[0][k], QuantizedArray)
                       else np.stack([lp[k] for lp in layers])) for k in layers[0]}
        emb = gf.tensors["token_embd.weight"]
        if GGMLQuantizationType(emb.qtype).name in BLOCK_TYPES:
            # stored [D, V], the tied head's orientation: the embedding is its transpose
            embed: Any = read_q("token_embd.weight").T
        else:
            embed = read_float("token_embd.weight").astype(dt)
        params: dict[str, Any] = {"embed": embed, "layers": stacked,
                                  "final_norm": read_float("output_norm.weight").astype(dt)}
        if not cfg.tie_word_embeddings:
            params["lm_head"] = read_q("output.weight")
    return cfg, params, GGUFTokenizerInfo.from_metadata(gf.metadata)
