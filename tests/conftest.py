"""Shared test set-up: CPU backend, compilation cache, tiny model configs and HF references."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAXLLM_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

from jaxllm.compilation import enable_compilation_cache  # noqa: E402

enable_compilation_cache()
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True, scope="module")
def _release_executables():
    """Drop JAX's caches after every test module.  Each loaded XLA:CPU executable holds
    dozens of memory mappings; the whole suite in one process loads well over a thousand
    programs and would reach ``vm.max_map_count`` (65530: mmap then fails inside LLVM and
    the process crashes)."""
    yield
    import gc

    jax.clear_caches()
    gc.collect()


def tiny_hf_config(arch: str = "llama", **overrides):
    """A tiny HF config of the given family (random weights are made from it)."""
    import transformers

    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    if arch == "qwen2":
        kw.update(tie_word_embeddings=True, use_sliding_window=False)
    if arch == "mistral":
        kw.update(sliding_window=7)
    kw.update(overrides)
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "mistral": transformers.MistralConfig}[arch]
    return cls(**kw)


def save_tiny_hf(tmp_path, arch: str = "llama", seed: int = 0, **overrides):
    """Random-weight HF model saved with ``save_pretrained``; returns (dir, torch model)."""
    import torch
    import transformers

    cfg = tiny_hf_config(arch, **overrides)
    model_cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
                 "mistral": transformers.MistralForCausalLM}[arch]
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # HF's init is tiny (std 0.02): widen it so logits are not flat
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(5.0)
    path = tmp_path / f"tiny-{arch}"
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """(path, HF model, jaxllm LoadedModel) of a tiny random Llama, shared by the session."""
    from jaxllm.weights import load_model

    path, model = save_tiny_hf(tmp_path_factory.mktemp("tiny"), "llama")
    return path, model, load_model(path, use_cache=False)


@pytest.fixture(scope="session")
def tiny_sft():
    """(tokenizer, config, host params, examples) of a tiny model trained on the SFT test
    data (tests/data/captain_byte.jsonl), shared by the fine-tuning tests."""
    from pathlib import Path

    from jaxllm.models import llama
    from jaxllm.train import data as D
    from jaxllm.train.testing import dataset_texts, tiny_config, train_tiny_tokenizer

    path = Path(__file__).parent / "data" / "captain_byte.jsonl"
    tok = train_tiny_tokenizer(dataset_texts(path))
    cfg = tiny_config(vocab_size=tok.vocab_size, eos_token_ids=(tok.eos_token_id,))
    params = jax.device_get(llama.init_params(cfg, jax.random.key(0)))
    return tok, cfg, params, D.load_examples(path, tok, max_len=65)


def smollm2_path():
    from jaxllm.weights import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def smollm2():
    """The real default model through the public API as users get it, shared by the
    session: float32 compute over, on CPU, the file's own Q4_1 / Q8_0 blocks
    (``quantization="auto"``; float weights on a GPU)."""
    from jaxllm import LLM

    # a small KV pool: the default sizes it from RAM (GiBs), which CI does not need
    return LLM(max_model_len=2048, num_pages=256)


@pytest.fixture(scope="session")
def smollm2_float():
    """The default model with float32 weights (``quantization=None``): the reference the
    quantized paths are measured against."""
    from jaxllm import LLM

    return LLM(max_model_len=2048, num_pages=64, quantization=None)


@pytest.fixture(scope="session")
def hf_smollm2():
    """transformers' own loading of the same GGUF file: the reference implementation."""
    import torch
    from transformers import AutoModelForCausalLM

    path = smollm2_path()
    torch.set_num_threads(2)
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                dtype=torch.float32).eval()
