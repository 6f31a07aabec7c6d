"""Paged decode attention with flash-decoding (split-K) in Pallas.

One query token per sequence (at position ``lengths-1``) over a paged KV pool:

* ``q [B, Hq, D]``
* ``k_pages, v_pages [P, page_size, Hkv, D]`` (bf16/f32; bf16 bits in uint16, the CPU
  pool form, bitcast per loaded block; or int8 with per-token scales
  ``k_scales, v_scales [P, page_size, Hkv]`` float32)
* ``block_tables [B, max_pages] int32`` (page ids; entries past a sequence's
  length are ignored and may hold anything), ``lengths [B] int32``.

Grid ``(B, Hkv, num_splits)``.  A program owns kv head ``h`` of sequence ``b``
and one *split* of ``pages_per_split`` consecutive table entries.  All ``G = Hq/Hkv``
query heads that share kv head ``h`` are processed together as the rows of one
``[Gp, D]`` tile (``Gp = max(16, pow2(G))``, the minimum M of a tensor-core dot),
so every K/V page is read from HBM exactly once per step.  Inside a split the
kernel walks compute blocks of ``pages_per_block`` pages (``block_k =
pages_per_block * page_size`` tokens): the page ids are loaded from the table,
K/V rows are gathered straight from the pool (``k_ref[page_ids]``), and an
online softmax accumulates ``acc, m, l`` in float32.  Blocks past the length
(or before the sliding window) are never visited.

Each split writes its unnormalised ``acc [Gp, D]`` and ``m, l [Gp]``; a small jnp
epilogue combines them with their log-sum-exp (see docs/kernels.md):
``M = max_s m_s``, ``w_s = 2^(m_s - M)``, ``out = sum_s w_s acc_s / sum_s w_s l_s``.
Splits (and whole sequences) with no tokens have ``l = 0`` and contribute
nothing; a length-0 sequence returns zeros.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import (NEG_INF, cdiv, check_pool_dtype, compiler_params,
                                    dot_nt, init_carry, next_pow2, online_softmax_step,
                                    pad_axis, pool_values, round_up, scores_base2)

# A split should leave enough parallel programs for ~132 SMs x a few waves.
_TARGET_PROGRAMS = 512


@dataclasses.dataclass(frozen=True)
class _Cfg:
    sm_scale: float
    soft_cap: float | None
    window: int | None
    page_size: int
    pages_per_block: int
    pages_per_split: int
    quant_k: bool
    quant_v: bool
    interpret: bool


def _decode_kernel(*refs, cfg: _Cfg):
    it = iter(refs)
    len_ref, bt_ref, q_ref, k_ref = next(it), next(it), next(it), next(it)
    ks_ref = next(it) if cfg.quant_k else None
    v_ref = next(it)
    vs_ref = next(it) if cfg.quant_v else None
    o_ref, m_ref, l_ref = next(it), next(it), next(it)

    ppb, ps = cfg.pages_per_block, cfg.page_size
    bk = ppb * ps
    split = pl.program_id(2)
    split_tok = split * (cfg.pages_per_split * ps)
    length = len_ref[0]
    lo_tok = jnp.maximum(length - cfg.window, 0) if cfg.window is not None else jnp.int32(0)
    start = jnp.maximum(lo_tok, split_tok)
    end = jnp.minimum(length, split_tok + cfg.pages_per_split * ps)
    first = lax.div(jnp.maximum(start - split_tok, 0), bk)
    last = jnp.where(end > start, lax.div(end - split_tok + bk - 1, bk), first)

    q = q_ref[...]  # [Gp, D]
    rows, d = q.shape

    def body(j, carry):
        page0 = split * cfg.pages_per_split + j * ppb
        ids = bt_ref[pl.ds(page0, ppb)]
        k = pool_values(k_ref[ids]).reshape(bk, d)
        v = pool_values(v_ref[ids]).reshape(bk, d)
        if k.dtype != q.dtype:  # int8 pool, or a pool dtype != q dtype (Triton dots need equal types)
            k = k.astype(q.dtype)
        raw = dot_nt(q, k)
        if cfg.quant_k:
            raw = raw * ks_ref[ids].reshape(1, bk)
        s2, _ = scores_base2(raw, cfg.sm_scale, cfg.soft_cap)
        pos = split_tok + j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        s2 = jnp.where((pos >= start) & (pos < end), s2, NEG_INF)
        if cfg.quant_v:
            # Fold the per-token V scale into the probabilities of the PV product.
            acc, m, l = carry
            m_new = jnp.maximum(m, jnp.max(s2, axis=1))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s2 - m_new[:, None])
            l_new = alpha * l + jnp.sum(p, axis=1)
            pv = p * vs_ref[ids].reshape(1, bk)
            acc = acc * alpha[:, None] + lax.dot_general(
                pv.astype(q.dtype), v.astype(q.dtype), (((1,), (0,)), ((), ())),
                preferred_element_type=jnp.float32)
            return acc, m_new, l_new
        return online_softmax_step(carry, s2, v)

    acc, m, l = lax.fori_loop(first, last, body, init_carry(rows, d))
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def _auto_pages_per_split(batch: int, hkv: int, max_pages: int, ppb: int) -> int:
    blocks = cdiv(max_pages, ppb)
    splits = max(1, min(blocks, cdiv(_TARGET_PROGRAMS, batch * hkv)))
    return cdiv(blocks, splits) * ppb


@functools.partial(jax.jit, static_argnames=(
    "sm_scale", "soft_cap", "sliding_window", "pages_per_split", "pages_per_block",
    "interpret"))
def paged_decode_attention(q, k_pages, v_pages, block_tables, lengths, *, sm_scale: float,
                           soft_cap: float | None = None, sliding_window: int | None = None,
                           k_scales=None, v_scales=None, pages_per_split: int | None = None,
                           pages_per_block: int | None = None, interpret: bool = False):
    """Decode attention ``q [B,Hq,D]`` over paged K/V -> ``[B,Hq,D]`` (see module doc).

    ``pages_per_split`` (default: chosen so ``B*Hkv*splits`` ~ 512 programs) sets the
    flash-decoding split; ``pages_per_block`` (default ``max(1, 64 // page_size)``,
    a power of two) the pages gathered per inner step.
    """
    b, hq, d = q.shape
    num_pages, ps, hkv, dk = k_pages.shape
    max_pages = block_tables.shape[1]
    if hq % hkv or dk != d:
        raise ValueError(f"bad shapes q={q.shape} k_pages={k_pages.shape}")
    if not interpret and (d & (d - 1) or ps & (ps - 1)):
        raise NotImplementedError("GPU path needs power-of-two head_dim and page_size")
    check_pool_dtype(k_pages, k_scales, "k")
    check_pool_dtype(v_pages, v_scales, "v")
    g = hq // hkv
    gp = max(16, next_pow2(g))
    ppb = pages_per_block or max(1, 64 // ps)
    if ppb & (ppb - 1):
        raise ValueError(f"pages_per_block={ppb} must be a power of two")
    ppb = min(ppb, next_pow2(max_pages))
    pps = pages_per_split or _auto_pages_per_split(b, hkv, max_pages, ppb)
    pps = round_up(pps, ppb)
    splits = cdiv(max_pages, pps)
    cfg = _Cfg(sm_scale=float(sm_scale), soft_cap=None if soft_cap is None else float(soft_cap),
               window=None if sliding_window is None else int(sliding_window), page_size=ps,
               pages_per_block=ppb, pages_per_split=pps, quant_k=k_scales is not None,
               quant_v=v_scales is not None, interpret=bool(interpret))

    compute_dtype = q.dtype
    qg = pad_axis(q.reshape(b, hkv, g, d), 2, gp)
    bt = pad_axis(jnp.clip(block_tables.astype(jnp.int32), 0, num_pages - 1), 1, splits * pps)
    lens = jnp.clip(lengths.astype(jnp.int32), 0, max_pages * ps).reshape(b, 1)

    pool_spec = pl.BlockSpec((num_pages, ps, None, d), lambda i, h, s: (0, 0, h, 0))
    scale_spec = pl.BlockSpec((num_pages, ps, None), lambda i, h, s: (0, 0, h))
    in_specs = [pl.BlockSpec((None, 1), lambda i, h, s: (i, 0)),
                pl.BlockSpec((None, splits * pps), lambda i, h, s: (i, 0)),
                pl.BlockSpec((None, None, gp, d), lambda i, h, s: (i, h, 0, 0)),
                pool_spec]
    args = [lens, bt, qg.astype(compute_dtype), k_pages]
    if k_scales is not None:
        in_specs.append(scale_spec)
        args.append(k_scales.astype(jnp.float32))
    in_specs.append(pool_spec)
    args.append(v_pages)
    if v_scales is not None:
        in_specs.append(scale_spec)
        args.append(v_scales.astype(jnp.float32))

    acc, m, l = pl.pallas_call(
        functools.partial(_decode_kernel, cfg=cfg),
        grid=(b, hkv, splits),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, None, gp, d), lambda i, h, s: (i, h, s, 0, 0)),
                   pl.BlockSpec((None, None, None, gp), lambda i, h, s: (i, h, s, 0)),
                   pl.BlockSpec((None, None, None, gp), lambda i, h, s: (i, h, s, 0))],
        out_shape=[jax.ShapeDtypeStruct((b, hkv, splits, gp, d), jnp.float32),
                   jax.ShapeDtypeStruct((b, hkv, splits, gp), jnp.float32),
                   jax.ShapeDtypeStruct((b, hkv, splits, gp), jnp.float32)],
        compiler_params=compiler_params(interpret, num_warps=4, num_stages=2),
        interpret=interpret,
        name="jaxllm_paged_decode",
    )(*args)
    return combine_splits(acc, m, l)[:, :, :g].reshape(b, hq, d).astype(q.dtype)


def combine_splits(acc, m, l):
    """Flash-decoding combine over axis 2: ``acc [..., S, R, D]``, ``m, l [..., S, R]``
    (base-2 running max) -> normalised ``[..., R, D]``; empty rows -> 0."""
    m_max = jnp.max(m, axis=2, keepdims=True)
    w = jnp.exp2(m - m_max)  # empty splits: m = NEG_INF, l = 0 -> contribute 0
    l_tot = jnp.sum(w * l, axis=2)
    o = jnp.sum(w[..., None] * acc, axis=2)
    return jnp.where(l_tot[..., None] > 0, o / jnp.where(l_tot > 0, l_tot, 1.0)[..., None], 0.0)
