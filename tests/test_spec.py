"""Speculative decoding in the engine: configuration, prompt lookup, verification.

References: the plain engine (greedy float32 outputs must be equal token for token), the
target's exact distribution computed from full-sequence logits (rejection sampling), a
from-scratch forward of the accepted tokens (KV bookkeeping after rejections).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.engine.engine import LLMEngine
from jaxllm.engine.runner import RowParams, SampleRow
from jaxllm.models import llama
from jaxllm.sampling import SamplerFlags, SamplingParams, SamplingTensors
from jaxllm.spec.config import SpeculativeConfig, check_draft_vocab
from jaxllm.spec.controller import Speculator
from jaxllm.spec.ngram import NgramProposer, lookup
from jaxllm.spec.proposer import Draft
from jaxllm.spec.rejection import verify_drafts
from jaxllm.train.testing import dataset_texts, tiny_config, train_tiny_tokenizer

DATA = Path(__file__).parent / "data" / "captain_byte.jsonl"
BASE = dict(max_model_len=160, page_size=4, num_pages=160, max_num_seqs=8,
            max_num_batched_tokens=64)
# speculating at every batch size (the load-aware switch has its own test)
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1,
         "prompt_lookup_max": 3, "disable_by_batch_size": None}
EARLY_EXIT = {"method": "early_exit", "num_speculative_tokens": 3, "early_exit_layers": 1,
              "disable_by_batch_size": None}


@pytest.fixture(scope="module")
def model():
    """(tokenizer, config, params) of a tiny random model with a real (tiny BPE) tokenizer,
    so stop strings work; sharp logits so greedy runs repeat themselves (lookup hits)."""
    tok = train_tiny_tokenizer(dataset_texts(DATA), vocab_size=300)
    cfg = tiny_config(vocab_size=tok.vocab_size, eos_token_ids=tok.eos_token_ids)
    p = llama.init_params(cfg, jax.random.key(1))
    p = jax.tree.map(lambda x: x * 5 if x.ndim > 1 else x, p)
    return tok, cfg, llama.unstack_layers(p)


def make_engine(model, spec=None, **kw):
    tok, cfg, params = model
    return LLMEngine(params, cfg, tokenizer=tok, speculative_config=spec, **{**BASE, **kw})


def _texts(n=20):
    """Mixed lengths: whole records (input-grounded: the answer repeats the prompt's words)
    and cut ones; every third shares a long prefix (prefix-cache hits)."""
    recs = dataset_texts(DATA)
    out = []
    for i in range(n):
        t = recs[i % len(recs)]
        if i % 3 == 0:
            t = recs[0] + " " + t
        out.append(t[: 20 + 37 * i % 230])
    return out


class PoorProposer:
    """Drafts drawn from a deliberately wrong distribution ``q`` (seeded): a fixed random
    one, or ``table[context]`` for the contexts it lists."""

    method = "poor"

    def __init__(self, vocab: int, seed: int = 0, point_mass: bool = False,
                 table: dict | None = None) -> None:
        rng = np.random.default_rng(seed)
        logits = rng.normal(0, 2, vocab)
        self.q = np.exp(logits - logits.max())
        self.q /= self.q.sum()
        self.rng = np.random.default_rng(seed + 1)
        self.point_mass = point_mass
        self.table = table or {}

    def propose(self, requests):
        out = []
        for r in requests:
            q = self.table.get(tuple(r.token_ids), self.q)
            ids = tuple(int(t) for t in self.rng.choice(len(q), r.num_tokens, p=q))
            probs = None if self.point_mass else np.tile(q, (len(ids), 1))
            out.append(Draft(ids, probs))
        return out

    def accepted(self, seq_id, num_drafted, num_accepted):
        pass

    def release(self, seq_id):
        pass


class OracleProposer:
    """Drafts the plain engine's own continuation, each token corrupted with probability
    ``noise``: long accepted runs, rejections at every position (seeded)."""

    method = "oracle"

    def __init__(self, outputs, vocab: int, noise: float = 0.25, seed: int = 0) -> None:
        self.full = [tuple(o.prompt_token_ids) + tuple(c.token_ids)
                     for o in outputs for c in o.outputs]
        self.vocab, self.noise = vocab, noise
        self.rng = np.random.default_rng(seed)

    def propose(self, requests):
        out = []
        for r in requests:
            t = tuple(r.token_ids)
            cont = next((f[len(t):len(t) + r.num_tokens] for f in self.full
                         if f[:len(t)] == t), ())
            ids = tuple(int((x + 1) % self.vocab) if self.rng.random() < self.noise else int(x)
                        for x in cont)
            out.append(Draft(ids) if ids else None)
        return out

    def accepted(self, seq_id, num_drafted, num_accepted):
        pass

    def release(self, seq_id):
        pass


def use_proposer(eng, proposer, **cfg):
    """Swap the engine's proposer (tests only: methods are registered by name)."""
    config = dataclasses.replace(eng.config.speculative_config, method=proposer.method, **cfg)
    eng.stats.spec.clear()
    eng.use_speculator(Speculator(config, proposer, eng.cfg.vocab_size))
    return eng


# ------------------------------------------------------------------------------ config


@pytest.mark.parametrize("value, match", [
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be"),
    ({"method": "ngram", "num_speculative_tokens": -2}, "num_speculative_tokens must be"),
    ({"method": "lookahead", "num_speculative_tokens": 2}, "unknown speculative method"),
    ({"method": "ngram"}, "needs 'method' and 'num_speculative_tokens'"),
    ({"method": "ngram", "num_speculative_tokens": 2, "k": 3}, "unknown speculative_config key"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4,
      "prompt_lookup_max": 2}, "prompt_lookup_min <= prompt_lookup_max"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "needs \"model\""),
    ({"method": "ngram", "num_speculative_tokens": 2, "model": "x"}, "takes no \"model\""),
    ({"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 0},
     "disable_by_batch_size"),
    ("{not json", "not valid JSON"),
])
def test_bad_speculative_configs_fail_at_start(model, value, match):
    with pytest.raises(ValueError, match=match):
        SpeculativeConfig.parse(value)
    with pytest.raises(ValueError, match=match):
        make_engine(model, value)  # before any pool or program exists


def test_config_parses_vllm_dict_and_json():
    c = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 3, '
                                '"prompt_lookup_max": 4}')
    assert (c.method, c.num_speculative_tokens, c.prompt_lookup_max) == ("ngram", 3, 4)
    assert SpeculativeConfig.parse(c) is c and SpeculativeConfig.parse(None) is None
    with pytest.raises(TypeError, match="must be a dict"):
        SpeculativeConfig.parse(3)


