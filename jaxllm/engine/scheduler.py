"""Continuous-batching scheduler: decides, each step, which tokens of which sequences run.

One call to :meth:`Scheduler.schedule` plans one model step:

1. **Decodes.** Every running sequence with exactly one uncomputed token gets it, oldest
   request first. If the KV pool cannot take the new slots, the *newest* running request
   is preempted (its blocks freed, it goes back to the front of the waiting queue and is
   later recomputed from prompt + output so far) until the decode fits.  A decode given
   draft tokens (speculative decoding, ``schedule(drafts=...)``) becomes a *verify*: it
   feeds its token followed by the drafts, when the budget and the pool allow (else it
   decodes plainly); :meth:`Scheduler.update` keeps the accepted prefix and truncates
   the block table past it.
2. **Prefill continuations.** Running sequences that are part-way through their (chunked)
   prefill get their next chunk.
3. **Admissions.** Waiting requests, FCFS, while the token budget, the sequence cap and
   the pool allow. With chunked prefill a long prompt is cut to the remaining budget
   and continues next step (it stays running, without sampling, until it is done).
   Nothing is admitted in a step that had to preempt (unless nothing else ran).

The model runner executes the :class:`SchedulerOutput`; the engine then calls
:meth:`Scheduler.update` with the sampled tokens, checks stop conditions and calls
:meth:`Scheduler.finish_seq` / :meth:`Scheduler.finish_request` /
:meth:`Scheduler.abort`. Stop checking is not done here.

Bounds the runner can rely on: ``len(output.scheduled_seqs) <= max_num_seqs`` and
``output.num_scheduled_tokens <= max_num_batched_tokens``.
"""

from __future__ import annotations

import bisect
import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence as Seq

from jaxllm.cache.block_allocator import BlockAllocator, compute_slot_mapping
from jaxllm.engine.sequence import Sequence, SequenceGroup, SequenceStatus

__all__ = ["ScheduledSequence", "Scheduler", "SchedulerOutput"]


@dataclass(frozen=True, slots=True)
class ScheduledSequence:
    """One sequence's work in a step.

    Attributes:
        seq_id: the sequence.
        request_id: its request.
        token_ids: tokens to feed this step, at positions ``start_pos ..``.
        start_pos: position of ``token_ids[0]`` (= ``num_computed_tokens`` before the step);
            the tokens' KV go to ``slot_mapping``; attention covers positions
            ``[0, end_pos)``.
        block_table: snapshot of the sequence's block table (covers at least
            ``[0, end_pos)``; a prefilling sequence already holds blocks for all its tokens).
        do_sample: a token must be sampled from the logits of the last fed token (the chunk
            reaches the end of the known tokens). False for non-final prefill chunks.
        is_prefill: scheduled as a prefill chunk (False: a decode or a verify).
        draft_ids: speculative draft tokens fed after the sequence's last token (a
            *verify*: ``token_ids`` is that token followed by them); empty for the rest.
    """

    seq_id: int
    request_id: str
    token_ids: tuple[int, ...]
    start_pos: int
    block_table: tuple[int, ...]
    do_sample: bool
    is_prefill: bool
    draft_ids: tuple[int, ...] = ()

    @property
    def is_verify(self) -> bool:
        """Feeds draft tokens for the target to verify."""
        return bool(self.draft_ids)

    @property
    def num_tokens(self) -> int:
        """Query length of this sequence in the step."""
        return len(self.token_ids)

    @property
    def end_pos(self) -> int:
        """Context (KV) length after the step: ``start_pos + num_tokens``."""
        return self.start_pos + len(self.token_ids)

    @property
    def positions(self) -> range:
        return range(self.start_pos, self.start_pos + len(self.token_ids))

    def slot_mapping(self, block_size: int) -> list[int]:
        """Flat KV-pool slots where this step writes the tokens' K/V."""
        return compute_slot_mapping(self.block_table, block_size, self.start_pos, self.end_pos)


