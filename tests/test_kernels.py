"""Pallas kernels (interpret mode on CPU) and the XLA paged paths vs pallas_kernels.reference.

Shapes are small and reused so the (slow) interpret-mode compiles stay few: the whole
file runs in about a minute on 2 cores.  All inputs are random normals (never zero) in
float32; forward tolerance 1e-5, gradients 1e-4.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cpu_kernels
from jaxllm import attention as A
from pallas_kernels import reference as R
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.paged_attention import paged_decode_attention
from pallas_kernels.ragged_attention import ragged_paged_attention

FWD_TOL = 1e-5
GRAD_TOL = 1e-4


def _normal(rng, shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def _maxerr(a, b):
    return float(jnp.max(jnp.abs(jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32))))


# ------------------------------------------------------------------------- flash

# (name, B, T, S, Hq, Hkv, D, kwargs, blocks)
FLASH_CASES = [
    ("causal_gqa3_odd", 2, 37, 37, 6, 2, 16, dict(causal=True), dict(block_q=16, block_k=16)),
    ("window_gqa8_T<S", 1, 20, 45, 8, 1, 32, dict(causal=True, sliding_window=7),
     dict(block_q=16, block_k=16)),
    ("noncausal_softcap_mha", 1, 37, 37, 3, 3, 16, dict(causal=False, soft_cap=5.0),
     dict(block_q=16, block_k=32)),
    ("segments_gqa2", 2, 37, 37, 4, 2, 16, dict(causal=True, segments=True),
     dict(block_q=16, block_k=16)),
    ("T>S_rows_masked", 1, 40, 20, 2, 1, 16, dict(causal=True), dict(block_q=16, block_k=16)),
    ("default_blocks_T1", 1, 1, 37, 6, 2, 16, dict(causal=True), {}),
]


def _flash_inputs(rng, b, t, s, hq, hkv, d, kwargs):
    q, k, v = _normal(rng, (b, t, hq, d)), _normal(rng, (b, s, hkv, d)), _normal(rng, (b, s, hkv, d))
    kw = dict(kwargs)
    if kw.pop("segments", False):
        seg = np.zeros((b, t), np.int32)
        seg[:, 10:30] = 1
        seg[:, 30:] = 2
        seg[1:, :5] = 3  # a segment of its own in the second row
        kw["segment_ids"] = jnp.asarray(seg)
    return q, k, v, kw


XLA_BLOCK_CASES = [  # long enough for several query blocks of the XLA path
    ("causal_segments", 2, 300, 300, 6, 2, dict(causal=True, segments=True)),
    ("window_T<S", 1, 260, 400, 4, 1, dict(causal=True, sliding_window=50)),
    ("T>S_rows_masked", 1, 300, 140, 2, 2, dict(causal=True)),
    ("noncausal", 1, 200, 150, 2, 1, dict(causal=False)),
]


@pytest.mark.parametrize("case", XLA_BLOCK_CASES, ids=[c[0] for c in XLA_BLOCK_CASES])
def test_xla_attention_query_blocks_match_reference(case):
    """The XLA path computes each block of queries over only the keys it can see: it
    equals the full-matrix reference, masked rows (zeros) and gradients included."""
    _, b, t, s, hq, hkv, kwargs = case
    assert A._query_block(t) < t or not kwargs.get("causal")
    q, k, v, kw = _flash_inputs(np.random.default_rng(1), b, t, s, hq, hkv, 16, kwargs)
    xla = functools.partial(A.attention, sm_scale=0.25, impl="xla", **kw)
    ref = functools.partial(R.flash_attention_ref, sm_scale=0.25, **kw)
    out, vjp = jax.vjp(xla, q, k, v)
    out_ref, vjp_ref = jax.vjp(ref, q, k, v)
    assert _maxerr(out, out_ref) < FWD_TOL
    g = _normal(np.random.default_rng(2), out.shape)
    for a, r in zip(vjp(g), vjp_ref(g)):
        assert _maxerr(a, r) < GRAD_TOL


@pytest.mark.parametrize("case", FLASH_CASES, ids=[c[0] for c in FLASH_CASES])
def test_flash_forward_and_backward(case):
    _, b, t, s, hq, hkv, d, kwargs, blocks = case
    rng = np.random.default_rng(0)
    q, k, v, kw = _flash_inputs(rng, b, t, s, hq, hkv, d, kwargs)
    scale = d ** -0.5
    kern = functools.partial(flash_attention, sm_scale=scale, interpret=True, **blocks, **kw)
    ref = functools.partial(R.flash_attention_ref, sm_scale=scale, **kw)

    out, vjp = jax.vjp(kern, q, k, v)
    out_ref, vjp_ref = jax.vjp(ref, q, k, v)
    assert _maxerr(out, out_ref) < FWD_TOL
    # The dispatch module's XLA path has the same semantics (incl. zero rows).
    assert _maxerr(out, A.attention(q, k, v, sm_scale=scale, impl="xla", **kw)) < FWD_TOL

    if t == 1 or t > s:
        return  # forward-only cases
    do = _normal(rng, out.shape)
    for name, g, g_ref in zip("qkv", vjp(do), vjp_ref(do)):
        assert _maxerr(g, g_ref) < GRAD_TOL, name


def test_flash_fully_masked_rows_are_zero():
    rng = np.random.default_rng(1)
    q, k, v = _normal(rng, (1, 40, 2, 16)), _normal(rng, (1, 20, 1, 16)), _normal(rng, (1, 20, 1, 16))
    out = flash_attention(q, k, v, sm_scale=0.25, block_q=16, block_k=16, interpret=True)
    assert float(jnp.max(jnp.abs(out[:, :20]))) == 0.0  # queries before the first key
    assert float(jnp.min(jnp.abs(out[:, 20:]).sum(-1))) > 0.0


def test_attention_dispatch_pallas_matches_xla():
    rng = np.random.default_rng(2)
    q, k, v = _normal(rng, (2, 37, 6, 16)), _normal(rng, (2, 37, 2, 16)), _normal(rng, (2, 37, 2, 16))
    out_p = A.attention(q, k, v, impl="pallas")
    out_x = A.attention(q, k, v, impl="xla")
    assert _maxerr(out_p, out_x) < FWD_TOL
    # and the gradient through the dispatch
    f = lambda impl: jax.grad(lambda q: jnp.sum(jnp.sin(A.attention(q, k, v, impl=impl))))(q)
    assert _maxerr(f("pallas"), f("xla")) < GRAD_TOL


# ------------------------------------------------------------------------- paged helpers


def _paged_from_contiguous(rng, ks, vs, num_pages, page_size, *, impl="xla"):
    """Lay contiguous per-sequence K/V (lists of [L_b, Hkv, D]) into a pool through a
    shuffled block table using write_kv_pages.  Returns (k_pages, v_pages, block_tables)."""
    hkv, d = ks[0].shape[1:]
    max_pages = max(1, max(-(-x.shape[0] // page_size) for x in ks))
    perm = rng.permutation(num_pages)
    bt = perm[: len(ks) * max_pages].reshape(len(ks), max_pages).astype(np.int32)
    # Pool starts as random finite junk so unwritten slots are not silently zero.
    k_pages = _normal(rng, (num_pages, page_size, hkv, d))
    v_pages = _normal(rng, (num_pages, page_size, hkv, d))
    slots, kk, vv = [], [], []
    for b, (kb, vb) in enumerate(zip(ks, vs)):
        pos = np.arange(kb.shape[0])
        slots.append(bt[b, pos // page_size] * page_size + pos % page_size)
        kk.append(kb)
        vv.append(vb)
    slots.append(np.full(3, -1))  # padding tokens: must be skipped
    kk.append(_normal(rng, (3, hkv, d)))
    vv.append(_normal(rng, (3, hkv, d)))
    k_pages, v_pages = A.write_kv_pages(k_pages, v_pages, jnp.concatenate(kk), jnp.concatenate(vv),
                                        jnp.asarray(np.concatenate(slots), jnp.int32), impl=impl)
    return k_pages, v_pages, jnp.asarray(bt)


def _dense_left_padded(qs, ks, vs, **kw):
    """Dense ``attention()`` for several sequences in ONE call: queries and keys are
    right-aligned (left padding masked with segment ids), so the end-aligned causal mask
    and sliding window see each sequence's true positions.  ``qs[i] [T_i,Hq,D]``,
    ``ks[i], vs[i] [S_i,Hkv,D]`` -> list of ``[T_i,Hq,D]``."""
    t_max = max(x.shape[0] for x in qs)
    s_max = max(x.shape[0] for x in ks)

    def left_pad(xs, n):
        return jnp.stack([jnp.pad(x, ((n - x.shape[0], 0), (0, 0), (0, 0))) for x in xs])

    q_seg = jnp.asarray([[-1] * (t_max - x.shape[0]) + [1] * x.shape[0] for x in qs], jnp.int32)
    k_seg = jnp.asarray([[0] * (s_max - x.shape[0]) + [1] * x.shape[0] for x in ks], jnp.int32)
    out = A.attention(left_pad(qs, t_max), left_pad(ks, s_max), left_pad(vs, s_max), causal=True,
                      segment_ids=q_seg, kv_segment_ids=k_seg, impl="xla", **kw)
    return [out[i, t_max - x.shape[0]:] for i, x in enumerate(qs)]


# (name, Hq, Hkv, D, page_size, lengths, kwargs, kernel blocks)
DECODE_CASES = [
    ("gqa8_ps4_splits", 8, 1, 32, 4, [0, 1, 16, 37, 48], {},
     dict(pages_per_split=4, pages_per_block=2)),
    ("gqa3_ps16_window_softcap", 6, 2, 16, 16, [5, 1, 64, 30, 17],
     dict(sliding_window=9, soft_cap=3.0), {}),
    ("mha_ps4", 4, 4, 16, 4, [7, 40, 23, 0, 2], {}, dict(pages_per_split=2)),
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
def test_paged_decode_matches_contiguous_attention(case):
    _, hq, hkv, d, ps, lengths, kw, blocks = case
    rng = np.random.default_rng(3)
    b = len(lengths)
    ks = [_normal(rng, (n, hkv, d)) for n in lengths]
    vs = [_normal(rng, (n, hkv, d)) for n in lengths]
    k_pages, v_pages, bt = _paged_from_contiguous(rng, ks, vs, 64, ps)
    q = _normal(rng, (b, hq, d))
    lens = jnp.asarray(lengths, jnp.int32)
    scale = d ** -0.5

    out = paged_decode_attention(q, k_pages, v_pages, bt, lens, sm_scale=scale, interpret=True,
                                 **blocks, **kw)
    ref = R.paged_decode_attention_ref(q, k_pages, v_pages, bt, lens, sm_scale=scale, **kw)
    assert _maxerr(out, ref) < FWD_TOL
    xla = A.paged_decode_attention(q, k_pages, v_pages, bt, lens, sm_scale=scale, impl="xla", **kw)
    assert _maxerr(xla, ref) < FWD_TOL
    live = [i for i, n in enumerate(lengths) if n > 0]
    dense = _dense_left_padded([q[i][None] for i in live], [ks[i] for i in live],
                               [vs[i] for i in live], sm_scale=scale, **kw)
    for i, want in zip(live, dense):
        assert _maxerr(out[i], want[0]) < FWD_TOL, i
    for i, n in enumerate(lengths):
        if n == 0:
            assert float(jnp.max(jnp.abs(out[i]))) == 0.0


def test_paged_decode_int8():
    rng = np.random.default_rng(4)
    hq, hkv, d, ps, num_pages = 8, 2, 16, 4, 40
    lengths = jnp.asarray([7, 40, 23, 1], jnp.int32)
    kf, vf = _normal(rng, (num_pages, ps, hkv, d)), _normal(rng, (num_pages, ps, hkv, d))
    k8, k_s = R.quantize_kv(kf)
    v8, v_s = R.quantize_kv(vf)
    assert k8.dtype == jnp.int8 and k_s.shape == (num_pages, ps, hkv)
    assert _maxerr(R.dequantize(k8, k_s), kf) < 0.05  # the quantiser itself is sane
    bt = jnp.asarray(rng.permutation(num_pages)[:40].reshape(4, 10), jnp.int32)
    q = _normal(rng, (4, hq, d))
    kw = dict(sm_scale=d ** -0.5, k_scales=k_s, v_scales=v_s)
    out = paged_decode_attention(q, k8, v8, bt, lengths, interpret=True, pages_per_split=4,
                                 pages_per_block=2, **kw)
    # reference on explicitly dequantized float pools
    ref = R.paged_decode_attention_ref(q, R.dequantize(k8, k_s), R.dequantize(v8, v_s), bt, lengths,
                                       sm_scale=d ** -0.5)
    assert _maxerr(out, ref) < FWD_TOL
    xla = A.paged_decode_attention(q, k8, v8, bt, lengths, impl="xla", **kw)
    assert _maxerr(xla, ref) < FWD_TOL


# ------------------------------------------------------------------------- ragged

# Mixed batch: two prefill chunks with prior context, three decode tokens, a padding
# sequence (q_len 0, kv_len 0) and padding tokens past cu_q_lens[-1].
MIXED_Q_LENS = [13, 20, 1, 1, 1, 0]
MIXED_KV_LENS = [30, 27, 9, 1, 44, 0]
MIXED_N = 44  # 36 real tokens + 8 padding

RAGGED_CASES = [
    ("gqa4_ps4", 8, 2, 32, 4, {}, {}),
    ("mha_ps16_window_softcap", 3, 3, 16, 16, dict(sliding_window=6, soft_cap=4.0),
     dict(block_q=4, pages_per_block=1)),
]


@pytest.mark.parametrize("case", RAGGED_CASES, ids=[c[0] for c in RAGGED_CASES])
def test_ragged_mixed_batch(case):
    _, hq, hkv, d, ps, kw, blocks = case
    rng = np.random.default_rng(5)
    ks = [_normal(rng, (n, hkv, d)) for n in MIXED_KV_LENS]
    vs = [_normal(rng, (n, hkv, d)) for n in MIXED_KV_LENS]
    k_pages, v_pages, bt = _paged_from_contiguous(rng, ks, vs, 96, ps)
    q = _normal(rng, (MIXED_N, hq, d))
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(MIXED_Q_LENS)]), jnp.int32)
    kvl = jnp.asarray(MIXED_KV_LENS, jnp.int32)
    scale = d ** -0.5

    out = ragged_paged_attention(q, k_pages, v_pages, bt, cu, kvl, sm_scale=scale, interpret=True,
                                 **blocks, **kw)
    ref = R.ragged_paged_attention_ref(q, k_pages, v_pages, bt, cu, kvl, sm_scale=scale, **kw)
    assert _maxerr(out, ref) < FWD_TOL
    assert float(jnp.max(jnp.abs(out[int(cu[-1]):]))) == 0.0  # padding tokens
    for bq in (None, 1):
        xla = A.ragged_paged_attention(q, k_pages, v_pages, bt, cu, kvl, sm_scale=scale, impl="xla",
                                       block_q=bq, **kw)
        assert _maxerr(xla, ref) < FWD_TOL, bq
    # per sequence: dense attention over its contiguous K/V (causal, aligned to the end)
    live = [i for i, ql in enumerate(MIXED_Q_LENS) if ql > 0]
    starts = [int(c) for c in cu[:-1]]
    dense = _dense_left_padded([q[starts[i]:starts[i] + MIXED_Q_LENS[i]] for i in live],
                               [ks[i] for i in live], [vs[i] for i in live], sm_scale=scale, **kw)
    for i, want in zip(live, dense):
        assert _maxerr(out[starts[i]:starts[i] + MIXED_Q_LENS[i]], want) < FWD_TOL, i


def test_ragged_dispatch_pallas():
    """``jaxllm.attention.ragged_paged_attention(impl="pallas")`` reaches the kernel."""
    rng = np.random.default_rng(6)
    hq, hkv, d, ps = 8, 2, 32, 4
    k_pages, v_pages = _normal(rng, (64, ps, hkv, d)), _normal(rng, (64, ps, hkv, d))
    bt = jnp.asarray(rng.integers(0, 64, (6, 12)), jnp.int32)
    q = _normal(rng, (MIXED_N, hq, d))
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(MIXED_Q_LENS)]), jnp.int32)
    kvl = jnp.asarray(MIXED_KV_LENS, jnp.int32)
    out = A.ragged_paged_attention(q, k_pages, v_pages, bt, cu, kvl, impl="pallas")
    ref = R.ragged_paged_attention_ref(q, k_pages, v_pages, bt, cu, kvl)
    assert _maxerr(out, ref) < FWD_TOL


# ------------------------------------------------------------------------- cache write


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_write_kv_pages(impl):
    rng = np.random.default_rng(7)
    num_pages, ps, hkv, d = 6, 4, 2, 8
    k_pages, v_pages = _normal(rng, (num_pages, ps, hkv, d)), _normal(rng, (num_pages, ps, hkv, d))
    k, v = _normal(rng, (7, hkv, d)), _normal(rng, (7, hkv, d))
    slots = jnp.asarray([5, 0, -1, 23, 9, -1, 14], jnp.int32)
    nk, nv = A.write_kv_pages(k_pages, v_pages, k, v, slots, impl=impl)
    rk, rv = R.write_kv_pages_ref(k_pages, v_pages, k, v, slots)
    assert _maxerr(nk, rk) == 0.0 and _maxerr(nv, rv) == 0.0
    flat = nk.reshape(-1, hkv, d)
    assert _maxerr(flat[23], k[3]) == 0.0 and _maxerr(flat[5], k[0]) == 0.0
    # slot -1 must not wrap around to the last slot (23 holds token 3, others untouched)
    untouched = np.setdiff1d(np.arange(num_pages * ps), [5, 0, 23, 9, 14])
    assert _maxerr(flat[untouched], k_pages.reshape(-1, hkv, d)[untouched]) == 0.0


# ------------------------------------------------------------------------- uint16 pools
#
# On CPU a bfloat16 pool is kept as its bits in uint16 arrays (an integer scatter updates it
# in place; jaxllm.attention.kv_storage_dtype): the kernels bitcast each loaded block.

BF16_TOL = 2e-2  # bfloat16 pool values; the PV product takes bfloat16 probabilities


def _bits(x):
    """The bfloat16 values of ``x`` as the uint16 bits a CPU pool stores."""
    return jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.bfloat16), jnp.uint16)


def _values(bits):
    """float32 values of a uint16 (bfloat16 bits) pool: the reference's input."""
    return jax.lax.bitcast_convert_type(bits, jnp.bfloat16).astype(jnp.float32)


