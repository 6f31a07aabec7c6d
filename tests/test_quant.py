"""Quantized weights: round-trip bounds, packing, the quantized matmul, and whole models
(tiny random Llama; the default model under ``slow``) against float."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.models import llama
from jaxllm.quant import (QuantConfig, QuantizedArray, quantize_int4, quantize_int8,
                          quantize_params, tree_nbytes)


def _w(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 0.05, shape).astype(np.float32)


def _deq64(q: QuantizedArray) -> np.ndarray:
    """Float64 NumPy dequantization from the stored codes, scales and offsets."""
    codes = np.asarray(q.codes(), np.float64)
    *lead, k, n = codes.shape
    g = codes.reshape(*lead, k // q.group_size, q.group_size, n)
    w = g * np.asarray(q.scales, np.float64)[..., :, None, :]
    if q.offsets is not None:
        w = w + np.asarray(q.offsets, np.float64)[..., :, None, :]
    w = w.reshape(*lead, k, n)
    return np.swapaxes(w, -1, -2) if q.transposed else w


# --------------------------------------------------------------------------- round trips

@pytest.mark.parametrize("shape", [(96, 40), (2, 64, 48)])
def test_int8_round_trip_within_half_a_step(shape):
    w = _w(*shape)
    q = quantize_int8(w)
    assert q.values.dtype == np.int8 and q.shape == shape and q.scales.shape[-2] == 1
    assert np.abs(np.asarray(q.values)).max() <= 127
    err = np.abs(_deq64(q) - w.astype(np.float64))
    assert np.all(err <= np.asarray(q.scales, np.float64) / 2 * (1 + 1e-6) + 1e-12)
    np.testing.assert_allclose(np.asarray(q.dequantize()), _deq64(q), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_round_trip_within_half_a_step(group):
    w = _w(2, 256, 24, seed=group)
    q = quantize_int4(w, group)
    assert q.values.dtype == np.uint8 and q.values.shape == (2, 128, 24)
    assert q.scales.shape == (2, 256 // group, 24) and q.shape == w.shape
    step = np.repeat(np.asarray(q.scales, np.float64), group, axis=-2)
    err = np.abs(_deq64(q) - w.astype(np.float64))
    assert np.all(err <= step / 2 * (1 + 1e-3) + 1e-6)
    # one step is the group's range / 15, so the error is well under the float scale
    assert err.max() <= (w.max() - w.min()) / 30
    np.testing.assert_allclose(np.asarray(q.dequantize()), _deq64(q), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("packing", ["interleaved", "gguf32"])
def test_int4_unpacking_is_exact(packing):
    codes = np.random.default_rng(1).integers(0, 16, (64, 5)).astype(np.uint8)
    if packing == "interleaved":
        packed = codes[0::2] | (codes[1::2] << 4)
    else:  # per 32-block: byte j holds element j (low) and j + 16 (high)
        blocks = codes.reshape(2, 32, 5)
        packed = (blocks[:, :16] | (blocks[:, 16:] << 4)).reshape(32, 5)
    q = QuantizedArray(packed, np.ones((2, 5), np.float32), None, bits=4, group_size=32,
                       packing=packing)
    np.testing.assert_array_equal(np.asarray(q.codes()), codes)


def test_bad_input_names_the_value():
    with pytest.raises(ValueError, match="'int3'"):
        QuantConfig.parse("int3")
    with pytest.raises(ValueError, match="group size .* 48"):
        QuantConfig.parse("int4-g48")
    with pytest.raises(ValueError, match="group_size 64 .* 96"):
        quantize_int4(_w(96, 8), 64)
    with pytest.raises(ValueError, match="'w_down'.*group_size 64"):
        quantize_params({"embed": _w(8, 64), "layers": [{"w_down": _w(96, 64)}]}, "int4-g64")
    with pytest.raises(ValueError, match="embed_bits"):
        QuantConfig("int8", embed_bits=4)
    with pytest.raises(ValueError, match="chosen at load"):
        quantize_params({"embed": _w(8, 64), "layers": []}, "gguf")
    from jaxllm.weights.gguf_blocks import blocks_to_quantized

    with pytest.raises(ValueError, match="Q3_K"):
        blocks_to_quantized(np.zeros(110, np.uint8), "Q3_K", (1, 256))
    with pytest.raises(ValueError, match="K=96 is not a multiple of 256"):
        blocks_to_quantized(np.zeros(144, np.uint8), "Q4_K", (1, 96))


GGUF_TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")


def _gguf_blocks(qtype: str, n: int, k: int, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Valid GGUF blocks of an ``[N, K]`` tensor and ``gguf.quants.dequantize`` of them
    (float32 ``[N, K]``): the gguf package's quantizer for the 32-element types, random
    bytes with random finite float16 ``d`` / ``dmin`` for the K types (it has no K
    quantizer)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    t = GGMLQuantizationType[qtype]
    rng = np.random.default_rng(seed)
    if qtype.endswith("_K"):
        block, size = GGML_QUANT_SIZES[t]
        b = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
        for at in ((208,) if qtype == "Q6_K" else (0, 2)):  # Q6_K: d last; else d, dmin first
            f16 = rng.normal(0, 1e-3, (n, k // block, 1)).astype(np.float16)
            b[..., at:at + 2] = f16.view(np.uint8)
        raw = b.reshape(n, -1)
    else:
        raw = quantize(rng.normal(0, 0.05, (n, k)).astype(np.float32), t)
    want = np.asarray(dequantize(raw, t), np.float32)
    if qtype == "Q4_0":  # our d * 8 + (-8 d) is +0 where gguf-py's d * 0 is -0 (d < 0)
        want = want + np.float32(0)
    return raw, want


def _bits(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, np.float32)).view(np.uint32)


@pytest.mark.parametrize("qtype", GGUF_TYPES)
def test_gguf_blocks_decode_like_the_gguf_package_bit_for_bit(qtype):
    from jaxllm.weights.gguf_blocks import blocks_to_quantized

    n, k = 256, 512  # two super-blocks per row for the K types
    raw, want = _gguf_blocks(qtype, n, k)
    q = blocks_to_quantized(raw, qtype, (n, k))
    assert q.shape == (k, n) and q.group_size == (16 if qtype == "Q6_K" else 32)
    assert (q.bits, q.packing) == ((4, "gguf32") if qtype in ("Q4_0", "Q4_1", "Q4_K")
                                   else (8, "none"))
    np.testing.assert_array_equal(_bits(q.dequantize()), _bits(want.T))


def test_gguf_mixed_types_combine_bit_for_bit():
    """Fused projections / layer stacks mixing block types (llama.cpp's _M files) widen to
    one layout holding the same weights; parts of one layout are joined as they are."""
    from jaxllm.weights.gguf_blocks import _combine, blocks_to_quantized

    n, k = 64, 512
    types = ("Q4_K", "Q6_K", "Q5_1", "Q4_0", "Q8_0")
    blocks = [_gguf_blocks(t, n, k, seed=i) for i, t in enumerate(types)]
    parts = [blocks_to_quantized(raw, t, (n, k)) for t, (raw, _) in zip(types, blocks)]
    wants = [want.T for _, want in blocks]  # [K, N]
    fused = _combine(parts, lambda a: np.concatenate(a, axis=-1))
    assert (fused.bits, fused.group_size, fused.packing) == (8, 16, "none")
    assert fused.scales.dtype == fused.offsets.dtype == np.float32
    np.testing.assert_array_equal(_bits(fused.dequantize()),
                                  _bits(np.concatenate(wants, axis=-1)))
    stacked = _combine(parts, np.stack)
    assert stacked.shape == (len(types), k, n)
    np.testing.assert_array_equal(_bits(stacked.dequantize()), _bits(np.stack(wants)))
    # one layout: kept as it is (4-bit codes, float32 scales and offsets)
    same = _combine([parts[0], parts[0]], np.stack)
    assert (same.bits, same.group_size, same.packing) == (4, 32, "gguf32")
    np.testing.assert_array_equal(np.asarray(same.values[1]), parts[0].values)
    # symmetric int8 parts stay symmetric with float16 scales (Q8_0 v beside Q5_0 q / k)
    q5_0 = blocks_to_quantized(_gguf_blocks("Q5_0", n, k)[0], "Q5_0", (n, k))
    sym = _combine([q5_0, parts[-1]], lambda a: np.concatenate(a, axis=-1))
    assert sym.offsets is None and sym.scales.dtype == np.float16 and sym.group_size == 32


@pytest.mark.parametrize("qtype", ["Q4_K", "Q5_K", "Q6_K", "mixed"])
def test_gguf_k_quant_matmul_equals_dequantize_then_dot(qtype):
    """``llama.matmul`` on the K-quant layouts (and a widened mix), through the C++ kernel
    (it reads all of them) and through XLA, equals the float64 product of the dequantized
    weight to 1e-5 relative."""
    import cpu_kernels
    from jaxllm.weights.gguf_blocks import _combine, blocks_to_quantized

    n, k = 96, 512
    if qtype == "mixed":
        parts = [blocks_to_quantized(_gguf_blocks(t, n, k)[0], t, (n, k))
                 for t in ("Q4_K", "Q6_K")]
        q = _combine(parts, lambda a: np.concatenate(a, axis=-1))
    else:
        q = blocks_to_quantized(_gguf_blocks(qtype, n, k)[0], qtype, (n, k))
    cpu_kernels.check_quantized(q)  # a layout the kernel reads: no fallback needed
    w = np.asarray(q.dequantize(), np.float64)
    for rows in (1, 5):
        x = np.random.default_rng(rows).normal(size=(rows, k)).astype(np.float32)
        want = x.astype(np.float64) @ w
        for kernel in ((True, False) if cpu_kernels.available() else (False,)):
            with cpu_kernels.override(kernel):  # eager: no jit cache across the two paths
                assert cpu_kernels.quantized_applies(rows, q) == kernel
                got = np.asarray(llama.matmul(jnp.asarray(x), q), np.float64)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(),
                                       err_msg=f"rows={rows} kernel={kernel}")


# --------------------------------------------------------------------------- matmul

@pytest.mark.parametrize("method", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 5])
def test_matmul_equals_float64_product_of_dequantized(method, rows):
    w = _w(128, 48, seed=3)
    q = quantize_int8(w) if method == "int8" else quantize_int4(w, 32)
    x = np.random.default_rng(4).normal(size=(rows, 128)).astype(np.float32)
    want = x.astype(np.float64) @ _deq64(q)
    got = np.asarray(jax.jit(llama.matmul)(jnp.asarray(x), q), np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("config", [QuantConfig("int8"), QuantConfig("int4", 32, embed_bits=4)])
def test_embedding_gather_and_tied_head_use_the_same_codes(config):
    embed = _w(40, 64, seed=5)  # [V, D]
    params = {"embed": embed, "layers": [], "final_norm": np.ones(64, np.float32)}
    q = quantize_params(params, config)["embed"]
    assert q.bits == (8 if config.method == "int8" else 4)
    assert q.transposed and q.shape == (40, 64) and q.T.shape == (64, 40)
    full = _deq64(q)  # [V, D]
    tokens = jnp.asarray([[3, 0, 39], [7, 7, 1]])
    np.testing.assert_allclose(np.asarray(q[tokens]), full[np.asarray(tokens)], rtol=1e-6,
                               atol=1e-7)
    h = jnp.asarray(np.random.default_rng(6).normal(size=(3, 64)).astype(np.float32))
    want = np.asarray(h, np.float64) @ full.T
    for vocab_major in (False, True):
        got = np.asarray(llama.lm_head({"embed": q}, None, h, vocab_major=vocab_major))
        got = got.T if vocab_major else got
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_quantized_params_are_a_pytree_that_scans_and_jits():
    from jaxllm.train.testing import tiny_config

    cfg = tiny_config(vocab_size=96)
    params = jax.device_get(llama.init_params(cfg, jax.random.key(0)))
    tokens = jnp.arange(12, dtype=jnp.int32)[None] % 96
    stacked = quantize_params(params, "int8")
    unrolled = quantize_params(llama.fuse_projections(llama.unstack_layers(params)), "int8")
    a = jax.jit(lambda p, t: llama.logits(p, cfg, t))(stacked, tokens)
    b = jax.jit(lambda p, t: llama.logits(p, cfg, t))(unrolled, tokens)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    assert tree_nbytes(stacked) < 0.3 * tree_nbytes(params)


# --------------------------------------------------------------------------- tiny model

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random Llama whose dimensions (64, 128) every int4 group size divides."""
    from tests.conftest import save_tiny_hf

    path, _ = save_tiny_hf(tmp_path_factory.mktemp("tinyq"), "llama", intermediate_size=128)
    return path


# max |logit - float logit| / max |float logit| and top-1 agreement on the tiny model
# (random weights x5: int4's ~8% per-weight noise adds up; measured 0.027 / 0.96 for int8,
# 0.34 / 0.63 for int4-g32)
TINY_TOL = {"int8": (0.05, 0.9), "int4-g32": (0.5, 0.5)}


@pytest.fixture(scope="module")
def tiny_llms(tiny_model):
    from jaxllm import LLM

    return {q: LLM(tiny_model, quantization=q, **TINY_KW) for q in (None, "int8", "int4-g32")}


TINY_KW = dict(num_pages=32, max_model_len=128, compilation_cache=False)
PROMPTS = [[int(t) for t in np.random.default_rng(0).integers(3, 128, 6)] for _ in range(6)]


def _greedy(llm, prompts=PROMPTS, n: int = 12) -> list[list[int]]:
    from jaxllm import SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]


