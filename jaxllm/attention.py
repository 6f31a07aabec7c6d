"""Attention dispatch: the one place that picks an implementation.

The model calls only the functions here.  Each takes ``impl``:

* ``"xla"``    -- plain jnp, jitted by XLA; the fast path on CPU.
* ``"pallas"`` -- the kernels in ``pallas_kernels/``; on CPU they run in Pallas
  interpret mode (slow, for checking the whole model through the kernels).
* ``"auto"``   -- ``"pallas"`` on GPU/TPU, ``"xla"`` on CPU.

Shapes use ``B`` batch, ``T`` query length, ``S`` key length, ``Hq``/``Hkv``
query/KV heads, ``D`` head dim.  Softmax is always computed in float32.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

Impl = Literal["auto", "pallas", "xla"]
IMPLS = ("auto", "pallas", "xla")
_NEG_INF = -1e30  # finite: fully-masked rows give zeros instead of NaN


def resolve_impl(impl: str) -> str:
    """Map ``"auto"`` to the implementation for the default backend."""
    if impl not in IMPLS:
        raise ValueError(f"attention_impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "xla" if jax.default_backend() == "cpu" else "pallas"
    return impl


def _softcap(scores: jax.Array, soft_cap: float | None) -> jax.Array:
    return scores if soft_cap is None else soft_cap * jnp.tanh(scores / soft_cap)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    sliding_window: int | None = None,
    sm_scale: float | None = None,
    soft_cap: float | None = None,
    impl: Impl = "auto",
) -> jax.Array:
    """Full (prefill / training) attention: ``q [B,T,Hq,D]``, ``k, v [B,S,Hkv,D]``.

    GQA: ``Hq`` must be a multiple of ``Hkv``.  The causal mask is aligned to the
    end (query ``i`` sits at key index ``i + S - T``).  ``segment_ids [B,T]``
    (and ``kv_segment_ids [B,S]``, defaulting to ``segment_ids``) keep packed
    sequences apart: a query sees a key only if their ids are equal.
    ``sliding_window`` w keeps keys with ``q_idx - k_idx < w``.
    """
    impl = resolve_impl(impl)
    sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    if kv_segment_ids is None:
        kv_segment_ids = segment_ids
    if impl == "pallas":
        from pallas_kernels.flash_attention import flash_attention

        return flash_attention(
            q, k, v, causal=causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
            sliding_window=sliding_window, sm_scale=sm_scale, soft_cap=soft_cap,
            interpret=jax.default_backend() == "cpu")
    return _attention_xla(q, k, v, causal, segment_ids, kv_segment_ids, sliding_window,
                          sm_scale, soft_cap)


def _query_block(t: int) -> int:
    """Query rows per block of the XLA path: 128 (measured best on CPU for T=512 among
    64/128/256), grown so that a long sequence stays at <= 16 unrolled blocks."""
    per_block = -(-t // 16)
    return max(128, -(-per_block // 8) * 8)


def _attention_xla(q, k, v, causal, segment_ids, kv_segment_ids, sliding_window, sm_scale,
                   soft_cap):
    """Blocked over queries: each block of queries attends only to the keys the causal
    mask / sliding window can let it see, so the masked-out half of a causal score
    matrix is never computed.  Heads lead (``[B,Hkv,G,T,D] @ [B,Hkv,1,D,S]``) so both
    products are plain batched matmuls (~4x faster on XLA:CPU than one full-matrix
    einsum; docs/kernels.md)."""
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    # f32 inputs: XLA:CPU has no bf16 x bf16 -> f32 dot, and f32 keeps the reference exact.
    qh = q.astype(jnp.float32).reshape(b, t, hkv, g, d).transpose(0, 2, 3, 1, 4)
    kt = k.astype(jnp.float32).transpose(0, 2, 3, 1)[:, :, None]  # [B,Hkv,1,D,S]
    vh = v.astype(jnp.float32).transpose(0, 2, 1, 3)[:, :, None]  # [B,Hkv,1,S,D]
    off = s - t  # query i sits at key index i + off
    blk = _query_block(t) if (causal or sliding_window is not None) else t
    outs = []
    for i in range(0, t, blk):
        e = min(t, i + blk)
        lo, hi = 0, s
        if causal:
            hi = min(s, off + e)
        if sliding_window is not None:
            lo = max(0, off + i - sliding_window + 1)
        if hi <= lo:  # no query of this block sees any key
            outs.append(jnp.zeros((b, hkv, g, e - i, d), jnp.float32))
            continue
        scores = jnp.matmul(qh[:, :, :, i:e], kt[..., lo:hi]) * sm_scale  # [B,Hkv,G,e-i,hi-lo]
        scores = _softcap(scores, soft_cap)
        q_idx = jnp.arange(i, e)[:, None] + off
        k_idx = jnp.arange(lo, hi)[None, :]
        mask = jnp.ones((e - i, hi - lo), bool)
        if causal:
            mask &= k_idx <= q_idx
        if sliding_window is not None:
            mask &= q_idx - k_idx < sliding_window
        mask = mask[None]
        if segment_ids is not None:
            mask = mask & (segment_ids[:, i:e, None] == kv_segment_ids[:, None, lo:hi])
        scores = jnp.where(mask[:, None, None], scores, _NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1)
        # A row with no visible key (e.g. T > S under the end-aligned causal mask, or a
        # query segment with no keys) would get a uniform softmax over masked keys: return
        # zeros, like the Pallas kernels.
        probs = jnp.where(jnp.any(mask, axis=-1, keepdims=True)[:, None, None], probs, 0.0)
        outs.append(jnp.matmul(probs, vh[:, :, :, lo:hi]))  # [B,Hkv,G,e-i,D]
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, hq, d).astype(q.dtype)


def cached_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    *,
    q_slot: jax.Array,
    kv_start: jax.Array,
    sliding_window: int | None = None,
    sm_scale: float | None = None,
    soft_cap: float | None = None,
) -> jax.Array:
    """Attention of new tokens over a contiguous (dense) KV cache.

    ``q [B,T,Hq,D]``; ``k_cache [B,Hkv,D,S]`` (keys stored transposed so the
    score product is a plain batched matmul, which XLA:CPU runs faster than the einsum
    over ``[B,S,Hkv,D]``); ``v_cache [B,Hkv,S,D]``.  The cache may hold more
    rows than ``q`` (spare rows are ignored).  Query ``t`` sits
    at cache slot ``q_slot + t`` (shared by the batch: prompts are left-padded);
    row ``b``'s valid slots start at ``kv_start[b]``.  Used by the static-batch
    generate loop; the paged engine uses :func:`ragged_paged_attention`.
    """
    b, t, hq, d = q.shape
    hkv, s = k_cache.shape[1], k_cache.shape[3]
    g = hq // hkv
    sm_scale = d ** -0.5 if sm_scale is None else sm_scale
    if k_cache.shape[0] > b:  # spare cache rows (generation.empty_caches): not read
        k_cache, v_cache = k_cache[:b], v_cache[:b]  # (cheaper than padding q to the
        # cache's rows, which would read the spare row's cache too)
    # [B,T,Hkv,G,D] -> [B,Hkv,T*G,D]
    qh = q.astype(jnp.float32).reshape(b, t, hkv, g, d).transpose(0, 2, 1, 3, 4)
    qh = qh.reshape(b, hkv, t * g, d)
    scores = jnp.matmul(qh, k_cache.astype(jnp.float32)) * sm_scale  # [B,Hkv,T*G,S]
    scores = _softcap(scores, soft_cap)
    slot = jnp.arange(s)
    q_pos = q_slot + jnp.repeat(jnp.arange(t), g)  # [T*G]
    mask = (slot[None, None, :] >= kv_start[:, None, None]) & (slot[None, None, :] <= q_pos[None, :, None])
    if sliding_window is not None:
        mask &= q_pos[None, :, None] - slot[None, None, :] < sliding_window
    scores = jnp.where(mask[:, None], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.matmul(probs, v_cache.astype(jnp.float32))  # [B,Hkv,T*G,D]
    out = out.reshape(b, hkv, t, g, d).transpose(0, 2, 1, 3, 4)
    return out.reshape(b, t, hq, d).astype(q.dtype)


# =====================================================================================
# Paged KV cache: cache write, decode attention, ragged (mixed prefill + decode) attention.
#
# Pool layout (shared by every impl): ``k_pages, v_pages [P, page_size, Hkv, D]``; token slot
# ``page * page_size + offset``.  ``block_tables [num_seqs, max_pages] int32`` maps a
# sequence's logical page j to a pool page; entries past its length are never used for
# their values (any id; ids are clamped before gathering).  Pages must hold finite values
# (allocate the pool with zeros): masked-out keys still pass through the PV product.
# =====================================================================================


def kv_storage_dtype(dtype, impl: Impl = "auto") -> jnp.dtype:
    """The array dtype a page pool of ``dtype`` is kept in.

    XLA:CPU has no bfloat16 scatter: it converts the whole operand to float32, scatters
    and converts back, so every K/V write would cost the pool's size.  On CPU (the XLA
    path and the Pallas kernels in interpret mode alike: both write with an XLA scatter)
    a bfloat16 pool therefore holds its values' bits as uint16 (an integer scatter
    updates it in place) and the attention reads widen the pages they read only.  On
    GPU/TPU a bfloat16 pool stays bfloat16.
    """
    dtype = jnp.dtype(dtype)
    if dtype == jnp.int8 and resolve_impl(impl) == "pallas":
        raise ValueError("kv_cache_dtype='int8' needs attention_impl='xla' (the Pallas ragged "
                         "kernel reads float pools)")
    on_cpu = jax.default_backend() == "cpu"
    if on_cpu and dtype == jnp.float16:
        raise ValueError("kv_cache_dtype='float16' is not supported on XLA:CPU (no float16 "
                         "scatter: every write would convert the whole pool); use "
                         "'bfloat16' or 'float32'")
    return jnp.dtype(jnp.uint16) if on_cpu and dtype == jnp.bfloat16 else dtype


def _widen(x: jax.Array) -> jax.Array:
    """Gathered pool values as float32 (a uint16 pool holds bfloat16 bits)."""
    if x.dtype == jnp.uint16:
        x = lax.bitcast_convert_type(x, jnp.bfloat16)
    return x.astype(jnp.float32)


def _set_rows(pages: jax.Array, idx: tuple[jax.Array, ...], rows: jax.Array) -> jax.Array:
    """``pages`` with ``rows`` written at ``pages[idx]`` (out-of-range idx: dropped)."""
    if pages.dtype == jnp.uint16:
        rows = lax.bitcast_convert_type(rows.astype(jnp.bfloat16), jnp.uint16)
    return pages.at[idx].set(rows.astype(pages.dtype), mode="drop")


def write_kv_pages(
    k_pages: jax.Array,
    v_pages: jax.Array,
    k: jax.Array,
    v: jax.Array,
    slot_mapping: jax.Array,
    *,
    impl: Impl = "auto",
    k_scales: jax.Array | None = None,
    v_scales: jax.Array | None = None,
) -> tuple[jax.Array, ...]:
    """Write new tokens' ``k, v [N,Hkv,D]`` into the page pools at ``slot_mapping [N]``.

    ``slot < 0`` marks padding tokens (skipped).  Both impls use one XLA scatter per pool
    (in place when the pools are donated / carried through the jitted step): it moves only
    ``N*Hkv*D`` elements, so a kernel would not beat it (see docs/kernels.md for timings).
    int8 pools come with their per-token scales ``k_scales, v_scales [P, page_size, Hkv]``
    (:func:`quantize_kv`); the result is then ``(k_pages, v_pages, k_scales, v_scales)``.
    """
    resolve_impl(impl)  # validate
    num_pages, page = k_pages.shape[:2]
    slot = slot_mapping.astype(jnp.int32)
    # Negative indices would wrap around in .at[]: send them out of range so mode="drop"
    # skips them.
    slot = jnp.where(slot < 0, num_pages * page, slot)

    def put(pages, rows):
        # indexed by (page, offset) on the pool's own shape: flattening it to slots first
        # made XLA pick a different layout for a sharded pool with one kv head per shard
        # and copy the whole pool back every step
        return _set_rows(pages, (slot // page, slot % page), rows)

    if k_scales is None:
        return put(k_pages, k), put(v_pages, v)
    (kq, ks), (vq, vs) = quantize_kv(k), quantize_kv(v)
    return put(k_pages, kq), put(v_pages, vq), put(k_scales, ks), put(v_scales, vs)


def quantize_kv(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 per token and head: ``x [..., D]`` -> ``(int8 [..., D], scale [...])``
    with ``x ~= q * scale`` (scale = max|x| / 127; an all-zero row gets scale 0)."""
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1) / 127.0
    q = jnp.round(x / jnp.where(scale > 0, scale, 1.0)[..., None])
    return jnp.clip(q, -127, 127).astype(jnp.int8), scale


