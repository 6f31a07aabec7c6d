"""Two processes on localhost (2 CPU devices each, jax.distributed + gloo) run sharded greedy
generation -- tp=2 x dp=2 and pp=2 x tp=2 over 4 devices in 2 processes -- and must produce
exactly the tokens of a plain single-process, single-device run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import multihost_worker as W

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ["2,1,2", "1,2,2"]  # dp,pp,tp
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference() -> list[list[int]]:
    import jax
    import jax.numpy as jnp

    from jaxllm.generation import StaticBatch

    params = jax.tree.map(jnp.asarray, W.host_params())
    sb = StaticBatch(params, W.CFG, W.PROMPTS, [W.greedy()] * len(W.PROMPTS), (),
                     max_model_len=256, impl="xla")
    sb.step(100)
    out, num, _ = sb.fetch()
    return [[int(t) for t in out[i, :num[i]]] for i in range(len(W.PROMPTS))]


@pytest.mark.slow
def test_two_processes_match_single_process(tmp_path):
    port = _free_port()
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                     os.environ.get("PYTHONPATH")])),
           "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    env.pop("JAX_NUM_CPU_DEVICES", None)
    procs = []
    logs = []
    try:
        for pid in range(2):
            log = open(tmp_path / f"worker{pid}.log", "w+")
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "multihost_worker.py"),
                 "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                 "--process-id", str(pid), "--devices", "2", "--layouts", *LAYOUTS,
                 "--out", str(out)],
                env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
        ref = _reference()  # meanwhile, in this (single-device) process
        rcs = [p.wait(timeout=TIMEOUT_S) for p in procs]
    except subprocess.TimeoutExpired:
        rcs = None
    finally:
        for p in procs:  # only the workers this test started
            if p.poll() is None:
                p.kill()
                p.wait()
    text = []
    for i, log in enumerate(logs):
        log.seek(0)
        text.append(f"--- worker {i}\n" + log.read()[-4000:])
        log.close()
    assert rcs is not None, f"workers did not finish in {TIMEOUT_S} s\n" + "\n".join(text)
    assert rcs == [0, 0], f"worker exit codes {rcs}\n" + "\n".join(text)
    got = json.loads(out.read_text())["results"]
    assert len({tuple(r) for r in ref}) > 1  # the rows differ: a meaningful comparison
    for layout in LAYOUTS:
        assert got[layout] == ref, f"layout dp,pp,tp={layout}: {got[layout]} != {ref}"
    assert np.shape(ref) == (len(W.PROMPTS), W.MAX_TOKENS)
