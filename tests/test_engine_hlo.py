"""The engine's compiled step touches the KV page pool only in place.

A step must cost what its live tokens cost, not what the pool holds.  XLA:CPU once turned
every bfloat16 K/V write into a float32 copy of the whole pool (a 4 GiB pool: ~0.5 tok/s),
and no timing test would notice on a small pool.  These tests compile the decode step for
two pool sizes and read the optimized HLO: every materialised buffer as large as a layer's
pool must be the pool itself (parameter, bitcast, tuple plumbing) or an in-place scatter
into it, and the pool must be donated (aliased to the step's output).
"""

from __future__ import annotations

import re

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


def _root_op(lines: list[str]) -> str:
    for line in lines:
        if line.lstrip().startswith("ROOT"):
            m = _INSTR.match(line)
            return m.group(4) if m else "tuple"
    return "?"


def pool_sized_ops(hlo: str, layer_pool: int) -> list[str]:
    """Materialised instructions sized like the pool (a whole multiple of ``layer_pool``
    elements) that are neither views of it nor in-place writes into it.  Fused computations are skipped (their values
    are computed element by element inside the fusion, never stored whole)."""
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
                if _root_op(comps.get(called, [])) in _IN_PLACE | {"bitcast"}:
                    continue
            bad.append(f"{cname}: {line.strip()[:200]}")
    return bad


def _decode_step_hlo(params, num_pages: int, kv_dtype: str, rows: int = 2,
                     num_steps: int = 1) -> tuple[str, object]:
    eng = LLMEngine(params, CFG, eos_token_ids=(3,), max_model_len=128, page_size=PAGE,
                    num_pages=num_pages, max_num_seqs=8, max_num_batched_tokens=32,
                    kv_cache_dtype=kv_dtype, attention_impl="xla")
    decodes = [ScheduledSequence(-1 - j, "", (5,), 9, (1, 2, 3), True, False)
               for j in range(rows)]
    # with a copy-on-write page copy: it must update the pool in place too
    out = SchedulerOutput(decodes, num_decode_tokens=rows, blocks_to_copy=[(1, 4)],
                          block_size=PAGE)
    sample = [[SampleRow(RowParams(stop_ids=(3,)), 0, num_steps)] for _ in range(rows)]
    compiled = eng.runner.lower(out, sample, num_steps=num_steps).compile()
    return compiled.as_text(), eng.pool


def _params(dtype: str, scan: bool):
    p = llama.init_params(CFG, jax.random.key(0))
    p = jax.tree.map(lambda x: x.astype(dtype), p)
    return llama.fuse_projections(p if scan else llama.unstack_layers(p))


@pytest.mark.parametrize("layers", ["unrolled", "scan"])
@pytest.mark.parametrize("dtype,kv_dtype", [("float32", "float32"), ("bfloat16", "bfloat16"),
                                            ("bfloat16", "float32"), ("float32", "bfloat16"),
                                            ("float32", "int8"), ("bfloat16", "int8")])
def test_decode_step_touches_the_pool_only_in_place(dtype, kv_dtype, layers):
    params = _params(dtype, layers == "scan")
    for num_pages in POOL_SIZES:
        hlo, pool = _decode_step_hlo(params, num_pages, kv_dtype,
                                     num_steps=4 if num_pages == POOL_SIZES[-1] else 1)
        # one layer's scales (int8) are the smallest pool-sized arrays: a multiple of them
        bad = pool_sized_ops(hlo, pool.capacity * PAGE * CFG.num_kv_heads)
        assert not bad, (f"{dtype}/{kv_dtype} {layers}, {num_pages} pages: pool-sized work "
                         "in the decode step:\n" + "\n".join(bad))
        # every pool array is donated: aliased to an output, updated in place
        header = hlo.split("\n", 1)[0]
        aliased = re.findall(r"\{[\d,\s]*\}: \((\d+),", header)
        assert len(aliased) == len(jax.tree.leaves(pool.caches)), header[:300]


def test_checker_sees_a_pool_sized_convert():
    """The guard itself: a step that converts the pool is caught."""
    pages = jax.numpy.zeros((256, PAGE, 2, 16), jax.numpy.bfloat16)
    f = jax.jit(lambda p, i, x: p.astype(jax.numpy.float32).at[i].set(x).astype(p.dtype),
                donate_argnums=0)
    hlo = f.lower(pages, 3, jax.numpy.ones((PAGE, 2, 16))).compile().as_text()
    assert pool_sized_ops(hlo, pages.size)


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
