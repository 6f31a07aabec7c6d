"""One engine step on device: K/V writes, attention over the page pool, sampling.

:func:`paged_step` applies the copy-on-write page copies, runs ``llama.forward`` with an
``attend`` that writes the step's K/V into the pool and attends over it, applies the LM
head only at the sampled rows and samples on device.  Decode-only steps can run
``spec.num_steps`` tokens per dispatch: a ``while_loop`` feeds each sampled token back,
computes its slot from the block tables and stops rows on EOS / stop ids / their token
allowance; with n-gram speculation it also stops as soon as a watched row's latest
tokens occurred earlier in its sequence (the host can then draft, ``spec.lookup_n``).
The pool is donated; every write updates it in place.

Attention runs in two calls per layer: ``paged_decode_attention`` over the decode rows
(sorted by context length, so the XLA path can attend them in 1/2/4 groups, each paying
only its own longest context) and ``ragged_paged_attention`` over the prefill chunks (one
ragged call over a whole mixed batch costs more: docs/engine.md).

Speculative decoding: a verify's token and drafts are ``K + 1`` decode rows (token ``j``
attends the sequence's pages up to its own position, written in the same step); the LM
head runs once over the step's decode rows (a verify's fed rows are among them) and its
prefill sample rows, and each verify gathers the logits of its rows (``x.ver_idx``).
The same suppression and penalties as plain sampling apply (the counts of each position
include the drafts before it) and :func:`jaxllm.spec.rejection.verify_drafts` keeps the
accepted prefix plus one target token.  Only those ids return.  With early exit
(``spec.draft_layers``) the step first makes the drafts itself: greedy passes of the
target's first layers over the verify rows' own slots (:func:`_early_exit_drafts`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxllm.attention import (copy_kv_pages, paged_decode_attention, ragged_paged_attention,
                              write_kv_pages)
from jaxllm.config import ModelConfig
from jaxllm.engine.inputs import PAD_SLOT, StepInputs, StepSpec
from jaxllm.models import llama
from jaxllm.sampling import apply_penalties, sample, suppress
from jaxllm.spec.early_exit import early_exit_params
from jaxllm.spec.rejection import verify_drafts

__all__ = ["paged_step", "paged_step_jit"]


# ------------------------------------------------------------------------------ the pool

def _stacked(caches) -> bool:
    """``(k, v)`` stacked ``[L, P, page, Hkv, D]`` (scan) rather than a list per layer."""
    return isinstance(caches, tuple)


def _apply_copies(caches, src, dst, model=None):
    if model is not None and model.pp > 1:  # the same page of every stage's block
        num_pages = caches[0][0].shape[0] // model.pp
        off = (jnp.arange(model.pp, dtype=src.dtype) * num_pages)[:, None]
        src, dst = (src[None] + off).reshape(-1), (dst[None] + off).reshape(-1)
    if _stacked(caches):
        return tuple(copy_kv_pages(x, src, dst, axis=1) for x in caches)
    return [tuple(copy_kv_pages(x, src, dst) for x in layer) for layer in caches]


def _forward(params, cfg: ModelConfig, tokens, positions, caches, attend_pages, model=None):
    """``llama.forward`` over the page pool.  ``attend_pages(q, k, v, pages, page_offset)
    -> (out, pages)``, ``pages`` a layer's ``(k, v[, k_scales, v_scales])``.

    Unrolled: one such tuple per layer.  Stacked: the whole pool, flattened to
    ``[L*P, ...]``, is the layers' shared cache (layer ``l`` owns pages ``[l*P, (l+1)*P)``)
    so it stays in the scan carry.  On a mesh: ``sharding.paged_forward``, attending per
    shard on its stage's pages and kv heads."""
    if model is not None:
        from sharding.model import paged_forward  # sharding is optional for one device

        return paged_forward(model, params, cfg, tokens, positions, caches, attend_pages)
    if not _stacked(caches):
        def attend(q, k, v, pages, layer):
            return attend_pages(q, k, v, pages, 0)

        return llama.forward(params, cfg, tokens, positions, attend, caches)
    n_layers, num_pages = caches[0].shape[:2]
    flat = tuple(x.reshape(n_layers * num_pages, *x.shape[2:]) for x in caches)

    def attend_shared(q, k, v, pages, layer):
        return attend_pages(q, k, v, pages, layer * num_pages)

    hidden, flat = llama.forward(params, cfg, tokens, positions, attend_shared, flat,
                                 shared_cache=True)
    return hidden, tuple(x.reshape(c.shape) for x, c in zip(flat, caches))


