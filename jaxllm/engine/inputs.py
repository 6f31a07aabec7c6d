"""What crosses the jit boundary of one engine step, and how the host packs it.

The scheduler lists decodes (one token each) before prefill chunks.  The host packs the
step's tokens flat in that order, ``D`` decode rows then ``P`` prefill-chunk tokens, and
pads every array to a bucket so the set of compiled programs stays small.  Sample rows:
one per decode, one per prefill sequence that reaches the end of its known tokens (a
request with n > 1 samples its first n tokens from one prefill row).

Speculative decoding: a *verify* entry (a decode with draft tokens) feeds its token and
drafts as decode rows, one per token, each attending to the sequence's pages up to and
including itself (the step's K/V is written before attention), so the decode attention
computes the verify's causal multi-token query.  Its rows are listed in
``ver_idx`` so the step scores every one of them and verifies the drafts
(``jaxllm.spec.rejection``).

Shapes: ``T = D + P`` flat tokens (``D`` decode and verify rows), ``S`` prefill
sequences, ``R = D + S`` sample rows, ``W = pow2(ceil(max_model_len / page_size))`` block-table width, ``C`` page copies,
``B`` verify rows, ``K`` draft tokens per verify row, ``V`` the vocabulary, ``L`` the
prompt-lookup history width (the longest sequence a block table holds).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import numpy as np

from jaxllm.cache.block_allocator import slot_mapping_array
from jaxllm.engine.scheduler import SchedulerOutput
from jaxllm.sampling import SamplerFlags, SamplingTensors

__all__ = ["RowParams", "SampleRow", "StepSpec", "StepInputs", "pack_inputs", "PAD_SLOT"]

PAD_SLOT = -1  # padding tokens write nowhere (write_kv_pages drops slot < 0)


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
    lookup_ids: Sequence[int] = ()  # the sequence's tokens when the decode loop watches it
    #                                 for a prompt-lookup match (n-gram speculation)


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
    num_verify: int = 0  # B: verify rows (speculative decoding; 0: none)
    num_draft: int = 0  # K: draft tokens per verify row
    draft_probs: bool = False  # the drafts come with their distributions (else point masses)
    return_hidden: bool = False  # return each sample row's final hidden state (draft heads)
    draft_layers: int = 0  # > 0: the verify drafts are made in the step by the target's
    #                        first draft_layers layers (early exit); 0: they come packed
    lookup_n: int = 0  # decode loop: stop once a watched row's last n tokens occurred
    #                    before in its tokens (an n-gram draft exists); 0: never
    lookup_width: int = 0  # L: token columns of ``lookup_ids``

    @property
    def decode_only(self) -> bool:
        """Decode rows only, no verify: the multi-token decode loop can run."""
        return self.num_prefill_tokens == 0 and self.num_verify == 0

    @property
    def num_rows(self) -> int:
        return self.num_decodes + self.num_prefill_seqs

    @property
    def num_tokens(self) -> int:
        return self.num_decodes + self.num_prefill_tokens


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepInputs:
    """Device arrays of one step (a pytree).  Fields a step's spec does not use are None."""

    input_ids: np.ndarray  # [T] int32 token fed at each flat row
    positions: np.ndarray  # [T] int32 its position in its sequence
    slot_mapping: np.ndarray  # [T] int32 pool slot its K/V goes to (PAD_SLOT: nowhere)
    logits_idx: np.ndarray  # [R] int32 flat row whose logits sample row r
    sampling: SamplingTensors  # [R] each: temperature, top-k/p, min-p, penalties, seed
    step: np.ndarray  # [R] int32 tokens the row's sequence generated so far
    max_new: np.ndarray  # [R] int32 tokens it may still produce (multi-step decode)
    min_tokens: np.ndarray  # [R] int32 stop ids are suppressed while step < min_tokens
    stop_ids: np.ndarray  # [R, stop_width] int32 (-1: padding)
    dec_tables: np.ndarray | None = None  # [D, W] int32 pages of each decode row (rows
    #                                       sorted by context length, padding first)
    dec_kv_lens: np.ndarray | None = None  # [D] int32 context after the step (0: pad)
    pf_tables: np.ndarray | None = None  # [S, W] int32 pages of each prefilling sequence
    pf_cu_q_lens: np.ndarray | None = None  # [S+1] int32 its chunk: rows cu[s]:cu[s+1] of P
    pf_kv_lens: np.ndarray | None = None  # [S] int32 its context after the step
    pen_out_ids: np.ndarray | None = None  # [R, penalty_lens[0]] int32 (vocab: padding)
    pen_prompt_ids: np.ndarray | None = None  # [R, penalty_lens[1]] int32
    copy_src: np.ndarray | None = None  # [C] int32 copy-on-write page copies src -> dst
    copy_dst: np.ndarray | None = None  # [C] int32
    next_ids: np.ndarray | None = None  # [P] int32 prompt token after each fed token (-1)
    ver_idx: np.ndarray | None = None  # [B, K+1] int32 flat rows of a verify's fed tokens
    ver_row: np.ndarray | None = None  # [B] int32 its sample row (sampling parameters)
    ver_draft: np.ndarray | None = None  # [B, K] int32 its draft tokens (-1: padding)
    ver_num: np.ndarray | None = None  # [B] int32 how many (0: padding row)
    ver_probs: np.ndarray | None = None  # [B, K, V] float32 draft distributions (draft_probs)
    lookup_ids: np.ndarray | None = None  # [D, L] int32 a watched decode row's tokens
    lookup_lens: np.ndarray | None = None  # [D] int32 how many (0: not watched)