@dataclass
class SchedulerOutput:
    """The plan for one model step.

    Attributes:
        scheduled_seqs: decodes first (one token each), then verifies (a token and its
            drafts), then prefill chunks; the model runner packs tokens in this order.
        num_decode_tokens / num_verify_tokens / num_prefill_tokens: token counts of the
            three parts; num_verify_seqs: verify entries.
        blocks_to_copy: ``(src_block, dst_block)`` copy-on-write copies to apply to every
            layer's page pool *before* running the step.
        preempted_request_ids: requests preempted in this step (moved back to waiting).
        ignored_request_ids: requests finished with ``FINISHED_IGNORED`` because they can
            no longer fit in the whole pool (or token budget, without chunked prefill).
        block_size: the allocator's block size (for the slot-mapping helpers).
    """

    scheduled_seqs: list[ScheduledSequence] = field(default_factory=list)
    num_decode_tokens: int = 0
    num_prefill_tokens: int = 0
    num_verify_tokens: int = 0
    num_verify_seqs: int = 0
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    preempted_request_ids: list[str] = field(default_factory=list)
    ignored_request_ids: list[str] = field(default_factory=list)
    block_size: int = 0

    @property
    def num_seqs(self) -> int:
        return len(self.scheduled_seqs)

    @property
    def num_scheduled_tokens(self) -> int:
        return self.num_decode_tokens + self.num_verify_tokens + self.num_prefill_tokens

    @property
    def num_decode_entries(self) -> int:
        """Scheduled entries before the prefill chunks (decodes and verifies)."""
        return self.num_decode_tokens + self.num_verify_seqs

    @property
    def is_empty(self) -> bool:
        return not self.scheduled_seqs

    # Flat per-token / per-sequence views for building the step's int32 arrays ----------
    def input_ids(self) -> list[int]:
        return [t for s in self.scheduled_seqs for t in s.token_ids]

    def positions(self) -> list[int]:
        return [p for s in self.scheduled_seqs for p in s.positions]

    def slot_mapping(self) -> list[int]:
        return [x for s in self.scheduled_seqs for x in s.slot_mapping(self.block_size)]

    def query_start_loc(self) -> list[int]:
        """``cu_q_lens``: ``[0, q0, q0+q1, ...]`` (length ``num_seqs + 1``)."""
        return list(itertools.accumulate((s.num_tokens for s in self.scheduled_seqs), initial=0))

    def seq_lens(self) -> list[int]:
        """``kv_lens``: context length of each sequence after the step."""
        return [s.end_pos for s in self.scheduled_seqs]

    def logits_indices(self) -> list[int]:
        """Index (into the flat token list) of the last token of every scheduled sequence."""
        return [q - 1 for q in self.query_start_loc()[1:]]


def _is_decoding(seq: Sequence) -> bool:
    """Running with one uncomputed token that it generated (a prompt's last token, left
    over by a chunk, is prefill: an n > 1 request samples its n first tokens there)."""
    return (seq.status is SequenceStatus.RUNNING and seq.num_uncomputed_tokens == 1
            and seq.num_output_tokens > 0)


@dataclass
class _Plan:
    """One step being planned: the token budget left and what was scheduled so far."""

    budget: int
    decodes: list[ScheduledSequence] = field(default_factory=list)
    verifies: list[ScheduledSequence] = field(default_factory=list)
    prefills: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    @property
    def num_seqs(self) -> int:
        return len(self.decodes) + len(self.verifies) + len(self.prefills)


