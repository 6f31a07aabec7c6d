"""HF checkpoint directories (config.json + safetensors) <-> ModelConfig + params pytree.

``load_hf`` reads ``model.safetensors`` or a sharded ``model.safetensors.index.json``
with ``safetensors`` (numpy framework; bf16 arrives as ``ml_dtypes.bfloat16``), maps
HF names onto the stacked pytree of docs/design.md (matmuls transposed to ``[in, out]``,
layers stacked on axis 0) and casts tensor by tensor into preallocated arrays, so peak
memory is the final params plus one tensor.  ``save_hf`` writes the inverse so that
``transformers`` can load the result (fine-tuning export).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxllm.config import ModelConfig
from jaxllm.weights._common import (alloc_params, param_shapes, progress_bar, resolve_dtype,
                                    transpose_into)

__all__ = ["load_hf", "save_hf", "read_hf_config", "find_safetensors", "HF_TOKENIZER_FILES"]

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "chat_template.jinja", "chat_template.json", "generation_config.json",
                      "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model")

# HF layer tensor suffix -> (param key, transpose)
_LAYER_MAP = {
    "self_attn.q_proj.weight": ("wq", True),
    "self_attn.k_proj.weight": ("wk", True),
    "self_attn.v_proj.weight": ("wv", True),
    "self_attn.o_proj.weight": ("wo", True),
    "self_attn.q_proj.bias": ("bq", False),
    "self_attn.k_proj.bias": ("bk", False),
    "self_attn.v_proj.bias": ("bv", False),
    "mlp.gate_proj.weight": ("w_gate", True),
    "mlp.up_proj.weight": ("w_up", True),
    "mlp.down_proj.weight": ("w_down", True),
    "input_layernorm.weight": ("attn_norm", False),
    "post_attention_layernorm.weight": ("mlp_norm", False),
}
_TOP_MAP = {
    "model.embed_tokens.weight": ("embed", False),
    "model.norm.weight": ("final_norm", False),
    "lm_head.weight": ("lm_head", True),
}
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def read_hf_config(path: str | os.PathLike) -> tuple[dict, ModelConfig]:
    """``(raw config.json dict, ModelConfig)`` for an HF checkpoint directory."""
    d = Path(path)
    if not d.exists():
        raise FileNotFoundError(f"model directory not found: {d}")
    f = d / CONFIG_FILE
    if not f.is_file():
        raise FileNotFoundError(
            f"{d} has no config.json: expected an HF checkpoint directory "
            f"(config.json + {SINGLE_FILE} or {INDEX_FILE}) or a .gguf file")
    try:
        raw = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{f}: expected a JSON object, got {type(raw).__name__}")
    try:
        cfg = ModelConfig.from_hf(raw)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{f}: {e}") from None
    return raw, cfg


def find_safetensors(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint directory (one, or the shards of the index)."""
    d = Path(path)
    single, index = d / SINGLE_FILE, d / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index (need a 'weight_map' "
                             f"object: {type(e).__name__}: {e})") from None
        paths = [d / f for f in files]
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f"{p}: shard listed in {index} is missing")
        return paths
    if single.is_file():
        return [single]
    others = sorted(p.name for p in d.glob("*.safetensors"))
    if len(others) == 1:
        return [d / others[0]]
    found = sorted(p.name for p in d.iterdir()) if d.is_dir() else []
    hint = " (PyTorch .bin checkpoints are not supported: re-save with safe_serialization)" \
        if any(n.endswith(".bin") for n in found) else ""
    raise FileNotFoundError(
        f"{d}: no weights found: expected {SINGLE_FILE} or {INDEX_FILE}{hint}; "
        f"directory has {found[:10]}")


def _iter_tensors(files: list[Path]) -> Iterator[tuple[Path, str, Any]]:
    """Yield ``(file, name, lazy_getter)``; wraps safetensors errors with the file name."""
    for f in files:
        try:
            handle = safe_open(str(f), framework="np")
        except Exception as e:  # SafetensorError, OSError
            raise ValueError(f"{f}: not a readable safetensors file ({e})") from None
        with handle:
            for name in handle.keys():
                def get(name=name, handle=handle, f=f):
                    try:
                        return handle.get_tensor(name)
                    except Exception as e:
                        raise ValueError(f"{f}: cannot read tensor {name!r} ({e})") from None
                yield f, name, get


