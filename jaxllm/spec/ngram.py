"""Prompt-lookup (n-gram) proposer: draft the tokens that followed the sequence's last
n-gram the last time it occurred in its own prompt and output.

No model and no device work: for input-grounded requests (summarise, rewrite, edit a
given passage) the output copies long spans of the prompt, and the continuation of the
latest matching n-gram is often exactly what the target produces next.  Drafts are
deterministic, so the draft distribution is a point mass (``Draft.probs`` None).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from jaxllm.spec.config import SpeculativeConfig
from jaxllm.spec.proposer import Draft, DraftRequest, TargetModel, register_proposer

__all__ = ["NgramProposer", "lookup"]


def lookup(token_ids: Sequence[int], k: int, min_n: int, max_n: int) -> tuple[int, ...]:
    """Up to ``k`` tokens that followed the most recent earlier occurrence of the
    sequence's last ``n`` tokens, trying ``n = max_n .. min_n`` (longest first: a longer
    match predicts better); ``()`` when none occurs."""
    arr = np.asarray(token_ids, np.int64)
    size = len(arr)
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        windows = sliding_window_view(arr[:-1], n)  # starts 0 .. size-1-n: not the suffix
        hits = np.flatnonzero((windows == arr[size - n:]).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return tuple(int(t) for t in arr[start:start + k])
    return ()


class NgramProposer:
    """Prompt lookup over each sequence's own tokens (stateless)."""

    method = "ngram"

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n
        self.lookup_n = min_n  # a draft exists iff the last min_n tokens occurred before

    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft | None]:
        out: list[Draft | None] = []
        for r in requests:
            ids = lookup(r.token_ids, r.num_tokens, self.min_n, self.max_n)
            out.append(Draft(ids) if ids else None)
        return out

    def accepted(self, seq_id: int, num_drafted: int, num_accepted: int) -> None:
        pass  # stateless

    def release(self, seq_id: int) -> None:
        pass  # stateless


def _build(config: SpeculativeConfig, target: TargetModel) -> NgramProposer:
    return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)


register_proposer("ngram", _build)
