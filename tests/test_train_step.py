"""The training step: gradients vs a float64 reference, loss masking, accumulation, remat,
mixed precision, packing through segment ids, and the flash-attention backward."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.models import llama
from jaxllm.train import lora as L
from jaxllm.train import step as S
from jaxllm.train.testing import random_batch, tiny_config

CFG = tiny_config(vocab_size=128)
CFG_QWEN = tiny_config(vocab_size=128, attention_bias=True, tie_word_embeddings=True)
T = 24


@pytest.fixture(scope="module")
def params():
    p = llama.init_params(CFG, jax.random.key(0))
    return jax.tree.map(lambda x: x * 5 if x.ndim > 1 and x.shape[-1] != 128 else x, p)


def _batch(rows=4, segments=2, seed=0, accum=1):
    return S.split_accum(random_batch(np.random.default_rng(seed), rows, T, 128, segments), accum)


# ----------------------------------------------------------------- float64 reference model


def _ref_loss(params, cfg, b, lora=None, lcfg=None):
    """Independent float64 Llama + masked cross-entropy (no jaxllm model code)."""
    x = params["embed"][b["inputs"]]
    bsz, t = b["inputs"].shape
    h_, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2) / hd))
    ang = b["positions"][..., None] * inv
    cos, sin = jnp.cos(ang)[:, :, None], jnp.sin(ang)[:, :, None]

    def rope(z):
        z1, z2 = z[..., :hd // 2], z[..., hd // 2:]
        return jnp.concatenate([z1 * cos - z2 * sin, z2 * cos + z1 * sin], -1)

    def norm(z, w):
        return w * z / jnp.sqrt(jnp.mean(z * z, -1, keepdims=True) + cfg.rms_norm_eps)

    seg = b["segment_ids"]
    mask = (jnp.tril(jnp.ones((t, t), bool))[None] & (seg[:, :, None] == seg[:, None, :]))
    lay = params["layers"]

    def w(name, i):
        m = lay[name][i]
        if lora is not None and name in lcfg.targets:
            m = m + lcfg.scale * lora["layers"][f"{name}_lora_a"][i] @ lora["layers"][f"{name}_lora_b"][i]
        return m

    for i in range(cfg.num_layers):
        h = norm(x, lay["attn_norm"][i])
        q, k, v = h @ w("wq", i), h @ w("wk", i), h @ w("wv", i)
        if cfg.attention_bias:
            q, k, v = q + lay["bq"][i], k + lay["bk"][i], v + lay["bv"][i]
        q = rope(q.reshape(bsz, t, h_, hd))
        k = jnp.repeat(rope(k.reshape(bsz, t, kv, hd)), h_ // kv, axis=2)
        v = jnp.repeat(v.reshape(bsz, t, kv, hd), h_ // kv, axis=2)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
        p = jax.nn.softmax(jnp.where(mask[:, None], s, -1e30), -1)
        x = x + jnp.einsum("bhqk,bkhd->bqhd", p, v).reshape(bsz, t, h_ * hd) @ w("wo", i)
        h = norm(x, lay["mlp_norm"][i])
        x = x + (jax.nn.silu(h @ w("w_gate", i)) * (h @ w("w_up", i))) @ w("w_down", i)
    x = norm(x, params["final_norm"])
    logits = x @ (params["lm_head"] if "lm_head" in params else params["embed"].T)
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, b["targets"][..., None], -1)[..., 0]
    return jnp.sum(nll * b["weights"]) / jnp.sum(b["weights"])


def _grads(sc, trained, frozen, batch):
    @jax.jit
    def f(trained, frozen, batch):
        lsum, n, g = S.accumulate_grads(sc, trained, frozen, batch, jax.random.PRNGKey(0))
        return lsum / n, jax.tree.map(lambda x: x / n, g)
    return f(trained, frozen, batch)


def _assert_tree_close(a, b, rtol=1e-4, atol_frac=1e-4):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol_frac * np.abs(y).max() + 1e-12,
                                   err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("cfg", [CFG, CFG_QWEN], ids=["llama", "qwen2-bias-tied"])
def test_grads_match_float64_reference(cfg):
    p = llama.init_params(cfg, jax.random.key(1))
    batch = _batch(segments=2)
    loss, g = _grads(S.StepConfig(cfg, attn_impl="xla"), p, None, batch)
    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), p)
        b64 = {k: jnp.asarray(v[0], jnp.float64 if k == "weights" else jnp.int32)
               for k, v in batch.items()}
        ref_loss, ref_g = jax.value_and_grad(_ref_loss)(p64, cfg, b64)
        ref_g, ref_loss = jax.device_get(ref_g), float(ref_loss)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    _assert_tree_close(g, ref_g)


def test_lora_grads_match_float64_reference(params):
    lcfg = L.LoraConfig(rank=4, alpha=8, targets="q,v,o,down")
    lora = L.init_lora(CFG, lcfg, jax.random.PRNGKey(3))
    lora = {"layers": {k: v + 0.05 * jax.random.normal(jax.random.key(4), v.shape)
                       for k, v in lora["layers"].items()}}  # B != 0: every path contributes
    batch = _batch()
    loss, g = _grads(S.StepConfig(CFG, attn_impl="xla", lora=lcfg), lora, params, batch)
    with jax.enable_x64(True):
        f64 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), t)  # noqa: E731
        b64 = {k: jnp.asarray(v[0], jnp.float64 if k == "weights" else jnp.int32)
               for k, v in batch.items()}
        ref_loss, ref_g = jax.value_and_grad(
            lambda lo: _ref_loss(f64(params), CFG, b64, lo, lcfg))(f64(lora))
        ref_g, ref_loss = jax.device_get(ref_g), float(ref_loss)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
    _assert_tree_close(g, ref_g)


def test_loss_mask_prompt_labels_do_not_change_gradients(params):
    sc = S.StepConfig(CFG, attn_impl="xla")
    batch = _batch()
    changed = dict(batch)
    masked = batch["weights"] == 0
    changed["targets"] = np.where(masked, (batch["targets"] + 7) % 128, batch["targets"])
    assert masked.any() and (changed["targets"] != batch["targets"]).any()
    la, ga = _grads(sc, params, None, batch)
    lb, gb = _grads(sc, params, None, changed)
    assert float(la) == float(lb)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # while changing a trained label does change them
    changed["targets"] = np.where(~masked, (batch["targets"] + 7) % 128, batch["targets"])
    lc, _ = _grads(sc, params, None, changed)
    assert float(lc) != float(la)


def _run_steps(sc, params, batches, lr=1e-2, frozen=None):
    sched = S.make_schedule(lr, 10, 2)
    tx = S.make_optimizer(sched, weight_decay=0.1)
    state = S.init_state(params, tx, seed=0)
    step, _ = S.compile_steps(sc, tx, sched)
    losses = []
    for b in batches:
        state, m = step(state, frozen, b)
        losses.append(float(m["loss"]))
    return state, losses


def test_grad_accumulation_equals_one_big_batch(params):
    import optax

    sc = S.StepConfig(CFG, attn_impl="xla")
    rows = random_batch(np.random.default_rng(5), 8, T, 128, 3)
    rows["weights"][:2] = 0  # uneven token counts per micro-batch
    rows["weights"][2, :5] = 0
    l1, g1 = _grads(sc, params, None, S.split_accum(rows, 1))
    l4, g4 = _grads(sc, params, None, S.split_accum(rows, 4))
    np.testing.assert_allclose(float(l4), float(l1), rtol=1e-6)
    _assert_tree_close(g4, g1)
    # and the whole jitted step (SGD, so parameter deltas are the gradients)
    sched = optax.constant_schedule(0.5)
    tx = optax.sgd(sched)
    step, _ = S.compile_steps(sc, tx, sched)
    outs = []
    for accum in (1, 4):
        state, m = step(S.init_state(params, tx), None, S.split_accum(rows, accum))
        outs.append((float(m["loss"]), float(m["tokens"]), state.params))
    assert outs[0][1] == outs[1][1] == rows["weights"].sum()
    np.testing.assert_allclose(outs[1][0], outs[0][0], rtol=1e-6)
    delta = [jax.tree.map(lambda a, b: (np.asarray(a) - np.asarray(b)) / 0.5, o[2], params)
             for o in outs]
    for a, b, g in zip(jax.tree.leaves(delta[1]), jax.tree.leaves(delta[0]), jax.tree.leaves(g1)):
        # float32 parameters of size ~1 quantise the delta to ~1e-7 / lr
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=3e-6)
        np.testing.assert_allclose(b, -np.asarray(g), rtol=1e-3, atol=3e-6)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_policies_give_the_same_gradients(params, remat):
    batch = _batch()
    _, g0 = _grads(S.StepConfig(CFG, attn_impl="xla", remat="none", scan_layers=False),
                   params, None, batch)
    _, g1 = _grads(S.StepConfig(CFG, attn_impl="xla", remat=remat, scan_layers=True,
                                loss_chunk=8), params, None, batch)
    _assert_tree_close(g1, g0, rtol=1e-5, atol_frac=1e-6)


def test_bf16_compute_keeps_float32_master_weights(params):
    batches = [_batch(seed=s) for s in range(3)]
    s32, l32 = _run_steps(S.StepConfig(CFG, attn_impl="xla"), params, batches)
    s16, l16 = _run_steps(S.StepConfig(CFG, "bfloat16", attn_impl="xla"), params, batches)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s16.params))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(s16.opt_state)
               if jnp.issubdtype(x.dtype, jnp.floating))
    np.testing.assert_allclose(l16, l32, rtol=2e-2)


def test_packed_row_logits_equal_each_example_alone(params):
    rng = np.random.default_rng(0)
    lens = [7, 11, 5]
    seqs = [rng.integers(0, 128, n) for n in lens]
    toks = np.concatenate(seqs)[None].astype(np.int32)
    pos = np.concatenate([np.arange(n) for n in lens])[None].astype(np.int32)
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lens)])[None].astype(np.int32)
    f = jax.jit(llama.logits, static_argnames=("cfg", "attn_impl"))
    packed = np.asarray(f(params, CFG, toks, pos, seg, attn_impl="xla"))[0]
    off = 0
    for s in seqs:
        alone = np.asarray(f(params, CFG, s[None].astype(np.int32), attn_impl="xla"))[0]
        np.testing.assert_allclose(packed[off:off + len(s)], alone, atol=2e-5, rtol=0)
        off += len(s)


def _has_flash():
    try:
        import pallas_kernels.flash_attention  # noqa: F401
        return True
    except Exception:  # noqa: BLE001
        return False


@pytest.mark.skipif(not _has_flash(), reason="pallas_kernels.flash_attention not available")
def test_flash_attention_backward_matches_xla(params):
    """Training through the Pallas flash-attention custom_vjp (interpret mode on CPU)."""
    batch = _batch(rows=2, segments=2)
    lx, gx = _grads(S.StepConfig(CFG, attn_impl="xla"), params, None, batch)
    lp, gp = _grads(S.StepConfig(CFG, attn_impl="pallas"), params, None, batch)
    np.testing.assert_allclose(float(lp), float(lx), rtol=1e-5)
    _assert_tree_close(gp, gx, rtol=1e-4, atol_frac=1e-5)


def test_decay_mask_and_schedule():
    p = llama.init_params(CFG_QWEN, jax.random.key(0))
    mask = S.decay_mask(p)
    assert mask["layers"]["wq"] and mask["embed"]
    assert not mask["layers"]["attn_norm"] and not mask["layers"]["bq"] and not mask["final_norm"]
    sched = S.make_schedule(1.0, 100, 10, min_lr_ratio=0.1)
    assert float(sched(0)) == 0.0 and abs(float(sched(10)) - 1.0) < 1e-6
    assert abs(float(sched(100)) - 0.1) < 1e-6 and float(sched(5)) == pytest.approx(0.5)