class TokenLayout(NamedTuple):
    """Host-only bookkeeping of where each scheduled entry landed."""

    dec_rows: np.ndarray  # [decode entries] the flat/sample row of decode entry i (a
    #                       verify: its last fed token)
    last: np.ndarray  # [num entries] flat index of each entry's last fed token
    sample_rows: tuple[tuple[int, ...], ...] = ()  # per entry: the sample rows it owns
    verify_rows: tuple[int, ...] = ()  # per entry: its verify row (-1: not a verify)
    entry_rows: tuple[tuple[int, ...], ...] = ()  # per decode entry: its flat rows


# ------------------------------------------------------------------------------ packing

def pack_inputs(spec: StepSpec, out: SchedulerOutput, rows: list[list[SampleRow]],
                table_width: int, page_size: int, vocab_size: int, *,
                copies: Sequence[tuple[int, int]] = (),
                prompt_lp: Sequence[int] | None = None,
                prompt_next_ids: Sequence[Sequence[int] | None] | None = None,
                block_tables: Sequence[Sequence[int]] | None = None,
                draft_probs: Sequence[object] | None = None
                ) -> tuple[StepInputs, TokenLayout]:
    """The arrays of one step (``rows[i]``: the sample rows of scheduled entry ``i``;
    ``draft_probs[i]``: a verify entry's draft distributions ``[k, V]``, when
    ``spec.draft_probs``)."""
    tok, layout = _pack_tokens(spec, out, table_width, page_size, block_tables)
    layout = layout._replace(sample_rows=_sample_rows(spec, out, rows, layout.dec_rows))
    flat = [(k, r) for ks, rs in zip(layout.sample_rows, rows) for k, r in zip(ks, rs)]
    inputs = StepInputs(**tok, **_pack_sampling(spec, flat, layout))
    if spec.flags.penalties:
        inputs.pen_out_ids, inputs.pen_prompt_ids = _pack_penalties(spec, flat, vocab_size)
    if spec.num_copies:
        inputs.copy_src, inputs.copy_dst = _pack_copies(spec.num_copies, copies)
    if spec.prompt_logprobs >= 0:
        inputs.next_ids = _pack_next_ids(spec, out, prompt_lp, prompt_next_ids)
    if spec.num_verify:
        layout = _pack_verify(spec, out, inputs, layout, draft_probs, vocab_size)
    if spec.lookup_n:
        inputs.lookup_ids, inputs.lookup_lens = _pack_lookup(spec, flat)
    return inputs, layout