class Scheduler:
    """FCFS continuous-batching scheduler with chunked prefill and recompute preemption.

    Args:
        allocator: the KV block allocator (shared with nobody else).
        max_num_seqs: cap on sequences per step (and on reserved running seats).
        max_num_batched_tokens: cap on tokens per step.
        enable_chunked_prefill: cut long prompts into chunks of the remaining token budget.
            When off, a prompt is admitted only if it fits whole in the step's budget.

    Usage (the engine loop)::

        sched.add_request("r0", prompt_ids, sampling_params)
        while sched.has_unfinished_requests():
            out = sched.schedule()
            sampled = runner.execute(out)                 # one token per entry (ignored
            new_seqs = sched.update(out, sampled)         #   where do_sample is False)
            for seq in new_seqs:
                if stopped(seq): sched.finish_seq(seq.seq_id, SequenceStatus.FINISHED_STOPPED)
    """

    def __init__(
        self,
        allocator: BlockAllocator,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = True,
    ) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        self.allocator = allocator
        self.block_size = allocator.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[SequenceGroup] = deque()
        self.running: list[SequenceGroup] = []  # sorted by arrival_order (oldest first)
        self.num_preemptions = 0
        self._requests: dict[str, SequenceGroup] = {}
        self._seqs: dict[int, Sequence] = {}
        self._seq_ids = itertools.count()
        self._arrivals = itertools.count()
        self._pending: SchedulerOutput | None = None

    # ------------------------------------------------------------------ requests
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Iterable[int],
        sampling_params: Any = None,
        *,
        n: int = 1,
        arrival_time: float | None = None,
        use_prefix_cache: bool = True,
    ) -> SequenceGroup:
        """Queue a request with one sequence; return its :class:`SequenceGroup`.

        ``n`` is the most sequences the request will run at once (n > 1 sampling, beam
        width): seats are reserved at admission and :meth:`fork_seq` may add up to ``n - 1``
        sequences. Raises ValueError when the prompt can never be scheduled.
        ``use_prefix_cache=False`` computes every prompt token (no prefix-cache lookup).
        """
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} already exists")
        prompt = tuple(prompt_token_ids)
        if not prompt:
            raise ValueError(f"request {request_id!r}: empty prompt")
        if not 1 <= n <= min(self.max_num_seqs, self.max_num_batched_tokens):
            raise ValueError(
                f"request {request_id!r}: n={n} must be in [1, min(max_num_seqs={self.max_num_seqs}, "
                f"max_num_batched_tokens={self.max_num_batched_tokens})]"
            )
        need = self.allocator.num_blocks_for_tokens(len(prompt))
        if need > self.allocator.num_usable_blocks:
            raise ValueError(
                f"request {request_id!r}: prompt of {len(prompt)} tokens needs {need} KV blocks of "
                f"{self.block_size} tokens, the pool has only {self.allocator.num_usable_blocks}"
            )
        if not self.enable_chunked_prefill and len(prompt) > self.max_num_batched_tokens:
            raise ValueError(
                f"request {request_id!r}: prompt of {len(prompt)} tokens exceeds "
                f"max_num_batched_tokens={self.max_num_batched_tokens} and chunked prefill is off"
            )
        order = next(self._arrivals)
        seq = Sequence(next(self._seq_ids), prompt, sampling_params, request_id=request_id, arrival_order=order)
        group = SequenceGroup(
            request_id,
            [seq],
            sampling_params,
            arrival_time=time.time() if arrival_time is None else arrival_time,
            arrival_order=order,
            max_num_running_seqs=n,
            use_prefix_cache=use_prefix_cache,
        )
        self._requests[request_id] = group
        self._seqs[seq.seq_id] = seq
        self.waiting.append(group)
        return group

    def get_request(self, request_id: str) -> SequenceGroup | None:
        return self._requests.get(request_id)

    def get_seq(self, seq_id: int) -> Sequence | None:
        return self._seqs.get(seq_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._requests)

    @property
    def num_running_seqs(self) -> int:
        return sum(len(g.get_seqs(SequenceStatus.RUNNING)) for g in self.running)

    # ------------------------------------------------------------------ one step
    def decoding_seqs(self) -> list[Sequence]:
        """Running sequences with exactly one uncomputed token (this step's decodes, unless
        preempted), oldest request first: the candidates for speculative drafts."""
        return [s for g in self.running for s in g.seqs if _is_decoding(s)]

    def schedule(self, drafts: Mapping[int, Seq[int]] | None = None) -> SchedulerOutput:
        """Plan one step (see the module docstring). Must be followed by :meth:`update`.
        ``drafts``: ``{seq_id: draft tokens}`` for decoding sequences to verify."""
        if self._pending is not None:
            raise RuntimeError("schedule() called again before update() of the previous output")
        plan = _Plan(budget=self.max_num_batched_tokens)
        self._schedule_decodes(plan, drafts or {})
        self._schedule_partial_prefills(plan)
        if not plan.preempted or not plan.num_seqs:
            self._admit_waiting(plan)
        out = SchedulerOutput(
            scheduled_seqs=plan.decodes + plan.verifies + plan.prefills,
            num_decode_tokens=len(plan.decodes),
            num_prefill_tokens=sum(e.num_tokens for e in plan.prefills),
            num_verify_tokens=sum(e.num_tokens for e in plan.verifies),
            num_verify_seqs=len(plan.verifies),
            blocks_to_copy=self.allocator.take_pending_copies(),
            preempted_request_ids=plan.preempted,
            ignored_request_ids=plan.ignored,
            block_size=self.block_size,
        )
        if out.scheduled_seqs:
            self._pending = out
        return out

    def _schedule_decodes(self, plan: "_Plan", drafts: Mapping[int, Seq[int]]) -> None:
        """Decodes, oldest request first; preempt the newest request until they fit.
        Sequences with ``drafts`` verify them when the budget and the pool allow."""
        alloc = self.allocator
        i = 0
        while i < len(self.running) and plan.budget > 0:
            group = self.running[i]
            seqs = [s for s in group.seqs if _is_decoding(s)]
            if not seqs:
                i += 1
                continue
            if len(seqs) > plan.budget or plan.num_seqs + len(seqs) > self.max_num_seqs:
                break
            if drafts and self._schedule_verifies(plan, seqs, drafts):
                i += 1
                continue
            self_preempted = False
            while alloc.num_blocks_to_append_all(seqs, 1) > alloc.num_free_blocks:
                victim = self.running[-1]
                self._preempt(victim)
                plan.preempted.append(victim.request_id)
                if victim is group:
                    self_preempted = True
                    break
            if self_preempted:
                break
            for s in seqs:
                alloc.append_slots(s, 1)
                plan.decodes.append(self._entry(s, 1, is_prefill=False))
            plan.budget -= len(seqs)
            i += 1

    def _schedule_verifies(self, plan: "_Plan", seqs: list[Sequence],
                           drafts: Mapping[int, Seq[int]]) -> bool:
        """Schedule a group's decodes with their drafts (cut to the token budget) if the
        pool takes every slot without preempting; False (nothing scheduled) otherwise."""
        alloc = self.allocator
        spare = plan.budget - len(seqs)
        lens = []
        for s in seqs:
            n = min(len(drafts.get(s.seq_id, ())), spare)
            spare -= n
            lens.append(n)
        if not any(lens):
            return False
        by_len: dict[int, list[Sequence]] = {}
        for s, n in zip(seqs, lens):
            by_len.setdefault(n + 1, []).append(s)
        need = sum(alloc.num_blocks_to_append_all(ss, n) for n, ss in by_len.items())
        if need > alloc.num_free_blocks:
            return False  # decode plainly (and preempt if even that does not fit)
        for s, n in zip(seqs, lens):
            alloc.append_slots(s, n + 1)
            if n:
                plan.verifies.append(self._entry(s, 1, is_prefill=False,
                                                 draft_ids=tuple(drafts[s.seq_id][:n])))
            else:
                plan.decodes.append(self._entry(s, 1, is_prefill=False))
            plan.budget -= n + 1
        return True

    def _schedule_partial_prefills(self, plan: "_Plan") -> None:
        """Continue partially prefilled sequences."""
        alloc = self.allocator
        for group in self.running:
            if plan.budget == 0:
                break
            for s in group.seqs:
                if plan.budget == 0 or plan.num_seqs >= self.max_num_seqs:
                    break
                if (s.status is not SequenceStatus.RUNNING or s.num_uncomputed_tokens == 0
                        or _is_decoding(s)):
                    continue
                n = min(s.num_uncomputed_tokens, plan.budget)
                if not alloc.can_append(s, n):
                    continue
                alloc.append_slots(s, n)
                plan.prefills.append(self._entry(s, n, is_prefill=True))
                plan.budget -= n

    def _admit_waiting(self, plan: "_Plan") -> None:
        """Admit waiting requests, first come first served, while seats, tokens and pages
        last; a request that could never fit ends ``FINISHED_IGNORED``."""
        alloc = self.allocator
        seats = sum(g.max_num_running_seqs for g in self.running)
        while self.waiting and plan.budget > 0:
            group = self.waiting[0]
            seqs = group.get_unfinished_seqs()
            if self._never_fits(seqs):
                self.waiting.popleft()
                self._finish_group(group, SequenceStatus.FINISHED_IGNORED)
                plan.ignored.append(group.request_id)
                continue
            if seats + group.max_num_running_seqs > self.max_num_seqs:
                break
            if plan.num_seqs + len(seqs) > self.max_num_seqs:
                break
            if not self.enable_chunked_prefill and sum(s.num_tokens for s in seqs) > plan.budget:
                break  # (an upper bound: cache hits would make it smaller)
            use_cache = group.use_prefix_cache
            if sum(alloc.num_blocks_to_allocate(s, use_cache) for s in seqs) > alloc.num_free_blocks:
                break
            self.waiting.popleft()
            for s in seqs:
                cached = alloc.allocate(s, use_cache)
                s.num_computed_tokens = cached
                s.num_cached_tokens = cached
                s.status = SequenceStatus.RUNNING
            bisect.insort(self.running, group, key=lambda g: g.arrival_order)
            seats += group.max_num_running_seqs
            for s in seqs:
                n = min(s.num_uncomputed_tokens, plan.budget)
                if n == 0:
                    break  # allocated; its prefill starts next step
                alloc.append_slots(s, n)  # no-op for fresh blocks; kept for uniformity
                plan.prefills.append(self._entry(s, n, is_prefill=True))
                plan.budget -= n

    def update(
        self,
        output: SchedulerOutput,
        sampled_token_ids: Mapping[int, int] | Seq[int | None],
    ) -> list[Sequence]:
        """Record that ``output``'s step ran; append sampled tokens.

        ``sampled_token_ids`` is either ``{seq_id: token}`` or a list aligned with
        ``output.scheduled_seqs`` (entries with ``do_sample`` False are ignored). Advances
        ``num_computed_tokens``, registers newly full blocks in the prefix cache, and
        returns the sequences that received a token (the engine checks them for stops).
        Sequences finished or aborted since :meth:`schedule` are skipped.

        A verify entry gets the list of tokens the device kept: the accepted prefix of its
        drafts followed by the target's own token.  Its KV is valid up to the last
        accepted draft; the block table is cut back there (pages that held only rejected
        tokens go back to the pool; the rest of their slots are overwritten later).
        """
        if output is not self._pending:
            if output.is_empty:
                return []
            raise RuntimeError("update() must get the output of the latest schedule()")
        self._pending = None
        by_id = isinstance(sampled_token_ids, Mapping)
        if not by_id and len(sampled_token_ids) != len(output.scheduled_seqs):
            raise ValueError(
                f"got {len(sampled_token_ids)} sampled tokens for {len(output.scheduled_seqs)} scheduled sequences"
            )
        new_token_seqs: list[Sequence] = []
        for k, entry in enumerate(output.scheduled_seqs):
            seq = self._seqs.get(entry.seq_id)
            if seq is None or seq.status is not SequenceStatus.RUNNING:
                continue
            assert seq.num_computed_tokens == entry.start_pos, (seq, entry)
            if entry.draft_ids:
                token = sampled_token_ids[entry.seq_id] if by_id else sampled_token_ids[k]
                self._apply_verified(seq, entry, token)
                new_token_seqs.append(seq)
                continue
            seq.num_computed_tokens = entry.end_pos
            self.allocator.commit_tokens(seq)
            if entry.do_sample:
                token = sampled_token_ids[entry.seq_id] if by_id else sampled_token_ids[k]
                if token is None:
                    raise ValueError(f"no sampled token for sequence {entry.seq_id}")
                seq.append_token(int(token))
                new_token_seqs.append(seq)
        return new_token_seqs

    def _apply_verified(self, seq: Sequence, entry: ScheduledSequence, tokens: Seq[int]) -> None:
        """Append a verify's kept tokens; KV stays valid through the last accepted draft."""
        tokens = [int(t) for t in tokens]
        n = len(tokens) - 1
        if not 0 <= n <= len(entry.draft_ids) or tuple(tokens[:n]) != entry.draft_ids[:n]:
            raise ValueError(f"sequence {seq.seq_id}: verified tokens {tokens} do not extend "
                             f"a prefix of its drafts {entry.draft_ids}")
        for t in tokens:
            seq.append_token(t)
        seq.num_computed_tokens = entry.start_pos + 1 + n
        self.allocator.truncate(seq, seq.num_computed_tokens)  # rejected drafts' pages
        self.allocator.commit_tokens(seq)

    def discard(self, output: SchedulerOutput) -> None:
        """``output``'s step never ran (the device step raised): forget it so that
        :meth:`schedule` may run again.  Its sequences keep their slots; the caller aborts
        the requests whose KV was lost."""
        if output is self._pending:
            self._pending = None

    # ------------------------------------------------------------------ multi-step decode
    def reserve_lookahead(self, output: SchedulerOutput, num_slots: Mapping[int, int]) -> list[tuple[int, int]] | None:
        """Reserve KV slots for ``num_slots[seq_id]`` tokens (from the token this step feeds)
        for decode entries of ``output``, so the device can run several decode steps in one
        dispatch. All or nothing: returns the extra copy-on-write copies to apply before the
        step, or None (nothing reserved) when the pool cannot take them.

        Call between :meth:`schedule` and :meth:`update`; after the step, feed the extra
        tokens with :meth:`extend_decoded`. Unused reserved blocks stay in the table until
        the sequence is freed.
        """
        if output is not self._pending:
            raise RuntimeError("reserve_lookahead() needs the output of the latest schedule()")
        alloc = self.allocator
        groups: dict[int, list[Sequence]] = {}
        for e in output.scheduled_seqs:
            n = num_slots.get(e.seq_id, 1)
            if e.is_prefill or n <= 1:
                continue
            groups.setdefault(n, []).append(self._seqs[e.seq_id])
        if not groups:
            return []
        need = sum(alloc.num_blocks_to_append_all(seqs, n) for n, seqs in groups.items())
        if need > alloc.num_free_blocks:
            return None
        pending = alloc.take_pending_copies()  # keep anything queued out of the way
        for n, seqs in groups.items():
            for s in seqs:
                alloc.append_slots(s, n)
        extra = alloc.take_pending_copies()
        alloc._pending_copies = pending  # noqa: SLF001 - restore (normally empty)
        return extra

    def extend_decoded(self, seq_id: int, token_ids: Seq[int]) -> Sequence | None:
        """Multi-step decode: after :meth:`update` gave a sequence the first token of a
        dispatch, append the tokens the device produced after it. Each appended token means
        the previous one's KV was written (``num_computed_tokens`` + 1). Returns the sequence
        (None if it finished meanwhile)."""
        seq = self._seqs.get(seq_id)
        if seq is None or seq.status is not SequenceStatus.RUNNING:
            return None
        for t in token_ids:
            if seq.num_uncomputed_tokens != 1:
                raise RuntimeError(f"sequence {seq_id} is not decoding")
            seq.num_computed_tokens += 1
            self.allocator.commit_tokens(seq)
            seq.append_token(int(t))
        return seq

    # ------------------------------------------------------------------ n > 1 / beams
    def fork_seq(self, parent_seq_id: int, new_token_id: int | None = None) -> Sequence:
        """Add a sequence sharing ``parent``'s tokens and KV blocks (copy-on-write).

        Call after :meth:`update` gave the parent its sampled token. ``new_token_id``
        replaces the child's last (still uncomputed) token, e.g. the 2nd of n samples or a
        beam candidate. The request may run at most ``n`` (from :meth:`add_request`)
        unfinished sequences.
        """
        parent = self._seqs[parent_seq_id]
        if parent.status is not SequenceStatus.RUNNING or parent.num_uncomputed_tokens > 1:
            raise ValueError(f"sequence {parent_seq_id} must be running and not mid-prefill to fork")
        group = self._requests[parent.request_id]
        if group.num_unfinished_seqs + 1 > group.max_num_running_seqs:
            raise ValueError(
                f"request {group.request_id!r} already runs {group.num_unfinished_seqs} sequences "
                f"(n={group.max_num_running_seqs})"
            )
        child = parent.fork(next(self._seq_ids))
        self.allocator.fork(parent, child)
        if new_token_id is not None:
            child.replace_last_token(new_token_id)
        group.seqs.append(child)
        self._seqs[child.seq_id] = child
        return child

    # ------------------------------------------------------------------ finishing
    def finish_seq(self, seq_id: int, status: SequenceStatus = SequenceStatus.FINISHED_STOPPED) -> None:
        """Finish one sequence (free its blocks); the request ends with its last sequence."""
        if not status.is_finished:
            raise ValueError(f"{status} is not a finished status")
        seq = self._seqs[seq_id]
        self.allocator.free(seq)
        seq.status = status
        group = self._requests[seq.request_id]
        if group.is_finished:
            self._remove_group(group)

    def finish_request(self, request_id: str, status: SequenceStatus = SequenceStatus.FINISHED_STOPPED) -> bool:
        """Finish every unfinished sequence of a request; False if it is unknown."""
        if not status.is_finished:
            raise ValueError(f"{status} is not a finished status")
        group = self._requests.get(request_id)
        if group is None:
            return False
        self._finish_group(group, status)
        return True

    def abort(self, request_id: str) -> bool:
        """Abort a request wherever it is (waiting or running); frees its blocks."""
        return self.finish_request(request_id, SequenceStatus.FINISHED_ABORTED)

    # ------------------------------------------------------------------ internals
    def _entry(self, seq: Sequence, n: int, *, is_prefill: bool,
               draft_ids: tuple[int, ...] = ()) -> ScheduledSequence:
        start = seq.num_computed_tokens
        return ScheduledSequence(
            seq_id=seq.seq_id,
            request_id=seq.request_id,
            token_ids=tuple(seq.token_ids[start : start + n]) + draft_ids,
            start_pos=start,
            block_table=tuple(seq.block_table),
            do_sample=start + n == seq.num_tokens,
            is_prefill=is_prefill,
            draft_ids=draft_ids,
        )

    def _never_fits(self, seqs: list[Sequence]) -> bool:
        blocks = sum(self.allocator.num_blocks_for_tokens(s.num_tokens) for s in seqs)
        if blocks > self.allocator.num_usable_blocks:
            return True
        return not self.enable_chunked_prefill and sum(s.num_tokens for s in seqs) > self.max_num_batched_tokens

    def _preempt(self, group: SequenceGroup) -> None:
        self.running.remove(group)
        for s in group.get_unfinished_seqs():
            self.allocator.free(s)
            s.status = SequenceStatus.PREEMPTED
            s.num_computed_tokens = 0
            s.num_cached_tokens = 0
        self.waiting.appendleft(group)
        self.num_preemptions += 1

    def _finish_group(self, group: SequenceGroup, status: SequenceStatus) -> None:
        for s in group.get_unfinished_seqs():
            self.allocator.free(s)
            s.status = status
        self._remove_group(group)

    def _remove_group(self, group: SequenceGroup) -> None:
        if group in self.running:
            self.running.remove(group)
        elif group in self.waiting:
            self.waiting.remove(group)
        del self._requests[group.request_id]
        for s in group.seqs:
            self._seqs.pop(s.seq_id, None)
