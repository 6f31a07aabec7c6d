"""Sampler: allowed sets on constructed logits, seeds, greedy limit, penalties, validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.sampling import (SamplerFlags, SamplingParams, SamplingTensors, allowed_mask,
                             apply_penalties, argmax, sample, suppress)

V = 50


def _logits(b=4, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(0, 2, (b, V)), jnp.float32)


def _draw(logits, sps, steps=200):
    flags = SamplerFlags.for_params(sps)
    st = SamplingTensors.build(sps, len(sps))
    f = jax.jit(lambda l, s: sample(l, st, flags, s))
    return np.stack([np.asarray(f(logits, jnp.full((len(sps),), i, jnp.int32)))
                     for i in range(steps)])


def _softmax64(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_k_only_emits_the_k_largest(k):
    logits = _logits()
    sps = [SamplingParams(temperature=1.5, top_k=k, seed=i) for i in range(4)]
    draws = _draw(logits, sps)
    allowed = np.argsort(-np.asarray(logits), axis=-1)[:, :k]
    for r in range(4):
        assert set(draws[:, r]) <= set(allowed[r])
    if k == 10:  # and it does explore them
        assert all(len(set(draws[:, r])) > 3 for r in range(4))


@pytest.mark.parametrize("p", [0.3, 0.8])
def test_top_p_only_emits_the_nucleus(p):
    logits = _logits(seed=1)
    sps = [SamplingParams(temperature=1.0, top_p=p, seed=i) for i in range(4)]
    draws = _draw(logits, sps)
    probs = _softmax64(logits)
    for r in range(4):
        order = np.argsort(-probs[r])
        before = np.cumsum(probs[r][order]) - probs[r][order]
        nucleus = set(order[before < p])  # smallest prefix reaching mass p
        assert set(draws[:, r]) <= nucleus


def test_min_p_only_emits_tokens_above_the_floor():
    logits = _logits(seed=2)
    sps = [SamplingParams(temperature=1.0, min_p=0.1, seed=i) for i in range(4)]
    draws = _draw(logits, sps)
    probs = _softmax64(logits)
    for r in range(4):
        ok = set(np.nonzero(probs[r] >= 0.1 * probs[r].max())[0])
        assert set(draws[:, r]) <= ok


def test_allowed_mask_combines_filters_exactly():
    logits = jnp.log(jnp.asarray([[0.5, 0.2, 0.15, 0.1, 0.05]], jnp.float32))
    sp = SamplingParams(temperature=1.0, top_k=4, top_p=0.8, min_p=0.25)
    st = SamplingTensors.build([sp], 1)
    keep = np.asarray(allowed_mask(logits, st, SamplerFlags.for_params([sp])))[0]
    # top-4 -> {0,1,2,3}; renormalised nucleus 0.8 -> {0,1,2}; min_p 0.25*0.5 -> drops 3,4
    assert keep.tolist() == [True, True, True, False, False]


def test_fixed_seed_repeats_and_seeds_differ():
    logits = _logits(b=1, seed=3)
    a = _draw(logits, [SamplingParams(temperature=1.0, seed=7)], steps=30)
    b = _draw(logits, [SamplingParams(temperature=1.0, seed=7)], steps=30)
    c = _draw(logits, [SamplingParams(temperature=1.0, seed=8)], steps=30)
    assert (a == b).all() and (a != c).any()


def test_seeded_row_is_independent_of_batch_neighbours():
    logits = _logits(b=3, seed=4)
    alone = _draw(logits[1:2], [SamplingParams(temperature=1.0, seed=5)], steps=20)
    mixed = _draw(logits, [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=5),
                           SamplingParams(temperature=0.5, seed=9)], steps=20)
    assert (alone[:, 0] == mixed[:, 1]).all()


def test_temperature_to_zero_is_greedy():
    logits = _logits(seed=5)
    greedy = np.argmax(np.asarray(logits), -1)
    for sps in ([SamplingParams(temperature=0.0)] * 4,
                [SamplingParams(temperature=1e-4, seed=i) for i in range(4)]):
        draws = _draw(logits, sps, steps=10)
        assert (draws == greedy[None]).all()


def test_penalties_match_numpy():
    logits = _logits(b=2, seed=6)
    counts = np.zeros((2, V), np.int32)
    counts[0, [1, 2, 2]] = [1, 2, 0]
    counts[0, 2] = 2
    prompt = np.zeros((2, V), bool)
    prompt[1, [3, 4]] = True
    sp = SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25)
    st = SamplingTensors.build([sp, sp], 2)
    got = np.asarray(apply_penalties(logits, st, jnp.asarray(counts), jnp.asarray(prompt)))
    ref = np.asarray(logits, np.float64).copy()
    seen = prompt | (counts > 0)
    ref = np.where(seen, np.where(ref > 0, ref / 1.3, ref * 1.3), ref)
    ref -= 0.25 * counts + 0.5 * (counts > 0)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_suppress_blocks_only_active_rows():
    logits = jnp.zeros((2, 6))
    out = np.asarray(suppress(logits, jnp.asarray([[2, -1], [2, 5]]), jnp.asarray([True, False])))
    assert np.isneginf(out[0, 2]) and np.isfinite(out[0]).sum() == 5
    assert np.isfinite(out[1]).all()


def test_vocab_major_argmax_and_suppress_match_row_major():
    """The greedy decode step's [V, B] layout picks what the [B, V] layout picks, ties
    going to the first index as in np.argmax."""
    x = np.round(np.random.default_rng(7).normal(0, 1, (5, V)), 1).astype(np.float32)
    x[1, [3, 17]] = x[1].max() + 1  # a tie
    np.testing.assert_array_equal(np.asarray(argmax(jnp.asarray(x))), np.argmax(x, -1))
    np.testing.assert_array_equal(np.asarray(argmax(jnp.asarray(x.T), axis=0)), np.argmax(x, -1))
    ids = jnp.asarray([[2, -1]] * 4 + [[int(np.argmax(x[4])), 5]])
    active = jnp.asarray([True, False, True, False, True])
    row = np.asarray(suppress(jnp.asarray(x), ids, active))
    col = np.asarray(suppress(jnp.asarray(x.T), ids, active, vocab_major=True))
    np.testing.assert_array_equal(col.T, row)
    assert np.isneginf(row[4, np.argmax(x[4])]) and np.isfinite(row[1]).all()


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("top_p", 0.0), ("top_p", 1.5), ("max_tokens", 0), ("top_k", -2),
    ("min_p", 1.5), ("n", 0), ("repetition_penalty", 0.0), ("presence_penalty", 3.0),
    ("min_tokens", 99), ("logprobs", 50), ("stop", [""]), ("best_of", 0),
])
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**{field: value})
