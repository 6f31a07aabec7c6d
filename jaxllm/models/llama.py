"""Llama-family decoder (Llama 1-3, Mistral, Qwen2, SmolLM) as pure functions.

The model is its parameter pytree (layout in ``docs/design.md``) plus the
functions below; there is no hidden state.  Attention is injected as an
``attend(q, k, v, cache, layer) -> (out, cache)`` callable so the same layer loop
serves training (no cache), static-batch generation (dense cache per layer), the
paged engine (one page pool shared by all layers) and profiling -- each caller
builds its ``attend`` from ``jaxllm.attention``.

Layers run either under ``lax.scan`` over stacked weights (flat compile time
in depth) or unrolled over a list of per-layer dicts (XLA fuses across layers
and avoids per-layer weight-slice copies; faster on XLA:CPU).  Which one is
chosen by the structure of ``params["layers"]``: a dict of stacked arrays
scans, a list of dicts unrolls.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import cpu_kernels
from jaxllm.config import ModelConfig
from jaxllm.quant import QuantizedArray, ops as quant_ops

Params = dict[str, Any]
# attend(q [B,T,Hq,D], k, v [B,T,Hkv,D], cache, layer) -> (out [B,T,Hq,D], cache); ``layer``
# is the layer index: a Python int when unrolled, a traced int32 under scan.
AttendFn = Callable[[jax.Array, jax.Array, jax.Array, Any, Any], tuple[jax.Array, Any]]

LAYER_KEYS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")
BIAS_KEYS = ("bq", "bk", "bv")


# --------------------------------------------------------------------------- params

def param_shapes(cfg: ModelConfig) -> dict[str, Any]:
    """Shapes of the stacked parameter pytree for ``cfg``."""
    d, f, v, n = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    qd, kvd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layers = {
        "attn_norm": (n, d), "wq": (n, d, qd), "wk": (n, d, kvd), "wv": (n, d, kvd),
        "wo": (n, qd, d), "mlp_norm": (n, d),
        "w_gate": (n, d, f), "w_up": (n, d, f), "w_down": (n, f, d),
    }
    if cfg.attention_bias:
        layers.update(bq=(n, qd), bk=(n, kvd), bv=(n, kvd))
    shapes: dict[str, Any] = {"embed": (v, d), "layers": layers, "final_norm": (d,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (d, v)
    return shapes


def init_params(cfg: ModelConfig, key: jax.Array, dtype: Any = jnp.float32) -> Params:
    """Random parameters (normal, std 0.02; norms around 1) -- for tests and benchmarks."""
    shapes = param_shapes(cfg)
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda x: isinstance(x, tuple))
    paths = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda x: isinstance(x, tuple))[0]]
    keys = jax.random.split(key, len(leaves))
    out = []
    for path, shape, k in zip(paths, leaves, keys):
        if "norm" in path:
            arr = 1.0 + 0.1 * jax.random.normal(k, shape)
        else:
            arr = 0.02 * jax.random.normal(k, shape)
        out.append(arr.astype(dtype))
    return jax.tree.unflatten(treedef, out)


def unstack_layers(params: Params) -> Params:
    """Stacked ``layers`` dict -> list of per-layer dicts (for unrolled execution)."""
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        return params
    n = next(iter(layers.values())).shape[0]
    return {**params, "layers": [{k: v[i] for k, v in layers.items()} for i in range(n)]}


def stack_layers(params: Params) -> Params:
    """List of per-layer dicts -> stacked ``layers`` dict (for ``scan``)."""
    layers = params["layers"]
    if isinstance(layers, dict):
        return params
    xp = np if isinstance(jax.tree.leaves(layers[0])[0], np.ndarray) else jnp
    return {**params, "layers": {k: jax.tree.map(lambda *xs: xp.stack(xs), *[lp[k] for lp in layers])
                                 for k in layers[0]}}


FUSED = {"wqkv": ("wq", "wk", "wv"), "bqkv": ("bq", "bk", "bv"), "w_gate_up": ("w_gate", "w_up")}


def fuse_projections(params: Params) -> Params:
    """Inference layout: ``wq|wk|wv -> wqkv`` (``bq|bk|bv -> bqkv``) and ``w_gate|w_up ->
    w_gate_up``, concatenated on the output axis, so a layer runs 4 weight matmuls instead
    of 7: at batch 1 a small matrix-vector product is overhead-bound on CPU, so fewer,
    larger ones decode faster (docs/benchmarks.md).  The layer code accepts either
    layout; training, LoRA and sharding use the separate weights."""
    def fuse(lp: dict) -> dict:
        if "wq" not in lp or any(f"{k}_lora_a" in lp for k in LORA_TARGETS):
            return lp
        out = dict(lp)
        for fused, parts in FUSED.items():
            if all(p in lp for p in parts):
                arrays = [lp[p] for p in parts]
                out[fused] = (_host_concat(arrays) if isinstance(arrays[0], np.ndarray)
                              else jnp.concatenate(arrays, axis=-1))
                for p in parts:
                    del out[p]
        return out

    layers = params["layers"]
    fused = [fuse(lp) for lp in layers] if isinstance(layers, (list, tuple)) else fuse(layers)
    return {**params, "layers": fused}


def unfuse_projections(params: Params, cfg: ModelConfig) -> Params:
    """The inverse of :func:`fuse_projections`: ``wqkv -> wq|wk|wv`` (and ``bqkv``),
    ``w_gate_up -> w_gate|w_up``, cut on the output axis -- for tensor parallelism, which
    splits each projection by its own heads / features.  Quantized weights are cut by
    their ``columns`` (per-output-channel scales go with their columns: exact)."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    widths = {"wqkv": (q, kv, kv), "bqkv": (q, kv, kv),
              "w_gate_up": (cfg.intermediate_size, cfg.intermediate_size)}

    def cut(w: Any, lo: int, hi: int) -> Any:
        return w.columns(lo, hi) if hasattr(w, "columns") else w[..., lo:hi]

    def unfuse(lp: dict) -> dict:
        out = dict(lp)
        for fused, parts in FUSED.items():
            if fused in out:
                w, lo = out.pop(fused), 0
                for part, n in zip(parts, widths[fused]):
                    out[part], lo = cut(w, lo, lo + n), lo + n
        return out

    layers = params["layers"]
    out = [unfuse(lp) for lp in layers] if isinstance(layers, (list, tuple)) else unfuse(layers)
    return {**params, "layers": out}