@pytest.mark.parametrize("method", ["int8", "int4-g32"])
def test_tiny_model_logits_close_to_float(tiny_llms, method):
    ids = list(range(3, 60))
    a, b = tiny_llms[None].logits(ids), tiny_llms[method].logits(ids)
    rel, top1 = TINY_TOL[method]
    assert np.abs(a - b).max() <= rel * np.abs(a).max()
    assert np.mean(a.argmax(-1) == b.argmax(-1)) >= top1


def test_tiny_model_int8_greedy_tokens_mostly_equal(tiny_llms):
    want, got = _greedy(tiny_llms[None]), _greedy(tiny_llms["int8"])
    # random tiny weights leave near-ties that flip later (measured: first divergence at
    # token 4 to 12 of 12, depending on the batch); the first four tokens always agree
    prefix = [next((i for i, (x, y) in enumerate(zip(w, g)) if x != y), len(w))
              for w, g in zip(want, got)]
    assert min(prefix) >= 4, prefix


@pytest.mark.parametrize("method", ["int8", "int4-g32"])
def test_tiny_model_generates_what_its_dequantized_weights_generate(tiny_model, tiny_llms,
                                                                    method):
    from jaxllm import LLM
    from jaxllm.quant import is_quantized

    q = tiny_llms[method]
    ref = LLM(tiny_model, **TINY_KW)
    ref.params = jax.tree.map(lambda x: x.dequantize() if is_quantized(x) else x, q.params,
                              is_leaf=is_quantized)
    assert _greedy(q) == _greedy(ref)