def test_draft_with_another_vocabulary_is_refused():
    check_draft_vocab(300, 300)
    with pytest.raises(ValueError, match="vocabulary of 128 tokens, the target 300"):
        check_draft_vocab(300, 128)


# ------------------------------------------------------------------------------ proposers


def test_prompt_lookup_prefers_long_recent_matches():
    seq = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert lookup(seq, 2, 1, 3) == (7, 8)  # "2 3" last seen before "7 8" (not "9")
    assert lookup(seq, 5, 1, 3) == (7, 8, 5, 2, 3)
    assert lookup([4, 5, 6, 5, 9, 1, 4, 5], 3, 2, 2) == (6, 5, 9)  # bigram "4 5"
    assert lookup([4, 5, 6, 7], 3, 1, 3) == ()  # 7 never occurred before
    assert lookup([4], 3, 1, 3) == ()
    assert lookup([3, 3, 3], 4, 1, 2) == (3,)  # overlapping match: the token that followed
    drafts = NgramProposer(1, 3).propose([])
    assert drafts == []


def test_decode_loop_lookup_test_equals_prompt_lookup():
    """The multi-token decode's on-device stop test: row r could be drafted exactly when
    :func:`lookup` over its tokens finds an earlier occurrence of its last n tokens."""
    from jaxllm.engine.step import _ngram_seen
    rng = np.random.default_rng(0)
    width = 24
    for n in (1, 2, 3):
        lens = rng.integers(0, width + 1, 64)
        ids = np.where(np.arange(width) < lens[:, None], rng.integers(0, 4, (64, width)), -1)
        got = np.asarray(_ngram_seen(jnp.asarray(ids, jnp.int32), jnp.asarray(lens, jnp.int32),
                                     n))
        want = [bool(lookup(row[:m].tolist(), 1, n, n)) for row, m in zip(ids, lens)]
        assert got.tolist() == want and 0 < sum(want) < len(want)


