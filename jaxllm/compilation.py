"""Compilation helpers: the persistent XLA cache and a compile counter for tests."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import jax


def enable_compilation_cache(path: str | os.PathLike | None = None) -> str | None:
    """Turn on JAX's persistent compilation cache (once per process).

    Location: ``path``, else ``$JAXLLM_COMPILATION_CACHE``, else
    ``~/.cache/jaxllm/xla``; ``JAXLLM_COMPILATION_CACHE=0`` disables it.  An
    already-configured cache directory is left alone.
    """
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    path = path or os.environ.get("JAXLLM_COMPILATION_CACHE")
    if path in ("0", "off", "false"):
        return None
    path = str(path or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "jaxllm" / "xla")
    jax.config.update("jax_compilation_cache_dir", path)
    # cache every program: start-up is many small compiles, not a few big ones
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


@contextlib.contextmanager
def count_compiles() -> Iterator[list[str]]:
    """Collect the names of the programs XLA compiles inside the block.

    Uses JAX's compilation log (``jax_log_compiles``); a cache hit in the jit
    cache compiles nothing and adds nothing to the list.
    """
    import logging

    names: list[str] = []

    class _Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            msg = record.getMessage()
            if msg.startswith("Compiling "):
                names.append(msg.split(" ")[1])

    logger = logging.getLogger("jax._src.interpreters.pxla")
    handler = _Handler(level=logging.DEBUG)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        with jax.log_compiles(True):
            yield names
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
