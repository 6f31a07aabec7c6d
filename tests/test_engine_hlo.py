"""The engine's compiled step touches the KV page pool only in place.

A step must cost what its live tokens cost, not what the pool holds.  XLA:CPU once turned
every bfloat16 K/V write into a float32 copy of the whole pool (a 4 GiB pool: ~0.5 tok/s),
and no timing test would notice on a small pool.  These tests compile the engine's steps
for two pool sizes and read the optimized HLO: every materialised buffer as large as a
layer's pool must be the pool itself (parameter, bitcast, tuple plumbing) or an in-place
scatter into it, and the pool must be donated (aliased to the step's output).  They cover
the XLA path (every model dtype x KV dtype x scan / unrolled layers), the Pallas kernels
(interpret mode on CPU) and the engine on a mesh (8 virtual CPU devices, in a subprocess).
The same reading guards the bf16 embedding table in the decode loop.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxllm.config import ModelConfig
from jaxllm.engine.engine import LLMEngine
from jaxllm.engine.runner import RowParams, SampleRow
from jaxllm.engine.scheduler import ScheduledSequence, SchedulerOutput
from jaxllm.models import llama

CFG = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, max_position_embeddings=256)
PAGE = 4
POOL_SIZES = (100, 4096)  # neither equals the gathered block tables (rows x 32 pages)
ROOT = Path(__file__).resolve().parents[1]

# ops that may produce a pool-sized buffer without reading or writing all of it
_VIEW_OPS = {"parameter", "bitcast", "get-tuple-element", "tuple", "while", "conditional",
             "call", "opt-barrier"}
_IN_PLACE = {"scatter", "dynamic-update-slice"}
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\w+)\[([\d,]*)\]\S* ([\w-]+)\((.*)$")
_COMP = re.compile(r"^(?:ENTRY )?%(\S+) ")


def _computations(hlo: str) -> dict[str, list[str]]:
    comps, name = {}, None
    for line in hlo.splitlines():
        m = _COMP.match(line)
        if m and line.rstrip().endswith("{"):
            name = m.group(1)
            comps[name] = []
        elif name is not None and line.strip() and line.strip() != "}":
            comps[name].append(line)
    return comps


def _fusion_result_op(lines: list[str]) -> str:
    """The op whose value a fused computation returns, looking through bitcasts: a fusion
    that only bitcasts a parameter is a view, one that bitcasts a dynamic-slice is not."""
    ops = {}
    root = None
    for line in lines:
        m = _INSTR.match(line)
        if m:
            ops[m.group(1)] = (m.group(4), m.group(5))
            if line.lstrip().startswith("ROOT"):
                root = m.group(1)
    op = "tuple" if root is None else ops[root][0]
    while op == "bitcast":
        operand = re.match(r"\s*%([\w.\-]+)", ops[root][1])
        root = operand.group(1) if operand else None
        op = ops[root][0] if root in ops else "?"
    return op


def pool_sized_ops(hlo: str, layer_pool: int) -> list[str]:
    """Materialised instructions sized like the pool (a whole multiple of ``layer_pool``
    elements) that are neither views of it nor in-place writes into it.  Fused
    computations are skipped (their values are computed element by element inside the
    fusion, never stored whole)."""
    comps = _computations(hlo)
    fused = set()
    for lines in comps.values():
        for line in lines:
            fused.update(re.findall(r"calls=%([\w.\-]+)", line))
            fused.update(re.findall(r"to_apply=%([\w.\-]+)", line))
    bad = []
    for cname, lines in comps.items():
        if cname in fused:
            continue
        for line in lines:
            m = _INSTR.match(line)
            if not m:
                continue
            _, _, dims, op, _ = m.groups()
            n = int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
            if n < layer_pool or n % layer_pool:
                continue
            if op in _VIEW_OPS or op in _IN_PLACE:
                continue
            if op == "fusion":
                called = re.search(r"calls=%([\w.\-]+)", line).group(1)
                if _fusion_result_op(comps.get(called, [])) in _IN_PLACE | {"parameter"}:
                    continue
            bad.append(f"{cname}: {line.strip()[:200]}")
    return bad


def _engine(params, num_pages: int, kv_dtype: str, impl: str = "xla", model=None):
    """A small engine whose pool holds ``num_pages`` pages (``model``: on its mesh)."""
    return LLMEngine(params, CFG, eos_token_ids=(3,), model=model, max_model_len=128,
                     page_size=PAGE, num_pages=num_pages, max_num_seqs=8,
                     max_num_batched_tokens=32, kv_cache_dtype=kv_dtype, attention_impl=impl)


def _step_hlo(eng, *, num_steps: int = 1, prefill: bool = False, rows: int = 2) -> str:
    """Optimized HLO of the engine's step for ``rows`` decodes (``num_steps`` tokens per
    dispatch) or, with ``prefill``, the same decodes beside a 6-token prefill chunk (decode
    and ragged attention in one step).  With a copy-on-write page copy: it must update the
    pool in place too."""
    decodes = [ScheduledSequence(-1 - j, "", (5,), 9, (1, 2, 3), True, False)
               for j in range(rows)]
    chunk = ([ScheduledSequence(-9, "", tuple(range(5, 11)), 0, (5, 6), True, True)]
             if prefill else [])
    out = SchedulerOutput(decodes + chunk, num_decode_tokens=rows,
                          num_prefill_tokens=6 * len(chunk), blocks_to_copy=[(1, 4)],
                          block_size=PAGE)
    sample = [[SampleRow(RowParams(stop_ids=(3,)), 0, num_steps)]
              for _ in range(rows + len(chunk))]
    return eng.runner.lower(out, sample, num_steps=num_steps).compile().as_text()


def pool_problems(hlo: str, pool, unit: int) -> list[str]:
    """Why ``hlo`` does not touch ``pool`` only in place: its pool-sized work (buffers of
    a multiple of ``unit`` elements, :func:`pool_sized_ops`) and pool arrays it does not
    donate (every one must be aliased to an output, i.e. updated in place)."""
    bad = pool_sized_ops(hlo, unit)
    header = hlo.split("\n", 1)[0]
    aliased = re.findall(r"\{[\d,\s]*\}: \((\d+),", header)
    leaves = len(jax.tree.leaves(pool.caches))
    if len(aliased) != leaves:
        bad.append(f"{len(aliased)} of {leaves} pool arrays donated: {header[:300]}")
    return bad


def step_problems(make_engine, label: str, kv_heads: int, prefill: bool) -> list[str]:
    """:func:`pool_problems` of the steps of ``make_engine(num_pages)`` for each pool size:
    a one-token decode on the small pool, a 4-token decode loop on the large one and, with
    ``prefill``, a mixed prefill + decode step on the large one.  ``kv_heads``: kv heads of
    a pool array on one device (one layer's int8 scales, ``[pages, page, kv_heads]``, are
    the smallest pool-sized arrays; every pool-sized buffer is a multiple of them)."""
    problems = []
    for num_pages in POOL_SIZES:
        eng = make_engine(num_pages)
        big = num_pages == POOL_SIZES[-1]
        steps = {"decode": dict(num_steps=4 if big else 1)}
        if prefill and big:
            steps["prefill+decode"] = dict(prefill=True)
        unit = eng.pool.capacity * PAGE * kv_heads
        for name, kw in steps.items():
            problems += [f"{label}, {num_pages} pages, {name} step: {b}"
                         for b in pool_problems(_step_hlo(eng, **kw), eng.pool, unit)]
    return problems


def _params(dtype: str, scan: bool):
    p = llama.init_params(CFG, jax.random.key(0))
    p = jax.tree.map(lambda x: x.astype(dtype), p)
    return llama.fuse_projections(p if scan else llama.unstack_layers(p))


@pytest.mark.parametrize("layers", ["unrolled", "scan"])
@pytest.mark.parametrize("dtype,kv_dtype", [("float32", "float32"), ("bfloat16", "bfloat16"),
                                            ("bfloat16", "float32"), ("float32", "bfloat16"),
                                            ("float32", "int8"), ("bfloat16", "int8")])
def test_decode_step_touches_the_pool_only_in_place(dtype, kv_dtype, layers):
    """The XLA path (the CPU default) in every dtype combination the engine accepts."""
    params = _params(dtype, layers == "scan")
    problems = step_problems(lambda n: _engine(params, n, kv_dtype), f"{dtype}/{kv_dtype} "
                             f"{layers}", CFG.num_kv_heads, prefill=layers == "unrolled")
    assert not problems, "pool-sized work in the step:\n" + "\n".join(problems)


# interpret-mode compiles are slow (~20 s a case): the two dtypes each on one layer layout
PALLAS_CASES = [("bfloat16", "bfloat16", "unrolled"), ("float32", "float32", "scan")]


@pytest.mark.parametrize("dtype,kv_dtype,layers", PALLAS_CASES)
def test_pallas_step_touches_the_pool_only_in_place(dtype, kv_dtype, layers):
    """The Pallas kernels (interpret mode on CPU) keep a bfloat16 pool in uint16 bits like
    the XLA path and read compact copies of the pages the block tables name, never the
    pool (the interpreter copies every kernel operand once per grid program)."""
    params = _params(dtype, layers == "scan")
    problems = step_problems(lambda n: _engine(params, n, kv_dtype, impl="pallas"),
                             f"pallas {dtype}/{kv_dtype} {layers}", CFG.num_kv_heads,
                             prefill=True)
    assert not problems, "pool-sized work in the step:\n" + "\n".join(problems)


MESH = dict(dp=1, pp=2, tp=2)  # two stages; CFG's 2 kv heads leave one per tensor shard


def _mesh_problems() -> list[str]:
    """:func:`step_problems` of the engine on a ``MESH`` of virtual CPU devices, float32
    and bfloat16 (model and KV).  Runs in a process started with 8 CPU devices."""
    import sharding

    problems = []
    for dtype in ("float32", "bfloat16"):
        host = jax.tree.map(lambda x: np.asarray(x.astype(dtype)),
                            llama.init_params(CFG, jax.random.key(0)))
        model, placed = sharding.setup(CFG, host, **MESH)
        heads = model.plan.model_cfg.num_kv_heads // model.tp
        problems += step_problems(lambda n: _engine(placed, n, dtype, model=model),
                                  f"mesh {MESH} {dtype}", heads, prefill=True)
    return problems


def test_mesh_step_touches_the_pool_only_in_place():
    """The sharded engine step (``sharding.paged_forward`` with pipeline stages and kv
    heads split over tensor shards) updates its pool shards in place.  In a fresh
    interpreter: the device count is fixed when JAX starts."""
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env = {**os.environ, "XLA_FLAGS": flags.strip(), "JAX_PLATFORMS": "cpu",
           "JAXLLM_COMPILATION_CACHE": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, __file__, "mesh"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-8000:]


def test_decode_loop_keeps_the_bf16_embedding_in_place():
    """The multi-token decode loop gathers bfloat16 embedding rows without a float32 copy
    of the table: XLA:CPU converts the table for a bf16 gather, and hoisted out of the
    loop that convert was a fresh 2x-sized table per dispatch (``llama.embed_rows``)."""
    eng = _engine(_params("bfloat16", scan=False), POOL_SIZES[0], "bfloat16")
    bad = pool_sized_ops(_step_hlo(eng, num_steps=4), CFG.vocab_size * CFG.hidden_size)
    assert not bad, "embedding-sized work in the decode loop:\n" + "\n".join(bad)


def test_checker_sees_a_pool_sized_convert():
    """The guard itself: a step that converts the pool is caught."""
    pages = jax.numpy.zeros((256, PAGE, 2, 16), jax.numpy.bfloat16)
    f = jax.jit(lambda p, i, x: p.astype(jax.numpy.float32).at[i].set(x).astype(p.dtype),
                donate_argnums=0)
    hlo = f.lower(pages, 3, jax.numpy.ones((PAGE, 2, 16))).compile().as_text()
    assert pool_sized_ops(hlo, pages.size)


_FUSIONS_HLO = """HloModule m
%view (param_0: f32[64,4]) -> f32[256] {
  %param_0 = f32[64,4]{1,0} parameter(0)
  ROOT %bitcast.1 = f32[256]{0} bitcast(%param_0)
}

