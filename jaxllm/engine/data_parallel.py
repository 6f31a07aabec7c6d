"""Data parallelism for the engine: one :class:`LLMEngine` per replica of the ``data`` axis.

Each replica owns a ``(1, pp, tp)`` sub-mesh (``sharding.data_parallel.replica_meshes``),
its own page pool, allocator and scheduler; requests are spread over the replicas
(longest-first greedy on ``prompt + max_tokens``, ``sharding.data_parallel
.partition_requests``) and results gathered back in prompt order.  Replicas never
synchronise: each runs its engine loop in its own thread (XLA releases the GIL while a
step runs), so a long request on one replica does not hold up the others.

The replicas' weights are *views* of the parameters placed on the whole mesh (which
replicates them over ``data``): each replica's arrays are assembled from the shards its
devices already hold, so nothing is copied.

Single process only: in a multi-process job the replicas' results would have to be
gathered across hosts; ``jaxllm.LLM`` runs the static-batch path there.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence

import jax
from jax.sharding import NamedSharding

from jaxllm.config import ModelConfig
from jaxllm.engine.config import EngineConfig
from jaxllm.engine.engine import LLMEngine
from jaxllm.outputs import RequestOutput
from jaxllm.sampling import SamplingParams, per_prompt

__all__ = ["DataParallelEngine", "replica_params"]


def replica_params(params: Any, model: Any, replica_model: Any) -> Any:
    """Views of ``params`` (placed by ``model`` on the whole mesh) on one replica's
    sub-mesh: every array re-assembled from the shards on the replica's devices."""
    specs = replica_model.param_specs(params)
    devices = list(replica_model.mesh.devices.flat)

    def view(a: jax.Array, spec) -> jax.Array:
        by_dev = {s.device: s.data for s in a.addressable_shards}
        missing = [d for d in devices if d not in by_dev]
        if missing:
            raise ValueError(f"replica devices {missing} hold no shard of a parameter "
                             "(not addressable from this process)")
        sharding = NamedSharding(replica_model.mesh, spec)
        return jax.make_array_from_single_device_arrays(a.shape, sharding,
                                                        [by_dev[d] for d in devices])

    return jax.tree.map(view, params, specs)


class DataParallelEngine:
    """``dp`` independent engine replicas behind one ``generate``.

    Build it with :meth:`create` from a ``sharding.ShardedModel`` with ``dp > 1`` and the
    parameters it placed.  ``engines[i]`` is replica ``i`` (an :class:`LLMEngine` on a
    ``(1, pp, tp)`` mesh), usable directly, e.g. to stream one request.
    """

    def __init__(self, engines: Sequence[LLMEngine]) -> None:
        if not engines:
            raise ValueError("DataParallelEngine needs at least one engine")
        self.engines = list(engines)

    @classmethod
    def create(cls, model: Any, params: Any, cfg: ModelConfig, *, tokenizer=None,
               eos_token_ids: Sequence[int] | None = None,
               config: EngineConfig | None = None, **kwargs: Any) -> "DataParallelEngine":
        """One engine per data replica of ``model``'s mesh.  Replica ``i`` seeds its
        unseeded requests from ``config.seed + i`` (distinct streams, reproducible)."""
        from sharding.data_parallel import replica_meshes
        from sharding.model import ShardedModel

        if jax.process_count() > 1:
            raise ValueError("DataParallelEngine runs in a single process; a multi-process "
                             "job runs the static-batch path (jaxllm.LLM does this)")
        config = EngineConfig.resolve(cfg, config, **kwargs)
        plan = dataclasses.replace(model.plan, dp=1)
        engines = []
        for i, mesh in enumerate(replica_meshes(model.mesh)):
            sub = ShardedModel(mesh=mesh, plan=plan, microbatches=model.microbatches)
            eng = LLMEngine(replica_params(params, model, sub), cfg, tokenizer=tokenizer,
                            eos_token_ids=eos_token_ids,
                            config=dataclasses.replace(config, seed=config.seed + i), model=sub)
            eng.request_id_prefix = f"dp{i}-req"
            engines.append(eng)
        return cls(engines)

    @property
    def dp(self) -> int:
        return len(self.engines)

    @property
    def config(self) -> EngineConfig:
        return self.engines[0].config

    @property
    def num_preemptions(self) -> int:
        return sum(e.num_preemptions for e in self.engines)

    @property
    def num_unfinished_requests(self) -> int:
        return sum(e.num_unfinished_requests for e in self.engines)

    def least_loaded(self) -> LLMEngine:
        """The replica with the fewest unfinished requests (lowest index on ties)."""
        return min(self.engines, key=lambda e: e.num_unfinished_requests)

    def generate(self, prompts: Sequence[str | Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 *, prompt_token_ids: Sequence[Sequence[int] | None] | None = None
                 ) -> list[RequestOutput]:
        """``LLMEngine.generate`` over the replicas: outputs in prompt order.  Every
        request is validated (by replica 0) before any replica starts."""
        from sharding.data_parallel import gather_results, partition_requests

        n = len(prompts)
        sps = per_prompt(sampling_params, n)
        ids = list(prompt_token_ids) if prompt_token_ids is not None else [None] * n
        first = self.engines[0]
        lens = []
        try:  # every request is checked before any replica runs (preparing changes nothing)
            for i, (p, sp, tok) in enumerate(zip(prompts, sps, ids)):
                prepared = first.prepare_request(f"_check-{i}", p, sp, prompt_token_ids=tok)
                lens.append(len(prepared.prompt_ids))
                if isinstance(p, str) and tok is None:  # tokenize once
                    ids[i] = prepared.prompt_ids
        except (ValueError, TypeError) as e:
            raise type(e)(f"prompt {i}: {e}") from None

        def cost(i: int) -> float:
            sp = sps[i]
            return (lens[i] + sp.max_tokens) * max(sp.n, sp.best_of or sp.n)

        parts = partition_requests(list(range(n)), self.dp, cost=cost)

        def run(k: int) -> list[RequestOutput]:
            part = parts[k]
            if not part:
                return []
            return self.engines[k].generate([prompts[i] for i in part], [sps[i] for i in part],
                                            prompt_token_ids=[ids[i] for i in part])

        with ThreadPoolExecutor(self.dp, thread_name_prefix="jaxllm-dp") as ex:
            results = [f.result() for f in [ex.submit(run, k) for k in range(self.dp)]]
        return gather_results(parts, results)