def test_multi_token_decode_stops_when_a_draft_exists(model):
    """A decode-only dispatch of a watched sequence ends at the first token after which
    prompt lookup would draft (never later: the next step verifies instead), and the
    outputs stay the plain engine's."""
    texts = _texts(6)
    sp = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    want = _tokens(make_engine(model).generate(texts, sp))
    eng = make_engine(model, NGRAM)
    runs, execute = [], eng.runner.execute

    def record(out, rows, **kw):
        res = execute(out, rows, **kw)
        for rs, toks in zip(rows, res.tokens):
            if rs and rs[0].lookup_ids:
                runs.append((list(rs[0].lookup_ids), toks[0], rs[0].max_new))
        return res
    eng.runner.execute = record
    assert _tokens(eng.generate(texts, sp)) == want
    stopped = 0
    for hist, toks, allowed in runs:
        seen = [bool(lookup(hist + toks[:j], 1, 1, 1)) for j in range(1, len(toks) + 1)]
        assert not any(seen[:-1]), (hist, toks)  # ran past a draftable point
        stopped += seen[-1] and len(toks) < allowed
    assert stopped > 0 and len(runs) > stopped


def test_adaptive_k_and_backoff():
    cfg = SpeculativeConfig("ngram", 4)
    spec = Speculator(cfg, NgramProposer(1, 2))
    from jaxllm.spec.proposer import DraftRequest

    req = DraftRequest(7, [1, 2, 5, 6, 7, 8, 9, 0, 1, 2], 4)
    assert spec.propose([req])[7].token_ids == (5, 6, 7, 8)
    spec.record(7, 4, 1)  # rejected after 1: ask for 2 next
    assert len(spec.propose([req])[7].token_ids) == 2
    spec.record(7, 2, 2)  # all accepted: grow
    assert len(spec.propose([req])[7].token_ids) == 3
    spec.record(7, 3, 0)  # outright rejection: skip one step, then k = 1
    assert spec.propose([req]) == {}
    assert len(spec.propose([req])[7].token_ids) == 1
    assert spec.stats.drafted_tokens == 9 and spec.stats.accepted_tokens == 3
    assert spec.stats.mean_accepted_length == pytest.approx((3 + 3) / 3)
    spec.release([7])
    assert spec.tracked() == []
    bad = Speculator(cfg, NgramProposer(1, 2), vocab_size=5)  # drafts token 5, 6, ...
    with pytest.raises(ValueError, match="outside the vocabulary of 5"):
        bad.propose([req])


def test_scheduler_verify_truncates_to_the_accepted_tokens():
    """Host only: a decode with drafts becomes a verify feeding token + drafts (cut to the
    budget); after the update the table holds exactly the computed tokens' pages, the
    pages of rejected tokens are free again and only full accepted pages are hashed."""
    from jaxllm.cache.block_allocator import BlockAllocator
    from jaxllm.engine.scheduler import Scheduler

    alloc = BlockAllocator(12, 4, enable_prefix_caching=True)
    sched = Scheduler(alloc, max_num_seqs=4, max_num_batched_tokens=8)
    sched.add_request("r", [5, 6, 7, 8, 9, 10, 11], None)
    out = sched.schedule()
    (seq,) = sched.update(out, [12])  # prompt computed, token 12 pending
    free = alloc.num_free_blocks
    out = sched.schedule({seq.seq_id: [13, 14, 15, 16, 17, 18, 19, 20]})
    (e,) = out.scheduled_seqs
    assert e.draft_ids == (13, 14, 15, 16, 17, 18, 19) and e.token_ids == (12,) + e.draft_ids
    assert out.num_verify_tokens == 8 and out.num_verify_seqs == 1
    assert out.num_decode_entries == 1 and out.num_prefill_tokens == 0
    assert len(seq.block_table) == 4  # positions 7 .. 14
    sched.update(out, [[13, 14, 99]])  # two drafts kept, then the target's own token
    assert seq.token_ids[7:] == [12, 13, 14, 99] and seq.num_computed_tokens == 10
    assert len(seq.block_table) == 3 and alloc.num_free_blocks == free - 1
    assert len(seq.block_hashes) == 2  # full computed pages only
    alloc.check_invariants()
    with pytest.raises(ValueError, match="do not extend a prefix of its drafts"):
        out = sched.schedule({seq.seq_id: [1, 2]})
        sched.update(out, [[2, 3]])
    sched.abort("r")
    assert alloc.num_free_blocks == alloc.num_usable_blocks


# ------------------------------------------------------------------------------ rejection


