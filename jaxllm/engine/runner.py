"""Model runner: one :class:`SchedulerOutput` -> fixed-shape int32 arrays -> ONE jitted step.

The scheduler lists decodes (one token each) before prefill chunks.  The host packs the
step's tokens flat in that order, ``D`` decode rows then ``P`` prefill-chunk tokens, and
pads every array to a bucket so the set of compiled programs stays small:

=======================  ==================  ===========================================
array                    shape               meaning
=======================  ==================  ===========================================
``input_ids``            ``[D+P]``           token fed at each flat row
``positions``            ``[D+P]``           its position in its sequence
``slot_mapping``         ``[D+P]``           flat pool slot its K/V goes to (-1: pad)
``dec_tables``           ``[D, W]``          pool pages of each decoding sequence (rows
                                             sorted by context length, padding first)
``dec_kv_lens``          ``[D]``             its context length after the step (0: pad)
``pf_tables``            ``[S, W]``          pool pages of each prefilling sequence
``pf_cu_q_lens``         ``[S+1]``           its chunk is prefill rows ``cu[s]:cu[s+1]``
``pf_kv_lens``           ``[S]``             its context length after the step
``logits_idx``           ``[D+S]``           flat row whose logits sample row ``r``
sampling rows            ``[D+S]`` (``,K``)  temperature, top-k/p, min-p, penalties, seed,
                                             step, min_tokens, stop ids, token allowance
``copy_src/copy_dst``    ``[C]``             copy-on-write page copies (C=0: none)
=======================  ==================  ===========================================

Buckets: decode-only steps take ``D`` from powers of two up to ``max_num_seqs``; mixed
steps take ``D`` from ``{0, 4, 16, 64, ...}``, ``P`` from powers of two (from 16) up to
``max_num_batched_tokens`` and ``S`` from ``{1, 4, 16, ...}`` (all capped at the limits);
``W = ceil(max_model_len / page_size)`` is fixed.  Sample rows: one per decode, one per
prefill sequence (a request with n > 1 samples its first n tokens from one prefill row,
``S`` grows to cover them).

Attention runs in separate calls per layer: ``paged_decode_attention`` over the decode
rows (sorted by context length, in 1/2/4 groups) and ``ragged_paged_attention`` over the
prefill chunks.  The XLA path costs ``query blocks x longest context`` per call: one
ragged call over a whole mixed batch (64 sequences, 512 tokens) was 2.5x slower than the
split, and grouping sorted decode rows saves 25-30% of a decode step (docs/engine.md).

The step (:func:`paged_step`) applies the CoW copies, writes K/V into the pages, runs
attention, applies the LM head only at the sampled rows, samples on device and returns
token ids (plus log-probs when asked).  Decode-only steps can run ``num_steps`` tokens per
dispatch (a ``while_loop`` that feeds each sampled token back, computing slots from the
block tables, and stops rows on EOS / stop ids / their token allowance), which the engine
uses when no request needs the host between tokens.  The page pools are donated.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.attention import paged_decode_attention, ragged_paged_attention, write_kv_pages
from jaxllm.cache.page_pool import PagePool
from jaxllm.config import ModelConfig
from jaxllm.engine.scheduler import SchedulerOutput
from jaxllm.models import llama
from jaxllm.sampling import SamplerFlags, SamplingTensors, apply_penalties, sample, suppress

__all__ = ["ModelRunner", "RowParams", "SampleRow", "StepResult", "StepSpec", "paged_step",
           "pow2_buckets"]

_PAD_SLOT = -1  # padding tokens write nowhere (write_kv_pages drops slot < 0)


# ------------------------------------------------------------------------------ buckets

def pow2_buckets(limit: int, start: int = 1) -> tuple[int, ...]:
    """``start, 2*start, ...`` below ``limit``, then ``limit`` itself."""
    out, b = [], max(1, start)
    while b < limit:
        out.append(b)
        b *= 2
    out.append(limit)
    return tuple(out)


def _pick(buckets: Sequence[int], n: int) -> int:
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


def _pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _pow4_buckets(limit: int) -> tuple[int, ...]:
    """``1, 4, 16, ...`` below ``limit``, then ``limit``."""
    out, b = [], 1
    while b < limit:
        out.append(b)
        b *= 4
    out.append(limit)
    return tuple(out)


# ------------------------------------------------------------------------------ host rows

@dataclasses.dataclass(frozen=True)
class RowParams:
    """Per-sequence sampling settings, fixed for the sequence's life (built once)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = 0
    min_tokens: int = 0
    stop_ids: tuple[int, ...] = ()  # EOS (unless ignore_eos) + stop_token_ids
    logprobs: int = -1  # top-k log-probs to return per token; -1: none, 0: chosen only

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


