"""Quantized checkpoints: ``jaxllm quantize MODEL --method ... --output DIR``.

Layout of ``DIR``::

    quantization.json       format tag, method, and every tensor's QuantizedArray metadata
                            (or ``kind: w8a8`` for a W8A8Array)
    config.jaxllm.json      ModelConfig fields
    weights.safetensors     flat tensors: "layers.wqkv.values", "layers.wqkv.scales", ...
    tokenizer.json ...      the model's tokenizer (Tokenizer.save_pretrained), when it has one

Params are stored stacked (``[L, ...]`` per layer leaf) with fused projections, so
``LLM(DIR)`` loads them quantized, without a float pass.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from jaxllm.quant import QuantizedArray, W8A8Array
from jaxllm.weights.checkpoint import config_from_dict, config_to_dict

FORMAT = "jaxllm-quantized-v1"
META_FILE = "quantization.json"
CONFIG_FILE = "config.jaxllm.json"
WEIGHTS_FILE = "weights.safetensors"


def is_quantized_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory written by :func:`save_quantized`."""
    return (Path(path) / META_FILE).is_file()


def _flatten(params: dict) -> dict[str, Any]:
    """``{"layers.wqkv": leaf, "embed": leaf, ...}`` of a stacked params dict."""
    out = {f"layers.{k}": v for k, v in params["layers"].items()}
    out.update({k: v for k, v in params.items() if k != "layers"})
    return out


def save_quantized(directory: str | os.PathLike, params: dict, config: Any, tokenizer: Any,
                   method: str) -> Path:
    """Write stacked, quantized ``params`` (from ``quantize_params``) with ``config`` and
    ``tokenizer`` (or None) to ``directory``; returns it."""
    from safetensors.numpy import save_file

    if not isinstance(params["layers"], dict):
        raise ValueError("save_quantized needs stacked params (a dict of [L, ...] leaves)")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {}
    for name, leaf in _flatten(params).items():
        if isinstance(leaf, W8A8Array):  # int8 rows + per-row scales (jaxllm.quant.w8a8)
            tensors[f"{name}.values"] = np.ascontiguousarray(np.asarray(leaf.values))
            tensors[f"{name}.scales"] = np.ascontiguousarray(np.asarray(leaf.scales))
            meta[name] = dict(kind="w8a8", transposed=leaf.transposed)
        elif isinstance(leaf, QuantizedArray):
            for part in ("values", "scales", "offsets"):
                arr = getattr(leaf, part)
                if arr is not None:
                    tensors[f"{name}.{part}"] = np.ascontiguousarray(np.asarray(arr))
            meta[name] = dict(bits=leaf.bits, group_size=leaf.group_size, packing=leaf.packing,
                              transposed=leaf.transposed, offsets=leaf.offsets is not None)
        else:  # norms and biases: float32 on disk, cast at load
            tensors[name] = np.ascontiguousarray(np.asarray(leaf, np.float32))
    save_file(tensors, str(out / WEIGHTS_FILE))
    (out / CONFIG_FILE).write_text(json.dumps(config_to_dict(config), indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    (out / META_FILE).write_text(json.dumps({"format": FORMAT, "method": method,
                                             "tensors": meta}, indent=2))
    return out


def load_quantized(directory: str | os.PathLike, dtype: Any) -> tuple[Any, dict, Any]:
    """``(ModelConfig, stacked params with QuantizedArray leaves, Tokenizer or None)``;
    ``dtype`` is the compute dtype (float leaves are cast to it).  ValueError names what
    is wrong with the directory."""
    from safetensors.numpy import load_file

    from jaxllm.tokenizer import Tokenizer

    d = Path(directory)
    meta = json.loads((d / META_FILE).read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{d / META_FILE}: format {meta.get('format')!r} is not {FORMAT!r}")
    for f in (CONFIG_FILE, WEIGHTS_FILE):
        if not (d / f).is_file():
            raise ValueError(f"{d}: quantized checkpoint is missing {f}")
    cfg = config_from_dict(json.loads((d / CONFIG_FILE).read_text()))
    tensors = load_file(str(d / WEIGHTS_FILE))
    dt = np.dtype(dtype)
    flat: dict[str, Any] = {}
    for name, m in meta["tensors"].items():
        try:
            if m.get("kind") == "w8a8":
                flat[name] = W8A8Array(tensors.pop(f"{name}.values"),
                                       tensors.pop(f"{name}.scales"), dtype=dt,
                                       transposed=m["transposed"])
                continue
            flat[name] = QuantizedArray(
                tensors.pop(f"{name}.values"), tensors.pop(f"{name}.scales"),
                tensors.pop(f"{name}.offsets") if m["offsets"] else None, bits=m["bits"],
                group_size=m["group_size"], packing=m["packing"], dtype=dt,
                transposed=m["transposed"])
        except KeyError as e:
            raise ValueError(f"{d / WEIGHTS_FILE}: tensor {e.args[0]!r} is missing") from None
    flat.update({k: v.astype(dt) for k, v in tensors.items()})
    params: dict[str, Any] = {"layers": {}}
    for name, leaf in flat.items():
        if name.startswith("layers."):
            params["layers"][name[len("layers."):]] = leaf
        else:
            params[name] = leaf
    tok = Tokenizer.from_hf_dir(d) if (d / "tokenizer.json").is_file() else None
    return cfg, params, tok