def copy_kv_pages(pages: jax.Array, src: jax.Array, dst: jax.Array, *,
                  axis: int = 0) -> jax.Array:
    """Copy-on-write: pool pages ``src [C]`` copied to ``dst [C]`` along the page ``axis``
    (in place when the pool is donated).  Pairs with ``src == dst`` are no-ops (padding)."""
    at = (slice(None),) * axis + (dst,)
    return pages.at[at].set(jnp.take(pages, src, axis=axis))


def _table_pages(block_tables: jax.Array, *pools: jax.Array | None):
    """The pools' pages that ``block_tables [B, M]`` name, gathered into compact pools of
    ``B*M`` pages, and the tables ``[B, M]`` that index them (row ``b``'s page ``j`` is
    ``b*M + j``).  ``None`` pools (no scales) stay ``None``.

    For the Pallas kernels in interpret mode (CPU): the interpreter carries every operand
    of a kernel through its loop over the grid and copies it there, so a whole-pool
    operand would cost the pool's size per grid program.  The compact pools cost what the
    tables name; they keep the pool's storage dtype (a uint16 pool stays bits: the kernels
    widen the pages they load)."""
    b, m = block_tables.shape
    num_pages = next(p for p in pools if p is not None).shape[0]
    ids = jnp.clip(block_tables.astype(jnp.int32), 0, num_pages - 1).reshape(b * m)
    local = jnp.arange(b * m, dtype=jnp.int32).reshape(b, m)
    return local, tuple(None if p is None else jnp.take(p, ids, axis=0) for p in pools)


