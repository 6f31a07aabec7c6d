"""Model logits against HF transformers on tiny random-weight checkpoints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import save_tiny_hf
from jaxllm.models import llama
from jaxllm.weights import load_model

CASES = {
    "llama": ("llama", {}),
    "qwen2-bias-tied": ("qwen2", {}),
    "mistral-window": ("mistral", {}),
    "llama-mqa": ("llama", {"num_key_value_heads": 1}),
    "rope-linear": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "rope-dynamic": ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0},
                               "max_position_embeddings": 16}),
    "rope-llama3": ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 16}}),
    "rope-yarn": ("llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                             "original_max_position_embeddings": 16}}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(tmp_path, case):
    arch, overrides = CASES[case]
    path, hf = save_tiny_hf(tmp_path, arch, **overrides)
    loaded = load_model(path, use_cache=False)
    tokens = np.random.default_rng(0).integers(0, 128, (2, 29))
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    params = jax.tree.map(jnp.asarray, loaded.params)
    fused = llama.fuse_projections(params)  # the inference layout LLM runs (wqkv, w_gate_up)
    assert "wqkv" in fused["layers"] and "wq" not in fused["layers"]
    assert ("bqkv" in fused["layers"]) == loaded.config.attention_bias
    for p in (params, fused):
        got = np.asarray(jax.jit(llama.logits, static_argnums=1)(p, loaded.config,
                                                                jnp.asarray(tokens)))
        assert np.abs(got - ref).max() < 1e-4
    assert np.abs(ref).max() > 1.0  # the comparison is not between two near-zero tensors


def test_rope_frequencies_match_transformers():
    """Each rope_scaling variant's inverse frequencies and cos/sin scale equal HF's."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from conftest import tiny_hf_config
    from jaxllm.config import ModelConfig

    for case in ("rope-linear", "rope-llama3", "rope-yarn"):
        hf_cfg = tiny_hf_config("llama", **CASES[case][1])
        ours = ModelConfig.from_hf(hf_cfg.to_dict())
        inv, scale = ROPE_INIT_FUNCTIONS[hf_cfg.rope_parameters["rope_type"]](hf_cfg, None)
        mine, my_scale = llama.rope_inv_freq(ours)
        np.testing.assert_allclose(mine, inv.numpy(), rtol=1e-6)
        assert my_scale == pytest.approx(scale)


def test_pallas_kernels_through_the_whole_model(tiny_llama):
    """attention_impl="pallas" (interpret mode on CPU) gives the XLA path's logits."""
    _, _, loaded = tiny_llama
    params = jax.tree.map(jnp.asarray, loaded.params)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 128, (2, 19)))
    segs = jnp.asarray([[1] * 12 + [2] * 7, [1] * 19])  # packed sequences too
    f = jax.jit(llama.logits, static_argnames=("cfg", "attn_impl"))
    for seg in (None, segs):
        xla = f(params, cfg=loaded.config, tokens=tokens, segment_ids=seg, attn_impl="xla")
        pallas = f(params, cfg=loaded.config, tokens=tokens, segment_ids=seg, attn_impl="pallas")
        np.testing.assert_allclose(np.asarray(pallas), np.asarray(xla), atol=1e-5, rtol=0)
