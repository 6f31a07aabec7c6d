"""`SpeculativeConfig`: vLLM's ``speculative_config`` dict, parsed and checked at start-up.

``LLM(model, speculative_config={"method": "ngram", "num_speculative_tokens": 4,
"prompt_lookup_max": 4})`` and ``jaxllm generate/serve --speculative-config '{json}'``
both end here.  Everything that can be checked without loading a model is checked in
:meth:`SpeculativeConfig.parse`; :func:`check_draft_vocab` checks a loaded draft against
the target.  No jax here: ``LLM`` parses the config before the weights load.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

__all__ = ["METHODS", "SpeculativeConfig", "check_draft_vocab"]

#: Known methods and what each one needs.
METHODS = {
    "ngram": "prompt lookup (prompt_lookup_min / prompt_lookup_max), no model",
    "draft_model": "a smaller model with the target's tokenizer (\"model\": path)",
    "early_exit": "the target's first early_exit_layers layers + final norm + LM head",
    "medusa": "Medusa draft heads trained on the target (\"model\": heads directory)",
    "eagle": "EAGLE draft head trained on the target (\"model\": heads directory)",
}
_NEEDS_MODEL = ("draft_model", "medusa", "eagle")


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding settings (vLLM's names where vLLM has one).

    Attributes:
        method: one of :data:`METHODS`.
        num_speculative_tokens: ``k``, the most draft tokens verified per sequence and step.
        prompt_lookup_min / prompt_lookup_max: n-gram sizes tried (longest first) when
            looking the sequence's last tokens up in its own prompt and output.
        model: draft model path (``draft_model``) or heads directory (``medusa`` / ``eagle``).
        early_exit_layers: target layers the ``early_exit`` draft runs (default: a quarter).
        disable_by_batch_size: no speculation in a step with at least this many decoding
            sequences (verifying costs more than it saves once the batch fills the
            matmuls); None: never switched off.
        adaptive: adapt each request's ``k`` to its recent acceptance (else always ``k``).
    """

    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 5
    model: str | None = None
    early_exit_layers: int | None = None
    disable_by_batch_size: int | None = 4  # measured: docs/spec.md
    adaptive: bool = True

    @classmethod
    def parse(cls, value: "SpeculativeConfig | Mapping[str, Any] | str | None"
              ) -> "SpeculativeConfig | None":
        """A config from a dict (vLLM's keys), a JSON string of one, a config, or None.
        Raises ValueError / TypeError naming what is wrong."""
        if value is None or isinstance(value, SpeculativeConfig):
            if value is not None:
                value.validate()
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config is not valid JSON: {e}") from None
        if not isinstance(value, Mapping):
            raise TypeError(f"speculative_config must be a dict, got {type(value).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ValueError(f"unknown speculative_config key{'s' if len(unknown) > 1 else ''} "
                             f"{', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        if "method" not in value or "num_speculative_tokens" not in value:
            raise ValueError("speculative_config needs 'method' and 'num_speculative_tokens'")
        config = cls(**value)
        config.validate()
        return config

    def validate(self) -> None:
        """ValueError for settings that can never run."""
        if self.method not in METHODS:
            raise ValueError(f"unknown speculative method {self.method!r}; known: "
                             + "; ".join(f"{m} ({why})" for m, why in METHODS.items()))
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"num_speculative_tokens must be an integer >= 1, got {k!r}")
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
            raise ValueError(f"need 1 <= prompt_lookup_min <= prompt_lookup_max, "
                             f"got {lo!r}, {hi!r}")
        if self.method in _NEEDS_MODEL and not self.model:
            raise ValueError(f"speculative method {self.method!r} needs \"model\": "
                             f"{METHODS[self.method]}")
        if self.method not in _NEEDS_MODEL and self.model is not None:
            raise ValueError(f"speculative method {self.method!r} takes no \"model\"")
        if self.early_exit_layers is not None and (self.method != "early_exit"
                                                   or self.early_exit_layers < 1):
            raise ValueError("early_exit_layers must be >= 1 and only goes with "
                             f"method 'early_exit', got {self.early_exit_layers!r}")
        b = self.disable_by_batch_size
        if b is not None and (not isinstance(b, int) or b < 1):
            raise ValueError(f"disable_by_batch_size must be an integer >= 1 or None, got {b!r}")


def check_draft_vocab(target_vocab: int, draft_vocab: int, what: str = "draft model") -> None:
    """ValueError when a draft cannot propose the target's tokens: its vocabulary differs
    (token ids would mean different strings, and acceptance tests would compare
    unrelated distributions)."""
    if target_vocab != draft_vocab:
        raise ValueError(f"the {what} has a vocabulary of {draft_vocab} tokens, the target "
                         f"{target_vocab}: speculative decoding needs the target's tokenizer")
