"""Static-batch generation on a tiny random model: cache vs recompute, batching, stops, compiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import generation as G
from jaxllm.compilation import count_compiles
from jaxllm.config import ModelConfig
from jaxllm.models import llama
from jaxllm.sampling import SamplerFlags, SamplingParams

CFG = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, max_position_embeddings=256)
CFG_WINDOW = ModelConfig(**{**CFG.__dict__, "sliding_window": 6})
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], list(range(10, 30))]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def params():
    p = llama.init_params(CFG, jax.random.key(0))
    return jax.tree.map(lambda x: x * 5 if x.ndim > 1 else x, p)  # sharper logits


def _run(params, cfg, prompts, sps, eos=(), steps=100):
    sb = G.StaticBatch(params, cfg, prompts, sps, eos, max_model_len=256, impl="xla")
    sb.step(steps)
    out, num, done = sb.fetch()
    return [list(map(int, out[i, :num[i]])) for i in range(len(prompts))], done


@pytest.mark.parametrize("cfg", [CFG, CFG_WINDOW], ids=["full", "sliding-window"])
def test_kv_cache_decode_equals_full_recompute(params, cfg):
    """Every decode step's logits equal a no-cache forward over the whole sequence."""
    prompts = PROMPTS
    sb = G.StaticBatch(params, cfg, prompts, [GREEDY] * 3, (), max_model_len=256, impl="xla")
    seqs = [list(p) for p in prompts]
    step_logits = jax.jit(G.decode_logits, static_argnums=1)
    full = jax.jit(llama.logits, static_argnums=1)
    for _ in range(6):
        out, num, _ = sb.fetch()
        for i in range(3):
            seqs[i] = list(prompts[i]) + list(map(int, out[i, :num[i]]))
        logits, _ = step_logits(params, cfg, sb.state)
        for i in range(3):
            ref = full(params, cfg, jnp.asarray([seqs[i]]))[0, -1]
            np.testing.assert_allclose(np.asarray(logits[i]), np.asarray(ref), atol=1e-5, rtol=0)
        sb.step(1)
    # and the tokens equal the recompute-everything baseline
    tokens, _ = _run(params, cfg, prompts, [GREEDY] * 3)
    assert tokens == [list(map(int, t)) for t in
                      G.generate_without_cache(params, cfg, prompts, GREEDY)]


def test_batched_equals_alone_and_scan_equals_unrolled(params):
    # the batch of 3 takes the vocab-major greedy head, a lone row the [B, V] one
    flags = SamplerFlags.for_params([GREEDY])
    assert G._vocab_major(flags, 4, None) and not G._vocab_major(flags, 1, None)
    hidden = jax.random.normal(jax.random.key(1), (4, CFG.hidden_size))
    np.testing.assert_allclose(np.asarray(llama.lm_head(params, CFG, hidden, vocab_major=True)),
                               np.asarray(llama.lm_head(params, CFG, hidden)).T, atol=1e-4)
    batched, _ = _run(params, CFG, PROMPTS, [GREEDY] * 3)
    for i, p in enumerate(PROMPTS):
        alone, _ = _run(params, CFG, [p], [GREEDY])
        assert alone[0] == batched[i]
    unrolled, _ = _run(llama.unstack_layers(params), CFG, PROMPTS, [GREEDY] * 3)
    assert unrolled == batched


def test_stop_ids_min_tokens_and_max_tokens_per_row(params):
    free, _ = _run(params, CFG, PROMPTS, [GREEDY] * 3)
    stop_tok = free[0][3]  # a token row 0 emits at step 4
    sps = [SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[stop_tok]),
           SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
           SamplingParams(temperature=0.0, max_tokens=12, min_tokens=12,
                          stop_token_ids=[free[2][0]])]
    out, done = _run(params, CFG, PROMPTS, sps)
    assert out[0] == free[0][:free[0].index(stop_tok) + 1]  # ends on the stop id
    assert out[1] == free[1][:5]
    assert len(out[2]) == 12 and free[2][0] not in out[2]  # suppressed until min_tokens
    assert done.all()


def test_eos_ends_a_row_unless_ignored(params):
    free, _ = _run(params, CFG, PROMPTS[:1], [GREEDY])
    eos = free[0][2]
    out, _ = _run(params, CFG, PROMPTS[:1], [SamplingParams(temperature=0.0, max_tokens=12)],
                  eos=(eos,))
    assert out[0] == free[0][:free[0].index(eos) + 1]
    out, _ = _run(params, CFG, PROMPTS[:1], [GREEDY], eos=(eos,))
    assert out[0] == free[0]


def test_seeded_sampling_repeats(params):
    sp = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=3, ignore_eos=True)
    a, _ = _run(params, CFG, PROMPTS, [sp] * 3)
    b, _ = _run(params, CFG, PROMPTS, [sp] * 3)
    assert a == b


def test_second_generation_with_same_shapes_compiles_nothing(params):
    _run(params, CFG, PROMPTS, [GREEDY] * 3)
    with count_compiles() as compiled:
        _run(params, CFG, [[5, 6, 7], [8], list(range(40, 65))], [GREEDY] * 3)  # same buckets
    assert compiled == []
    with count_compiles() as compiled:  # sanity: a new shape is seen by the counter
        _run(params, CFG, [list(range(40))], [GREEDY])
    assert compiled
