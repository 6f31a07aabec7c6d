"""One process of a multi-process sharded-generation check (started by tests/test_multihost.py).

    python tests/multihost_worker.py --coordinator 127.0.0.1:PORT --num-processes 2 \
        --process-id I --devices 2 --layouts 2,1,2 1,2,2 --out result.json

Each process: ``jax_num_cpu_devices`` local CPU devices, ``sharding.distributed.initialize``,
then for every ``dp,pp,tp`` layout the same tiny model (deterministic numpy weights) is
placed on the process-spanning mesh and run through the static generate path.
Process 0 writes ``{"dp,pp,tp": [[token ids per prompt]]}`` to ``--out``.

Also the home of the tiny model the sharding tests share (``CFG``, ``host_params``,
``PROMPTS``): importing this module does not touch JAX devices.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from jaxllm.config import ModelConfig  # noqa: E402

# 8 q heads / 4 kv heads: tp in {1,2,4,8} (tp=8 repeats kv heads 2x); 4 layers: pp in {1,2,4}.
CFG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=4,
                  num_heads=8, num_kv_heads=4, head_dim=8, max_position_embeddings=256)
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], list(range(10, 30)), [5], [40, 41, 42, 43], [99, 3]]
MAX_TOKENS = 8


def host_params(cfg: ModelConfig = CFG, seed: int = 0, scale: float = 2.0) -> dict:
    """Deterministic numpy weights (no JAX): identical in every process.  ``scale`` widens
    the matrices so greedy choices are clear-cut (x2: logits ~1, ties unlikely)."""
    from jaxllm.models import llama

    rng = np.random.default_rng(seed)
    shapes = llama.param_shapes(cfg)

    def make(path, shape):
        name = path[-1].key if hasattr(path[-1], "key") else str(path[-1])
        if "norm" in name:
            return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        return (0.02 * scale * rng.standard_normal(shape)).astype(np.float32)

    import jax
    return jax.tree_util.tree_map_with_path(make, shapes,
                                            is_leaf=lambda x: isinstance(x, tuple))


def greedy():
    from jaxllm.sampling import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--coordinator", required=True)
    ap.add_argument("--num-processes", type=int, required=True)
    ap.add_argument("--process-id", type=int, required=True)
    ap.add_argument("--devices", type=int, default=2, help="CPU devices per process")
    ap.add_argument("--layouts", nargs="+", required=True, help="dp,pp,tp ...")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    import jax

    jax.config.update("jax_num_cpu_devices", args.devices)
    jax.config.update("jax_default_matmul_precision", "highest")
    import sharding
    from sharding import distributed

    t0 = time.perf_counter()
    assert distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                                  timeout_s=60)
    assert jax.process_count() == args.num_processes, jax.process_count()
    assert jax.device_count() == args.devices * args.num_processes, jax.devices()
    # process 0's object reaches everyone (the serve follower-loop primitive)
    msg = distributed.broadcast_object({"step": 7, "ids": [1, 2, 3]}
                                       if distributed.is_main_process() else None)
    assert msg == {"step": 7, "ids": [1, 2, 3]}, msg
    params = host_params()
    results = {}
    for layout in args.layouts:
        dp, pp, tp = (int(x) for x in layout.split(","))
        model, placed = sharding.setup(CFG, params, dp=dp, tp=tp, pp=pp)
        # each process holds only its own shards
        assert all(s.device.process_index == jax.process_index()
                   for leaf in jax.tree.leaves(placed) for s in leaf.addressable_shards)
        results[layout] = sharding.generate(model, placed, PROMPTS, greedy(), impl="xla")
        distributed.main_print(f"[worker] {sharding.describe(model.mesh)}: {results[layout]}",
                               flush=True)
    if distributed.is_main_process():
        with open(args.out, "w") as f:
            json.dump({"results": results, "seconds": time.perf_counter() - t0}, f)
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
