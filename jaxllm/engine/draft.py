"""The draft-model proposer: a smaller model (``draft_model``) drafting through a second
engine with its own small page pool.  (Early exit drafts inside the target's own step:
:mod:`jaxllm.spec.early_exit`.)

Each round the drafts of every speculating sequence come from ONE ``generate`` call on
the draft engine: a request per sequence whose prompt is the sequence's tokens and whose
``max_tokens`` is its ``k``, greedy (so the draft distribution is a point mass and the
target's rejection sampling stays exact at any temperature).  The draft engine keeps
prefix caching on, so its KV stays in step with the target's without any bookkeeping of
its own: the full pages of a sequence's accepted tokens are cache hits in the next round
and only the tail (under a page, plus the newly accepted tokens) is recomputed, in the
same mixed step that starts the draft; the remaining ``k - 1`` tokens run as one
multi-token decode dispatch.  Rejected draft tokens never enter the cache (only full,
computed pages of a finished request's tokens are hashed, and a draft request's pages
hold the draft's own guesses only past the accepted prefix).

This module lives in the engine package because it runs an :class:`LLMEngine`; the
proposer registry (:mod:`jaxllm.spec.proposer`) imports it by name.
"""

from __future__ import annotations

from typing import Sequence

import jax

from jaxllm.engine.config import EngineConfig
from jaxllm.engine.engine import LLMEngine
from jaxllm.models import llama
from jaxllm.sampling import SamplingParams
from jaxllm.spec.config import SpeculativeConfig, check_draft_vocab
from jaxllm.spec.proposer import Draft, DraftRequest, TargetModel, register_proposer
from jaxllm.weights import load_model

__all__ = ["EngineDraftProposer"]


class EngineDraftProposer:
    """Greedy drafts from a second engine over ``params`` / ``cfg`` (see the module doc)."""

    def __init__(self, method: str, params, cfg, target: TargetModel) -> None:
        check_draft_vocab(target.cfg.vocab_size, cfg.vocab_size)
        if cfg.max_position_embeddings < target.max_model_len:
            raise ValueError(f"the draft model handles {cfg.max_position_embeddings} "
                             f"positions, the target's max_model_len is {target.max_model_len}")
        self.method = method
        config = EngineConfig(max_model_len=target.max_model_len, page_size=target.page_size,
                              num_pages=target.num_pages, max_num_seqs=target.max_num_seqs,
                              max_num_batched_tokens=target.max_num_batched_tokens,
                              enable_prefix_caching=True, attention_impl=target.attention_impl)
        self.engine = LLMEngine(params, cfg, eos_token_ids=(), config=config)

    def propose(self, requests: Sequence[DraftRequest]) -> list[Draft | None]:
        if not requests:
            return []
        sps = [SamplingParams(temperature=0.0, max_tokens=r.num_tokens, ignore_eos=True)
               for r in requests]
        outs = self.engine.generate([list(r.token_ids) for r in requests], sps)
        return [Draft(tuple(o.outputs[0].token_ids)) for o in outs]

    def accepted(self, seq_id: int, num_drafted: int, num_accepted: int) -> None:
        pass  # the draft engine's prefix cache follows the accepted tokens

    def release(self, seq_id: int) -> None:
        pass  # draft requests end with each round; their cached pages age out (LRU)


def _build_draft_model(config: SpeculativeConfig, target: TargetModel) -> EngineDraftProposer:
    loaded = load_model(config.model, dtype=target.dtype)
    check_draft_vocab(target.cfg.vocab_size, loaded.config.vocab_size)
    params = jax.device_put(llama.fuse_projections(llama.unstack_layers(loaded.params)))
    return EngineDraftProposer("draft_model", params, loaded.config, target)


register_proposer("draft_model", _build_draft_model)
