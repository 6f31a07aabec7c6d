"""Host-side request state: :class:`Sequence` (one token stream) and :class:`SequenceGroup`.

A request (``SequenceGroup``, alias ``Request``) owns one or more sequences: one for plain
generation, several for n > 1 sampling or beam search (created by forking). Sequences carry
exactly what the scheduler and block allocator need; sampling parameters are an opaque
reference the engine and sampler interpret.

Token accounting: ``token_ids = prompt_token_ids + output_token_ids``. The KV of positions
``[0, num_computed_tokens)`` is on device. A sequence in decode has exactly one uncomputed
token (the last sampled one), which the next step feeds.
"""

from __future__ import annotations

import enum
from typing import Any, Iterable

__all__ = ["Request", "Sequence", "SequenceGroup", "SequenceStatus"]


class SequenceStatus(enum.Enum):
    """Lifecycle of a sequence. ``PREEMPTED`` sequences wait to be recomputed."""

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "finished_stopped"  # EOS / stop token / stop string
    FINISHED_LENGTH = "finished_length"  # max_tokens / max_model_len
    FINISHED_ABORTED = "finished_aborted"  # abort() or a pruned beam
    FINISHED_IGNORED = "finished_ignored"  # can never fit in the KV pool / token budget

    @property
    def is_finished(self) -> bool:
        return self.value.startswith("finished")