def _exact(logits, temperature, top_k):
    x = np.asarray(logits, np.float64) / temperature
    if top_k:
        x = np.where(x >= np.sort(x)[-top_k], x, -np.inf)
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.mark.parametrize("point_mass", [True, False], ids=["point-mass", "draft-probs"])
def test_rejection_sampling_keeps_the_target_distribution(point_mass):
    """verify_drafts over 20,000 seeds for one row: each position's token (the first
    three, accepted or drawn from the residual) has the target's distribution, with a
    draft distribution far from it."""
    v, k, runs = 12, 2, 20000
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(0, 1.5, (1, k + 1, v)), jnp.float32)
    q = rng.dirichlet(np.full(v, 0.3), k).astype(np.float32)  # a poor draft
    sp = SamplingParams(temperature=0.8, top_k=6)
    st = SamplingTensors.build([sp], 1)
    flags = SamplerFlags.for_params([sp])

    qd = jnp.asarray(q)
    # point mass: the verifier is told nothing of q (a point mass on each drafted token),
    # which is exact for any way of choosing the draft, random ones included
    probs = None if point_mass else qd[None]

    def one(seed):
        s = dataclasses.replace(st, seed=jnp.asarray([seed], jnp.uint32))
        key = jax.random.key(seed + 12345)
        draft = jax.vmap(lambda kk, qq: jax.random.categorical(kk, jnp.log(qq)))(
            jax.random.split(key, k), qd)
        tokens, n = verify_drafts(logits, s, flags, jnp.arange(k + 1)[None], draft[None],
                                  jnp.asarray([k]), probs)
        return tokens[0], n[0]

    tokens, n = jax.jit(jax.vmap(one))(jnp.arange(runs, dtype=jnp.uint32))
    tokens, n = np.asarray(tokens), np.asarray(n)
    assert 0 < n.mean() < k  # some drafts kept, some rejected
    # position 0: always defined; its law is p0 whatever was drafted
    _chi_square_ok(tokens[:, 0], _exact(logits[0, 0], 0.8, 6))
    # position 1 given the token at 0 was the draft (then position 1 scores draft 1)
    acc0 = n >= 1
    _chi_square_ok(tokens[acc0, 1], _exact(logits[0, 1], 0.8, 6))


def _chi_square_ok(samples, p):
    """Chi-square goodness of fit, cells with expected count < 5 merged, against the
    critical value at significance 1e-3 (Wilson-Hilferty): a correct sampler fails with
    probability ~1e-3 for a random seed set (the seeds here are fixed, so it is
    deterministic).  Also checks total variation against its sampling scale."""
    samples = np.asarray(samples)
    counts = np.bincount(samples, minlength=len(p)).astype(float)[:len(p) + 1]
    assert counts[len(p):].sum() == 0, "an outcome the target gives probability 0"
    counts = counts[:len(p)]
    expected = p * len(samples)
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    df = len(obs) - 1
    z = 3.09  # one-sided normal quantile of 1e-3
    critical = df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3
    assert chi2 < critical, (chi2, critical, obs, exp)
    tv = 0.5 * np.abs(counts / len(samples) - p).sum()
    assert tv < 3 * np.sqrt(len(p) / len(samples)), tv
    return chi2


# ------------------------------------------------------------------------------ engine


@pytest.fixture(scope="module")
def greedy_workload(model):
    """Prompts + greedy params (n > 1, stop strings, ignore_eos, min_tokens, penalties);
    stop strings are cut from the middle of a pilot run's text."""
    texts = _texts()
    pilot = make_engine(model).generate(
        texts, [SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)] * len(texts))
    sps = []
    for i, o in enumerate(pilot):
        kw = dict(temperature=0.0, max_tokens=8 + (i * 7) % 30)
        text = o.outputs[0].text
        if i % 4 == 1 and len(text) > 12:
            kw["stop"] = [text[6:9]]
        if i % 5 == 2:
            kw["n"] = 2
        if i % 3 == 0:
            kw["ignore_eos"] = True
        if i % 7 == 4:
            kw["min_tokens"] = 4
        if i % 6 == 5:  # greedy over penalised logits: each position counts the drafts
            kw.update(repetition_penalty=1.3, frequency_penalty=0.4)
        sps.append(SamplingParams(**kw))
    return texts, sps