def _pack_tokens(spec: StepSpec, out: SchedulerOutput, W: int, page_size: int,
                 block_tables) -> tuple[dict, TokenLayout]:
    """Token rows, positions, slots and the attention metadata of both parts."""
    seqs, nd = out.scheduled_seqs, out.num_decode_entries
    D, P, S = spec.num_decodes, spec.num_prefill_tokens, spec.num_prefill_seqs
    T = D + P
    ids, pos = np.zeros(T, np.int32), np.zeros(T, np.int32)
    tabs = np.zeros((len(seqs), W), np.int32)
    row_of = np.zeros(T, np.int64)  # entry of each flat token
    last = np.zeros(len(seqs), np.int32)
    # decode rows (a verify: one per fed token, context up to and including it) sorted
    # by context length, padding first: the decode attention runs in groups of rows and
    # each group costs (rows x its longest context)
    dec = [(i, j) for i in range(nd) for j in range(seqs[i].num_tokens)]
    kv = [seqs[i].start_pos + j + 1 for i, j in dec]
    order = sorted(range(len(dec)), key=lambda r: kv[r])
    drow = np.zeros(len(dec), np.int64)
    drow[order] = np.arange(D - len(dec), D)
    entry_rows: list[list[int]] = [[] for _ in range(nd)]
    for r, (i, j) in zip(drow, dec):
        entry_rows[i].append(int(r))
        ids[r], pos[r], row_of[r] = seqs[i].token_ids[j], seqs[i].start_pos + j, i
    pf_cu, pf_kv = np.zeros(S + 1, np.int32), np.zeros(S, np.int32)
    c = D
    for i, e in enumerate(seqs):
        table = e.block_table if block_tables is None else block_tables[i]
        n = min(len(table), W)
        tabs[i, :n] = table[:n]
        if i < nd:
            last[i] = entry_rows[i][-1]
        else:
            k = e.num_tokens
            ids[c:c + k] = e.token_ids
            pos[c:c + k] = np.arange(e.start_pos, e.start_pos + k)
            row_of[c:c + k] = i
            pf_kv[i - nd] = e.end_pos
            c += k
            pf_cu[i - nd + 1] = c - D
            last[i] = c - 1
    pf_cu[len(seqs) - nd + 1:] = c - D
    live = np.zeros(T, bool)
    live[D - len(dec):D] = True
    live[D:c] = True
    slots = np.full(T, PAD_SLOT, np.int32)
    slots[live] = slot_mapping_array(tabs[row_of[live]], pos[live], page_size)
    arrays = dict(input_ids=ids, positions=pos, slot_mapping=slots)
    if D:
        dec_t, dec_kv = np.zeros((D, W), np.int32), np.zeros(D, np.int32)
        dec_t[drow] = tabs[[i for i, _ in dec]]
        dec_kv[drow] = kv
        arrays.update(dec_tables=dec_t, dec_kv_lens=dec_kv)
    if P:
        pf_t = np.zeros((S, W), np.int32)
        pf_t[:len(seqs) - nd] = tabs[nd:]
        arrays.update(pf_tables=pf_t, pf_cu_q_lens=pf_cu, pf_kv_lens=pf_kv)
    return arrays, TokenLayout(last[:nd], last,
                               entry_rows=tuple(tuple(rs) for rs in entry_rows))


def _sample_rows(spec: StepSpec, out: SchedulerOutput, rows: list[list[SampleRow]],
                 dec_rows: np.ndarray) -> tuple[tuple[int, ...], ...]:
    """Per scheduled entry, the sample-row indices of its ``rows``: decode ``i`` samples
    at its flat row (a verify at its last), prefill rows follow from ``D`` on."""
    nd, r_pf, out_rows = out.num_decode_entries, spec.num_decodes, []
    for i, rs in enumerate(rows):
        if i < nd:
            assert len(rs) == 1, "a decode samples exactly one row"
            out_rows.append((int(dec_rows[i]),))
        else:
            out_rows.append(tuple(range(r_pf, r_pf + len(rs))))
            r_pf += len(rs)
    return tuple(out_rows)


def _pack_sampling(spec: StepSpec, flat: list[tuple[int, SampleRow]],
                   layout: TokenLayout) -> dict:
    R = spec.num_rows
    logits_idx = np.zeros(R, np.int32)
    for ks, last in zip(layout.sample_rows, layout.last):
        logits_idx[list(ks)] = last
    prm = [_PAD_ROW] * R
    step, max_new = np.zeros(R, np.int32), np.ones(R, np.int32)
    stop_ids = np.full((R, spec.stop_width), -1, np.int32)
    for k, r in flat:
        prm[k], step[k], max_new[k] = r.params, r.step, r.max_new
        stop_ids[k, :len(r.params.stop_ids)] = r.params.stop_ids

    def col(f, dtype):
        return np.asarray([f(q) for q in prm], dtype)

    sampling = SamplingTensors(
        temperature=col(lambda q: q.temperature, np.float32),
        top_k=col(lambda q: q.top_k, np.int32), top_p=col(lambda q: q.top_p, np.float32),
        min_p=col(lambda q: q.min_p, np.float32),
        repetition_penalty=col(lambda q: q.repetition_penalty, np.float32),
        presence_penalty=col(lambda q: q.presence_penalty, np.float32),
        frequency_penalty=col(lambda q: q.frequency_penalty, np.float32),
        seed=col(lambda q: q.seed & 0xFFFFFFFF, np.uint32))
    return dict(logits_idx=logits_idx, sampling=sampling, step=step, max_new=max_new,
                min_tokens=col(lambda q: q.min_tokens, np.int32), stop_ids=stop_ids)


