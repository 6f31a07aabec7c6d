"""Flash attention (prefill / training): Pallas forward + FlashAttention-2 backward.

Layout: ``q [B,T,Hq,D]``, ``k, v [B,S,Hkv,D]`` (the model's natural layout; no
transposes).  Semantics are exactly ``jaxllm.attention._attention_xla``: the
causal mask is aligned to the end (query ``i`` sits at key index ``i+S-T``),
``segment_ids`` keep packed sequences apart, ``sliding_window`` w keeps keys
with ``q_pos - k_pos < w``, ``soft_cap`` c maps scores to ``c*tanh(s/c)``.
Rows that see no key return zeros.

Forward: grid ``(T/bq, B, Hq)``; each program keeps one ``[bq, D]`` query tile in
registers and streams ``[bk, D]`` K/V tiles of kv head ``h // G`` (GQA through
the index map: K/V are never repeated in memory) with an online softmax (running
max / sum in float32).  Only the key blocks a query tile can see are visited
(causal upper bound, sliding-window lower bound); blocks that every row sees in
full run without building a mask.  Writes ``o`` and the per-row log-sum-exp.

Backward (``jax.custom_vjp``; residuals: inputs, ``o`` and the lse only):
``delta = rowsum(do * o)`` (XLA), then two kernels that recompute the scores
and probabilities from ``q, k`` and the lse:
* dq: grid ``(T/bq, B, Hq)``, loops over key blocks: ``dq = sum_j dS_j K_j``;
* dk/dv: grid ``(S/bk, B, Hkv)``, loops over the ``G`` query heads of the group
  and the query blocks that see the key block: ``dv = sum P^T dO``,
  ``dk = sum dS^T Q`` -- GQA gradients are summed in registers, never via an
  ``[B,S,Hq,D]`` intermediate.

Arbitrary lengths: T, S are padded up to the block sizes (and D to a power of
two) in the wrapper; padded keys are masked, padded query rows are dropped.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import (NEG_INF, clamp, compiler_params, dot_nn, dot_nt,
                                    dot_tn, finalize, init_carry, loop3, next_pow2, pad_axis,
                                    round_up, scores_base2, online_softmax_step)


@dataclasses.dataclass(frozen=True)
class _Cfg:
    causal: bool
    window: int | None
    sm_scale: float
    soft_cap: float | None
    t: int          # real query length
    s: int          # real key length
    groups: int     # Hq // Hkv
    bq: int
    bk: int
    bq_bwd: int
    bk_bwd: int
    has_seg: bool
    interpret: bool

    @property
    def offset(self) -> int:  # key index of query 0
        return self.s - self.t


def _iota(n, axis=0, shape=None):
    shape = (n,) if shape is None else shape
    return lax.broadcasted_iota(jnp.int32, shape, axis)


def _mask(cfg: _Cfg, q_pos, k_pos, q_seg=None, k_seg=None, q_idx=None, t_pad=None, s_pad=None):
    """Boolean ``[M, N]`` mask from ``q_pos [M,1]`` and ``k_pos [1,N]``."""
    m = jnp.broadcast_to(k_pos < cfg.s, (q_pos.shape[0], k_pos.shape[1]))
    if cfg.causal:
        m = m & (k_pos <= q_pos)
    if cfg.window is not None:
        m = m & (q_pos - k_pos < cfg.window)
    if q_seg is not None:
        m = m & (q_seg[:, None] == k_seg[None, :])
    if q_idx is not None:  # padded query rows (backward dk/dv only)
        m = m & (q_idx < cfg.t)
    return m


def _key_block_ranges(cfg: _Cfg, first_pos, last_pos, bk: int):
    """Key blocks needed by query rows with positions ``[first_pos, last_pos]``:
    ``(lo, hi, full_lo, full_hi)``; ``[full_lo, full_hi)`` need no mask."""
    s = cfg.s
    hi_tok = clamp(last_pos + 1, 0, s) if cfg.causal else jnp.int32(s)
    lo_tok = clamp(first_pos - cfg.window + 1, 0, s) if cfg.window is not None else jnp.int32(0)
    lo = lax.div(lo_tok, bk)
    hi = jnp.where(hi_tok > lo_tok, lax.div(hi_tok + bk - 1, bk), lo)
    full_hi_tok = clamp(first_pos + 1, 0, s) if cfg.causal else jnp.int32(s)
    full_lo_tok = (jnp.maximum(last_pos - cfg.window + 1, 0) if cfg.window is not None
                   else jnp.int32(0))
    full_lo = lax.div(full_lo_tok + bk - 1, bk)
    full_hi = lax.div(full_hi_tok, bk)
    return lo, hi, full_lo, full_hi


# ------------------------------------------------------------------ forward


def _fwd_kernel(*refs, cfg: _Cfg):
    if cfg.has_seg:
        q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref = refs
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref = refs
        qs_ref = ks_ref = None
    bq, bk = cfg.bq, cfg.bk
    qi = pl.program_id(0)
    q_start = qi * bq
    q = q_ref[...]
    first_pos = q_start + cfg.offset
    last_pos = jnp.minimum(q_start + bq, cfg.t) - 1 + cfg.offset
    q_pos = first_pos + _iota(bq, 0, (bq, 1))
    q_seg = qs_ref[...] if cfg.has_seg else None

    def body(j, carry, masked):
        ks = pl.ds(j * bk, bk)
        k = k_ref[ks, :]
        v = v_ref[ks, :]
        s2, _ = scores_base2(dot_nt(q, k), cfg.sm_scale, cfg.soft_cap)
        if masked:
            k_pos = j * bk + _iota(bk, 1, (1, bk))
            k_seg = ks_ref[ks] if cfg.has_seg else None
            s2 = jnp.where(_mask(cfg, q_pos, k_pos, q_seg, k_seg), s2, NEG_INF)
        return online_softmax_step(carry, s2, v)

    lo, hi, full_lo, full_hi = _key_block_ranges(cfg, first_pos, last_pos, bk)
    carry = loop3(lo, hi, full_lo, full_hi, body, init_carry(bq, q.shape[-1]),
                  need_mask_everywhere=cfg.has_seg)
    out, lse2 = finalize(*carry)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse2


def _forward(q, k, v, qseg, kseg, cfg: _Cfg):
    """Padded inputs -> (o [B,Tp,Hq,Dp], lse2 [B,Hq,Tp] base-2)."""
    b, tp, hq, dp = q.shape
    sp, hkv = k.shape[1], k.shape[2]
    g, bq = cfg.groups, cfg.bq
    in_specs = [
        pl.BlockSpec((None, bq, None, dp), lambda i, bb, h: (bb, i, h, 0)),
        pl.BlockSpec((None, sp, None, dp), lambda i, bb, h: (bb, 0, h // g, 0)),
        pl.BlockSpec((None, sp, None, dp), lambda i, bb, h: (bb, 0, h // g, 0)),
    ]
    args = [q, k, v]
    if cfg.has_seg:
        in_specs += [pl.BlockSpec((None, bq), lambda i, bb, h: (bb, i)),
                     pl.BlockSpec((None, sp), lambda i, bb, h: (bb, 0))]
        args += [qseg, kseg]
    big = bq * dp >= 128 * 128
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(tp // bq, b, hq),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, bq, None, dp), lambda i, bb, h: (bb, i, h, 0)),
                   pl.BlockSpec((None, None, bq), lambda i, bb, h: (bb, h, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, hq, tp), jnp.float32)],
        compiler_params=compiler_params(cfg.interpret, num_warps=8 if big else 4,
                                        num_stages=3),
        interpret=cfg.interpret,
        name="jaxllm_flash_fwd",
    )(*args)


# ------------------------------------------------------------------ backward


def _dq_kernel(*refs, cfg: _Cfg):
    if cfg.has_seg:
        q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qs_ref, ks_ref, dq_ref = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dq_ref = refs
        qs_ref = ks_ref = None
    bq, bk = cfg.bq_bwd, cfg.bk_bwd
    qi = pl.program_id(0)
    q_start = qi * bq
    q = q_ref[...]
    do = do_ref[...]
    lse2 = lse_ref[...]
    delta = dl_ref[...]
    first_pos = q_start + cfg.offset
    last_pos = jnp.minimum(q_start + bq, cfg.t) - 1 + cfg.offset
    q_pos = first_pos + _iota(bq, 0, (bq, 1))
    q_seg = qs_ref[...] if cfg.has_seg else None

    def body(j, dq, masked):
        ks = pl.ds(j * bk, bk)
        k = k_ref[ks, :]
        v = v_ref[ks, :]
        s2, t = scores_base2(dot_nt(q, k), cfg.sm_scale, cfg.soft_cap)
        if masked:
            k_pos = j * bk + _iota(bk, 1, (1, bk))
            k_seg = ks_ref[ks] if cfg.has_seg else None
            s2 = jnp.where(_mask(cfg, q_pos, k_pos, q_seg, k_seg), s2, NEG_INF)
        p = jnp.exp2(s2 - lse2[:, None])
        dp = dot_nt(do, v)
        ds = p * (dp - delta[:, None])
        if t is not None:
            ds = ds * (1.0 - t * t)
        return dq + dot_nn(ds.astype(k.dtype), k)

    lo, hi, full_lo, full_hi = _key_block_ranges(cfg, first_pos, last_pos, bk)
    dq = loop3(lo, hi, full_lo, full_hi, body, jnp.zeros(q.shape, jnp.float32),
               need_mask_everywhere=cfg.has_seg)
    dq_ref[...] = (dq * cfg.sm_scale).astype(dq_ref.dtype)


def _dkdv_kernel(*refs, cfg: _Cfg):
    if cfg.has_seg:
        q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qs_ref, ks_ref, dk_ref, dv_ref = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, dk_ref, dv_ref = refs
        qs_ref = ks_ref = None
    bq, bk = cfg.bq_bwd, cfg.bk_bwd
    t, s, off = cfg.t, cfg.s, cfg.offset
    kb = pl.program_id(0)
    k_first = kb * bk
    k_last = jnp.minimum(k_first + bk, s) - 1
    k = k_ref[...]
    v = v_ref[...]
    k_pos = k_first + _iota(bk, 1, (1, bk))
    k_seg = ks_ref[...] if cfg.has_seg else None

    # Query rows (index i, key position i + off) that see this key block ...
    row_lo_tok = clamp(k_first - off, 0, t) if cfg.causal else jnp.int32(0)
    row_hi_tok = clamp(k_last + cfg.window - off, 0, t) if cfg.window is not None else jnp.int32(t)
    lo = lax.div(row_lo_tok, bq)
    hi = jnp.where(row_hi_tok > row_lo_tok, lax.div(row_hi_tok + bq - 1, bq), lo)
    # ... and those that see all of it (no padded keys, no padded rows).
    full_lo_tok = clamp(k_last - off, 0, t) if cfg.causal else jnp.int32(0)
    full_hi_tok = (clamp(k_first + cfg.window - off, 0, t) if cfg.window is not None
                   else jnp.int32(t))
    full_hi_tok = jnp.where(k_first + bk > s, 0, full_hi_tok)
    full_lo = lax.div(full_lo_tok + bq - 1, bq)
    full_hi = lax.div(full_hi_tok, bq)

    def group_body(g, carry):
        def body(i, carry, masked):
            dk, dv = carry
            rows = pl.ds(i * bq, bq)
            q = q_ref[rows, g, :]
            do = do_ref[rows, g, :]
            lse2 = lse_ref[g, rows]
            delta = dl_ref[g, rows]
            s2, th = scores_base2(dot_nt(q, k), cfg.sm_scale, cfg.soft_cap)
            if masked:
                q_idx = i * bq + _iota(bq, 0, (bq, 1))
                q_seg = qs_ref[rows] if cfg.has_seg else None
                s2 = jnp.where(_mask(cfg, q_idx + off, k_pos, q_seg, k_seg, q_idx=q_idx),
                               s2, NEG_INF)
            p = jnp.exp2(s2 - lse2[:, None])
            dv = dv + dot_tn(p.astype(do.dtype), do)
            dp = dot_nt(do, v)
            ds = p * (dp - delta[:, None])
            if th is not None:
                ds = ds * (1.0 - th * th)
            dk = dk + dot_tn(ds.astype(q.dtype), q)
            return dk, dv

        return loop3(lo, hi, full_lo, full_hi, body, carry, need_mask_everywhere=cfg.has_seg)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, cfg.groups, group_body, (zeros, zeros))
    dk_ref[...] = (dk * cfg.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward(q, k, v, qseg, kseg, do, lse2, delta, cfg: _Cfg):
    """All inputs padded; ``lse2, delta [B,Hq,Tp]``.  Returns padded dq, dk, dv."""
    b, tp, hq, dp = q.shape
    sp, hkv = k.shape[1], k.shape[2]
    g, bq, bk = cfg.groups, cfg.bq_bwd, cfg.bk_bwd
    params = compiler_params(cfg.interpret, num_warps=4, num_stages=2)

    # dq: grid over query blocks.
    in_specs = [
        pl.BlockSpec((None, bq, None, dp), lambda i, bb, h: (bb, i, h, 0)),
        pl.BlockSpec((None, sp, None, dp), lambda i, bb, h: (bb, 0, h // g, 0)),
        pl.BlockSpec((None, sp, None, dp), lambda i, bb, h: (bb, 0, h // g, 0)),
        pl.BlockSpec((None, bq, None, dp), lambda i, bb, h: (bb, i, h, 0)),
        pl.BlockSpec((None, None, bq), lambda i, bb, h: (bb, h, i)),
        pl.BlockSpec((None, None, bq), lambda i, bb, h: (bb, h, i)),
    ]
    args = [q, k, v, do, lse2, delta]
    if cfg.has_seg:
        in_specs += [pl.BlockSpec((None, bq), lambda i, bb, h: (bb, i)),
                     pl.BlockSpec((None, sp), lambda i, bb, h: (bb, 0))]
        args += [qseg, kseg]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(tp // bq, b, hq),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, bq, None, dp), lambda i, bb, h: (bb, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=cfg.interpret,
        name="jaxllm_flash_bwd_dq",
    )(*args)

    # dk/dv: grid over key blocks x kv heads; loop over the group's query heads.
    in_specs = [
        pl.BlockSpec((None, tp, g, dp), lambda j, bb, h: (bb, 0, h, 0)),
        pl.BlockSpec((None, bk, None, dp), lambda j, bb, h: (bb, j, h, 0)),
        pl.BlockSpec((None, bk, None, dp), lambda j, bb, h: (bb, j, h, 0)),
        pl.BlockSpec((None, tp, g, dp), lambda j, bb, h: (bb, 0, h, 0)),
        pl.BlockSpec((None, g, tp), lambda j, bb, h: (bb, h, 0)),
        pl.BlockSpec((None, g, tp), lambda j, bb, h: (bb, h, 0)),
    ]
    args = [q, k, v, do, lse2, delta]
    if cfg.has_seg:
        in_specs += [pl.BlockSpec((None, tp), lambda j, bb, h: (bb, 0)),
                     pl.BlockSpec((None, bk), lambda j, bb, h: (bb, j))]
        args += [qseg, kseg]
    kv_spec = pl.BlockSpec((None, bk, None, dp), lambda j, bb, h: (bb, j, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg),
        grid=(sp // bk, b, hkv),
        in_specs=in_specs,
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=cfg.interpret,
        name="jaxllm_flash_bwd_dkdv",
    )(*args)
    return dq, dk, dv


# ------------------------------------------------------------------ custom_vjp glue


def _pad_inputs(q, k, v, qseg, kseg, cfg: _Cfg):
    d = q.shape[-1]
    dp = next_pow2(max(d, 16))
    tp = round_up(cfg.t, max(cfg.bq, cfg.bq_bwd))
    sp = round_up(cfg.s, max(cfg.bk, cfg.bk_bwd))
    q = pad_axis(pad_axis(q, 1, tp), 3, dp)
    k = pad_axis(pad_axis(k, 1, sp), 3, dp)
    v = pad_axis(pad_axis(v, 1, sp), 3, dp)
    if cfg.has_seg:
        qseg = pad_axis(qseg.astype(jnp.int32), 1, tp, value=-1)
        kseg = pad_axis(kseg.astype(jnp.int32), 1, sp, value=-2)
    return q, k, v, qseg, kseg


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, qseg, kseg, cfg: _Cfg):
    return _flash_fwd(q, k, v, qseg, kseg, cfg)[0]


def _flash_fwd(q, k, v, qseg, kseg, cfg: _Cfg):
    qp, kp, vp, qsp, ksp = _pad_inputs(q, k, v, qseg, kseg, cfg)
    o, lse2 = _forward(qp, kp, vp, qsp, ksp, cfg)
    o = o[:, :cfg.t, :, :q.shape[-1]]
    return o, (q, k, v, qseg, kseg, o, lse2)


def _flash_bwd(cfg: _Cfg, res, do):
    q, k, v, qseg, kseg, o, lse2 = res
    t, d = cfg.t, q.shape[-1]
    qp, kp, vp, qsp, ksp = _pad_inputs(q, k, v, qseg, kseg, cfg)
    tp, dp = qp.shape[1], qp.shape[3]
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)  # [B,T,Hq]
    delta = pad_axis(jnp.swapaxes(delta, 1, 2), 2, tp)
    dop = pad_axis(pad_axis(do.astype(q.dtype), 1, tp), 3, dp)
    if lse2.shape[2] != tp:  # fwd and bwd block sizes padded T differently
        lse2 = pad_axis(lse2[:, :, :t], 2, tp)
    dq, dk, dv = _backward(qp, kp, vp, qsp, ksp, dop, lse2, delta, cfg)
    s = cfg.s
    return (dq[:, :t, :, :d], dk[:, :s, :, :d], dv[:, :s, :, :d], None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _default_block(n: int, cap: int) -> int:
    return min(cap, max(16, next_pow2(n)))


@functools.partial(jax.jit, static_argnames=(
    "causal", "sliding_window", "sm_scale", "soft_cap", "block_q", "block_k", "block_q_bwd",
    "block_k_bwd", "interpret"))
def flash_attention(q, k, v, *, causal: bool = True, segment_ids=None, kv_segment_ids=None,
                    sliding_window: int | None = None, sm_scale: float,
                    soft_cap: float | None = None, block_q: int | None = None,
                    block_k: int | None = None, interpret: bool = False,
                    block_q_bwd: int | None = None, block_k_bwd: int | None = None):
    """Flash attention over ``q [B,T,Hq,D]``, ``k, v [B,S,Hkv,D]`` -> ``[B,T,Hq,D]``.

    Differentiable in ``q, k, v`` (Pallas backward kernels).  Block sizes must be
    powers of two (>= 16 for the GPU dot); defaults: forward 128 x 64, backward
    64 x 64, shrunk for short sequences.
    """
    b, t, hq, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"Hq={hq} must be a multiple of Hkv={hkv}")
    if segment_ids is not None and kv_segment_ids is None:
        if t != s:
            raise ValueError("kv_segment_ids is required when T != S")
        kv_segment_ids = segment_ids
    bq = block_q or _default_block(t, 128 if d <= 128 else 64)
    bk = block_k or _default_block(s, 64)
    bq_bwd = block_q_bwd or min(bq, _default_block(t, 64))
    bk_bwd = block_k_bwd or min(bk, _default_block(s, 64))
    for name, blk in (("block_q", bq), ("block_k", bk), ("block_q_bwd", bq_bwd),
                      ("block_k_bwd", bk_bwd)):
        if blk & (blk - 1):
            raise ValueError(f"{name}={blk} must be a power of two")
    cfg = _Cfg(causal=bool(causal), window=None if sliding_window is None else int(sliding_window),
               sm_scale=float(sm_scale), soft_cap=None if soft_cap is None else float(soft_cap),
               t=t, s=s, groups=hq // hkv, bq=bq, bk=bk, bq_bwd=bq_bwd, bk_bwd=bk_bwd,
               has_seg=segment_ids is not None, interpret=bool(interpret))
    if t == 0 or s == 0:
        return jnp.zeros(q.shape, q.dtype)
    k, v = k.astype(q.dtype), v.astype(q.dtype)  # no-op normally; Triton dots need equal types
    return _flash(q, k, v, segment_ids, kv_segment_ids, cfg)
