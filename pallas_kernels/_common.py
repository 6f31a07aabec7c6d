"""Pieces shared by the Pallas attention kernels.

Everything that runs *inside* a kernel sticks to what the Pallas Triton
lowering supports (2-D dots, power-of-two tensor shapes, no ``lax.slice``,
scalar loads, ``fori_loop`` with traced bounds) so the same code lowers to
Triton on GPU and runs under ``interpret=True`` on CPU.

Softmax bookkeeping is done in base 2: scores are multiplied by ``log2(e)``
once and ``exp2`` is used throughout (one multiply per score instead of one per
exponential).  ``m``/``lse`` values stored between kernels are base-2.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

NEG_INF = -1e30  # finite mask value: never produces inf - inf = NaN
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# lse stored for rows that saw no valid key: exp2(s - BIG_LSE) == 0 for any finite s,
# so the backward pass gives zero gradients for them.
BIG_LSE = 1e30


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return cdiv(a, b) * b


def pad_axis(x: jax.Array, axis: int, new_size: int, value=0) -> jax.Array:
    if x.shape[axis] == new_size:
        return x
    pads = [(0, 0)] * x.ndim
    pads[axis] = (0, new_size - x.shape[axis])
    return jnp.pad(x, pads, constant_values=value)


def compiler_params(interpret: bool, num_warps: int = 4, num_stages: int = 2):
    """Triton compiler params (ignored by the interpreter)."""
    if interpret:
        return None
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


# ---------------------------------------------------------------- in-kernel math


def pool_values(pages):
    """Pages loaded from a KV pool, as values: a uint16 pool holds bfloat16 bits (the
    form XLA:CPU can scatter in place, ``jaxllm.attention.kv_storage_dtype``), so its
    loaded block is bitcast to bfloat16 -- only the block, never the pool; every other
    dtype is returned as is."""
    if pages.dtype == jnp.uint16:
        return lax.bitcast_convert_type(pages, jnp.bfloat16)
    return pages


def check_pool_dtype(pages, scales, name: str) -> None:
    """Pools the paged kernels read: float, bfloat16 bits in uint16 (no scales), or
    integers with per-token ``scales`` (int8)."""
    if pages.dtype == jnp.uint16:
        if scales is not None:
            raise ValueError(f"a uint16 {name}_pages holds bfloat16 bits: it takes no scales")
    elif jnp.issubdtype(pages.dtype, jnp.integer) and scales is None:
        raise ValueError(f"integer {name}_pages need {name}_scales")


def dot_nt(a, b):
    """``a @ b.T`` with float32 accumulation."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                           preferred_element_type=jnp.float32)


def dot_nn(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32)


def dot_tn(a, b):
    """``a.T @ b`` with float32 accumulation."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32)


def scores_base2(raw, sm_scale: float, soft_cap: float | None):
    """Raw ``q.k`` -> (scaled, soft-capped) scores in base-2 units, plus tanh for bwd."""
    if soft_cap is None:
        return raw * (sm_scale * LOG2E), None
    t = jnp.tanh(raw * (sm_scale / soft_cap))
    return t * (soft_cap * LOG2E), t


def online_softmax_step(carry, s2, v):
    """One flash step: ``carry = (acc [M,D] f32, m [M] f32, l [M] f32)``; ``s2 [M,N]``
    masked base-2 scores; ``v [N,D]``."""
    acc, m, l = carry
    m_new = jnp.maximum(m, jnp.max(s2, axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s2 - m_new[:, None])
    l_new = alpha * l + jnp.sum(p, axis=1)
    acc_new = acc * alpha[:, None] + dot_nn(p.astype(v.dtype), v)
    return acc_new, m_new, l_new


def init_carry(rows: int, d: int):
    return (jnp.zeros((rows, d), jnp.float32), jnp.full((rows,), NEG_INF, jnp.float32),
            jnp.zeros((rows,), jnp.float32))


def finalize(acc, m, l):
    """Normalised output and base-2 lse; rows that never saw a valid key -> 0 / BIG_LSE."""
    seen = m > 0.5 * NEG_INF
    l_safe = jnp.where(seen, l, 1.0)
    out = jnp.where(seen[:, None], acc / l_safe[:, None], 0.0)
    lse2 = jnp.where(seen, m + jnp.log2(l_safe), BIG_LSE)
    return out, lse2


def clamp(x, lo, hi):
    return jnp.minimum(jnp.maximum(x, lo), hi)


def split_range(lo, hi, full_lo, full_hi):
    """Split block range ``[lo, hi)`` into masked ``[lo, a)``, unmasked ``[a, b)``,
    masked ``[b, hi)`` where ``[full_lo, full_hi)`` are the blocks that need no mask."""
    a = clamp(full_lo, lo, hi)
    b = clamp(full_hi, a, hi)
    return a, b


def loop3(lo, hi, full_lo, full_hi, body, carry, *, need_mask_everywhere: bool):
    """Run ``body(j, carry, masked)`` over blocks ``[lo, hi)``; blocks in
    ``[full_lo, full_hi)`` run without the mask (unless ``need_mask_everywhere``)."""
    if need_mask_everywhere:
        return lax.fori_loop(lo, hi, lambda j, c: body(j, c, True), carry)
    a, b = split_range(lo, hi, full_lo, full_hi)
    carry = lax.fori_loop(lo, a, lambda j, c: body(j, c, True), carry)
    carry = lax.fori_loop(a, b, lambda j, c: body(j, c, False), carry)
    return lax.fori_loop(b, hi, lambda j, c: body(j, c, True), carry)


# ---------------------------------------------------------------- ragged metadata


def ragged_num_blocks(num_tokens: int, num_seqs: int, block_q: int) -> int:
    """Static upper bound on ``sum_s cdiv(q_len_s, block_q)`` given ``sum_s q_len_s <= N``."""
    if num_tokens == 0:
        return 1
    nonempty = min(num_seqs, num_tokens)
    return max(1, min(num_tokens, (num_tokens + nonempty * (block_q - 1)) // block_q))


def ragged_block_metadata(cu_q_lens: jax.Array, num_tokens: int, block_q: int):
    """Cut each sequence's queries into blocks of ``block_q`` tokens.

    Returns ``(meta [4, nb] int32, nb)`` with rows ``seq``, ``q_start`` (flat token
    index of the block's first query), ``q_count`` (0 for unused blocks) and
    ``q_offset`` (index of the first query inside its sequence).  Plain jnp, O(nb).
    """
    cu = cu_q_lens.astype(jnp.int32)
    num_seqs = cu.shape[0] - 1
    q_lens = jnp.maximum(cu[1:] - cu[:-1], 0)
    nblk = (q_lens + block_q - 1) // block_q
    cu_blk = jnp.cumsum(nblk)
    nb = ragged_num_blocks(num_tokens, num_seqs, block_q)
    idx = jnp.arange(nb, dtype=jnp.int32)
    seq = jnp.searchsorted(cu_blk, idx, side="right").astype(jnp.int32)
    valid = idx < cu_blk[-1]
    seq = jnp.minimum(seq, num_seqs - 1)
    local = idx - (cu_blk[seq] - nblk[seq])
    q_off = local * block_q
    q_start = cu[seq] + q_off
    q_cnt = jnp.where(valid, jnp.clip(q_lens[seq] - q_off, 0, block_q), 0)
    q_start = jnp.where(valid, q_start, 0)
    q_off = jnp.where(valid, q_off, 0)
    meta = jnp.stack([seq, q_start, q_cnt, q_off]).astype(jnp.int32)
    return meta, nb