def _pack_penalties(spec: StepSpec, flat: list[tuple[int, SampleRow]],
                    vocab: int) -> tuple[np.ndarray, np.ndarray]:
    lo, lp = spec.penalty_lens
    out_ids = np.full((spec.num_rows, lo), vocab, np.int32)  # vocab: dropped by the scatter
    prompt_ids = np.full((spec.num_rows, lp), vocab, np.int32)
    for k, r in flat:
        if r.params.penalties:
            out_ids[k, :len(r.output_ids)] = r.output_ids
            prompt_ids[k, :len(r.prompt_ids)] = r.prompt_ids
    return out_ids, prompt_ids


def _pack_lookup(spec: StepSpec, flat: list[tuple[int, SampleRow]]
                 ) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((spec.num_decodes, spec.lookup_width), -1, np.int32)
    lens = np.zeros(spec.num_decodes, np.int32)
    for k, r in flat:  # a decode's sample row is its flat row
        n = len(r.lookup_ids)
        ids[k, :n], lens[k] = r.lookup_ids, n
    return ids, lens


def _pack_copies(width: int, copies: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    src, dst = np.zeros(width, np.int32), np.zeros(width, np.int32)  # 0 -> 0: a no-op
    if copies:
        src[:len(copies)], dst[:len(copies)] = zip(*copies)
    return src, dst


def _pack_verify(spec: StepSpec, out: SchedulerOutput, inputs: StepInputs,
                 layout: TokenLayout, draft_probs, vocab: int) -> TokenLayout:
    """The verify arrays: each verify entry's fed rows (its token, then its drafts), its
    sample row, drafts and (when the proposer sampled them) their distributions."""
    B, K = spec.num_verify, spec.num_draft
    idx, row = np.zeros((B, K + 1), np.int32), np.zeros(B, np.int32)
    drafts, num = np.full((B, K), -1, np.int32), np.zeros(B, np.int32)
    probs = np.zeros((B, K, vocab), np.float32) if spec.draft_probs else None
    vrows, v = [-1] * out.num_seqs, 0
    for i, e in enumerate(out.scheduled_seqs):
        if not e.draft_ids:
            continue
        k, fed = len(e.draft_ids), layout.entry_rows[i]
        idx[v] = [fed[min(j, k)] for j in range(K + 1)]  # padding repeats the last row
        row[v], drafts[v, :k], num[v] = layout.sample_rows[i][0], e.draft_ids, k
        if probs is not None:
            q = draft_probs[i] if draft_probs is not None else None
            # a point-mass draft next to sampled ones: q is one-hot on each token
            probs[v, np.arange(k), e.draft_ids] = 1.0
            if q is not None:
                probs[v, :k] = np.asarray(q, np.float32)[:k]
        vrows[i] = v
        v += 1
    inputs.ver_idx, inputs.ver_row, inputs.ver_draft, inputs.ver_num = idx, row, drafts, num
    inputs.ver_probs = probs
    return layout._replace(verify_rows=tuple(vrows))


def _pack_next_ids(spec: StepSpec, out: SchedulerOutput, prompt_lp, prompt_next_ids) -> np.ndarray:
    nxt = np.full(spec.num_prefill_tokens, -1, np.int32)
    c, nd = 0, out.num_decode_entries
    for i, e in enumerate(out.scheduled_seqs[nd:], start=nd):
        nx = prompt_next_ids[i] if prompt_next_ids is not None else None
        if nx is not None and prompt_lp[i] >= 0:
            nxt[c:c + e.num_tokens] = nx
        c += e.num_tokens
    return nxt