def _uint16_case(seed: int, num_pages: int):
    """A uint16 pool pair of random values, shuffled block tables for 4 sequences and
    their lengths, decode queries, and a ragged batch (cu_q_lens, kv_lens, queries)."""
    rng = np.random.default_rng(seed)
    hq, hkv, d, ps = 8, 2, 16, 4
    kb = _bits(_normal(rng, (num_pages, ps, hkv, d)))
    vb = _bits(_normal(rng, (num_pages, ps, hkv, d)))
    bt = jnp.asarray(rng.permutation(num_pages)[:40].reshape(4, 10), jnp.int32)
    lens = jnp.asarray([7, 40, 23, 1], jnp.int32)
    cu = jnp.asarray([0, 5, 6, 9, 9], jnp.int32)  # prefill chunks, a decode, an empty seq
    kvl = jnp.asarray([12, 40, 23, 0], jnp.int32)
    return kb, vb, bt, lens, _normal(rng, (4, hq, d)), cu, kvl, _normal(rng, (12, hq, d))


def test_kernels_read_uint16_pools_as_bfloat16():
    """Both kernels give a uint16 pool exactly the results of the bfloat16 pool with the
    same bits, and the reference's on its values."""
    kb, vb, bt, lens, q, cu, kvl, qr = _uint16_case(8, 40)
    as_bf16 = [jax.lax.bitcast_convert_type(x, jnp.bfloat16) for x in (kb, vb)]
    scale = 16 ** -0.5
    dec = functools.partial(paged_decode_attention, sm_scale=scale, pages_per_split=4,
                            pages_per_block=2, interpret=True)
    out = dec(q, kb, vb, bt, lens)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(dec(q, *as_bf16, bt, lens)))
    ref = R.paged_decode_attention_ref(q, _values(kb), _values(vb), bt, lens, sm_scale=scale)
    assert _maxerr(out, ref) < BF16_TOL
    rag = functools.partial(ragged_paged_attention, sm_scale=scale, interpret=True)
    out = rag(qr, kb, vb, bt, cu, kvl)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(rag(qr, *as_bf16, bt, cu, kvl)))
    ref = R.ragged_paged_attention_ref(qr, _values(kb), _values(vb), bt, cu, kvl, sm_scale=scale)
    assert _maxerr(out, ref) < BF16_TOL
    with pytest.raises(ValueError, match="takes no scales"):
        dec(q, kb, vb, bt, lens, k_scales=jnp.ones(kb.shape[:3]))


