"""The proposer interface: what a draft method gives the engine, and what it gets back.

Each engine step, before scheduling, the engine lists the sequences that will decode and
asks the proposer for drafts::

    drafts = proposer.propose([DraftRequest(seq_id, token_ids, k, temperature, seed, step),
                               ...])        # one Draft (or None: no proposal) per request

* ``token_ids`` are the sequence's prompt + output tokens; the last one is not yet in
  the target's KV cache (the step feeds it, followed by the draft).
* A :class:`Draft` holds up to ``k`` token ids and, for a proposer that *samples* its
  drafts, ``probs [len(token_ids), V]``: the distribution each draft token was drawn from
  (the ``q`` of rejection sampling).  ``probs=None`` means each token was chosen
  deterministically (``q`` a point mass, e.g. prompt lookup or a greedy draft).
  ``probs`` may be a NumPy or a device (jax) array; the runner packs it into the step's
  ``[B, K, V]`` input (through the host, as every step input is packed today).
* The target verifies every draft in the same jitted step as the other requests' decodes
  and prefill chunks (one multi-token query per sequence, ``jaxllm.engine.step``) and
  keeps the longest accepted prefix plus one token of its own.  The proposer hears the
  outcome through :meth:`Proposer.accepted` (``num_accepted`` of the draft's tokens were
  kept), and :meth:`Proposer.release` when a sequence ends or is preempted (its state,
  e.g. a draft model's KV pages, can go).

A proposer is registered by method name in :data:`PROPOSERS` (see
:func:`register_proposer`); the engine builds it from the ``SpeculativeConfig`` and the
target (``build(config, target)`` with ``target`` a :class:`TargetModel`).  Proposers
that need the target's hidden states (Medusa / EAGLE heads) read them from
``TargetModel`` helpers they own; the engine itself knows only this interface.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, NamedTuple, Protocol, Sequence

__all__ = ["Draft", "DraftRequest", "PROPOSERS", "Proposer", "TargetModel",
           "build_proposer", "register_proposer"]


class DraftRequest(NamedTuple):
    """One sequence that may be speculated this step."""

    seq_id: int
    token_ids: Sequence[int]  # prompt + output; the last token is not in the KV cache yet
    num_tokens: int  # k: the most draft tokens wanted (>= 1)
    temperature: float = 0.0  # the request's (a sampling draft may follow it)
    seed: int = 0  # the request's seed (a sampling draft keeps runs reproducible)
    step: int = 0  # tokens the sequence has generated so far
    hidden: Any = None  # [D] float32 target state the last token was read from (needs_hidden)


class Draft(NamedTuple):
    """Proposed tokens for one sequence (``probs``: see the module docstring)."""

    token_ids: tuple[int, ...]
    probs: Any = None  # [len(token_ids), V] float32, or None: a point mass on each token


class Proposer(Protocol):
    """What the engine needs from a draft method.  A proposer with a true ``needs_hidden``
    attribute (draft heads) gets ``DraftRequest.hidden``: the target's final hidden
    state (the LM head's input) at the position that produced the sequence's last token;
    sequences without one yet (a fresh fork) are not offered to it that step.  A proposer
    with a ``lookup_n`` attribute (> 0) drafts exactly when a sequence's last
    ``lookup_n`` tokens occurred earlier in it (prompt lookup): the engine's multi-token
    decode then stops as soon as that happens, so the next step can verify.  A proposer
    with a ``draft_layers`` attribute (> 0, early exit) returns placeholder drafts of the
    wanted length: the verify step drafts them on device from the target's first
    ``draft_layers`` layers (:mod:`jaxllm.spec.early_exit`)."""

    method: str

    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft | None]:
        """One draft (at most ``num_tokens`` long; None or empty: no proposal) per request."""
        ...

    def accepted(self, seq_id: int, num_drafted: int, num_accepted: int) -> None:
        """The target kept ``num_accepted`` of the ``num_drafted`` tokens last proposed."""
        ...

    def release(self, seq_id: int) -> None:
        """The sequence finished or was preempted: drop any state held for it."""
        ...


class TargetModel(NamedTuple):
    """What a proposer may know of the target when it is built."""

    params: Any  # the target's parameter pytree (early exit, heads on hidden states)
    cfg: Any  # its ModelConfig
    max_model_len: int
    page_size: int
    attention_impl: str
    num_pages: int  # the target's pool (a draft engine sizes its own from it)
    max_num_seqs: int
    max_num_batched_tokens: int
    dtype: str  # the target's weight dtype


PROPOSERS: dict[str, Callable[[Any, TargetModel], Proposer]] = {}


def register_proposer(method: str, build: Callable[[Any, TargetModel], Proposer]) -> None:
    """Make ``method`` available: ``build(config, target)`` returns its proposer."""
    PROPOSERS[method] = build


# the module that registers each built-in method's proposer (imported on first use)
# (the draft-model proposer runs a second engine, so it lives in the engine package)
_MODULES = {"ngram": "jaxllm.spec.ngram", "draft_model": "jaxllm.engine.draft",
            "early_exit": "jaxllm.spec.early_exit", "medusa": "jaxllm.spec.head_proposer",
            "eagle": "jaxllm.spec.head_proposer"}


def build_proposer(config: Any, target: TargetModel) -> Proposer:
    """The proposer of ``config.method`` for ``target`` (its module registers it on
    import); ValueError when this installation has none for that method."""
    if config.method not in PROPOSERS and config.method in _MODULES:
        try:
            importlib.import_module(_MODULES[config.method])
        except ModuleNotFoundError as e:
            if e.name != _MODULES[config.method]:
                raise
    if config.method not in PROPOSERS:
        raise ValueError(f"speculative method {config.method!r} has no proposer here "
                         f"(available: {', '.join(sorted(PROPOSERS)) or 'none'})")
    return PROPOSERS[config.method](config, target)