def load_hf(path: str | os.PathLike, dtype=np.float32, *, progress: bool | None = None,
            ) -> tuple[ModelConfig, dict]:
    """Load an HF Llama/Mistral/Qwen2 checkpoint directory into ``(config, params)``.

    Raises ``FileNotFoundError`` (no directory / config.json / safetensors) or
    ``ValueError`` (corrupt files, missing or misshapen tensors, an untied model without
    ``lm_head.weight``, tensors this model family cannot represent) naming the file.
    """
    d = Path(path)
    dtype = resolve_dtype(dtype)
    _, cfg = read_hf_config(d)
    files = find_safetensors(d)
    shapes = param_shapes(cfg)
    params = alloc_params(shapes, dtype)
    filled: set[tuple[str, int]] = set()
    total = sum(f.stat().st_size for f in files)
    with progress_bar(total, f"Loading {d.name}", enabled=progress, large=total > 200 * 2**20) as bar:
        for f, name, get in _iter_tensors(files):
            target = _target(f, name, cfg, shapes)
            if target is None:
                continue
            key, i, transpose = target
            dst, want = (params["layers"][key], shapes["layers"][key][1:]) if i >= 0 else (
                params[key], shapes[key])
            w = get()
            got = tuple(w.shape[::-1]) if transpose else tuple(w.shape)
            if got != tuple(want):
                raise ValueError(f"{f}: tensor {name!r} has shape {tuple(w.shape)}, expected "
                                 f"{tuple(want[::-1]) if transpose else tuple(want)} from config.json")
            idx: Any = i if i >= 0 else ...
            if transpose:
                transpose_into(dst[idx], w)
            else:
                dst[idx] = w
            filled.add((key, i))
            bar.update(w.nbytes)
            del w
    _check_complete(d, files, cfg, shapes, filled)
    return cfg, params


def _target(f: Path, name: str, cfg: ModelConfig,
            shapes: dict) -> tuple[str, int, bool] | None:
    """Where a checkpoint tensor goes: ``(params key, layer or -1, transpose)``; None to skip."""
    m = _LAYER_RE.match(name)
    if m:
        i, suffix = int(m.group(1)), m.group(2)
        if suffix not in _LAYER_MAP:
            if _IGNORED.match(name):
                return None
            raise ValueError(f"{f}: tensor {name!r} is not part of a "
                             f"{cfg.architecture} model as jaxllm implements it")
        key, transpose = _LAYER_MAP[suffix]
        if key not in shapes["layers"]:
            raise ValueError(f"{f}: has {name!r} but config.json says attention_bias="
                             f"{cfg.attention_bias}")
        if i >= cfg.num_layers:
            raise ValueError(f"{f}: tensor {name!r} beyond num_hidden_layers={cfg.num_layers}")
        return key, i, transpose
    if name in _TOP_MAP:
        key, transpose = _TOP_MAP[name]
        if key == "lm_head" and cfg.tie_word_embeddings:
            return None  # tied: the embedding is the head
        return key, -1, transpose
    if _IGNORED.match(name):
        return None
    raise ValueError(f"{f}: unexpected tensor {name!r} for a {cfg.architecture} model")


def _check_complete(d: Path, files: list[Path], cfg: ModelConfig, shapes: dict,
                    filled: set[tuple[str, int]]) -> None:
    """Raise naming the tensors the checkpoint lacks."""
    missing = []
    for key, shape in shapes.items():
        if key == "layers":
            missing += [f"model.layers.{i}.{_hf_suffix(k)}" for k in shape
                        for i in range(cfg.num_layers) if (k, i) not in filled]
        elif (key, -1) not in filled:
            missing.append({"embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
                            "lm_head": "lm_head.weight"}[key])
    if missing:
        extra = (" (config.json has tie_word_embeddings=false, so lm_head.weight is required)"
                 if "lm_head.weight" in missing else "")
        raise ValueError(f"{d}: checkpoint lacks {len(missing)} tensor(s): "
                         f"{missing[:6]}{' ...' if len(missing) > 6 else ''}{extra}; "
                         f"read {[f.name for f in files]}")


