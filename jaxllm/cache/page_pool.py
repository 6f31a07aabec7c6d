"""Device page pool for the paged KV cache: the K/V arrays every layer reads and writes.

Layout (shared with ``jaxllm.attention``): one K and one V array per layer,
``[num_pages, page_size, Hkv, D]``; token position ``p`` of a sequence lives in page
``block_table[p // page_size]`` at offset ``p % page_size`` (flat slot
``page * page_size + offset``).  Page 0 is the allocator's reserved null page
(:data:`jaxllm.cache.NULL_BLOCK_ID`): block-table padding points there.

Two structures, matching the parameter layout the model runs with:

* unrolled (``params["layers"]`` is a list): ``caches = [(k, v), ...]``, one pair per layer;
* stacked (``lax.scan`` over stacked layers): ``caches = (k, v)`` with shape
  ``[L, num_pages, page_size, Hkv, D]``.  The runner flattens the leading two axes and
  offsets page ids by ``layer * num_pages`` so the whole pool stays in the scan carry and
  is updated in place (a per-layer slice would be copied every step).

An int8 pool (``kv_cache_dtype="int8"``) adds two float32 scale arrays per layer,
``[num_pages, page_size, Hkv]`` for K and V (one scale per token and head, written with
the values), so a layer is ``(k, v, k_scales, v_scales)``: about 3.7x the tokens of a
float32 pool in the same memory at head_dim 64.

A bfloat16 pool on XLA:CPU is stored as its bits in uint16 arrays
(:func:`jaxllm.attention.kv_storage_dtype`: XLA:CPU would otherwise convert the whole pool
to float32 for every K/V write); ``dtype`` is the values' dtype, ``storage_dtype`` the
arrays'.

The pool is allocated once, zero-filled (the attention reference needs finite values in
unused pages), and donated to every jitted step so XLA updates it in place.

On a mesh (``model``: a ``sharding.ShardedModel``): one ``(k, v)`` pair per layer *within
a pipeline stage*, each ``[pp * num_pages, page_size, Hkv', D]`` with the model's
``paged_cache_spec`` -- kv heads split over ``tensor``, stage ``s`` owning pages
``[s * num_pages, (s + 1) * num_pages)`` of every array.  Block tables hold stage-local
page ids, so one allocator serves every stage; each device holds
``[num_pages, page_size, Hkv'/tp, D]`` of its stage's ``L/pp`` layers.

Sizing: ``num_pages`` explicit, or from a memory budget --
``memory_utilization * device memory - memory in use now`` (weights are placed before
the pool is sized).  On GPU/TPU "device memory" is the allocator's ``bytes_limit``; on
CPU it is the machine's RAM from ``/proc/meminfo`` (``MemTotal``; in use =
``MemTotal - MemAvailable``), further capped at ``cpu_kv_cache_space`` bytes (default
4 GiB, like vLLM's ``VLLM_CPU_KVCACHE_SPACE``; env ``JAXLLM_CPU_KVCACHE_SPACE`` in GiB) so a
shared host is not filled with a zeroed cache by default.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.attention import kv_storage_dtype
from jaxllm.config import ModelConfig

__all__ = ["PagePool", "kv_bytes_per_page", "device_memory", "pages_for_budget",
           "DEFAULT_CPU_KV_CACHE_SPACE"]

DEFAULT_CPU_KV_CACHE_SPACE = 4 << 30  # bytes

KV_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
             "int8": jnp.int8}


def _dtype(dtype: Any) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in KV_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {sorted(KV_DTYPES)}, got {dtype!r}")
        return jnp.dtype(KV_DTYPES[dtype])
    return jnp.dtype(dtype)


def kv_bytes_per_page(cfg: ModelConfig, page_size: int, dtype: Any, model: Any = None) -> int:
    """Bytes one page takes over all layers, K and V (on a mesh: on each device, i.e. its
    stage's layers and its share of the kv heads)."""
    layers, heads = cfg.num_layers, cfg.num_kv_heads
    if model is not None:
        layers = layers // model.pp
        heads = model.plan.model_cfg.num_kv_heads // model.tp
    per_token_head = cfg.head_dim * _dtype(dtype).itemsize
    if _dtype(dtype) == jnp.int8:
        per_token_head += 4  # its float32 scale
    return 2 * layers * page_size * heads * per_token_head


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts:
                    out[key] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    except OSError:
        pass
    return out


def device_memory(device: jax.Device | None = None) -> tuple[int, int]:
    """``(total, in_use)`` bytes of ``device``'s memory (CPU: the host's RAM).

    Raises RuntimeError when it cannot be determined (pass ``num_pages`` then)."""
    device = device or jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"]), int(stats.get("bytes_in_use", 0))
        raise RuntimeError(f"cannot read the memory of {device}; pass num_pages explicitly")
    info = _meminfo()
    if "MemTotal" not in info or "MemAvailable" not in info:
        raise RuntimeError("cannot read /proc/meminfo; pass num_pages explicitly")
    return info["MemTotal"], info["MemTotal"] - info["MemAvailable"]


def cpu_kv_cache_space() -> int:
    env = os.environ.get("JAXLLM_CPU_KVCACHE_SPACE")
    return int(float(env) * (1 << 30)) if env else DEFAULT_CPU_KV_CACHE_SPACE


def pages_for_budget(cfg: ModelConfig, page_size: int, dtype: Any, memory_utilization: float,
                     device: jax.Device | None = None, model: Any = None) -> tuple[int, int]:
    """Pages that fit ``memory_utilization`` of the device memory not yet in use (on a
    mesh: of one of its devices, each holding its share of every page).

    Returns ``(num_pages, budget_bytes)``."""
    if not 0 < memory_utilization <= 1:
        raise ValueError(f"memory_utilization must be in (0, 1], got {memory_utilization}")
    if device is None:
        device = model.mesh.devices.flat[0] if model is not None else jax.devices()[0]
    total, used = device_memory(device)
    budget = int(memory_utilization * total) - used
    if device.platform == "cpu":
        # virtual CPU devices share the host's RAM: split the budget between them
        share = 1 if model is None else model.mesh.devices.size
        budget = min(budget, cpu_kv_cache_space()) // share
    return max(0, budget // kv_bytes_per_page(cfg, page_size, dtype, model)), budget


def pool_bucket(num_pages: int, up: bool = True) -> int:
    """``num_pages`` rounded to three significant bits (``m * 2**k``, ``8 <= m < 16``):
    the pool's array size is part of every step program's shape, so nearby pool sizes
    share compiled programs (at most 1/8 more pages than asked, or fewer for a budget)."""
    if num_pages <= 16:
        return num_pages
    k = num_pages.bit_length() - 4
    m = -(-num_pages // (1 << k)) if up else num_pages >> k
    return m << k


@dataclasses.dataclass
class PagePool:
    """The per-layer K/V page arrays and their geometry.

    ``caches`` is the pytree the jitted step takes (and donates): a list of ``(k, v)``
    per layer, or ``(k, v)`` stacked ``[L, num_pages, page_size, Hkv, D]``, or on a mesh
    (``model``) a list of ``(k, v)`` per layer of a stage, sharded (module docstring).
    """

    cfg: ModelConfig
    num_pages: int
    page_size: int
    dtype: jnp.dtype
    stacked: bool
    model: Any = None  # a sharding.ShardedModel: the pool is laid out on its mesh
    _caches: Any = dataclasses.field(default=None, repr=False)
    _filling: Any = dataclasses.field(default=None, repr=False, compare=False)
    storage_dtype: jnp.dtype | None = None  # the arrays' dtype (None: ``dtype``)
    capacity: int | None = None  # pages in the arrays (>= num_pages; None: num_pages)

    def __post_init__(self) -> None:
        self.storage_dtype = jnp.dtype(self.storage_dtype or self.dtype)
        self.capacity = max(self.capacity or 0, self.num_pages)

    @classmethod
    def create(cls, cfg: ModelConfig, *, page_size: int = 16, num_pages: int | None = None,
               memory_utilization: float = 0.9, dtype: Any = jnp.float32,
               stacked: bool = False, max_model_len: int | None = None,
               max_pages: int | None = None, device: jax.Device | None = None,
               model: Any = None, impl: str = "auto") -> "PagePool":
        """Size and allocate the pool.  ``max_pages`` caps a budget-sized pool (the engine
        passes what ``max_num_seqs`` sequences of ``max_model_len`` can ever use).

        Raises ValueError for an impossible configuration: ``page_size`` not a power of two,
        or a pool that cannot hold one sequence of ``max_model_len`` tokens (plus the
        reserved null page)."""
        if not isinstance(page_size, (int, np.integer)) or page_size < 1 or page_size & (page_size - 1):
            raise ValueError(f"page_size must be a power of two, got {page_size!r}")
        dtype = _dtype(dtype)
        budget = None
        if num_pages is None:
            num_pages, budget = pages_for_budget(cfg, page_size, dtype, memory_utilization,
                                                 device, model)
            num_pages = pool_bucket(num_pages, up=False)  # a stable size for a budget
            if max_pages is not None:
                num_pages = min(num_pages, max_pages)
        if max_model_len is not None:
            need = -(-max_model_len // page_size) + 1  # + the null page
            if num_pages < need:
                per_page = kv_bytes_per_page(cfg, page_size, dtype, model)
                how = (f"num_pages={num_pages}" if budget is None else
                       f"a budget of {budget / 2**20:.1f} MiB ({num_pages} pages of "
                       f"{per_page / 2**10:.1f} KiB; memory_utilization={memory_utilization})")
                raise ValueError(
                    f"KV page pool too small: one sequence of max_model_len={max_model_len} "
                    f"tokens needs {need} pages of {page_size} tokens (incl. the reserved null "
                    f"page), {how}. Raise num_pages / memory_utilization or lower max_model_len.")
        elif num_pages < 2:
            raise ValueError(f"the KV page pool needs at least 2 pages, got {num_pages}")
        if model is not None and stacked:
            raise ValueError("a pool on a mesh follows the model's staged layer layout "
                             "(stacked=False)")
        pool = cls(cfg=cfg, num_pages=int(num_pages), page_size=int(page_size), dtype=dtype,
                   stacked=stacked, model=model, storage_dtype=kv_storage_dtype(dtype, impl),
                   capacity=pool_bucket(int(num_pages)))
        pool.fill_in_background()
        return pool

    @property
    def page_shape(self) -> tuple[int, ...]:
        return (self.capacity, self.page_size, self.cfg.num_kv_heads, self.cfg.head_dim)

    @property
    def quantized(self) -> bool:
        """int8 K/V with per-token, per-head float32 scales."""
        return self.dtype == jnp.int8

    @property
    def num_slots(self) -> int:
        """Token slots in the pool, the null page excluded."""
        return (self.num_pages - 1) * self.page_size

    @property
    def nbytes(self) -> int:
        """Bytes of the whole pool (on a mesh: summed over its devices)."""
        per_device = self.capacity * kv_bytes_per_page(self.cfg, self.page_size, self.dtype,
                                                        self.model)
        return per_device * (1 if self.model is None else self.model.mesh.devices.size)

    def layout(self) -> Any:
        """The pool's pytree of ``jax.ShapeDtypeStruct`` (shapes, dtypes, shardings): what
        :meth:`zeros` allocates and what programs are compiled for, without the arrays."""
        n, dt = self.cfg.num_layers, self.storage_dtype
        if self.model is not None:
            m = self.model
            c = m.plan.model_cfg
            shape = (m.pp * self.capacity, self.page_size, c.num_kv_heads, c.head_dim)
            shapes = [(shape, dt)] * 2 + [(shape[:-1], jnp.float32)] * (2 * self.quantized)
            specs = m.paged_cache_spec(self.quantized)
            layer = tuple(
                jax.ShapeDtypeStruct(sh, t, sharding=jax.sharding.NamedSharding(m.mesh, s))
                for (sh, t), s in zip(shapes, specs))
            return [layer for _ in range(m.layers_per_stage)]
        lead = (n,) if self.stacked else ()
        arrays = [jax.ShapeDtypeStruct((*lead, *self.page_shape), dt) for _ in range(2)]
        if self.quantized:  # K, V and their scales
            arrays += [jax.ShapeDtypeStruct((*lead, *self.page_shape[:-1]), jnp.float32)
                       for _ in range(2)]
        return tuple(arrays) if self.stacked else [tuple(arrays) for _ in range(n)]

    def zeros(self) -> Any:
        """Zero-filled arrays of :meth:`layout` (one program: every layer at once)."""
        layout = self.layout()
        shardings = jax.tree.map(lambda a: a.sharding, layout)
        make = jax.jit(lambda: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), layout),
                       out_shardings=None if self.model is None else shardings)
        return make()

    @property
    def caches(self) -> Any:
        """The arrays (waits for a background fill started by :meth:`create`)."""
        if self._filling is not None:
            filling, self._filling = self._filling, None
            self._caches = filling.result()  # re-raises the fill's error (e.g. out of memory)
        return self._caches

    @property
    def filling(self) -> bool:
        """Whether a background fill is still writing the arrays."""
        return self._filling is not None and not self._filling.done()

    @caches.setter
    def caches(self, value: Any) -> None:
        if self._filling is not None:  # never let a late fill overwrite what is set now
            self._filling.result()
            self._filling = None
        self._caches = value

    def fill_in_background(self) -> None:
        """Start zero-filling the arrays in a thread; :attr:`caches` waits for it.  On CPU
        writing a large pool's zeros takes a visible part of start-up and blocks the
        caller even when jitted (docs/benchmarks.md); meanwhile the caller tokenizes,
        traces and compiles (JAX releases the GIL while it runs)."""
        pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxllm-pool")
        self._filling = pool.submit(self.zeros)
        pool.shutdown(wait=False)

    def reset(self) -> None:
        """Drop the contents (e.g. after a failed step whose donated pool is gone)."""
        self.caches = None
        self.caches = self.zeros()

    def describe(self) -> str:
        arrays = f" in arrays of {self.capacity}" if self.capacity != self.num_pages else ""
        stored = ("" if self.storage_dtype == self.dtype else
                  f" stored as {self.storage_dtype.name} bits")
        mesh = ("" if self.model is None else
                f"; dp={self.model.dp} pp={self.model.pp} tp={self.model.tp}")
        return (f"{self.num_pages} pages x {self.page_size} tokens{arrays} "
                f"({self.num_slots} token slots, {self.nbytes / 2**20:.1f} MiB, "
                f"{jnp.dtype(self.dtype).name}{stored}, "
                f"{'stacked' if self.stacked else 'per-layer'}{mesh})")
