"""Model runner: one :class:`SchedulerOutput` -> a :class:`StepInputs` pytree -> ONE jitted
step (:mod:`jaxllm.engine.step`) -> the sampled ids back on the host.

Buckets keep the set of compiled programs small: decode-only steps take ``D`` from
powers of two up to ``max_num_seqs``; mixed steps take ``D`` from ``{0, 4, 16, 64, ...}``,
``P`` from powers of two (from 16) up to ``max_num_batched_tokens`` and ``S`` from
``{1, 4, 16, ...}`` (all capped at the limits); the block-table width
``W = pow2(ceil(max_model_len / page_size))`` is fixed, and the pool's arrays are sized
in buckets (``cache.page_pool.pool_bucket``).  Sample rows: one per decode, one per prefill sequence (``S`` grows to cover a
request's n first samples).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
from typing import Any, Callable, Sequence

import jax
import numpy as np

from jaxllm.cache.page_pool import PagePool
from jaxllm.config import ModelConfig
from jaxllm.engine.inputs import (RowParams, SampleRow, StepInputs, StepSpec, TokenLayout,
                                  pack_inputs)
from jaxllm.engine.scheduler import ScheduledSequence, SchedulerOutput
from jaxllm.engine.step import paged_step_jit
from jaxllm.sampling import SamplerFlags

__all__ = ["ModelRunner", "RowParams", "SampleRow", "StepResult", "StepSpec", "pow2_buckets"]

log = logging.getLogger(__name__)


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


@dataclasses.dataclass
class StepResult:
    """What came back from the device for one step.

    ``tokens[i]`` lists, for scheduled entry ``i``, one list of new tokens per sample row
    (empty when the entry did not sample).  ``logprobs[i][r]`` (when asked) is a list, per
    new token, of ``(chosen_logprob, top_ids, top_logprobs)``.  ``prompt_logprobs[i]``:
    ``(positions, chosen, top_ids, top_lps)`` for the fed tokens whose next token is a
    prompt token (positions ``p`` -> logprob of prompt token ``p + 1``).  ``hidden[i]``
    (runners built with ``return_hidden``): the final hidden state ``[D]`` float32 that
    entry ``i``'s last new token was read from (None when it sampled nothing).
    ``drafts[i]`` (steps that draft on device, early exit): verify entry ``i``'s draft
    tokens as the step made them (None for the other entries).
    """

    tokens: list[list[list[int]]]
    logprobs: list[list[list[tuple]]] | None = None
    prompt_logprobs: list[tuple | None] | None = None
    spec: StepSpec | None = None
    hidden: list[np.ndarray | None] | None = None
    drafts: list[tuple[int, ...] | None] | None = None


# ------------------------------------------------------------------------------ host runner

class ModelRunner:
    """Owns the page pool; turns scheduler outputs into device steps."""

    def __init__(self, params, cfg: ModelConfig, pool: PagePool, *, max_model_len: int,
                 max_num_seqs: int, max_num_batched_tokens: int, impl: str = "xla",
                 min_stop_width: int = 1, num_scheduler_steps: int = 1,
                 num_speculative_tokens: int = 0, return_hidden: bool = False) -> None:
        self.params = params
        self.cfg = cfg
        self.pool = pool
        self.impl = impl
        self.page_size = pool.page_size
        self.max_model_len = max_model_len
        # a power of two: nearby max_model_len share programs (the attention loops only
        # over the pages a step's longest context uses, so the padding costs nothing)
        self.table_width = _pow2(-(-max_model_len // pool.page_size))
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
        self.num_scheduler_steps = num_scheduler_steps  # tokens per decode-only dispatch
        # draft tokens per verify row: one width, so verify steps share programs
        self.num_speculative_tokens = num_speculative_tokens
        if num_speculative_tokens:  # verify rows: up to k + 1 decode rows per sequence
            rows = max_num_seqs * (num_speculative_tokens + 1)
            # + one sequence's full verify (k + 1 rows): batch 1 at k = 4 runs 5 rows, not 8
            self.verify_row_buckets = tuple(sorted(set(pow2_buckets(rows))
                                                   | {num_speculative_tokens + 1}))
            self.mixed_decode_buckets = (0,) + tuple(x for x in _pow4_buckets(rows) if x > 1)
        self.return_hidden = return_hidden  # hidden states back with the tokens (draft heads)
        # early exit: verify steps draft on device with the first draft_layers layers
        self.draft_layers = 0
        # n-gram speculation: a multi-token decode stops once a watched row could be drafted
        # (prompt_lookup_min; 0: off).  One history width, the longest table's tokens, so
        # watching adds one program per decode bucket, not one per length.  Batches the
        # load-aware switch turns speculation off for are not watched
        self.lookup_n = 0
        self.speculates: Callable[[int], bool] = lambda num_decoding: True
        self.num_dispatches = 0
        self.specs_seen: set[StepSpec] = set()
        # decode programs compiled ahead of time, in a background thread, while the prefill
        # that precedes them is traced, compiled and run (a cold compile costs seconds)
        self._ahead: dict[StepSpec, concurrent.futures.Future] = {}
        self._compiler: concurrent.futures.ThreadPoolExecutor | None = None

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

    def warmup(self, row: RowParams, num_steps: Sequence[int]) -> int:
        """Run every reachable bucket once with ``row``'s sampling (decode-only steps for
        each of ``num_steps``), so serving compiles nothing.  Writes only into the null
        page.  Returns how many step shapes ran."""
        n = 0
        for d in self.decode_buckets:
            for k in num_steps:
                out = SchedulerOutput(_null_decodes(d), num_decode_tokens=d,
                                      block_size=self.page_size)
                self.execute(out, [[SampleRow(row, 0, k)] for _ in range(d)], num_steps=k)
                n += 1
        for d, p, s in self.mixed_shapes():
            lens = [1] * (s - 1) + [p - (s - 1)]
            pf = [ScheduledSequence(-100 - j, "", (0,) * q, 0, (0,) * -(-q // self.page_size),
                                    True, True) for j, q in enumerate(lens)]
            out = SchedulerOutput(_null_decodes(d) + pf, num_decode_tokens=d,
                                  num_prefill_tokens=p, block_size=self.page_size)
            self.execute(out, [[SampleRow(row, 0)] for _ in range(d + s)])
            n += 1
        return n

    # -- shapes -------------------------------------------------------------------------

    def _spec(self, out: SchedulerOutput, rows: list[list[SampleRow]], prompt_lp: Sequence[int],
              num_steps: int, num_copies: int, draft_probs: bool = False) -> StepSpec:
        flat_rows = [r for rs in rows for r in rs]
        params = [r.params for r in flat_rows]
        nd = out.num_decode_entries
        npf_seqs = out.num_seqs - nd
        dec_rows = out.num_decode_tokens + out.num_verify_tokens
        if out.num_prefill_tokens == 0:
            buckets = self.verify_row_buckets if out.num_verify_tokens else self.decode_buckets
            d, p, s = _pick(buckets, dec_rows), 0, 0
        else:
            d = _pick(self.mixed_decode_buckets, dec_rows)
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
        nv, nk = self._verify_shape(out)
        steps = num_steps if not p and not nv else 1
        watch = steps > 1 and self.lookup_n > 0 and any(r.lookup_ids for r in flat_rows)
        return StepSpec(num_decodes=d, num_prefill_tokens=p, num_prefill_seqs=s,
                        num_steps=steps, flags=flags, logprobs=lp,
                        prompt_logprobs=plp, num_copies=copies, stop_width=stop_w,
                        penalty_lens=pen, num_verify=nv, num_draft=nk,
                        draft_probs=draft_probs and nv > 0, return_hidden=self.return_hidden,
                        draft_layers=self.draft_layers if nv else 0,
                        **self._lookup_fields(watch))

    def _lookup_fields(self, watch: bool) -> dict[str, int]:
        """``StepSpec.lookup_n`` / ``lookup_width`` of a decode program that watches its
        rows for a prompt-lookup match (zeros: it does not)."""
        if not watch:
            return dict(lookup_n=0, lookup_width=0)
        return dict(lookup_n=self.lookup_n, lookup_width=self.table_width * self.page_size)

    def _verify_shape(self, out: SchedulerOutput) -> tuple[int, int]:
        """``(B, K)``: verify rows (bucketed like prefill sequences) and draft width."""
        lens = [len(e.draft_ids) for e in out.scheduled_seqs if e.draft_ids]
        if not lens:
            return 0, 0
        if max(lens) > self.num_speculative_tokens:
            raise ValueError(f"a draft of {max(lens)} tokens exceeds num_speculative_tokens "
                             f"({self.num_speculative_tokens})")
        return _pick(self.prefill_seq_buckets, len(lens)), self.num_speculative_tokens

    # -- arrays ---------------------------------------------------------------------------

    def build(self, out: SchedulerOutput, rows: list[list[SampleRow]],
              prompt_lp: Sequence[int] | None = None,
              prompt_next_ids: Sequence[Sequence[int] | None] | None = None,
              num_steps: int = 1, extra_copies: Sequence[tuple[int, int]] = (),
              block_tables: Sequence[Sequence[int]] | None = None,
              draft_probs: Sequence[Any] | None = None):
        """``(spec, inputs, layout)`` for ``out``.  ``rows[i]``: the sample rows of scheduled
        entry ``i`` (empty if it does not sample; exactly one for a decode);
        ``prompt_lp[i]``: prompt log-probs width wanted for entry ``i`` (-1: none) and
        ``prompt_next_ids[i]`` the prompt token following each of its fed tokens (-1: none);
        ``block_tables`` overrides the entries' snapshots (multi-step decode reserves
        look-ahead pages after scheduling); ``draft_probs[i]``: verify entry ``i``'s draft
        distributions ``[k, V]`` (None: point masses)."""
        prompt_lp = list(prompt_lp) if prompt_lp is not None else [-1] * out.num_seqs
        copies = list(out.blocks_to_copy) + list(extra_copies)
        has_probs = draft_probs is not None and any(q is not None for q in draft_probs)
        spec = self._spec(out, rows, prompt_lp, num_steps, len(copies), has_probs)
        inputs, layout = pack_inputs(spec, out, rows, self.table_width, self.page_size,
                                     self.cfg.vocab_size, copies=copies, prompt_lp=prompt_lp,
                                     prompt_next_ids=prompt_next_ids, block_tables=block_tables,
                                     draft_probs=draft_probs)
        return spec, inputs, layout

    # -- run -------------------------------------------------------------------------------

    def execute(self, out: SchedulerOutput, rows: list[list[SampleRow]], *,
                prompt_lp: Sequence[int] | None = None,
                prompt_next_ids: Sequence[Sequence[int] | None] | None = None,
                num_steps: int = 1,
                extra_copies: Sequence[tuple[int, int]] = (),
                block_tables: Sequence[Sequence[int]] | None = None,
                draft_probs: Sequence[Any] | None = None) -> StepResult:
        """Run one step (arguments as :meth:`build`)."""
        spec, inputs, layout = self.build(out, rows, prompt_lp, prompt_next_ids, num_steps,
                                          extra_copies, block_tables, draft_probs)
        if self.pool.filling:  # compile from shapes while the pool's zeros are written
            self._compile_ahead(spec)
        self.specs_seen.add(spec)
        if not spec.decode_only:  # start on the decode program before this step's own
            self._compile_ahead(self._next_decode_spec(spec, out, rows))
        program = self._program(spec)
        caches = self.pool.caches
        self.pool.caches = None  # donated: never touch the old buffers again
        try:
            caches, res = program(self.params, caches, inputs)
        except Exception:
            self.pool.reset()  # contents are gone; the engine recomputes (see engine.step)
            raise
        self.pool.caches = caches
        self.num_dispatches += 1
        return self._unpack(out, spec, jax.device_get(res), inputs, layout)

    def _program(self, spec: StepSpec):
        """The step for ``spec``: compiled ahead of time if it was, else the jitted one."""
        fut = self._ahead.get(spec)
        if fut is not None:
            try:
                return fut.result()
            except Exception:  # noqa: BLE001 - the jitted path reports the real error
                log.debug("ahead-of-time compile of %s failed", spec, exc_info=True)
                del self._ahead[spec]
        return lambda params, caches, inputs: paged_step_jit(params, caches, inputs,
                                                             **self._static(spec))

    def _next_decode_spec(self, spec: StepSpec, out: SchedulerOutput,
                          rows: list[list[SampleRow]]) -> StepSpec | None:
        """The decode-only step that will most likely follow a mixed step: its decodes
        plus every sequence that sampled its first token, with the same sampling."""
        if spec.flags.penalties or self.num_scheduler_steps < 1:
            return None  # penalty widths depend on lengths: not worth guessing
        n = sum(r.max_new > 1 for rs in rows for r in rs)  # rows that will decode on
        if n == 0 or n > self.max_num_seqs:
            return None
        # with n-gram speculation a decode-only step follows when lookup found no draft:
        # its rows are watched
        watch = self.lookup_n > 0 and self.num_scheduler_steps > 1 and self.speculates(n)
        return spec._replace(num_decodes=_pick(self.decode_buckets, n), num_prefill_tokens=0,
                             num_prefill_seqs=0, num_steps=self.num_scheduler_steps,
                             prompt_logprobs=-1, num_copies=0, penalty_lens=(0, 0),
                             num_verify=0, num_draft=0, draft_probs=False,
                             **self._lookup_fields(watch))

    def _compile_ahead(self, spec: StepSpec | None) -> None:
        if spec is None or spec in self._ahead or spec in self.specs_seen:
            return
        if self._compiler is None:
            self._compiler = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="jaxllm-compile")
        args = self._abstract_args(spec)
        self._ahead[spec] = self._compiler.submit(
            lambda: paged_step_jit.lower(*args, **self._static(spec)).compile())

    def _abstract_args(self, spec: StepSpec):
        """``(params, caches, inputs)`` shaped like a real step of ``spec`` (no data)."""
        caches = self.pool.layout()  # not the arrays: they may still be filling
        out = SchedulerOutput(_null_decodes(spec.num_decodes),
                              num_decode_tokens=spec.num_decodes, block_size=self.page_size)
        rows = [[SampleRow(RowParams(), 0, spec.num_steps)] for _ in range(spec.num_decodes)]
        inputs, _ = pack_inputs(spec, out, rows, self.table_width, self.page_size,
                                self.cfg.vocab_size)
        return self.params, caches, inputs

    def _static(self, spec: StepSpec) -> dict[str, Any]:
        return dict(cfg=self.cfg, spec=spec, impl=self.impl, page_size=self.page_size,
                    model=self.pool.model)

    def lower(self, out: SchedulerOutput, rows: list[list[SampleRow]], *,
              num_steps: int = 1) -> jax.stages.Lowered:
        """The step program :meth:`execute` would run for ``out`` (lowered, not run): for
        inspecting its compiled HLO and cost."""
        spec, inputs, _ = self.build(out, rows, num_steps=num_steps)
        return paged_step_jit.lower(self.params, self.pool.caches, inputs, **self._static(spec))

    def _unpack(self, out: SchedulerOutput, spec: StepSpec, res: dict, inputs: StepInputs,
                layout: TokenLayout) -> StepResult:
        toks = res["tokens"]  # [n, R]
        lp = res.get("lp")
        tokens: list[list[list[int]]] = []
        logprobs: list[list[list[tuple]]] | None = [] if lp is not None else None
        for i, ks in enumerate(layout.sample_rows):
            if layout.verify_rows and layout.verify_rows[i] >= 0:  # kept drafts + 1 token
                v, vl = layout.verify_rows[i], res.get("ver_lp")
                n = int(res["accepted"][v]) + 1
                tokens.append([[int(x) for x in res["verify"][v, :n]]])
                if logprobs is not None:
                    logprobs.append([[(float(vl[0][v, j]), vl[1][v, j], vl[2][v, j])
                                      for j in range(n)]])
                continue
            ent_t, ent_l = [], []
            for k in ks:
                col = toks[:, k]
                nv = int((col >= 0).sum()) if spec.num_steps > 1 else 1
                ent_t.append([int(x) for x in col[:nv]])
                if lp is not None:
                    ent_l.append([(float(lp[0][j, k]), lp[1][j, k], lp[2][j, k])
                                  for j in range(nv)])
            tokens.append(ent_t)
            if logprobs is not None:
                logprobs.append(ent_l)
        plp = _prompt_logprobs(out, res["plp"], inputs.next_ids) if "plp" in res else None
        hidden = _hidden_rows(layout, res) if "hidden" in res else None
        drafts = None
        if "drafts" in res:
            drafts = [None if v < 0 else tuple(int(t) for t in res["drafts"][v] if t >= 0)
                      for v in (layout.verify_rows or ())]
        return StepResult(tokens=tokens, logprobs=logprobs, prompt_logprobs=plp, spec=spec,
                          hidden=hidden, drafts=drafts)


def _hidden_rows(layout: TokenLayout, res: dict) -> list[np.ndarray | None]:
    """Per scheduled entry, the hidden state its last new token was read from."""
    out: list[np.ndarray | None] = []
    for i, ks in enumerate(layout.sample_rows):
        if layout.verify_rows and layout.verify_rows[i] >= 0:
            out.append(res["ver_hidden"][layout.verify_rows[i]])
        else:
            out.append(res["hidden"][ks[0]] if ks else None)
    return out


def _null_decodes(n: int) -> list[ScheduledSequence]:
    """``n`` placeholder decodes at position 0 of the null page (warm-up, compile-ahead)."""
    return [ScheduledSequence(-1 - j, "", (0,), 0, (0,), True, False) for j in range(n)]


def _prompt_logprobs(out: SchedulerOutput, plp: tuple, next_ids: np.ndarray) -> list:
    """Per scheduled entry: ``(positions, *plp columns)`` of its fed tokens that have a
    next prompt token, or None (decodes and entries without prompt log-probs)."""
    nd = out.num_decode_entries
    result: list[tuple | None] = [None] * nd
    c = 0
    for e in out.scheduled_seqs[nd:]:
        sl = slice(c, c + e.num_tokens)
        sel = np.nonzero(next_ids[sl] >= 0)[0]
        result.append((np.asarray(e.start_pos + sel), *[x[sl][sel] for x in plp])
                      if len(sel) else None)
        c += e.num_tokens
    return result