def _hf_suffix(key: str) -> str:
    return {v[0]: k for k, v in _LAYER_MAP.items()}[key]


# ----------------------------------------------------------------------------- export

def _hf_tensors(cfg: ModelConfig, params: dict) -> list[tuple[str, Any]]:
    """``[(hf name, thunk -> contiguous array in HF orientation)]`` in HF module order."""
    layers = params["layers"]
    per_layer = isinstance(layers, (list, tuple))
    out: list[tuple[str, Any]] = [("model.embed_tokens.weight", lambda: params["embed"])]
    for i in range(cfg.num_layers):
        for suffix, (key, transpose) in _LAYER_MAP.items():
            src = layers[i] if per_layer else layers
            if key not in src:
                continue

            def thunk(src=src, key=key, transpose=transpose, i=i):
                a = np.asarray(src[key] if per_layer else src[key][i])
                return a.T if transpose else a
            out.append((f"model.layers.{i}.{suffix}", thunk))
    out.append(("model.norm.weight", lambda: params["final_norm"]))
    if not cfg.tie_word_embeddings:
        out.append(("lm_head.weight", lambda: np.asarray(params["lm_head"]).T))
    return out


def _write_shards(out: Path, entries: list[tuple[str, Any]], max_shard_bytes: int) -> None:
    """``model.safetensors``, or shards of at most ``max_shard_bytes`` plus their index."""
    plan: list[list[tuple[str, Any]]] = [[]]
    size = 0
    for name, thunk in entries:
        n = np.asarray(thunk()).nbytes  # views; cheap
        if plan[-1] and size + n > max_shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append((name, thunk))
        size += n
    names = [SINGLE_FILE] if len(plan) == 1 else [
        f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors" for k in range(len(plan))]
    weight_map, total = {}, 0
    for fname, shard in zip(names, plan):
        tensors = {name: np.ascontiguousarray(np.asarray(thunk())) for name, thunk in shard}
        total += sum(t.nbytes for t in tensors.values())
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in tensors})
        del tensors
    for stale in [SINGLE_FILE, INDEX_FILE] if len(plan) > 1 else [INDEX_FILE]:
        if stale not in names and (out / stale).exists():
            (out / stale).unlink()
    if len(plan) > 1:
        (out / INDEX_FILE).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def save_hf(path: str | os.PathLike, cfg: ModelConfig, params: dict,
            tokenizer_dir: str | os.PathLike | None = None, *, tokenizer=None,
            max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write an HF checkpoint directory that ``transformers`` loads.

    ``config.json`` (``cfg.to_hf()``), ``generation_config.json`` (bos/eos),
    ``model.safetensors`` (or shards + index above ``max_shard_bytes``) with HF names
    and ``[out, in]`` matmuls, in the params' own dtype.  ``tokenizer_dir``: copy the HF
    tokenizer files found there; ``tokenizer``: a :class:`jaxllm.tokenizer.Tokenizer` to
    save instead.  ``params["layers"]`` may be stacked or a list of per-layer dicts;
    jax arrays are fetched to host.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    entries = _hf_tensors(cfg, params)
    dtype_name = np.asarray(params["final_norm"]).dtype.name

    _write_shards(out, entries, max_shard_bytes)

    hf_cfg = cfg.to_hf()
    hf_cfg["dtype"] = hf_cfg["torch_dtype"] = dtype_name
    (out / CONFIG_FILE).write_text(json.dumps(hf_cfg, indent=2) + "\n")
    gen = {"bos_token_id": cfg.bos_token_id,
           "eos_token_id": list(cfg.eos_token_ids) if len(cfg.eos_token_ids) != 1
           else cfg.eos_token_ids[0]}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")

    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    elif tokenizer_dir is not None:
        src = Path(tokenizer_dir)
        copied = [n for n in HF_TOKENIZER_FILES if n != "generation_config.json" and (src / n).is_file()]
        if not copied:
            raise FileNotFoundError(f"{src}: no tokenizer files found (expected tokenizer.json)")
        for n in copied:
            shutil.copyfile(src / n, out / n)
    return out
