"""Model configuration.

`ModelConfig` is frozen and hashable so it can be a static argument of jitted
functions: one compiled program per (config, shapes).  It is built from an HF
``config.json`` dict (:meth:`ModelConfig.from_hf`) or from GGUF metadata
(:func:`jaxllm.weights.gguf.config_from_gguf`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder.

    Covers Llama 1-3, Mistral (sliding window), Qwen2 (q/k/v bias) and SmolLM.
    ``rope_scaling`` is stored as a sorted tuple of ``(key, value)`` pairs so the
    config stays hashable; use :attr:`rope_scaling_dict` to read it.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    architecture: str = "llama"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})")

    @property
    def q_per_kv(self) -> int:
        """Query heads per KV head (the GQA group size)."""
        return self.num_heads // self.num_kv_heads

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    def num_params(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * hd * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.attention_bias:
            attn += hd * (self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * per_layer + d + head

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> "ModelConfig":
        """Build from an HF ``config.json`` dict (Llama, Mistral, Qwen2)."""
        archs = cfg.get("architectures")
        if archs:
            arch = SUPPORTED_ARCHITECTURES.get(archs[0])
        else:  # a bare config saved without `architectures`: fall back on model_type
            arch = cfg.get("model_type", "llama")
            arch = arch if arch in SUPPORTED_ARCHITECTURES.values() else None
            archs = [cfg.get("model_type")]
        if arch is None:
            raise ValueError(
                f"config.json: architecture {archs[0]!r} is not supported; "
                f"supported: {sorted(SUPPORTED_ARCHITECTURES)}")
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
            # transformers >= 5 writes `rope_parameters` (theta inside); older files
            # have top-level `rope_theta` and `rope_scaling`.
            rope_params = dict(cfg.get("rope_parameters") or {})
            theta = rope_params.pop("rope_theta", cfg.get("rope_theta", 10000.0))
            scaling = cfg.get("rope_scaling") or rope_params
            # Qwen2 configs carry a sliding_window value but only use it when asked to.
            window = cfg.get("sliding_window")
            if arch == "qwen2" and not cfg.get("use_sliding_window", False):
                window = None
            return cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                rope_theta=float(theta),
                rope_scaling=freeze_rope_scaling(scaling),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", arch == "qwen2")),
                sliding_window=int(window) if window else None,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=tuple(int(e) for e in eos_ids),
                architecture=arch,
            )
        except KeyError as e:
            raise ValueError(f"config.json is missing the required field {e.args[0]!r}") from None

    def to_hf(self) -> dict[str, Any]:
        """The HF ``config.json`` dict for this config (used when exporting)."""
        arch = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}[self.architecture]
        out: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.architecture,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling_dict,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default",
                                **(self.rope_scaling_dict or {})},
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1
            else self.eos_token_ids[0],
        }
        if self.architecture == "llama":
            out["attention_bias"] = self.attention_bias
        if self.architecture == "mistral":
            out["sliding_window"] = self.sliding_window
        if self.architecture == "qwen2":
            out["use_sliding_window"] = self.sliding_window is not None
            out["sliding_window"] = self.sliding_window
        return out


def freeze_rope_scaling(scaling: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...] | None:
    """HF ``rope_scaling`` dict -> hashable tuple (None for the default RoPE)."""
    if not scaling:
        return None
    items = dict(scaling)
    kind = items.get("rope_type", items.get("type"))
    if kind in (None, "default"):
        return None
    items["rope_type"] = kind
    items.pop("type", None)
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in items.items()))