def _kernel_operands(block_tables: jax.Array, *pools: jax.Array | None):
    """``(interpret, block_tables, pools)`` for a paged Pallas kernel: on GPU/TPU the pool
    itself; on CPU, where the kernels run in interpret mode, :func:`_table_pages`."""
    if jax.default_backend() != "cpu":
        return False, block_tables, pools
    return (True, *_table_pages(block_tables, *pools))


def paged_decode_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    lengths: jax.Array,
    *,
    sm_scale: float | None = None,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
    k_scales: jax.Array | None = None,
    v_scales: jax.Array | None = None,
    impl: Impl = "auto",
    row_groups: int = 1,
) -> jax.Array:
    """Decode attention: one query per sequence ``q [B,Hq,D]`` at position ``lengths-1``.

    ``block_tables [B, max_pages]``, ``lengths [B]`` (0 -> output zeros).  Optional int8
    pools with per-token scales ``k_scales, v_scales [P, page_size, Hkv]`` (float32).
    ``row_groups``: the rows are sorted by length and ``B`` divides into that many equal
    groups; the XLA path, whose cost is rows x the longest length, attends each group on
    its own (the kernels follow each row's own length anyway).
    """
    impl = resolve_impl(impl)
    sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    if impl == "pallas":
        from pallas_kernels.paged_attention import paged_decode_attention as kernel

        interpret, block_tables, (k_pages, v_pages, k_scales, v_scales) = _kernel_operands(
            block_tables, k_pages, v_pages, k_scales, v_scales)
        return kernel(q, k_pages, v_pages, block_tables, lengths, sm_scale=sm_scale,
                      soft_cap=soft_cap, sliding_window=sliding_window, k_scales=k_scales,
                      v_scales=v_scales, interpret=interpret)
    import cpu_kernels

    if cpu_kernels.active():
        # The C++ kernel beat the XLA path below at every decode shape measured (1-64
        # rows, contexts up to 2048, f32 / bf16 / int8 pools): no shape threshold.
        return cpu_kernels.paged_decode_attention(
            q, k_pages, v_pages, block_tables, lengths, sm_scale=sm_scale,
            soft_cap=soft_cap, sliding_window=sliding_window, k_scales=k_scales,
            v_scales=v_scales)
    b = q.shape[0]
    if row_groups > 1:
        m = b // row_groups
        return jnp.concatenate([paged_decode_attention(
            q[j * m:(j + 1) * m], k_pages, v_pages, block_tables[j * m:(j + 1) * m],
            lengths[j * m:(j + 1) * m], sm_scale=sm_scale, soft_cap=soft_cap,
            sliding_window=sliding_window, k_scales=k_scales, v_scales=v_scales, impl=impl)
            for j in range(row_groups)])
    if b == 1:
        # XLA:CPU miscompiles the skinny path when there is a single query block (wrong
        # values under jit, right without it): run two rows, the second empty.
        out = paged_decode_attention(
            jnp.concatenate([q, jnp.zeros_like(q)]), k_pages, v_pages,
            jnp.concatenate([block_tables, jnp.zeros_like(block_tables)]),
            jnp.concatenate([lengths, jnp.zeros_like(lengths)]), sm_scale=sm_scale,
            soft_cap=soft_cap, sliding_window=sliding_window, k_scales=k_scales,
            v_scales=v_scales, impl=impl)
        return out[:1]
    lengths = lengths.astype(jnp.int32)
    return _paged_xla(q[:, None], k_pages, v_pages, block_tables, lengths,
                      jnp.maximum(lengths - 1, 0)[:, None], (lengths > 0)[:, None],
                      sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window,
                      k_scales=k_scales, v_scales=v_scales).reshape(b, *q.shape[1:])