def test_pallas_dispatch_reads_uint16_pools_like_xla():
    """``jaxllm.attention`` with impl="pallas" on CPU (kernels in interpret mode, handed
    the pages the block tables name) on a uint16 pool with bfloat16 queries, as the
    bfloat16 engine runs: the XLA path's and the reference's results."""
    kb, vb, bt, lens, q, cu, kvl, qr = _uint16_case(9, 200)
    q, qr = q.astype(jnp.bfloat16), qr.astype(jnp.bfloat16)
    for f, args, ref in (
            (A.paged_decode_attention, (q, kb, vb, bt, lens), R.paged_decode_attention_ref),
            (A.ragged_paged_attention, (qr, kb, vb, bt, cu, kvl),
             R.ragged_paged_attention_ref)):
        got = f(*args, impl="pallas")
        assert got.dtype == jnp.bfloat16
        assert _maxerr(got, f(*args, impl="xla")) < BF16_TOL
        want = ref(args[0], _values(kb), _values(vb), *args[3:])
        assert _maxerr(got, want) < BF16_TOL


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_write_and_copy_on_uint16_pools(impl):
    """Writes (padding slots skipped) and copy-on-write page copies on a uint16 pool store
    the bits a bfloat16 pool would hold."""
    rng = np.random.default_rng(10)
    num_pages, ps, hkv, d = 6, 4, 2, 8
    kf, vf = _normal(rng, (num_pages, ps, hkv, d)), _normal(rng, (num_pages, ps, hkv, d))
    k, v = _normal(rng, (7, hkv, d)), _normal(rng, (7, hkv, d))
    slots = jnp.asarray([5, 0, -1, 23, 9, -1, 14], jnp.int32)
    nk, nv = A.write_kv_pages(_bits(kf), _bits(vf), k, v, slots, impl=impl)
    assert nk.dtype == nv.dtype == jnp.uint16
    rk, rv = R.write_kv_pages_ref(kf.astype(jnp.bfloat16), vf.astype(jnp.bfloat16), k, v, slots)
    assert _maxerr(_values(nk), rk) == 0.0 and _maxerr(_values(nv), rv) == 0.0
    src, dst = jnp.asarray([1, 3]), jnp.asarray([4, 3])
    assert _maxerr(_values(A.copy_kv_pages(nk, src, dst)), A.copy_kv_pages(rk, src, dst)) == 0.0


