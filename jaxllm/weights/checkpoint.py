"""Cache of converted params, so the second load of a GGUF/HF model skips parsing,
dequantization and transposition.

Layout (one entry per source file version and dtype)::

    $JAXLLM_CACHE_DIR or ~/.cache/jaxllm/converted/
      <key>/params/        params.bin (the arrays, 64-byte aligned) + params.json (index)
      <key>/config.json    ModelConfig fields
      <key>/tokenizer/     Tokenizer.save_pretrained output (GGUF sources)
      <key>/meta.json      written last: version, source, dtype, shapes

``key`` hashes the resolved source path, its size(s) and mtime(s), the dtype and
:data:`CONVERTER_VERSION` (bump it whenever conversion output changes).  Entries are
written into a temporary sibling directory and renamed into place, so a crash leaves no
half entry under the final name; an entry that fails to read back (missing meta or
arrays, wrong shapes) is deleted and rebuilt.  Older entries for the same source
and dtype are removed when a new one is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from jaxllm.config import ModelConfig, freeze_rope_scaling
from jaxllm.tokenizer import Tokenizer
from jaxllm.weights._common import param_shapes

__all__ = ["CONVERTER_VERSION", "cache_root", "cache_key", "cache_entry", "save_entry",
           "load_entry", "config_to_dict", "config_from_dict", "save_params", "restore_params"]

CONVERTER_VERSION = 2  # 2: params as one raw file + index (was an orbax tree)
_META = "meta.json"
_PARAMS, _INDEX = "params.bin", "params.json"
log = logging.getLogger(__name__)


def cache_root() -> Path:
    env = os.environ.get("JAXLLM_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "jaxllm" / "converted"


def _fingerprint(source: Path) -> list:
    source = source.resolve()
    if source.is_dir():
        files = sorted(p for p in source.iterdir()
                       if p.is_file() and (p.suffix in (".json", ".safetensors")))
    else:
        files = [source]
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def cache_key(source: str | os.PathLike, dtype) -> str:
    """Hash of (resolved path, sizes, mtimes, dtype, CONVERTER_VERSION)."""
    src = Path(source).resolve()
    payload = json.dumps([str(src), _fingerprint(src), np.dtype(dtype).name, CONVERTER_VERSION])
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def cache_entry(source: str | os.PathLike, dtype) -> Path:
    return cache_root() / cache_key(source, dtype)


# ----------------------------------------------------------------------------- config json

def config_to_dict(cfg: ModelConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["rope_scaling"] = cfg.rope_scaling_dict
    d["eos_token_ids"] = list(cfg.eos_token_ids)
    return d


def config_from_dict(d: dict) -> ModelConfig:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    kw = {k: v for k, v in d.items() if k in fields}
    kw["rope_scaling"] = freeze_rope_scaling(kw.get("rope_scaling"))
    kw["eos_token_ids"] = tuple(kw.get("eos_token_ids") or ())
    return ModelConfig(**kw)


# ----------------------------------------------------------------------------- params file

def _flat(tree: dict, prefix: str = "") -> list[tuple[str, np.ndarray]]:
    out = []
    for k, v in tree.items():
        name = f"{prefix}{k}"
        out += _flat(v, name + "/") if isinstance(v, dict) else [(name, np.asarray(v))]
    return out


def save_params(directory: str | os.PathLike, params: dict) -> None:
    """Write a numpy params pytree as one raw file plus a JSON index (name, dtype, shape,
    offset).  Reading it back is a memory copy per array: several times faster at start-up
    than an orbax restore of the same tree (docs/design.md#measurements)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    index, offset = [], 0
    with open(directory / _PARAMS, "wb") as f:
        for name, arr in _flat(params):
            pad = -offset % 64  # aligned arrays: numpy views need no realignment
            f.write(b"\0" * pad)
            offset += pad
            data = np.ascontiguousarray(arr).tobytes()
            f.write(data)
            index.append({"name": name, "dtype": arr.dtype.name, "shape": list(arr.shape),
                          "offset": offset})
            offset += len(data)
    (directory / _INDEX).write_text(json.dumps(index))


def restore_params(directory: str | os.PathLike, shapes_dtypes: dict) -> dict:
    """Read :func:`save_params` output back into numpy arrays laid out like
    ``shapes_dtypes`` (a pytree of ``(shape, dtype)`` tuples); raises ValueError when an
    array is missing or differs.

    The arrays are read-only views of the memory-mapped file (64-byte aligned): nothing is
    copied here, pages load on first touch, and on CPU ``jax.device_put(...,
    may_alias=True)`` uses them in place.  The mapping outlives a later removal of the
    file (the entry being pruned or rebuilt by another process)."""
    directory = Path(directory)
    index = {e["name"]: e for e in json.loads((directory / _INDEX).read_text())}
    raw = np.memmap(directory / _PARAMS, dtype=np.uint8, mode="r")

    def read(name: str, shape: tuple, dtype) -> np.ndarray:
        e = index.get(name)
        dt = np.dtype(dtype)
        if e is None or tuple(e["shape"]) != tuple(shape) or e["dtype"] != dt.name:
            raise ValueError(f"cached array {name!r} is missing or differs")
        n = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if e["offset"] + n > raw.size:
            raise ValueError(f"cached array {name!r} is cut short")
        return raw[e["offset"]:e["offset"] + n].view(dt).reshape(shape)

    def walk(like: dict, prefix: str) -> dict:
        return {k: walk(v, f"{prefix}{k}/") if isinstance(v, dict) else read(f"{prefix}{k}", *v)
                for k, v in like.items()}

    return walk(shapes_dtypes, "")


# ----------------------------------------------------------------------------- entries

def save_entry(source: str | os.PathLike, dtype, cfg: ModelConfig, params: dict,
               tokenizer=None) -> Path | None:
    """Write a cache entry atomically; returns its path, or None if writing failed
    (a warning is issued; loading goes on without the cache)."""
    src = Path(source).resolve()
    root = cache_root()
    final = root / cache_key(src, dtype)
    tmp = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
        save_params(tmp / "params", params)
        (tmp / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "tokenizer")
        meta = {"version": CONVERTER_VERSION, "source": str(src), "dtype": np.dtype(dtype).name,
                "has_tokenizer": tokenizer is not None,
                "shapes": _shapes_json(param_shapes(cfg))}
        (tmp / _META).write_text(json.dumps(meta, indent=2))
        try:
            os.replace(tmp, final)  # atomic; fails if another process got there first
            tmp = None
        except OSError:
            if not (final / _META).is_file():
                raise
            return final  # a concurrent writer finished first: keep its (identical) entry
        _prune_stale(root, src, np.dtype(dtype).name, keep=final.name)
        return final
    except Exception as e:  # disk full, read-only cache, ...
        warnings.warn(f"jaxllm: could not write the converted-weights cache at {final}: {e}",
                      RuntimeWarning, stacklevel=3)
        return None
    finally:
        if tmp is not None:
            _remove(tmp)


def load_entry(source: str | os.PathLike, dtype) -> tuple[ModelConfig, dict, Any, Path] | None:
    """``(config, params, tokenizer_or_None, entry_path)`` from the cache, or None on a miss.
    A corrupt or partial entry is deleted (and None returned so the caller rebuilds it)."""
    entry = cache_entry(source, dtype)
    if not entry.is_dir():
        return None
    try:
        meta = json.loads((entry / _META).read_text())
        if meta.get("version") != CONVERTER_VERSION or meta.get("dtype") != np.dtype(dtype).name:
            raise ValueError("version/dtype mismatch")
        cfg = config_from_dict(json.loads((entry / "config.json").read_text()))
        shapes = param_shapes(cfg)
        if meta.get("shapes") != _shapes_json(shapes):
            raise ValueError("shape mismatch")
        dt = np.dtype(dtype)
        sd = _map(shapes, lambda s: (tuple(s), dt))
        params = restore_params(entry / "params", sd)
        bad = []
        _check(params, shapes, dt, "", bad)
        if bad:
            raise ValueError(f"restored arrays differ from the recorded shapes: {bad[:3]}")
        tok = None
        if meta.get("has_tokenizer"):
            tok = Tokenizer.from_hf_dir(entry / "tokenizer")
        return cfg, params, tok, entry
    except Exception as e:
        log.warning("jaxllm: discarding corrupt cache entry %s (%s: %s)", entry, type(e).__name__, e)
        _remove(entry)
        return None


def _shapes_json(shapes: dict) -> dict:
    return _map(shapes, list)


def _map(tree: dict, fn) -> dict:
    return {k: _map(v, fn) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def _check(params, shapes, dt, prefix, bad):
    if set(params) != set(shapes):
        bad.append(f"{prefix}keys {sorted(params)} != {sorted(shapes)}")
        return
    for k, s in shapes.items():
        if isinstance(s, dict):
            _check(params[k], s, dt, f"{prefix}{k}/", bad)
        elif params[k].shape != tuple(s) or params[k].dtype != dt:
            bad.append(f"{prefix}{k}: {params[k].shape} {params[k].dtype}")


def _prune_stale(root: Path, src: Path, dtype_name: str, keep: str) -> None:
    for d in root.iterdir():
        if d.name == keep or d.name.startswith(".") or not d.is_dir():
            continue
        try:
            meta = json.loads((d / _META).read_text())
        except Exception:
            continue
        if meta.get("source") == str(src) and meta.get("dtype") == dtype_name:
            _remove(d)


def _remove(path: Path) -> None:
    # rename first so a concurrent reader never sees a half-deleted entry under its key
    try:
        trash = path.with_name(f".del-{path.name}-{uuid.uuid4().hex[:8]}")
        os.replace(path, trash)
    except OSError:
        trash = path
    shutil.rmtree(trash, ignore_errors=True)
