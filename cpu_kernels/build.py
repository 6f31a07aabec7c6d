"""Build the C++ kernels with the system compiler on first use, cached on disk.

The shared library lands in ``$XDG_CACHE_HOME/jaxllm/cpu_kernels`` (default
``~/.cache/jaxllm/cpu_kernels``; ``JAXLLM_CPU_KERNELS_CACHE`` overrides) under a name
keyed by the sources, the jaxlib FFI headers, the compiler's version and the CPU flags
``-march=native`` expands to, so a changed source, compiler, jaxlib or machine builds a
fresh library and never loads a stale one.  An exclusive file lock makes concurrent
processes build once; the library is written to a temporary name and renamed into place,
so a reader never sees a half-written file.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax.ffi

SRC_DIR = Path(__file__).parent / "src"
SOURCES = ("paged_attention.cc", "matmul.cc", "quant_matmul.cc", "int8_matmul.cc")
HEADERS = ("common.h", "ktile.h", "simd.h")
# -O3 -march=native: the loops are written for the compiler to vectorise (AVX-512 here,
# AVX2 elsewhere); -fopenmp-simd honours the simd pragmas without an OpenMP runtime.
FLAGS = ("-O3", "-march=native", "-std=c++17", "-fPIC", "-shared", "-fopenmp-simd",
         "-fno-math-errno")


class BuildError(RuntimeError):
    """The compiler is missing or failed; the message says which and why."""


def cache_dir() -> Path:
    """Directory holding built libraries (created on demand)."""
    if os.environ.get("JAXLLM_CPU_KERNELS_CACHE"):
        return Path(os.environ["JAXLLM_CPU_KERNELS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxllm" / "cpu_kernels"


def find_compiler() -> str | None:
    """``$CXX`` if set, else the first of g++ / c++ / clang++ on ``PATH``."""
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"])
    for name in ("g++", "c++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)


def build_key(cxx: str) -> str:
    """Hash of sources + headers + FFI headers + compiler version + expanded -march=native."""
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode())
        h.update((SRC_DIR / name).read_bytes())
    ffi_h = Path(jax.ffi.include_dir()) / "xla" / "ffi" / "api"
    for name in ("api.h", "c_api.h", "ffi.h"):
        if (ffi_h / name).exists():
            h.update((ffi_h / name).read_bytes())
    h.update(_run([cxx, "--version"]).stdout.encode())
    # The driver's cc1 command line lists the concrete -march / -mavx512... flags that
    # -march=native resolved to on this CPU.
    probe = _run([cxx, "-march=native", "-E", "-v", "-x", "c++", "-"], input="")
    h.update("\n".join(ln for ln in probe.stderr.splitlines() if "cc1" in ln
                       or "-target-cpu" in ln).encode())
    h.update(" ".join(FLAGS).encode())
    return h.hexdigest()[:20]


def build() -> Path:
    """Path of the built library, compiling it first if this key has not been built.

    Raises :class:`BuildError` when no compiler is found or compilation fails.
    """
    cxx = find_compiler()
    if cxx is None:
        raise BuildError("no C++ compiler found (looked for $CXX, g++, c++, clang++ on PATH)")
    key = build_key(cxx)
    out_dir = cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / f"libjaxllm_cpu_kernels-{key}.so"
    if lib.exists():
        return lib
    with open(out_dir / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building this key
        try:
            if lib.exists():
                return lib
            fd, tmp = tempfile.mkstemp(prefix=lib.name + ".", suffix=".tmp", dir=out_dir)
            os.close(fd)
            cmd = [cxx, *FLAGS, "-isystem", jax.ffi.include_dir(), "-I", str(SRC_DIR),
                   *(str(SRC_DIR / s) for s in SOURCES), "-o", tmp]
            res = _run(cmd)
            if res.returncode != 0:
                os.unlink(tmp)
                tail = "\n".join(res.stderr.strip().splitlines()[-15:])
                raise BuildError(f"{Path(cxx).name} failed (exit {res.returncode}):\n{tail}")
            os.replace(tmp, lib)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return lib
