"""Medusa / EAGLE draft heads: label shift, loss, propose, save/load and a trained tiny head.

Shapes are tiny and shared so each jitted function compiles once or twice.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.models import llama
from jaxllm.spec import heads as H
from jaxllm.train import data as D
from jaxllm.train import draft_heads as DH
from jaxllm.train.testing import tiny_config

V = 64
CFG = tiny_config(vocab_size=V)


@pytest.fixture(scope="module")
def target():
    """Random tiny target; embedding and LM head widened so its logits are not flat."""
    p = llama.init_params(CFG, jax.random.key(0))
    return {**p, "embed": 20 * p["embed"], "lm_head": 20 * p["lm_head"]}


def _perturbed(hcfg, seed=1):
    """Heads with every parameter moved off its initial value (so proposals differ by head)."""
    p = H.init_heads(hcfg, jax.random.key(seed))
    leaves, tree = jax.tree.flatten(p)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys)])


# --------------------------------------------------------------------------- labels


def _hand_data(K=3):
    """One packed row: sequence A (tokens 10..17, prompt 10,11,12) then B (30..34, prompt 30);
    hidden[t, 0] = t so gathered features name their column."""
    a = D.Example(np.arange(10, 18, dtype=np.int32), np.arange(8) >= 3)
    b = D.Example(np.arange(30, 35, dtype=np.int32), np.arange(5) >= 1)
    rows = D.pack([a, b], seq_len=16)
    assert rows["inputs"].shape == (1, 16)
    hidden = np.zeros((1, 16, 4), np.float32)
    hidden[0, :, 0] = np.arange(16)
    return DH.DistillData(rows["inputs"], rows["targets"], rows["weights"],
                          rows["segment_ids"], hidden)


def test_label_shift_on_a_hand_built_row():
    """Start t of a text x_0 x_1 ...: input f_t, tokens x_{t+1}..x_{t+K+1}; head j's label
    x_{t+1+j} counts only if it is a generated token of the same text."""
    data = _hand_data()
    # row layout: A's inputs 10..16 at cols 0..6 (targets 11..17), B's 30..33 at 7..10
    starts = data.starts()
    # first head's label x_{t+2} must be generated (A: tokens >= 13, so t >= 1 ... t <= 5)
    assert starts[:, 1].tolist() == [1, 2, 3, 4, 5, 7, 8, 9]
    b = DH.gather(data, np.array([[0, 1], [0, 4], [0, 8]], np.int32), 3, future=True)
    # t = 1 (x_1 = 11): tokens x_2..x_5 = 12..15, all labels 13, 14, 15 generated
    assert b["tokens"][0].tolist() == [12, 13, 14, 15]
    assert b["weights"][0].tolist() == [1, 1, 1]
    assert b["hidden"][0, 0] == 1 and b["future"][0, :, 0].tolist() == [2, 3, 4]
    # t = 4 (x_4 = 14): labels 16, 17, then past A's end (the column holds B's first token)
    assert b["tokens"][1, :3].tolist() == [15, 16, 17]
    assert b["weights"][1].tolist() == [1, 1, 0]
    # t = 8 in B (x = 31): labels 33, 34, then past the row's data
    assert b["tokens"][2, :3].tolist() == [32, 33, 34]
    assert b["weights"][2].tolist() == [1, 1, 0]


def test_medusa_head_j_is_trained_on_token_t_plus_1_plus_j():
    """With an identity LM head and zero heads, a head's logits are the hidden state; put
    one-hot(x_{t+1+J}) there and only head J is right on every label."""
    K, J = 3, 2
    data = _hand_data(K)
    r, t = data.starts()[:, 0], data.starts()[:, 1]
    hcfg = H.HeadsConfig("medusa", K, dataclasses.replace(CFG, hidden_size=V,
                                                          tie_word_embeddings=True))
    eye = {"embed": jnp.eye(V)}  # tied: lm_head(h) = h @ I
    hidden = np.zeros((1, 16, V), np.float32)
    for rr, tt in zip(r, t):  # x_{t+1+J} = targets[t + J]
        if tt + J < 16:
            hidden[rr, tt, data.targets[rr, tt + J]] = 10.0
    data.hidden = hidden
    batch = DH.gather(data, data.starts(), K, future=False)
    _, aux = DH.heads_loss(H.init_heads(hcfg, jax.random.key(0)), eye, hcfg, batch)
    hits, count = np.asarray(aux["hits"]), np.asarray(aux["count"])
    assert count[J - 1] > 0 and hits[J - 1] == count[J - 1]
    assert all(hits[j] < count[j] for j in range(K) if j != J - 1)


# --------------------------------------------------------------------------- propose


def _inputs(n=5, seed=0):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(n, CFG.hidden_size)), jnp.float32)
    return hidden, jnp.asarray(rng.integers(0, V, n), jnp.int32)


_propose = jax.jit(H.propose, static_argnames=("cfg", "k"))


def test_medusa_propose_matches_a_numpy_reference(target):
    hcfg = H.HeadsConfig("medusa", 3, CFG)
    hp = _perturbed(hcfg)
    hidden, last = _inputs()
    toks, q = _propose(hp, target, hcfg, hidden, last, k=3)
    h = np.asarray(hidden, np.float64)
    w, b = (np.asarray(x, np.float64) for x in (hp["medusa"]["w"], hp["medusa"]["b"]))
    lm = np.asarray(target["lm_head"], np.float64)
    for j in range(3):
        z = h @ w[j] + b[j]
        logits = (h + z / (1 + np.exp(-z))) @ lm
        np.testing.assert_array_equal(np.asarray(toks[:, j]), logits.argmax(-1))
    np.testing.assert_array_equal(np.asarray(q), np.asarray(jax.nn.one_hot(toks, V)))
    assert toks.dtype == jnp.int32 and q.shape == (5, 3, V) and q.dtype == jnp.float32


def test_eagle_chain_equals_a_causal_forward_over_the_chain(target):
    """The chain's per-step K/V cache gives what the model's full causal forward gives over
    the fused inputs of the chain (final norm with unit weight on both sides)."""
    hcfg = H.HeadsConfig("eagle", 2, CFG)
    hp = _perturbed(hcfg)
    hidden, last = _inputs()
    p = hp["eagle"]
    fuse = lambda tok, feat: jnp.concatenate([target["embed"][tok], feat], -1) @ p["fc"] + p["fc_bias"]  # noqa: E731
    g0, cache = H.eagle_step(hp, target, hcfg, hidden, last, None, 0)
    tok1 = jnp.argmax(llama.lm_head(target, CFG, g0), -1)
    g1, _ = H.eagle_step(hp, target, hcfg, g0, tok1, cache, 1)
    xs = jnp.stack([fuse(last, hidden), fuse(tok1, g0)], axis=1)      # [N, 2, D]
    n = xs.shape[0]
    one = {"embed": xs.reshape(2 * n, -1), "final_norm": jnp.ones(CFG.hidden_size),
           "layers": {k: v[None] for k, v in p["layer"].items()}}
    ref, _ = llama.forward(one, hcfg.layer_config, jnp.arange(2 * n).reshape(n, 2),
                           jnp.broadcast_to(jnp.arange(2), (n, 2)),
                           llama.full_attention_fn(hcfg.layer_config, impl="xla"))
    norm = lambda x: llama.rms_norm(x, jnp.ones(CFG.hidden_size), CFG.rms_norm_eps)  # noqa: E731
    np.testing.assert_allclose(norm(g0), ref[:, 0], atol=1e-5)
    np.testing.assert_allclose(norm(g1), ref[:, 1], atol=1e-5)
    toks, _ = _propose(hp, target, hcfg, hidden, last, k=2)
    np.testing.assert_array_equal(toks[:, 0], tok1)


def test_sampled_proposals_report_the_distribution_they_came_from(target):
    hcfg = H.HeadsConfig("medusa", 2, CFG)
    hp = _perturbed(hcfg)
    hidden, last = _inputs()
    temp = jnp.asarray([0.0, 0.7, 1.0, 0.0, 2.0])
    toks, q = _propose(hp, target, hcfg, hidden, last, k=2, rng=jax.random.key(3),
                       temperature=temp)
    logits = H.head_logits(target, hcfg, H.medusa_hidden(hp, hidden))        # [N, K, V]
    greedy, _ = _propose(hp, target, hcfg, hidden, last, k=2)
    for n, t in enumerate(np.asarray(temp)):
        if t == 0:
            np.testing.assert_array_equal(toks[n], greedy[n])
            np.testing.assert_array_equal(q[n], jax.nn.one_hot(greedy[n], V))
        else:
            np.testing.assert_allclose(q[n], jax.nn.softmax(logits[n] / t, -1), atol=1e-6)
    assert np.all(np.take_along_axis(np.asarray(q), np.asarray(toks)[..., None], -1) > 0)


def test_bad_propose_inputs_raise(target):
    hcfg = H.HeadsConfig("medusa", 2, CFG)
    hp = H.init_heads(hcfg, jax.random.key(0))
    hidden, last = _inputs()
    with pytest.raises(ValueError, match="k=3 drafts need k Medusa heads"):
        H.propose(hp, target, hcfg, hidden, last, 3)
    with pytest.raises(ValueError, match=r"hidden must be \[N, 64\]"):
        H.propose(hp, target, hcfg, hidden[:, :32], last, 2)
    with pytest.raises(ValueError, match="last_token must be"):
        H.propose(hp, target, hcfg, hidden, last[:2], 2)
    with pytest.raises(ValueError, match="method must be one of"):
        H.HeadsConfig("hydra", 2, CFG)


# --------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def tiny_distill(target):
    """Target features of counting texts (x_{t+1} = x_t + 1 mod V) over the tiny model."""
    rng = np.random.default_rng(0)
    exs = []
    for _ in range(40):
        a, b = rng.integers(0, V, 2)
        toks = ((a + np.arange(40)) % V).astype(np.int32)
        exs.append(D.Example(toks, np.arange(40) >= 6))
    return DH.target_features(target, CFG, exs, seq_len=64, batch_rows=8)


@pytest.mark.parametrize("method", ["medusa", "eagle"])
def test_loss_falls_and_saved_heads_reload_identically(method, target, tiny_distill, tmp_path):
    hcfg = H.HeadsConfig(method, 2, CFG, "tiny")
    tc = DH.HeadsTrainConfig(steps=40, batch_size=256, lr=1e-2, log_every=20, warmup_steps=0)
    params, hist = DH.train_heads(hcfg, target, tiny_distill, tc, log=lambda s: None)
    losses = [h["loss"] for h in hist]
    assert losses[-1] < 0.5 * losses[0] and losses[-1] < losses[-2], losses
    H.save_heads(tmp_path / "heads", hcfg, params, extra={"steps": 40})
    cfg2, params2 = H.load_heads(tmp_path / "heads", target=CFG)
    assert cfg2 == hcfg
    hidden, last = _inputs()
    for kw in ({}, {"rng": jax.random.key(1), "temperature": 0.8}):
        a = _propose(params, target, hcfg, hidden, last, k=2, **kw)
        b = _propose(params2, target, cfg2, hidden, last, k=2, **kw)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_mismatched_or_broken_heads_raise_clear_errors(target, tmp_path):
    hcfg = H.HeadsConfig("medusa", 2, CFG, "tiny")
    d = H.save_heads(tmp_path / "h", hcfg, H.init_heads(hcfg, jax.random.key(0)))
    with pytest.raises(ValueError, match=r"trained for tiny\) do not match.*hidden size 64 != "
                                         r"the target's 96"):
        H.load_heads(d, target=dataclasses.replace(CFG, hidden_size=96, head_dim=24))
    with pytest.raises(ValueError, match="vocabulary 64 != the target's 128"):
        H.load_heads(d, target=dataclasses.replace(CFG, vocab_size=128))
    with pytest.raises(FileNotFoundError, match="draft_heads.json"):
        H.load_heads(tmp_path / "nowhere")
    bad = {"medusa": {"w": np.zeros((2, 64, 32), np.float32), "b": np.zeros((2, 64), np.float32)}}
    with pytest.raises(ValueError, match=r"medusa.w: \(2, 64, 32\) \(expected \(2, 64, 64\)\)"):
        H.save_heads(tmp_path / "bad", hcfg, bad)
    meta = json.loads((d / H.CONFIG_FILE).read_text())
    (d / H.CONFIG_FILE).write_text(json.dumps({**meta, "num_heads": 3}))
    with pytest.raises(ValueError, match="array shapes do not match"):
        H.load_heads(d)
    (d / H.CONFIG_FILE).write_text(json.dumps({**meta, "method": "hydra"}))
    with pytest.raises(ValueError, match="method must be one of"):
        H.load_heads(d)


def test_trained_heads_predict_the_targets_greedy_continuation(tiny_llama):
    """Self-distil a tiny random Llama through ``LLM.generate``, train Medusa heads briefly
    and count held-out positions where head j's top-1 is the target's token x_{t+1+j}:
    far above chance and over 4x the best constant guess (the commonest training label)."""
    from jaxllm import LLM

    path, _, _ = tiny_llama
    llm = LLM(path, max_model_len=128, num_pages=64, max_num_seqs=32)
    rng = np.random.default_rng(1)
    prompts = [("ids", rng.integers(3, 128, rng.integers(3, 8)).tolist()) for _ in range(56)]
    exs = DH.distill_examples(llm, prompts, max_tokens=32)
    assert all(int(e.mask.sum()) >= 1 for e in exs)
    train = DH.target_features(llm.params, llm.config, exs[:48], seq_len=64)
    held = DH.target_features(llm.params, llm.config, exs[48:], seq_len=64)
    hcfg = H.HeadsConfig("medusa", 2, llm.config)
    tc = DH.HeadsTrainConfig(steps=150, batch_size=256, lr=3e-3, log_every=150)
    params, _ = DH.train_heads(hcfg, llm.params, train, tc, log=lambda s: None)
    vocab = llm.config.vocab_size
    batch = DH.gather(held, held.starts(), 2, future=False)
    drafts, _ = _propose(params, llm.params, hcfg, jnp.asarray(batch["hidden"]),
                         jnp.asarray(batch["tokens"][:, 0]), k=2)
    labels = train.targets[train.weights > 0]
    common = np.bincount(labels, minlength=vocab).argmax()
    for j in range(2):
        w = batch["weights"][:, j] > 0
        n = int(w.sum())
        hits = int((np.asarray(drafts[:, j]) == batch["tokens"][:, j + 1])[w].sum())
        const = int((batch["tokens"][:, j + 1] == common)[w].sum())
        # P(Binomial(n, 1/V) >= hits) < 1e-9: hits is not luck at chance level
        tail = sum(math.comb(n, i) * (1 / vocab) ** i * (1 - 1 / vocab) ** (n - i)
                   for i in range(hits, n + 1))
        assert n >= 100 and tail < 1e-9 and hits > 4 * max(const, n / vocab), (j, n, hits, const)


def test_finetune_draft_heads_cli_end_to_end(tiny_sft, tmp_path):
    """``jaxllm finetune --draft-heads``: distil chat prompts with the model, train, write a
    heads directory that loads against the model (and a clear error for a bad combination)."""
    from jaxllm.cli import main
    from jaxllm.weights.hf import save_hf

    tok, cfg, params, _ = tiny_sft
    base = save_hf(tmp_path / "base", cfg, params, tokenizer=tok)
    records = (Path(__file__).parent / "data" / "captain_byte.jsonl").read_text().splitlines()
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(records[:12]) + "\n")
    out = tmp_path / "heads"
    argv = ["finetune", "--draft-heads", "eagle", "--model", str(base), "--data", str(data),
            "--num-heads", "2", "--distill-max-tokens", "6", "--distill-pages", "64",
            "--seq-len", "64", "--batch-size", "2", "--steps", "3", "--lr", "1e-3",
            "--eval-fraction", "0.25", "--log-every", "1", "-o", str(out)]
    assert main(argv) == 0
    hcfg, heads = H.load_heads(out, target=cfg)
    assert (hcfg.method, hcfg.num_heads, hcfg.target_model) == ("eagle", 2, str(base))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and "eval_accept_2" in summary
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]
    assert main([*argv, "--lora"]) == 2  # heads train on a frozen target
