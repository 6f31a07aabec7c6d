"""Draft heads for speculative decoding: Medusa and EAGLE, as pure functions over pytrees.

Both read the target's **final hidden state**: the output of ``llama.forward`` (after
the final RMSNorm), the very array the target's LM head multiplies.  The engine has it
for every position it verifies, so a head proposer needs nothing but that array, the
token the target picked from it, and the target's embedding / LM head.

Indexing.  ``f_t`` is the target's hidden state after reading token ``x_t``;
``lm_head(f_t)`` predicts ``x_{t+1}``.  A proposal starts from ``f_t`` and
``x_{t+1}`` (the token the target just emitted from ``f_t``, not yet run through the
target) and drafts ``x_{t+2} .. x_{t+k+1}``.

* **Medusa** (Cai et al. 2024): ``K`` heads; head ``j`` (``j = 1..K``) maps ``f_t`` through
  one residual SiLU block, ``h_j = f_t + silu(f_t W_j + b_j)``, then the **target's own
  LM head**, and predicts ``x_{t+1+j}`` (the target's LM head is "head 0", ``x_{t+1}``).
  The LM head is shared and frozen rather than copied per head: a copy is
  ``V x D`` parameters per head (28M for SmolLM2-135M, more than a fifth of the model),
  its gradient dominates a training step on CPU, and with ``W_j = 0`` at
  initialisation every head starts as exactly the target's next-token predictor, so
  the residual block only learns the shift to a later token.  ``x_{t+1}`` is not used.
* **EAGLE** (Li et al. 2024, EAGLE-1 feature-level drafting): one decoder layer (the
  model's own ``llama`` layer code and parameter layout) over the pairs
  ``(feature, next token)``: step ``i`` fuses ``[embed(x_{t+1+i}); g_{i-1}]``
  (``g_{-1} = f_t``) with a ``[2D, D]`` projection, runs the layer with attention over
  the chain's earlier steps, and its output ``g_i`` stands for the target's feature
  ``f_{t+1+i}``; the target's LM head on ``g_i`` drafts ``x_{t+2+i}``, which is fed
  back as the next step's token.  The embedding and LM head are the target's.
  The layer attends over the current chain only (no draft KV cache over the whole
  context), so the engine keeps no draft state between steps: ``f_t`` carries the
  context, as it does for Medusa.

``propose(head_params, target_params, cfg, hidden, last_token, k, *, rng, temperature)``
(jittable; ``cfg`` and ``k`` static):

* ``hidden [N, D]`` (any float dtype): ``f_t`` per sequence, the final-normed hidden
  state at the position whose LM-head output was ``last_token``;
* ``last_token [N]`` int32: ``x_{t+1}``;
* ``target_params``: the target's params pytree in any layout the model runs
  (stacked or per-layer, fused or not, float or quantized): only ``embed`` and
  ``lm_head`` (or the tied embedding) are read;
* ``temperature`` ``None`` or a scalar / ``[N]`` float: rows with ``temperature <= 0``
  (and every row when ``rng`` or ``temperature`` is None) draft greedily; others sample from
  ``softmax(logits / temperature)`` with ``rng``;
* returns ``(tokens [N, k] int32, q [N, k, V] float32)``: ``q[n, i]`` is the
  distribution draft ``i`` was drawn from (one-hot on greedy rows), which is what
  rejection sampling needs to stay exact.  ``k <= num_heads`` for Medusa; EAGLE drafts
  any ``k >= 1`` (it was trained on chains of ``num_heads`` steps).

On disk (``save_heads`` / ``load_heads``) a heads directory holds ``draft_heads.json``
(method, number of heads, hidden and vocabulary size, the target's name and
``config.json`` fields) and ``draft_heads.safetensors`` (float32 arrays named by their
pytree path, e.g. ``medusa.w`` or ``eagle.layer.wq``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.attention import attention
from jaxllm.config import ModelConfig
from jaxllm.models import llama
from jaxllm.sampling import argmax

METHODS = ("medusa", "eagle")
CONFIG_FILE = "draft_heads.json"
PARAMS_FILE = "draft_heads.safetensors"
FORMAT_VERSION = 1

HeadParams = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class HeadsConfig:
    """What a set of draft heads is (hashable: a static argument under jit).

    ``model`` is the target's config: it fixes the hidden and vocabulary sizes and, for
    EAGLE, the draft layer's attention shape, RoPE and norm epsilon.
    """
    method: str
    num_heads: int
    model: ModelConfig
    target_model: str = ""  # name or path of the target the heads were trained for

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"draft heads method must be one of {METHODS}, got {self.method!r}")
        if self.num_heads < 1:
            raise ValueError(f"draft heads need num_heads >= 1, got {self.num_heads}")

    @property
    def hidden_size(self) -> int:
        return self.model.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    @property
    def layer_config(self) -> ModelConfig:
        """The EAGLE draft layer's config: the target's, with one layer."""
        return dataclasses.replace(self.model, num_layers=1)

    def to_json(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "method": self.method,
                "num_heads": self.num_heads, "hidden_size": self.hidden_size,
                "vocab_size": self.vocab_size, "target_model": self.target_model,
                "target_config": self.model.to_hf()}

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str = CONFIG_FILE) -> "HeadsConfig":
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"{where}: format_version {version!r} is not supported "
                             f"(this jaxllm reads {FORMAT_VERSION})")
        for key in ("method", "num_heads", "hidden_size", "vocab_size", "target_config"):
            if key not in d:
                raise ValueError(f"{where}: missing field {key!r}")
        model = ModelConfig.from_hf(d["target_config"])
        cfg = cls(d["method"], int(d["num_heads"]), model, str(d.get("target_model", "")))
        if (cfg.hidden_size, cfg.vocab_size) != (d["hidden_size"], d["vocab_size"]):
            raise ValueError(f"{where}: hidden_size / vocab_size ({d['hidden_size']}, "
                             f"{d['vocab_size']}) disagree with target_config "
                             f"({cfg.hidden_size}, {cfg.vocab_size})")
        return cfg


# --------------------------------------------------------------------------- params


def head_shapes(hcfg: HeadsConfig) -> dict[str, Any]:
    """Shapes of the head parameter pytree for ``hcfg``."""
    d, k = hcfg.hidden_size, hcfg.num_heads
    if hcfg.method == "medusa":
        return {"medusa": {"w": (k, d, d), "b": (k, d)}}
    stacked = llama.param_shapes(hcfg.layer_config)["layers"]
    layer = {name: shape[1:] for name, shape in stacked.items()}  # drop the L = 1 axis
    return {"eagle": {"fc": (2 * d, d), "fc_bias": (d,), "layer": layer}}


def init_heads(hcfg: HeadsConfig, key: jax.Array) -> HeadParams:
    """Fresh float32 head parameters.

    Medusa: ``W_j = 0, b_j = 0``, so each head starts as the target's next-token
    predictor.  EAGLE: the fusion projection passes the feature through
    (``[small random; identity]``) and the layer is randomly initialised like the model
    (``llama.init_params``), so the chain starts near "the next feature is this one".
    """
    d = hcfg.hidden_size
    if hcfg.method == "medusa":
        return {"medusa": {"w": jnp.zeros((hcfg.num_heads, d, d), jnp.float32),
                           "b": jnp.zeros((hcfg.num_heads, d), jnp.float32)}}
    k_layer, k_fc = jax.random.split(key)
    stacked = llama.init_params(hcfg.layer_config, k_layer)["layers"]
    layer = {name: w[0] for name, w in stacked.items()}
    fc = jnp.concatenate([0.02 * jax.random.normal(k_fc, (d, d)), jnp.eye(d)])
    return {"eagle": {"fc": fc, "fc_bias": jnp.zeros((d,), jnp.float32), "layer": layer}}


def check_compatible(hcfg: HeadsConfig, target: ModelConfig, where: str = "draft heads") -> None:
    """ValueError unless heads trained for ``hcfg.model`` can run on ``target``: the hidden
    size (the heads' input) and the vocabulary (their LM head and token ids) must match."""
    problems = []
    if hcfg.hidden_size != target.hidden_size:
        problems.append(f"hidden size {hcfg.hidden_size} != the target's {target.hidden_size}")
    if hcfg.vocab_size != target.vocab_size:
        problems.append(f"vocabulary {hcfg.vocab_size} != the target's {target.vocab_size}")
    if problems:
        trained = f" (trained for {hcfg.target_model})" if hcfg.target_model else ""
        raise ValueError(f"{where}{trained} do not match the target model: "
                         + "; ".join(problems))


# --------------------------------------------------------------------------- medusa


def medusa_hidden(head_params: HeadParams, hidden: jax.Array, k: int | None = None) -> jax.Array:
    """``hidden [..., D]`` -> the first ``k`` heads' states ``[..., k, D]``:
    ``h + silu(h W_j + b_j)``, computed in ``hidden``'s dtype."""
    p = head_params["medusa"]
    w, b = p["w"], p["b"]
    if k is not None:
        w, b = w[:k], b[:k]
    w, b = w.astype(hidden.dtype), b.astype(hidden.dtype)
    z = jnp.einsum("...d,kde->...ke", hidden, w) + b
    return hidden[..., None, :] + jax.nn.silu(z)


# --------------------------------------------------------------------------- eagle


def _chain_attend(q, k, v, cache, layer):
    """``attend`` for one new chain step: append its K/V to the chain's and attend over
    all of them (the new query is the last position, so nothing is masked)."""
    if cache is not None:
        k = jnp.concatenate([cache[0], k], axis=1)
        v = jnp.concatenate([cache[1], v], axis=1)
    return attention(q, k, v, causal=True, impl="xla"), (k, v)


def eagle_step(head_params: HeadParams, target_params: Any, hcfg: HeadsConfig,
               feature: jax.Array, token: jax.Array, cache: Any, step: int
               ) -> tuple[jax.Array, Any]:
    """One EAGLE chain step: ``feature [N, D]`` (``f_t`` or the previous step's output) and
    ``token [N]`` -> (``g [N, D]``, the next feature; the chain's K/V with this step's).

    ``cache`` is None at step 0, then the returned value; ``step`` is the chain position
    (RoPE position; attention is relative, so the chain's absolute offset is irrelevant).
    """
    p = head_params["eagle"]
    dt = feature.dtype
    emb = llama.embed_rows(target_params["embed"], token).astype(dt)
    x = jnp.concatenate([emb, feature], axis=-1) @ p["fc"].astype(dt) + p["fc_bias"].astype(dt)
    lcfg = hcfg.layer_config
    positions = jnp.full((x.shape[0], 1), step, jnp.int32)
    cos, sin = llama.rope_cos_sin(lcfg, positions)
    layer = jax.tree.map(lambda a: a.astype(dt), p["layer"])
    # the model's own layer (norms, GQA attention, RoPE, SwiGLU) with a chain-local attend
    out, cache = llama.decoder_layer(lcfg, layer, x[:, None, :], cos, sin, cache, _chain_attend)
    return out[:, 0], cache


# --------------------------------------------------------------------------- proposals


def head_logits(target_params: Any, hcfg: HeadsConfig, states: jax.Array) -> jax.Array:
    """The target's LM head on draft states ``[..., D]`` -> float32 logits ``[..., V]``."""
    return llama.lm_head(target_params, hcfg.model, states)


def _draw(logits: jax.Array, temperature: jax.Array | None, key: jax.Array | None
          ) -> tuple[jax.Array, jax.Array]:
    """``logits [N, V]`` -> (token [N] int32, the distribution it was drawn from [N, V]).

    Greedy rows (no key or temperature, or ``temperature <= 0``) take the argmax with a
    one-hot ``q``."""
    vocab = logits.shape[-1]
    best = argmax(logits)
    onehot = jax.nn.one_hot(best, vocab, dtype=jnp.float32)
    if key is None or temperature is None:
        return best.astype(jnp.int32), onehot
    t = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), logits.shape[:1])
    greedy = t <= 0
    scaled = logits / jnp.where(greedy, 1.0, t)[:, None]
    sampled = jax.random.categorical(key, scaled, axis=-1)
    tok = jnp.where(greedy, best, sampled).astype(jnp.int32)
    q = jnp.where(greedy[:, None], onehot, jax.nn.softmax(scaled, axis=-1))
    return tok, q


