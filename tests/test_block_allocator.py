"""BlockAllocator: ref counts, copy-on-write, prefix caching, LRU eviction (pure Python, no JAX)."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from jaxllm.cache import NULL_BLOCK_ID, BlockAllocator, NoFreeBlocksError, compute_slot_mapping
from jaxllm.engine.sequence import Sequence

_ids = itertools.count(1000)


def make_seq(tokens, seq_id=None) -> Sequence:
    return Sequence(next(_ids) if seq_id is None else seq_id, tokens)


class FakeKV:
    """A device page pool that stores token ids: writes go through the slot mapping,
    CoW copies are applied (gather-then-scatter) before every write, as a runner would."""

    def __init__(self, alloc: BlockAllocator) -> None:
        self.alloc = alloc
        self.bs = alloc.block_size
        self.slots: list[int | None] = [None] * (alloc.num_blocks * alloc.block_size)

    def apply_copies(self) -> list[tuple[int, int]]:
        copies = self.alloc.take_pending_copies()
        bs = self.bs
        pages = [self.slots[s * bs : (s + 1) * bs] for s, _ in copies]  # gather all first
        for (_, d), page in zip(copies, pages):
            self.slots[d * bs : (d + 1) * bs] = page
        return copies

    def compute(self, seq: Sequence, n: int) -> list[tuple[int, int]]:
        """The runner's step for one sequence: make room, copy, write n tokens, commit."""
        self.alloc.append_slots(seq, n)
        copies = self.apply_copies()
        start = seq.num_computed_tokens
        for slot, tok in zip(self.alloc.slot_mapping(seq, start, start + n), seq.token_ids[start : start + n]):
            self.slots[slot] = tok
        seq.num_computed_tokens += n
        self.alloc.commit_tokens(seq)
        return copies

    def read(self, seq: Sequence, n: int) -> list[int | None]:
        return [self.slots[s] for s in compute_slot_mapping(seq.block_table, self.bs, 0, n)]


def admit(alloc: BlockAllocator, seq: Sequence) -> int:
    cached = alloc.allocate(seq)
    seq.num_computed_tokens = cached
    return cached


# ---------------------------------------------------------------------------- basics
@pytest.mark.parametrize("bs", [0, -4, 3, 6, 12, 24])
def test_block_size_must_be_power_of_two(bs):
    with pytest.raises(ValueError, match="power of two"):
        BlockAllocator(8, bs)


@pytest.mark.parametrize("bs", [1, 2, 16, 128])
def test_power_of_two_block_sizes_accepted(bs):
    alloc = BlockAllocator(8, bs)
    assert alloc.num_usable_blocks == 7 and alloc.num_free_blocks == 7 and alloc.usage == 0.0