def _decode_groups(num_rows: int) -> int:
    """Groups of sorted decode rows the XLA attention runs separately, for ``num_rows`` (a
    power-of-two bucket, or the row cap): one below 8 rows, 2 below 16, else 4
    (measured: docs/engine.md)."""
    for g in (4, 2):
        if num_rows >= 8 * g // 2 and num_rows % g == 0:
            return g
    return 1


def _make_attend(x: StepInputs, spec: StepSpec, cfg: ModelConfig, impl: str, page_size: int,
                 slots, dec_tables, dec_kv_lens):
    """``attend_pages`` for :func:`_forward`: write the step's K/V, then decode rows
    (``spec.num_decodes`` flat rows first) and prefill chunks attend separately."""
    nd, window = spec.num_decodes, cfg.sliding_window

    def attend_pages(q, k, v, pages, page_off):
        q, k, v = q[0], k[0], v[0]
        plain = isinstance(page_off, int) and page_off == 0
        s = slots if plain else jnp.where(slots >= 0, slots + page_off * page_size, PAD_SLOT)
        if k.shape[0] == 1:
            # a single-row scatter becomes a dynamic-update-slice that XLA:CPU duplicates
            # per consumer, copying the whole pool every layer: write 2 rows (one dropped)
            k, v = (jnp.concatenate([a, jnp.zeros_like(a)]) for a in (k, v))
            s = jnp.concatenate([s, jnp.full_like(s, PAD_SLOT)])
        scales = dict(zip(("k_scales", "v_scales"), pages[2:]))
        pages = write_kv_pages(*pages[:2], k, v, s, impl=impl, **scales)
        kp, vp = pages[:2]
        scales = dict(zip(("k_scales", "v_scales"), pages[2:]))
        outs = []
        if nd:  # rows sorted by context length, padding first (engine.inputs)
            tables = dec_tables if plain else dec_tables + page_off
            outs.append(paged_decode_attention(q[:nd], kp, vp, tables, dec_kv_lens,
                                               sliding_window=window, impl=impl,
                                               row_groups=_decode_groups(nd), **scales))
        if spec.num_prefill_tokens:
            tables = x.pf_tables if plain else x.pf_tables + page_off
            outs.append(ragged_paged_attention(q[nd:], kp, vp, tables, x.pf_cu_q_lens,
                                               x.pf_kv_lens, sliding_window=window, impl=impl,
                                               **scales))
        out = outs[0] if len(outs) == 1 else jnp.concatenate(outs)
        return out[None], pages

    return attend_pages


# ------------------------------------------------------------------------------ early exit

def _early_exit_drafts(params, caches, x: StepInputs, cfg: ModelConfig, spec: StepSpec,
                       impl: str, page_size: int):
    """Draft every verify row inside the step (``spec.draft_layers``: early exit).

    Pass ``j`` feeds each verify's fed row ``j`` (its last token, then draft ``j``) through
    the target's first ``n`` layers, final norm and LM head as a decode row over the
    sequence's own pages: it writes the shared layers' K/V to that row's slot, attends
    everything before it, and takes the argmax as draft ``j + 1``.  Rows past a verify's
    ``ver_num`` write nothing.  Returns ``(caches, x, drafts [B, K])`` with the drafts
    fed (``x.input_ids``) and verified (``x.ver_draft``) by the rest of the step; the
    full forward then rewrites the shared layers' K/V at these slots with the same
    values."""
    n = spec.draft_layers
    ee_params, ee_cfg = early_exit_params(params, cfg, n)
    b, k = x.ver_draft.shape
    idx = x.ver_idx
    dspec = spec._replace(num_decodes=b, num_prefill_tokens=0, num_prefill_seqs=0)
    per_layer = not _stacked(caches)

    def one(j, carry):
        caches, drafts = carry
        live = j < x.ver_num
        rows = idx[:, j]
        tok = jnp.where(j == 0, x.input_ids[idx[:, 0]], drafts[:, jnp.maximum(j - 1, 0)])
        pos = x.positions[rows]
        slots = jnp.where(live, x.slot_mapping[rows], PAD_SLOT)
        kv_lens = jnp.where(live, pos + 1, 0)
        attend = _make_attend(x, dspec, ee_cfg, impl, page_size, slots, x.dec_tables[rows],
                              kv_lens)
        shared = caches[:n] if per_layer else caches
        hidden, shared = _forward(ee_params, ee_cfg, tok[None], pos[None], shared, attend)
        caches = list(shared) + list(caches[n:]) if per_layer else shared
        tok = jnp.argmax(llama.lm_head(ee_params, ee_cfg, hidden[0]), axis=-1)
        return caches, drafts.at[:, j].set(tok.astype(jnp.int32))

    caches = list(caches) if per_layer else caches
    # as many passes as the longest draft asked for (adaptive k shortens them)
    caches, drafts = jax.lax.fori_loop(0, jnp.max(x.ver_num), one,
                                       (caches, jnp.zeros((b, k), jnp.int32)))
    kept = jnp.arange(k)[None, :] < x.ver_num[:, None]
    drafts = jnp.where(kept, drafts, -1)
    dst = jnp.where(kept, idx[:, 1:], x.input_ids.shape[0])  # out of range: dropped
    input_ids = x.input_ids.at[dst.reshape(-1)].set(drafts.reshape(-1), mode="drop")
    return caches, dataclasses.replace(x, input_ids=input_ids, ver_draft=drafts), drafts


