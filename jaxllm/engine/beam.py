"""Beam search bookkeeping (host side), vLLM's algorithm.

Each step every running beam proposes its top ``2 * width`` next tokens (log-probs from
the device); a candidate's score is ``beam.cum_logprob + logprob``.  Candidates ending in
EOS (or a stop id, unless ``ignore_eos``) join the *completed* list; the ``width`` best of
the others (by cumulative log-prob) are the next running beams.  After ``max_tokens``
steps (or at the context limit) the running beams are completed too, and the result is
the completed beams ranked by the length-penalised score

    score = cum_logprob / seq_len ** length_penalty

with ``seq_len`` = prompt + generated tokens, not counting a final EOS (vLLM's
``get_beam_search_score``).  The engine maps beams onto sequences: a kept parent
continues in its own sequence, extra children fork it (sharing its KV pages,
copy-on-write), dropped beams are finished, which frees their pages.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

__all__ = ["Beam", "BeamSearchState", "Candidate", "beam_score"]


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
