"""`EngineConfig`: the engine's arguments (vLLM's names), in one place.

``LLM(**engine_args)``, ``LLMEngine(**kwargs)`` and the CLI all pass these fields; this
module imports no jax so that ``LLM`` can check them before the weights load.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from jaxllm.config import ModelConfig
from jaxllm.spec.config import SpeculativeConfig

__all__ = ["EngineConfig"]


@dataclasses.dataclass
class EngineConfig:
    """Engine arguments (vLLM's names; docs/engine.md).

    Attributes:
        max_model_len: context limit (prompt + output) of one sequence.
        page_size: tokens per KV page (power of two).
        num_pages: pages in the pool (incl. the reserved null page); None: from
            ``memory_utilization`` (see :mod:`jaxllm.cache.page_pool`).
        memory_utilization: fraction of device memory the pool may take (after weights;
            CPU: of RAM, capped by ``$JAXLLM_CPU_KVCACHE_SPACE`` GiB, default 4).
        kv_cache_dtype: pool dtype ("float32" / "bfloat16" / "int8": per-token, per-head
            scales, XLA attention); None: the weights' dtype.
        max_num_seqs: sequences per step (also the largest sample-row bucket).
        max_num_batched_tokens: tokens per step (prefill chunks + decodes).
        enable_prefix_caching: reuse computed prompt blocks across requests.
        enable_chunked_prefill: split long prompts over steps (else a prompt runs whole).
        num_scheduler_steps: decode tokens per dispatch when no request needs the host in
            between (1: always one).
        attention_impl: "auto" | "xla" | "pallas".
        seed: seeds the random seeds of requests that set none.
        speculative_config: speculative decoding (vLLM's dict, a JSON string of one, or a
            :class:`~jaxllm.spec.config.SpeculativeConfig`); None: off.  Parsed by
            :meth:`validate`.
    """

    max_model_len: int
    page_size: int = 16
    num_pages: int | None = None
    memory_utilization: float = 0.9
    kv_cache_dtype: str | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    num_scheduler_steps: int = 8
    attention_impl: str = "auto"
    seed: int = 0
    speculative_config: SpeculativeConfig | Mapping[str, Any] | str | None = None

    @classmethod
    def check_names(cls, args: Mapping[str, Any]) -> None:
        """TypeError naming the valid fields if ``args`` has a name that is not one."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(args) - set(names))
        if unknown:
            raise TypeError(f"unknown engine argument{'s' if len(unknown) > 1 else ''} "
                            f"{', '.join(unknown)}; valid: {', '.join(names)}")

    @classmethod
    def resolve(cls, cfg: ModelConfig, config: "EngineConfig | None" = None,
                **kwargs: Any) -> "EngineConfig":
        """``config`` with ``kwargs`` applied (no config: the fields from ``kwargs``,
        ``max_model_len`` defaulting to the model's), validated."""
        cls.check_names(kwargs)
        if config is None:
            kwargs.setdefault("max_model_len", cfg.max_position_embeddings)
            config = cls(**kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        config.validate()
        return config

    def validate(self) -> None:
        def bad(name, why):
            raise ValueError(f"{name} {why}, got {getattr(self, name)!r}")

        if self.max_model_len < 2:
            bad("max_model_len", "must be >= 2")
        if self.max_num_seqs < 1:
            bad("max_num_seqs", "must be >= 1")
        if self.max_num_batched_tokens < 1:
            bad("max_num_batched_tokens", "must be >= 1")
        if self.num_scheduler_steps < 1:
            bad("num_scheduler_steps", "must be >= 1")
        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"without chunked prefill max_num_batched_tokens ({self.max_num_batched_tokens}) "
                f"must be >= max_model_len ({self.max_model_len}): a whole prompt (or a "
                "preempted sequence's recompute) must fit one step")