def _tokens(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


@pytest.mark.parametrize("name, kw", [
    ("chunked+prefix-cache", dict(max_num_batched_tokens=32)),
    ("small-pool", dict(num_pages=88)),  # every request fits alone (none is ignored)
])
def test_greedy_equals_plain_engine(model, greedy_workload, name, kw):
    """20 prompts of mixed lengths (n > 1, stop strings, min_tokens): prompt lookup, a
    noisy oracle draft (long accepted runs, rejections anywhere) and early exit (drafts
    made in the step over the target's pages) give the plain engine's tokens and text,
    with chunked prefill and prefix caching, or a pool that preempts."""
    texts, sps = greedy_workload
    want = make_engine(model, **kw).generate(texts, sps)
    for method in ("ngram", "oracle", "early_exit"):
        eng = make_engine(model, EARLY_EXIT if method == "early_exit" else NGRAM, **kw)
        if method == "oracle":
            use_proposer(eng, OracleProposer(want, model[1].vocab_size))
        got = eng.generate(texts, sps)
        assert _tokens(got) == _tokens(want), method
        assert ([[c.text for c in o.outputs] for o in got]
                == [[c.text for c in o.outputs] for o in want]), method
        st = next(iter(eng.stats.spec.values()))
        assert st.drafted_tokens > 0, method
        if method == "ngram":  # what /metrics shows (the oracle replaced the proposer)
            assert _spec_metrics(eng) == {
                "vllm:spec_decode_num_drafts_total": st.verifies,
                "vllm:spec_decode_num_draft_tokens_total": st.drafted_tokens,
                "vllm:spec_decode_num_accepted_tokens_total": st.accepted_tokens,
                "jaxllm:spec_decode_num_emitted_tokens_total": st.emitted_tokens,
                "jaxllm:spec_decode_disabled_steps_total": st.disabled_steps}
        if method == "oracle":
            assert st.mean_accepted_length > 2 and st.accepted_tokens < st.drafted_tokens, st
        if name == "small-pool":
            assert eng.num_preemptions > 0
        eng.allocator.check_invariants()
        assert eng.allocator.num_free_blocks == eng.allocator.num_usable_blocks


def _check_kv_after_rejection(eng, st, params, cfg, text, sp) -> None:
    """Run one request of ``text`` until a verify rejected drafts (``st``: the method's
    stats), then take a plain step by hand: its log-probs equal a from-scratch forward of
    the kept tokens (1e-5), and the rejected drafts' pages are gone."""
    rid = eng.add_request(None, text, dataclasses.replace(sp, max_tokens=60))
    rejected = st.drafted_tokens - st.accepted_tokens
    while st.drafted_tokens - st.accepted_tokens == rejected:
        eng.step()
    seq = eng.scheduler.get_request(rid).seqs[0]
    assert seq.num_uncomputed_tokens == 1
    assert len(seq.block_table) == -(-seq.num_computed_tokens // BASE["page_size"])
    batch = eng.scheduler.schedule()
    row = RowParams(logprobs=cfg.vocab_size, stop_ids=())
    res = eng.runner.execute(batch, [[SampleRow(row, seq.num_output_tokens)]])
    _, top_ids, top_lps = res.logprobs[0][0][0]
    got = np.full(cfg.vocab_size, np.nan)
    got[np.asarray(top_ids)] = top_lps
    full = llama.logits(params, cfg, jnp.asarray([seq.token_ids]), attn_impl="xla")[0, -1]
    np.testing.assert_allclose(got, jax.nn.log_softmax(full), atol=1e-5)
    eng.scheduler.update(batch, [int(res.tokens[0][0][0])])
    eng.abort(rid)


def test_poor_draft_greedy_still_exact_and_kv_consistent(model):
    """Drafts that are nearly always wrong: outputs still equal the plain engine's, and
    after rejections the next step's log-probs equal a from-scratch forward (1e-5)."""
    tok, cfg, params = model
    texts = _texts(6)
    sp = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    want = make_engine(model).generate(texts, sp)
    eng = use_proposer(make_engine(model, NGRAM), PoorProposer(cfg.vocab_size, point_mass=True),
                       adaptive=False)
    assert _tokens(eng.generate(texts, sp)) == _tokens(want)
    st = eng.stats.spec["poor"]
    assert st.drafted_tokens > st.accepted_tokens and st.verifies > 0

    _check_kv_after_rejection(eng, st, params, cfg, texts[1], sp)


def test_logprobs_with_speculation_equal_plain(model):
    """Requests that want log-probs speculate too: each kept draft and the bonus token
    carry the log-probs plain decoding gives them (same top ids; values within float
    rounding of a 4-row vs 1-row forward), penalties counted per position."""
    texts = _texts(6)
    sps = [SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=3,
                          **(dict(repetition_penalty=1.3) if i % 2 else {}))
           for i in range(len(texts))]
    want = make_engine(model).generate(texts, sps)
    eng = use_proposer(make_engine(model, NGRAM), OracleProposer(want, model[1].vocab_size))
    got = eng.generate(texts, sps)
    st = next(iter(eng.stats.spec.values()))
    assert st.mean_accepted_length > 2 and st.accepted_tokens < st.drafted_tokens, st
    assert _tokens(got) == _tokens(want)
    for g, w in zip(got, want):
        g, w = g.outputs[0], w.outputs[0]
        assert len(g.logprobs) == len(w.logprobs) == len(w.token_ids)
        for dg, dw in zip(g.logprobs, w.logprobs):
            assert dg.keys() == dw.keys()
            np.testing.assert_allclose([dg[t] for t in dw], list(dw.values()), atol=1e-5)
        np.testing.assert_allclose(g.cumulative_logprob, w.cumulative_logprob, atol=1e-4)


def test_abort_and_preemption_mid_speculation_lose_nothing(model):
    """Abort a request right after a verify step and run with a pool that forces
    preemption: the others' outputs equal the plain engine's, every page comes back."""
    texts = _texts(20)[6:14]
    sp = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    want = _tokens(make_engine(model, num_pages=48).generate(texts, sp))
    eng = make_engine(model, NGRAM, num_pages=48)
    ids = [eng.add_request(None, t, sp) for t in texts]
    done, aborted = {}, None
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = [c.token_ids for c in o.outputs]
        if aborted is None and eng.stats.spec["ngram"].verifies > 2:
            aborted = next(r for r in ids if r not in done)
            eng.abort(aborted)
    assert eng.num_preemptions > 0
    for i, rid in enumerate(ids):
        if rid != aborted:
            assert done[rid] == want[i], i
    eng.allocator.check_invariants()
    assert eng.allocator.num_free_blocks == eng.allocator.num_usable_blocks


def _spec_metrics(eng) -> dict[str, float]:
    """The server's /metrics text for ``eng`` (as scraped), its speculative samples."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from jaxllm.engine.async_engine import AsyncLLMEngine
    from jaxllm.serve.metrics import Metrics

    m = Metrics("m", AsyncLLMEngine(eng).snapshot, in_flight=lambda: 0)
    text = generate_latest(m.registry).decode()
    return {s.name: s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples if "spec_decode" in s.name and s.labels["method"] == "ngram"}


def test_load_aware_switch_off(model):
    texts = _texts(6)
    sp = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    want = _tokens(make_engine(model).generate(texts, sp))
    eng = make_engine(model, {**NGRAM, "disable_by_batch_size": 4})
    assert _tokens(eng.generate(texts, sp)) == want
    st = eng.stats.spec["ngram"]
    assert st.disabled_steps > 0  # while 4+ sequences decoded
    assert _spec_metrics(eng)["jaxllm:spec_decode_disabled_steps_total"] == st.disabled_steps
    off = make_engine(model, {**NGRAM, "disable_by_batch_size": 1})
    assert _tokens(off.generate(texts, sp)) == want
    assert off.stats.spec["ngram"].drafted_tokens == 0


def test_sampled_requests_are_seeded_and_reproducible(model):
    texts = _texts(4)
    sps = [SamplingParams(temperature=0.9, top_p=0.9, max_tokens=16, seed=7 + i,
                          repetition_penalty=1.1, ignore_eos=True) for i in range(4)]
    a = _tokens(make_engine(model, NGRAM).generate(texts, sps))
    eng = make_engine(model, NGRAM)
    b = _tokens(eng.generate(texts, sps))
    assert a == b
    assert eng.stats.spec["ngram"].verifies > 0


class HiddenCheckingProposer(OracleProposer):
    """An oracle draft that records the hidden state the engine hands it."""

    needs_hidden = True

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.seen = []

    def propose(self, requests):
        self.seen += [(tuple(r.token_ids), np.asarray(r.hidden)) for r in requests]
        return super().propose(requests)


@pytest.mark.slow  # many verify shapes, compiled on a loaded CPU in ~2 min
def test_hidden_states_for_draft_heads(model):
    """A proposer that needs hidden states gets, for each sequence, the target's final
    hidden state at the position that produced its last token (after prefills, plain
    decodes, multi-step decodes and verifies alike)."""
    tok, cfg, params = model
    texts = _texts(5)
    sp = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    want = make_engine(model).generate(texts, sp)
    eng = make_engine(model, NGRAM)
    prop = use_proposer(eng, HiddenCheckingProposer(want, cfg.vocab_size, noise=0.4),
                        adaptive=True).speculator.proposer
    assert eng.speculator.needs_hidden and eng.runner.return_hidden
    assert _tokens(eng.generate(texts, sp)) == _tokens(want)
    assert len(prop.seen) > 10
    for ids, hidden in prop.seen[::3]:
        h, _ = llama.forward(params, cfg, jnp.asarray([ids[:-1]]),
                             jnp.arange(len(ids) - 1)[None],
                             llama.full_attention_fn(cfg, impl="xla"))
        np.testing.assert_allclose(hidden, h[0, -1], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["medusa", "eagle"])
def test_draft_head_methods_run_exactly(model, tmp_path, method):
    """Untrained Medusa / EAGLE heads saved and loaded by name through the config: the
    engine's greedy output equals the plain engine's."""
    from jaxllm.spec import heads

    tok, cfg, params = model
    hcfg = heads.HeadsConfig(method, 3, cfg)
    heads.save_heads(tmp_path / method, hcfg, heads.init_heads(hcfg, jax.random.key(0)))
    texts = _texts(4)
    sp = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    want = _tokens(make_engine(model).generate(texts, sp))
    eng = make_engine(model, {"method": method, "num_speculative_tokens": 3,
                              "model": str(tmp_path / method), "disable_by_batch_size": None})
    assert _tokens(eng.generate(texts, sp)) == want
    assert eng.stats.spec[method].verifies > 0
    with pytest.raises(ValueError, match="exceeds the 3 Medusa heads|holds"):
        make_engine(model, {"method": "eagle" if method == "medusa" else "medusa",
                            "num_speculative_tokens": 4, "model": str(tmp_path / method)})


@pytest.mark.slow  # compiles a second engine's programs
def test_draft_model_runs_exactly(model, tmp_path):
    """A smaller random draft model with the target's vocabulary (loaded from an HF
    directory): greedy output equals the plain engine's; a draft with another
    vocabulary is refused at start."""
    from conftest import save_tiny_hf

    tok, cfg, params = model
    texts = _texts(4)
    sp = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    want = _tokens(make_engine(model).generate(texts, sp))
    draft_dir, _ = save_tiny_hf(tmp_path, "llama", vocab_size=cfg.vocab_size,
                                num_hidden_layers=1, hidden_size=32, intermediate_size=48)
    eng = make_engine(model, {"method": "draft_model", "num_speculative_tokens": 3,
                              "model": str(draft_dir), "disable_by_batch_size": None})
    assert _tokens(eng.generate(texts, sp)) == want
    assert eng.stats.spec["draft_model"].verifies > 0
    other, _ = save_tiny_hf(tmp_path / "other", "llama", vocab_size=128)
    with pytest.raises(ValueError, match="vocabulary of 128 tokens"):
        make_engine(model, {"method": "draft_model", "num_speculative_tokens": 2,
                            "model": str(other)})


def test_early_exit_drafts_in_the_targets_step_over_its_pages(model):
    """Early exit keeps no second model or cache: each verify step drafts with the
    target's first layer over the target's own pages.  Its drafts are exactly the greedy
    tokens of that truncated model (a from-scratch forward of the first layer + final
    norm + LM head); after a rejection the next step's log-probs equal a from-scratch
    forward of the full model; every page comes back; a layer count the target does not
    have is refused at start."""
    from jaxllm.spec.early_exit import early_exit_params

    tok, cfg, params = model
    texts = _texts(6)
    sp = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    want = make_engine(model).generate(texts, sp)
    eng = make_engine(model, EARLY_EXIT)
    assert eng.runner.draft_layers == 1 and not hasattr(eng.speculator.proposer, "engine")
    assert _tokens(eng.generate(texts, sp)) == _tokens(want)
    st = eng.stats.spec["early_exit"]
    assert st.verifies > 0 and 0 < st.accepted_tokens < st.drafted_tokens, st
    assert eng.allocator.num_free_blocks == eng.allocator.num_usable_blocks

    # every verify's drafts, with the sequence's tokens before it
    seen = []
    execute = eng.runner.execute

    def spy(out, rows, **kw):
        ctx = {e.seq_id: list(eng.scheduler.get_seq(e.seq_id).token_ids)
               for e in out.scheduled_seqs if e.draft_ids}
        res = execute(out, rows, **kw)
        seen.extend((ctx[e.seq_id], d) for e, d in zip(out.scheduled_seqs, res.drafts or ())
                    if d)
        return res

    eng.runner.execute = spy
    _check_kv_after_rejection(eng, st, params, cfg, texts[1], sp)
    ee_params, ee_cfg = early_exit_params(params, cfg, 1)
    attn = llama.full_attention_fn(ee_cfg, impl="xla")
    assert seen
    for ctx, drafts in seen:  # the truncated model's greedy continuation, from scratch
        ctx = list(ctx)
        for d in drafts:
            h, _ = llama.forward(ee_params, ee_cfg, jnp.asarray([ctx]),
                                 jnp.arange(len(ctx))[None], attn)
            assert d == int(jnp.argmax(llama.lm_head(ee_params, ee_cfg, h[0, -1:])[0]))
            ctx.append(d)

    with pytest.raises(ValueError, match="early_exit_layers must be in"):
        make_engine(model, {"method": "early_exit", "num_speculative_tokens": 2,
                            "early_exit_layers": cfg.num_layers})


@pytest.mark.slow
def test_engine_sampling_matches_target_distribution(model):
    """20,000 seeded requests through the engine with a deliberately poor sampling draft:
    the joint law of the first 3 tokens (top-k 3, so 27 outcomes) matches the target's
    exact distribution (chi-square, false-failure rate 1e-3; the seeds are fixed).  Token
    1 comes from the prefill, token 2 from a verify of one draft (kept, or drawn from the
    residual), token 3 from the verify's bonus draw or a plain decode.  The draft for
    token 2 is drawn from a wrong distribution over the target's own candidates (most of
    its mass on the least likely one, some outside the top-k), so the residual matters:
    with the residual replaced by ``p`` this test fails."""
    tok, cfg, params = model
    prompt = tok.encode("Arr, matey!", add_special_tokens=False)
    runs, top_k = 20000, 3
    # the exact law: p(t1) p(t2 | t1) p(t3 | t1, t2) from full-sequence logits
    f = jax.jit(lambda t: llama.logits(params, cfg, t, attn_impl="xla")[:, -1])
    p1 = _exact(f(jnp.asarray([prompt]))[0], 1.0, top_k)
    outcomes, probs, table = [], [], {}
    for a in np.flatnonzero(p1):
        p2 = _exact(f(jnp.asarray([prompt + [int(a)]]))[0], 1.0, top_k)
        support = np.flatnonzero(p2)
        q = 0.2 * p2  # poor: 0.5 on the least likely candidate, 0.3 outside the top-k
        q[support[np.argmin(p2[support])]] += 0.5
        q[next(t for t in range(cfg.vocab_size) if t not in support)] += 0.3
        table[tuple(prompt) + (int(a),)] = q / q.sum()
        for b in support:
            p3 = _exact(f(jnp.asarray([prompt + [int(a), int(b)]]))[0], 1.0, top_k)
            for c in np.flatnonzero(p3):
                outcomes.append((a, b, c))
                probs.append(p1[a] * p2[b] * p3[c])
    eng = use_proposer(make_engine(model, NGRAM, max_num_seqs=256, num_pages=700,
                                   max_num_batched_tokens=1024),
                       PoorProposer(cfg.vocab_size, table=table), adaptive=False,
                       disable_by_batch_size=None)
    sps = [SamplingParams(temperature=1.0, top_k=top_k, max_tokens=3, seed=s, ignore_eos=True)
           for s in range(runs)]
    outs = eng.generate([prompt] * runs, sps)
    st = eng.stats.spec["poor"]
    assert st.verifies >= runs and 0 < st.accepted_tokens < st.drafted_tokens
    seen = np.asarray([o.outputs[0].token_ids for o in outs])
    index = {o: i for i, o in enumerate(outcomes)}
    cells = np.asarray([index.get(tuple(r), len(outcomes)) for r in seen])
    assert (cells < len(outcomes)).all(), "a token outside the target's top-k"
    _chi_square_ok(cells, np.asarray(probs))