def _host_concat(arrays: list[np.ndarray]) -> np.ndarray:
    """``np.concatenate(arrays, axis=-1)`` into a 64-byte aligned buffer, which
    ``jax.device_put(..., may_alias=True)`` can use on CPU without another copy."""
    shape = (*arrays[0].shape[:-1], sum(a.shape[-1] for a in arrays))
    dtype = np.result_type(*arrays)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64
    out = raw[start:start + nbytes].view(dtype).reshape(shape)
    return np.concatenate(arrays, axis=-1, out=out)


# --------------------------------------------------------------------------- building blocks

def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm with float32 statistics (HF LlamaRMSNorm semantics)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * y.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """Static inverse frequencies and cos/sin scale for ``cfg``'s RoPE variant.

    Covers HF's ``default``, ``linear``, ``llama3`` and ``yarn``; ``dynamic``
    depends on the sequence length and is finished in :func:`rope_cos_sin`.
    """
    dim, base = cfg.head_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    sc = cfg.rope_scaling_dict
    kind = sc["rope_type"] if sc else "default"
    if kind in ("default", "dynamic"):
        return inv_freq, 1.0
    factor = float(sc.get("factor") or 1.0)
    orig = sc.get("original_max_position_embeddings") or cfg.max_position_embeddings
    if kind == "linear":
        return inv_freq / factor, 1.0
    if kind == "llama3":
        low, high = float(sc.get("low_freq_factor", 1.0)), float(sc.get("high_freq_factor", 4.0))
        low_wavelen, high_wavelen = orig / low, orig / high
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (orig / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        if sc.get("factor") is None:
            factor = cfg.max_position_embeddings / orig

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        attn_factor = sc.get("attention_factor")
        if attn_factor is None:
            m, m_all = sc.get("mscale"), sc.get("mscale_all_dim")
            attn_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
        beta_fast, beta_slow = sc.get("beta_fast") or 32, sc.get("beta_slow") or 1

        def corr_dim(rot: float) -> float:
            return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

        lo, hi = corr_dim(beta_fast), corr_dim(beta_slow)
        if sc.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - lo) / (hi - lo), 0, 1)
        extrap = 1 - ramp
        inv = (inv_freq / factor) * (1 - extrap) + inv_freq * extrap
        return inv, float(attn_factor)
    raise ValueError(f"rope_scaling type {kind!r} is not supported "
                     "(supported: linear, dynamic, llama3, yarn)")