def test_tiny_model_static_batch_and_scan_layers_match_the_engine(tiny_model, tiny_llms):
    from jaxllm import LLM, SamplingParams

    sp = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    eng = tiny_llms["int8"].generate([[5, 9, 17]], sp)[0].outputs[0].token_ids
    for kw in (dict(static_batching=True), dict(scan_layers=True)):
        llm = LLM(tiny_model, quantization="int8", **TINY_KW, **kw)
        assert llm.generate([[5, 9, 17]], sp)[0].outputs[0].token_ids == eng, kw


def test_quantize_command_saves_a_checkpoint_llm_loads(tiny_model, tiny_llms, tmp_path):
    from jaxllm import LLM
    from jaxllm.cli import main

    out = tmp_path / "tiny-int4"
    assert main(["quantize", str(tiny_model), "--method", "int4-g32", "--output", str(out)]) == 0
    llm = LLM(out, **TINY_KW)
    assert isinstance(llm.params["layers"][0]["wqkv"], QuantizedArray)
    assert tree_nbytes(llm.params) == tree_nbytes(tiny_llms["int4-g32"].params)
    assert _greedy(llm) == _greedy(tiny_llms["int4-g32"])


# --------------------------------------------------------------------------- default model

def test_auto_quantization_keeps_gguf_blocks_where_they_are_faster(tmp_path, monkeypatch):
    """LLM's default ``quantization="auto"``: the default GGUF file keeps its blocks on one
    CPU device with the kernels built, and loads float weights under a mesh, with a LoRA
    adapter to merge, without the kernels, or from an HF directory."""
    import cpu_kernels
    from jaxllm.llm import resolve_quantization
    from jaxllm.weights import default_model_path
    from jaxllm.weights.gguf_blocks import keeps_blocks

    path = default_model_path()
    assert keeps_blocks(path)
    want = QuantConfig("gguf") if cpu_kernels.active() else None
    assert resolve_quantization("auto", None) == resolve_quantization("auto", path) == want
    assert resolve_quantization("auto", path, lora=tmp_path) is None
    assert resolve_quantization("auto", path, devices=2) is None
    assert resolve_quantization(None, path) is None
    assert resolve_quantization("int8", path) == QuantConfig.parse("int8")
    (tmp_path / "config.json").write_text("{}")
    assert resolve_quantization("auto", tmp_path) is None
    monkeypatch.setenv("JAXLLM_CPU_KERNELS", "0")
    assert resolve_quantization("auto", path) is None


