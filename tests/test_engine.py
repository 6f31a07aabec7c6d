"""Paged KV cache + continuous-batching engine on a tiny random model.

The reference everywhere is the static-batch path (``jaxllm.generation``): greedy float32
outputs must be equal token for token, whatever the chunk size, prefix caching,
preemption or number of tokens per dispatch.
"""

from __future__ import annotations

import asyncio

import jax
import numpy as np
import pytest

from jaxllm import generation as G
from jaxllm.cache.page_pool import PagePool, kv_bytes_per_page, pages_for_budget, pool_bucket
from jaxllm.compilation import count_compiles
from jaxllm.config import ModelConfig
from jaxllm.engine.async_engine import AsyncLLMEngine
from jaxllm.engine.engine import LLMEngine
from jaxllm.models import llama
from jaxllm.sampling import SamplingParams

CFG = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, max_position_embeddings=256)
EOS = 3
MAX_LEN = 128
BASE = dict(max_model_len=MAX_LEN, page_size=4, num_pages=160, max_num_seqs=8,
            max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def params():
    p = llama.init_params(CFG, jax.random.key(0))
    p = jax.tree.map(lambda x: x * 5 if x.ndim > 1 else x, p)  # sharper logits
    return llama.unstack_layers(p)


def _workload(seed=0, n=20):
    rng = np.random.default_rng(seed)
    prompts = [[int(t) for t in rng.integers(4, 97, rng.integers(1, 40))] for _ in range(n)]
    sps = []
    for i in range(n):
        kw = dict(temperature=0.0, max_tokens=int(rng.integers(1, 30)))
        if i % 4 == 1:
            kw.update(ignore_eos=True)
        if i % 5 == 2:
            kw.update(min_tokens=min(5, kw["max_tokens"]))
        if i % 7 == 3:
            kw.update(stop_token_ids=[int(rng.integers(4, 97))])
        sps.append(SamplingParams(**kw))
    return prompts, sps


def static_tokens(params, prompts, sps, max_model_len=MAX_LEN):
    """The static-batch reference: one padded batch, run to completion."""
    sb = G.StaticBatch(params, CFG, prompts, sps, (EOS,), max_model_len=max_model_len, impl="xla")
    sb.step(1000)
    out, num, done = sb.fetch()
    assert done.all()
    return [[int(t) for t in out[i, :num[i]]] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def workload(params):
    prompts, sps = _workload()
    return prompts, sps, static_tokens(params, prompts, sps)


def make_engine(params, **kw):
    return LLMEngine(params, CFG, eos_token_ids=(EOS,), **{**BASE, **kw})


# ------------------------------------------------------------------------------ equality


@pytest.mark.parametrize("chunk", [1, 7, 64])
@pytest.mark.parametrize("caching", [True, False], ids=["prefix-cache", "no-cache"])
def test_engine_equals_static_batching(params, workload, chunk, caching):
    prompts, sps, ref = workload
    eng = make_engine(params, max_num_batched_tokens=chunk, enable_prefix_caching=caching)
    outs = eng.generate(prompts, sps)
    assert [o.token_ids for o in outs] == ref
    for o, sp, toks in zip(outs, sps, ref):
        stopped = toks[-1] in ([] if sp.ignore_eos else [EOS]) + sp.stop_token_ids
        assert o.finish_reason == ("stop" if stopped else "length")
        assert o.finished
    assert eng.allocator.num_free_blocks == eng.allocator.num_usable_blocks
    assert not eng.has_unfinished_requests()


def test_preemption_keeps_outputs_identical(params, workload):
    prompts, sps, ref = workload
    # 2 sequences of max_model_len fit; 20 requests must take turns and get preempted
    eng = make_engine(params, num_pages=2 * MAX_LEN // 4 + 1, max_num_batched_tokens=32)
    outs = eng.generate(prompts, sps)
    assert eng.num_preemptions > 0
    assert [o.token_ids for o in outs] == ref
    eng.allocator.check_invariants()
    assert eng.allocator.num_free_blocks == eng.allocator.num_usable_blocks


def test_single_token_dispatch_and_scan_layers_agree(params, workload):
    prompts, sps, ref = workload
    eng = make_engine(params, num_scheduler_steps=1)
    assert [o.token_ids for o in eng.generate(prompts, sps)] == ref
    assert eng.stats.multi_step_dispatches == 0
    stacked = make_engine(llama.stack_layers(params))
    assert stacked.pool.stacked
    assert [o.token_ids for o in stacked.generate(prompts, sps)] == ref
    assert stacked.stats.multi_step_dispatches > 0


def test_prefix_cache_skips_shared_blocks(params):
    eng = make_engine(params)
    shared = list(range(10, 22))  # 3 pages of 4 tokens
    a, b = shared + [40, 41, 42], shared + [50, 51, 52, 53, 54]
    sp = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    first = eng.generate([a], sp)[0]
    before = eng.stats.prefill_tokens
    second = eng.generate([b], sp)[0]
    assert eng.stats.prefill_tokens - before == len(b) - len(shared)
    assert eng.allocator.stats.prefix_cache_hits == len(shared)
    assert [first.token_ids, second.token_ids] == static_tokens(params, [a, b], [sp, sp])


# ------------------------------------------------------------------------------ n > 1, beams


def test_parallel_samples_are_seeded_and_share_the_prompt(params):
    sp = SamplingParams(n=4, temperature=1.0, max_tokens=12, seed=7, ignore_eos=True)
    prompt = list(range(5, 30))
    eng = make_engine(params)
    a = eng.generate([prompt], sp)[0]
    b = eng.generate([prompt], sp)[0]
    assert len(a.outputs) == 4
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1
    # the static path seeds row j with seed + j: same streams, same tokens
    rows = [SamplingParams(temperature=1.0, max_tokens=12, seed=7 + j, ignore_eos=True)
            for j in range(4)]
    assert [o.token_ids for o in a.outputs] == static_tokens(params, [prompt] * 4, rows)
    assert eng.allocator.stats.num_cow_copies > 0  # the shared last prompt page was copied


def test_sampling_options_match_static_path(params):
    """Penalties, top-k/p, min-p and seeded sampling: same seed streams, same tokens."""
    rng = np.random.default_rng(11)
    prompts = [[int(t) for t in rng.integers(4, 97, rng.integers(3, 30))] for _ in range(6)]
    sps = [SamplingParams(temperature=0.0, max_tokens=20, repetition_penalty=1.3, ignore_eos=True),
           SamplingParams(temperature=0.0, max_tokens=20, presence_penalty=1.0,
                          frequency_penalty=0.5, ignore_eos=True),
           SamplingParams(temperature=0.8, top_k=5, max_tokens=20, seed=1, ignore_eos=True),
           SamplingParams(temperature=1.0, top_p=0.7, max_tokens=20, seed=2, ignore_eos=True),
           SamplingParams(temperature=1.0, min_p=0.1, max_tokens=20, seed=3, ignore_eos=True),
           SamplingParams(temperature=1.2, max_tokens=20, seed=4, repetition_penalty=1.2)]
    ref = static_tokens(params, prompts, sps)
    for steps in (1, 8):
        eng = make_engine(params, num_scheduler_steps=steps)
        assert [o.token_ids for o in eng.generate(prompts, sps)] == ref


def _np_logprobs(p64, tokens):
    """Independent float64 NumPy forward of the tiny Llama: log-probs of the next token."""
    cfg = CFG
    x = p64["embed"][np.asarray(tokens)]
    t, hd = len(tokens), cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2) / hd))
    ang = np.arange(t)[:, None] * inv[None]
    cos, sin = np.cos(ang), np.sin(ang)

    def norm(v, w):
        return w * v / np.sqrt(np.mean(v * v, -1, keepdims=True) + cfg.rms_norm_eps)

    def rope(v):  # [t, h, hd]
        a, b = v[..., :hd // 2], v[..., hd // 2:]
        c, s = cos[:, None], sin[:, None]
        return np.concatenate([a * c - b * s, b * c + a * s], -1)

    for lp in p64["layers"]:
        h = norm(x, lp["attn_norm"])
        q = rope((h @ lp["wq"]).reshape(t, cfg.num_heads, hd))
        k = rope((h @ lp["wk"]).reshape(t, cfg.num_kv_heads, hd))
        v = (h @ lp["wv"]).reshape(t, cfg.num_kv_heads, hd)
        g = cfg.num_heads // cfg.num_kv_heads
        k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd)
        s = np.where(np.tril(np.ones((t, t), bool))[None], s, -np.inf)
        pr = np.exp(s - s.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", pr, v).reshape(t, -1) @ lp["wo"]
        h = norm(x, lp["mlp_norm"])
        gate = h @ lp["w_gate"]
        x = x + (gate / (1 + np.exp(-gate)) * (h @ lp["w_up"])) @ lp["w_down"]
    logits = norm(x[-1], p64["final_norm"]) @ p64["lm_head"]
    m = logits.max()
    return logits - m - np.log(np.exp(logits - m).sum())


def _np_beam_search(p64, prompt, width, max_tokens, eos, length_penalty=1.0):
    """Exhaustive-candidate beam search in float64 (vLLM's algorithm, written out)."""
    beams, completed = [([], 0.0)], []
    for _ in range(max_tokens):
        cands = []
        for toks, cum in beams:
            lp = _np_logprobs(p64, prompt + toks)
            for t in np.argsort(-lp, kind="stable")[:2 * width]:
                new = (toks + [int(t)], cum + float(lp[t]))
                (completed if int(t) == eos else cands).append(new)
        beams = sorted(cands, key=lambda b: b[1], reverse=True)[:width]
        if not beams:
            break
    completed += beams

    def score(b):
        n = len(prompt) + len(b[0]) - (1 if b[0][-1] == eos else 0)
        return b[1] / n ** length_penalty

    return sorted(completed, key=score, reverse=True)[:width]


@pytest.mark.parametrize("length_penalty", [1.0, 0.5])
def test_beam_search_matches_float64_numpy(params, length_penalty):
    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    prompt = [11, 42, 7, 19, 80, 5]
    # an EOS the model actually proposes, so that completed beams come into play
    eos = int(np.argsort(-_np_logprobs(p64, prompt))[3])
    ref = _np_beam_search(p64, prompt, 4, 5, eos, length_penalty)
    eng = LLMEngine(params, CFG, eos_token_ids=(eos,), **BASE)
    sp = SamplingParams(n=4, use_beam_search=True, temperature=0.0, max_tokens=5,
                        length_penalty=length_penalty)
    out = eng.generate([prompt], sp)[0]
    assert [o.token_ids for o in out.outputs] == [b[0] for b in ref]
    np.testing.assert_allclose([o.cumulative_logprob for o in out.outputs],
                               [b[1] for b in ref], atol=1e-4)
    assert eng.allocator.num_free_blocks == eng.allocator.num_usable_blocks
    assert eng.allocator.stats.num_cow_copies > 0


# ------------------------------------------------------------------------------ logprobs


def test_logprobs_and_prompt_logprobs(params):
    prompt = [int(t) for t in np.random.default_rng(3).integers(4, 97, 13)]
    eng = make_engine(params, max_num_batched_tokens=5)  # prompt logprobs across chunks
    sp = SamplingParams(temperature=0.0, max_tokens=6, logprobs=3, prompt_logprobs=2,
                        ignore_eos=True)
    eng.generate([prompt], SamplingParams(temperature=0.0, max_tokens=2))  # cache the prefix
    out = eng.generate([prompt], sp)[0]
    seq = prompt + out.token_ids
    full = jax.nn.log_softmax(llama.logits(params, CFG, np.asarray([seq]))[0], axis=-1)
    full = np.asarray(full)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for i in range(1, len(prompt)):
        d = out.prompt_logprobs[i]
        assert prompt[i] in d and len(d) <= 3
        np.testing.assert_allclose(d[prompt[i]], full[i - 1, prompt[i]], atol=1e-4)
        top = np.argsort(-full[i - 1])[:2]
        assert set(top) <= set(d)
    cum = 0.0
    for j, (t, d) in enumerate(zip(out.token_ids, out.outputs[0].logprobs)):
        row = full[len(prompt) - 1 + j]
        np.testing.assert_allclose(d[t], row[t], atol=1e-4)
        assert int(np.argmax(row)) == t and len(d) == 3  # greedy: chosen is the top one
        cum += row[t]
    np.testing.assert_allclose(out.outputs[0].cumulative_logprob, cum, atol=1e-3)


# ------------------------------------------------------------------------------ compiles


def test_no_recompilation_after_warmup(params):
    eng = make_engine(params, num_pages=300)
    eng.warmup()
    rng = np.random.default_rng(5)
    prompts = [[int(t) for t in rng.integers(4, 97, rng.integers(1, 60))] for _ in range(200)]
    sps = [SamplingParams(temperature=0.0, max_tokens=int(rng.integers(1, 40))) for _ in prompts]
    with count_compiles() as compiled:
        outs = eng.generate(prompts, sps)
    assert compiled == []
    assert len(outs) == 200 and all(o.finished for o in outs)
    assert eng.stats.multi_step_dispatches > 0


# ------------------------------------------------------------------------------ abort, errors


def test_abort_frees_blocks_and_leaves_others_alone(params, workload):
    prompts, sps, ref = workload
    eng = make_engine(params)
    ids = [eng.add_request(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts[:6], sps[:6]))]
    victim = eng.add_request("long", list(range(4, 60)),
                             SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True))
    done: dict[str, list[int]] = {}
    steps = 0
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
        steps += 1
        if steps == 4:
            seq = eng.scheduler.get_request(victim).seqs[0]
            blocks = list(seq.block_table)
            assert blocks and seq.num_output_tokens > 0
            assert eng.abort(victim)
            assert all(eng.allocator.ref_count(b) == 0 for b in blocks)
            assert not eng.abort(victim)
    assert done[victim].finish_reason == "abort" and done[victim].finished
    assert [done[i].token_ids for i in ids] == ref[:6]
    assert eng.allocator.num_free_blocks == eng.allocator.num_usable_blocks
    eng.allocator.check_invariants()


