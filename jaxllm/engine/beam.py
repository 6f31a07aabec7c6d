"""Beam search bookkeeping (host side), vLLM's algorithm.

Each step every running beam proposes its top ``2 * width`` next tokens (log-probs from
the device); a candidate's score is ``beam.cum_logprob + logprob``.  Candidates ending in
EOS (or a stop id, unless ``ignore_eos``) join the *completed* list; the ``width`` best of
the others (by cumulative log-prob) are the next running beams.  After ``max_tokens``
steps (or at the context limit) the running beams are completed too, and the result is
the completed beams ranked by the length-penalised score

    score = cum_logprob / seq_len ** length_penalty

with ``seq_len`` = prompt + generated tokens, not counting a final EOS (vLLM's
``get_beam_search_score``).  :func:`beam_step` maps beams onto the scheduler's
sequences: a kept parent continues in its own sequence, extra children fork it (sharing
its KV pages, copy-on-write), dropped beams are finished, which frees their pages.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

from jaxllm.engine.scheduler import Scheduler
from jaxllm.engine.sequence import Sequence as Seq, SequenceStatus

__all__ = ["Beam", "BeamSearchState", "Candidate", "beam_score", "beam_step"]


@dataclasses.dataclass
class Beam:
    tokens: list[int]  # generated tokens
    cum_logprob: float = 0.0
    logprobs: list[dict[int, float]] | None = None


@dataclasses.dataclass(frozen=True)
class Candidate:
    parent: int  # key of the parent beam (the engine's seq id)
    token: int
    cum_logprob: float
    token_logprobs: dict[int, float] | None = None  # the step's top-k (when asked)


def beam_score(prompt_len: int, tokens: Sequence[int], cum_logprob: float,
               eos_ids: Iterable[int], length_penalty: float = 1.0) -> float:
    seq_len = prompt_len + len(tokens)
    if tokens and tokens[-1] in set(eos_ids):
        seq_len -= 1
    return cum_logprob / (max(seq_len, 1) ** length_penalty)


class BeamSearchState:
    """Beams of one request.  ``running`` maps a key (seq id) to its :class:`Beam`."""

    def __init__(self, width: int, prompt_len: int, eos_ids: Iterable[int], *,
                 length_penalty: float = 1.0, ignore_eos: bool = False,
                 keep_logprobs: bool = False) -> None:
        self.width = width
        self.prompt_len = prompt_len
        self.eos_ids = frozenset(int(t) for t in eos_ids)
        self.length_penalty = length_penalty
        self.ignore_eos = ignore_eos
        self.keep_logprobs = keep_logprobs
        self.running: dict[int, Beam] = {}
        self.completed: list[Beam] = []
        self.pending: dict[int, tuple[Sequence[int], Sequence[float]]] = {}

    def start(self, key: int) -> None:
        """The first beam (empty), in the request's first sequence ``key``."""
        self.running[key] = Beam([], 0.0, [] if self.keep_logprobs else None)

    def ready(self) -> bool:
        """Every running beam has proposed its candidates for this step."""
        return bool(self.running) and all(k in self.pending for k in self.running)

    def select(self) -> list[Candidate]:
        """Score the pending candidates; move EOS ones to ``completed``; return the next
        beams (best first).  Clears ``pending``."""
        cands: list[Candidate] = []
        for key, beam in self.running.items():
            ids, lps = self.pending[key]
            top = ({int(t): float(lp) for t, lp in zip(ids, lps)}
                   if self.keep_logprobs else None)
            for t, lp in zip(ids, lps):
                t, cum = int(t), beam.cum_logprob + float(lp)
                if t in self.eos_ids and not self.ignore_eos:
                    self.completed.append(Beam(beam.tokens + [t], cum, _extend(beam, top)))
                else:
                    cands.append(Candidate(key, t, cum, top))
        self.pending.clear()
        cands.sort(key=lambda c: c.cum_logprob, reverse=True)  # stable
        return cands[:self.width]

    def finish_running(self) -> None:
        self.completed.extend(self.running.values())
        self.running.clear()

    def best(self, n: int) -> list[Beam]:
        ranked = sorted(self.completed, key=lambda b: beam_score(
            self.prompt_len, b.tokens, b.cum_logprob, self.eos_ids, self.length_penalty),
            reverse=True)
        return ranked[:n]


def _extend(beam: Beam, top: dict[int, float] | None) -> list[dict[int, float]] | None:
    if beam.logprobs is None or top is None:
        return None
    return beam.logprobs + [top]


# ------------------------------------------------------------------ beams <-> sequences

def beam_step(bs: BeamSearchState, scheduler: Scheduler, seq: Seq, lp,
              max_out: int, index: dict[int, int]) -> bool:
    """Record the candidates of the beam in ``seq`` (``lp``: ``(chosen, top_ids, top_lps)``
    of the token it just sampled); once every running beam has proposed, select the next
    beams and map them onto sequences (``index``: seq id -> completion index, updated).
    Returns True when the search is over (all its sequences finished)."""
    seq.pop_token()  # the placeholder argmax; the selected candidate is appended instead
    _, top_ids, top_lps = lp
    w = 2 * bs.width
    bs.pending[seq.seq_id] = (list(map(int, top_ids[:w])), list(map(float, top_lps[:w])))
    if not bs.ready():
        return False  # siblings still (re)computing
    new = bs.select()
    parents, bs.running = bs.running, {}
    n_gen = len(next(iter(parents.values())).tokens) + 1
    if not new or n_gen >= max_out:
        for c in new:
            p = parents[c.parent]
            bs.completed.append(Beam(p.tokens + [c.token], c.cum_logprob,
                                     _extend(p, c.token_logprobs)))
        for sid in parents:
            scheduler.finish_seq(sid, SequenceStatus.FINISHED_LENGTH)
        return True
    _continue_beams(bs, scheduler, parents, new, index)
    return False


def _continue_beams(bs: BeamSearchState, scheduler: Scheduler, parents: dict[int, Beam],
                    new: list[Candidate], index: dict[int, int]) -> None:
    """The first child of a parent continues its sequence; more children fork it."""
    children: dict[int, list[Candidate]] = {}
    for c in new:
        children.setdefault(c.parent, []).append(c)
    for sid in parents:
        if sid not in children:  # dropped beam: its pages go back (shared ones stay)
            scheduler.finish_seq(sid, SequenceStatus.FINISHED_ABORTED)
            index.pop(sid, None)
    for sid, cs in children.items():
        p = parents[sid]
        scheduler.get_seq(sid).append_token(cs[0].token)
        bs.running[sid] = Beam(p.tokens + [cs[0].token], cs[0].cum_logprob,
                               _extend(p, cs[0].token_logprobs))
        for c in cs[1:]:
            child = scheduler.fork_seq(sid, c.token)
            index[child.seq_id] = 0
            bs.running[child.seq_id] = Beam(p.tokens + [c.token], c.cum_logprob,
                                            _extend(p, c.token_logprobs))
