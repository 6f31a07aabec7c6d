"""Logical axis names for every parameter, ONE rules table mapping them to mesh axes,
and loading host weights straight into their shards.

Logical names (docs/design.md): ``embed`` (hidden D), ``vocab``, ``heads`` (q heads x
head_dim), ``kv_heads`` (kv heads x head_dim), ``mlp`` (intermediate F), ``layers``
(the stacked layer axis).  Activations and caches add ``batch``.

The rules give Megatron tensor parallelism: q/k/v and gate/up are column-parallel
(output features split by head / by F), o_proj and down are row-parallel (input
features split), embedding and LM head are vocab-parallel; the layer axis is split
into pipeline stages; the batch is split over data-parallel replicas.

Two documented exceptions, both decided in :func:`make_plan`:

* ``num_kv_heads`` not divisible by ``tp`` (e.g. 8 kv heads on tp=16, or 2 on tp=4):
  every kv head is repeated ``r`` times in ``wk``/``wv`` (and their biases) so the
  model becomes an equivalent GQA model with ``num_kv_heads * r`` kv heads that
  divide evenly -- each tensor shard then owns the kv head(s) its q heads read.
  ``r = lcm(Hkv, tp) / Hkv`` is the smallest such factor.  Per-device KV-cache
  memory is minimal (one copy per shard that needs it); total cache memory grows
  by ``r``.
* ``vocab_size`` not divisible by ``tp``: embedding and LM head are replicated over
  ``tensor`` (a warning says so) instead of padding the vocabulary.

Quantized weights (``jaxllm.quant.QuantizedArray``, ``W8A8Array``) shard like the float
weight they stand for: every stored child (codes, scales, offsets) is split on the same
logical axes (:func:`leaf_axes`), so a shard holds exactly the codes and scales of its
own rows and columns.  A row-parallel weight split inside one quantization group (e.g.
int8's single per-channel group) has its groups cut to the shard's length first, each
scale repeated: the same weight, exactly.  A row-parallel W8A8 weight run per shard takes
each token's activation scale as the maximum over the shards, as on one device
(:func:`fit_to_mesh`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxllm.config import ModelConfig
from jaxllm.models import llama
from jaxllm.quant import QuantizedArray, W8A8Array
from sharding.mesh import DATA, PIPELINE, TENSOR, mesh_shape

log = logging.getLogger(__name__)

# The one table: logical axis name -> mesh axis (None = replicated).
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": DATA,
    "stage_batch": (PIPELINE, DATA),   # KV-cache rows: one block per (stage, replica)
    "layers": PIPELINE,
    "vocab": TENSOR,
    "heads": TENSOR,
    "kv_heads": TENSOR,
    "mlp": TENSOR,
    "embed": None,
    "head_dim": None,
    "cache_seq": None,
    "seq": None,
}

# Layout of the KV cache arrays the sharded model creates (see sharding.model):
# k [pp*dp*mb, kv_heads, head_dim, seq], v [pp*dp*mb, kv_heads, seq, head_dim]: each
# device's block is exactly the [mb, Hkv/tp, D, S] the attention reads (no reshapes
# around the in-place cache update, which would make XLA copy the cache).
CACHE_K_AXES = ("stage_batch", "kv_heads", "head_dim", "cache_seq")
CACHE_V_AXES = ("stage_batch", "kv_heads", "cache_seq", "head_dim")


def logical_axes(cfg: ModelConfig) -> dict[str, Any]:
    """Logical axis names of every parameter: a pytree parallel to ``llama.param_shapes(cfg)``."""
    layers: dict[str, tuple[str, ...]] = {
        "attn_norm": ("layers", "embed"),
        "wq": ("layers", "embed", "heads"),
        "wk": ("layers", "embed", "kv_heads"),
        "wv": ("layers", "embed", "kv_heads"),
        "wo": ("layers", "heads", "embed"),
        "mlp_norm": ("layers", "embed"),
        "w_gate": ("layers", "embed", "mlp"),
        "w_up": ("layers", "embed", "mlp"),
        "w_down": ("layers", "mlp", "embed"),
    }
    if cfg.attention_bias:
        layers.update(bq=("layers", "heads"), bk=("layers", "kv_heads"), bv=("layers", "kv_heads"))
    axes: dict[str, Any] = {"embed": ("vocab", "embed"), "layers": layers,
                            "final_norm": ("embed",)}
    if not cfg.tie_word_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes


def _is_axes(x: Any) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)


def _is_quantized(x: Any) -> bool:
    return isinstance(x, (QuantizedArray, W8A8Array))


def _stored_axes(axes: tuple[str | None, ...], leaf: Any) -> tuple[str | None, ...]:
    """Axes of a quantized weight's stored matrix (``[..., N, K]`` when ``transposed``)."""
    return axes[:-2] + axes[-2:][::-1] if leaf.transposed else axes


