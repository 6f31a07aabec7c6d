"""The jitted training step: loss, gradient accumulation, AdamW, mixed precision, remat.

``TrainState(step, params, opt_state, rng)`` holds only what is trained (the full
params for SFT, the adapter for LoRA) in float32 -- the master weights -- plus
the optimizer state over them.  Frozen weights (the base model under LoRA) are a
separate, non-donated argument, stored in the compute dtype.

One call of the step consumes a global batch ``{field: [accum, micro_rows, T]}``:
``lax.scan`` over the ``accum`` micro-batches sums the token-weighted loss and its
gradient (one compiled program whatever ``accum`` is), the sum is divided by the
number of trained tokens, so accumulation is exactly a step on the concatenated
batch.  Parameters are cast to the compute dtype inside the loss (bf16 compute,
float32 master weights and optimizer state), logits and the cross-entropy are
float32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxllm.config import ModelConfig
from jaxllm.models import llama
from jaxllm.train import lora as lora_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
          "f32": jnp.float32}
REMAT_POLICIES = ("none", "full", "dots")


def remat_policy(name: str) -> Callable | None:
    """``--remat`` -> the ``remat_policy`` argument of ``llama.forward``.

    ``forward(remat_policy=None)`` means *no* rematerialisation; full remat is the
    ``nothing_saveable`` policy (only layer inputs are kept, everything else is
    recomputed in the backward pass); ``dots`` keeps the projection matmul outputs
    (``dots_with_no_batch_dims_saveable``: not the attention score einsums).
    """
    if name == "none":
        return None
    if name == "full":
        return jax.checkpoint_policies.nothing_saveable
    if name == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    raise ValueError(f"remat must be one of {REMAT_POLICIES}, got {name!r}")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of the compiled step (hashable)."""
    model: ModelConfig
    compute_dtype: str = "float32"
    remat: str = "none"
    attn_impl: str = "xla"
    scan_layers: bool = True
    lora: lora_lib.LoraConfig | None = None
    loss_chunk: int = 0  # >0: cross-entropy over sequence chunks of this size (saves memory)

    def __post_init__(self):
        if self.compute_dtype not in DTYPES:
            raise ValueError(f"compute dtype must be one of {sorted(DTYPES)}, "
                             f"got {self.compute_dtype!r}")
        remat_policy(self.remat)


class TrainState(NamedTuple):
    step: jax.Array       # int32 scalar
    params: Any           # trained params, float32 master copy
    opt_state: Any
    rng: jax.Array        # uint32[2] base key; step s uses fold_in(rng, s)


