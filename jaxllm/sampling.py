"""Sampling parameters (host) and the on-device sampler.

`SamplingParams` uses vLLM's names and defaults.  The sampler runs inside the
jitted decode step: per-row parameters travel as small arrays
(`SamplingTensors`), and which optional stages exist at all (penalties, top-k /
top-p sorting, min-p) is a static `SamplerFlags`, so a greedy batch compiles to
an argmax and pays for nothing else.
"""

from __future__ import annotations

import dataclasses
import random
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

_NEG_INF = float("-inf")


@dataclasses.dataclass
class SamplingParams:
    """How to sample one request (vLLM-compatible names).

    ``temperature=0`` is greedy.  ``top_k`` 0 or -1 disables top-k.  ``stop``
    strings are checked on the host and cut from the text; ``stop_token_ids``
    end generation on device.  ``seed`` makes a request's samples reproducible
    whatever else is in the batch.
    """

    n: int = 1
    best_of: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    use_beam_search: bool = False
    length_penalty: float = 1.0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        def bad(field: str, why: str) -> None:
            raise ValueError(f"SamplingParams.{field} {why}, got {getattr(self, field)!r}")

        if not isinstance(self.n, int) or self.n < 1:
            bad("n", "must be an integer >= 1")
        if self.best_of is not None and (not isinstance(self.best_of, int) or self.best_of < self.n):
            bad("best_of", f"must be an integer >= n ({self.n})")
        if not np.isfinite(self.temperature) or self.temperature < 0:
            bad("temperature", "must be a finite number >= 0")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            bad("top_k", "must be an integer >= 1, or 0 / -1 to disable")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1]")
        if not self.repetition_penalty > 0:
            bad("repetition_penalty", "must be > 0")
        for f in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, f) <= 2:
                bad(f, "must be in [-2, 2]")
        if not isinstance(self.max_tokens, (int, np.integer)) or self.max_tokens < 1:
            bad("max_tokens", "must be an integer >= 1")
        if not isinstance(self.min_tokens, (int, np.integer)) or not 0 <= self.min_tokens <= self.max_tokens:
            bad("min_tokens", f"must be an integer in [0, max_tokens={self.max_tokens}]")
        if self.seed is not None and not isinstance(self.seed, (int, np.integer)):
            bad("seed", "must be an integer or None")
        for f in ("logprobs", "prompt_logprobs"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, (int, np.integer)) or not 0 <= v <= 20):
                bad(f, "must be None or an integer in [0, 20]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "must be a non-empty string or a list of non-empty strings")
        if any(t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be non-negative token ids")
        if self.use_beam_search and self.temperature != 0 and self.temperature != 1.0:
            bad("temperature", "must be 0 (or left at 1.0) with use_beam_search")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def per_prompt(sampling_params: SamplingParams | Sequence[SamplingParams] | None,
               n: int) -> list[SamplingParams]:
    """One ``SamplingParams`` per prompt from None (the defaults), one shared by all
    prompts, or a list with one per prompt (its length must be ``n``)."""
    if sampling_params is None:
        return [SamplingParams()] * n
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * n
    sps = list(sampling_params)
    if len(sps) != n:
        raise ValueError(f"got {len(sps)} SamplingParams for {n} prompts")
    return sps


class SamplerFlags(NamedTuple):
    """Which sampler stages a batch needs (static: part of the compiled program)."""

    all_greedy: bool
    penalties: bool
    top_k_p: bool
    min_p: bool

    @classmethod
    def for_params(cls, params: Sequence[SamplingParams]) -> "SamplerFlags":
        sampled = [p for p in params if not p.greedy]
        return cls(
            all_greedy=not sampled,
            penalties=any(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty
                          for p in params),
            top_k_p=any(p.top_k > 0 or p.top_p < 1.0 for p in sampled),
            min_p=any(p.min_p > 0 for p in sampled),
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingTensors:
    """Per-row sampling parameters as device arrays (rows beyond the requests are padding)."""

    temperature: jax.Array  # [B] f32, 0 = greedy
    top_k: jax.Array  # [B] i32, 0 = off
    top_p: jax.Array  # [B] f32
    min_p: jax.Array  # [B] f32
    repetition_penalty: jax.Array  # [B] f32
    presence_penalty: jax.Array  # [B] f32
    frequency_penalty: jax.Array  # [B] f32
    seed: jax.Array  # [B] u32

    @classmethod
    def build(cls, params: Sequence[SamplingParams], batch_size: int,
              rng: random.Random | None = None) -> "SamplingTensors":
        rng = rng or random.Random()
        pad = batch_size - len(params)
        filler = SamplingParams(temperature=0.0)
        rows = list(params) + [filler] * pad

        def col(f, dtype):
            return np.asarray([f(p) for p in rows], dtype)

        return cls(
            temperature=col(lambda p: p.temperature, np.float32),
            top_k=col(lambda p: p.top_k, np.int32),
            top_p=col(lambda p: p.top_p, np.float32),
            min_p=col(lambda p: p.min_p, np.float32),
            repetition_penalty=col(lambda p: p.repetition_penalty, np.float32),
            presence_penalty=col(lambda p: p.presence_penalty, np.float32),
            frequency_penalty=col(lambda p: p.frequency_penalty, np.float32),
            seed=col(lambda p: (p.seed if p.seed is not None else rng.getrandbits(32)) & 0xFFFFFFFF,
                     np.uint32),
        )


def apply_penalties(logits: jax.Array, st: SamplingTensors, counts: jax.Array,
                    prompt_mask: jax.Array) -> jax.Array:
    """Repetition (HF-style, over prompt and output), presence and frequency (OpenAI-style,
    over output tokens) penalties.  ``counts [B,V]``: occurrences in the output so far."""
    seen = prompt_mask | (counts > 0)
    rp = st.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rp, logits * rp), logits)
    logits = logits - st.frequency_penalty[:, None] * counts
    return logits - st.presence_penalty[:, None] * (counts > 0)


def _top_k_top_p_mask(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Boolean mask of tokens kept by top-k then top-p (the top token is always kept)."""
    v = logits.shape[-1]
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    ranks = jnp.arange(v)[None, :]
    sorted_logits = jnp.where(ranks < k[:, None], sorted_logits, _NEG_INF)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass ranked strictly above
    keep_sorted = (before < top_p[:, None]) & (ranks < k[:, None])
    n_keep = jnp.maximum(jnp.sum(keep_sorted, axis=-1), 1)
    threshold = jnp.take_along_axis(sorted_logits, (n_keep - 1)[:, None], axis=-1)
    return logits >= threshold


def allowed_mask(logits: jax.Array, st: SamplingTensors, flags: SamplerFlags) -> jax.Array:
    """Tokens a sampled (temperature > 0) row may emit after top-k / top-p / min-p."""
    scaled = logits / jnp.maximum(st.temperature, 1e-6)[:, None]
    keep = jnp.ones(logits.shape, bool)
    if flags.top_k_p:
        keep &= _top_k_top_p_mask(scaled, st.top_k, st.top_p)
    if flags.min_p:
        probs = jax.nn.softmax(scaled, axis=-1)
        keep &= probs >= st.min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True)
    return keep


def argmax(logits: jax.Array, axis: int = -1) -> jax.Array:
    """``jnp.argmax(logits, axis)`` (first index of the maximum) as two plain reductions:
    XLA:CPU runs the variadic (value, index) reduce of ``argmax`` unvectorised
    (docs/design.md#measurements).  ``axis`` is the vocabulary axis (0 for ``[V, B]``)."""
    axis = axis % logits.ndim
    v = logits.shape[axis]
    best = jnp.max(logits, axis=axis, keepdims=True)
    ids = jax.lax.broadcasted_iota(jnp.int32, logits.shape, axis)
    idx = jnp.where(logits == best, ids, v)
    return jnp.minimum(jnp.min(idx, axis=axis), v - 1)  # (a NaN row gives the last id)


def sample(logits: jax.Array, st: SamplingTensors, flags: SamplerFlags, step: jax.Array,
           counts: jax.Array | None = None, prompt_mask: jax.Array | None = None) -> jax.Array:
    """Pick one token per row from float32 ``logits [B, V]``.

    ``step [B]`` (tokens generated so far) is folded into each row's seed, so a
    seeded request draws the same numbers whatever batch it runs in.
    """
    if flags.penalties:
        logits = apply_penalties(logits, st, counts, prompt_mask)
    greedy = argmax(logits)
    if flags.all_greedy:
        return greedy
    scaled = logits / jnp.maximum(st.temperature, 1e-6)[:, None]
    if flags.top_k_p or flags.min_p:
        scaled = jnp.where(allowed_mask(logits, st, flags), scaled, _NEG_INF)

    def draw(seed, s, row):
        key = jax.random.fold_in(jax.random.key(seed), s)
        return jax.random.categorical(key, row).astype(jnp.int32)

    sampled = jax.vmap(draw)(st.seed, step, scaled)
    return jnp.where(st.temperature == 0, greedy, sampled)


def suppress(logits: jax.Array, token_ids: jax.Array, active: jax.Array,
             vocab_major: bool = False) -> jax.Array:
    """Set ``logits[b, token_ids[b, :]]`` to -inf where ``active[b]`` (ids < 0 are padding).
    ``vocab_major``: ``logits`` is ``[V, B]``.

    Used for ``min_tokens``: EOS and stop ids cannot be drawn before the minimum.  A few
    fused compares against the vocabulary iota, skipped when no row is active (cheaper
    than a scatter into a ``[B, V]`` mask: docs/design.md#measurements)."""
    v_axis = 0 if vocab_major else logits.ndim - 1

    def apply():
        vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, v_axis)
        hit = jnp.zeros(logits.shape, bool)
        for j in range(token_ids.shape[1]):  # stop ids per row: a handful
            hit |= vocab == jnp.expand_dims(token_ids[:, j], v_axis)
        return jnp.where(hit & jnp.expand_dims(active, v_axis), _NEG_INF, logits)

    return jax.lax.cond(jnp.any(active), apply, lambda: logits)


def token_logprobs(logits: jax.Array, tokens: jax.Array, k: int) -> tuple[jax.Array, ...]:
    """Log-probability of ``tokens`` and the top-``k`` (ids, logprobs) under ``logits``."""
    lp = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0]
    if k == 0:
        return chosen, None, None
    top_lp, top_ids = jax.lax.top_k(lp, k)
    return chosen, top_ids.astype(jnp.int32), top_lp