def leaf_axes(axes: tuple[str | None, ...], leaf: Any) -> Any:
    """Logical axes of a parameter's arrays: ``axes`` for a float array; for a quantized
    weight the same node with each stored child's axes (a child with fewer dims, W8A8's
    per-row scales, drops the last)."""
    if not _is_quantized(leaf):
        return axes
    stored = _stored_axes(axes, leaf)
    return jax.tree.map(lambda child: stored[:len(np.shape(child))], leaf)


def specs_for(plan: "Plan", axes: Any, params: Any) -> Any:
    """PartitionSpecs parallel to ``params`` (quantized leaves as nodes of child specs)."""
    return jax.tree.map(lambda ax, leaf: jax.tree.map(plan.spec, leaf_axes(ax, leaf),
                                                      is_leaf=_is_axes),
                        axes, params, is_leaf=_is_axes)


# --------------------------------------------------------------------------- the plan

@dataclasses.dataclass(frozen=True)
class Plan:
    """How one model maps onto one ``(dp, pp, tp)`` mesh (validated by :func:`make_plan`)."""

    cfg: ModelConfig          # the model as loaded
    model_cfg: ModelConfig    # what the sharded model runs (kv heads repeated when needed)
    dp: int
    pp: int
    tp: int
    kv_repeat: int            # each kv head repeated this many times (1 = none)
    vocab_sharded: bool       # False: embedding / LM head replicated over "tensor"

    @property
    def rules(self) -> dict[str, str | tuple[str, ...] | None]:
        return RULES if self.vocab_sharded else {**RULES, "vocab": None}

    def spec(self, axes: tuple[str | None, ...]) -> P:
        rules = self.rules
        return P(*(None if a is None else rules[a] for a in axes))

    @property
    def local_cfg(self) -> ModelConfig:
        """The per-tensor-shard model: heads / kv heads divided by tp."""
        c = self.model_cfg
        return dataclasses.replace(c, num_heads=c.num_heads // self.tp,
                                   num_kv_heads=c.num_kv_heads // self.tp,
                                   intermediate_size=c.intermediate_size // self.tp)


def make_plan(cfg: ModelConfig, dp: int = 1, tp: int = 1, pp: int = 1) -> Plan:
    """Check that the mesh divides the model; work out the kv-head repeat and vocab rule."""
    problems = []
    if cfg.num_heads % tp:
        problems.append(f"num_heads={cfg.num_heads} is not divisible by tp={tp}")
    if cfg.intermediate_size % tp:
        problems.append(f"intermediate_size={cfg.intermediate_size} is not divisible by tp={tp}")
    if cfg.num_layers % pp:
        problems.append(f"num_layers={cfg.num_layers} is not divisible by pp={pp}")
    hkv = cfg.num_kv_heads
    r = 1 if hkv % tp == 0 else math.lcm(hkv, tp) // hkv
    if r > 1 and cfg.num_heads % (hkv * r):
        problems.append(
            f"num_kv_heads={hkv} does not divide over tp={tp}, and repeating kv heads "
            f"{r}x gives {hkv * r}, which does not divide num_heads={cfg.num_heads}")
    if problems:
        raise ValueError(f"the mesh (dp={dp}, pp={pp}, tp={tp}) does not fit the model: "
                         + "; ".join(problems))
    vocab_sharded = cfg.vocab_size % tp == 0
    if not vocab_sharded:
        log.warning("vocab_size=%d is not divisible by tp=%d: embedding and LM head are "
                    "replicated over the tensor axis", cfg.vocab_size, tp)
    model_cfg = cfg if r == 1 else dataclasses.replace(cfg, num_kv_heads=hkv * r)
    return Plan(cfg=cfg, model_cfg=model_cfg, dp=dp, pp=pp, tp=tp, kv_repeat=r,
                vocab_sharded=vocab_sharded)


def plan_for_mesh(cfg: ModelConfig, mesh: Mesh) -> Plan:
    dp, pp, tp = mesh_shape(mesh)
    return make_plan(cfg, dp=dp, tp=tp, pp=pp)


# --------------------------------------------------------------------------- shardings

def param_specs(cfg: ModelConfig, mesh_or_plan: Mesh | Plan, params: Any = None) -> dict[str, Any]:
    """PartitionSpec of every parameter (pytree parallel to ``llama.param_shapes``, or to
    ``params`` when given: quantized weights get one spec per stored child)."""
    plan = mesh_or_plan if isinstance(mesh_or_plan, Plan) else plan_for_mesh(cfg, mesh_or_plan)
    if params is not None:
        return specs_for(plan, logical_axes(cfg), params)
    return jax.tree.map(plan.spec, logical_axes(cfg), is_leaf=_is_axes)


def param_shardings(cfg: ModelConfig, mesh: Mesh, params: Any = None) -> dict[str, Any]:
    """NamedSharding of every parameter on ``mesh`` (parallel to ``params`` when given)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(cfg, mesh, params),
                        is_leaf=lambda x: isinstance(x, P))


def _mesh_split(plan: Plan, axis: str | None) -> int:
    """How many ways the mesh splits a dimension with logical name ``axis``."""
    mapped = plan.rules.get(axis) if axis is not None else None
    names = () if mapped is None else (mapped,) if isinstance(mapped, str) else mapped
    size = {DATA: plan.dp, PIPELINE: plan.pp, TENSOR: plan.tp}
    return math.prod(size[n] for n in names)


def fit_to_mesh(name: str, leaf: Any, axes: tuple[str | None, ...], plan: Plan,
                per_shard: bool = True) -> Any:
    """``leaf`` ready to be split on ``plan`` when the mesh splits its contraction axis
    (row-parallel projections).  A ``QuantizedArray`` split into pieces shorter than a
    group gets groups of one piece (scales and offsets repeated: the same weight); a
    ``W8A8Array`` run per shard (``per_shard``: inside ``shard_map``; under GSPMD the
    global view needs nothing) learns the mesh axis its activation scales reduce over.
    ValueError, naming the weight, when a piece is not a whole number of groups or cuts a
    packed byte / GGUF block."""
    if not _is_quantized(leaf):
        return leaf
    stored = _stored_axes(axes, leaf)
    if isinstance(leaf, W8A8Array):  # stored [.., N, K] or an embedding [V, D]: K is last
        split = _mesh_split(plan, stored[-1])
        return (leaf._replace(act_axis=plan.rules[stored[-1]]) if split > 1 and per_shard
                else leaf)
    split = _mesh_split(plan, stored[-2])
    k = leaf.stored_shape[-2]
    if split == 1:
        return leaf
    piece, g = k // split, leaf.group_size
    block = {"none": 1, "interleaved": 2, "gguf32": 32}[leaf.packing]
    if k % split or piece % block or (piece % g and g % piece):
        raise ValueError(
            f"quantized weight {name!r} cannot be split {split} ways along its input "
            f"dimension {k} (logical axis {stored[-2]!r}): pieces of {k / split:g} weights "
            f"do not hold whole groups of {g}" + (f" / {leaf.packing} blocks of {block}"
                                                  if block > 1 else "")
            + "; use fewer tensor shards or another group size")
    if piece % g == 0:
        return leaf
    r = g // piece  # each group becomes r groups of one piece, with the group's scale
    rep = lambda a: None if a is None else np.repeat(np.asarray(a), r, axis=-2)  # noqa: E731
    return leaf._replace(scales=rep(leaf.scales), offsets=rep(leaf.offsets), group_size=piece)


def global_param_shapes(plan: Plan) -> dict[str, Any]:
    """Parameter shapes as placed on the mesh (kv heads repeated ``plan.kv_repeat`` times)."""
    return llama.param_shapes(plan.model_cfg)


def _host_slicer(host: np.ndarray, axes: tuple[str | None, ...], kv_repeat: int, head_dim: int):
    """``index -> host data for that index`` of the (possibly kv-expanded) global array.

    Only the requested shard is materialised; a repeated kv head is gathered from its
    source head, never from a full expanded copy."""
    kv_dims = [i for i, a in enumerate(axes) if a == "kv_heads"] if kv_repeat > 1 else []

    def cb(index: tuple[slice, ...]) -> np.ndarray:
        if not kv_dims:
            return np.asarray(host[index])
        (dim,) = kv_dims
        rest = tuple(slice(None) if i == dim else s for i, s in enumerate(index))
        x = np.asarray(host[rest])
        n_src = x.shape[dim] // head_dim
        start, stop, _ = index[dim].indices(n_src * kv_repeat * head_dim)
        heads = np.arange(start // head_dim, -(-stop // head_dim)) // kv_repeat
        x = x.reshape(x.shape[:dim] + (n_src, head_dim) + x.shape[dim + 1:])
        x = np.take(x, heads, axis=dim)
        x = x.reshape(x.shape[:dim] + (-1,) + x.shape[dim + 2:])
        lo = start - (start // head_dim) * head_dim
        return x[(slice(None),) * dim + (slice(lo, lo + stop - start),)]

    return cb


class _StageRows:
    """Host view of entry ``i`` of the staged layout: row ``s`` is layer ``s * per + i``."""

    def __init__(self, host: Any, i: int, per: int, pp: int) -> None:
        self.host, self.ids = host, np.arange(pp) * per + i
        self.shape = (pp,) + tuple(np.shape(host))[1:]
        self.dtype = host.dtype

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        ids = self.ids[index[0]]
        return np.stack([np.asarray(self.host[(k,) + tuple(index[1:])]) for k in ids])


def place_params(params: dict[str, Any], cfg: ModelConfig, mesh: Mesh,
                 plan: Plan | None = None, layout: str = "stacked") -> dict[str, Any]:
    """Host params (numpy or jax, stacked or per-layer list, separate or fused
    projections, float or quantized) -> global arrays on ``mesh``.

    Each device's shard is cut from the host array by ``jax.make_array_from_callback``
    (one callback per addressable shard): no full copy is ever made on one device, and
    in a multi-process run every process only materialises its own shards.  Fused
    projections (``llama.fuse_projections``) are split back first: tensor parallelism
    cuts each projection by its own heads.  Quantized weights keep their codes; each
    stored child is split like the weight (:func:`leaf_axes`, :func:`fit_to_mesh`).

    ``layout="stacked"``: the canonical pytree of docs/design.md (``layers`` leaves
    ``[L, ...]``, L sharded over ``pipeline``) -- for GSPMD users such as training.
    ``layout="staged"``: what :class:`sharding.ShardedModel` runs -- ``layers`` is a list
    of ``L/pp`` dicts whose leaves are ``[pp, ...]`` (one buffer per layer per device).
    """
    if layout not in ("stacked", "staged"):
        raise ValueError(f"layout must be 'stacked' or 'staged', got {layout!r}")
    plan = plan or plan_for_mesh(cfg, mesh)
    params = llama.stack_layers(llama.unfuse_projections(params, cfg))
    shapes = global_param_shapes(plan)
    axes = logical_axes(cfg)
    want = jax.tree.structure(shapes, is_leaf=lambda x: isinstance(x, tuple) and not _is_axes(x))
    got = jax.tree.structure(params, is_leaf=_is_quantized)
    if want != got:
        raise ValueError(f"params do not match the config: expected structure {want}, got {got}")
    params = jax.tree.map(lambda x: np.asarray(jax.device_get(x)) if isinstance(x, jax.Array)
                          else x, params)
    params = jax.tree_util.tree_map_with_path(
        lambda path, ax, leaf: fit_to_mesh(jax.tree_util.keystr(path, simple=True, separator="."),
                                           leaf, ax, plan, layout == "staged"),
        axes, params, is_leaf=_is_axes)

    def put_array(ax: tuple[str | None, ...], host: Any) -> jax.Array:
        shape = tuple(s * plan.kv_repeat if a == "kv_heads" else s
                      for a, s in zip(ax, np.shape(host)))
        return jax.make_array_from_callback(
            shape, NamedSharding(mesh, plan.spec(ax)),
            _host_slicer(host, ax, plan.kv_repeat, cfg.head_dim), dtype=host.dtype)

    def put(name: str, ax: tuple[str | None, ...], shape: tuple[int, ...], host: Any) -> Any:
        exp = tuple(s // plan.kv_repeat if a == "kv_heads" else s for a, s in zip(ax, shape))
        if tuple(host.shape) != exp:
            raise ValueError(f"param {name} has shape {tuple(host.shape)}, expected {exp}")
        if not _is_quantized(host):
            return put_array(ax, host)
        return jax.tree.map(put_array, leaf_axes(ax, host), host, is_leaf=_is_axes)

    out: dict[str, Any] = {}
    for key in params:
        if key == "layers":
            continue
        out[key] = put(key, axes[key], shapes[key], params[key])
    layers, lax_, lshapes = params["layers"], axes["layers"], shapes["layers"]
    if layout == "stacked":
        out["layers"] = {k: put(f"layers.{k}", lax_[k], lshapes[k], layers[k]) for k in layers}
    else:
        per = cfg.num_layers // plan.pp

        def rows(host: Any, i: int) -> Any:  # entry i of the staged layout, per child
            return jax.tree.map(lambda a: _StageRows(a, i, per, plan.pp), host)

        out["layers"] = [
            {k: put(f"layers.{k}[{i}]", lax_[k], (plan.pp,) + tuple(lshapes[k][1:]),
                    rows(layers[k], i)) for k in layers}
            for i in range(per)]
    return out


def per_device_bytes(tree: Any) -> dict[jax.Device, int]:
    """Bytes each device holds for a pytree of global arrays (from ``addressable_shards``)."""
    out: dict[jax.Device, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out
