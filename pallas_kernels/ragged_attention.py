"""Ragged paged attention: chunked prefill and decode tokens in one call (Pallas).

Inputs:

* ``q [N, Hq, D]``: a flat batch of query tokens; sequence ``s`` owns rows
  ``cu_q_lens[s]:cu_q_lens[s+1]``; rows past ``cu_q_lens[-1]`` are padding (output 0).
* ``k_pages, v_pages [P, page_size, Hkv, D]`` (float, or bf16 bits in uint16: the CPU
  pool form, bitcast per loaded block), ``block_tables [num_seqs, max_pages]``.
* ``kv_lens [num_seqs]``: the KV length of each sequence *including* its new
  tokens (already written to the pages).  Query ``j`` of sequence ``s`` sits at
  position ``kv_lens[s] - q_len_s + j`` and attends causally to keys ``<=`` it.
  Sequences with ``q_len == 0`` (padding entries, or finished requests) cost nothing.

Work decomposition: every sequence's queries are cut into *query blocks* of
``block_q`` tokens that never straddle two sequences (a small jnp pre-pass builds
``[seq, q_start, q_count, q_offset]`` per block; the number of blocks is bounded
statically by ``cdiv(N + num_seqs*(block_q-1), block_q)``).  Grid
``(num_q_blocks, Hkv)``: a program takes the ``block_q x G`` query rows of one
block that share kv head ``h`` (GQA: each K/V page is read once per query block,
not once per query head) as one ``[block_q*Gp, D]`` tile and streams the
sequence's pages through an online softmax: ``pages_per_block`` page ids are
read from the table and K/V rows gathered directly from the pool.  Only the key
blocks the tile can see are visited (causal end, sliding-window start); blocks
fully visible to every row skip the mask.  Rows are written with a masked store
into a zero-initialised output (aliased in place), so padding tokens stay 0.

Decode tokens (q_len 1) use one block each; that wastes tile rows but decode is
bandwidth-bound.  For long contexts with few sequences ``paged_decode_attention``
(split-K) has more parallelism; the engine can route pure-decode steps there.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels._common import (NEG_INF, check_pool_dtype, clamp, compiler_params,
                                    dot_nt, finalize, init_carry, loop3, next_pow2,
                                    online_softmax_step, pad_axis, pool_values,
                                    ragged_block_metadata, round_up, scores_base2)


@dataclasses.dataclass(frozen=True)
class _Cfg:
    sm_scale: float
    soft_cap: float | None
    window: int | None
    block_q: int
    groups_padded: int
    page_size: int
    pages_per_block: int
    interpret: bool


def _ragged_kernel(meta_ref, cu_ref, kvl_ref, bt_ref, q_ref, k_ref, v_ref, o0_ref, o_ref, *,
                   cfg: _Cfg):
    del o0_ref  # aliased with o_ref: rows nobody writes stay zero
    bq, gp = cfg.block_q, cfg.groups_padded
    ppb = cfg.pages_per_block
    bk = ppb * cfg.page_size
    i = pl.program_id(0)
    seq = meta_ref[0, i]
    q_start = meta_ref[1, i]
    q_cnt = meta_ref[2, i]
    q_off = meta_ref[3, i]
    q_len = cu_ref[seq + 1] - cu_ref[seq]
    kv_len = kvl_ref[seq]

    q3 = q_ref[pl.ds(q_start, bq)]  # [bq, Gp, D]
    d = q3.shape[-1]
    rows = bq * gp
    q = q3.reshape(rows, d)
    first_pos = kv_len - q_len + q_off
    last_pos = first_pos + q_cnt - 1
    q_pos = first_pos + lax.div(lax.broadcasted_iota(jnp.int32, (rows, 1), 0), gp)

    hi_tok = jnp.where(q_cnt > 0, clamp(last_pos + 1, 0, kv_len), 0)
    lo_tok = (clamp(first_pos - cfg.window + 1, 0, kv_len) if cfg.window is not None
              else jnp.int32(0))
    lo = lax.div(lo_tok, bk)
    hi = jnp.where(hi_tok > lo_tok, lax.div(hi_tok + bk - 1, bk), lo)
    full_hi = lax.div(clamp(first_pos + 1, 0, kv_len), bk)
    full_lo = (lax.div(jnp.maximum(last_pos - cfg.window + 1, 0) + bk - 1, bk)
               if cfg.window is not None else jnp.int32(0))

    def body(j, carry, masked):
        ids = bt_ref[seq, pl.ds(j * ppb, ppb)]
        k = pool_values(k_ref[ids]).reshape(bk, d)
        v = pool_values(v_ref[ids]).reshape(bk, d)
        if k.dtype != q.dtype:  # Triton dots need equal operand types
            k = k.astype(q.dtype)
        s2, _ = scores_base2(dot_nt(q, k), cfg.sm_scale, cfg.soft_cap)
        if masked:
            k_pos = j * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
            mask = k_pos <= q_pos
            if cfg.window is not None:
                mask = mask & (q_pos - k_pos < cfg.window)
            s2 = jnp.where(mask, s2, NEG_INF)
        return online_softmax_step(carry, s2, v)

    carry = loop3(lo, hi, full_lo, full_hi, body, init_carry(rows, d), need_mask_everywhere=False)
    out, _ = finalize(*carry)
    out = out.reshape(bq, gp, d).astype(o_ref.dtype)
    valid = lax.broadcasted_iota(jnp.int32, (bq, gp, d), 0) < q_cnt
    plgpu.store(o_ref.at[pl.ds(q_start, bq)], out, mask=valid)


@functools.partial(jax.jit, static_argnames=(
    "sm_scale", "soft_cap", "sliding_window", "block_q", "pages_per_block", "interpret"))
def ragged_paged_attention(q, k_pages, v_pages, block_tables, cu_q_lens, kv_lens, *,
                           sm_scale: float, soft_cap: float | None = None,
                           sliding_window: int | None = None, block_q: int | None = None,
                           pages_per_block: int | None = None, interpret: bool = False):
    """Ragged (mixed prefill + decode) attention over paged K/V -> ``[N,Hq,D]``.

    ``block_q`` (power of two; default ``64 // Gp`` so a tile has ~64 rows) query
    tokens per program, ``pages_per_block`` (default ``max(1, 64 // page_size)``)
    pages per inner step.
    """
    n, hq, d = q.shape
    num_pages, ps, hkv, dk = k_pages.shape
    num_seqs, max_pages = block_tables.shape
    if hq % hkv or dk != d:
        raise ValueError(f"bad shapes q={q.shape} k_pages={k_pages.shape}")
    if not interpret and (d & (d - 1) or ps & (ps - 1)):
        raise NotImplementedError("GPU path needs power-of-two head_dim and page_size")
    check_pool_dtype(k_pages, None, "k")
    check_pool_dtype(v_pages, None, "v")
    g = hq // hkv
    gp = next_pow2(g)
    bq = block_q or max(1, 64 // gp)
    bq = max(bq, 16 // gp)  # tile rows >= 16 for the tensor-core dot
    if bq & (bq - 1):
        raise ValueError(f"block_q={bq} must be a power of two")
    ppb = pages_per_block or max(1, 64 // ps)
    ppb = min(ppb, next_pow2(max_pages))
    cfg = _Cfg(sm_scale=float(sm_scale), soft_cap=None if soft_cap is None else float(soft_cap),
               window=None if sliding_window is None else int(sliding_window), block_q=bq,
               groups_padded=gp, page_size=ps, pages_per_block=ppb, interpret=bool(interpret))

    meta, nb = ragged_block_metadata(cu_q_lens, n, bq)
    n_pad = n + bq
    qg = pad_axis(pad_axis(q.reshape(n, hkv, g, d), 2, gp), 0, n_pad)
    bt = pad_axis(jnp.clip(block_tables.astype(jnp.int32), 0, num_pages - 1), 1,
                  round_up(max_pages, ppb))
    kvl = jnp.clip(kv_lens.astype(jnp.int32), 0, max_pages * ps)
    cu = cu_q_lens.astype(jnp.int32)
    o0 = jnp.zeros(qg.shape, q.dtype)

    full = lambda shape: pl.BlockSpec(shape, lambda i, h: (0,) * len(shape))
    tok_spec = pl.BlockSpec((n_pad, None, gp, d), lambda i, h: (0, h, 0, 0))
    pool_spec = pl.BlockSpec((num_pages, ps, None, d), lambda i, h: (0, 0, h, 0))
    out = pl.pallas_call(
        functools.partial(_ragged_kernel, cfg=cfg),
        grid=(nb, hkv),
        in_specs=[full(meta.shape), full(cu.shape), full(kvl.shape), full(bt.shape),
                  tok_spec, pool_spec, pool_spec, tok_spec],
        out_specs=tok_spec,
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        input_output_aliases={7: 0},
        compiler_params=compiler_params(interpret, num_warps=4, num_stages=2),
        interpret=interpret,
        name="jaxllm_ragged_paged_attention",
    )(meta, cu, kvl, bt, qg, k_pages, v_pages, o0)
    return out[:n, :, :g].reshape(n, hq, d)