def rope_cos_sin(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables ``[B, T, head_dim/2]`` (float32) for integer ``positions [B, T]``."""
    inv_freq, scale = rope_inv_freq(cfg)
    inv = jnp.asarray(inv_freq, jnp.float32)
    sc = cfg.rope_scaling_dict
    if sc and sc["rope_type"] == "dynamic":
        # HF dynamic NTK: the base grows once the sequence outgrows the trained length.
        dim, factor = cfg.head_dim, float(sc["factor"])
        max_pos = cfg.max_position_embeddings
        seq_len = jnp.maximum(jnp.max(positions) + 1, max_pos).astype(jnp.float32)
        base = cfg.rope_theta * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        inv = 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    angles = positions.astype(jnp.float32)[..., None] * inv
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [B, T, H, D]`` (HF ``rotate_half`` convention)."""
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


LORA_TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


# GPU decode over quantized weights: the Pallas kernel that dequantizes tiles in registers
# (pallas_kernels/quant_matmul.py) is opt-in until a GPU session has timed it against XLA's
# fused dequantize-then-dot (docs/kernels.md, "Pallas quantized matmul (GPU)").
_PALLAS_QUANT = os.environ.get("JAXLLM_PALLAS_QUANT_MATMUL") == "1"


def _pallas_quantized(x: Any, w: Any) -> jax.Array | None:
    """``x @ w`` through the Pallas kernel when it reads the operands (decode rows, a 2-D
    weight, one device), the vocab-major LM head ``W^T @ h^T`` as ``(h @ W)^T``; else None."""
    from pallas_kernels import quant_matmul as pallas_qmm

    if pallas_qmm.applies(math.prod(x.shape[:-1]), w):
        return pallas_qmm.quantized_matmul(x, w)
    if (isinstance(x, QuantizedArray) and x.ndim == 2 and w.ndim == 2
            and pallas_qmm.applies(w.shape[-1], x.T)):
        return pallas_qmm.quantized_matmul(w.T, x.T).T
    return None


def matmul(x: jax.Array, w: jax.Array, out_dtype: Any = None) -> jax.Array:
    """``x @ w`` in ``out_dtype`` (default ``x``'s dtype); ``w`` (or, for the vocab-major
    LM head, ``x``) may be a ``jaxllm.quant.QuantizedArray``.

    The one matmul entry point: small-M (decode) products go to the C++ CPU kernel where
    it measured faster (``cpu_kernels.matmul_applies``).  Low-precision (bf16) operands
    multiply with a float32 product: more exact, and XLA:CPU's fast bf16 dot -- but only
    with >= 2 rows, so on CPU a single row is padded to two (timings: docs/kernels.md).
    """
    if quant_ops.applies(x, w):  # W8A8 int8 x int8 dots, calibration probes
        return quant_ops.matmul(x, w, out_dtype)
    if cpu_kernels.matmul_applies(math.prod(x.shape[:-1]), w):
        quantized = isinstance(w, QuantizedArray)
        kernel = cpu_kernels.quantized_matmul if quantized else cpu_kernels.matmul
        return kernel(x, w).astype(out_dtype or x.dtype)
    if (isinstance(x, QuantizedArray) and x.ndim == 2 and w.ndim == 2
            and cpu_kernels.matmul_applies(w.shape[-1], x.T)):
        # the vocab-major LM head W^T @ h^T: the kernel's small-M product (h @ W)^T
        return cpu_kernels.quantized_matmul(w.T, x.T).T.astype(out_dtype or x.dtype)
    if _PALLAS_QUANT and jax.default_backend() == "gpu":
        y = _pallas_quantized(x, w)
        if y is not None:
            return y.astype(out_dtype or x.dtype)
    if isinstance(w, QuantizedArray):  # XLA path: dequantize, then the float dot (fused on GPU)
        w = w.dequantize()
    if isinstance(x, QuantizedArray):  # the vocab-major LM head passes the weight first
        x = x.dequantize()
    if x.dtype == jnp.float32 and w.dtype == jnp.float32:
        return (x @ w).astype(out_dtype or x.dtype)
    lead, k = x.shape[:-1], x.shape[-1]
    rows = math.prod(lead)
    x2 = x.reshape(rows, k)
    if rows == 1 and jax.default_backend() == "cpu":
        x2 = jnp.concatenate([x2, jnp.zeros_like(x2)])
    y = jnp.dot(x2, w, preferred_element_type=jnp.float32)[:rows]
    return y.reshape(*lead, w.shape[-1]).astype(out_dtype or x.dtype)


def linear(x: jax.Array, lp: Params, name: str) -> jax.Array:
    """``x @ lp[name]``: every projection of a layer goes through here (the hook for
    adapters and quantized weights).

    LoRA (``jaxllm.train.lora``): when ``lp`` holds ``f"{name}_lora_a" [in, r]`` and
    ``f"{name}_lora_b" [r, out]`` the result is ``x @ W + scale * (drop(x) @ A) @ B``
    with ``scale = lp["lora_scale"]`` (1 when absent; inference adapters have it
    folded into B) and dropout only when ``lp`` carries ``lora_dropout_rng`` and
    ``lora_dropout_rate`` (training).
    """
    y = matmul(x, lp[name])
    if f"{name}_lora_a" in lp:
        y = y + _lora_delta(x, lp, name).astype(y.dtype)
    return y


def _lora_delta(x: jax.Array, lp: Params, name: str) -> jax.Array:
    h = x
    if "lora_dropout_rng" in lp:
        rate = lp["lora_dropout_rate"]
        key = jax.random.fold_in(lp["lora_dropout_rng"], LORA_TARGETS.index(name))
        keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
        h = jnp.where(keep, x / (1.0 - rate).astype(x.dtype), 0).astype(x.dtype)
    a, b = lp[f"{name}_lora_a"], lp[f"{name}_lora_b"]
    d = (h @ a.astype(h.dtype)) @ b.astype(h.dtype)
    if "lora_scale" in lp:
        d = d * lp["lora_scale"].astype(d.dtype)
    return d


def decoder_layer(cfg: ModelConfig, lp: Params, x: jax.Array, cos: jax.Array,
                  sin: jax.Array, layer_cache: Any, attend: AttendFn,
                  index: Any = 0) -> tuple[jax.Array, Any]:
    """One pre-norm decoder layer on ``x [B, T, D]``: attention through ``attend(q, k, v,
    layer_cache, index) -> (out, layer_cache)``, then the SwiGLU MLP, each with its
    residual.  :func:`forward` runs it per layer; EAGLE draft heads run it on their own."""
    b, t, _ = x.shape
    hd = cfg.head_dim
    with jax.named_scope("attention"):
        with jax.named_scope("norm"):
            h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
        with jax.named_scope("qkv_proj"):
            if "wqkv" in lp:  # fuse_projections layout
                qkv = linear(h, lp, "wqkv")
                if cfg.attention_bias:
                    qkv = qkv + lp["bqkv"]
                nq, nkv = cfg.num_heads * hd, cfg.num_kv_heads * hd
                q, k, v = qkv[..., :nq], qkv[..., nq:nq + nkv], qkv[..., nq + nkv:]
            else:
                q, k, v = linear(h, lp, "wq"), linear(h, lp, "wk"), linear(h, lp, "wv")
                if cfg.attention_bias:
                    q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
        with jax.named_scope("rope"):
            q = apply_rope(q.reshape(b, t, cfg.num_heads, hd), cos, sin)
            k = apply_rope(k.reshape(b, t, cfg.num_kv_heads, hd), cos, sin)
        v = v.reshape(b, t, cfg.num_kv_heads, hd)
        with jax.named_scope("attend"):
            out, layer_cache = attend(q, k, v, layer_cache, index)
        with jax.named_scope("o_proj"):
            x = x + linear(out.reshape(b, t, cfg.num_heads * hd).astype(x.dtype), lp, "wo")
    with jax.named_scope("mlp"):
        with jax.named_scope("norm"):
            h = rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
        if "w_gate_up" in lp:
            gate, up = jnp.split(linear(h, lp, "w_gate_up"), 2, axis=-1)
        else:
            gate, up = linear(h, lp, "w_gate"), linear(h, lp, "w_up")
        x = x + linear(jax.nn.silu(gate) * up, lp, "w_down")
    return x, layer_cache


# --------------------------------------------------------------------------- forward

def embed_rows(table, tokens: jax.Array):
    """``table[tokens]``.  XLA:CPU gathers bfloat16 rows from a float32 convert of the
    table; inside a decode loop that whole-table convert is loop-invariant, so XLA hoists
    it and materializes a float32 copy of the table per dispatch.  Tying the table to
    the tokens through a barrier keeps the convert fused into the gather (rows only)."""
    if isinstance(table, jax.Array) and table.dtype == jnp.bfloat16:
        table, tokens = jax.lax.optimization_barrier((table, tokens))
    return table[tokens]


def forward(params: Params, cfg: ModelConfig, tokens: jax.Array, positions: jax.Array,
            attend: AttendFn, layer_caches: Any = None,
            remat_policy: Callable | None = None, *,
            shared_cache: bool = False) -> tuple[jax.Array, Any]:
    """Run the decoder: ``tokens, positions [B, T]`` -> (final-normed hidden ``[B,T,D]``, caches).

    ``layer_caches`` matches ``params["layers"]``: a pytree stacked on a leading layer
    axis when scanning, a list when unrolled, or None.  With ``shared_cache`` it is ONE
    cache that every layer's ``attend`` receives and returns whole (the paged engine's
    page pool; ``attend`` finds the layer's pages from its index): under ``scan`` it
    rides in the carry, so XLA updates it in place instead of slicing it per layer.
    ``remat_policy`` (training) wraps each layer in ``jax.checkpoint`` with that policy.
    """
    with jax.named_scope("embed"):
        x = embed_rows(params["embed"], tokens)
    cos, sin = rope_cos_sin(cfg, positions)

    def layer(x, lp, cache, i):
        return decoder_layer(cfg, lp, x, cos, sin, cache, attend, i)

    if remat_policy is not None:
        layer = jax.checkpoint(layer, policy=remat_policy)
    run = _unrolled if isinstance(params["layers"], (list, tuple)) else _scanned
    if run is _unrolled and remat_policy is None:
        # one jitted layer called L times: traced and lowered once instead of L times (a
        # 30-layer step: 3x faster to trace, a 4x smaller module); XLA inlines the calls
        layer_jit = jax.jit(layer)
        layer = lambda x, lp, cache, i: layer_jit(x, lp, cache, jnp.int32(i))  # noqa: E731
    x, new_caches = run(layer, x, params["layers"], layer_caches, shared_cache)
    with jax.named_scope("final_norm"):
        x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    return x, new_caches


def _unrolled(layer: Callable, x: jax.Array, layers: list, caches: Any, shared: bool):
    """Layers as a Python loop over per-layer weights (``layer_i`` scopes)."""
    if not shared:
        caches = caches if caches is not None else [None] * len(layers)
        new = []
    for i, lp in enumerate(layers):
        with jax.named_scope(f"layer_{i}"):
            if shared:
                x, caches = layer(x, lp, caches, i)
            else:
                x, c = layer(x, lp, caches[i], i)
                new.append(c)
    return x, caches if shared else new


def _scanned(layer: Callable, x: jax.Array, layers: Params, caches: Any, shared: bool):
    """Layers under ``lax.scan`` over stacked weights; a shared cache rides in the carry,
    per-layer caches are scanned over with the weights."""
    index = jnp.arange(jax.tree.leaves(layers)[0].shape[0], dtype=jnp.int32)
    if shared:
        def shared_body(carry, xs):
            (x, cache), (lp, i) = carry, xs
            with jax.named_scope("layer"):
                return layer(x, lp, cache, i), None

        (x, caches), _ = jax.lax.scan(shared_body, (x, caches), (layers, index))
        return x, caches

    def body(x, xs):
        lp, cache, i = xs
        with jax.named_scope("layer"):
            return layer(x, lp, cache, i)

    return jax.lax.scan(body, x, (layers, caches, index))


def lm_head(params: Params, cfg: ModelConfig, hidden: jax.Array,
            vocab_major: bool = False) -> jax.Array:
    """Project hidden states to float32 logits (tied embeddings when there is no ``lm_head``).

    ``vocab_major``: for ``hidden [N, D]`` return ``[V, N]`` (``W^T @ hidden^T``): the
    product XLA:CPU computes without transposing a ``[N, V]`` result (used by the greedy
    decode step; measured in docs/benchmarks.md)."""
    with jax.named_scope("lm_head"):
        tied = "lm_head" not in params
        rows = math.prod(hidden.shape[:-1])
        embed = params["embed"]
        if (tied and cpu_kernels.matmul_applies(rows, embed, transposed=True)
                and not (vocab_major and embed.dtype == jnp.float32)):  # XLA's equals it there
            # the [V, D] embedding read row by row, in place (XLA:CPU transposes it per step)
            y = cpu_kernels.matmul(hidden, embed, transposed=True)
            return y.T if vocab_major else y
        w = params["lm_head"] if not tied else embed.T
        if vocab_major:
            return matmul(w.T.astype(hidden.dtype), hidden.T, jnp.float32)
        return matmul(hidden, w.astype(hidden.dtype), jnp.float32)


def full_attention_fn(cfg: ModelConfig, segment_ids: jax.Array | None = None,
                      impl: str = "auto") -> AttendFn:
    """``attend`` for a whole sequence with no cache (training, scoring, no-cache baseline)."""
    from jaxllm.attention import attention

    def attend(q, k, v, cache, layer):
        out = attention(q, k, v, causal=True, segment_ids=segment_ids,
                        sliding_window=cfg.sliding_window, impl=impl)
        return out, cache

    return attend


def logits(params: Params, cfg: ModelConfig, tokens: jax.Array,
           positions: jax.Array | None = None, segment_ids: jax.Array | None = None,
           attn_impl: str = "auto") -> jax.Array:
    """Full-sequence float32 logits ``[B, T, V]`` with no KV cache."""
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    hidden, _ = forward(params, cfg, tokens, positions,
                        full_attention_fn(cfg, segment_ids, attn_impl))
    return lm_head(params, cfg, hidden)
