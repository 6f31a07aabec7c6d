"""The training loop: exact resume, memorisation, sharded training on 8 virtual devices."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxllm.models import llama
from jaxllm.train.lora import LoraConfig
from jaxllm.train.loop import TrainConfig, Trainer
from jaxllm.train.testing import tiny_config

ROOT = Path(__file__).parent.parent


def _tc(**kw):
    base = dict(seq_len=64, batch_size=4, steps=10, lr=1e-2, attn_impl="xla", progress=False,
                warmup_steps=2)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora-dropout"])
def test_resume_is_exact(tiny_sft, tmp_path, lora):
    tok, cfg, params, examples = tiny_sft
    extra = dict(lora=LoraConfig(rank=4, dropout=0.2)) if lora else dict(weight_decay=0.1)
    extra.update(grad_accum=2)
    straight = Trainer(_tc(**extra), cfg, params, examples)
    straight.run()
    first = Trainer(_tc(output_dir=str(tmp_path), save_every=5, **extra), cfg, params, examples)
    first.run(stop_at=5)
    first.close()
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                  if p.name.isdigit()) == [5]
    second = Trainer(_tc(output_dir=str(tmp_path), save_every=5, **extra), cfg, params, examples)
    assert int(second.state.step) == 0
    second.run()
    second.close()
    assert int(second.state.step) == 10
    for a, b in zip(jax.tree.leaves(straight.trained_params()),
                    jax.tree.leaves(second.trained_params())):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(jax.device_get(straight.state.opt_state)),
                    jax.tree.leaves(jax.device_get(second.state.opt_state))):
        np.testing.assert_array_equal(a, b)
    # metrics of steps 6..10 are identical too
    tail = lambda h: [r["loss"] for r in h if "loss" in r][-5:]  # noqa: E731
    assert tail(straight.history) == tail(second.history)
    assert (tmp_path / "metrics.jsonl").is_file()


def test_tiny_model_memorises_eight_examples(tiny_sft):
    tok, cfg, params, examples = tiny_sft
    eight = [e for e in examples if len(e) <= 64][:8]
    tc = _tc(batch_size=8, steps=150, lr=1e-2, packing=False, shuffle=False, min_lr_ratio=1.0,
             warmup_steps=5, eval_every=150)
    tr = Trainer(tc, cfg, params, eight, eight)
    tr.run()
    losses = [r["loss"] for r in tr.history if "loss" in r]
    assert losses[0] > 4.0
    assert tr.history[-1]["eval_loss"] < 0.05, tr.history[-3:]
    # greedy decoding reproduces a memorised answer
    from jaxllm.train.loop import generate_answers

    ex = eight[0]
    prompt_end = int(np.argmax(ex.mask))
    prompt_text = tok.decode(ex.tokens[:prompt_end], skip_special_tokens=False)
    q = prompt_text.split("<|im_start|>user\n")[-1].split("<|im_end|>")[0]
    answer = tok.decode(ex.tokens[ex.mask], skip_special_tokens=False).split("<|im_end|>")[0]
    got = generate_answers(tr.merged_params(), cfg, tok, [q], max_tokens=64)[0]
    assert got == answer


SHARDED = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    jax.config.update("jax_default_matmul_precision", "highest")
    from jaxllm.compilation import enable_compilation_cache
    enable_compilation_cache()
    import numpy as np
    from jaxllm.models import llama
    from jaxllm.train import data as D
    from jaxllm.train.lora import LoraConfig
    from jaxllm.train.loop import TrainConfig, Trainer
    from jaxllm.train.testing import tiny_config

    cfg = tiny_config(vocab_size=128, intermediate_size=128)
    params = jax.device_get(llama.init_params(cfg, jax.random.key(0)))
    rng = np.random.default_rng(0)
    ex = [D.Example(rng.integers(0, 128, n).astype(np.int32), rng.random(n) < 0.7, str(i))
          for i, n in enumerate(rng.integers(8, 40, 64))]
    out = {}
    for name, mesh, lora in [("single", (1, 1, 1), None), ("dp8", (8, 1, 1), None),
                             ("fsdp8", (1, 8, 1), None), ("dp2_fsdp2_tp2", (2, 2, 2), None),
                             ("lora_single", (1, 1, 1), LoraConfig(rank=4)),
                             ("lora_fsdp4_tp2", (1, 4, 2), LoraConfig(rank=4))]:
        tc = TrainConfig(seq_len=48, batch_size=16, grad_accum=2, steps=5, lr=1e-2,
                         warmup_steps=1, weight_decay=0.1, attn_impl="xla", progress=False,
                         dp=mesh[0], fsdp=mesh[1], tp=mesh[2], lora=lora)
        tr = Trainer(tc, cfg, params, ex)
        tr.run()
        specs = sorted({str(getattr(x.sharding, "spec", "")) for x in jax.tree.leaves(tr.state.params)})
        mom = [x for x in jax.tree.leaves(tr.state.opt_state) if x.ndim >= 2]
        out[name] = {"loss": [r["loss"] for r in tr.history],
                     "specs": specs, "n_dev": len(mom[0].sharding.device_set),
                     "moment_shard": list(mom[0].addressable_shards[0].data.shape),
                     "moment_shape": list(mom[0].shape),
                     "wq": np.asarray(jax.device_get(tr.trained_params()["layers"]
                                      ["wq" if lora is None else "wq_lora_b"])).tolist()}
    json.dump(out, sys.stdout)
""")


def test_sharded_training_matches_single_device():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, ref in (("dp8", "single"), ("fsdp8", "single"), ("dp2_fsdp2_tp2", "single"),
                      ("lora_fsdp4_tp2", "lora_single")):
        np.testing.assert_allclose(out[name]["loss"], out[ref]["loss"], rtol=2e-5, err_msg=name)
        np.testing.assert_allclose(out[name]["wq"], out[ref]["wq"], rtol=1e-3, atol=2e-5,
                                   err_msg=name)
    assert len(out["single"]["loss"]) == 5 and out["single"]["loss"][-1] < out["single"]["loss"][0]
    # FSDP really shards: the optimizer moments of a matrix are split over 8 devices
    assert "fsdp" in " ".join(out["fsdp8"]["specs"])
    shard, full = out["fsdp8"]["moment_shard"], out["fsdp8"]["moment_shape"]
    assert np.prod(shard) * 8 == np.prod(full), (shard, full)
    assert "tensor" in " ".join(out["dp2_fsdp2_tp2"]["specs"])
    assert all("fsdp" not in s and "tensor" not in s for s in out["dp8"]["specs"])


def test_training_sharding_uses_the_project_logical_axes():
    """The training rules name parameters exactly like sharding/rules.py (one table of names)."""
    rules = pytest.importorskip("sharding.rules")
    from jaxllm.train import sharding as shd

    cfg = tiny_config(attention_bias=True)
    ref = rules.logical_axes(cfg)
    shapes = llama.param_shapes(cfg)
    flat = jax.tree_util.tree_flatten_with_path(
        shapes, is_leaf=lambda x: isinstance(x, tuple))[0]
    for path, shape in flat:
        want = ref
        for k in path:
            want = want[k.key]
        got = shd.logical_axes(path, len(shape))
        # norms: the project names the vector axis "embed"; training keeps norms replicated
        if "norm" in jax.tree_util.keystr(path):
            assert got[:-1] == want[:-1]
        else:
            assert got == want, jax.tree_util.keystr(path)
