"""Accelerator specs for the roofline model: a datasheet table plus a measured ``cpu``.

A :class:`HardwareSpec` is two roofs -- peak dense FLOP/s per compute dtype and
memory bandwidth -- plus the memory size.  The built-in table holds vendor
datasheet numbers (dense, i.e. *without* the 2:4-sparsity doubling NVIDIA
prints next to them); ``get_hardware("cpu")`` measures this machine on the spot
with a jitted float32 matmul (compute roof) and a large elementwise copy
(bandwidth roof), so its roofs are *attained* numbers, not a datasheet.

Units are SI throughout: FLOP/s and bytes/s with 1 GB = 1e9 bytes.  (The
textbook A100 ridge of 142.5 FLOP/byte mixes units -- see
:func:`textbook_a100_ridge` and docs/roofline.md.)

Compute dtypes: ``"f32"``, ``"bf16"`` (also used for fp16) and ``"int8"``.
On NVIDIA parts ``"f32"`` is the TF32 tensor-core rate, which is what XLA uses
for float32 dots at JAX's default matmul precision on Ampere and later; on TPU
a default-precision float32 dot is a single bf16 pass, so ``"f32"`` is the bf16
rate there.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import time
from typing import Mapping

GB = 1e9
TFLOPS = 1e12

COMPUTE_DTYPES = ("f32", "bf16", "int8")


@dataclasses.dataclass(frozen=True)
class HardwareSpec:
    """Roofs of one device.  ``peak_flops`` maps a compute dtype to dense FLOP/s (or OP/s)."""

    name: str
    peak_flops: Mapping[str, float]
    mem_bw: float  # bytes/s
    mem_bytes: float | None = None  # device memory capacity
    source: str = ""
    measured: bool = False

    def peak(self, compute_dtype: str = "bf16") -> float:
        dt = normalize_compute_dtype(compute_dtype)
        if dt in self.peak_flops:
            return float(self.peak_flops[dt])
        # Fall back to the closest slower/faster class the part lists.
        for alt in ("bf16", "f32", "int8"):
            if alt in self.peak_flops:
                return float(self.peak_flops[alt])
        raise ValueError(f"{self.name}: no peak FLOP/s listed")

    def ridge(self, compute_dtype: str = "bf16") -> float:
        """Ridge point (FLOP/byte): the arithmetic intensity where the two roofs meet."""
        return self.peak(compute_dtype) / self.mem_bw

    def attainable(self, intensity: float, compute_dtype: str = "bf16") -> float:
        """Roofline: attainable FLOP/s at ``intensity`` FLOP/byte."""
        return min(self.peak(compute_dtype), self.mem_bw * intensity)

    def describe(self) -> str:
        peaks = ", ".join(f"{k} {v / TFLOPS:.4g} TFLOP/s" for k, v in self.peak_flops.items())
        mem = f", {self.mem_bytes / GB:.0f} GB" if self.mem_bytes else ""
        tag = " (measured)" if self.measured else ""
        return f"{self.name}{tag}: {peaks}; {self.mem_bw / GB:.4g} GB/s{mem}"

    def to_dict(self) -> dict:
        return {"name": self.name, "peak_flops": dict(self.peak_flops), "mem_bw": self.mem_bw,
                "mem_bytes": self.mem_bytes, "source": self.source, "measured": self.measured}


def normalize_compute_dtype(dt: str) -> str:
    d = str(dt).lower()
    if d in ("f32", "fp32", "float32", "tf32"):
        return "f32"
    if d in ("bf16", "bfloat16", "fp16", "f16", "float16", "half"):
        return "bf16"
    if d in ("int8", "i8", "fp8", "int4", "i4"):
        return "int8"
    raise ValueError(f"unknown compute dtype {dt!r}; expected one of {COMPUTE_DTYPES}")


# Datasheet numbers, dense (no sparsity).  Sources: NVIDIA A100 datasheet (2021),
# H100 / H200 datasheets (SXM5 columns), L4 datasheet, Google Cloud TPU v5e docs.
HARDWARE: dict[str, HardwareSpec] = {
    "A100-40G": HardwareSpec(
        "A100-40G", {"f32": 156 * TFLOPS, "bf16": 312 * TFLOPS, "int8": 624 * TFLOPS},
        1555 * GB, 40 * GB, "NVIDIA A100 SXM4 40GB datasheet: 312 TF bf16, 624 TOPS int8, "
        "156 TF TF32, HBM2 1,555 GB/s"),
    "A100-80G": HardwareSpec(
        "A100-80G", {"f32": 156 * TFLOPS, "bf16": 312 * TFLOPS, "int8": 624 * TFLOPS},
        2039 * GB, 80 * GB, "NVIDIA A100 SXM4 80GB datasheet: 312 TF bf16, 624 TOPS int8, "
        "156 TF TF32, HBM2e 2,039 GB/s"),
    "H100-SXM": HardwareSpec(
        "H100-SXM", {"f32": 494.7 * TFLOPS, "bf16": 989.4 * TFLOPS, "int8": 1978.9 * TFLOPS},
        3350 * GB, 80 * GB, "NVIDIA H100 SXM5 datasheet (dense = half the sparsity figure): "
        "989 TF bf16, 1,979 TOPS int8, 495 TF TF32, HBM3 3.35 TB/s"),
    "H200": HardwareSpec(
        "H200", {"f32": 494.7 * TFLOPS, "bf16": 989.4 * TFLOPS, "int8": 1978.9 * TFLOPS},
        4800 * GB, 141 * GB, "NVIDIA H200 SXM datasheet (dense): 989 TF bf16, 1,979 TOPS int8, "
        "HBM3e 4.8 TB/s, 141 GB"),
    "L4": HardwareSpec(
        "L4", {"f32": 60 * TFLOPS, "bf16": 121 * TFLOPS, "int8": 242.5 * TFLOPS},
        300 * GB, 24 * GB, "NVIDIA L4 datasheet (dense = half the sparsity figure): 121 TF bf16, "
        "242.5 TOPS int8, 60 TF TF32, GDDR6 300 GB/s"),
    "TPU-v5e": HardwareSpec(
        "TPU-v5e", {"f32": 197 * TFLOPS, "bf16": 197 * TFLOPS, "int8": 394 * TFLOPS},
        819 * GB, 16 * GB, "Google Cloud TPU v5e: 197 TF bf16, 394 TOPS int8, HBM2 819 GB/s, 16 GB "
        "(f32 dots at default precision run as one bf16 pass)"),
}

_ALIASES = {
    "a100": "A100-80G", "a100-80gb": "A100-80G", "a100-sxm": "A100-80G", "a100-40gb": "A100-40G",
    "h100": "H100-SXM", "h100-sxm5": "H100-SXM", "h200-sxm": "H200", "v5e": "TPU-v5e",
    "tpu-v5-lite": "TPU-v5e", "tpuv5e": "TPU-v5e",
}


def hardware_names() -> list[str]:
    return [*HARDWARE, "cpu"]


def get_hardware(name: str) -> HardwareSpec:
    """A built-in spec by (case-insensitive) name, or ``"cpu"`` measured on the spot."""
    key = name.strip()
    if key.lower() == "cpu":
        return measure_cpu()
    for k, spec in HARDWARE.items():
        if k.lower() == key.lower():
            return spec
    if key.lower() in _ALIASES:
        return HARDWARE[_ALIASES[key.lower()]]
    raise ValueError(f"unknown hardware {name!r}; choose one of {hardware_names()}")


def textbook_a100_ridge() -> float:
    """The 142.5 FLOP/byte A100 ridge quoted by the textbook, reproduced exactly.

    It is 312 TFLOP/s (dense fp16 tensor core, 1e12) divided by the A100-80GB's
    "2,039 GB/s" read as *binary* gigabytes (2039 * 2**30 B/s = 2.189e12 B/s).
    With SI units on both sides the A100-80GB ridge is 312e12 / 2.039e12 = 153.0
    (and 200.6 for the 40 GB part at 1,555 GB/s); the built-in table uses SI.
    """
    return 312e12 / (2039 * 2**30)


# --------------------------------------------------------------------------- CPU measurement

def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _robust_best(times: list[float]) -> float:
    """Second-fastest run: a roof is the best the machine does (other processes only slow
    it down), and skipping the very fastest guards against one timer glitch."""
    times = sorted(times)
    return times[1] if len(times) >= 4 else times[0]


def _best_time(fn, *args, repeat: int) -> float:
    out = fn(*args)
    out.block_until_ready()  # compile + warm up
    del out
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn(*args)
        out.block_until_ready()
        times.append(time.perf_counter() - t0)
        del out
    return _robust_best(times)


def _best_time_inplace(fn, x, repeat: int) -> float:
    """Like :func:`_best_time` for a donated ``x -> x`` function (no fresh output pages)."""
    x = fn(x)
    x.block_until_ready()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        x = fn(x)
        x.block_until_ready()
        times.append(time.perf_counter() - t0)
    return _robust_best(times)


@functools.lru_cache(maxsize=None)
def measure_cpu(matmul_n: int = 2048, copy_mib: int = 256, repeat: int = 5) -> HardwareSpec:
    """Measure this host's roofs: a jitted f32 ``[n,n] @ [n,n]`` and a ``copy_mib`` MiB copy.

    Compute roof = 2 n^3 / time.  Bandwidth roof = (read + write) bytes of a
    jitted, donated (in place) ``x + 1`` over a float32 array far larger than the
    caches / time.  Donation matters: a fresh output buffer per call pays first-touch
    page faults and measures a fraction of the bandwidth (docs/design.md#measurements).
    Both use the second-fastest of ``repeat`` runs after a warm-up; the result is cached
    per process.  The same f32 figure is used for every compute dtype (XLA:CPU's bf16
    and int8 dots run close to it).
    """
    import jax
    import jax.numpy as jnp

    n = matmul_n
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    mm = jax.jit(lambda x, y: x @ y)
    t_mm = _best_time(mm, a, b, repeat=repeat)
    flops = 2.0 * n**3 / t_mm

    elems = copy_mib * 2**20 // 4
    x = jnp.zeros((elems,), jnp.float32)
    cp = jax.jit(lambda v: v + 1.0, donate_argnums=0)
    t_cp = _best_time_inplace(cp, x, repeat=repeat)
    bw = 2.0 * elems * 4 / t_cp
    del a, b

    mem = None
    try:
        mem = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        pass
    try:
        load = f"{os.getloadavg()[0]:.1f}"
    except OSError:
        load = "?"
    name = f"cpu ({cpu_model_name()}, {cpu_threads()} threads)"
    src = (f"measured: jitted f32 {n}x{n} matmul {t_mm * 1e3:.2f} ms, "
           f"{copy_mib} MiB x+1 copy {t_cp * 1e3:.2f} ms (2nd-best of {repeat}; load average {load})")
    return HardwareSpec(name, {"f32": flops, "bf16": flops, "int8": flops}, bw, mem, src,
                        measured=True)