# ------------------------------------------------------------------------- property tests


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_paged_decode_kernel_property(data):
    """Kernel == reference over random lengths / page tables; shapes come from a small set
    so interpret-mode compiles are shared between examples."""
    g = data.draw(st.sampled_from([1, 3]), label="groups")
    ps = data.draw(st.sampled_from([4, 16]), label="page_size")
    b = 3
    max_pages = 64 // ps
    lengths = data.draw(st.lists(st.integers(0, max_pages * ps), min_size=b, max_size=b))
    window = data.draw(st.sampled_from([None, 5]), label="window")
    seed = data.draw(st.integers(0, 2 ** 16), label="seed")
    rng = np.random.default_rng(seed)
    hkv, d, num_pages = 2, 16, 3 * max_pages
    k_pages, v_pages = _normal(rng, (num_pages, ps, hkv, d)), _normal(rng, (num_pages, ps, hkv, d))
    bt = jnp.asarray(rng.permutation(num_pages).reshape(b, max_pages), jnp.int32)
    q = _normal(rng, (b, g * hkv, d))
    lens = jnp.asarray(lengths, jnp.int32)
    out = paged_decode_attention(q, k_pages, v_pages, bt, lens, sm_scale=0.3, sliding_window=window,
                                 pages_per_split=2, pages_per_block=1, interpret=True)
    ref = R.paged_decode_attention_ref(q, k_pages, v_pages, bt, lens, sm_scale=0.3,
                                       sliding_window=window)
    assert _maxerr(out, ref) < FWD_TOL


