"""`ShardedModel`: the Llama forward on a ``(data, pipeline, tensor)`` mesh.

One ``jax.shard_map`` over all three axes wraps the whole decoder (embedding ->
layers -> final norm), so every collective is written out and countable:

* tensor: vocab-parallel embedding (1 all-reduce), then per layer 2 all-reduces
  (after o_proj, after down) -- :mod:`sharding.tensor_parallel`;
* pipeline: the GPipe schedule of :mod:`sharding.pipeline` (``ppermute`` between
  stages, one masked ``psum`` at the end to hand the hidden states to every stage);
* data: nothing -- each replica runs its slice of the batch.

Attention (XLA or the Pallas kernels) runs per shard on local heads and local rows.
The LM head and the sampler run outside the ``shard_map`` under GSPMD: logits stay
vocab-sharded ``[B@data, V@tensor]``; argmax / softmax reduce locally and exchange
only per-row partials.

Parameter layout ("staged"): the per-layer weights are a *list over the layer index
within a stage*, each leaf carrying a leading ``[pp]`` axis sharded over ``pipeline``
(global layer ``s * L/pp + i`` is row ``s`` of entry ``i``).  Every device then holds
one buffer per layer, and a layer's weights are used in place (slicing a stacked
``[L, ...]`` array copies the slice on XLA:CPU).  The KV cache uses the same idea:
``caches[i][p] = (k [pp*dp*mb, Hkv, D, S], v [pp*dp*mb, Hkv, S, D])`` for layer ``i``
of each stage and microbatch position ``p``, rows sharded over ``(pipeline, data)`` so
each device's block is the ``[mb, Hkv/tp, D, S]`` its attention reads and updates in place.

``jaxllm.generation`` runs it when given ``model=``: it calls :meth:`forward`,
:meth:`lm_head`, :meth:`empty_caches` and :meth:`pad_batch`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxllm.attention import attention
from jaxllm.config import ModelConfig
from jaxllm.models import llama
from sharding import pipeline, rules, tensor_parallel
from sharding.mesh import DATA, TENSOR

# An attention step with explicit per-row inputs: attend(rows, q, k, v, cache) -> (out, cache).
# ``rows`` is a dict of arrays whose leading axis is the batch; the model slices it per
# data shard and per microbatch.  Everything else the function uses must be replicated.
RowAttendFn = Callable[[dict, jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, Any]]


@dataclasses.dataclass(frozen=True)
class ShardedModel:
    """A model config laid out on a mesh.  Hashable: pass it as a static jit argument."""

    mesh: Mesh
    plan: rules.Plan
    microbatches: int | None = None  # pipeline microbatches per forward (default: pp)

    # ------------------------------------------------------------------ shapes
    @property
    def cfg(self) -> ModelConfig:
        return self.plan.cfg

    @property
    def dp(self) -> int:
        return self.plan.dp

    @property
    def tp(self) -> int:
        return self.plan.tp

    @property
    def pp(self) -> int:
        return self.plan.pp

    @property
    def layers_per_stage(self) -> int:
        return self.cfg.num_layers // self.pp

    def pad_batch(self, batch: int) -> int:
        """Smallest padded batch >= ``batch`` that splits evenly over the data replicas."""
        return -(-batch // self.dp) * self.dp

    def num_microbatches(self, batch: int) -> int:
        if batch % self.dp:
            raise ValueError(f"batch {batch} is not divisible by dp={self.dp} "
                             "(pad it with ShardedModel.pad_batch)")
        return pipeline.choose_microbatches(batch // self.dp, self.pp, self.microbatches)

    def bubble_fraction(self, batch: int) -> float:
        return pipeline.bubble_fraction(self.pp, self.num_microbatches(batch))

    # ------------------------------------------------------------------ params
    def logical_axes(self) -> dict[str, Any]:
        """Logical axes of the staged parameter layout (layer entries lead with ``layers``)."""
        axes = rules.logical_axes(self.cfg)
        return {**axes, "layers": [axes["layers"]] * self.layers_per_stage}

    def param_specs(self, params: Any = None) -> dict[str, Any]:
        """PartitionSpecs of the staged layout; parallel to ``params`` when given (a
        quantized weight gets one spec per stored child: ``rules.leaf_axes``)."""
        if params is not None:
            return rules.specs_for(self.plan, self.logical_axes(), params)
        return jax.tree.map(self.plan.spec, self.logical_axes(), is_leaf=rules._is_axes)

    def param_shardings(self, params: Any = None) -> dict[str, Any]:
        return jax.tree.map(lambda s: NamedSharding(self.mesh, s), self.param_specs(params),
                            is_leaf=lambda x: isinstance(x, P))

    def place(self, params: dict[str, Any]) -> dict[str, Any]:
        """Host params (stacked or per-layer list, numpy or jax) -> staged global arrays,
        each device's shard cut straight from the host arrays."""
        return rules.place_params(params, self.cfg, self.mesh, self.plan, layout="staged")

    # ------------------------------------------------------------------ caches
    def cache_specs(self) -> tuple[P, P]:
        return self.plan.spec(rules.CACHE_K_AXES), self.plan.spec(rules.CACHE_V_AXES)

    def paged_cache_spec(self, quantized: bool = False) -> tuple[P, ...]:
        """Specs of a paged pool ``(k_pages, v_pages)`` ``[pages, page, Hkv, D]`` (the
        layout of ``jaxllm.attention.write_kv_pages``): kv heads over ``tensor``, one pool
        per (stage, replica) stacked on the page axis.  Size pools with
        ``plan.model_cfg.num_kv_heads`` (kv heads may be repeated for tp).  ``quantized``:
        an int8 pool, with its ``(k_scales, v_scales)`` ``[pages, page, Hkv]`` after."""
        spec = self.plan.spec(("stage_batch", None, "kv_heads", "head_dim"))
        if not quantized:
            return spec, spec
        scales = self.plan.spec(("stage_batch", None, "kv_heads"))
        return spec, spec, scales, scales

    def empty_caches(self, cfg: ModelConfig, batch: int, cache_len: int, dtype: Any):
        """Zeroed KV caches for a padded ``batch``, created sharded (call inside jit)."""
        m = self.num_microbatches(batch)
        mb = batch // self.dp // m
        c = self.plan.model_cfg
        k_spec, v_spec = self.cache_specs()
        k_shape = (self.pp * self.dp * mb, c.num_kv_heads, c.head_dim, cache_len)
        v_shape = (self.pp * self.dp * mb, c.num_kv_heads, cache_len, c.head_dim)

        def zeros(shape, spec):
            return jax.lax.with_sharding_constraint(jnp.zeros(shape, dtype),
                                                    NamedSharding(self.mesh, spec))

        return [[(zeros(k_shape, k_spec), zeros(v_shape, v_spec)) for _ in range(m)]
                for _ in range(self.layers_per_stage)]

    # ------------------------------------------------------------------ forward
    def forward(self, params: dict[str, Any], cfg: ModelConfig, tokens: jax.Array,
                positions: jax.Array, attend: RowAttendFn, rows: dict[str, jax.Array] | None,
                caches: Any = None, cache_spec: Any = None) -> tuple[jax.Array, Any]:
        """``tokens, positions [B, T]`` -> (final-normed hidden ``[B, T, D]``, caches).

        Same contract as ``llama.forward`` except that attention is
        ``attend(rows, q, k, v, cache)`` with the per-row arrays passed explicitly.

        ``caches``: ``caches[i][p]`` for layer ``i`` of each stage and microbatch position
        ``p`` (see :meth:`empty_caches`).  ``cache_spec``: the PartitionSpec pytree of one
        ``caches[i][p]`` when it is not the dense ``(k, v)`` of :meth:`empty_caches` --
        e.g. a paged pool ``(k_pages, v_pages)`` ``[pages, page, Hkv, D]`` with
        :meth:`paged_cache_spec`; each device then gets its own block of it."""
        if cfg != self.cfg:
            raise ValueError("ShardedModel.forward: cfg differs from the config it was built for")
        b, t = tokens.shape
        m = self.num_microbatches(b)
        cos, sin = llama.rope_cos_sin(self.plan.model_cfg, positions)  # global (dynamic NTK)
        rows = {**(rows or {}), "_cos": cos, "_sin": sin}

        def row_spec(x):
            return P(DATA, *([None] * (x.ndim - 1)))

        one = self.cache_specs() if cache_spec is None else cache_spec
        cache_spec = (None if caches is None else
                      [[one] * m for _ in range(self.layers_per_stage)])
        fn = jax.shard_map(
            functools.partial(self._local_forward, attend=attend, microbatches=m),
            mesh=self.mesh,
            in_specs=(self.param_specs(params), P(DATA, None), jax.tree.map(row_spec, rows),
                      cache_spec),
            out_specs=(P(DATA, None, None), cache_spec),
            check_vma=False)
        return fn(params, tokens, rows, caches)

    def _local_forward(self, params, tokens, rows, caches, *, attend, microbatches):
        cfg = self.plan.local_cfg
        m = microbatches
        b, t = tokens.shape
        with jax.named_scope("embed"):
            x = tensor_parallel.vocab_parallel_embed(
                params["embed"], tokens, self.tp if self.plan.vocab_sharded else 1)
        mb = b // m
        xs = x.reshape(m, mb, t, x.shape[-1])
        rows_mb = jax.tree.map(lambda a: a.reshape(m, mb, *a.shape[1:]), rows)
        layers = params["layers"]
        n = self.layers_per_stage
        tp = self.tp

        def stage_fn(x, j, cache_pos):
            r = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, j, 0, False), rows_mb)
            cos, sin = r.pop("_cos"), r.pop("_sin")
            att = functools.partial(attend, r)
            new = []
            for i in range(n):
                lp = {k: w[0] for k, w in layers[i].items()}  # [1, ...] -> [...]: a bitcast
                c = None if cache_pos is None else cache_pos[i]
                with jax.named_scope(f"layer_{i}"):
                    x, c = tensor_parallel.layer(cfg, lp, x, cos, sin, c, att, tp)
                new.append(c)
            return x, (None if cache_pos is None else new)

        by_pos = [None] * m if caches is None else [[caches[i][p] for i in range(n)]
                                                     for p in range(m)]
        ys, by_pos = pipeline.gpipe(stage_fn, xs, by_pos, self.pp)
        x = ys.reshape(b, t, ys.shape[-1])
        with jax.named_scope("final_norm"):
            x = llama.rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
        if caches is not None:
            caches = [[by_pos[p][i] for p in range(m)] for i in range(n)]
        return x, caches

    def lm_head(self, params: dict[str, Any], cfg: ModelConfig, hidden: jax.Array) -> jax.Array:
        """Float32 logits, vocab-parallel: ``[B@data, V@tensor]`` (GSPMD)."""
        out = llama.lm_head(params, cfg, hidden)
        spec = P(DATA, *([None] * (out.ndim - 2)), TENSOR if self.plan.vocab_sharded else None)
        return jax.lax.with_sharding_constraint(out, NamedSharding(self.mesh, spec))

    # ------------------------------------------------------------------ no-cache scoring
    def logits(self, params: dict[str, Any], tokens: jax.Array, segment_ids: jax.Array | None = None,
               attn_impl: str = "auto") -> jax.Array:
        """Full-sequence float32 logits ``[B, T, V]`` (no cache).  Rows are padded to a
        multiple of dp (and cut off again)."""
        b = tokens.shape[0]
        pad = self.pad_batch(b) - b
        if pad:
            tokens = jnp.concatenate([tokens, jnp.zeros((pad, tokens.shape[1]), tokens.dtype)])
            if segment_ids is not None:
                segment_ids = jnp.concatenate(
                    [segment_ids, jnp.ones((pad, segment_ids.shape[1]), segment_ids.dtype)])
        out = _logits(params, tokens, segment_ids, model=self, impl=attn_impl)
        return out[:b] if pad else out