def ragged_paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    block_tables: jax.Array,
    cu_q_lens: jax.Array,
    kv_lens: jax.Array,
    *,
    sm_scale: float | None = None,
    soft_cap: float | None = None,
    sliding_window: int | None = None,
    impl: Impl = "auto",
    block_q: int | None = None,
    k_scales: jax.Array | None = None,
    v_scales: jax.Array | None = None,
) -> jax.Array:
    """Mixed prefill-chunk + decode attention over paged K/V for a flat token batch.

    ``q [N,Hq,D]``; sequence ``s`` owns rows ``cu_q_lens[s]:cu_q_lens[s+1]``
    (``cu_q_lens [num_seqs+1]``, non-decreasing) and has ``kv_lens[s]`` keys in its pages
    (new tokens included, already written).  Its query ``j`` sits at position
    ``kv_lens[s] - q_len_s + j`` and attends causally.  Rows past ``cu_q_lens[-1]`` and
    sequences with ``q_len == 0`` (padding) produce zeros / cost nothing.

    ``block_q`` (XLA path): query tokens per block; default from a cost model of the
    static shapes (1 for decode-like batches, larger for prefill chunks).  int8 pools
    with ``k_scales, v_scales [P, page_size, Hkv]``: the XLA path and the CPU kernel.
    On CPU with ``cpu_kernels`` built the product runs on the C++ decode kernel, one row
    per query token (:func:`_ragged_as_decode_rows`).
    """
    impl = resolve_impl(impl)
    sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    if impl == "pallas":
        if k_scales is not None:
            raise NotImplementedError("the Pallas ragged kernel reads float pools; an int8 "
                                      "KV cache needs attention_impl='xla'")
        from pallas_kernels.ragged_attention import ragged_paged_attention as kernel

        interpret, block_tables, (k_pages, v_pages) = _kernel_operands(block_tables, k_pages,
                                                                       v_pages)
        return kernel(q, k_pages, v_pages, block_tables, cu_q_lens, kv_lens, sm_scale=sm_scale,
                      soft_cap=soft_cap, sliding_window=sliding_window, interpret=interpret)
    import cpu_kernels

    if cpu_kernels.active():
        return _ragged_as_decode_rows(q, k_pages, v_pages, block_tables, cu_q_lens, kv_lens,
                                      sm_scale=sm_scale, soft_cap=soft_cap,
                                      sliding_window=sliding_window, k_scales=k_scales,
                                      v_scales=v_scales)
    from pallas_kernels._common import ragged_num_blocks

    n, num_seqs = q.shape[0], block_tables.shape[0]
    if n == 1:  # a lone token: pad to two (rows past cu_q_lens[-1] give zeros), see below
        return ragged_paged_attention(
            jnp.concatenate([q, jnp.zeros_like(q)]), k_pages, v_pages, block_tables,
            cu_q_lens, kv_lens, sm_scale=sm_scale, soft_cap=soft_cap,
            sliding_window=sliding_window, impl=impl, block_q=block_q, k_scales=k_scales,
            v_scales=v_scales)[:1]
    bq = block_q or _ragged_block_q(n, num_seqs, q.shape[1] // k_pages.shape[2])
    if ragged_num_blocks(n, num_seqs, bq) == 1:
        # XLA:CPU miscompiles the path when it has a single query block (wrong values
        # under jit, right without it): always run at least two.
        bq = max(1, n // 2)
    return _ragged_xla(q, k_pages, v_pages, block_tables, cu_q_lens, kv_lens, k_scales,
                       v_scales, sm_scale=sm_scale, soft_cap=soft_cap,
                       sliding_window=sliding_window, block_q=bq)


def _ragged_as_decode_rows(q, k_pages, v_pages, block_tables, cu_q_lens, kv_lens, *,
                           sm_scale, soft_cap, sliding_window, k_scales, v_scales):
    """The ragged product on the C++ decode kernel (CPU): every query token is a decode row
    of its sequence whose length ends at the token's own position, which is the causal
    mask.  A sequence's pages are re-read by each of its tokens, from cache (a 512-token
    sequence's K/V is 393 KB in float32).  Measured 1.5x (one 512-token prefill), 2.5x (8
    chunks of 64 after 512 tokens of context) and 6x (2 chunks + 30 decode tokens) faster
    than the XLA path per layer (docs/kernels.md)."""
    import cpu_kernels

    n = q.shape[0]
    t = jnp.arange(n, dtype=jnp.int32)
    seq = jnp.clip(jnp.searchsorted(cu_q_lens, t, side="right") - 1, 0,
                   block_tables.shape[0] - 1)  # sequences with no rows are skipped
    start, q_len = cu_q_lens[seq], cu_q_lens[seq + 1] - cu_q_lens[seq]
    lengths = jnp.where(t < cu_q_lens[-1], kv_lens[seq] - q_len + (t - start) + 1, 0)
    return cpu_kernels.paged_decode_attention(
        q, k_pages, v_pages, block_tables[seq], lengths.astype(jnp.int32), sm_scale=sm_scale,
        soft_cap=soft_cap, sliding_window=sliding_window, k_scales=k_scales, v_scales=v_scales)


# --------------------------------------------------------------------- XLA paged paths
#
# Both paged paths share one routine over *query blocks*: a block holds up to ``bq``
# query tokens of ONE sequence (decode: one token per block).  K/V are gathered chunk by
# chunk (``chunk`` tokens of the block's sequence per step) inside a fori_loop whose trip
# count is the longest span actually needed, with an online softmax in float32.  So the
# cost scales with the real KV lengths, not with the block-table width, and no
# [blocks, S, Hkv, D] copy of the cache is ever materialised (large gathers on XLA:CPU
# also pay page faults on fresh buffers).  Gathered chunks are laid out [n, Hkv, C, D]
# (D stays innermost: a cheap transpose) and scores use matmul(K, q^T), which XLA:CPU
# runs ~2x faster than an einsum over the page layout (measured; docs/kernels.md).

_XLA_GATHER_ROW_COST = 14  # cost of gathering one key for a block, in "query rows"
_XLA_CHUNK_ELEMS = 1 << 19  # gathered K elements per chunk step (~2 MB f32), matmul form
_XLA_CHUNK_ELEMS_SKINNY = 1 << 19  # ... for the fused multiply-reduce form
_XLA_SKINNY_ROWS = 8  # blocks with <= this many query rows (decode) use multiply-reduce


def _xla_chunk_pages(nblocks: int, page: int, hkv: int, d: int, max_pages: int,
                     target: int = _XLA_CHUNK_ELEMS) -> int:
    per_page = max(1, nblocks * page * hkv * d)
    cp = max(1, target // per_page)
    cp = min(1 << (cp.bit_length() - 1), max(1, 512 // page))  # pow2, <= 512 tokens
    return max(1, min(cp, max_pages))


@functools.partial(jax.jit, static_argnames=("sm_scale", "soft_cap", "sliding_window"))
def _paged_xla(qb, k_pages, v_pages, bt_blk, kv_len_blk, q_pos, row_valid, *, sm_scale,
               soft_cap, sliding_window, k_scales=None, v_scales=None):
    """Attention of query blocks over their sequences' pages.

    ``qb [nb, bq, Hq, D]``; ``bt_blk [nb, max_pages]`` (block's sequence table);
    ``kv_len_blk [nb]``; ``q_pos [nb, bq]`` key position of each query;
    ``row_valid [nb, bq]``.  Returns ``[nb, bq, Hq, D]`` (invalid rows -> 0).

    Two forms of the chunk step (measured on XLA:CPU): blocks with few query rows
    (decode: G rows) use a fused gather -> multiply -> reduce over the natural page layout
    (K/V read once, no transposes; faster than batched matmuls with N=G);
    larger blocks gather ``[n, Hkv, C, D]`` and use ``matmul(K, q^T)``.
    """
    nb, bq, hq, d = qb.shape
    num_pages, page, hkv, _ = k_pages.shape
    g = hq // hkv
    rows = bq * g
    skinny = rows <= _XLA_SKINNY_ROWS
    max_pages = bt_blk.shape[1]
    cp = _xla_chunk_pages(nb, page, hkv, d, max_pages,
                          _XLA_CHUNK_ELEMS_SKINNY if skinny else _XLA_CHUNK_ELEMS)
    ct = cp * page
    n_total = -(-max_pages // cp)
    bt = jnp.clip(bt_blk.astype(jnp.int32), 0, num_pages - 1)
    bt = jnp.pad(bt, ((0, 0), (0, n_total * cp - max_pages)))
    kv_len_blk = jnp.minimum(kv_len_blk.astype(jnp.int32), max_pages * page)

    # [nb, bq, Hkv, G, D] -> [nb, Hkv, rows, D] (row = token * G + head), pre-scaled.
    qs = qb.astype(jnp.float32) * (sm_scale if soft_cap is None else 1.0)
    qs = qs.reshape(nb, bq, hkv, g, d).transpose(0, 2, 1, 3, 4).reshape(nb, hkv, rows, d)
    q_op = qs[:, None] if skinny else jnp.swapaxes(qs, 2, 3)  # [nb,1,Hkv,rows,D] | [nb,Hkv,D,rows]
    pos = jnp.broadcast_to(q_pos[:, :, None], (nb, bq, g)).reshape(nb, 1, rows, 1)
    valid = jnp.broadcast_to(row_valid[:, :, None], (nb, bq, g)).reshape(nb, 1, rows, 1)
    kp2 = k_pages.reshape(num_pages, page * hkv * d)
    vp2 = v_pages.reshape(num_pages, page * hkv * d)
    ks2 = None if k_scales is None else k_scales.reshape(num_pages, page * hkv)
    vs2 = None if v_scales is None else v_scales.reshape(num_pages, page * hkv)

    def gather(pool2, scales2, ids):
        x = _widen(pool2[ids].reshape(nb, ct, hkv, d))
        if scales2 is not None:
            x = x * scales2[ids].reshape(nb, ct, hkv, 1).astype(jnp.float32)
        return x[:, :, :, None, :] if skinny else x.transpose(0, 2, 1, 3)

    def body(c, carry):
        acc, m, l = carry
        ids = lax.dynamic_slice_in_dim(bt, c * cp, cp, axis=1)
        k = gather(kp2, ks2, ids)
        v = gather(vp2, vs2, ids)
        if skinny:  # [nb, C, Hkv, rows] -> [nb, Hkv, rows, C]
            s = jnp.sum(k * q_op, axis=-1).transpose(0, 2, 3, 1)
        else:
            s = jnp.swapaxes(jnp.matmul(k, q_op), 2, 3)
        if soft_cap is not None:
            s = _softcap(s * sm_scale, soft_cap)
        k_pos = c * ct + jnp.arange(ct, dtype=jnp.int32)[None, None, None, :]
        mask = (k_pos <= pos) & (k_pos < kv_len_blk[:, None, None, None]) & valid
        if sliding_window is not None:
            mask &= pos - k_pos < sliding_window
        s = jnp.where(mask, s, _NEG_INF)
        # keys on the minor axis: the softmax reductions are row reductions, which XLA:CPU
        # vectorises (key-major scores with column reductions: ~20% slower decode)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))  # [nb, Hkv, rows]
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[..., None])
        l_new = alpha * l + jnp.sum(p, axis=-1)
        if skinny:  # v [nb, C, Hkv, 1, D]
            pv = jnp.sum(p.transpose(0, 3, 1, 2)[..., None] * v, axis=1)  # [nb, Hkv, rows, D]
        else:
            pv = jnp.matmul(p, v)
        return acc * alpha[..., None] + pv, m_new, l_new

    init = (jnp.zeros((nb, hkv, rows, d), jnp.float32),
            jnp.full((nb, hkv, rows), _NEG_INF, jnp.float32),
            jnp.zeros((nb, hkv, rows), jnp.float32))
    need = jnp.where(row_valid, jnp.minimum(q_pos + 1, kv_len_blk[:, None]), 0)
    n_chunks = jnp.minimum((jnp.max(need) + ct - 1) // ct, n_total)
    acc, m, l = lax.fori_loop(0, n_chunks, body, init)
    seen = m > 0.5 * _NEG_INF
    out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
    out = out.reshape(nb, hkv, bq, g, d).transpose(0, 2, 1, 3, 4).reshape(nb, bq, hq, d)
    return out.astype(qb.dtype)


def _ragged_block_q(n: int, num_seqs: int, g: int) -> int:
    """Pick the query-block size minimising ``blocks * (gather cost + rows)`` (static)."""
    from pallas_kernels._common import ragged_num_blocks

    best, best_cost = 1, None
    bq = 1
    while bq <= max(1, n):
        cost = ragged_num_blocks(n, num_seqs, bq) * (_XLA_GATHER_ROW_COST + bq * g)
        if best_cost is None or cost < best_cost:
            best, best_cost = bq, cost
        bq *= 2
    return best


@functools.partial(jax.jit,
                   static_argnames=("sm_scale", "soft_cap", "sliding_window", "block_q"))
def _ragged_xla(q, k_pages, v_pages, block_tables, cu_q_lens, kv_lens, k_scales=None,
                v_scales=None, *, sm_scale, soft_cap, sliding_window, block_q=None):
    from pallas_kernels._common import ragged_block_metadata

    n, hq, d = q.shape
    hkv = k_pages.shape[2]
    num_seqs = block_tables.shape[0]
    bq = block_q or _ragged_block_q(n, num_seqs, hq // hkv)
    cu = cu_q_lens.astype(jnp.int32)
    kv_lens = kv_lens.astype(jnp.int32)
    meta, nb = ragged_block_metadata(cu, n, bq)
    seq, q_start, q_cnt, q_off = meta[0], meta[1], meta[2], meta[3]
    r = jnp.arange(bq, dtype=jnp.int32)
    tok = jnp.clip(q_start[:, None] + r[None, :], 0, max(n - 1, 0))  # [nb, bq]
    q_len = cu[seq + 1] - cu[seq]
    q_pos = (kv_lens[seq] - q_len + q_off)[:, None] + r[None, :]
    row_valid = r[None, :] < q_cnt[:, None]
    ob = _paged_xla(q[tok], k_pages, v_pages, block_tables[seq], kv_lens[seq], q_pos,
                    row_valid, sm_scale=sm_scale, soft_cap=soft_cap,
                    sliding_window=sliding_window, k_scales=k_scales,
                    v_scales=v_scales)  # [nb, bq, Hq, D]
    # Back to the flat token order: token t of sequence s is row (t - cu[s]) % bq of block
    # first_block[s] + (t - cu[s]) // bq.
    nblk = (jnp.maximum(cu[1:] - cu[:-1], 0) + bq - 1) // bq
    first_block = jnp.cumsum(nblk) - nblk
    t = jnp.arange(n, dtype=jnp.int32)
    s_of_t = jnp.clip(jnp.searchsorted(cu[1:], t, side="right"), 0, num_seqs - 1)
    local = t - cu[s_of_t]
    blk = jnp.clip(first_block[s_of_t] + local // bq, 0, nb - 1)
    out = ob.reshape(nb * bq, hq, d)[blk * bq + local % bq]
    return jnp.where((t < cu[-1])[:, None, None], out, 0).astype(q.dtype)
