"""LoRA adapters: init, merge, and the PEFT on-disk format.

An adapter is a pytree ``{"layers": {f"{t}_lora_a": [L, in, r], f"{t}_lora_b": [L, r, out]}}``
for each target projection ``t`` (``wq wk wv wo w_gate w_up w_down``).  During
training these keys are put next to the frozen weights in ``params["layers"]``
together with ``lora_scale`` (``alpha / r`` per layer) and, with dropout, a
per-layer ``lora_dropout_rng`` and ``lora_dropout_rate``; ``llama.linear`` then
computes ``x @ W + scale * (dropout(x) @ A) @ B``.  ``B`` starts at zero, so a
fresh adapter leaves the model unchanged.

On disk an adapter is a PEFT directory (``adapter_config.json`` +
``adapter_model.safetensors`` with ``base_model.model.model.layers.{i}.self_attn.q_proj.
lora_A.weight [r, in]`` / ``lora_B.weight [out, r]``), the layout HF PEFT writes
and reads.  :func:`load_lora` attaches one to a params pytree for inference
(scale folded into ``B``) or merges it (``merge=True``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.models.llama import LORA_TARGETS, param_shapes

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

HF_MODULES = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
              "wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj",
              "w_down": "mlp.down_proj"}
_ALIASES = {**{k: k for k in LORA_TARGETS},
            **{v.split(".")[1]: k for k, v in HF_MODULES.items()},
            "q": "wq", "k": "wk", "v": "wv", "o": "wo", "gate": "w_gate", "up": "w_up",
            "down": "w_down"}
_GROUPS = {"all": LORA_TARGETS, "attn": ("wq", "wk", "wv", "wo"),
           "mlp": ("w_gate", "w_up", "w_down"), "all-linear": LORA_TARGETS}


def parse_targets(spec: str | Iterable[str]) -> tuple[str, ...]:
    """``"q,k,v,o"`` / ``"q_proj,v_proj"`` / ``"all"`` / ``"attn"`` / ``"mlp"`` -> param keys."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for raw in items:
        name = raw.strip().lower()
        if not name:
            continue
        keys = _GROUPS.get(name) or ((_ALIASES[name],) if name in _ALIASES else None)
        if keys is None:
            raise ValueError(f"unknown LoRA target module {raw!r}; use q,k,v,o,gate,up,down "
                             f"(or q_proj..., wq..., or one of {sorted(_GROUPS)})")
        out += [k for k in keys if k not in out]
    if not out:
        raise ValueError("no LoRA target modules given")
    return tuple(k for k in LORA_TARGETS if k in out)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS
    use_rslora: bool = False

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        object.__setattr__(self, "targets", parse_targets(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def to_peft(self, base_model: str | None = None) -> dict[str, Any]:
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.rank,
                "lora_alpha": self.alpha, "lora_dropout": self.dropout,
                "target_modules": [HF_MODULES[t].split(".")[1] for t in self.targets],
                "use_rslora": self.use_rslora, "bias": "none", "fan_in_fan_out": False,
                "modules_to_save": None, "layers_to_transform": None,
                "init_lora_weights": True, "inference_mode": True,
                "base_model_name_or_path": base_model, "library": "jaxllm"}

    @classmethod
    def from_peft(cls, d: Mapping[str, Any], where: str = ADAPTER_CONFIG) -> "LoraConfig":
        if d.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"{where}: peft_type {d.get('peft_type')!r} is not LORA")
        for key in ("rank_pattern", "alpha_pattern"):
            if d.get(key):
                raise ValueError(f"{where}: per-module {key} is not supported")
        if d.get("use_dora"):
            raise ValueError(f"{where}: DoRA adapters are not supported")
        mods = d.get("target_modules") or []
        if isinstance(mods, str):
            raise ValueError(f"{where}: regex target_modules {mods!r} is not supported")
        return cls(rank=int(d["r"]), alpha=float(d.get("lora_alpha", d["r"])),
                   dropout=float(d.get("lora_dropout") or 0.0), targets=tuple(mods),
                   use_rslora=bool(d.get("use_rslora", False)))


