"""`OutputProcessor`: the engine's request bookkeeping, from a validated request to its
final :class:`RequestOutput`.

Per step it lists what to sample (:meth:`OutputProcessor.sample_rows`) and, once the
runner has sampled, :meth:`OutputProcessor.process` appends the tokens to the sequences,
forks the children of an n > 1 request after its first token, advances beams
(:func:`jaxllm.engine.beam.beam_step`), checks stops (EOS / stop ids, ``max_tokens``, the
context limit, stop strings through ``TextTracker``), records log-probs and returns an
output for every request that changed.  Finished requests' outputs are queued until the
engine's next step returns them.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from typing import Any

from jaxllm.engine.beam import BeamSearchState, beam_step
from jaxllm.engine.runner import RowParams, SampleRow, StepResult
from jaxllm.engine.scheduler import ScheduledSequence, Scheduler, SchedulerOutput
from jaxllm.engine.sequence import Sequence as Seq, SequenceStatus
from jaxllm.outputs import CompletionOutput, RequestOutput, TextTracker
from jaxllm.sampling import SamplingParams

__all__ = ["OutputProcessor", "RequestState"]

log = logging.getLogger(__name__)

Rows = list[list[SampleRow]]  # per scheduled entry: the rows it samples (none mid-prefill)


@dataclasses.dataclass(eq=False)
class RequestState:
    """Host-side state of one request.  Per-completion lists are indexed by completion
    index (n > 1 / best_of: one per sample; beam search keeps its beams in ``beam``)."""

    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    max_out: int  # tokens it may generate: max_tokens, capped by the context limit
    stop_set: frozenset[int] = frozenset()  # EOS (unless ignore_eos) + stop_token_ids
    num_seqs: int = 1  # sequences it runs at once: n, best_of or the beam width
    rows: list[RowParams] = dataclasses.field(default_factory=list)  # beam search: one
    beam: BeamSearchState | None = None
    trackers: list[TextTracker] = dataclasses.field(default_factory=list)  # text, stops
    emitted: list[str] = dataclasses.field(default_factory=list)  # text streamed so far
    cum: list[float] = dataclasses.field(default_factory=list)  # cumulative log-prob
    logprobs: list[list[dict[int, float]]] | None = None  # when SamplingParams.logprobs
    prompt_lp_k: int = -1  # prompt log-probs top-k; -1: none asked
    prompt_logprobs: list[dict[int, float] | None] | None = None
    index: dict[int, int] = dataclasses.field(default_factory=dict)  # seq id -> completion
    forked: bool = False  # the n > 1 children exist (forked after the first token)
    finished: bool = False
    abort_reason: str | None = None

    def record_logprob(self, idx: int, token: int, lp: tuple) -> None:
        """Add one sampled token's ``(chosen, top_ids, top_lps)`` to completion ``idx``."""
        chosen, top_ids, top_lps = lp
        self.cum[idx] += chosen
        if self.logprobs is not None:
            k = self.params.logprobs
            d = {int(a): float(b) for a, b in zip(top_ids[:k], top_lps[:k])}
            d[int(token)] = float(chosen)
            self.logprobs[idx].append(d)

    def record_prompt_logprobs(self, plp: tuple) -> None:
        """``(positions, chosen, top_ids, top_lps)``: position ``p`` scores prompt token ``p + 1``."""
        positions, chosen = plp[0], plp[1]
        k = self.prompt_lp_k
        for j, p in enumerate(positions):
            q = int(p) + 1
            if q >= len(self.prompt_ids) or self.prompt_logprobs[q] is not None:
                continue
            d = {int(a): float(b) for a, b in zip(plp[2][j][:k], plp[3][j][:k])} if k > 0 else {}
            d[self.prompt_ids[q]] = float(chosen[j])
            self.prompt_logprobs[q] = d


