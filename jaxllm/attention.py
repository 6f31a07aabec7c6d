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

from typing import Literal

import jax
import jax.numpy as jnp

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


def _attention_xla(q, k, v, causal, segment_ids, kv_segment_ids, sliding_window, sm_scale,
                   soft_cap):
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    # f32 inputs: XLA:CPU has no bf16 x bf16 -> f32 dot, and f32 keeps the reference exact.
    qg = q.astype(jnp.float32).reshape(b, t, hkv, g, d)
    scores = jnp.einsum("bthgd,bshd->bhgts", qg, k.astype(jnp.float32)) * sm_scale
    scores = _softcap(scores, soft_cap)
    q_idx = jnp.arange(t)[:, None] + (s - t)
    k_idx = jnp.arange(s)[None, :]
    mask = jnp.ones((t, s), bool)
    if causal:
        mask &= k_idx <= q_idx
    if sliding_window is not None:
        mask &= q_idx - k_idx < sliding_window
    mask = mask[None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == kv_segment_ids[:, None, :])
    scores = jnp.where(mask[:, None, None], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhgts,bshd->bthgd", probs, v.astype(jnp.float32))
    return out.reshape(b, t, hq, d).astype(q.dtype)


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
    score product is a plain batched matmul, which XLA:CPU runs ~1.5x faster than
    the einsum over ``[B,S,Hkv,D]``); ``v_cache [B,Hkv,S,D]``.  Query ``t`` sits
    at cache slot ``q_slot + t`` (shared by the batch: prompts are left-padded);
    row ``b``'s valid slots start at ``kv_start[b]``.  Used by the static-batch
    generate loop; the paged engine uses :func:`ragged_paged_attention`.
    """
    b, t, hq, d = q.shape
    hkv, s = k_cache.shape[1], k_cache.shape[3]
    g = hq // hkv
    sm_scale = d ** -0.5 if sm_scale is None else sm_scale
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
