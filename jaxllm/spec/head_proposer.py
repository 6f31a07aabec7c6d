"""Draft-head proposer: Medusa / EAGLE heads (:mod:`jaxllm.spec.heads`) in the engine.

The heads read the target's final hidden state at the position that produced each
sequence's last token (``DraftRequest.hidden``: the engine's runner returns it with the
sampled ids when the proposer sets ``needs_hidden``) and that token, and draft ``k``
tokens in one jitted call for the whole batch (rows padded to a power of two, so a run
compiles a handful of programs).  Drafts are greedy (a point mass per token): whatever
the request's temperature, rejection sampling keeps the output distribution exact, and a
seeded request's drafts do not depend on the batch it runs in.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.spec import heads
from jaxllm.spec.config import SpeculativeConfig
from jaxllm.spec.proposer import Draft, DraftRequest, TargetModel, register_proposer

__all__ = ["HeadProposer"]


class HeadProposer:
    """Medusa or EAGLE heads loaded from ``SpeculativeConfig.model``."""

    needs_hidden = True

    def __init__(self, config: SpeculativeConfig, target: TargetModel) -> None:
        self.hcfg, params = heads.load_heads(config.model, target.cfg)
        if self.hcfg.method != config.method:
            raise ValueError(f"{config.model} holds {self.hcfg.method} heads, the "
                             f"speculative_config asks for {config.method!r}")
        self.method = config.method
        self.k = config.num_speculative_tokens
        if self.method == "medusa" and self.k > self.hcfg.num_heads:
            raise ValueError(f"num_speculative_tokens={self.k} exceeds the {self.hcfg.num_heads} "
                             f"Medusa heads in {config.model}")
        self.params = jax.device_put(params)
        self.target_params = target.params
        self._propose = jax.jit(heads.propose, static_argnames=("cfg", "k"))

    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft | None]:
        if not requests:
            return []
        n = len(requests)
        rows = 1 << (n - 1).bit_length()  # pad the batch: few distinct shapes
        hidden = np.zeros((rows, self.hcfg.hidden_size), np.float32)
        last = np.zeros(rows, np.int32)
        for i, r in enumerate(requests):
            hidden[i], last[i] = r.hidden, r.token_ids[-1]
        tokens, _ = self._propose(self.params, self.target_params, self.hcfg,
                                  jnp.asarray(hidden), jnp.asarray(last), self.k)
        tokens = np.asarray(tokens)
        return [Draft(tuple(int(t) for t in tokens[i, :r.num_tokens])) for i, r in
                enumerate(requests)]

    def accepted(self, seq_id: int, num_drafted: int, num_accepted: int) -> None:
        pass  # no per-sequence state: the hidden state carries the context

    def release(self, seq_id: int) -> None:
        pass


def _build(config: SpeculativeConfig, target: TargetModel) -> HeadProposer:
    return HeadProposer(config, target)


register_proposer("medusa", _build)
register_proposer("eagle", _build)