# ------------------------------------------------------------------------------ sampling

def _sample_rows(logits, x: StepInputs, spec: StepSpec, step, counts, prompt_mask):
    """min_tokens suppression, penalties, sampling, log-probs for ``logits [R, V]``."""
    logits = suppress(logits, x.stop_ids, step < x.min_tokens)
    flags = spec.flags
    if flags.penalties:
        logits = apply_penalties(logits, x.sampling, counts, prompt_mask)
        flags = flags._replace(penalties=False)
    tok = sample(logits, x.sampling, flags, step)
    return tok, (_logprobs(logits, tok, spec.logprobs) if spec.logprobs >= 0 else None)


def _verify(cfg: ModelConfig, logits, x: StepInputs, spec: StepSpec, counts, prompt_mask):
    """``(tokens [B, K+1], accepted [B], log-probs)`` of every verify row from ``logits
    [B*(K+1), V]`` at its ``K + 1`` fed rows: min-token suppression and penalties as at
    position ``step + j`` (the drafts before ``j`` counted as output), then
    :func:`verify_drafts`.  Log-probs (when ``spec.logprobs >= 0``, else None) of each
    position's token under those logits, as plain decoding computes them: ``(chosen
    [B, K+1], top ids [B, K+1, k], top log-probs [B, K+1, k])``."""
    b, k1 = x.ver_idx.shape
    vocab = cfg.vocab_size
    row = x.ver_row
    st = jax.tree.map(lambda a: a[row], x.sampling)
    step = x.step[row][:, None] + jnp.arange(k1, dtype=jnp.int32)[None, :]  # [B, K+1]
    rep = lambda a: jnp.repeat(a, k1, axis=0)  # noqa: E731 - per row -> per position
    active = (step < x.min_tokens[row][:, None]).reshape(-1)
    logits = suppress(logits, rep(x.stop_ids[row]), active)
    flags = spec.flags
    if flags.penalties:
        drafted = jax.nn.one_hot(x.ver_draft, vocab, dtype=jnp.int32)  # [B, K, V] (-1: 0)
        # position j counts drafts 0 .. j-1 as generated
        before = jnp.concatenate([jnp.zeros_like(drafted[:, :1]),
                                  jnp.cumsum(drafted, axis=1)], axis=1)  # [B, K+1, V]
        c = (counts[row][:, None, :] + before).reshape(b * k1, vocab)
        logits = apply_penalties(logits, jax.tree.map(rep, st), c, rep(prompt_mask[row]))
        flags = flags._replace(penalties=False)
    tokens, accepted = verify_drafts(logits.reshape(b, k1, vocab), st, flags, step,
                                     x.ver_draft, x.ver_num, x.ver_probs)
    if spec.logprobs < 0:
        return tokens, accepted, None
    lp = _logprobs(logits, jnp.maximum(tokens, 0).reshape(-1), spec.logprobs)
    return tokens, accepted, tuple(a.reshape(b, k1, *a.shape[1:]) for a in lp)