_PAD_ROW = RowParams()


class SampleRow(NamedTuple):
    """One row to sample this step: a sequence (or one of a request's n first samples)."""

    params: RowParams
    step: int  # tokens the sequence has generated so far (seed stream; min_tokens)
    max_new: int = 1  # tokens it may still produce (bounds multi-step decode)
    output_ids: Sequence[int] = ()  # for penalties
    prompt_ids: Sequence[int] = ()  # for the repetition penalty


class StepSpec(NamedTuple):
    """The static part of a step: one compiled program per distinct value."""

    num_decodes: int  # D: decode rows
    num_prefill_tokens: int  # P: prefill-chunk rows (0: decode-only step)
    num_prefill_seqs: int  # S: prefill sequences / their sample rows (0 when P == 0)
    num_steps: int  # tokens per dispatch (decode-only)
    flags: SamplerFlags
    logprobs: int  # -1 none, else top-k width (0: chosen only)
    prompt_logprobs: int  # -1 none
    num_copies: int
    stop_width: int
    penalty_lens: tuple[int, int]  # (output ids, prompt ids) widths; (0, 0) without penalties

    @property
    def decode_only(self) -> bool:
        return self.num_prefill_tokens == 0

    @property
    def num_rows(self) -> int:
        return self.num_decodes + self.num_prefill_seqs

    @property
    def num_tokens(self) -> int:
        return self.num_decodes + self.num_prefill_tokens


@dataclasses.dataclass
class StepResult:
    """What came back from the device for one step.

    ``tokens[i]`` lists, for scheduled entry ``i``, one list of new tokens per sample row
    (empty when the entry did not sample).  ``logprobs[i][r]`` (when asked) is a list, per
    new token, of ``(chosen_logprob, top_ids, top_logprobs)``.  ``prompt_logprobs[i]``:
    ``(positions, chosen, top_ids, top_lps)`` for the fed tokens whose next token is a
    prompt token (positions ``p`` -> logprob of prompt token ``p + 1``).
    """

    tokens: list[list[list[int]]]
    logprobs: list[list[list[tuple]]] | None = None
    prompt_logprobs: list[tuple | None] | None = None
    spec: StepSpec | None = None


# ------------------------------------------------------------------------------ device step

def _forward_paged(params, cfg: ModelConfig, tokens, positions, caches, attend_layer,
                   stacked: bool, num_pages: int, model=None):
    """Decoder forward over the page pool.  ``attend_layer(q, k, v, k_pages, v_pages,
    page_offset)`` -> ``(out, k_pages, v_pages)``.

    Unrolled: per-layer ``(k, v)`` pairs threaded through ``llama.forward``.  Stacked:
    the pools stay whole in a ``lax.scan`` carry (flattened to ``[L*P, ...]``, layer ``l``
    owning pages ``[l*P, (l+1)*P)``) so XLA updates them in place.  On a mesh
    (``model``): ``sharding.paged_forward``, ``attend_layer`` running per shard on its
    stage's pages and its kv heads."""
    if model is not None:
        from sharding.model import paged_forward

        return paged_forward(model, params, cfg, tokens, positions, caches, attend_layer)
    if not stacked:
        def attend(q, k, v, cache):
            out, kp, vp = attend_layer(q, k, v, cache[0], cache[1], 0)
            return out, (kp, vp)

        return llama.forward(params, cfg, tokens, positions, attend, caches)

    kp_all, vp_all = caches
    shape = kp_all.shape
    flat = (shape[0] * shape[1], *shape[2:])
    x = params["embed"][tokens]
    cos, sin = llama.rope_cos_sin(cfg, positions)

    def body(carry, xs):
        x, kp, vp = carry
        lp, layer = xs
        box = {}

        def attend(q, k, v, _):
            out, box["k"], box["v"] = attend_layer(q, k, v, kp, vp, layer * num_pages)
            return out, None

        x, _ = llama._layer(cfg, lp, x, cos, sin, None, attend)  # noqa: SLF001 (same package)
        return (x, box["k"], box["v"]), None

    n = shape[0]
    (x, kp, vp), _ = jax.lax.scan(body, (x, kp_all.reshape(flat), vp_all.reshape(flat)),
                                  (params["layers"], jnp.arange(n, dtype=jnp.int32)))
    x = llama.rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    return x, (kp.reshape(shape), vp.reshape(shape))


