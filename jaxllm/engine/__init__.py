"""Engine host side: sequences, requests and the continuous-batching scheduler."""

from jaxllm.engine.scheduler import ScheduledSequence, Scheduler, SchedulerOutput
from jaxllm.engine.sequence import Request, Sequence, SequenceGroup, SequenceStatus

__all__ = [
    "Request",
    "ScheduledSequence",
    "Scheduler",
    "SchedulerOutput",
    "Sequence",
    "SequenceGroup",
    "SequenceStatus",
]
