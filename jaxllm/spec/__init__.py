"""Speculative decoding: draft proposers and their configuration (see docs/spec.md).

* :mod:`jaxllm.spec.config` -- ``SpeculativeConfig`` (vLLM's ``speculative_config``).
* :mod:`jaxllm.spec.proposer` -- the ``Proposer`` interface and the registry by method.
* :mod:`jaxllm.spec.ngram` -- prompt lookup.
* :mod:`jaxllm.spec.rejection` -- on-device verification (greedy, rejection sampling).
* :mod:`jaxllm.spec.controller` -- ``Speculator``: adaptive k, load-aware switch, stats.
* :mod:`jaxllm.spec.head_proposer` -- draft heads as a proposer.
* :mod:`jaxllm.spec.heads` -- Medusa / EAGLE draft heads on the target's hidden states:
  parameter pytrees, the jittable ``propose`` and their save / load format.
"""
