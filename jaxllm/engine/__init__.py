"""The continuous-batching engine over the paged KV cache (docs/engine.md).

Host side (plain Python): :class:`EngineConfig`, :class:`Sequence` /
:class:`SequenceGroup`, the :class:`Scheduler`.  Device side: ``runner.ModelRunner``
(fixed-shape jitted steps over ``jaxllm.cache.page_pool.PagePool``).  Tying them
together: :class:`LLMEngine` (``add_request`` / ``step`` / ``abort``; its request
bookkeeping in ``output_processor``) and :class:`AsyncLLMEngine` (async streams); both
load lazily so that the host side imports without jax.
"""

from jaxllm.engine.config import EngineConfig
from jaxllm.engine.scheduler import ScheduledSequence, Scheduler, SchedulerOutput
from jaxllm.engine.sequence import Request, Sequence, SequenceGroup, SequenceStatus


def __getattr__(name):
    # the device side (jax) loads only when asked for
    if name == "LLMEngine":
        from jaxllm.engine.engine import LLMEngine

        return LLMEngine
    if name == "AsyncLLMEngine":
        from jaxllm.engine.async_engine import AsyncLLMEngine

        return AsyncLLMEngine
    raise AttributeError(f"module 'jaxllm.engine' has no attribute {name!r}")


__all__ = [
    "AsyncLLMEngine",
    "EngineConfig",
    "LLMEngine",
    "Request",
    "ScheduledSequence",
    "Scheduler",
    "SchedulerOutput",
    "Sequence",
    "SequenceGroup",
    "SequenceStatus",
]