@pytest.mark.parametrize("prompt,sp,match", [
    ([], SamplingParams(), "empty"),
    ([5] * MAX_LEN, SamplingParams(), "max_model_len"),
    ([1000], SamplingParams(), "vocabulary"),
    ("text", SamplingParams(), "tokenizer"),
    ([5, 6], SamplingParams(stop=["x"]), "tokenizer"),
    ([5, 6], SamplingParams(n=9), "max_num_seqs"),
    (3.5, SamplingParams(), "token ids"),
])
def test_bad_requests_are_rejected_before_touching_the_pool(params, prompt, sp, match):
    eng = make_engine(params)
    eng.add_request("ok", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=4))
    eng.step()
    used = eng.allocator.num_used_blocks
    with pytest.raises((ValueError, TypeError), match=match):
        eng.add_request("bad", prompt, sp)
    assert eng.scheduler.get_request("bad") is None and "bad" not in eng.processor.requests
    assert eng.allocator.num_used_blocks == used
    with pytest.raises(ValueError, match="already exists"):
        eng.add_request("ok", [1], SamplingParams())
    while eng.has_unfinished_requests():
        eng.step()


def test_page_pool_sizing_and_bad_configs(monkeypatch):
    monkeypatch.setenv("JAXLLM_CPU_KVCACHE_SPACE", "0.01")  # GiB: keep the test's pool small
    with pytest.raises(ValueError, match="power of two"):
        PagePool.create(CFG, page_size=12, num_pages=64)
    with pytest.raises(ValueError, match="too small"):
        PagePool.create(CFG, page_size=16, num_pages=8, max_model_len=256)
    per_page = kv_bytes_per_page(CFG, 16, np.float32)
    assert per_page == 2 * CFG.num_layers * 16 * CFG.num_kv_heads * CFG.head_dim * 4
    n, budget = pages_for_budget(CFG, 16, np.float32, 0.9)
    assert n == max(0, budget // per_page) and n > 0
    pool = PagePool.create(CFG, page_size=16, memory_utilization=0.9, max_model_len=256)
    assert pool.num_pages == pool_bucket(n, up=False) and pool.nbytes <= 0.01 * 2**30
    capped = PagePool.create(CFG, page_size=16, max_model_len=256, max_pages=40)
    assert capped.num_pages == 40 and len(capped.caches) == CFG.num_layers
    with pytest.raises(ValueError, match="too small"):  # a tiny budget cannot hold a sequence
        PagePool.create(CFG, page_size=16, memory_utilization=1e-9, max_model_len=256)


# ------------------------------------------------------------------------------ async


def test_async_streams_match_generate(params, workload):
    prompts, sps, ref = workload
    eng = make_engine(params)
    aeng = AsyncLLMEngine(eng)

    async def one(i):
        seen, last = [], None
        async for out in aeng.generate(prompts[i], sps[i], f"s{i}"):
            seen.append(len(out.token_ids))
            last = out
        assert seen == sorted(seen) and last.finished
        return last.token_ids

    async def early_exit():
        sp = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
        async for out in aeng.generate(list(range(4, 40)), sp, "quitter"):
            if len(out.token_ids) >= 3:
                break

    async def main():
        res = await asyncio.gather(*(one(i) for i in range(8)), early_exit())
        with pytest.raises(ValueError, match="empty"):
            async for _ in aeng.generate([], SamplingParams()):
                pass
        for _ in range(50):  # the abort of "quitter" is applied by the loop
            if not eng.has_unfinished_requests():
                break
            await asyncio.sleep(0.05)
        await aeng.shutdown()
        return res[:8]

    assert asyncio.run(main()) == ref[:8]
    assert eng.allocator.num_free_blocks == eng.allocator.num_usable_blocks