def _full_attend(cfg: ModelConfig, impl: str) -> RowAttendFn:
    def attend(rows, q, k, v, cache):
        out = attention(q, k, v, causal=True, segment_ids=rows.get("segment_ids"),
                        sliding_window=cfg.sliding_window, impl=impl)
        return out, cache

    return attend


@functools.partial(jax.jit, static_argnames=("model", "impl"))
def _logits(params, tokens, segment_ids, *, model: ShardedModel, impl: str):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    rows = {} if segment_ids is None else {"segment_ids": segment_ids}
    hidden, _ = model.forward(params, model.cfg, tokens, positions,
                              _full_attend(model.cfg, impl), rows)
    return model.lm_head(params, model.cfg, hidden)


def paged_forward(model: ShardedModel, params: dict[str, Any], cfg: ModelConfig,
                  tokens: jax.Array, positions: jax.Array, pools: list[Any],
                  attend_pages: Callable) -> tuple[jax.Array, list[Any]]:
    """The paged engine's forward on a mesh: a drop-in for the unstacked path of
    ``jaxllm.engine.step._forward``.

    ``tokens, positions [1, N]`` (the engine's flat ragged batch; no data split -- run
    one engine per data replica on ``data_parallel.replica_meshes``).  ``pools``: one
    ``(k_pages, v_pages)`` per layer *within a stage* (``L/pp`` entries), each
    ``[pp * P, page, Hkv', D]`` with :meth:`ShardedModel.paged_cache_spec` (stage ``s``
    owns pages ``[s*P, (s+1)*P)``; ``Hkv' = model.plan.model_cfg.num_kv_heads``), plus
    the scales ``[pp * P, page, Hkv']`` of an int8 pool.
    ``attend_pages(q, k, v, (k_pages, v_pages), 0) -> (out, (k_pages, v_pages))`` runs
    per shard on its local kv heads and pages; whatever it closes over (block tables, slot
    mapping, lengths) must be replicated.  Returns (hidden ``[1, N, D]``, pools).
    """
    if model.dp != 1:
        raise ValueError("paged_forward runs one engine replica: build it on a dp=1 mesh "
                         "(sharding.data_parallel.replica_meshes)")

    def attend(rows, q, k, v, cache):
        return attend_pages(q, k, v, cache, 0)

    caches = [[p] for p in pools]  # one microbatch position: the batch is [1, N]
    hidden, caches = model.forward(params, cfg, tokens, positions, attend, {}, caches,
                                   cache_spec=model.paged_cache_spec(len(pools[0]) == 4))
    return hidden, [c[0] for c in caches]
