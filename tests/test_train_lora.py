"""LoRA: frozen base, merge == adapter, PEFT adapter round trip, HF export loads in
transformers, and the ``jaxllm finetune`` command end to end (tiny model)."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.models import llama
from jaxllm.train import lora as L
from jaxllm.train.loop import TrainConfig, Trainer
from jaxllm.train.testing import tiny_config

DATA = Path(__file__).parent / "data" / "captain_byte.jsonl"


@pytest.fixture(scope="module")
def trained(tiny_sft):
    tok, cfg, params, examples = tiny_sft
    lcfg = L.LoraConfig(rank=4, alpha=8, dropout=0.1, targets="q,k,v,o,gate,up,down")
    tc = TrainConfig(seq_len=64, batch_size=4, steps=6, lr=1e-2, attn_impl="xla", progress=False,
                     lora=lcfg, scan_layers=False)  # unrolled: frozen base kept per layer
    tr = Trainer(tc, cfg, params, examples)
    tr.run()
    return tr, lcfg


_logits = jax.jit(llama.logits, static_argnames=("cfg", "attn_impl"))


def _ids(cfg, n=20, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, n)).astype(np.int32)


def test_lora_trains_only_the_adapter(tiny_sft, trained):
    _, cfg, params, _ = tiny_sft
    tr, lcfg = trained
    frozen = jax.device_get(llama.stack_layers(tr.frozen))
    for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)  # base untouched (float32 compute: same dtype)
    adapter = tr.trained_params()
    assert set(adapter["layers"]) == {f"{t}_{p}" for t in lcfg.targets for p in ("lora_a", "lora_b")}
    assert all(np.abs(adapter["layers"][f"{t}_lora_b"]).max() > 0 for t in lcfg.targets)
    # the optimizer state covers only the adapter
    n_opt = sum(x.size for x in jax.tree.leaves(tr.state.opt_state))
    assert n_opt < 3 * L.num_lora_params(cfg, lcfg) + 100


def test_merged_logits_equal_base_plus_adapter(tiny_sft, trained, tmp_path):
    _, cfg, params, _ = tiny_sft
    tr, lcfg = trained
    adapter = tr.trained_params()
    ids = _ids(cfg)
    merged = L.merge(params, adapter, lcfg)
    unmerged = L.attach(jax.tree.map(jnp.asarray, params), adapter, lcfg)  # scale as a key
    lm, lu = _logits(merged, cfg, ids), _logits(unmerged, cfg, ids)
    np.testing.assert_allclose(np.asarray(lm), np.asarray(lu), atol=2e-5, rtol=1e-5)
    assert np.abs(np.asarray(lm) - np.asarray(_logits(params, cfg, ids))).max() > 1e-3
    # PEFT-format round trip, unmerged (scale folded into B) and merged, stacked and per-layer
    path = L.save_adapter(tmp_path / "adapter", cfg, adapter, lcfg, base_model="tiny")
    peft = json.loads((path / "adapter_config.json").read_text())
    assert peft["r"] == 4 and peft["lora_alpha"] == 8 and "q_proj" in peft["target_modules"]
    for p in (L.load_lora(params, cfg, path), L.load_lora(params, cfg, path, merge_weights=True),
              L.load_lora(llama.unstack_layers(params), cfg, path)):
        np.testing.assert_allclose(np.asarray(_logits(p, cfg, ids)), np.asarray(lm),
                                   atol=2e-5, rtol=1e-5)
    # the Trainer's own merge equals too
    np.testing.assert_allclose(np.asarray(_logits(tr.merged_params(), cfg, ids)), np.asarray(lm),
                               atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="adapter trained for another model"):
        L.load_lora(params, tiny_config(vocab_size=cfg.vocab_size, hidden_size=32), path)


def test_lora_dropout_is_training_only_and_keyed(tiny_sft):
    _, cfg, params, _ = tiny_sft
    lcfg = L.LoraConfig(rank=4, dropout=0.5, targets="all")
    lora = L.init_lora(cfg, lcfg, jax.random.PRNGKey(0))
    lora = jax.tree.map(lambda x: x + 0.1, lora)
    ids = _ids(cfg)
    p = jax.tree.map(jnp.asarray, params)
    keys = jax.random.split(jax.random.PRNGKey(1), cfg.num_layers)
    a = _logits(L.attach(p, lora, lcfg, keys), cfg, ids)
    b = _logits(L.attach(p, lora, lcfg, keys), cfg, ids)
    c = _logits(L.attach(p, lora, lcfg, jax.random.split(jax.random.PRNGKey(2), cfg.num_layers)),
                cfg, ids)
    d = _logits(L.attach(p, lora, lcfg), cfg, ids)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-4
    assert np.abs(np.asarray(a) - np.asarray(d)).max() > 1e-4


def test_parse_targets():
    assert L.parse_targets("q,v") == ("wq", "wv")
    assert L.parse_targets("q_proj,down_proj,o") == ("wq", "wo", "w_down")
    assert L.parse_targets("attn") == ("wq", "wk", "wv", "wo")
    assert L.parse_targets("all") == llama.LORA_TARGETS
    with pytest.raises(ValueError, match="unknown LoRA target"):
        L.parse_targets("q,bogus")


def test_hf_export_loads_in_transformers_with_equal_logits(tiny_sft, trained, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jaxllm.weights import load_model
    from jaxllm.weights.hf import save_hf

    tok, cfg, _, _ = tiny_sft
    tr, _ = trained
    merged = tr.merged_params()
    out = save_hf(tmp_path / "merged", cfg, merged, tokenizer=tok)
    ids = _ids(cfg, 24)
    ours = np.asarray(_logits(merged, cfg, ids))
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.as_tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)
    again = load_model(out, use_cache=False)
    np.testing.assert_allclose(np.asarray(_logits(again.params, again.config, ids)), ours,
                               atol=1e-5, rtol=1e-5)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "Arr, matey! Who be ye?"
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)


def test_finetune_cli_end_to_end(tiny_sft, tmp_path):
    from jaxllm.cli import main
    from jaxllm.weights import load_model
    from jaxllm.weights.hf import save_hf

    tok, cfg, params, _ = tiny_sft
    base = save_hf(tmp_path / "base", cfg, params, tokenizer=tok)
    out = tmp_path / "run"
    argv = ["--model", str(base), "--data", str(DATA), "--lora", "--lora-rank", "4",
            "--seq-len", "64", "--batch-size", "4", "--grad-accum", "2", "--steps", "4",
            "--lr", "1e-2", "--eval-fraction", "0.1", "--eval-every", "2", "--save-every", "2",
            "--merge", "-o", str(out), "--sample-prompt", "Who are you?", "--sample-max-tokens",
            "8", "--no-progress", "--profile-steps", "2-3", "--attention-impl", "xla"]
    assert main(["finetune", *argv]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and "eval_loss" in summary
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert len(json.loads((out / "samples.json").read_text())["after"]) == 1
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [2, 4]
    assert "tokens_per_s" in rows[-2] or "tokens_per_s" in rows[-1]
    assert any((out / "profile").rglob("*.xplane.pb"))
    merged = load_model(out / "merged", use_cache=False)
    adapter = L.load_lora(params, cfg, out / "adapter")
    ids = _ids(cfg)
    np.testing.assert_allclose(np.asarray(_logits(merged.params, cfg, ids)),
                               np.asarray(_logits(adapter, cfg, ids)), atol=2e-5, rtol=1e-5)
    # running again with more steps resumes from the last checkpoint (step 4)
    argv[argv.index("--steps") + 1] = "6"
    assert main(["finetune", *argv]) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 6
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2, 4, 6]
    # errors: malformed data names the line
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": "y"}\n{"instruction": 5, "output": "y"}\n')
    argv[argv.index("--data") + 1] = str(bad)
    assert main(["finetune", *argv, "--no-resume", "-o", str(tmp_path / "r2")]) == 2