def lora_shapes(cfg: ModelConfig, lcfg: LoraConfig) -> dict[str, tuple[int, ...]]:
    shapes = param_shapes(cfg)["layers"]
    out = {}
    for t in lcfg.targets:
        n, din, dout = shapes[t]
        out[f"{t}_lora_a"] = (n, din, lcfg.rank)
        out[f"{t}_lora_b"] = (n, lcfg.rank, dout)
    return out


def init_lora(cfg: ModelConfig, lcfg: LoraConfig, key: jax.Array, dtype=jnp.float32
              ) -> dict[str, Any]:
    """Fresh adapter: ``A ~ U(-1/sqrt(in), 1/sqrt(in))`` (PEFT's kaiming init), ``B = 0``."""
    layers = {}
    shapes = lora_shapes(cfg, lcfg)
    keys = jax.random.split(key, len(lcfg.targets))
    for t, k in zip(lcfg.targets, keys):
        a_shape = shapes[f"{t}_lora_a"]
        bound = 1.0 / math.sqrt(a_shape[1])
        layers[f"{t}_lora_a"] = jax.random.uniform(k, a_shape, dtype, -bound, bound)
        layers[f"{t}_lora_b"] = jnp.zeros(shapes[f"{t}_lora_b"], dtype)
    return {"layers": layers}


def num_lora_params(cfg: ModelConfig, lcfg: LoraConfig) -> int:
    return sum(int(np.prod(s)) for s in lora_shapes(cfg, lcfg).values())


def attach(params: dict, lora: dict, lcfg: LoraConfig, dropout_rngs: jax.Array | None = None
           ) -> dict:
    """Frozen ``params`` + adapter -> params whose ``layers`` carry the LoRA keys.

    Stacked layers get stacked adapter leaves; per-layer (list) layers get the
    slices.  ``dropout_rngs [L, 2]`` (uint32 keys) enables LoRA dropout (training).
    """
    layers = params["layers"]
    ll = lora["layers"]
    drop = dropout_rngs is not None and lcfg.dropout > 0
    if isinstance(layers, dict):
        n = next(iter(layers.values())).shape[0]
        extra = dict(ll)
        extra["lora_scale"] = jnp.full((n,), lcfg.scale, jnp.float32)
        if drop:
            extra["lora_dropout_rng"] = dropout_rngs
            extra["lora_dropout_rate"] = jnp.full((n,), lcfg.dropout, jnp.float32)
        return {**params, "layers": {**layers, **extra}}
    out = []
    for i, lp in enumerate(layers):
        extra = {k: v[i] for k, v in ll.items()}
        extra["lora_scale"] = jnp.asarray(lcfg.scale, jnp.float32)
        if drop:
            extra["lora_dropout_rng"] = dropout_rngs[i]
            extra["lora_dropout_rate"] = jnp.asarray(lcfg.dropout, jnp.float32)
        out.append({**lp, **extra})
    return {**params, "layers": out}


def merge(params: dict, lora: dict, lcfg: LoraConfig) -> dict:
    """``W + scale * A @ B`` for every target (computed in float32, cast to W's dtype).

    Works on stacked or per-layer (list) params, numpy or jax arrays; returns the same kind.
    """
    def merged(w, a, b):
        xp = np if isinstance(w, np.ndarray) else jnp
        delta = xp.matmul(xp.asarray(a, np.float32), xp.asarray(b, np.float32)) * lcfg.scale
        return (xp.asarray(w, np.float32) + delta).astype(w.dtype)

    return _map_targets(params, lora, lcfg, lambda lp, t, a, b: {t: merged(lp[t], a, b)})


def _map_targets(params, lora, lcfg, fn):
    layers = params["layers"]
    ll = lora["layers"]
    if isinstance(layers, dict):
        new = dict(layers)
        for t in lcfg.targets:
            new.update(fn(layers, t, ll[f"{t}_lora_a"], ll[f"{t}_lora_b"]))
        return {**params, "layers": new}
    out = []
    for i, lp in enumerate(layers):
        new = dict(lp)
        for t in lcfg.targets:
            new.update(fn(lp, t, ll[f"{t}_lora_a"][i], ll[f"{t}_lora_b"][i]))
        out.append(new)
    return {**params, "layers": out}