def _check_inputs(hcfg: HeadsConfig, hidden: jax.Array, last_token: jax.Array, k: int) -> None:
    """Shape errors at trace time, naming what ``propose`` expects."""
    if hidden.ndim != 2 or hidden.shape[-1] != hcfg.hidden_size:
        raise ValueError(f"propose: hidden must be [N, {hcfg.hidden_size}] (the target's final "
                         f"hidden state), got shape {tuple(hidden.shape)}")
    if last_token.shape != hidden.shape[:1]:
        raise ValueError(f"propose: last_token must be [N] = {hidden.shape[:1]}, "
                         f"got shape {tuple(last_token.shape)}")
    if k < 1:
        raise ValueError(f"propose: k must be >= 1, got {k}")
    if hcfg.method == "medusa" and k > hcfg.num_heads:
        raise ValueError(f"propose: k={k} drafts need k Medusa heads; these heads have "
                         f"{hcfg.num_heads}")


def propose(head_params: HeadParams, target_params: Any, cfg: HeadsConfig,
            hidden: jax.Array, last_token: jax.Array, k: int, *,
            rng: jax.Array | None = None, temperature: Any = None
            ) -> tuple[jax.Array, jax.Array]:
    """Draft ``k`` tokens per sequence; the contract is in the module docstring.

    Returns ``(tokens [N, k] int32, q [N, k, V] float32)``.
    """
    _check_inputs(cfg, hidden, last_token, k)
    keys = [None] * k if rng is None else list(jax.random.split(rng, k))
    if cfg.method == "medusa":
        logits = head_logits(target_params, cfg, medusa_hidden(head_params, hidden, k))
        drawn = [_draw(logits[:, i], temperature, keys[i]) for i in range(k)]
    else:
        drawn, feature, token, cache = [], hidden, last_token.astype(jnp.int32), None
        for i in range(k):
            feature, cache = eagle_step(head_params, target_params, cfg, feature, token,
                                        cache, i)
            token, q = _draw(head_logits(target_params, cfg, feature), temperature, keys[i])
            drawn.append((token, q))
    tokens = jnp.stack([t for t, _ in drawn], axis=1)
    q = jnp.stack([p for _, p in drawn], axis=1)
    return tokens, q