def _ragged_jit(kernels: bool):
    """``A.ragged_paged_attention`` jitted with the CPU kernels on (its decode-row route)
    or off (the XLA path): the choice is made while tracing."""
    def ragged(*args, **kw):
        with cpu_kernels.override(kernels):
            return A.ragged_paged_attention(*args, **kw)
    return jax.jit(ragged, static_argnames=("impl", "block_q", "sliding_window"))


_RAGGED_JIT = {False: _ragged_jit(False), True: _ragged_jit(True)}
_ragged_ref_jit = jax.jit(R.ragged_paged_attention_ref, static_argnames=("sliding_window",))


@pytest.mark.parametrize("kernels", [False, True], ids=["xla", "cpu-kernel"])
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_ragged_xla_property(kernels, data):
    """The CPU engine's ragged paths == reference for random mixes of prefill chunks,
    decode tokens and padding sequences, any block size (fixed N: contents vary): the
    XLA path, and the C++ decode kernel with one row per query token."""
    num_seqs, n = 5, 48
    q_lens = data.draw(st.lists(st.integers(0, 9), min_size=num_seqs, max_size=num_seqs))
    ctx = data.draw(st.lists(st.integers(0, 20), min_size=num_seqs, max_size=num_seqs))
    kv_lens = [ql + c if ql > 0 else data.draw(st.sampled_from([0, c])) for ql, c in zip(q_lens, ctx)]
    block_q = data.draw(st.sampled_from([None, 1, 4]), label="block_q")
    window = data.draw(st.sampled_from([None, 4]), label="window")
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16)))
    hq, hkv, d, ps, num_pages = 4, 2, 8, 4, 40
    k_pages, v_pages = _normal(rng, (num_pages, ps, hkv, d)), _normal(rng, (num_pages, ps, hkv, d))
    bt = jnp.asarray(rng.integers(0, num_pages, (num_seqs, 8)), jnp.int32)
    q = _normal(rng, (n, hq, d))
    cu = jnp.asarray(np.concatenate([[0], np.cumsum(q_lens)]), jnp.int32)
    kvl = jnp.asarray(kv_lens, jnp.int32)
    out = _RAGGED_JIT[kernels](q, k_pages, v_pages, bt, cu, kvl, impl="xla", block_q=block_q,
                               sliding_window=window)
    ref = _ragged_ref_jit(q, k_pages, v_pages, bt, cu, kvl, sliding_window=window)
    assert _maxerr(out, ref) < FWD_TOL


