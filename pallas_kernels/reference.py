"""Plain, obviously-correct jnp versions of every kernel in this package.

Slow on purpose: K/V are gathered into contiguous arrays, masks are built
explicitly, the softmax runs in float32 over the full score matrix.  Every
kernel (and every fast XLA path in ``jaxllm.attention``) is tested against
these.  Conventions shared with the kernels:

* a query row that sees no valid key returns zeros (not the mean of V);
* page-table entries past a sequence's length are never read for their values
  (they may hold any page id; out-of-range ids are clamped before gathering).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG = -1e30


def _masked_softmax_weights(scores, mask):
    """float32 softmax over the last axis; rows with no valid entry -> all zeros."""
    scores = jnp.where(mask, scores, _NEG)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.where(jnp.any(mask, axis=-1, keepdims=True), probs, 0.0)


def _cap(s, soft_cap):
    return s if soft_cap is None else soft_cap * jnp.tanh(s / soft_cap)


# ------------------------------------------------------------------ dense


def flash_attention_ref(q, k, v, *, causal=True, segment_ids=None, kv_segment_ids=None,
                        sliding_window=None, sm_scale=None, soft_cap=None):
    """``q [B,T,Hq,D]``, ``k, v [B,S,Hkv,D]`` -> ``[B,T,Hq,D]``; query i at key i+S-T."""
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    sm_scale = d ** -0.5 if sm_scale is None else sm_scale
    kf = jnp.repeat(k.astype(jnp.float32), g, axis=2)  # [B,S,Hq,D]
    vf = jnp.repeat(v.astype(jnp.float32), g, axis=2)
    scores = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), kf) * sm_scale
    scores = _cap(scores, soft_cap)
    q_pos = jnp.arange(t)[:, None] + (s - t)
    k_pos = jnp.arange(s)[None, :]
    mask = jnp.ones((t, s), bool)
    if causal:
        mask &= k_pos <= q_pos
    if sliding_window is not None:
        mask &= q_pos - k_pos < sliding_window
    mask = jnp.broadcast_to(mask, (b, 1, t, s))
    if segment_ids is not None:
        kv_segment_ids = segment_ids if kv_segment_ids is None else kv_segment_ids
        mask = mask & (segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :])
    probs = _masked_softmax_weights(scores, mask)
    out = jnp.einsum("bhts,bshd->bthd", probs, vf)
    return out.astype(q.dtype)


# ------------------------------------------------------------------ paged


def gather_kv(pages, block_tables):
    """``pages [P, page, ...]``, ``block_tables [B, max_pages]`` -> ``[B, max_pages*page, ...]``."""
    num_pages, page = pages.shape[:2]
    bt = jnp.clip(block_tables, 0, num_pages - 1)
    g = pages[bt]  # [B, max_pages, page, ...]
    return g.reshape(g.shape[0], g.shape[1] * page, *pages.shape[2:])


def dequantize(pages, scales):
    """int8 ``pages [P, page, Hkv, D]`` with per-token ``scales [P, page, Hkv]`` -> f32."""
    if scales is None:
        return pages.astype(jnp.float32)
    return pages.astype(jnp.float32) * scales[..., None].astype(jnp.float32)


def quantize_kv(x, axis=-1):
    """Symmetric int8 per-vector quantisation over ``axis`` (head dim):
    returns ``(x_int8, scale)`` with ``x ~= x_int8 * scale``."""
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=axis)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    xq = jnp.clip(jnp.round(xf / jnp.expand_dims(scale, axis)), -127, 127).astype(jnp.int8)
    return xq, scale


def paged_decode_attention_ref(q, k_pages, v_pages, block_tables, lengths, *, sm_scale=None,
                               soft_cap=None, sliding_window=None, k_scales=None,
                               v_scales=None):
    """One query per sequence at position ``lengths-1``: ``q [B,Hq,D]`` -> ``[B,Hq,D]``."""
    b, hq, d = q.shape
    hkv = k_pages.shape[2]
    g = hq // hkv
    sm_scale = d ** -0.5 if sm_scale is None else sm_scale
    k = gather_kv(dequantize(k_pages, k_scales), block_tables)  # [B,S,Hkv,D] f32
    v = gather_kv(dequantize(v_pages, v_scales), block_tables)
    s = k.shape[1]
    qg = q.astype(jnp.float32).reshape(b, hkv, g, d)
    scores = jnp.einsum("bhgd,bshd->bhgs", qg, k) * sm_scale
    scores = _cap(scores, soft_cap)
    k_pos = jnp.arange(s)[None, :]
    q_pos = lengths[:, None] - 1
    mask = k_pos < lengths[:, None]
    if sliding_window is not None:
        mask &= q_pos - k_pos < sliding_window
    probs = _masked_softmax_weights(scores, mask[:, None, None, :])
    out = jnp.einsum("bhgs,bshd->bhgd", probs, v)
    return out.reshape(b, hq, d).astype(q.dtype)


def ragged_paged_attention_ref(q, k_pages, v_pages, block_tables, cu_q_lens, kv_lens, *,
                               sm_scale=None, soft_cap=None, sliding_window=None):
    """Flat batch of queries ``q [N,Hq,D]`` from several sequences (see
    ``pallas_kernels.ragged_attention``).  Per token: find its sequence, gather
    that sequence's K/V, mask causally at its own position.  O(N * S) memory."""
    n, hq, d = q.shape
    hkv = k_pages.shape[2]
    g = hq // hkv
    sm_scale = d ** -0.5 if sm_scale is None else sm_scale
    num_seqs = kv_lens.shape[0]
    tok = jnp.arange(n)
    seq = jnp.clip(jnp.searchsorted(cu_q_lens[1:], tok, side="right"), 0, num_seqs - 1)
    valid = tok < cu_q_lens[-1]
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    pos = kv_lens[seq] - q_len + (tok - cu_q_lens[seq])  # [N]
    k = gather_kv(k_pages.astype(jnp.float32), block_tables)[seq]  # [N,S,Hkv,D]
    v = gather_kv(v_pages.astype(jnp.float32), block_tables)[seq]
    s = k.shape[1]
    qg = q.astype(jnp.float32).reshape(n, hkv, g, d)
    scores = jnp.einsum("nhgd,nshd->nhgs", qg, k) * sm_scale
    scores = _cap(scores, soft_cap)
    k_pos = jnp.arange(s)[None, :]
    mask = (k_pos <= pos[:, None]) & (k_pos < kv_lens[seq][:, None]) & valid[:, None]
    if sliding_window is not None:
        mask &= pos[:, None] - k_pos < sliding_window
    probs = _masked_softmax_weights(scores, mask[:, None, None, :])
    out = jnp.einsum("nhgs,nshd->nhgd", probs, v)
    return out.reshape(n, hq, d).astype(q.dtype)


# ------------------------------------------------------------------ cache write


def write_kv_pages_ref(k_pages, v_pages, k, v, slot_mapping):
    """Write token ``i``'s ``k[i], v[i]`` (``[N,Hkv,D]``) to slot ``slot_mapping[i]``
    (``page*page_size + offset``); negative slots are padding and are skipped."""
    num_pages, page = k_pages.shape[:2]
    slot = slot_mapping.astype(jnp.int32)
    page_idx = jnp.where(slot >= 0, slot // page, num_pages)  # out of range -> dropped
    off = jnp.where(slot >= 0, slot % page, 0)
    k_pages = k_pages.at[page_idx, off].set(k.astype(k_pages.dtype), mode="drop")
    v_pages = v_pages.at[page_idx, off].set(v.astype(v_pages.dtype), mode="drop")
    return k_pages, v_pages
