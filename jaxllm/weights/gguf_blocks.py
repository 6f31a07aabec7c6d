"""GGUF Q8_0 / Q4_0 / Q4_1 tensors loaded as :class:`jaxllm.quant.QuantizedArray` in their
own block layout (blocks of 32 along the input dimension, float16 scales), with no float
copy of the weights: ``LLM(path.gguf, quantization="gguf")``.

A GGUF matrix is ``[N, K]`` (K contiguous) in numpy order; the quantized array stores
``[K, N]`` (codes transposed byte-wise, scales ``[K/32, N]``) so groups run along K as for
every quantized weight.  Q4 codes keep GGUF's nibble order (``packing="gguf32"``).
Dequantization reproduces ``gguf.quants.dequantize`` bit for bit: Q8_0 ``d * q``,
Q4_0 ``d * q - 8 d`` (= ``d * (q - 8)``, exact in float32), Q4_1 ``d * q + m``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.quant import QuantizedArray
from jaxllm.weights._common import resolve_dtype
from jaxllm.weights.gguf import (_LAYER_TENSORS, GGUFTokenizerInfo, SUPPORTED_GGUF_ARCHITECTURES,
                                 _unpermute_rope, config_from_gguf, read_gguf, read_tensor)

BLOCK_TYPES = ("Q8_0", "Q4_0", "Q4_1")
_FUSED = {"wqkv": ("wq", "wk", "wv"), "w_gate_up": ("w_gate", "w_up"),
          "bqkv": ("bq", "bk", "bv")}


def blocks_to_quantized(raw: np.ndarray, qtype_name: str, shape: tuple[int, int],
                        dtype: Any = np.float32) -> QuantizedArray:
    """Raw GGUF bytes of a ``[N, K]`` (numpy order) Q8_0 / Q4_0 / Q4_1 tensor -> the
    quantized ``[K, N]`` weight it is the transpose of."""
    n, k = shape
    if qtype_name not in BLOCK_TYPES:
        raise ValueError(f"GGUF block type must be one of {BLOCK_TYPES}, got {qtype_name}")
    if k % 32:
        raise ValueError(f"GGUF {qtype_name} tensor of shape {shape}: K={k} is not a "
                         "multiple of 32")
    size = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[qtype_name]
    b = np.asarray(raw, np.uint8).reshape(n, k // 32, size)
    d = np.ascontiguousarray(b[..., 0:2]).view(np.float16)[..., 0].T  # [K/32, N]
    if qtype_name == "Q8_0":
        q = np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(n, k)
        return QuantizedArray(np.ascontiguousarray(q.T), np.ascontiguousarray(d), None, bits=8,
                              group_size=32, packing="none", dtype=dtype)
    start = 2 if qtype_name == "Q4_0" else 4
    qs = b[..., start:start + 16]  # [N, K/32, 16]
    values = np.ascontiguousarray(qs.transpose(1, 2, 0).reshape(k // 2, n))
    if qtype_name == "Q4_0":
        offsets = (-8 * d.astype(np.float32)).astype(np.float16)  # exact: a power-of-two scale
    else:
        offsets = np.ascontiguousarray(np.ascontiguousarray(b[..., 2:4]).view(np.float16)[..., 0].T)
    return QuantizedArray(values, np.ascontiguousarray(d), offsets, bits=4, group_size=32,
                          packing="gguf32", dtype=dtype)


def _permute_columns(q: QuantizedArray, perm: np.ndarray) -> QuantizedArray:
    return QuantizedArray(q.values[..., perm], q.scales[..., perm],
                          None if q.offsets is None else q.offsets[..., perm], bits=q.bits,
                          group_size=q.group_size, packing=q.packing, dtype=q.dtype,
                          transposed=q.transposed)


def _combine(parts: list[QuantizedArray], fn) -> QuantizedArray:
    """Concatenate (fused projections) or stack (layers) quantized arrays child by child."""
    first = parts[0]
    meta = {(p.bits, p.group_size, p.packing, p.offsets is None) for p in parts}
    if len(meta) != 1:
        raise ValueError("quantization='gguf' needs the fused tensors (q/k/v, gate/up) and "
                         f"every layer's copy of a tensor in one block type, got {sorted(meta)}")
    return QuantizedArray(fn([p.values for p in parts]), fn([p.scales for p in parts]),
                          None if first.offsets is None else fn([p.offsets for p in parts]),
                          bits=first.bits, group_size=32, packing=first.packing,
                          dtype=first.dtype, transposed=first.transposed)


def load_gguf_blocks(path: str | os.PathLike, dtype: Any = "float32"
                     ) -> tuple[ModelConfig, dict, GGUFTokenizerInfo]:
    """Load a llama/qwen2 GGUF file keeping its Q8_0 / Q4_0 / Q4_1 blocks: ``(config,
    stacked params with fused projections, tokenizer info)``.  Norms and biases (and a
    float embedding) are cast to ``dtype``.  ValueError names any matmul tensor of another
    type."""
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
                                 f"{', '.join(BLOCK_TYPES)} tensors (load it without "
                                 "quantization='gguf' to dequantize)")
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
            e = read_q("token_embd.weight")  # stored [D, V]: the tied head's orientation
            embed: Any = QuantizedArray(e.values, e.scales, e.offsets, bits=e.bits,
                                        group_size=32, packing=e.packing, dtype=dt,
                                        transposed=True)
        else:
            embed = read_float("token_embd.weight").astype(dt)
        params: dict[str, Any] = {"embed": embed, "layers": stacked,
                                  "final_norm": read_float("output_norm.weight").astype(dt)}
        if not cfg.tie_word_embeddings:
            params["lm_head"] = read_q("output.weight")
    return cfg, params, GGUFTokenizerInfo.from_metadata(gf.metadata)