# ------------------------------------------------------------------------- GPU lowering


def test_kernels_lower_to_triton_for_cuda():
    """No GPU needed: export for the CUDA platform runs the Pallas -> Triton lowering of
    every kernel (catches unsupported primitives, non-power-of-two tensors, ...) at the
    production dtype/shapes.  Only PTX compilation is left for a real GPU."""
    from jax import export

    S, bf = jax.ShapeDtypeStruct, jnp.bfloat16

    def lower(f, *args):
        exp = export.export(jax.jit(f), platforms=["cuda"], disabled_checks=[
            export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
        return exp.mlir_module().count("__gpu$xla.gpu.triton")

    q, k = S((1, 200, 8, 128), bf), S((1, 200, 2, 128), bf)
    seg = S((1, 200), jnp.int32)

    def fwd_bwd(q, k, v, do, seg):
        f = functools.partial(flash_attention, segment_ids=seg, sm_scale=0.1, soft_cap=30.0,
                              sliding_window=64)
        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(do)

    assert lower(fwd_bwd, q, k, k, q, seg) == 3  # fwd, dq, dk/dv
    pool8, scales = S((64, 16, 2, 128), jnp.int8), S((64, 16, 2), jnp.float32)
    assert lower(lambda q, kp, vp, bt, ln, ks, vs: paged_decode_attention(
        q, kp, vp, bt, ln, sm_scale=0.1, k_scales=ks, v_scales=vs),
        S((4, 8, 128), bf), pool8, pool8, S((4, 16), jnp.int32), S((4,), jnp.int32), scales,
        scales) == 1
    pool = S((64, 16, 2, 128), bf)
    assert lower(functools.partial(ragged_paged_attention, sm_scale=0.1), S((40, 8, 128), bf),
                 pool, pool, S((5, 16), jnp.int32), S((6,), jnp.int32), S((5,), jnp.int32)) == 1
    bits = S((64, 16, 2, 128), jnp.uint16)  # bfloat16 bits (the CPU pool form) lower too
    assert lower(lambda q, kp, vp, bt, ln: paged_decode_attention(q, kp, vp, bt, ln, sm_scale=0.1),
                 S((4, 8, 128), bf), bits, bits, S((4, 16), jnp.int32), S((4,), jnp.int32)) == 1
    assert lower(functools.partial(ragged_paged_attention, sm_scale=0.1), S((40, 8, 128), bf),
                 bits, bits, S((5, 16), jnp.int32), S((6,), jnp.int32), S((5,), jnp.int32)) == 1


def test_xla_paths_with_a_single_query_block():
    """Regression: XLA:CPU miscompiled the XLA paged path for one query block under jit
    (a batch-1 decode or a lone ragged token gave wrong values)."""
    with cpu_kernels.override(False):  # the XLA path, not the CPU kernel
        _single_query_block_case()


def _single_query_block_case():
    from pallas_kernels.reference import paged_decode_attention_ref, ragged_paged_attention_ref

    from jaxllm.attention import paged_decode_attention, ragged_paged_attention

    rng = np.random.default_rng(0)
    pages, ps, hkv, d, hq = 64, 16, 3, 64, 9
    kp = jnp.asarray(rng.normal(size=(pages, ps, hkv, d)), jnp.float32)
    vp = jnp.asarray(rng.normal(size=(pages, ps, hkv, d)), jnp.float32)
    q = jnp.asarray(rng.normal(size=(1, hq, d)), jnp.float32)
    bt = jnp.asarray(rng.permutation(pages)[:8].reshape(1, 8), jnp.int32)
    got = jax.jit(lambda *a: paged_decode_attention(*a, impl="xla"))(
        q, kp, vp, bt, jnp.asarray([100], jnp.int32))
    ref = paged_decode_attention_ref(q, kp, vp, bt, jnp.asarray([100], jnp.int32),
                                     sm_scale=d ** -0.5)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)
    cu, kl = jnp.asarray([0, 1], jnp.int32), jnp.asarray([40], jnp.int32)
    got = jax.jit(lambda *a: ragged_paged_attention(*a, impl="xla"))(q, kp, vp, bt, cu, kl)
    ref = ragged_paged_attention_ref(q, kp, vp, bt, cu, kl, sm_scale=d ** -0.5)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)