def _apply_copies(caches, src, dst, stacked: bool, num_pages: int, model=None):
    if model is not None and model.pp > 1:  # the same page of every stage's block
        off = (jnp.arange(model.pp, dtype=src.dtype) * num_pages)[:, None]
        src, dst = (src[None] + off).reshape(-1), (dst[None] + off).reshape(-1)
    if stacked:
        kp, vp = caches
        return (kp.at[:, dst].set(kp[:, src]), vp.at[:, dst].set(vp[:, src]))
    return [(kp.at[dst].set(kp[src]), vp.at[dst].set(vp[src])) for kp, vp in caches]


def _sampling_tensors(b) -> SamplingTensors:
    return SamplingTensors(temperature=b["temperature"], top_k=b["top_k"], top_p=b["top_p"],
                           min_p=b["min_p"], repetition_penalty=b["repetition_penalty"],
                           presence_penalty=b["presence_penalty"],
                           frequency_penalty=b["frequency_penalty"], seed=b["seed"])


def _sample_rows(logits, b, spec: StepSpec, step, counts, prompt_mask):
    """min_tokens suppression, penalties, sampling, log-probs for ``logits [R, V]``."""
    logits = suppress(logits, b["stop_ids"], step < b["min_tokens"])
    flags = spec.flags
    if flags.penalties:
        logits = apply_penalties(logits, _sampling_tensors(b), counts, prompt_mask)
        flags = flags._replace(penalties=False)
    tok = sample(logits, _sampling_tensors(b), flags, step)
    lp = None
    if spec.logprobs >= 0:
        logp = jax.nn.log_softmax(logits, axis=-1)
        chosen = jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]
        if spec.logprobs > 0:
            top_lp, top_ids = jax.lax.top_k(logp, spec.logprobs)
        else:
            top_lp = jnp.zeros((tok.shape[0], 0), jnp.float32)
            top_ids = jnp.zeros((tok.shape[0], 0), jnp.int32)
        lp = (chosen, top_ids.astype(jnp.int32), top_lp)
    return tok, lp


def _penalty_state(b, spec: StepSpec, vocab: int):
    if not spec.flags.penalties:
        return None, None
    r = b["temperature"].shape[0]
    rows = jnp.arange(r)[:, None]
    out_ids, prompt_ids = b["pen_out_ids"], b["pen_prompt_ids"]
    counts = jnp.zeros((r, vocab), jnp.int32).at[rows, out_ids].add(1, mode="drop")
    prompt_mask = jnp.zeros((r, vocab), bool).at[rows, prompt_ids].set(True, mode="drop")
    return counts, prompt_mask


def _decode_groups(num_rows: int) -> int:
    """Decode-attention calls per layer for ``num_rows`` (a power-of-two bucket, or the
    row cap): one below 8 rows, 2 below 16, else 4 (measured: 16 rows of contexts
    32..768 236 -> 177 -> 169 ms per step for 1 / 2 / 4 groups; 64 rows 784 -> 560)."""
    for g in (4, 2):
        if num_rows >= 8 * g // 2 and num_rows % g == 0:
            return g
    return 1


