"""Megatron tensor parallelism, written per shard (runs inside ``jax.shard_map``).

Every function here sees only its own shard: q/k/v and gate/up weights hold this
shard's heads / intermediate features (column-parallel), o_proj and down hold the
matching input rows (row-parallel) and produce partial sums.  So each layer needs
exactly two all-reduces over ``tensor`` -- after o_proj and after down -- and the
attention kernel (XLA or Pallas) runs unchanged on the local heads.

:func:`layer` mirrors ``jaxllm.models.llama.decoder_layer`` line for line, with the two
``psum`` calls added; it reuses the model's own ``linear`` / ``rms_norm`` /
``apply_rope`` so adapters and quantized weights hooked into ``linear`` keep working.
``tests/test_sharding.py::test_tp1_layer_matches_llama`` fails if the two drift apart.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig
from jaxllm.models import llama
from sharding.mesh import TENSOR


def all_reduce(x: jax.Array, tp: int, axis: str = TENSOR) -> jax.Array:
    """Sum partial results over the tensor axis (nothing to do when tp == 1)."""
    return jax.lax.psum(x, axis) if tp > 1 else x


def vocab_parallel_embed(table: jax.Array, tokens: jax.Array, tp: int,
                         axis: str = TENSOR) -> jax.Array:
    """Embedding lookup with the table split by vocab rows: each shard looks up the
    ids it owns, writes zeros for the rest, and one all-reduce assembles the rows
    (exact: exactly one shard contributes each row)."""
    if tp == 1:
        return table[tokens]
    rows = table.shape[0]
    local = tokens - jax.lax.axis_index(axis) * rows
    mine = (local >= 0) & (local < rows)
    x = jnp.where(mine[..., None], table[jnp.clip(local, 0, rows - 1)], 0).astype(table.dtype)
    return jax.lax.psum(x, axis)


def layer(cfg: ModelConfig, lp: dict[str, Any], x: jax.Array, cos: jax.Array, sin: jax.Array,
          layer_cache: Any, attend: Callable, tp: int) -> tuple[jax.Array, Any]:
    """One decoder layer on one tensor shard.  ``cfg`` is the *local* config (heads,
    kv heads and intermediate size already divided by tp); ``x`` is replicated."""
    b, t, _ = x.shape
    hd = cfg.head_dim
    with jax.named_scope("attention"):
        with jax.named_scope("norm"):
            h = llama.rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
        with jax.named_scope("qkv_proj"):
            q, k, v = llama.linear(h, lp, "wq"), llama.linear(h, lp, "wk"), llama.linear(h, lp, "wv")
            if cfg.attention_bias:
                q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
        with jax.named_scope("rope"):
            q = llama.apply_rope(q.reshape(b, t, cfg.num_heads, hd), cos, sin)
            k = llama.apply_rope(k.reshape(b, t, cfg.num_kv_heads, hd), cos, sin)
        v = v.reshape(b, t, cfg.num_kv_heads, hd)
        with jax.named_scope("attend"):
            out, layer_cache = attend(q, k, v, layer_cache)
        with jax.named_scope("o_proj"):
            o = llama.linear(out.reshape(b, t, cfg.num_heads * hd).astype(x.dtype), lp, "wo")
            x = x + all_reduce(o, tp)
    with jax.named_scope("mlp"):
        with jax.named_scope("norm"):
            h = llama.rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
        m = llama.linear(jax.nn.silu(llama.linear(h, lp, "w_gate")) * llama.linear(h, lp, "w_up"),
                         lp, "w_down")
        x = x + all_reduce(m, tp)
    return x, layer_cache