def _logprobs(logits, tok, k: int):
    """``(chosen [R], top ids [R, k], top log-probs [R, k])`` of ``tok`` under ``logits``."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]
    if k > 0:
        top_lp, top_ids = jax.lax.top_k(logp, k)
    else:
        top_lp = jnp.zeros((tok.shape[0], 0), jnp.float32)
        top_ids = jnp.zeros((tok.shape[0], 0), jnp.int32)
    return chosen, top_ids.astype(jnp.int32), top_lp


def _penalty_state(x: StepInputs, spec: StepSpec, vocab: int):
    if not spec.flags.penalties:
        return None, None
    r = spec.num_rows
    rows = jnp.arange(r)[:, None]
    counts = jnp.zeros((r, vocab), jnp.int32).at[rows, x.pen_out_ids].add(1, mode="drop")
    prompt_mask = jnp.zeros((r, vocab), bool).at[rows, x.pen_prompt_ids].set(True, mode="drop")
    return counts, prompt_mask


# ------------------------------------------------------------------------------ the step

def paged_step(params, caches, x: StepInputs, *, cfg: ModelConfig, spec: StepSpec, impl: str,
               page_size: int, model: Any = None):
    """One engine step.  Returns ``(caches, outputs)``: ``outputs["tokens"] [n, R]`` (-1:
    no token), and when asked ``"lp"`` / ``"plp"`` (log-probs of sampled / prompt tokens).
    ``model``: a ``sharding.ShardedModel`` when params and pool live on its mesh."""
    if spec.num_copies:
        caches = _apply_copies(caches, x.copy_src, x.copy_dst, model)
    counts, prompt_mask = _penalty_state(x, spec, cfg.vocab_size)
    if spec.decode_only:
        return _decode_loop(params, caches, x, cfg, spec, impl, page_size, model, counts,
                            prompt_mask)
    lm_head = llama.lm_head if model is None else model.lm_head
    drafts = None
    if spec.draft_layers and spec.num_verify:
        caches, x, drafts = _early_exit_drafts(params, caches, x, cfg, spec, impl, page_size)
    attend = _make_attend(x, spec, cfg, impl, page_size, x.slot_mapping, x.dec_tables,
                          x.dec_kv_lens)
    hidden, caches = _forward(params, cfg, x.input_ids[None], x.positions[None], caches,
                              attend, model)
    h = hidden[0]
    if spec.num_verify:
        # one LM head over every decode row (a verify's fed rows and the plain decodes are
        # all among them) and the prefill sample rows: R rows, one weight read; the sample
        # and verify rows gather their logits from it
        d = spec.num_decodes
        logits = lm_head(params, cfg, h[jnp.concatenate([jnp.arange(d), x.logits_idx[d:]])])
        ver_logits = logits[x.ver_idx.reshape(-1)]
        logits = jnp.concatenate([logits[x.logits_idx[:d]], logits[d:]])
    else:
        logits = lm_head(params, cfg, h[x.logits_idx])
    tok, lp = _sample_rows(logits, x, spec, x.step, counts, prompt_mask)
    out = {"tokens": tok[None]}
    if spec.num_verify:
        out["verify"], out["accepted"], ver_lp = _verify(cfg, ver_logits, x, spec, counts,
                                                         prompt_mask)
        if ver_lp is not None:
            out["ver_lp"] = ver_lp
        if drafts is not None:
            out["drafts"] = drafts
    if spec.return_hidden:  # the state each emitted token was read from (draft heads)
        out["hidden"] = h[x.logits_idx].astype(jnp.float32)
        if spec.num_verify:
            last = jnp.take_along_axis(x.ver_idx, out["accepted"][:, None], axis=1)[:, 0]
            out["ver_hidden"] = h[last].astype(jnp.float32)
    if lp is not None:
        out["lp"] = tuple(a[None] for a in lp)
    if spec.prompt_logprobs >= 0:  # log-prob of each fed token's next prompt token
        logits = lm_head(params, cfg, h[spec.num_decodes:])
        nxt = jnp.maximum(x.next_ids, 0)
        out["plp"] = _logprobs(logits, nxt, spec.prompt_logprobs)
        if spec.prompt_logprobs == 0:
            out["plp"] = out["plp"][:1]
    return caches, out


class DecodeCarry(NamedTuple):
    """State of the multi-token decode loop (row ``r`` = decode sequence ``r``)."""

    caches: Any
    tokens: jax.Array  # [D] int32 last token of each row
    positions: jax.Array  # [D] int32 its position
    done: jax.Array  # [D] bool row stopped (or padding)
    step: jax.Array  # [D] int32 tokens the row's sequence has generated
    counts: jax.Array | None  # [D, V] int32 output-token counts (penalties only)
    i: jax.Array  # [] int32 tokens produced so far in this dispatch
    outs: dict  # "tokens" [n, D] int32 (-1: none), "lp": log-probs per token, "hidden"
    lookup: tuple | None = None  # (ids [D, L], lens [D], found []) when spec.lookup_n


def _ngram_seen(ids, lens, n: int):
    """``[D]`` bool: row ``r``'s last ``n`` tokens (of ``ids[r, :lens[r]]``) occur at an
    earlier start too -- :func:`jaxllm.spec.ngram.lookup` at ``n`` would draft."""
    width = ids.shape[1] - n + 1  # window starts
    tail = jnp.take_along_axis(ids, jnp.maximum(lens[:, None] - n + jnp.arange(n), 0), axis=1)
    eq = jnp.ones((ids.shape[0], width), bool)
    for j in range(n):
        eq &= ids[:, j:j + width] == tail[:, j:j + 1]
    earlier = jnp.arange(width)[None, :] < (lens - n)[:, None]  # not the suffix itself
    return jnp.any(eq & earlier, axis=1)


def _decode_loop(params, caches, x: StepInputs, cfg, spec: StepSpec, impl, page_size, model,
                 counts, prompt_mask):
    """Decode-only: ``spec.num_steps`` tokens per dispatch, feeding each sample back."""
    lm_head = llama.lm_head if model is None else model.lm_head
    n, nd, bt = spec.num_steps, spec.num_decodes, x.dec_tables
    rows = jnp.arange(nd)

    def one(c: DecodeCarry) -> DecodeCarry:
        page = bt[rows, jnp.clip(c.positions // page_size, 0, bt.shape[1] - 1)]
        slots = jnp.where(c.done, PAD_SLOT, page * page_size + c.positions % page_size)
        kv_lens = jnp.where(c.done, 0, c.positions + 1)
        attend = _make_attend(x, spec, cfg, impl, page_size, slots, bt, kv_lens)
        hidden, caches = _forward(params, cfg, c.tokens[None], c.positions[None], c.caches,
                                  attend, model)
        tok, lp = _sample_rows(lm_head(params, cfg, hidden[0]), x, spec, c.step, c.counts,
                               prompt_mask)
        live = ~c.done
        outs = {"tokens": c.outs["tokens"].at[c.i].set(jnp.where(live, tok, -1))}
        if spec.return_hidden:  # [D, hidden] of each row's latest token
            outs["hidden"] = jnp.where(live[:, None], hidden[0].astype(jnp.float32),
                                       c.outs["hidden"])
        if lp is not None:
            outs["lp"] = tuple(o.at[c.i].set(a) for o, a in zip(c.outs["lp"], lp))
        hit = jnp.any(tok[:, None] == x.stop_ids, axis=-1)
        done = c.done | (live & hit) | (c.step + live - x.step >= x.max_new)
        counts = c.counts
        if counts is not None:
            counts = counts.at[rows, tok].add(live.astype(counts.dtype))
        lookup = c.lookup
        if lookup is not None:  # stop the dispatch once a watched row could be drafted
            ids, lens, found = lookup
            grow = live & (lens > 0)
            ids = ids.at[rows, jnp.where(grow, lens, ids.shape[1])].set(tok, mode="drop")
            lens = lens + grow
            found = found | jnp.any(grow & _ngram_seen(ids, lens, spec.lookup_n))
            lookup = (ids, lens, found)
        return DecodeCarry(caches, jnp.where(live, tok, c.tokens), c.positions + live, done,
                           c.step + live, counts, c.i + 1, outs, lookup)

    outs = {"tokens": jnp.full((n, nd), -1, jnp.int32)}
    if spec.return_hidden:
        outs["hidden"] = jnp.zeros((nd, cfg.hidden_size), jnp.float32)
    if spec.logprobs >= 0:
        k = spec.logprobs
        outs["lp"] = (jnp.zeros((n, nd), jnp.float32), jnp.zeros((n, nd, k), jnp.int32),
                      jnp.zeros((n, nd, k), jnp.float32))
    lookup = None
    if spec.lookup_n:
        lookup = (x.lookup_ids, x.lookup_lens, jnp.asarray(False))
    carry = DecodeCarry(caches, x.input_ids, x.positions, x.dec_kv_lens == 0, x.step, counts,
                        jnp.asarray(0, jnp.int32), outs, lookup)
    if n == 1:
        carry = one(carry)
    else:
        def more(c: DecodeCarry):
            go = (c.i < n) & ~jnp.all(c.done)
            return go if c.lookup is None else go & ~c.lookup[2]
        carry = jax.lax.while_loop(more, one, carry)
    return carry.caches, carry.outs


paged_step_jit = jax.jit(paged_step, static_argnames=("cfg", "spec", "impl", "page_size",
                                                      "model"),
                         donate_argnames=("caches",))
