"""Self-speculative early exit: the target's first ``n`` layers, its final norm and its LM
head draft, inside the verify step, over the target's own page pool.

There is no second model and no second cache.  The engine schedules a verify of ``k``
draft slots per speculating sequence (the proposer only says how many: its drafts are
placeholders), and the step (:func:`jaxllm.engine.step.paged_step`) first runs ``k``
greedy passes of the first ``n`` layers over those slots -- each pass writes the shared
layers' K/V of one draft position into the sequence's own pages and attends the
target's K/V of everything before it -- then feeds the drafts to the full model in the
same dispatch and verifies them.  The verify rewrites the shared layers' K/V at the
verified positions with the same values (same tokens, same layers) and computes the
remaining layers; rejected positions are truncated like any verify's.

Drafts are greedy (a point mass), so rejection sampling keeps the target's distribution
at any temperature.  ``early_exit_layers`` defaults to a quarter of the target's layers.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax

from jaxllm.spec.config import SpeculativeConfig
from jaxllm.spec.proposer import Draft, DraftRequest, TargetModel, register_proposer

__all__ = ["EarlyExitProposer", "early_exit_params"]


def early_exit_params(params, cfg, num_layers: int):
    """``(params, cfg)`` of the target's first ``num_layers`` layers + final norm + LM
    head: the same arrays for per-layer weights (a list), a slice of stacked ``[L, ...]``
    ones."""
    if not 1 <= num_layers < cfg.num_layers:
        raise ValueError(f"early_exit_layers must be in [1, {cfg.num_layers - 1}] for a "
                         f"{cfg.num_layers}-layer target, got {num_layers}")
    layers = params["layers"]
    if isinstance(layers, dict):
        layers = jax.tree.map(lambda w: w[:num_layers], layers)
    else:
        layers = list(layers[:num_layers])
    return {**params, "layers": layers}, dataclasses.replace(cfg, num_layers=num_layers)


class EarlyExitProposer:
    """Sizes each sequence's draft; the step fills it in (see the module docstring)."""

    method = "early_exit"

    def __init__(self, num_layers: int) -> None:
        self.draft_layers = num_layers  # the engine's cue: draft inside the step

    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft]:
        return [Draft((0,) * r.num_tokens) for r in requests]  # placeholders, filled on device

    def accepted(self, seq_id: int, num_drafted: int, num_accepted: int) -> None:
        pass

    def release(self, seq_id: int) -> None:
        pass


def _build(config: SpeculativeConfig, target: TargetModel) -> EarlyExitProposer:
    n = config.early_exit_layers or max(1, target.cfg.num_layers // 4)
    early_exit_params(target.params, target.cfg, n)  # checks n
    return EarlyExitProposer(n)


register_proposer("early_exit", _build)
