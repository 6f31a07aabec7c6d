"""`Speculator`: the engine's side of speculative decoding, on the host.

It wraps a :class:`~jaxllm.spec.proposer.Proposer` with the policy the engine applies
every step:

* **load-aware switch**: no speculation in a step with ``disable_by_batch_size`` or more
  decoding sequences.  A verify step runs ``k + 1`` query rows per sequence through the
  ragged path (and forgoes the multi-token decode program); once the batch is large
  enough to keep the matmuls busy, the extra rows cost more than the accepted tokens save.
* **adaptive k** per sequence: after a verify that accepted everything ``k`` grows by one
  (up to ``num_speculative_tokens``); after a rejection it drops to ``accepted + 1``.
  A sequence whose draft was rejected outright skips proposing for ``2^misses - 1`` steps
  (at most 7), so a request the draft cannot predict decodes at the plain rate.
* **metrics** per method (:class:`SpecStats`): drafted / accepted tokens, verifies,
  acceptance rate, mean accepted length.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from jaxllm.spec.config import SpeculativeConfig
from jaxllm.spec.proposer import Draft, DraftRequest, Proposer

__all__ = ["SpecStats", "Speculator"]

_MAX_BACKOFF_EXP = 3  # skip at most 2^3 - 1 = 7 steps after repeated outright rejections


@dataclasses.dataclass
class SpecStats:
    """Counters of one speculative method since the engine started."""

    drafted_tokens: int = 0  # draft tokens sent to verification
    accepted_tokens: int = 0  # of those, kept
    verifies: int = 0  # sequence-steps that verified a draft
    emitted_tokens: int = 0  # tokens those verifies produced (accepted + the target's own)
    spec_steps: int = 0  # engine steps that verified at least one draft
    disabled_steps: int = 0  # steps the load-aware switch turned speculation off

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens produced per verify (accepted drafts + the target's token; 1.0 = none)."""
        return self.emitted_tokens / self.verifies if self.verifies else 0.0

    def as_dict(self) -> dict[str, float]:
        d = dataclasses.asdict(self)
        d.update(acceptance_rate=self.acceptance_rate,
                 mean_accepted_length=self.mean_accepted_length)
        return d


@dataclasses.dataclass
class _SeqState:
    k: int  # draft length to ask for next
    misses: int = 0  # consecutive verifies that accepted nothing
    skip: int = 0  # steps left without proposing


class Speculator:
    """Proposals with adaptive ``k`` and the load-aware switch (see the module docstring)."""

    def __init__(self, config: SpeculativeConfig, proposer: Proposer,
                 vocab_size: int | None = None) -> None:
        self.config = config
        self.proposer = proposer
        self.vocab_size = vocab_size  # drafts are checked against it (None: unchecked)
        self.method = config.method
        self.stats = SpecStats()
        self._seqs: dict[int, _SeqState] = {}

    @property
    def needs_hidden(self) -> bool:
        """The proposer reads the target's hidden states (``DraftRequest.hidden``)."""
        return bool(getattr(self.proposer, "needs_hidden", False))

    @property
    def lookup_n(self) -> int:
        """The proposer drafts exactly when a sequence's last ``lookup_n`` tokens occurred
        earlier in it (prompt lookup); 0: no such rule."""
        return int(getattr(self.proposer, "lookup_n", 0))

    def will_ask(self, seq_id: int) -> bool:
        """Whether the next :meth:`propose` offers this sequence to the proposer (it is
        not backing off after rejected drafts)."""
        st = self._seqs.get(seq_id)
        return st is None or st.skip == 0

    @property
    def max_tokens(self) -> int:
        """``num_speculative_tokens``: the widest draft a step verifies."""
        return self.config.num_speculative_tokens

    def speculates(self, num_decoding: int) -> bool:
        """The load-aware switch: whether a step with ``num_decoding`` decoding sequences
        speculates at all."""
        limit = self.config.disable_by_batch_size
        return limit is None or num_decoding < limit

    def enabled_for(self, num_decoding: int) -> bool:
        """:meth:`speculates`, counting the steps it switches off."""
        on = self.speculates(num_decoding)
        if not on:
            self.stats.disabled_steps += 1
        return on

    def propose(self, requests: Sequence[DraftRequest]) -> dict[int, Draft]:
        """Drafts for the sequences that want one now (``num_tokens``: the most each may
        take; adaptive k and back-off lower it).  ``{seq_id: draft}``, non-empty drafts."""
        asks = []
        for r in requests:
            st = self._seqs.setdefault(r.seq_id, _SeqState(self.max_tokens))
            if st.skip > 0:
                st.skip -= 1
                continue
            k = min(r.num_tokens, st.k if self.config.adaptive else self.max_tokens)
            if k >= 1:
                asks.append(r._replace(num_tokens=k))
        if not asks:
            return {}
        out = {}
        for r, d in zip(asks, self.proposer.propose(asks)):
            if d is not None and len(d.token_ids):
                n = min(len(d.token_ids), r.num_tokens)
                probs = d.probs[:n] if d.probs is not None else None
                out[r.seq_id] = self._checked(Draft(tuple(int(t) for t in d.token_ids[:n]),
                                                    probs))
        return out

    def _checked(self, draft: Draft) -> Draft:
        """ValueError for a draft the verifier cannot take (a proposer bug), raised before
        the step touches any state."""
        v = self.vocab_size
        if v is not None and not all(0 <= t < v for t in draft.token_ids):
            raise ValueError(f"{self.method} proposer drafted {draft.token_ids}: ids outside "
                             f"the vocabulary of {v}")
        if draft.probs is not None and tuple(draft.probs.shape) != (len(draft.token_ids),
                                                                    v or draft.probs.shape[1]):
            raise ValueError(f"{self.method} proposer gave draft probabilities of shape "
                             f"{tuple(draft.probs.shape)} for {len(draft.token_ids)} tokens")
        return draft

    def record(self, seq_id: int, num_drafted: int, num_accepted: int) -> None:
        """A verify kept ``num_accepted`` of ``num_drafted`` tokens: count it, adapt k."""
        s = self.stats
        s.drafted_tokens += num_drafted
        s.accepted_tokens += num_accepted
        s.verifies += 1
        s.emitted_tokens += num_accepted + 1
        st = self._seqs.setdefault(seq_id, _SeqState(self.max_tokens))
        if num_accepted == num_drafted:
            st.k = min(self.max_tokens, st.k + 1)
        else:
            st.k = max(1, num_accepted + 1)
        if num_accepted == 0:
            st.misses = min(st.misses + 1, _MAX_BACKOFF_EXP)
            st.skip = 2 ** st.misses - 1
        else:
            st.misses = 0
        self.proposer.accepted(seq_id, num_drafted, num_accepted)

    def release(self, seq_ids: Sequence[int]) -> None:
        """These sequences ended or were preempted: forget their state (and the proposer's)."""
        for sid in seq_ids:
            self._seqs.pop(sid, None)
            self.proposer.release(sid)

    def tracked(self) -> list[int]:
        """Sequence ids with state here (the engine releases the ones that are gone)."""
        return list(self._seqs)