def test_slot_mapping():
    assert compute_slot_mapping([3, 1, 7], 4, 2, 9) == [14, 15, 4, 5, 6, 7, 28]
    assert compute_slot_mapping([3, 1, 7], 4, 5, 5) == []
    assert compute_slot_mapping([5], 1, 0, 1) == [5]
    with pytest.raises(ValueError):
        compute_slot_mapping([3, 1], 4, 0, 9)  # beyond the table
    alloc = BlockAllocator(16, 4)
    seq = make_seq(range(10))
    admit(alloc, seq)
    table = seq.block_table
    assert alloc.slot_mapping(seq, 0, 10) == [table[p // 4] * 4 + p % 4 for p in range(10)]


def test_allocate_append_free_accounting():
    alloc = BlockAllocator(9, 4)  # 8 usable
    seq = make_seq(range(10))  # 3 blocks
    assert alloc.can_allocate(seq) and alloc.num_blocks_to_allocate(seq) == 3
    assert admit(alloc, seq) == 0
    assert len(seq.block_table) == 3 and NULL_BLOCK_ID not in seq.block_table
    assert alloc.num_free_blocks == 5 and alloc.usage == pytest.approx(3 / 8)
    kv = FakeKV(alloc)
    kv.compute(seq, 10)
    for t in (10, 11, 12):  # positions 10, 11 fit in block 2; 12 needs block 3
        seq.append_token(t)
        assert alloc.num_blocks_to_append(seq, 1) == (1 if t == 12 else 0)
        kv.compute(seq, 1)
    assert len(seq.block_table) == 4 and kv.read(seq, 13) == list(range(13))
    alloc.check_invariants()
    alloc.free(seq)
    alloc.free(seq)  # idempotent
    assert seq.block_table == [] and alloc.num_free_blocks == 8
    alloc.check_invariants()


def test_truncate_releases_tail_blocks_only():
    alloc = BlockAllocator(9, 4, enable_prefix_caching=True)  # 8 usable
    seq = make_seq(range(6))  # 2 blocks, the first full (committed after compute)
    admit(alloc, seq)
    FakeKV(alloc).compute(seq, 6)
    alloc.append_slots(seq, 8)  # room for 8 speculative tokens: 14 slots, 4 blocks
    assert len(seq.block_table) == 4 and alloc.num_free_blocks == 4
    head = seq.block_table[:2]
    alloc.truncate(seq, 7)  # one accepted token: 7 slots need 2 blocks
    assert seq.block_table == head and alloc.num_free_blocks == 6
    alloc.check_invariants()
    with pytest.raises(ValueError, match="committed"):
        alloc.truncate(seq, 0)  # the full first block is in the prefix cache
    assert seq.block_table == head


def test_out_of_blocks():
    alloc = BlockAllocator(3, 4)  # 2 usable
    a = make_seq(range(8))
    admit(alloc, a)
    b = make_seq(range(100, 101))
    assert not alloc.can_allocate(b)
    with pytest.raises(NoFreeBlocksError):
        alloc.allocate(b)
    FakeKV(alloc).compute(a, 8)
    a.append_token(9)
    assert not alloc.can_append(a)
    with pytest.raises(NoFreeBlocksError):
        alloc.append_slots(a)
    alloc.check_invariants()


# ---------------------------------------------------------------------------- copy-on-write
def test_fork_then_write_shared_last_block_copies():
    alloc = BlockAllocator(16, 4, enable_prefix_caching=False)
    kv = FakeKV(alloc)
    parent = make_seq([1, 2, 3, 4, 5, 6])  # block 0 full, block 1 half full
    admit(alloc, parent)
    kv.compute(parent, 6)
    parent.append_token(7)  # uncomputed, goes to position 6 (block 1)
    child = parent.fork(next(_ids))
    alloc.fork(parent, child)
    child.replace_last_token(70)
    shared0, shared1 = parent.block_table
    assert child.block_table == [shared0, shared1] and child.block_table is not parent.block_table
    assert alloc.ref_count(shared0) == 2 and alloc.ref_count(shared1) == 2

    assert alloc.num_blocks_to_append(child, 1) == 1
    copies = kv.compute(child, 1)  # child writes first: it gets the copy
    new = child.block_table[1]
    assert copies == [(shared1, new)] and new != shared1
    assert parent.block_table == [shared0, shared1] and child.block_table == [shared0, new]
    assert alloc.ref_count(shared1) == 1 and alloc.ref_count(new) == 1 and alloc.ref_count(shared0) == 2
    assert alloc.stats.num_cow_copies == 1

    assert alloc.num_blocks_to_append(parent, 1) == 0  # parent now owns shared1 alone
    assert kv.compute(parent, 1) == []
    assert kv.read(parent, 7) == [1, 2, 3, 4, 5, 6, 7]
    assert kv.read(child, 7) == [1, 2, 3, 4, 5, 6, 70]
    alloc.check_invariants()
    alloc.free(parent)
    assert alloc.ref_count(shared0) == 1 and kv.read(child, 7) == [1, 2, 3, 4, 5, 6, 70]
    alloc.free(child)
    assert alloc.num_free_blocks == alloc.num_usable_blocks
    alloc.check_invariants()


def test_siblings_appending_together_need_one_copy_less():
    alloc = BlockAllocator(16, 4)
    kv = FakeKV(alloc)
    a = make_seq(range(6))
    admit(alloc, a)
    kv.compute(a, 6)
    a.append_token(6)
    sibs = [a]
    for k in range(2):
        child = a.fork(next(_ids))
        alloc.fork(a, child)
        child.replace_last_token(10 + k)
        sibs.append(child)
    # the shared half-full block is held 3 times: 2 copies, the last writer keeps it
    assert alloc.num_blocks_to_append_all(sibs) == 2
    assert alloc.num_blocks_to_append_all(sibs[:2]) == 2
    assert sum(alloc.num_blocks_to_append(s) for s in sibs) == 3
    free_before = alloc.num_free_blocks
    for s in sibs:
        kv.compute(s, 1)
    assert alloc.num_free_blocks == free_before - 2
    assert [kv.read(s, 7)[-1] for s in sibs] == [6, 10, 11]
    alloc.check_invariants()


def test_fork_at_block_boundary_needs_no_copy():
    alloc = BlockAllocator(16, 4)
    kv = FakeKV(alloc)
    parent = make_seq(range(8))
    admit(alloc, parent)
    kv.compute(parent, 8)
    parent.append_token(8)  # position 8 starts a new block
    child = parent.fork(next(_ids))
    alloc.fork(parent, child)
    assert kv.compute(child, 1) == [] and kv.compute(parent, 1) == []
    assert child.block_table[:2] == parent.block_table[:2]
    assert child.block_table[2] != parent.block_table[2]
    alloc.check_invariants()


def test_pending_copy_dropped_when_destination_freed():
    alloc = BlockAllocator(16, 4, enable_prefix_caching=False)
    kv = FakeKV(alloc)
    parent = make_seq(range(6))
    admit(alloc, parent)
    kv.compute(parent, 6)
    parent.append_token(6)
    child = parent.fork(next(_ids))
    alloc.fork(parent, child)
    alloc.append_slots(child, 1)  # queues a copy
    alloc.free(child)  # e.g. preempted in the same step
    assert alloc.take_pending_copies() == []
    alloc.check_invariants()


# ---------------------------------------------------------------------------- prefix caching
def test_prefix_cache_reuses_three_blocks():
    bs = 4
    alloc = BlockAllocator(32, bs)
    kv = FakeKV(alloc)
    prefix = list(range(100, 100 + 3 * bs))
    a = make_seq(prefix + [1, 2, 3])
    assert admit(alloc, a) == 0
    kv.compute(a, a.num_tokens)
    assert all(alloc.is_cached(b) for b in a.block_table[:3]) and not alloc.is_cached(a.block_table[3])

    b = make_seq(prefix + [7, 8, 9, 10, 11])
    assert alloc.num_blocks_to_allocate(b) == 2  # 3 hits are in use: only 2 new blocks
    assert admit(alloc, b) == 3 * bs
    assert b.block_table[:3] == a.block_table[:3]
    assert all(alloc.ref_count(x) == 2 for x in a.block_table[:3])
    assert alloc.stats.prefix_cache_hits == 3 * bs
    assert alloc.stats.prefix_cache_queries == a.num_tokens + b.num_tokens
    kv.compute(b, b.num_uncomputed_tokens)
    assert kv.read(b, b.num_tokens) == b.token_ids
    alloc.check_invariants()


def test_partial_prefix_match_and_different_first_block():
    bs = 4
    alloc = BlockAllocator(32, bs)
    kv = FakeKV(alloc)
    a = make_seq(list(range(12)) + [99])
    admit(alloc, a)
    kv.compute(a, 13)
    b = make_seq([0, 1, 2, 3, 4, 5, 6, 99, 8, 9, 10, 11, 12])  # diverges in block 1
    assert admit(alloc, b) == 4 and b.block_table[0] == a.block_table[0]
    c = make_seq([5] + list(range(1, 13)))  # diverges in block 0: nothing reused
    assert admit(alloc, c) == 0
    alloc.check_invariants()


def test_blocks_commit_only_when_full_and_computed():
    alloc = BlockAllocator(32, 4)
    kv = FakeKV(alloc)
    a = make_seq(range(10))
    admit(alloc, a)
    kv.compute(a, 3)
    assert not any(alloc.is_cached(b) for b in a.block_table)
    kv.compute(a, 3)  # 6 computed: block 0 full
    assert [alloc.is_cached(b) for b in a.block_table] == [True, False, False]
    kv.compute(a, 4)  # 10 computed: block 1 full, block 2 partial
    assert [alloc.is_cached(b) for b in a.block_table] == [True, True, False]


def test_fully_cached_prompt_recomputes_last_block():
    bs = 4
    alloc = BlockAllocator(32, bs)
    kv = FakeKV(alloc)
    prompt = list(range(3 * bs))
    a = make_seq(prompt)
    admit(alloc, a)
    kv.compute(a, len(prompt))
    assert all(alloc.is_cached(x) for x in a.block_table)
    b = make_seq(prompt)
    cached = admit(alloc, b)
    assert cached == 2 * bs and b.num_uncomputed_tokens == bs  # never the whole prompt
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    kv.compute(b, bs)
    assert not alloc.is_cached(b.block_table[2])  # duplicate content: not registered twice
    assert kv.read(b, len(prompt)) == prompt
    # one extra token: the three full blocks are all reusable
    c = make_seq(prompt + [5])
    assert admit(alloc, c) == 3 * bs and c.block_table[:3] == a.block_table
    alloc.check_invariants()


def test_released_blocks_stay_cached_and_are_revived():
    bs = 4
    alloc = BlockAllocator(8, bs)  # 7 usable
    kv = FakeKV(alloc)
    a = make_seq(range(9))  # 3 blocks: 2 full (cached after compute) + 1 partial
    admit(alloc, a)
    kv.compute(a, 9)
    table = list(a.block_table)
    alloc.free(a)
    assert alloc.num_free_blocks == 7 and alloc.num_evictable_blocks == 2
    b = make_seq(list(range(8)) + [42, 43])
    assert alloc.num_blocks_to_allocate(b) == 3  # 2 revived + 1 new
    assert admit(alloc, b) == 8 and b.block_table[:2] == table[:2]
    assert alloc.num_evictable_blocks == 0
    assert kv.read(b, 8) == list(range(8))  # the cached KV is intact
    alloc.check_invariants()


def test_lru_eviction_order():
    bs = 4
    alloc = BlockAllocator(4, bs)  # 3 usable
    kv = FakeKV(alloc)
    seqs = []
    for k in range(3):
        s = make_seq([k] * bs)  # exactly one full block each
        admit(alloc, s)
        kv.compute(s, bs)
        seqs.append(s)
    blocks = [s.block_table[0] for s in seqs]
    for s in seqs:
        alloc.free(s)  # released in order 0, 1, 2
    assert alloc.num_evictable_blocks == 3 and alloc.num_free_blocks == 3

    # Re-use seq 0's block (hit), release it again: it becomes most recently used.
    s0 = make_seq([0] * bs + [7])
    assert admit(alloc, s0) == bs and s0.block_table[0] == blocks[0]
    assert alloc.num_free_blocks == 1  # s0's partial second block consumed seq 1's entry
    assert not alloc.is_cached(blocks[1]) and alloc.is_cached(blocks[2])
    assert alloc.stats.num_evictions == 1
    alloc.free(s0)  # released: the partial block to the free list, blocks[0] to the LRU tail

    order = []
    for _ in range(3):
        s = make_seq([50 + len(order)] * 3)  # partial blocks: taken, never cached
        admit(alloc, s)
        order.append(s.block_table[0])
    # plain free block first, then LRU: seq 2's block, then seq 0's (refreshed) block
    assert order[1:] == [blocks[2], blocks[0]]
    assert alloc.stats.num_evictions == 3
    alloc.check_invariants()


def test_tail_blocks_of_a_freed_sequence_are_evicted_first():
    bs = 4
    alloc = BlockAllocator(4, bs)  # 3 usable
    kv = FakeKV(alloc)
    a = make_seq(range(3 * bs))
    admit(alloc, a)
    kv.compute(a, 3 * bs)
    table = list(a.block_table)
    alloc.free(a)
    b = make_seq([77])
    admit(alloc, b)  # needs one block: evicts the last block of a's prefix
    assert b.block_table == [table[2]]
    alloc.free(b)
    c = make_seq(list(range(3 * bs)))
    assert admit(alloc, c) == 2 * bs and c.block_table[:2] == table[:2]  # head still cached


def test_free_list_preferred_over_eviction():
    alloc = BlockAllocator(6, 4)  # 5 usable
    kv = FakeKV(alloc)
    a = make_seq(range(4))
    admit(alloc, a)
    kv.compute(a, 4)
    alloc.free(a)
    for k in range(4):
        admit(alloc, make_seq([200 + k]))
    assert alloc.num_evictable_blocks == 1 and alloc.stats.num_evictions == 0
    admit(alloc, make_seq([300]))
    assert alloc.num_evictable_blocks == 0 and alloc.stats.num_evictions == 1


def test_prefix_caching_disabled():
    alloc = BlockAllocator(8, 4, enable_prefix_caching=False)
    kv = FakeKV(alloc)
    a = make_seq(range(9))
    admit(alloc, a)
    kv.compute(a, 9)
    assert not any(alloc.is_cached(b) for b in a.block_table)
    alloc.free(a)
    assert alloc.num_evictable_blocks == 0 and alloc.num_free_blocks == 7
    b = make_seq(range(9))
    assert admit(alloc, b) == 0
    assert alloc.stats.prefix_cache_queries == 0
    alloc.check_invariants()


def test_hash_collision_detected_by_token_compare():
    bs = 4
    alloc = BlockAllocator(16, bs)
    kv = FakeKV(alloc)
    a = make_seq([1, 2, 3, 4, 5])
    admit(alloc, a)
    kv.compute(a, 5)
    b = make_seq([9, 9, 9, 9, 5])
    h = hash((None, (9, 9, 9, 9)))
    alloc._cached[h] = a.block_table[0]  # forge a collision: same hash, other tokens
    assert admit(alloc, b) == 0 and b.block_table[0] != a.block_table[0]


def test_reset_prefix_cache():
    alloc = BlockAllocator(8, 4)
    kv = FakeKV(alloc)
    a = make_seq(range(9))
    admit(alloc, a)
    kv.compute(a, 9)
    alloc.free(a)
    assert alloc.reset_prefix_cache() == 2
    assert alloc.num_evictable_blocks == 0 and admit(alloc, make_seq(range(9))) == 0
    alloc.check_invariants()


# ---------------------------------------------------------------------------- randomized
_PREFIXES = ((0,) * 16, (0, 1) * 8, (1, 1, 0, 1, 0, 0, 1, 0) * 2)  # shared prompt heads


class AllocatorMachine(RuleBasedStateMachine):
    """Random allocate / compute (append + CoW) / sample / fork / free / evict sequences.

    A fake device stores token ids in the slots, so besides the allocator's own
    invariants we check the strongest property: every live sequence reads back exactly
    its computed tokens through its block table, and every cached block holds the tokens
    it is registered under.
    """

    @initialize(
        num_blocks=st.integers(2, 14),
        bs=st.sampled_from([4, 2, 1]),
        caching=st.booleans(),
    )
    def setup(self, num_blocks, bs, caching):
        self.alloc = BlockAllocator(num_blocks, bs, enable_prefix_caching=caching)
        self.kv = FakeKV(self.alloc)
        self.live: list[Sequence] = []

    def _pick(self, i: int) -> Sequence:
        return self.live[i % len(self.live)]

    @rule(
        shared=st.sampled_from(_PREFIXES),
        k=st.integers(0, 16),
        tail=st.lists(st.integers(0, 1), min_size=0, max_size=6),
    )
    def allocate(self, shared, k, tail):
        prompt = list(shared[:k]) + tail
        if not prompt:
            return
        seq = make_seq(prompt)
        can = self.alloc.can_allocate(seq)
        if can:
            cached = admit(self.alloc, seq)
            assert cached % self.alloc.block_size == 0 and cached < seq.num_tokens
            self.live.append(seq)
        else:
            with pytest.raises(NoFreeBlocksError):
                self.alloc.allocate(seq)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 99), n=st.integers(1, 6))
    def compute(self, i, n):
        seq = self._pick(i)
        n = min(n, seq.num_uncomputed_tokens)
        if n == 0:
            return
        if self.alloc.can_append(seq, n):
            self.kv.compute(seq, n)
        else:
            with pytest.raises(NoFreeBlocksError):
                self.alloc.append_slots(seq, n)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 99))
    def prefill(self, i):
        seq = self._pick(i)
        n = seq.num_uncomputed_tokens
        if n and self.alloc.can_append(seq, n):
            self.kv.compute(seq, n)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 99), tok=st.integers(0, 1))
    def decode(self, i, tok):
        """Sample a token (if all are computed) and write it (if there is room)."""
        seq = self._pick(i)
        if seq.num_uncomputed_tokens == 0:
            seq.append_token(tok)
        if seq.num_uncomputed_tokens == 1 and self.alloc.can_append(seq, 1):
            self.kv.compute(seq, 1)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 99), tok=st.none() | st.integers(0, 1))
    def fork(self, i, tok):
        parent = self._pick(i)
        if parent.num_uncomputed_tokens > 1:
            return
        child = parent.fork(next(_ids))
        self.alloc.fork(parent, child)
        if tok is not None and parent.num_uncomputed_tokens == 1 and parent.num_output_tokens:
            child.replace_last_token(tok)
        self.live.append(child)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 99), tok=st.integers(0, 1), child_first=st.booleans())
    def fork_and_diverge(self, i, tok, child_first):
        """n > 1 sampling: fork, give parent and child different next tokens, write both."""
        parent = self._pick(i)
        if parent.num_uncomputed_tokens != 0:
            return
        child = parent.fork(next(_ids))
        self.alloc.fork(parent, child)
        self.live.append(child)
        parent.append_token(tok)
        child.append_token(1 - tok)
        for seq in (child, parent) if child_first else (parent, child):
            if self.alloc.can_append(seq, 1):
                self.kv.compute(seq, 1)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 99))
    def free(self, i):
        seq = self._pick(i)
        self.live.remove(seq)
        self.alloc.free(seq)

    @rule(go=st.integers(0, 7))
    def free_all(self, go):
        if go:  # rarely: let the pool fill up first
            return
        for seq in self.live:
            self.alloc.free(seq)
        self.live.clear()
        a = self.alloc
        assert a.num_free_blocks == a.num_usable_blocks == len(a._free) + a.num_evictable_blocks
        assert a.usage == 0.0
        if not a.enable_prefix_caching:
            assert a.num_evictable_blocks == 0

    @invariant()
    def consistent(self):
        if not hasattr(self, "alloc"):
            return
        a = self.alloc
        a.check_invariants()  # ref counts match tables, >= 0, free/evictable/used disjoint...
        assert a.num_free_blocks + a.num_used_blocks == a.num_usable_blocks
        for seq in self.live:
            assert all(0 < b < a.num_blocks for b in seq.block_table)
            assert len(seq.block_table) == a.num_blocks_for_tokens(seq.num_tokens) or (
                len(seq.block_table) >= a.num_blocks_for_tokens(seq.num_computed_tokens)
            )
            assert self.kv.read(seq, seq.num_computed_tokens) == seq.token_ids[: seq.num_computed_tokens]
        bs = a.block_size
        for blk in a._blocks:
            if blk.hash is not None:
                assert self.kv.slots[blk.block_id * bs : (blk.block_id + 1) * bs] == list(blk.token_ids)


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@pytest.mark.parametrize("seed", range(6))
def test_allocator_random_walk(seed):
    """Long random walks over the same rules (Hypothesis runs are short; this adds volume)."""
    rng = random.Random(seed)
    m = AllocatorMachine()
    m.setup(num_blocks=rng.randint(4, 16), bs=rng.choice([2, 4, 8]), caching=seed % 3 != 2)
    rules = [
        lambda: m.allocate(
            rng.choice(_PREFIXES), rng.randint(0, 16), [rng.randint(0, 1) for _ in range(rng.randint(0, 6))]
        ),
        lambda: m.live and m.compute(rng.randrange(99), rng.randint(1, 6)),
        lambda: m.live and m.prefill(rng.randrange(99)),
        lambda: m.live and m.decode(rng.randrange(99), rng.randint(0, 1)),
        lambda: m.live and m.fork(rng.randrange(99), rng.choice([None, 0, 1])),
        lambda: m.live and m.fork_and_diverge(rng.randrange(99), rng.randint(0, 1), rng.random() < 0.5),
        lambda: m.live and m.free(rng.randrange(99)),
        lambda: m.free_all(rng.randrange(30)),
    ]
    weights = [3, 2, 2, 4, 1, 2, 2, 1]
    for _ in range(1500):
        rng.choices(rules, weights)[0]()
        m.consistent()
    m.free_all(0)
    assert m.alloc.stats.num_cow_copies > 0
    if m.alloc.enable_prefix_caching:
        assert m.alloc.stats.prefix_cache_hits > 0 and m.alloc.stats.num_evictions > 0