# --------------------------------------------------------------------------- save / load


def _flatten(params: HeadParams) -> dict[str, np.ndarray]:
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = ".".join(str(getattr(p, "key", p)) for p in path)
        flat[name] = np.asarray(jax.device_get(leaf), np.float32)
    return flat


def _unflatten(flat: dict[str, np.ndarray]) -> HeadParams:
    out: dict[str, Any] = {}
    for name, arr in flat.items():
        node = out
        *parents, leaf = name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = arr
    return out


def save_heads(path: str | os.PathLike, hcfg: HeadsConfig, params: HeadParams,
               extra: dict[str, Any] | None = None) -> Path:
    """Write ``params`` (float32) and ``hcfg`` to directory ``path``; ``extra`` (JSON-able:
    training settings, metrics) is stored under ``"training"`` in the config file."""
    from safetensors.numpy import save_file

    _check_params(hcfg, params, "save_heads")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    save_file(_flatten(params), str(out / PARAMS_FILE))
    meta = hcfg.to_json()
    if extra:
        meta["training"] = extra
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_heads(path: str | os.PathLike, target: ModelConfig | None = None
               ) -> tuple[HeadsConfig, HeadParams]:
    """Read a heads directory -> ``(HeadsConfig, params)`` (numpy float32).

    With ``target`` (the serving model's config) the heads are checked against it
    (:func:`check_compatible`).  Missing files, unknown methods and arrays whose shapes
    do not match the config raise ValueError / FileNotFoundError naming the file.
    """
    from safetensors.numpy import load_file

    d = Path(path)
    cfg_file, params_file = d / CONFIG_FILE, d / PARAMS_FILE
    for f in (cfg_file, params_file):
        if not f.is_file():
            raise FileNotFoundError(f"draft heads: {f} not found (a heads directory holds "
                                    f"{CONFIG_FILE} and {PARAMS_FILE}; train one with "
                                    "`jaxllm finetune --draft-heads medusa|eagle`)")
    try:
        meta = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e.msg})") from None
    hcfg = HeadsConfig.from_json(meta, str(cfg_file))
    params = _unflatten(load_file(str(params_file)))
    _check_params(hcfg, params, str(params_file))
    if target is not None:
        check_compatible(hcfg, target, f"draft heads {d}")
    return hcfg, params


def _check_params(hcfg: HeadsConfig, params: HeadParams, where: str) -> None:
    """ValueError unless ``params`` has exactly the arrays and shapes ``hcfg`` implies."""
    want = {".".join(str(getattr(p, "key", p)) for p in path): tuple(shape)
            for path, shape in jax.tree_util.tree_flatten_with_path(
                head_shapes(hcfg), is_leaf=lambda x: isinstance(x, tuple))[0]}
    got = {".".join(str(getattr(p, "key", p)) for p in path): tuple(np.shape(leaf))
           for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    if want.keys() != got.keys():
        missing, extra = sorted(want.keys() - got.keys()), sorted(got.keys() - want.keys())
        raise ValueError(f"{where}: {hcfg.method} heads expect arrays {sorted(want)}; "
                         f"missing {missing}, unexpected {extra}")
    bad = [f"{n}: {got[n]} (expected {want[n]})" for n in want if want[n] != got[n]]
    if bad:
        raise ValueError(f"{where}: array shapes do not match the config ({hcfg.method}, "
                         f"{hcfg.num_heads} heads, hidden {hcfg.hidden_size}, vocab "
                         f"{hcfg.vocab_size}): " + "; ".join(bad))