class OutputProcessor:
    """Owns every unfinished request's :class:`RequestState` (``requests``).

    Args:
        scheduler: the engine's scheduler (tokens are appended to its sequences).
        tokenizer: for detokenization and stop strings (None: ids only).
        eos_token_ids: end-of-sequence ids (stop unless ``ignore_eos``).
        vocab_size: the model's (bounds the beam width).
        stats: the engine's counters (``generated_tokens``, ``decode_tokens`` grow here).
        seed: seeds the random seeds of requests that set none.
    """

    def __init__(self, scheduler: Scheduler, tokenizer, eos_token_ids: tuple[int, ...],
                 vocab_size: int, stats: Any, seed: int = 0) -> None:
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.vocab_size = vocab_size
        self.stats = stats
        self.requests: dict[str, RequestState] = {}
        self._finished: list[RequestOutput] = []  # returned by the next step
        self._rng = random.Random(seed)

    # ------------------------------------------------------------------ requests

    def new_request(self, request_id: str, prompt: str | None, prompt_ids: list[int],
                    sp: SamplingParams, max_out: int) -> RequestState:
        """A request's state; raises ValueError for settings it cannot run.  No side effects
        (unseeded rows get their seeds when added)."""
        stop_ids = tuple(([] if sp.ignore_eos else list(self.eos_token_ids)) + sp.stop_token_ids)
        req = RequestState(request_id, prompt, prompt_ids, sp, max_out,
                           stop_set=frozenset(stop_ids), num_seqs=sp.best_of or sp.n)
        if sp.use_beam_search:
            self._init_beam(req, stop_ids)
        else:
            self._init_sampling(req, stop_ids)
        if sp.prompt_logprobs is not None:
            req.prompt_lp_k = sp.prompt_logprobs
            req.prompt_logprobs = [None] * len(prompt_ids)
        return req

    def _init_beam(self, req: RequestState, stop_ids: tuple[int, ...]) -> None:
        sp, width = req.params, req.num_seqs
        if sp.stop:
            raise ValueError("use_beam_search does not support stop strings")
        if 2 * width > self.vocab_size:
            raise ValueError(f"beam width {width} is too large for a vocabulary of "
                             f"{self.vocab_size}")
        req.beam = BeamSearchState(width, len(req.prompt_ids), stop_ids,
                                   length_penalty=sp.length_penalty, ignore_eos=False,
                                   keep_logprobs=sp.logprobs is not None)
        user_lp = -1 if sp.logprobs is None else sp.logprobs
        # greedy rows that return the top 2 * width candidates of every beam
        req.rows = [RowParams(temperature=0.0, min_tokens=sp.min_tokens, stop_ids=stop_ids,
                              logprobs=max(2 * width, user_lp))]
        if self.tokenizer is not None:
            TextTracker(self.tokenizer, sp)  # validates

    def _init_sampling(self, req: RequestState, stop_ids: tuple[int, ...]) -> None:
        sp, width = req.params, req.num_seqs
        user_lp = -1 if sp.logprobs is None else sp.logprobs
        lp = user_lp if user_lp >= 0 else (0 if width > sp.n else -1)  # best_of ranks by it
        for i in range(width):
            seed = 0 if sp.seed is None else (sp.seed + i if width > 1 else sp.seed)
            req.rows.append(RowParams(
                temperature=float(sp.temperature), top_k=int(sp.top_k), top_p=float(sp.top_p),
                min_p=float(sp.min_p), repetition_penalty=float(sp.repetition_penalty),
                presence_penalty=float(sp.presence_penalty),
                frequency_penalty=float(sp.frequency_penalty), seed=int(seed) & 0xFFFFFFFF,
                min_tokens=int(sp.min_tokens), stop_ids=stop_ids, logprobs=lp))
            req.trackers.append(TextTracker(self.tokenizer, sp))  # raises for bad stops
            req.emitted.append("")
            req.cum.append(0.0)
        if sp.logprobs is not None:
            req.logprobs = [[] for _ in range(width)]

    def add(self, req: RequestState) -> None:
        """Queue ``req`` with the scheduler and track it (raises if the scheduler refuses)."""
        group = self.scheduler.add_request(req.request_id, req.prompt_ids, req.params,
                                           n=req.num_seqs, use_prefix_cache=req.prompt_lp_k < 0)
        if req.beam is None and req.params.seed is None:
            req.rows = [dataclasses.replace(r, seed=self._rng.getrandbits(32)) for r in req.rows]
        seq = group.seqs[0]
        req.index[seq.seq_id] = 0
        if req.beam is not None:
            req.beam.start(seq.seq_id)
        self.requests[req.request_id] = req

    def has_unfinished(self) -> bool:
        """Requests running, or finished ones whose outputs the next step returns."""
        return bool(self.requests) or bool(self._finished)

    def can_speculate(self, req: RequestState) -> bool:
        """Whether a sequence may verify drafts: not beam search (the host picks every
        token), and not an n > 1 request before its first token (that step samples its n
        first tokens)."""
        return req.beam is None and (req.forked or req.num_seqs == 1)

    def uses_beam_search(self, batch: SchedulerOutput) -> bool:
        return any(self.requests[e.request_id].beam is not None for e in batch.scheduled_seqs)

    # ------------------------------------------------------------------ one step

    def on_schedule(self, batch: SchedulerOutput) -> list[RequestOutput]:
        """Before the step runs: end the requests the scheduler ignored (they can never
        fit), let preempted beams propose again; returns the outputs finished since the
        last step (aborts, ignored requests)."""
        for rid in batch.ignored_request_ids:
            req = self.requests.get(rid)
            if req is not None:
                self.finish(req, "length")
        for rid in batch.preempted_request_ids:
            req = self.requests.get(rid)
            if req is not None and req.beam is not None:
                req.beam.pending.clear()  # recomputed beams propose again
        return self.take_finished()

    def sample_rows(self, batch: SchedulerOutput) -> tuple[Rows, list[int], list[list[int] | None]]:
        """Per scheduled entry: the rows to sample (n rows for the first token of an n > 1
        request), the prompt log-prob top-k (-1: none) and, where asked, the prompt token
        that follows each fed position (-1 past the prompt)."""
        rows: Rows = []
        prompt_lp: list[int] = []
        next_ids: list[list[int] | None] = []
        for e in batch.scheduled_seqs:
            req = self.requests[e.request_id]
            k = req.prompt_lp_k if (e.is_prefill and req.prompt_logprobs is not None
                                    and req.index.get(e.seq_id) == 0) else -1
            prompt_lp.append(k)
            p = req.prompt_ids
            next_ids.append([p[q + 1] if q + 1 < len(p) else -1 for q in e.positions]
                            if k >= 0 else None)
            rows.append(self._rows(req, e) if e.do_sample else [])
        return rows, prompt_lp, next_ids

    def _rows(self, req: RequestState, e: ScheduledSequence) -> list[SampleRow]:
        seq = self.scheduler.get_seq(e.seq_id)
        n_out = seq.num_output_tokens
        if req.beam is None and req.num_seqs > 1 and not req.forked:
            return [SampleRow(rp, n_out, req.max_out - n_out, seq.output_token_ids,
                              seq.prompt_token_ids) for rp in req.rows]
        rp = req.rows[0] if req.beam is not None else req.rows[req.index[e.seq_id]]
        return [SampleRow(rp, n_out, max(1, req.max_out - n_out), seq.output_token_ids,
                          seq.prompt_token_ids)]

    def process(self, batch: SchedulerOutput, rows: Rows, result: StepResult
                ) -> list[RequestOutput]:
        """Apply one step's sampled tokens; return the outputs of the requests that changed
        (unfinished first, then the ones that finished).  A request whose host-side
        processing raises ends alone (finish_reason "abort")."""
        self.scheduler.update(batch, [(rs[0] if e.draft_ids else rs[0][0]) if rs else None
                                      for e, rs in zip(batch.scheduled_seqs, result.tokens)])
        touched: dict[str, RequestState] = {}
        for i, e in enumerate(batch.scheduled_seqs):
            req = self.requests.get(e.request_id)
            if req is None:
                continue
            if result.prompt_logprobs is not None and result.prompt_logprobs[i] is not None:
                req.record_prompt_logprobs(result.prompt_logprobs[i])
            if not rows[i]:
                continue
            try:
                self._apply(req, e, result, i)
            except Exception as exc:
                log.exception("request %s failed", req.request_id)
                self.scheduler.abort(req.request_id)
                self.finish(req, "abort", error=repr(exc))
            touched[req.request_id] = req
            if not e.is_prefill:
                self.stats.decode_tokens += len(result.tokens[i][0])
        outputs = [self.output(r) for r in touched.values() if not r.finished]
        return outputs + self.take_finished()

    def _apply(self, req: RequestState, e: ScheduledSequence, result: StepResult,
               i: int) -> None:
        """Scheduled entry ``i`` (``e``) sampled: append, fork, stop."""
        seq_id = e.seq_id
        seq = self.scheduler.get_seq(seq_id)
        if seq is None or seq.status is not SequenceStatus.RUNNING:
            return
        toks = result.tokens[i]
        lps = result.logprobs[i] if result.logprobs is not None else None
        if len(toks[0]) > 1 and not e.draft_ids:  # multi-step decode: the scheduler got
            self.scheduler.extend_decoded(seq_id, toks[0][1:])  # only the first (a verify: all)
        self.stats.generated_tokens += len(toks[0])
        if req.beam is not None:
            if beam_step(req.beam, self.scheduler, seq, lps[0][0], req.max_out, req.index):
                self.finish(req, None)
            return
        pairs = [(seq, req.index[seq_id], toks[0], lps[0] if lps else None)]
        if req.num_seqs > 1 and not req.forked:  # the first token: fork the n - 1 others
            req.forked = True
            for j in range(1, req.num_seqs):
                child = self.scheduler.fork_seq(seq_id, toks[j][0])
                req.index[child.seq_id] = j
                pairs.append((child, j, toks[j], lps[j] if lps else None))
                self.stats.generated_tokens += 1
        for s, idx, t, lp in pairs:
            self._append(req, s, idx, t, lp)
        if all(tr.finished for tr in req.trackers):
            self.finish(req, None)

    def _append(self, req: RequestState, seq: Seq, idx: int, tokens: list[int], lps) -> None:
        """Add ``tokens`` to completion ``idx`` up to the first stop; finish ``seq`` there."""
        tr = req.trackers[idx]
        status = None
        for j, t in enumerate(tokens):
            if tr.finished:
                break
            req.emitted[idx] += tr.add([t])
            if lps is not None:
                req.record_logprob(idx, t, lps[j])
            if tr.finished:  # stop string
                status = SequenceStatus.FINISHED_STOPPED
            elif t in req.stop_set:
                req.emitted[idx] += tr.finish("stop", t)
                status = SequenceStatus.FINISHED_STOPPED
            elif len(tr.token_ids) >= req.max_out:
                req.emitted[idx] += tr.finish("length")
                status = SequenceStatus.FINISHED_LENGTH
        if status is not None and seq.status is SequenceStatus.RUNNING:
            self.scheduler.finish_seq(seq.seq_id, status)

    # ------------------------------------------------------------------ finishing

    def finish(self, req: RequestState, reason: str | None, error: str | None = None) -> None:
        """End a request and queue its final output.  ``reason`` None: its sequences have
        finished in the scheduler; else they are aborted and every unfinished completion
        gets ``reason`` (``error``, when given, becomes their ``stop_reason``)."""
        if req.finished:
            return
        if reason is not None:
            if self.scheduler.get_request(req.request_id) is not None:
                self.scheduler.abort(req.request_id)
            for idx, tr in enumerate(req.trackers):
                if not tr.finished:
                    req.emitted[idx] += tr.finish(reason)
            req.abort_reason = reason if req.beam is not None or error else None
            if req.beam is not None and reason != "abort":
                req.beam.finish_running()
        req.finished = True
        self.requests.pop(req.request_id, None)
        out = self.output(req)
        if error is not None:
            for o in out.outputs:
                o.stop_reason = error
        self._finished.append(out)

    def abort(self, request_id: str) -> bool:
        """Abort a request now (frees its pages); False if it is unknown or finished."""
        req = self.requests.get(request_id)
        if req is None:
            return False
        self.scheduler.abort(request_id)
        self.finish(req, "abort")
        return True

    def fail_all(self, why: str) -> None:
        """Every request ends with finish_reason "abort" and ``why`` as its stop_reason."""
        for req in list(self.requests.values()):
            self.finish(req, "abort", error=why)

    def take_finished(self) -> list[RequestOutput]:
        out, self._finished = self._finished, []
        return out

    # ------------------------------------------------------------------ outputs

    def output(self, req: RequestState) -> RequestOutput:
        """The request's output now (cumulative text and tokens)."""
        outs = self._beam_completions(req) if req.beam is not None else self._completions(req)
        return RequestOutput(request_id=req.request_id, prompt=req.prompt,
                             prompt_token_ids=list(req.prompt_ids), outputs=outs,
                             finished=req.finished,
                             prompt_logprobs=(list(req.prompt_logprobs)
                                              if req.prompt_logprobs is not None else None))

    def _completions(self, req: RequestState) -> list[CompletionOutput]:
        """Running: every sample so far; finished: the n best (best_of) or the n samples."""
        sp = req.params
        idxs = range(len(req.trackers))
        if req.finished and req.num_seqs > sp.n:  # best_of: the n most likely
            idxs = sorted(idxs, key=lambda j: req.cum[j], reverse=True)[:sp.n]
        elif not req.forked:
            idxs = [0] if not req.finished else idxs
        outs = []
        for k, j in enumerate(list(idxs)[:max(sp.n, 1)] if req.finished else idxs):
            tr = req.trackers[j]
            outs.append(CompletionOutput(
                index=k, text=tr.text if req.finished else req.emitted[j],
                token_ids=list(tr.token_ids), finish_reason=tr.finish_reason,
                cumulative_logprob=(req.cum[j] if req.rows[j].logprobs >= 0 else None),
                logprobs=(list(req.logprobs[j]) if req.logprobs is not None else None),
                stop_reason=tr.stop_reason))
        return outs

    def _beam_completions(self, req: RequestState) -> list[CompletionOutput]:
        """Running: the n best running beams; finished: the n best completed ones."""
        sp, bs = req.params, req.beam
        if req.finished:
            beams = bs.best(sp.n) if bs.completed else []
        else:
            beams = sorted(bs.running.values(), key=lambda b: b.cum_logprob, reverse=True)[:sp.n]
        outs = []
        for i, b in enumerate(beams):
            text = (self.tokenizer.decode(b.tokens, skip_special_tokens=sp.skip_special_tokens)
                    if self.tokenizer is not None else "")
            last = b.tokens[-1] if b.tokens else None
            stopped = last is not None and last in req.stop_set and not sp.ignore_eos
            reason = None
            if req.finished:
                reason = req.abort_reason or ("stop" if stopped else "length")
            outs.append(CompletionOutput(
                index=i, text=text, token_ids=list(b.tokens), finish_reason=reason,
                cumulative_logprob=b.cum_logprob, logprobs=b.logprobs,
                stop_reason=last if stopped and req.finished else None))
        if not outs:
            outs = [CompletionOutput(0, "", [], req.abort_reason if req.finished else None)]
        return outs