@pytest.mark.slow
def test_default_model_quantized_agrees_with_float(smollm2_float):
    import json
    from pathlib import Path

    from jaxllm import LLM

    lines = (Path(__file__).parent / "data" / "captain_byte.jsonl").read_text().splitlines()
    text = "\n\n".join(json.loads(line).get("output", "") for line in lines[:16])
    ids = smollm2_float.tokenizer.encode(text, add_special_tokens=False)[:256]

    def nll(lg: np.ndarray) -> float:
        lg = lg[:-1].astype(np.float64)
        m = lg.max(-1)
        lse = np.log(np.exp(lg - m[:, None]).sum(-1)) + m
        return float(np.mean(lse - lg[np.arange(len(lg)), ids[1:]]))

    a = smollm2_float.logits(ids)
    # int4 (group 32) reproduces the file's Q4_1 blocks; the int8 embedding is the only loss
    for method, share in (("int8", 0.26), ("int4", 0.19)):
        q = LLM(quantization=method, max_model_len=2048, num_pages=64)
        b = q.logits(ids)
        assert np.mean(a.argmax(-1) == b.argmax(-1)) >= 0.95, method
        assert abs(np.exp(nll(b)) / np.exp(nll(a)) - 1) <= 0.01, method  # perplexity within 1%
        assert tree_nbytes(q.params) <= share * tree_nbytes(smollm2_float.params), method
        del q
    # the file's own Q4_1 / Q8_0 blocks: the same logits as the dequantized float32 model
    g = LLM(quantization="gguf", max_model_len=2048, num_pages=64)
    assert isinstance(g.params["layers"][0]["wqkv"], QuantizedArray)
    np.testing.assert_allclose(g.logits(ids), a, rtol=1e-4, atol=1e-4 * np.abs(a).max())
    assert tree_nbytes(g.params) <= 0.19 * tree_nbytes(smollm2_float.params)


def test_gguf_blocks_need_a_gguf_file(tiny_model):
    from jaxllm import LLM

    with pytest.raises(ValueError, match="needs a .gguf file"):
        LLM(tiny_model, quantization="gguf", **TINY_KW)
