"""Verification of draft tokens on device: greedy prefix matching and rejection sampling.

For each speculating sequence the target has logits at ``K + 1`` positions: after the
last accepted token and after each of the (up to ``K``) draft tokens.  Position ``j``
scores draft token ``j``; the token after the accepted prefix comes from the target.

* Greedy rows keep the longest prefix of drafts equal to the target's argmax, then the
  target's argmax at the first mismatch (or after the last draft).
* Sampled rows run rejection sampling (Leviathan et al. 2023; Chen et al. 2023) on the
  target distribution ``p`` *after* the temperature / top-k / top-p / min-p that plain
  sampling applies (penalties and min-token suppression are already in the logits):
  draft token ``d ~ q`` is kept with probability ``min(1, p(d) / q(d))``; at the first
  rejection the token is drawn from the residual ``max(0, p - q)`` normalised; when every
  draft is kept, one more token is drawn from ``p`` (``q`` is zero past the drafts, so the
  residual there *is* ``p``).  Every output position is then distributed exactly as the
  target's.  ``q`` is a point mass on each draft when the proposer gives no
  distribution (prompt lookup, greedy drafts).

Randomness: position ``j`` of a row uses ``fold_in(key(seed), step + j)`` folded with 1
(the acceptance test's uniform) or 2 (the residual draw), so a seeded request draws the
same numbers at the same output position whatever batch it runs in.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.sampling import SamplerFlags, SamplingTensors, allowed_mask, argmax

__all__ = ["accepted_prefix", "target_probs", "verify_drafts"]

_ACCEPT, _RESIDUAL = 1, 2  # stream tags folded into a row's per-position key


def target_probs(logits: jax.Array, st: SamplingTensors, flags: SamplerFlags) -> jax.Array:
    """``softmax(logits / T)`` over the tokens plain sampling may emit, ``[N, V]`` float32."""
    scaled = logits / jnp.maximum(st.temperature, 1e-6)[:, None]
    if flags.top_k_p or flags.min_p:
        scaled = jnp.where(allowed_mask(logits, st, flags), scaled, -jnp.inf)
    return jax.nn.softmax(scaled, axis=-1)


def accepted_prefix(accept: jax.Array) -> jax.Array:
    """Number of leading True entries of each row of ``accept [B, K]``."""
    return jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=1), axis=1)


def _draws(seed, step, tag: int, fn):
    """``fn(key)`` per row and position with the key of (seed, step, tag)."""
    def one(s, t):
        return fn(jax.random.fold_in(jax.random.fold_in(jax.random.key(s), t), tag))

    return jax.vmap(jax.vmap(one, in_axes=(None, 0)))(seed, step)


def verify_drafts(logits: jax.Array, st: SamplingTensors, flags: SamplerFlags,
                  step: jax.Array, draft_ids: jax.Array, num_drafts: jax.Array,
                  draft_probs: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Accept or reject drafts.

    Args:
        logits: ``[B, K+1, V]`` float32 target logits (penalties / suppression applied).
        st: the rows' sampling parameters, ``[B]`` each.
        flags: sampler stages present (``penalties`` is ignored: already applied).
        step: ``[B, K+1]`` int32 output position of each logits row (seeds).
        draft_ids: ``[B, K]`` int32 draft tokens (entries past ``num_drafts`` ignored).
        num_drafts: ``[B]`` int32 drafts per row (0: a plain sample from position 0).
        draft_probs: ``[B, K, V]`` draft distributions, or None for point masses.

    Returns:
        ``(tokens [B, K+1] int32, num_accepted [B] int32)``: ``tokens[b, :n+1]`` are the
        ``n = num_accepted[b]`` kept drafts followed by the target's token, -1 after.
    """
    b, k1, v = logits.shape
    k = k1 - 1
    has = jnp.arange(k)[None, :] < num_drafts[:, None]  # [B, K]
    d = jnp.where(has, draft_ids, 0)
    greedy = argmax(logits)  # [B, K+1]
    accept = has & (d == greedy[:, :k])
    target = greedy
    if not flags.all_greedy:
        accept_s, sampled = _rejection_sample(logits, st, flags, step, d, has, draft_probs)
        is_greedy = (st.temperature == 0)[:, None]
        accept = jnp.where(is_greedy, accept, accept_s)
        target = jnp.where(is_greedy, greedy, sampled)
    n = accepted_prefix(accept)
    j = jnp.arange(k1)[None, :]
    drafts = jnp.concatenate([d, jnp.zeros((b, 1), d.dtype)], axis=1)
    last = jnp.take_along_axis(target, n[:, None], axis=1)
    tokens = jnp.where(j < n[:, None], drafts, jnp.where(j == n[:, None], last, -1))
    return tokens.astype(jnp.int32), n.astype(jnp.int32)


def _rejection_sample(logits, st: SamplingTensors, flags: SamplerFlags, step, d, has,
                      draft_probs):
    """``(accept [B, K], token [B, K+1])``: the acceptance test of every draft and the
    residual draw at every position (only the one after the accepted prefix is used)."""
    b, k1, v = logits.shape
    k = k1 - 1
    rows = jax.tree.map(lambda a: jnp.repeat(a, k1, axis=0), st)
    p = target_probs(logits.reshape(b * k1, v), rows, flags).reshape(b, k1, v)
    if draft_probs is None:
        q = jax.nn.one_hot(d, v, dtype=p.dtype)
    else:
        q = draft_probs.astype(p.dtype)
    q = jnp.where(has[:, :, None], q, 0.0)
    q = jnp.concatenate([q, jnp.zeros((b, 1, v), p.dtype)], axis=1)  # past the drafts: 0
    p_d = jnp.take_along_axis(p[:, :k], d[:, :, None], axis=2)[..., 0]
    q_d = jnp.take_along_axis(q[:, :k], d[:, :, None], axis=2)[..., 0]
    u = _draws(st.seed, step[:, :k], _ACCEPT, lambda key: jax.random.uniform(key))
    accept = has & (u * q_d < p_d)  # P(accept) = min(1, p(d) / q(d))
    residual = jnp.maximum(p - q, 0.0)
    mass = jnp.sum(residual, axis=-1, keepdims=True)
    residual = jnp.where(mass > 0, residual, p)  # p == q: never reached (always accepted)
    logr = jnp.log(residual)
    token = _draws(st.seed, step, _RESIDUAL, lambda key: key)  # keys [B, K+1]
    token = jax.vmap(jax.vmap(lambda key, lr: jax.random.categorical(key, lr)))(token, logr)
    return accept, token.astype(jnp.int32)
