"""Tensor / pipeline / data parallelism on 8 virtual CPU devices (float32).

The device tests need 8 CPU devices, which must be configured before JAX starts, so
they run in ONE subprocess (``test_sharding_suite_on_8_cpu_devices`` re-runs this file
with ``JAXLLM_SHARDING_TESTS=1``); the rest of the test session keeps its single
device.  Run them directly with::

    JAXLLM_SHARDING_TESTS=1 python -m pytest tests/test_sharding.py

Device-free checks (rules, errors, request partitioning, flags) run in-process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import multihost_worker as W

INNER = os.environ.get("JAXLLM_SHARDING_TESTS") == "1"
ROOT = Path(__file__).resolve().parents[1]
N_DEVICES = 8


# ============================================================================ device-free tests

def test_logical_axes_parallel_to_param_shapes():
    import jax

    from jaxllm.models import llama
    from sharding import rules

    for cfg in (W.CFG, _variant(attention_bias=True, tie_word_embeddings=True)):
        shapes = llama.param_shapes(cfg)
        axes = rules.logical_axes(cfg)
        is_shape = lambda x: isinstance(x, tuple) and all(isinstance(i, int) for i in x)  # noqa
        assert jax.tree.structure(shapes, is_leaf=is_shape) == \
            jax.tree.structure(axes, is_leaf=rules._is_axes)
        for s, a in zip(jax.tree.leaves(shapes, is_leaf=is_shape),
                        jax.tree.leaves(axes, is_leaf=rules._is_axes)):
            assert len(s) == len(a) and set(a) <= set(rules.RULES)


def test_plan_checks_divisibility_and_repeats_kv_heads():
    from sharding import make_plan

    with pytest.raises(ValueError, match=r"num_heads=8 is not divisible by tp=3"):
        make_plan(W.CFG, tp=3)
    with pytest.raises(ValueError, match=r"num_layers=4 is not divisible by pp=3"):
        make_plan(W.CFG, pp=3)
    with pytest.raises(ValueError, match=r"intermediate_size"):
        make_plan(_variant(intermediate_size=100), tp=8)
    assert make_plan(W.CFG, tp=4).kv_repeat == 1
    p = make_plan(W.CFG, tp=8)  # 4 kv heads on 8 shards: each kv head twice
    assert p.kv_repeat == 2 and p.model_cfg.num_kv_heads == 8 and p.local_cfg.num_kv_heads == 1
    assert make_plan(_variant(num_kv_heads=1), tp=4).kv_repeat == 4  # MQA
    with pytest.raises(ValueError, match="repeating kv heads"):  # 6 kv on tp=4 -> 12 !| 12?
        make_plan(_variant(num_heads=6, num_kv_heads=6, head_dim=8), tp=4)
    assert not make_plan(_variant(vocab_size=100), tp=8).vocab_sharded


def test_quantized_row_parallel_weights_fit_the_mesh():
    """A row-parallel quantized weight split inside a group is regrouped to the shard's
    length with the same values; a split that cuts a group / GGUF block names the weight;
    a row-parallel W8A8 weight run per shard learns to reduce its activation scale."""
    from jaxllm.quant import W8A8Array, quantize_int4, quantize_int8, quantize_w8a8
    from sharding import make_plan, rules

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 48)).astype(np.float32)  # wo [heads*hd, D]: K = 64
    ax = ("heads", "embed")
    for q, tp, group in [(quantize_int8(w), 4, 16), (quantize_int4(w, 32), 4, 16),
                         (quantize_int4(w, 32), 2, 32)]:
        fit = rules.fit_to_mesh("wo", q, ax, make_plan(W.CFG, tp=tp))
        assert fit.group_size == group and fit.scales.shape == (64 // group, 48)
        np.testing.assert_array_equal(np.asarray(fit.dequantize()), np.asarray(q.dequantize()))
    gguf = quantize_int4(w, 32)._replace(packing="gguf32")
    with pytest.raises(ValueError, match=r"'layers.wo' cannot be split 4 ways .* gguf32 "
                                         r"blocks of 32"):
        rules.fit_to_mesh("layers.wo", gguf, ax, make_plan(W.CFG, tp=4))
    assert rules.fit_to_mesh("wq", quantize_int4(w, 32), ("embed", "heads"),
                             make_plan(W.CFG, tp=8)).group_size == 32  # column-parallel
    w8 = rules.fit_to_mesh("wo", quantize_w8a8(w), ax, make_plan(W.CFG, tp=2))
    assert isinstance(w8, W8A8Array) and w8.act_axis == "tensor"
    assert rules.fit_to_mesh("wo", quantize_w8a8(w), ax, make_plan(W.CFG, tp=2),
                             per_shard=False).act_axis is None  # GSPMD sees all of K


def test_bubble_fraction_and_microbatch_choice():
    from sharding.pipeline import bubble_fraction, choose_microbatches

    assert bubble_fraction(1, 1) == 0
    assert bubble_fraction(4, 4) == pytest.approx(3 / 7)
    assert bubble_fraction(2, 8) == pytest.approx(1 / 9)
    assert choose_microbatches(8, 4) == 4 and choose_microbatches(6, 4) == 3
    assert choose_microbatches(1, 4) == 1 and choose_microbatches(8, 1) == 1
    assert choose_microbatches(8, 2, target=8) == 8


def test_partition_requests_balances_and_gathers_in_order():
    from sharding.data_parallel import gather_results, partition_requests

    reqs = [5, 1, 9, 3, 3, 7, 2]
    parts = partition_requests(reqs, 3, cost=lambda r: r)
    assert sorted(i for p in parts for i in p) == list(range(len(reqs)))
    loads = [sum(reqs[i] for i in p) for p in parts]
    assert max(loads) - min(loads) <= max(reqs)
    assert parts == partition_requests(reqs, 3, cost=lambda r: r)  # deterministic
    results = [[f"out{reqs[i]}" for i in p] for p in parts]
    assert gather_results(parts, results) == [f"out{r}" for r in reqs]
    assert partition_requests([1, 2], 4) == [[0], [1], [], []]


def test_distributed_flags_and_env(monkeypatch):
    import argparse

    from jaxllm.cli import add_distributed_args
    from sharding import distributed as D

    for var in sum(D.ENV.values(), ()):
        monkeypatch.delenv(var, raising=False)
    assert D.resolve() is None  # single process
    assert D.initialize() is False
    p = argparse.ArgumentParser()
    add_distributed_args(p)
    args = p.parse_args(["--tp", "2", "--pp", "2", "--coordinator", "h:1", "--num-processes",
                         "2", "--process-id", "1"])
    assert D.parallel_kwargs(args) == {"tp": 2, "pp": 2, "dp": 1}
    assert D.resolve("h:1", 2, 1)["process_id"] == 1
    monkeypatch.setenv("JAXLLM_COORDINATOR", "10.0.0.1:999")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAXLLM_PROCESS_ID", "3")
    assert D.resolve() == {"coordinator_address": "10.0.0.1:999", "num_processes": 4,
                           "process_id": 3, "local_device_ids": None}
    with pytest.raises(ValueError, match=r"process_id must be in \[0, 4\)"):
        D.resolve(process_id=7)
    monkeypatch.delenv("JAXLLM_PROCESS_ID")
    with pytest.raises(ValueError, match="missing: process_id"):
        D.resolve()


def _variant(**kw):
    import dataclasses

    return dataclasses.replace(W.CFG, **kw)


# ============================================================================ the 8-device suite

if not INNER:
    def test_sharding_suite_on_8_cpu_devices():
        """Runs the device tests below in a fresh interpreter with 8 CPU devices."""
        # no persistent compilation cache in the 8-device interpreter: in full-suite runs it
        # aborted inside XLA:CPU executing a program (passes alone); compiling fresh is ~1 min
        env = {**os.environ, "JAXLLM_SHARDING_TESTS": "1", "JAX_PLATFORMS": "cpu",
               "JAXLLM_COMPILATION_CACHE": "0",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        r = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
             "--durations=5", __file__],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        tail = (r.stdout + r.stderr)[-8000:]
        print(tail)
        assert r.returncode == 0, tail

else:
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_num_cpu_devices", N_DEVICES)

    import sharding
    from jaxllm.generation import StaticBatch
    from jaxllm.models import llama
    from sharding import model as sharded_model
    from sharding import rules

    # (dp, pp, tp): every combination of dp in {1,2}, pp in {1,2,4}, tp in {1,2,4,8} on <= 8 devices
    LAYOUTS = [(dp, pp, tp) for dp in (1, 2) for pp in (1, 2, 4) for tp in (1, 2, 4, 8)
               if dp * pp * tp <= N_DEVICES]
    GEN_LAYOUTS = [(1, 1, 8), (2, 1, 4), (1, 2, 1), (1, 4, 2), (2, 2, 2), (2, 4, 1)]

    def _ids(layouts):
        return [f"dp{d}-pp{p}-tp{t}" for d, p, t in layouts]

    @pytest.fixture(scope="module")
    def host():
        return W.host_params()

    @pytest.fixture(scope="module")
    def tokens():
        return jnp.asarray(np.random.default_rng(1).integers(0, W.CFG.vocab_size, (4, 16)),
                           jnp.int32)

    @pytest.fixture(scope="module")
    def ref_logits(host, tokens):
        params = jax.tree.map(jnp.asarray, host)
        return np.asarray(jax.jit(llama.logits, static_argnums=1)(params, W.CFG, tokens))

    @pytest.fixture(scope="module")
    def ref_tokens(host):
        params = jax.tree.map(jnp.asarray, host)
        sb = StaticBatch(params, W.CFG, W.PROMPTS, [W.greedy()] * len(W.PROMPTS), (),
                         max_model_len=256, impl="xla")
        sb.step(100)
        out, num, _ = sb.fetch()
        toks = [[int(t) for t in out[i, :num[i]]] for i in range(len(W.PROMPTS))]
        assert len({tuple(t) for t in toks}) > 1
        return toks

    def test_eight_devices():
        assert jax.device_count() == N_DEVICES

    def test_make_mesh_axes_and_errors():
        mesh = sharding.make_mesh(dp=2, tp=2, pp=2)
        assert mesh.axis_names == ("data", "pipeline", "tensor")
        assert dict(mesh.shape) == {"data": 2, "pipeline": 2, "tensor": 2}
        assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
        # tensor is the innermost axis: a tensor group is consecutive devices
        assert [d.id for d in mesh.devices[0, 0]] == [0, 1]
        with pytest.raises(ValueError, match="16 devices requested"):
            sharding.make_mesh(dp=2, tp=4, pp=2)
        with pytest.raises(ValueError, match=r"devices=jax.devices\(\)\[:4\]"):
            sharding.make_mesh(tp=4)
        assert sharding.make_mesh(tp=4, devices=jax.devices()[:4]).devices.size == 4
        with pytest.raises(ValueError, match="tp must be an integer >= 1"):
            sharding.make_mesh(tp=0)
        with pytest.raises(ValueError, match="does not fit the model"):
            sharding.setup(W.CFG, W.host_params(), tp=3)

    def test_per_device_param_bytes_shrink_with_tp_and_pp(host):
        total = sum(x.nbytes for x in jax.tree.leaves(host))
        layer_mats = sum(host["layers"][k].nbytes for k in host["layers"] if "norm" not in k)
        norms = sum(host["layers"][k].nbytes for k in host["layers"] if "norm" in k)
        vocab = host["embed"].nbytes + host["lm_head"].nbytes
        rest = total - layer_mats - norms - vocab  # final_norm
        for dp, pp, tp in [(1, 1, 2), (1, 1, 4), (1, 2, 1), (1, 4, 1), (1, 2, 4), (2, 2, 2)]:
            model, placed = sharding.setup(W.CFG, host, dp=dp, tp=tp, pp=pp)
            per_dev = sharding.per_device_bytes(placed)
            assert len(per_dev) == dp * pp * tp
            # layer matrices: 1/(tp*pp); norms: 1/pp; embedding + head: 1/tp; final norm: all
            want = layer_mats // (tp * pp) + norms // pp + vocab // tp + rest
            assert set(per_dev.values()) == {want}, (dp, pp, tp, per_dev, want)
            # and from the shardings themselves: every shard is 1/(product of its mesh axes)
            for leaf, ax in zip(jax.tree.leaves(placed),
                                jax.tree.leaves(model.logical_axes(), is_leaf=rules._is_axes)):
                split = 1
                for a in ax:
                    m = model.plan.rules.get(a)
                    split *= {"data": dp, "pipeline": pp, "tensor": tp}.get(m, 1) if m else 1
                assert leaf.addressable_shards[0].data.nbytes * split == leaf.nbytes

    def test_stacked_layout_for_gspmd_users(host):
        mesh = sharding.make_mesh(tp=4, pp=2)
        placed = sharding.place_params(host, W.CFG, mesh)  # canonical stacked layout
        wq = placed["layers"]["wq"]
        assert wq.sharding.spec == jax.sharding.PartitionSpec("pipeline", None, "tensor")
        np.testing.assert_array_equal(np.asarray(wq), host["layers"]["wq"])
        shardings = sharding.param_shardings(W.CFG, mesh)
        assert shardings["layers"]["w_down"].spec == jax.sharding.PartitionSpec(
            "pipeline", "tensor", None)
        assert shardings["embed"].spec == jax.sharding.PartitionSpec("tensor", None)

    def test_kv_heads_repeated_when_fewer_than_tp(host):
        model, placed = sharding.setup(W.CFG, host, tp=8)
        assert model.plan.kv_repeat == 2
        hd = W.CFG.head_dim
        src = host["layers"]["wk"].reshape(W.CFG.num_layers, W.CFG.hidden_size, 4, hd)
        for i, entry in enumerate(placed["layers"]):  # pp=1: one entry per layer
            wk = entry["wk"]
            assert wk.shape == (1, W.CFG.hidden_size, 8 * hd)
            for shard in wk.addressable_shards:
                t = shard.index[2].start // hd  # tensor shard t owns expanded kv head t
                np.testing.assert_array_equal(np.asarray(shard.data)[0], src[i, :, t // 2])

    QUANT_LAYOUTS = [(1, 1, 4), (2, 2, 2)]

    @pytest.fixture(scope="module")
    def quantized(host, tokens):
        """Per method: (params quantized as ``LLM`` does -- fused, then quantized -- and
        their single-device logits)."""
        from jaxllm.quant import Calibration, QuantizedArray, quantize_params

        def forward(params, toks):
            pos = jnp.broadcast_to(jnp.arange(toks.shape[1]), toks.shape)
            return llama.forward(params, W.CFG, toks, pos, llama.full_attention_fn(W.CFG))[0]

        fused = llama.fuse_projections(host)
        out = {m: quantize_params(fused, m, calibration=Calibration(forward, W.CFG, tokens))
               for m in ("int8", "int4-g32", "w8a8")}
        # GGUF Q4 blocks' nibble order (the int4 codes re-read: a different, valid weight)
        out["gguf32"] = jax.tree.map(
            lambda x: x._replace(packing="gguf32") if getattr(x, "bits", 8) == 4 else x,
            out["int4-g32"], is_leaf=lambda x: isinstance(x, QuantizedArray))
        run = jax.jit(llama.logits, static_argnums=1)
        return {m: (q, np.asarray(run(q, W.CFG, tokens))) for m, q in out.items()}

    @pytest.mark.parametrize("method", ["int8", "int4-g32", "w8a8", "gguf32"])
    @pytest.mark.parametrize("layout", QUANT_LAYOUTS, ids=_ids(QUANT_LAYOUTS))
    def test_quantized_weights_sharded_match_single_device(method, layout, quantized, tokens):
        """Quantized weights placed on the mesh keep their codes (each device holds 1/tp
        of every projection's codes and scales) and give the single-device quantized
        logits; W8A8's row-parallel activation scales are reduced over the shards."""
        from jaxllm.quant import QuantizedArray, W8A8Array

        dp, pp, tp = layout
        q, want = quantized[method]
        if method == "gguf32" and tp == 4:  # wo's 64 inputs in pieces of 16: half a block
            with pytest.raises(ValueError, match="'layers.wo' cannot be split 4 ways"):
                sharding.setup(W.CFG, q, dp=dp, tp=tp, pp=pp)
            return
        model, placed = sharding.setup(W.CFG, q, dp=dp, tp=tp, pp=pp)
        for name in ("wq", "w_down"):  # column- and row-parallel
            w = placed["layers"][0][name]
            assert isinstance(w, (QuantizedArray, W8A8Array))
            for child in jax.tree.leaves(w):  # codes, scales (, offsets) of the stage
                per_channel = isinstance(w, W8A8Array) and child.ndim == 2
                # W8A8's per-output-channel scales of a row-parallel weight: whole per shard
                split = pp if per_channel and name == "w_down" else tp * pp
                assert child.addressable_shards[0].data.size * split == child.size, (name, child)
        got = np.asarray(model.logits(placed, tokens, attn_impl="xla"))
        np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)

    @pytest.mark.parametrize("layout", LAYOUTS, ids=_ids(LAYOUTS))
    def test_logits_match_single_device(layout, host, tokens, ref_logits):
        dp, pp, tp = layout
        model, placed = sharding.setup(W.CFG, host, dp=dp, tp=tp, pp=pp)
        got = np.asarray(model.logits(placed, tokens, attn_impl="xla"))
        np.testing.assert_allclose(got, ref_logits, atol=1e-5, rtol=0)

    @pytest.mark.parametrize("layout", GEN_LAYOUTS, ids=_ids(GEN_LAYOUTS))
    def test_greedy_generation_token_identical(layout, host, ref_tokens):
        dp, pp, tp = layout
        model, placed = sharding.setup(W.CFG, host, dp=dp, tp=tp, pp=pp)
        assert sharding.generate(model, placed, W.PROMPTS, W.greedy(), impl="xla") == ref_tokens

    @pytest.mark.parametrize("kw", [dict(attention_bias=True, tie_word_embeddings=True),
                                    dict(sliding_window=6)], ids=["qwen2-like", "mistral-like"])
    def test_layer_mirror_matches_llama_on_variants(kw, tokens):
        """sharding.tensor_parallel.layer mirrors llama.decoder_layer: bias, tied head, window."""
        cfg = _variant(**kw)
        host = W.host_params(cfg, seed=3)
        ref = np.asarray(jax.jit(llama.logits, static_argnums=1)(
            jax.tree.map(jnp.asarray, host), cfg, tokens))
        model, placed = sharding.setup(cfg, host, dp=1, tp=2, pp=2)
        got = np.asarray(model.logits(placed, tokens, attn_impl="xla"))
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)

    def test_pallas_attention_runs_per_shard(host, tokens, ref_logits):
        """impl="pallas": the flash kernel (interpret mode on CPU) runs inside the shard_map
        on each shard's local heads and rows."""
        model, placed = sharding.setup(W.CFG, host, dp=2, tp=2)
        got = np.asarray(model.logits(placed, tokens, attn_impl="pallas"))
        np.testing.assert_allclose(got, ref_logits, atol=1e-5, rtol=0)

    COLLECTIVE = re.compile(r"= (\S+) (all-reduce|all-gather|collective-permute|reduce-scatter|"
                            r"all-to-all)(?:-start)?\(")

    def _collectives(hlo_text):
        return [(m.group(2), m.group(1)) for m in COLLECTIVE.finditer(hlo_text)]

    def test_hlo_tp4_two_all_reduces_per_layer(host, tokens):
        model, placed = sharding.setup(W.CFG, host, tp=4)
        txt = sharded_model._logits.lower(placed, tokens, None, model=model,
                                          impl="xla").compile().as_text()
        ops = _collectives(txt)
        kinds = [k for k, _ in ops]
        # 2 per layer (after o_proj, after down) + 1 for the vocab-parallel embedding
        assert kinds.count("all-reduce") == 2 * W.CFG.num_layers + 1, ops
        assert "all-gather" not in kinds and "collective-permute" not in kinds, ops
        # every all-reduce moves activations [B, T, D], never weights
        b, t = tokens.shape
        assert {s.split("{")[0] for _, s in ops} == {f"f32[{b},{t},{W.CFG.hidden_size}]"}

    def test_hlo_decode_step_no_weight_all_gather(host):
        from jaxllm import generation as G
        from jaxllm.sampling import SamplerFlags, SamplingTensors

        model, placed = sharding.setup(W.CFG, host, tp=4)
        b, p = 4, 16
        sp = W.greedy()
        args = (placed, np.zeros((b, p), np.int32), np.zeros((b,), np.int32),
                np.full((b,), 8, np.int32), np.zeros((b,), np.int32), np.full((b, 1), -1, np.int32),
                SamplingTensors.build([sp] * b, b))
        flags = SamplerFlags.for_params([sp])
        state = G.prefill(*args, cfg=W.CFG, cache_len=128, flags=flags, impl="xla", model=model)
        txt = G.decode.lower(placed, state, jnp.int32(1), cfg=W.CFG, flags=flags,
                             model=model).compile().as_text()
        ops = _collectives(txt)

        def size(shape):
            return int(np.prod([int(x) for x in re.findall(r"\d+", shape.split("{")[0].split("[")[1])]))

        # activations [B, 1, D]: 2 per layer + the embedding; the sharded argmax reduces
        # only per-row values over the vocab shards (max, then the first index): [B]-sized
        acts = [s for k, s in ops if k == "all-reduce" and size(s) == b * W.CFG.hidden_size]
        assert len(acts) == 2 * W.CFG.num_layers + 1, ops
        for kind, shape in ops:
            assert size(shape) == b * W.CFG.hidden_size or size(shape) <= b * 4, ops

    def test_pipeline_bubble_reported(host):
        model, _ = sharding.setup(W.CFG, host, pp=4)
        assert model.num_microbatches(8) == 4
        assert model.bubble_fraction(8) == pytest.approx(3 / 7)
        assert model.bubble_fraction(1) == pytest.approx(3 / 4)  # batch 1: no overlap

    def test_data_parallel_helpers():
        from sharding import data_parallel as DP

        mesh = sharding.make_mesh(dp=2, tp=2, pp=2)
        subs = DP.replica_meshes(mesh)
        assert [dict(m.shape) for m in subs] == [{"data": 1, "pipeline": 2, "tensor": 2}] * 2
        assert {d.id for d in subs[0].devices.flat}.isdisjoint({d.id for d in subs[1].devices.flat})
        assert DP.local_replicas(mesh) == [0, 1]
        batch = DP.shard_batch({"x": np.arange(8 * 3).reshape(8, 3)}, mesh)
        assert batch["x"].sharding.spec == jax.sharding.PartitionSpec("data", None)
        assert batch["x"].addressable_shards[0].data.shape == (4, 3)

    @pytest.mark.parametrize("layout", [(1, 2, 2), (1, 1, 8)], ids=_ids([(1, 2, 2), (1, 1, 8)]))
    def test_paged_forward_matches_single_device(layout, host):
        """The engine's paged attention (write_kv_pages + ragged_paged_attention over
        [P, page, Hkv, D] pools) runs per shard through sharding.paged_forward: a prefill of
        two sequences and one decode step give the single-device hidden states and pools."""
        from jaxllm.attention import ragged_paged_attention, write_kv_pages

        dp, pp, tp = layout
        page, n_pages = 4, 8
        cfg = W.CFG
        bt = jnp.asarray([[1, 2], [3, 4]], jnp.int32)

        def make_attend(slots, kv_lens, cu):
            def attend_pages(q, k, v, pages, page_off):
                kp, vp = write_kv_pages(*pages, k[0], v[0], slots, impl="xla")
                out = ragged_paged_attention(q[0], kp, vp, bt, cu, kv_lens, impl="xla")
                return out[None], (kp, vp)
            return attend_pages

        def batch(step):
            if step == 0:  # prefill: 5 + 3 tokens
                pos = np.array([0, 1, 2, 3, 4, 0, 1, 2])
                seq = np.array([0] * 5 + [1] * 3)
                toks = np.array([1, 2, 3, 4, 5, 7, 8, 9])
                kv, cu = [5, 3], [0, 5, 8]
            else:  # one decode token each
                pos, seq, toks, kv, cu = np.array([5, 3]), np.array([0, 1]), np.array([11, 12]), \
                    [6, 4], [0, 1, 2]
            slots = np.asarray(bt)[seq, pos // page] * page + pos % page
            return (jnp.asarray(toks[None], jnp.int32), jnp.asarray(pos[None], jnp.int32),
                    make_attend(jnp.asarray(slots, jnp.int32), jnp.asarray(kv, jnp.int32),
                                jnp.asarray(cu, jnp.int32)))

        ref_params = llama.unstack_layers(jax.tree.map(jnp.asarray, host))
        hkv = cfg.num_kv_heads
        ref_pools = [(jnp.zeros((n_pages, page, hkv, cfg.head_dim)),) * 2
                     for _ in range(cfg.num_layers)]
        model, placed = sharding.setup(cfg, host, dp=dp, tp=tp, pp=pp)
        spec = jax.sharding.NamedSharding(model.mesh, model.paged_cache_spec()[0])
        hkv2 = model.plan.model_cfg.num_kv_heads
        pools = [(jax.device_put(jnp.zeros((pp * n_pages, page, hkv2, cfg.head_dim)), spec),) * 2
                 for _ in range(model.layers_per_stage)]
        for step in range(2):
            toks, pos, attend_pages = batch(step)

            def ref_attend(q, k, v, cache, layer, attend_pages=attend_pages):
                return attend_pages(q, k, v, cache, 0)

            want, ref_pools = jax.jit(lambda p, t, s, c: llama.forward(
                p, cfg, t, s, ref_attend, c))(ref_params, toks, pos, ref_pools)
            got, pools = jax.jit(lambda p, t, s, c: sharding.paged_forward(
                model, p, cfg, t, s, c, attend_pages))(placed, toks, pos, pools)
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
        if model.plan.kv_repeat == 1:  # stage s, entry i holds layer s*per + i
            per = model.layers_per_stage
            for layer in range(cfg.num_layers):
                s, i = divmod(layer, per)
                np.testing.assert_allclose(
                    np.asarray(pools[i][0])[s * n_pages:(s + 1) * n_pages],
                    np.asarray(ref_pools[layer][0]), atol=1e-5, rtol=0)

    ENGINE_LAYOUTS = [(1, 2, 2), (1, 1, 8), (1, 4, 1), (2, 2, 2), (2, 1, 1)]

    def _engine(layout, host, **kw):
        """An engine on a mesh: LLMEngine (dp=1) or DataParallelEngine (dp > 1).  Small
        pages and a small step budget so prompts are chunked and blocks are shared."""
        from jaxllm.engine.data_parallel import DataParallelEngine
        from jaxllm.engine.engine import LLMEngine

        dp, pp, tp = layout
        model, placed = sharding.setup(W.CFG, host, dp=dp, tp=tp, pp=pp)
        kw = {"max_model_len": 64, "page_size": 4, "num_pages": 48, "max_num_seqs": 8,
              "max_num_batched_tokens": 16, "attention_impl": "xla", **kw}
        if dp > 1:
            return DataParallelEngine.create(model, placed, W.CFG, eos_token_ids=(), **kw)
        return LLMEngine(placed, W.CFG, eos_token_ids=(), model=model, **kw)

    @pytest.fixture(scope="module")
    def ref_sampled(host):
        """The single-device engine's n=2 seeded samples (forks share the prompt's pages)."""
        from jaxllm.engine.engine import LLMEngine

        eng = LLMEngine(jax.tree.map(jnp.asarray, host), W.CFG, eos_token_ids=(),
                        max_model_len=64, page_size=4, num_pages=48, attention_impl="xla")
        outs = eng.generate(W.PROMPTS[:2], _sampled())
        return [[list(c.token_ids) for c in o.outputs] for o in outs]

    def _sampled():
        from jaxllm.sampling import SamplingParams

        return SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=W.MAX_TOKENS,
                              ignore_eos=True)

    @pytest.mark.parametrize("layout", ENGINE_LAYOUTS, ids=_ids(ENGINE_LAYOUTS))
    def test_paged_engine_sharded_matches_single_device(layout, host, ref_tokens, ref_sampled):
        """The continuous-batching engine on a mesh (page pool sharded over kv heads and
        stages; dp replicas each with their own pool) gives the single-device static path's
        greedy tokens with chunked prefill, and the single-device engine's seeded n=2
        samples (copy-on-write of the shared last prompt page on every stage)."""
        eng = _engine(layout, host)
        got = [list(o.outputs[0].token_ids) for o in eng.generate(W.PROMPTS, W.greedy())]
        assert got == ref_tokens
        outs = eng.generate(W.PROMPTS[:2], _sampled())
        assert [[list(c.token_ids) for c in o.outputs] for o in outs] == ref_sampled
        engines = getattr(eng, "engines", [eng])
        for e in engines:  # every page back in the pool
            assert e.allocator.num_free_blocks == e.allocator.num_usable_blocks
        if layout[0] > 1:  # requests were spread over the replicas
            assert all(e.runner.num_dispatches > 0 for e in engines)
            assert len({o.request_id for o in outs}) == len(outs)

    def test_paged_engine_sharded_pool_layout_and_preemption(host, ref_tokens):
        """pp=2 x tp=2: each device holds [P, page, Hkv/tp, D] of its stage's layers; a pool
        too small for all prompts at once preempts and still gives the same tokens."""
        eng = _engine((1, 2, 2), host, num_pages=12, max_model_len=32, max_num_batched_tokens=32)
        caches = eng.pool.caches
        assert len(caches) == W.CFG.num_layers // 2
        k = caches[0][0]
        assert k.shape == (2 * 12, 4, W.CFG.num_kv_heads, W.CFG.head_dim)
        assert {s.data.shape for s in k.addressable_shards} == \
            {(12, 4, W.CFG.num_kv_heads // 2, W.CFG.head_dim)}
        got = [list(o.outputs[0].token_ids) for o in eng.generate(W.PROMPTS, W.greedy())]
        assert eng.num_preemptions > 0
        assert got == ref_tokens

    def test_paged_engine_sharded_int8_kv_cache(host):
        """pp=2 x tp=2 with kv_cache_dtype="int8": each device holds its stage's int8 pages
        and their per-token scales for its kv heads, and the engine gives the single-device
        int8-KV engine's greedy tokens (preempting on a small pool)."""
        from jaxllm.engine.engine import LLMEngine

        kw = dict(max_model_len=32, page_size=4, max_num_batched_tokens=32,
                  attention_impl="xla", kv_cache_dtype="int8")
        ref = LLMEngine(jax.tree.map(jnp.asarray, host), W.CFG, eos_token_ids=(),
                        num_pages=48, **kw)
        want = [list(o.outputs[0].token_ids) for o in ref.generate(W.PROMPTS, W.greedy())]
        eng = _engine((1, 2, 2), host, num_pages=12, **kw)
        k, v, ks, vs = eng.pool.caches[0]
        assert k.dtype == jnp.int8 and ks.dtype == jnp.float32
        assert {s.data.shape for s in ks.addressable_shards} == {(12, 4, W.CFG.num_kv_heads // 2)}
        got = [list(o.outputs[0].token_ids) for o in eng.generate(W.PROMPTS, W.greedy())]
        assert eng.num_preemptions > 0
        assert got == want

    def test_llm_api_runs_engine_on_mesh(tmp_path):
        """LLM(dp=, pp=, tp=) serves generate() from the paged engine on the mesh: the
        static single-device path's greedy tokens."""
        from conftest import save_tiny_hf
        from jaxllm.engine.data_parallel import DataParallelEngine
        from jaxllm.llm import LLM

        path, _ = save_tiny_hf(tmp_path)
        kw = dict(max_model_len=64, num_pages=40, compilation_cache=False)
        want = [list(o.outputs[0].token_ids)
                for o in LLM(path, static_batching=True, **kw).generate(W.PROMPTS, W.greedy())]
        llm = LLM(path, dp=2, pp=2, tp=2, **kw)
        assert not llm.static_batching and isinstance(llm.engine, DataParallelEngine)
        assert [list(o.outputs[0].token_ids) for o in llm.generate(W.PROMPTS, W.greedy())] == want
        one = LLM(path, pp=2, tp=2, **kw)
        assert [list(o.outputs[0].token_ids) for o in one.generate(W.PROMPTS, W.greedy())] == want

    def test_llm_api_quantized_on_mesh(tmp_path):
        """LLM(quantization=, dp=, pp=, tp=): int8 codes split over the mesh (the
        per-channel groups cut at the row-parallel shards) give the single-device
        quantized engine's greedy tokens."""
        from conftest import save_tiny_hf
        from jaxllm.llm import LLM
        from jaxllm.quant import QuantizedArray

        path, _ = save_tiny_hf(tmp_path)
        kw = dict(max_model_len=64, num_pages=40, compilation_cache=False, quantization="int8")
        want = [list(o.outputs[0].token_ids)
                for o in LLM(path, **kw).generate(W.PROMPTS, W.greedy())]
        llm = LLM(path, dp=2, pp=2, tp=2, **kw)
        w_down = llm.params["layers"][0]["w_down"]
        assert isinstance(w_down, QuantizedArray) and w_down.group_size == 112 // 2
        assert [list(o.outputs[0].token_ids) for o in llm.generate(W.PROMPTS, W.greedy())] == want