def strip(params: dict) -> dict:
    """Remove any LoRA keys from ``params["layers"]``."""
    def clean(lp):
        return {k: v for k, v in lp.items() if "lora" not in k}
    layers = params["layers"]
    return {**params, "layers": clean(layers) if isinstance(layers, dict)
            else [clean(lp) for lp in layers]}


# --------------------------------------------------------------------------- PEFT format


def save_adapter(path: str | os.PathLike, cfg: ModelConfig, lora: dict, lcfg: LoraConfig,
                 base_model: str | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT layout, float32)."""
    from safetensors.numpy import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    ll = jax.tree.map(lambda x: np.asarray(x, np.float32), lora["layers"])
    for t in lcfg.targets:
        a, b = ll[f"{t}_lora_a"], ll[f"{t}_lora_b"]
        for i in range(cfg.num_layers):
            prefix = f"base_model.model.model.layers.{i}.{HF_MODULES[t]}"
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(lcfg.to_peft(base_model), indent=2) + "\n")
    return out


def load_adapter(path: str | os.PathLike, cfg: ModelConfig) -> tuple[dict, LoraConfig]:
    """Read a PEFT LoRA directory -> ``(adapter pytree (numpy float32), LoraConfig)``."""
    from safetensors.numpy import load_file

    d = Path(path)
    cf = d / ADAPTER_CONFIG
    if not cf.is_file():
        raise FileNotFoundError(f"{d}: no {ADAPTER_CONFIG} (expected a LoRA adapter directory)")
    try:
        lcfg = LoraConfig.from_peft(json.loads(cf.read_text()), str(cf))
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{cf}: not a valid LoRA adapter config ({e})") from None
    wf = d / ADAPTER_WEIGHTS
    if not wf.is_file():
        raise FileNotFoundError(f"{d}: no {ADAPTER_WEIGHTS}")
    raw = load_file(str(wf))
    # PEFT may save keys with or without the adapter name (".default").
    raw = {k.replace(".default.weight", ".weight"): v for k, v in raw.items()}
    shapes = lora_shapes(cfg, lcfg)
    layers = {}
    for t in lcfg.targets:
        a = np.zeros(shapes[f"{t}_lora_a"], np.float32)
        b = np.zeros(shapes[f"{t}_lora_b"], np.float32)
        for i in range(cfg.num_layers):
            prefix = f"base_model.model.model.layers.{i}.{HF_MODULES[t]}"
            try:
                ta, tb = raw[f"{prefix}.lora_A.weight"], raw[f"{prefix}.lora_B.weight"]
            except KeyError as e:
                raise ValueError(f"{wf}: missing tensor {e.args[0]}") from None
            if ta.T.shape != a.shape[1:] or tb.T.shape != b.shape[1:]:
                raise ValueError(f"{wf}: {prefix} has shapes A{ta.shape} B{tb.shape}; the model "
                                 f"needs A{a.shape[1:][::-1]} B{b.shape[1:][::-1]} "
                                 "(adapter trained for another model?)")
            a[i], b[i] = ta.T, tb.T
        layers[f"{t}_lora_a"], layers[f"{t}_lora_b"] = a, b
    return {"layers": layers}, lcfg


def load_lora(params: dict, cfg: ModelConfig, path: str | os.PathLike, merge_weights: bool = False
              ) -> dict:
    """Attach the LoRA adapter at ``path`` (a PEFT directory) to ``params`` for inference.

    Unmerged (default): ``params["layers"]`` gains ``{t}_lora_a`` / ``{t}_lora_b`` (scale
    folded into B, in the params' dtype) and ``llama.linear`` adds the low-rank term.
    ``merge_weights=True`` returns ``W + scale * A @ B`` instead (no inference overhead).
    Accepts stacked or per-layer (list) params, numpy or jax arrays.
    """
    lora, lcfg = load_adapter(path, cfg)
    if merge_weights:
        return merge(params, lora, lcfg)

    def add(lp, t, a, b):
        w = lp[t]
        xp = np if isinstance(w, np.ndarray) else jnp
        return {f"{t}_lora_a": xp.asarray(a).astype(w.dtype),
                f"{t}_lora_b": xp.asarray(b * lcfg.scale).astype(w.dtype)}

    return _map_targets(params, lora, lcfg, add)