%slice (param_0.1: f32[128,4], param_1: s32[]) -> f32[256] {
  %param_0.1 = f32[128,4]{1,0} parameter(0)
  %param_1 = s32[] parameter(1)
  %constant.0 = s32[] constant(0)
  %dynamic-slice.1 = f32[64,4]{1,0} dynamic-slice(%param_0.1, %param_1, %constant.0)
  ROOT %bitcast.2 = f32[256]{0} bitcast(%dynamic-slice.1)
}

ENTRY %main (pool: f32[64,4], big: f32[128,4], i: s32[]) -> (f32[256], f32[256]) {
  %pool = f32[64,4]{1,0} parameter(0)
  %big = f32[128,4]{1,0} parameter(1)
  %i = s32[] parameter(2)
  %view_fusion = f32[256]{0} fusion(%pool), kind=kLoop, calls=%view
  %slice_fusion = f32[256]{0} fusion(%big, %i), kind=kLoop, calls=%slice
  ROOT %t = (f32[256]{0}, f32[256]{0}) tuple(%view_fusion, %slice_fusion)
}
"""


def test_checker_looks_through_bitcasts_in_fusions():
    """A fusion that bitcasts a parameter is a view; one that bitcasts a dynamic-slice
    materialises the slice (the Pallas interpreter's per-program block of a whole-pool
    operand looked like that)."""
    bad = pool_sized_ops(_FUSIONS_HLO, 256)
    assert len(bad) == 1 and "slice_fusion" in bad[0], bad


def test_bits_pool_equals_a_float32_pool_of_the_same_values():
    """A bfloat16 pool stored as uint16 bits writes, copies and attends exactly like a
    float32 pool holding the same bfloat16-rounded values."""
    from jaxllm import attention as A

    jnp = jax.numpy
    assert A.kv_storage_dtype("bfloat16", "xla") == jnp.uint16  # this suite runs on CPU
    rng = np.random.default_rng(0)
    P, hkv, d, n = 12, 2, 16, 9
    k = jnp.asarray(rng.normal(size=(n, hkv, d)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(n, hkv, d)), jnp.float32)
    q = jnp.asarray(rng.normal(size=(3, 4, d)), jnp.float32)
    slots = jnp.asarray([4, 5, 6, 7, 8, 13, -1, 20, 21], jnp.int32)
    tables = jnp.asarray([[1, 2, 0], [9, 3, 5], [1, 5, 0]], jnp.int32)
    lens = jnp.asarray([5, 10, 6], jnp.int32)
    pools = {}
    for storage in (jnp.uint16, jnp.float32):
        kp = jnp.zeros((P, PAGE, hkv, d), storage)
        vp = jnp.zeros((P, PAGE, hkv, d), storage)
        kb, vb = (x.astype(jnp.bfloat16) for x in (k, v))
        kp, vp = A.write_kv_pages(kp, vp, kb, vb, slots, impl="xla")
        kp, vp = (A.copy_kv_pages(x, jnp.asarray([1, 3]), jnp.asarray([9, 3])) for x in (kp, vp))
        dec = A.paged_decode_attention(q, kp, vp, tables, lens, impl="xla")
        rag = A.ragged_paged_attention(q, kp, vp, tables, jnp.asarray([0, 1, 2, 3]), lens,
                                       impl="xla")
        widened = (A._widen(kp), A._widen(vp))  # noqa: SLF001 (the read path under test)
        pools[storage] = (dec, rag, widened)
    for a, b in zip(jax.tree.leaves(pools[jnp.uint16]), jax.tree.leaves(pools[jnp.float32])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    kw = pools[jnp.uint16][2][0]
    assert np.asarray(kw)[9].any() and not np.asarray(kw)[0].any()  # copied; pads dropped


def test_decode_program_is_compiled_ahead_during_prefill():
    """The first decode step after a prefill runs the program compiled in the background
    while the prefill ran, and gives the same tokens as the jitted path."""
    from jaxllm.sampling import SamplingParams

    params = _params("float32", scan=False)
    kw = dict(eos_token_ids=(3,), max_model_len=128, page_size=PAGE, num_pages=100,
              max_num_seqs=8, max_num_batched_tokens=32, num_scheduler_steps=4)
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    sp = SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)
    ahead = LLMEngine(params, CFG, **kw)
    got = [o.outputs[0].token_ids for o in ahead.generate(prompts, sp)]
    decode_specs = [s for s in ahead.runner._ahead if s.decode_only]  # noqa: SLF001
    assert decode_specs and decode_specs[0] in ahead.runner.specs_seen
    assert decode_specs[0].num_decodes == 2 and decode_specs[0].num_steps == 4
    plain = LLMEngine(params, CFG, **kw)
    plain.runner._compile_ahead = lambda spec: None  # noqa: SLF001 - the jitted path only
    assert [o.outputs[0].token_ids for o in plain.generate(prompts, sp)] == got
    # n-gram speculation: the decode after a prefill watches its rows (lookup found no
    # draft yet), and that is the program compiled ahead
    ngram = LLMEngine(params, CFG, **kw, speculative_config={
        "method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3,
        "prompt_lookup_max": 3})
    assert [o.outputs[0].token_ids for o in ngram.generate(prompts, sp)] == got
    decode_specs = [s for s in ngram.runner._ahead if s.decode_only]  # noqa: SLF001
    assert decode_specs[0].lookup_n == 3 and decode_specs[0] in ngram.runner.specs_seen


def test_nearby_pool_sizes_share_programs():
    """Pool arrays are sized in buckets: a slightly different num_pages compiles nothing
    new (and max_model_len only sets the block-table width through its power of two)."""
    from jaxllm.compilation import count_compiles
    from jaxllm.sampling import SamplingParams

    params = _params("float32", scan=False)
    sp = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    kw = dict(eos_token_ids=(3,), page_size=PAGE, max_num_seqs=2, max_num_batched_tokens=16,
              num_scheduler_steps=1)
    first = LLMEngine(params, CFG, num_pages=100, max_model_len=120, **kw)
    want = first.generate([[5, 6, 7]], sp)[0].outputs[0].token_ids
    with count_compiles() as compiled:
        again = LLMEngine(params, CFG, num_pages=97, max_model_len=128, **kw)
        assert again.pool.capacity == first.pool.capacity == 104
        assert again.generate([[5, 6, 7]], sp)[0].outputs[0].token_ids == want
    assert not [c for c in compiled if "paged_step" in c], compiled


if __name__ == "__main__" and sys.argv[1:] == ["mesh"]:
    found = _mesh_problems()
    print("pool-sized work in the mesh step:\n" + "\n".join(found) if found else "ok")
    sys.exit(1 if found else 0)