# --------------------------------------------------------------------------- optimizer


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: matrices, not norms or biases."""
    def keep(path, x):
        name = str(getattr(path[-1], "key", getattr(path[-1], "name", path[-1])))
        if "norm" in name or name in llama.BIAS_KEYS:
            return False
        return x.ndim >= 2
    return jax.tree_util.tree_map_with_path(keep, params)


def make_schedule(lr: float, total_steps: int, warmup_steps: int = 0,
                  min_lr_ratio: float = 0.1, kind: str = "cosine") -> optax.Schedule:
    """Linear warmup from 0 to ``lr`` then cosine (or constant) decay to ``lr*min_lr_ratio``."""
    warmup_steps = max(0, min(warmup_steps, total_steps))
    if kind == "constant":
        if warmup_steps == 0:
            return optax.constant_schedule(lr)
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps),
                                     optax.constant_schedule(lr)], [warmup_steps])
    if kind != "cosine":
        raise ValueError(f"lr schedule must be cosine or constant, got {kind!r}")
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1), end_value=lr * min_lr_ratio)


def make_optimizer(schedule: optax.Schedule, *, weight_decay: float = 0.0,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   clip_norm: float = 1.0) -> optax.GradientTransformation:
    """Global-norm clipping + AdamW (decay masked off norms and biases)."""
    parts = []
    if clip_norm and clip_norm > 0:
        parts.append(optax.clip_by_global_norm(clip_norm))
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts)


def init_state(params: Any, tx: optax.GradientTransformation, seed: int = 0) -> TrainState:
    params = jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.PRNGKey(seed))


# --------------------------------------------------------------------------- loss


def cast_floating(tree: Any, dtype) -> Any:
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def model_params(sc: StepConfig, trained: Any, frozen: Any, rng: jax.Array | None) -> Any:
    """The params pytree the model runs with, in the compute dtype and layout."""
    dt = DTYPES[sc.compute_dtype]
    trained = cast_floating(trained, dt)
    if sc.lora is not None:
        rngs = None
        if rng is not None and sc.lora.dropout > 0:
            rngs = jax.random.split(rng, sc.model.num_layers)
        params = lora_lib.attach(cast_floating(frozen, dt), trained, sc.lora, rngs)
    else:
        params = trained
    return params if sc.scan_layers else llama.unstack_layers(params)


def _nll_sum(params, cfg, hidden, targets, weights):
    logits = llama.lm_head(params, cfg, hidden)  # float32
    lse = jax.nn.logsumexp(logits, axis=-1)
    tgt = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((lse - tgt) * weights)


def loss_sum(sc: StepConfig, trained: Any, frozen: Any, batch: dict, rng: jax.Array | None
             ) -> tuple[jax.Array, jax.Array]:
    """``(sum of token NLL * weight, sum of weights)`` over one micro-batch ``[rows, T]``."""
    cfg = sc.model
    params = model_params(sc, trained, frozen, rng)
    attend = llama.full_attention_fn(cfg, batch["segment_ids"], sc.attn_impl)
    hidden, _ = llama.forward(params, cfg, batch["inputs"], batch["positions"], attend,
                              remat_policy=remat_policy(sc.remat))
    w = batch["weights"].astype(jnp.float32)
    tgt = batch["targets"]
    c = sc.loss_chunk
    t = hidden.shape[1]
    if c and c < t and t % c == 0:
        # Scan over sequence chunks; each chunk's [rows, c, V] logits are recomputed in the
        # backward pass instead of keeping [rows, T, V] alive.
        n = t // c
        split = lambda a: jnp.moveaxis(a.reshape(a.shape[0], n, c, *a.shape[2:]), 1, 0)

        @jax.checkpoint
        def chunk(acc, xs):
            h, tg, ww = xs
            return acc + _nll_sum(params, cfg, h, tg, ww), None

        total, _ = jax.lax.scan(chunk, jnp.zeros((), jnp.float32),
                                (split(hidden), split(tgt), split(w)))
    else:
        total = _nll_sum(params, cfg, hidden, tgt, w)
    return total, jnp.sum(w)


# --------------------------------------------------------------------------- step


def accumulate_grads(sc: StepConfig, params: Any, frozen: Any, batch: dict, rng: jax.Array
                     ) -> tuple[jax.Array, jax.Array, Any]:
    """``(loss sum, trained-token count, gradient sum)`` over ``batch [accum, rows, T]``.

    Micro-batch ``i`` uses the dropout key ``fold_in(rng, i)``; the micro-batches run
    under ``lax.scan`` (a single compiled body whatever ``accum`` is).
    """
    grad_fn = jax.value_and_grad(functools.partial(loss_sum, sc), has_aux=True)
    accum = batch["inputs"].shape[0]

    def micro(i, mb):
        (lsum, n), g = grad_fn(params, frozen, mb, jax.random.fold_in(rng, i))
        return lsum, n, g

    if accum == 1:
        return micro(0, jax.tree.map(lambda x: x[0], batch))

    def body(carry, xs):
        i, mb = xs
        l, n_, g = micro(i, mb)
        acc_l, acc_n, acc_g = carry
        return (acc_l + l, acc_n + n_, jax.tree.map(jnp.add, acc_g, g)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (lsum, n, gsum), _ = jax.lax.scan(
        body, (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros),
        (jnp.arange(accum), batch))
    return lsum, n, gsum


def train_step(state: TrainState, frozen: Any, batch: dict, *, sc: StepConfig,
               tx: optax.GradientTransformation, schedule: optax.Schedule
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step over a global batch ``{field: [accum, micro_rows, T]}``."""
    rng = jax.random.fold_in(state.rng, state.step)
    lsum, n, gsum = accumulate_grads(sc, state.params, frozen, batch, rng)
    denom = jnp.maximum(n, 1.0)
    grads = jax.tree.map(lambda g: g / denom, gsum)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": lsum / denom, "tokens": n, "grad_norm": optax.global_norm(grads),
               "lr": schedule(state.step)}
    return TrainState(state.step + 1, params, opt_state, state.rng), metrics


def eval_step(state_params: Any, frozen: Any, batch: dict, *, sc: StepConfig
              ) -> tuple[jax.Array, jax.Array]:
    """``(NLL sum, token count)`` of one ``[rows, T]`` batch (no dropout)."""
    return loss_sum(sc, state_params, frozen, batch, None)


def compile_steps(sc: StepConfig, tx, schedule, state_sharding=None, frozen_sharding=None,
                  batch_sharding=None, eval_batch_sharding=None):
    """``(jitted train_step, jitted eval_step)``; the state is donated."""
    step = functools.partial(train_step, sc=sc, tx=tx, schedule=schedule)
    ev = functools.partial(eval_step, sc=sc)
    if state_sharding is None:
        return jax.jit(step, donate_argnums=(0,)), jax.jit(ev)
    return (jax.jit(step, donate_argnums=(0,),
                    in_shardings=(state_sharding, frozen_sharding, batch_sharding),
                    out_shardings=(state_sharding, None)),
            jax.jit(ev, in_shardings=(state_sharding.params, frozen_sharding,
                                      eval_batch_sharding)))


def split_accum(batch: dict[str, np.ndarray], accum: int) -> dict[str, np.ndarray]:
    """``[rows, T]`` -> ``[accum, rows // accum, T]`` (consecutive rows per micro-batch)."""
    rows = batch["inputs"].shape[0]
    if rows % accum:
        raise ValueError(f"batch of {rows} rows does not split into {accum} micro-batches")
    return {k: v.reshape(accum, rows // accum, *v.shape[1:]) for k, v in batch.items()}
