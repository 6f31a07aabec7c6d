"""Orbax cache of converted params, so the second load of a GGUF/HF model skips parsing,
dequantization and transposition.

Layout (one entry per source file version and dtype)::

    $JAXLLM_CACHE_DIR or ~/.cache/jaxllm/converted/
      <key>/params/        orbax (StandardCheckpointer) tree of numpy arrays
      <key>/config.json    ModelConfig fields
      <key>/tokenizer/     Tokenizer.save_pretrained output (GGUF sources)
      <key>/meta.json      written last: version, source, dtype, shapes

``key`` hashes the resolved source path, its size(s) and mtime(s), the dtype and
:data:`CONVERTER_VERSION` (bump it whenever conversion output changes).  Entries are
written into a temporary sibling directory and renamed into place, so a crash leaves no
half entry under the final name; an entry that fails to read back (missing meta,
orbax error, wrong shapes) is deleted and rebuilt.  Older entries for the same source
and dtype are removed when a new one is written.
"""

from __future__ import annotations

import contextlib
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

CONVERTER_VERSION = 1
_META = "meta.json"
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


# ----------------------------------------------------------------------------- orbax

@contextlib.contextmanager
def _quiet_orbax():
    """Silence orbax's absl INFO/WARNING chatter (e.g. "Skipping merge of OCDBT") for one call."""
    loggers = [logging.getLogger(n) for n in ("absl", "orbax")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _checkpointer():
    import orbax.checkpoint as ocp

    # No OCDBT, no zstd: faster save and restore for a cache on local disk
    # (docs/design.md#measurements).
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_compression=False))


def save_params(directory: str | os.PathLike, params: dict) -> None:
    """Save a numpy params pytree with orbax (blocking)."""
    with _quiet_orbax():
        ck = _checkpointer()
        try:
            ck.save(Path(directory).absolute(), params)
        finally:
            ck.close()


def restore_params(directory: str | os.PathLike, shapes_dtypes: dict) -> dict:
    """Restore into numpy arrays; ``shapes_dtypes``: pytree of ``(shape, dtype)`` tuples."""
    import jax
    import orbax.checkpoint as ocp

    is_leaf = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple)  # noqa: E731
    abstract = jax.tree.map(lambda sd: np.empty(sd[0], sd[1]), shapes_dtypes, is_leaf=is_leaf)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract)
    with _quiet_orbax():
        ck = _checkpointer()
        try:
            out = ck.restore(Path(directory).absolute(),
                             args=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args))
        finally:
            ck.close()
    return _reorder(out, shapes_dtypes)


def _reorder(tree, like):
    """orbax returns dicts with sorted keys; give them the canonical (design.md) order."""
    return {k: _reorder(tree[k], v) if isinstance(v, dict) else
            (tree[k] if isinstance(tree[k], np.ndarray) else np.asarray(tree[k]))
            for k, v in like.items()}


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