class Sequence:
    """One token stream: prompt, generated tokens, progress and its KV block table.

    Attributes:
        seq_id: unique id (scheduler-assigned).
        request_id: id of the owning request.
        prompt_token_ids: the prompt (immutable tuple).
        output_token_ids: generated tokens, in order.
        status: :class:`SequenceStatus`.
        num_computed_tokens: positions ``[0, num_computed_tokens)`` have KV on device.
        num_cached_tokens: of the tokens at the last (re)admission, how many came from the
            prefix cache.
        block_table: block ids holding the tokens (owned by the block allocator).
        block_hashes: prefix-cache hashes of the full blocks (memo, owned by the allocator).
        sampling_params: opaque reference for the engine / sampler.
        arrival_order: the owning request's admission order (FCFS key).
    """

    __slots__ = (
        "seq_id",
        "request_id",
        "prompt_token_ids",
        "output_token_ids",
        "status",
        "num_computed_tokens",
        "num_cached_tokens",
        "block_table",
        "block_hashes",
        "sampling_params",
        "arrival_order",
        "_token_ids",
    )

    def __init__(
        self,
        seq_id: int,
        prompt_token_ids: Iterable[int],
        sampling_params: Any = None,
        *,
        request_id: str = "",
        arrival_order: int = 0,
    ) -> None:
        self.seq_id = seq_id
        self.request_id = request_id
        self.prompt_token_ids: tuple[int, ...] = tuple(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []
        self.sampling_params = sampling_params
        self.arrival_order = arrival_order
        self._token_ids: list[int] = list(self.prompt_token_ids)

    # token views -------------------------------------------------------------
    @property
    def token_ids(self) -> list[int]:
        """Prompt + output tokens. Read-only view: do not mutate the returned list."""
        return self._token_ids

    @property
    def num_tokens(self) -> int:
        return len(self._token_ids)

    def __len__(self) -> int:
        return len(self._token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def last_token_id(self) -> int:
        return self._token_ids[-1]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens still to feed the model: 1 in decode, more while (re)prefilling."""
        return len(self._token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    # mutation ------------------------------------------------------------------
    def append_token(self, token_id: int) -> None:
        """Append a sampled token (it becomes the single uncomputed token)."""
        self.output_token_ids.append(token_id)
        self._token_ids.append(token_id)

    def replace_last_token(self, token_id: int) -> None:
        """Replace the last *output* token while its KV is not computed yet.

        For n > 1 / beam search: a forked child (or a re-used beam) takes a different
        candidate token than its parent sampled.
        """
        if not self.output_token_ids or self.num_computed_tokens >= len(self._token_ids):
            raise ValueError(f"sequence {self.seq_id}: last token is not an uncomputed output token")
        # block_hashes never covers the last token's block while it is uncomputed (the
        # allocator hashes only computed blocks and, on lookup, blocks before the last
        # token), so the memo stays valid.
        self.output_token_ids[-1] = token_id
        self._token_ids[-1] = token_id

    def pop_token(self) -> int:
        """Remove and return the last *output* token while its KV is not computed yet.

        Beam search: the engine takes the sampled placeholder back and appends the token
        the beam step chooses (possibly a step later, when all beams have their logits).
        """
        if not self.output_token_ids or self.num_computed_tokens >= len(self._token_ids):
            raise ValueError(f"sequence {self.seq_id}: last token is not an uncomputed output token")
        self._token_ids.pop()
        return self.output_token_ids.pop()

    def fork(self, new_seq_id: int) -> "Sequence":
        """Copy of this sequence's tokens and progress under a new id (no blocks yet).

        The block allocator's ``fork`` gives the child the parent's blocks.
        """
        child = Sequence(
            new_seq_id,
            self.prompt_token_ids,
            self.sampling_params,
            request_id=self.request_id,
            arrival_order=self.arrival_order,
        )
        child.output_token_ids = list(self.output_token_ids)
        child._token_ids = list(self._token_ids)
        child.status = self.status
        child.num_computed_tokens = self.num_computed_tokens
        child.num_cached_tokens = self.num_cached_tokens
        child.block_hashes = list(self.block_hashes)
        return child

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, req={self.request_id!r}, {self.status.name}, "
            f"tokens={self.num_prompt_tokens}+{self.num_output_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={self.block_table})"
        )


class SequenceGroup:
    """A request: its sequences (several for n > 1 / beam search) and arrival info.

    Attributes:
        request_id: caller's id.
        seqs: the request's sequences (starts with one; more are added by forking).
        sampling_params: opaque reference (same object as each sequence's).
        arrival_time: wall-clock arrival (informational).
        arrival_order: FCFS order assigned by the scheduler.
        max_num_running_seqs: how many sequences this request may run at once
            (SamplingParams.n / beam width); the scheduler reserves that many seats.
        use_prefix_cache: reuse cached prefix blocks at admission (False: compute every
            prompt token, e.g. for prompt log-probs).
    """

    __slots__ = (
        "request_id",
        "seqs",
        "sampling_params",
        "arrival_time",
        "arrival_order",
        "max_num_running_seqs",
        "use_prefix_cache",
    )

    def __init__(
        self,
        request_id: str,
        seqs: list[Sequence],
        sampling_params: Any = None,
        arrival_time: float = 0.0,
        arrival_order: int = 0,
        max_num_running_seqs: int = 1,
        use_prefix_cache: bool = True,
    ) -> None:
        if not seqs:
            raise ValueError("a request needs at least one sequence")
        self.request_id = request_id
        self.seqs = seqs
        self.sampling_params = sampling_params
        self.arrival_time = arrival_time
        self.arrival_order = arrival_order
        self.max_num_running_seqs = max(max_num_running_seqs, len(seqs))
        self.use_prefix_cache = use_prefix_cache

    @property
    def prompt_token_ids(self) -> tuple[int, ...]:
        return self.seqs[0].prompt_token_ids

    def get_seqs(self, status: SequenceStatus | None = None) -> list[Sequence]:
        if status is None:
            return list(self.seqs)
        return [s for s in self.seqs if s.status is status]

    def get_unfinished_seqs(self) -> list[Sequence]:
        return [s for s in self.seqs if not s.is_finished]

    @property
    def num_unfinished_seqs(self) -> int:
        return sum(1 for s in self.seqs if not s.is_finished)

    @property
    def is_finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    def __repr__(self) -> str:
        return f"SequenceGroup(id={self.request_id!r}, seqs={self.seqs})"


#: vLLM-style alias.
Request = SequenceGroup