def paged_step(params, caches, b: dict, *, cfg: ModelConfig, spec: StepSpec, impl: str,
               stacked: bool, num_pages: int, page_size: int, decode_attention: str = "decode",
               model=None):
    """One engine step on device.  Returns ``(caches, outputs)``; see the module docstring.
    ``model``: a ``sharding.ShardedModel`` when params and pool live on its mesh."""
    if spec.num_copies:
        caches = _apply_copies(caches, b["copy_src"], b["copy_dst"], stacked, num_pages, model)
    lm_head = llama.lm_head if model is None else model.lm_head
    window = cfg.sliding_window
    nd = spec.num_decodes

    def make_attend(slots, dec_tables, dec_kv_lens):
        def attend_layer(q, k, v, kp, vp, page_off):
            q, k, v = q[0], k[0], v[0]
            plain = isinstance(page_off, int) and page_off == 0
            s = slots if plain else jnp.where(slots >= 0, slots + page_off * page_size, -1)
            if k.shape[0] == 1:
                # a single-row scatter becomes a dynamic-update-slice that XLA:CPU duplicates
                # per consumer, copying the whole pool every layer: write 2 rows (one dropped)
                k = jnp.concatenate([k, jnp.zeros_like(k)])
                v = jnp.concatenate([v, jnp.zeros_like(v)])
                s = jnp.concatenate([s, jnp.full_like(s, _PAD_SLOT)])
            kp, vp = write_kv_pages(kp, vp, k, v, s, impl=impl)
            outs = []
            if nd:
                tables = dec_tables if plain else dec_tables + page_off
                g = _decode_groups(nd)
                m = nd // g
                for j in range(g):  # rows are sorted by context: each group pays its own
                    qd, tg, lg = q[j * m:(j + 1) * m], tables[j * m:(j + 1) * m], \
                        dec_kv_lens[j * m:(j + 1) * m]
                    if decode_attention == "decode":
                        o = paged_decode_attention(qd, kp, vp, tg, lg, sliding_window=window,
                                                   impl=impl)
                    else:  # the same through the ragged kernel (one query per row)
                        cu = jnp.arange(m + 1, dtype=jnp.int32)
                        o = ragged_paged_attention(qd, kp, vp, tg, cu, lg,
                                                   sliding_window=window, impl=impl)
                    outs.append(o)
            if spec.num_prefill_tokens:
                tables = b["pf_tables"] if plain else b["pf_tables"] + page_off
                outs.append(ragged_paged_attention(
                    q[nd:], kp, vp, tables, b["pf_cu_q_lens"], b["pf_kv_lens"],
                    sliding_window=window, impl=impl))
            out = outs[0] if len(outs) == 1 else jnp.concatenate(outs)
            return out[None], kp, vp
        return attend_layer

    counts, prompt_mask = _penalty_state(b, spec, cfg.vocab_size)

    if not spec.decode_only:
        hidden, caches = _forward_paged(
            params, cfg, b["input_ids"][None], b["positions"][None], caches,
            make_attend(b["slot_mapping"], b.get("dec_tables"), b.get("dec_kv_lens")),
            stacked, num_pages, model)
        h = hidden[0]
        logits = lm_head(params, cfg, h[b["logits_idx"]])
        tok, lp = _sample_rows(logits, b, spec, b["step"], counts, prompt_mask)
        out = {"tokens": tok[None]}
        if lp is not None:
            out["lp"] = tuple(x[None] for x in lp)
        if spec.prompt_logprobs >= 0:
            plogp = jax.nn.log_softmax(lm_head(params, cfg, h[nd:]), axis=-1)
            nxt = b["next_ids"]
            chosen = jnp.take_along_axis(plogp, jnp.maximum(nxt, 0)[:, None], axis=-1)[:, 0]
            if spec.prompt_logprobs > 0:
                top_lp, top_ids = jax.lax.top_k(plogp, spec.prompt_logprobs)
                out["plp"] = (chosen, top_ids.astype(jnp.int32), top_lp)
            else:
                out["plp"] = (chosen,)
        return caches, out

    # Decode-only: row r is sequence r, one token each, `num_steps` tokens per dispatch.
    n = spec.num_steps
    bt = b["dec_tables"]
    rows = jnp.arange(nd)

    def one(carry):
        caches, tokens, pos, done, step, counts, i, outs = carry
        page = bt[rows, jnp.clip(pos // page_size, 0, bt.shape[1] - 1)]
        slots = jnp.where(done, _PAD_SLOT, page * page_size + pos % page_size)
        kv_lens = jnp.where(done, 0, pos + 1)
        hidden, caches = _forward_paged(params, cfg, tokens[None], pos[None], caches,
                                        make_attend(slots, bt, kv_lens), stacked, num_pages,
                                        model)
        logits = lm_head(params, cfg, hidden[0])
        tok, lp = _sample_rows(logits, b, spec, step, counts, prompt_mask)
        live = ~done
        new = {"tokens": outs["tokens"].at[i].set(jnp.where(live, tok, -1))}
        if lp is not None:
            new["lp"] = tuple(o.at[i].set(x) for o, x in zip(outs["lp"], lp))
        gen = step + live - b["step"]
        hit = jnp.any(tok[:, None] == b["stop_ids"], axis=-1)
        done2 = done | (live & hit) | (gen >= b["max_new"])
        if counts is not None:
            counts = counts.at[rows, tok].add(live.astype(counts.dtype))
        return (caches, jnp.where(live, tok, tokens), pos + live, done2, step + live, counts,
                i + 1, new)

    outs = {"tokens": jnp.full((n, nd), -1, jnp.int32)}
    if spec.logprobs >= 0:
        k = spec.logprobs
        outs["lp"] = (jnp.zeros((n, nd), jnp.float32), jnp.zeros((n, nd, k), jnp.int32),
                      jnp.zeros((n, nd, k), jnp.float32))
    done0 = b["dec_kv_lens"] == 0  # padding rows
    carry = (caches, b["input_ids"], b["positions"], done0, b["step"], counts,
             jnp.asarray(0, jnp.int32), outs)
    if n == 1:
        carry = one(carry)
    else:
        carry = jax.lax.while_loop(lambda c: (c[6] < n) & ~jnp.all(c[3]), one, carry)
    return carry[0], carry[7]


_paged_step_jit = jax.jit(paged_step, static_argnames=("cfg", "spec", "impl", "stacked",
                                                       "num_pages", "page_size",
                                                       "decode_attention", "model"),
                          donate_argnames=("caches",))


# ------------------------------------------------------------------------------ host runner

class ModelRunner:
    """Owns the page pool; turns scheduler outputs into device steps."""

    def __init__(self, params, cfg: ModelConfig, pool: PagePool, *, max_model_len: int,
                 max_num_seqs: int, max_num_batched_tokens: int, impl: str = "xla",
                 min_stop_width: int = 1) -> None:
        self.params = params
        self.cfg = cfg
        self.pool = pool
        self.impl = impl
        self.page_size = pool.page_size
        self.max_model_len = max_model_len
        self.table_width = -(-max_model_len // pool.page_size)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # stop-id columns: at least the EOS count, so EOS and ignore_eos rows share programs
        self.min_stop_width = _pow2(max(1, min_stop_width))
        # decode-only steps: fine buckets (these steps dominate generation time)
        self.decode_buckets = pow2_buckets(max_num_seqs)
        # mixed steps: coarse buckets (the prefill chunk dominates their cost)
        self.mixed_decode_buckets = (0,) + tuple(x for x in _pow4_buckets(max_num_seqs) if x > 1)
        self.prefill_token_buckets = pow2_buckets(max_num_batched_tokens,
                                                  start=min(16, max_num_batched_tokens))
        self.prefill_seq_buckets = _pow4_buckets(min(max_num_seqs, max_num_batched_tokens))
        # decode-only steps: "decode" (paged_decode_attention) or "ragged" (measured in
        # docs/engine.md; kept switchable for other backends)
        self.decode_attention = "decode"
        self.num_dispatches = 0
        self.specs_seen: set[StepSpec] = set()

    def mixed_shapes(self) -> list[tuple[int, int, int]]:
        """Every reachable ``(D, P, S)`` of a mixed step (for warm-up)."""
        out = []
        prev = lambda bs, x: max([y for y in bs if y < x], default=0)  # noqa: E731
        for d in self.mixed_decode_buckets:
            d_min = prev(self.mixed_decode_buckets, d) + 1 if d else 0
            for p in self.prefill_token_buckets:
                p_min = prev(self.prefill_token_buckets, p) + 1
                for s in self.prefill_seq_buckets:
                    s_min = prev(self.prefill_seq_buckets, s) + 1
                    if (d_min + p_min <= self.max_num_batched_tokens and s_min <= p
                            and d_min + s_min <= self.max_num_seqs):
                        out.append((d, p, s))
        return out

    # -- shapes -------------------------------------------------------------------------

    def _spec(self, out: SchedulerOutput, rows: list[list[SampleRow]], prompt_lp: Sequence[int],
              num_steps: int, num_copies: int) -> StepSpec:
        flat_rows = [r for rs in rows for r in rs]
        params = [r.params for r in flat_rows]
        nd = out.num_decode_tokens
        npf_seqs = out.num_seqs - nd
        if out.num_prefill_tokens == 0:
            d, p, s = _pick(self.decode_buckets, nd), 0, 0
        else:
            d = _pick(self.mixed_decode_buckets, nd)
            p = _pick(self.prefill_token_buckets, out.num_prefill_tokens)
            pf_rows = sum(len(rs) for rs in rows[nd:])
            s = _pick(self.prefill_seq_buckets, max(npf_seqs, pf_rows))
        sampled = [q for q in params if not q.greedy]
        flags = SamplerFlags(
            all_greedy=not sampled,
            penalties=any(q.penalties for q in params),
            top_k_p=any(q.top_k > 0 or q.top_p < 1.0 for q in sampled),
            min_p=any(q.min_p > 0 for q in sampled))
        lp = max((q.logprobs for q in params), default=-1)
        lp = lp if lp <= 0 else min(_pow2(lp), self.cfg.vocab_size)
        plp = max(prompt_lp, default=-1) if p else -1
        plp = plp if plp <= 0 else min(_pow2(plp), self.cfg.vocab_size)
        stop_w = max(self.min_stop_width,
                     _pow2(max((len(q.stop_ids) for q in params), default=1)))
        pen = (0, 0)
        if flags.penalties:
            pen = (_pow2(max(16, max(len(r.output_ids) + num_steps for r in flat_rows))),
                   _pow2(max(16, max(len(r.prompt_ids) for r in flat_rows))))
        copies = 0 if not num_copies else max(4, _pow2(num_copies))
        return StepSpec(num_decodes=d, num_prefill_tokens=p, num_prefill_seqs=s,
                        num_steps=num_steps if not p else 1, flags=flags, logprobs=lp,
                        prompt_logprobs=plp, num_copies=copies, stop_width=stop_w,
                        penalty_lens=pen)

    # -- arrays ---------------------------------------------------------------------------

    def build(self, out: SchedulerOutput, rows: list[list[SampleRow]],
              prompt_lp: Sequence[int] | None = None,
              prompt_next_ids: Sequence[Sequence[int] | None] | None = None,
              num_steps: int = 1, extra_copies: Sequence[tuple[int, int]] = (),
              block_tables: Sequence[Sequence[int]] | None = None) -> tuple[StepSpec, dict]:
        """Host arrays for ``out``.  ``rows[i]``: the sample rows of scheduled entry ``i``
        (empty if it does not sample; exactly one for a decode); ``prompt_lp[i]``: prompt
        log-probs width wanted for entry ``i`` (-1: none) and ``prompt_next_ids[i]`` the
        prompt token following each of its fed tokens (-1: none); ``block_tables``
        overrides the entries' snapshots (multi-step decode reserves look-ahead pages after
        scheduling)."""
        seqs = out.scheduled_seqs
        prompt_lp = list(prompt_lp) if prompt_lp is not None else [-1] * len(seqs)
        copies = list(out.blocks_to_copy) + list(extra_copies)
        spec = self._spec(out, rows, prompt_lp, num_steps, len(copies))
        D, P, S, ps = spec.num_decodes, spec.num_prefill_tokens, spec.num_prefill_seqs, self.page_size
        nd = out.num_decode_tokens
        T, R = D + P, D + S
        W = self.table_width
        ids = np.zeros(T, np.int32)
        pos = np.zeros(T, np.int32)
        slots = np.full(T, _PAD_SLOT, np.int32)
        dec_t = np.zeros((D, W), np.int32)
        dec_kv = np.zeros(D, np.int32)
        pf_t = np.zeros((S, W), np.int32)
        pf_cu = np.zeros(S + 1, np.int32)
        pf_kv = np.zeros(S, np.int32)
        row_of = np.zeros(T, np.int64)  # entry -> its table row, per flat token
        last = np.zeros(len(seqs), np.int32)  # flat index of each entry's last token
        tabs = np.zeros((len(seqs), W), np.int32)
        # decode rows sorted by context length, padding first: the decode attention runs
        # in groups of rows and each group costs (rows x its longest context)
        order = sorted(range(nd), key=lambda i: seqs[i].end_pos)
        drow = np.zeros(nd, np.int64)
        drow[order] = np.arange(D - nd, D)
        c = D
        for i, e in enumerate(seqs):
            table = e.block_table if block_tables is None else block_tables[i]
            n = min(len(table), W)
            tabs[i, :n] = table[:n]
            if i < nd:
                r = drow[i]
                ids[r] = e.token_ids[0]
                pos[r] = e.start_pos
                dec_t[r] = tabs[i]
                dec_kv[r] = e.end_pos
                row_of[r] = i
                last[i] = r
            else:
                k = e.num_tokens
                j = i - nd
                ids[c:c + k] = e.token_ids
                pos[c:c + k] = np.arange(e.start_pos, e.start_pos + k)
                pf_t[j] = tabs[i]
                pf_kv[j] = e.end_pos
                row_of[c:c + k] = i
                c += k
                pf_cu[j + 1] = c - D
                last[i] = c - 1
        pf_cu[len(seqs) - nd + 1:] = c - D
        live = np.zeros(T, bool)
        live[D - nd:D] = True
        live[D:c] = True
        p_live = pos[live]
        slots[live] = tabs[row_of[live], p_live // ps] * ps + p_live % ps
        b: dict[str, np.ndarray] = dict(input_ids=ids, positions=pos, slot_mapping=slots)
        if D:
            b.update(dec_tables=dec_t, dec_kv_lens=dec_kv)
        if P:
            b.update(pf_tables=pf_t, pf_cu_q_lens=pf_cu, pf_kv_lens=pf_kv)
        # sample rows: decode i -> its row drow[i]; prefill rows from D on
        flat: list[tuple[int, SampleRow]] = []
        logits_idx = np.zeros(R, np.int32)
        r_pf = D
        for i, rs in enumerate(rows):
            if i < nd:
                assert len(rs) == 1, "a decode samples exactly one row"
                flat.append((drow[i], rs[0]))
                logits_idx[drow[i]] = drow[i]
            else:
                for r in rs:
                    flat.append((r_pf, r))
                    logits_idx[r_pf] = last[i]
                    r_pf += 1
        b["logits_idx"] = logits_idx
        prm = [_PAD_ROW] * R
        for k, r in flat:
            prm[k] = r.params

        def col(f, dtype):
            return np.asarray([f(q) for q in prm], dtype)

        b.update(temperature=col(lambda q: q.temperature, np.float32),
                 top_k=col(lambda q: q.top_k, np.int32),
                 top_p=col(lambda q: q.top_p, np.float32),
                 min_p=col(lambda q: q.min_p, np.float32),
                 repetition_penalty=col(lambda q: q.repetition_penalty, np.float32),
                 presence_penalty=col(lambda q: q.presence_penalty, np.float32),
                 frequency_penalty=col(lambda q: q.frequency_penalty, np.float32),
                 seed=col(lambda q: q.seed & 0xFFFFFFFF, np.uint32),
                 min_tokens=col(lambda q: q.min_tokens, np.int32))
        step = np.zeros(R, np.int32)
        max_new = np.ones(R, np.int32)
        stop_ids = np.full((R, spec.stop_width), -1, np.int32)
        for k, r in flat:
            step[k] = r.step
            max_new[k] = r.max_new
            if r.params.stop_ids:
                stop_ids[k, :len(r.params.stop_ids)] = r.params.stop_ids
        b.update(step=step, max_new=max_new, stop_ids=stop_ids)
        if spec.flags.penalties:
            lo, lpn = spec.penalty_lens
            v = self.cfg.vocab_size
            po = np.full((R, lo), v, np.int32)
            pp = np.full((R, lpn), v, np.int32)
            for k, r in flat:
                if r.params.penalties:
                    po[k, :len(r.output_ids)] = r.output_ids
                    pp[k, :len(r.prompt_ids)] = r.prompt_ids
            b.update(pen_out_ids=po, pen_prompt_ids=pp)
        if spec.num_copies:
            src = np.zeros(spec.num_copies, np.int32)
            dst = np.zeros(spec.num_copies, np.int32)
            if copies:
                src[:len(copies)], dst[:len(copies)] = zip(*copies)
            b.update(copy_src=src, copy_dst=dst)
        if spec.prompt_logprobs >= 0:
            nxt = np.full(P, -1, np.int32)
            c = 0
            for i, e in enumerate(seqs[nd:], start=nd):
                nx = prompt_next_ids[i] if prompt_next_ids is not None else None
                if nx is not None and prompt_lp[i] >= 0:
                    nxt[c:c + e.num_tokens] = nx
                c += e.num_tokens
            b["next_ids"] = nxt
        b["_dec_rows"] = drow  # host only (execute pops it)
        return spec, b

    # -- run -------------------------------------------------------------------------------

    def execute(self, out: SchedulerOutput, rows: list[list[SampleRow]], *,
                prompt_lp: Sequence[int] | None = None,
                prompt_next_ids: Sequence[Sequence[int] | None] | None = None,
                num_steps: int = 1,
                extra_copies: Sequence[tuple[int, int]] = (),
                block_tables: Sequence[Sequence[int]] | None = None) -> StepResult:
        """Run one step.  ``prompt_next_ids[i]`` (for entries that want prompt log-probs):
        for each fed token of entry ``i``, the prompt token that follows it (-1: none)."""
        spec, b = self.build(out, rows, prompt_lp, prompt_next_ids, num_steps, extra_copies,
                             block_tables)
        dec_rows = b.pop("_dec_rows")
        self.specs_seen.add(spec)
        caches = self.pool.caches
        self.pool.caches = None  # donated: never touch the old buffers again
        try:
            caches, res = _paged_step_jit(self.params, caches, b, cfg=self.cfg, spec=spec,
                                          impl=self.impl, stacked=self.pool.stacked,
                                          num_pages=self.pool.num_pages,
                                          page_size=self.page_size,
                                          decode_attention=self.decode_attention,
                                          model=self.pool.model)
        except Exception:
            self.pool.reset()  # contents are gone; the engine recomputes (see engine.step)
            raise
        self.pool.caches = caches
        self.num_dispatches += 1
        res = jax.device_get(res)
        return self._unpack(out, rows, spec, res, b, dec_rows)

    def _unpack(self, out, rows, spec: StepSpec, res, b, dec_rows) -> StepResult:
        toks = res["tokens"]  # [n, R]
        lp = res.get("lp")
        nd, D = out.num_decode_tokens, spec.num_decodes
        tokens: list[list[list[int]]] = []
        logprobs: list[list[list[tuple]]] | None = [] if lp is not None else None
        r_pf = D
        for i, rs in enumerate(rows):
            ent_t, ent_l = [], []
            for _ in rs:
                if i < nd:
                    k = int(dec_rows[i])
                else:
                    k, r_pf = r_pf, r_pf + 1
                col = toks[:, k]
                nv = int((col >= 0).sum()) if spec.num_steps > 1 else 1
                ent_t.append([int(x) for x in col[:nv]])
                if lp is not None:
                    ent_l.append([(float(lp[0][j, k]), lp[1][j, k], lp[2][j, k])
                                  for j in range(nv)])
            tokens.append(ent_t)
            if logprobs is not None:
                logprobs.append(ent_l)
        plp = None
        if "plp" in res:
            plp = [None] * nd
            c = 0
            nxt = b["next_ids"]
            for e in out.scheduled_seqs[nd:]:
                sl = slice(c, c + e.num_tokens)
                sel = np.nonzero(nxt[sl] >= 0)[0]
                if len(sel):
                    positions = np.asarray(e.start_pos + sel)
                    plp.append((positions, *[x[sl][sel] for x in res["plp"]]))
                else:
                    plp.append(None)
                c += e.num_tokens
        return StepResult(tokens=tokens, logprobs=logprobs, prompt_logprobs=plp, spec=spec)
