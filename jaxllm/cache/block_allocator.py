"""Host-side allocator for the paged KV cache: blocks, ref counts, copy-on-write, prefix cache.

The device holds one page pool per layer, ``[num_blocks, block_size, kv_heads, head_dim]``.
This module decides which page ("block", in vLLM's vocabulary) every token of every sequence
lives in. It is plain Python and never touches device memory; what the model runner needs
from it each step is:

* ``seq.block_table``: the list of block ids holding the sequence's tokens, in order
  (token at position ``p`` lives in block ``block_table[p // block_size]``, offset
  ``p % block_size``);
* the slot mapping for the tokens written this step (:func:`compute_slot_mapping`);
* the pending copy-on-write copies (:meth:`BlockAllocator.take_pending_copies`), to apply
  on device *before* the step that writes into the destination blocks.

Block 0 is reserved as the *null block*: it is never handed to a sequence, so it is the
place to point padding (block-table padding, slot mapping of padding tokens:
:data:`PAD_SLOT_ID`). ``num_blocks`` is therefore the device pool size, and
``num_blocks - 1`` blocks are usable.

Automatic prefix caching: a *full* block whose tokens have all been computed is registered
under a hash chained over ``(parent block hash, tuple(block tokens))``. A later sequence
whose prompt starts with the same tokens reuses those blocks (ref count + 1) instead of
recomputing them. Blocks whose ref count drops to 0 keep their hash and contents and sit in
an LRU list; they are evicted (unhashed, reused) only when the pool runs out of plain free
blocks.

The per-sequence state the allocator reads and writes lives on the sequence object
(see :class:`jaxllm.engine.sequence.Sequence`): ``seq_id``, ``token_ids``,
``num_computed_tokens``, ``block_table`` (written here) and ``block_hashes`` (a memo of the
chained hashes of the sequence's full blocks, written here).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Protocol, Sequence as Seq

import numpy as np

__all__ = [
    "NULL_BLOCK_ID",
    "PAD_SLOT_ID",
    "AllocatorStats",
    "BlockAllocator",
    "NoFreeBlocksError",
    "compute_slot_mapping",
]

#: Reserved block that is never given to a sequence; padding may point at it.
NULL_BLOCK_ID = 0
#: Slot for padding tokens (a slot inside the null block): writes there are harmless.
PAD_SLOT_ID = 0


class NoFreeBlocksError(RuntimeError):
    """Raised when an allocation is attempted without enough free blocks.

    Callers are expected to ask :meth:`BlockAllocator.can_allocate` /
    :meth:`BlockAllocator.can_append` first (the scheduler does).
    """


class SeqLike(Protocol):
    """What the allocator needs from a sequence (``jaxllm.engine.sequence.Sequence`` fits)."""

    seq_id: int
    num_computed_tokens: int
    block_table: list[int]
    block_hashes: list[int]

    @property
    def token_ids(self) -> Seq[int]: ...


def slot_mapping_array(tables: np.ndarray, positions: np.ndarray, block_size: int) -> np.ndarray:
    """Flat KV-pool slot of each token: ``tables[i]`` is the block table of the sequence
    of token ``i`` (``[N, W]``), ``positions [N]`` its position.

    ``slot = table[pos // block_size] * block_size + pos % block_size``; the device
    writes the K/V of the token at ``pos`` to ``pages.reshape(-1, ...)[slot]``.
    """
    positions = np.asarray(positions, np.int64)
    blocks = np.take_along_axis(np.asarray(tables), (positions // block_size)[:, None], 1)[:, 0]
    return (blocks * block_size + positions % block_size).astype(np.int32)


def compute_slot_mapping(block_table: Seq[int], block_size: int, start: int, end: int) -> list[int]:
    """Flat KV-pool slot of every position in ``[start, end)`` of one sequence (see
    :func:`slot_mapping_array`)."""
    if start < 0 or end < start:
        raise ValueError(f"bad position range [{start}, {end})")
    if end > len(block_table) * block_size:
        raise ValueError(
            f"positions up to {end} need {-(-end // block_size)} blocks, "
            f"block table has {len(block_table)}"
        )
    if start == end:
        return []
    pos = np.arange(start, end)
    table = np.asarray(block_table, np.int64)[None].repeat(len(pos), 0)
    return slot_mapping_array(table, pos, block_size).tolist()


@dataclass
class AllocatorStats:
    """Counters since construction. Prefix-cache counters are in tokens, as in vLLM."""

    prefix_cache_queries: int = 0  # tokens of sequences passed to allocate() (caching on)
    prefix_cache_hits: int = 0  # of those, tokens served from cached blocks
    num_evictions: int = 0  # cached ref-0 blocks reclaimed for new data
    num_cow_copies: int = 0  # copy-on-write block copies recorded

    @property
    def hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


class _Block:
    __slots__ = ("block_id", "ref_count", "hash", "parent_hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None  # set while registered in the prefix cache
        self.parent_hash: int | None = None  # key parts, compared on lookup (hash collisions)
        self.token_ids: tuple[int, ...] | None = None

    def reset_hash(self) -> None:
        self.hash = None
        self.parent_hash = None
        self.token_ids = None


class BlockAllocator:
    """Paged-KV block allocator with ref counts, copy-on-write and automatic prefix caching.

    Args:
        num_blocks: pages in the device pool, including the reserved null block 0.
        block_size: tokens per page; must be a power of two.
        enable_prefix_caching: keep computed full blocks hashed for reuse by later
            sequences. When off, blocks go straight back to the free list when released.

    Block states (every usable block is in exactly one):
        *free* (unhashed, on the free list), *in use* (ref count > 0, possibly hashed),
        *evictable* (ref count 0 but hashed: still a prefix-cache entry, LRU-ordered).
    ``num_free_blocks`` counts free + evictable: both can be handed out.

    Typical life of a sequence::

        n_cached = alloc.allocate(seq)          # whole current token list gets blocks
        seq.num_computed_tokens = n_cached      # skip the cached prefix
        ... each step:
        alloc.append_slots(seq, n)              # room (and CoW) for tokens [c, c+n)
        copies = alloc.take_pending_copies()    # device: pages[dst] = pages[src] first
        ... device writes the step ...
        seq.num_computed_tokens += n
        alloc.commit_tokens(seq)                # newly full blocks join the prefix cache
        alloc.free(seq)
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if block_size <= 0 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is reserved), got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.stats = AllocatorStats()
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(1, num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # LRU first
        self._cached: dict[int, int] = {}  # block hash -> block id
        self._tables: dict[int, list[int]] = {}  # seq_id -> block table (same list as seq.block_table)
        self._num_committed: dict[int, int] = {}  # seq_id -> leading blocks already committed
        self._pending_copies: list[tuple[int, int]] = []

    # ------------------------------------------------------------------ queries
    @property
    def num_usable_blocks(self) -> int:
        """Blocks that can ever be allocated (``num_blocks - 1``: the null block is reserved)."""
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        """Blocks available to allocate now: free list + evictable cached blocks."""
        return len(self._free) + len(self._evictable)

    @property
    def num_evictable_blocks(self) -> int:
        """Ref-count-0 blocks still holding a prefix-cache entry."""
        return len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.num_usable_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of usable blocks referenced by sequences (0.0 .. 1.0)."""
        return self.num_used_blocks / self.num_usable_blocks

    def ref_count(self, block_id: int) -> int:
        return self._blocks[block_id].ref_count

    def is_cached(self, block_id: int) -> bool:
        """Whether the block is registered in the prefix cache."""
        return self._blocks[block_id].hash is not None

    def num_blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_block_table(self, seq_id: int) -> list[int]:
        return self._tables[seq_id]

    def has_blocks(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def slot_mapping(self, seq: SeqLike, start: int, end: int) -> list[int]:
        """Flat slot indices for positions ``[start, end)`` of ``seq`` (see :func:`compute_slot_mapping`)."""
        return compute_slot_mapping(self._tables[seq.seq_id], self.block_size, start, end)

    # ------------------------------------------------------------------ new sequences
    def num_blocks_to_allocate(self, seq: SeqLike, use_prefix_cache: bool = True) -> int:
        """How many of ``num_free_blocks`` :meth:`allocate` would consume for ``seq``."""
        hits = self._lookup(seq) if use_prefix_cache else []
        n_new = self.num_blocks_for_tokens(len(seq.token_ids)) - len(hits)
        n_revived = sum(1 for b in hits if self._blocks[b].ref_count == 0)
        return n_new + n_revived

    def can_allocate(self, seq: SeqLike, use_prefix_cache: bool = True) -> bool:
        return self.num_blocks_to_allocate(seq, use_prefix_cache) <= self.num_free_blocks

    def allocate(self, seq: SeqLike, use_prefix_cache: bool = True) -> int:
        """Give ``seq`` blocks for all of its current tokens; return ``num_cached_tokens``.

        The longest prefix of full blocks found in the prefix cache is reused (ref count
        + 1); the rest gets fresh blocks. The returned count is a multiple of
        ``block_size`` and always < ``len(seq.token_ids)``: when the whole token list is
        cached, the last block is recomputed (into a fresh block) so the step that
        finishes the prompt produces logits.

        Works for new prompts and for recompute after preemption (prompt + outputs).
        ``use_prefix_cache=False`` skips the lookup (every token is computed: e.g. a request
        that wants prompt log-probs); the blocks are still registered once computed.
        """
        if seq.seq_id in self._tables:
            raise ValueError(f"sequence {seq.seq_id} already has blocks")
        num_tokens = len(seq.token_ids)
        if num_tokens == 0:
            raise ValueError("cannot allocate an empty sequence")
        hits = self._lookup(seq) if use_prefix_cache else []
        n_new = self.num_blocks_for_tokens(num_tokens) - len(hits)
        n_revived = sum(1 for b in hits if self._blocks[b].ref_count == 0)
        if n_new + n_revived > self.num_free_blocks:
            raise NoFreeBlocksError(
                f"sequence {seq.seq_id} needs {n_new + n_revived} blocks, {self.num_free_blocks} free"
            )
        table: list[int] = []
        for b in hits:  # take hits first so that fresh allocations cannot evict them
            self._incref(b)
            table.append(b)
        for _ in range(n_new):
            table.append(self._take_free_block())
        self._tables[seq.seq_id] = table
        seq.block_table = table
        self._num_committed[seq.seq_id] = len(hits)
        num_cached = len(hits) * self.block_size
        if self.enable_prefix_caching:
            self.stats.prefix_cache_queries += num_tokens
            self.stats.prefix_cache_hits += num_cached
        return num_cached

    # ------------------------------------------------------------------ growing sequences
    def num_blocks_to_append(self, seq: SeqLike, num_new_tokens: int = 1) -> int:
        """Free blocks :meth:`append_slots` would consume: new blocks + copy-on-write copies."""
        table = self._tables[seq.seq_id]
        start = seq.num_computed_tokens
        need = self.num_blocks_for_tokens(start + num_new_tokens)
        cow = sum(
            1
            for i in range(start // self.block_size, min(len(table), need))
            if self._blocks[table[i]].ref_count > 1
        )
        return max(0, need - len(table)) + cow

    def num_blocks_to_append_all(self, seqs: Seq[SeqLike], num_new_tokens: int = 1) -> int:
        """Like :meth:`num_blocks_to_append` for several sequences appended together.

        Exact when they share blocks (forked siblings): a block held ``r`` times and
        written by ``w`` of them needs ``min(w, r - 1)`` copies, not ``w``.
        """
        bs = self.block_size
        new = 0
        writers: dict[int, int] = {}
        for seq in seqs:
            table = self._tables[seq.seq_id]
            start = seq.num_computed_tokens
            need = self.num_blocks_for_tokens(start + num_new_tokens)
            new += max(0, need - len(table))
            for i in range(start // bs, min(len(table), need)):
                writers[table[i]] = writers.get(table[i], 0) + 1
        cow = sum(min(w, self._blocks[b].ref_count - 1) for b, w in writers.items())
        return new + cow

    def can_append(self, seq: SeqLike, num_new_tokens: int = 1) -> bool:
        return self.num_blocks_to_append(seq, num_new_tokens) <= self.num_free_blocks

    def append_slots(self, seq: SeqLike, num_new_tokens: int = 1) -> None:
        """Make positions ``[num_computed_tokens, num_computed_tokens + num_new_tokens)`` writable.

        Allocates blocks past the end of the table as needed, and applies copy-on-write
        to every block in that range that is shared (ref count > 1): the sequence gets a
        fresh block, the other holders keep the old one, and ``(old, new)`` is queued for
        :meth:`take_pending_copies`. Call it before every step that writes KV for ``seq``.
        """
        if num_new_tokens <= 0:
            raise ValueError("num_new_tokens must be positive")
        if self.num_blocks_to_append(seq, num_new_tokens) > self.num_free_blocks:
            raise NoFreeBlocksError(f"sequence {seq.seq_id}: not enough free blocks to append")
        table = self._tables[seq.seq_id]
        start = seq.num_computed_tokens
        need = self.num_blocks_for_tokens(start + num_new_tokens)
        for i in range(start // self.block_size, min(len(table), need)):
            src = table[i]
            if self._blocks[src].ref_count > 1:
                dst = self._take_free_block()
                self._blocks[src].ref_count -= 1  # still >= 1: the other holders keep it
                table[i] = dst
                self._pending_copies.append((src, dst))
                self.stats.num_cow_copies += 1
        while len(table) < need:
            table.append(self._take_free_block())

    def take_pending_copies(self) -> list[tuple[int, int]]:
        """Return and clear the ``(src_block, dst_block)`` copies queued by copy-on-write.

        Apply them on device before the next step writes KV. No block is the destination
        of two copies, and copies are listed in the order they were made, so either
        applying them in order or as one gather-then-scatter
        (``pages.at[dsts].set(pages[srcs])``) is correct.
        """
        copies, self._pending_copies = self._pending_copies, []
        return copies

    def fork(self, parent: SeqLike, child: SeqLike) -> None:
        """Let ``child`` share all of ``parent``'s blocks (ref counts + 1).

        Used for n > 1 sampling and beam search. The first write into a shared block by
        either sequence triggers copy-on-write in :meth:`append_slots`.
        """
        if child.seq_id in self._tables:
            raise ValueError(f"sequence {child.seq_id} already has blocks")
        table = list(self._tables[parent.seq_id])
        for b in table:
            self._blocks[b].ref_count += 1
        self._tables[child.seq_id] = table
        child.block_table = table
        if child.block_hashes is not parent.block_hashes:
            child.block_hashes[:] = parent.block_hashes
        self._num_committed[child.seq_id] = self._num_committed[parent.seq_id]

    def free(self, seq: SeqLike) -> None:
        """Release all of ``seq``'s blocks (no-op when it has none).

        Blocks are released last-first, so that among cached blocks the tail of a prefix
        is evicted before its head.
        """
        table = self._tables.pop(seq.seq_id, None)
        if table is None:
            return
        del self._num_committed[seq.seq_id]
        for b in reversed(table):
            self._decref(b)
        seq.block_table = []

    def truncate(self, seq: SeqLike, num_tokens: int) -> None:
        """Release ``seq``'s blocks past those its first ``num_tokens`` tokens need (slots
        written for rejected speculative tokens, or unused look-ahead), last first as
        :meth:`free` does.  Committed (hashed) blocks are never released this way."""
        table = self._tables[seq.seq_id]
        keep = self.num_blocks_for_tokens(num_tokens)
        if keep < self._num_committed[seq.seq_id]:
            raise ValueError(f"cannot truncate sequence {seq.seq_id} to {num_tokens} tokens: "
                             f"its first {self._num_committed[seq.seq_id]} blocks are "
                             f"committed to the prefix cache")
        while len(table) > keep:
            self._decref(table.pop())

    # ------------------------------------------------------------------ prefix cache
    def commit_tokens(self, seq: SeqLike, num_computed_tokens: int | None = None) -> None:
        """Register the sequence's newly *full and computed* blocks in the prefix cache.

        Call after a step has written KV, with the new ``num_computed_tokens`` (defaults
        to ``seq.num_computed_tokens``). Only blocks whose ``block_size`` tokens are all
        computed are registered; the partial last block never is. A block whose hash is
        already registered by another block stays unhashed (no de-duplication).
        """
        if not self.enable_prefix_caching:
            return
        n = seq.num_computed_tokens if num_computed_tokens is None else num_computed_tokens
        table = self._tables[seq.seq_id]
        full = min(n // self.block_size, len(table))
        start = self._num_committed[seq.seq_id]
        if full <= start:
            return
        hashes = self._block_hashes(seq, full)
        tokens = seq.token_ids
        bs = self.block_size
        for i in range(start, full):
            blk = self._blocks[table[i]]
            h = hashes[i]
            if blk.hash is None and h not in self._cached:
                blk.hash = h
                blk.parent_hash = hashes[i - 1] if i else None
                blk.token_ids = tuple(tokens[i * bs : (i + 1) * bs])
                self._cached[h] = blk.block_id
        self._num_committed[seq.seq_id] = full

    def reset_prefix_cache(self) -> int:
        """Drop every evictable cached block back to the free list; return how many.

        Blocks in use keep their hashes.
        """
        n = len(self._evictable)
        while self._evictable:
            b, _ = self._evictable.popitem(last=False)
            self._uncache(b)
            self._free.append(b)
        return n

    # ------------------------------------------------------------------ debugging
    def check_invariants(self) -> None:
        """Assert the allocator's internal consistency (for tests; O(num_blocks))."""
        refs = [0] * self.num_blocks
        for table in self._tables.values():
            for b in table:
                assert 0 < b < self.num_blocks, f"invalid block id {b} in a table"
                refs[b] += 1
        free = set(self._free)
        evictable = set(self._evictable)
        assert len(free) == len(self._free), "duplicate on the free list"
        assert not free & evictable, "block both free and evictable"
        assert NULL_BLOCK_ID not in free and NULL_BLOCK_ID not in evictable
        assert refs[NULL_BLOCK_ID] == 0 and self._blocks[NULL_BLOCK_ID].ref_count == 0
        for blk in self._blocks[1:]:
            b = blk.block_id
            assert blk.ref_count >= 0, f"block {b} has negative ref count"
            assert blk.ref_count == refs[b], f"block {b}: ref {blk.ref_count}, held {refs[b]} times"
            in_pool = (b in free) + (b in evictable)
            assert in_pool == (blk.ref_count == 0), f"block {b}: ref {blk.ref_count}, free={b in free}"
            if b in free:
                assert blk.hash is None, f"free block {b} still hashed"
            if b in evictable:
                assert blk.hash is not None, f"evictable block {b} not hashed"
            if blk.hash is not None:
                assert self._cached.get(blk.hash) == b, f"block {b} hash not registered"
        for h, b in self._cached.items():
            assert self._blocks[b].hash == h
        for src, dst in self._pending_copies:
            assert self._blocks[dst].ref_count > 0, "pending copy into a released block"
        if not self.enable_prefix_caching:
            assert not self._cached and not self._evictable

    # ------------------------------------------------------------------ internals
    def _block_hashes(self, seq: SeqLike, num_blocks: int) -> list[int]:
        """Extend ``seq.block_hashes`` (chained full-block hashes) to ``num_blocks`` entries."""
        hashes = seq.block_hashes
        if len(hashes) < num_blocks:
            tokens = seq.token_ids
            bs = self.block_size
            parent = hashes[-1] if hashes else None
            for i in range(len(hashes), num_blocks):
                parent = hash((parent, tuple(tokens[i * bs : (i + 1) * bs])))
                hashes.append(parent)
        return hashes

    def _lookup(self, seq: SeqLike) -> list[int]:
        """Block ids of the longest cached full-block prefix, leaving >= 1 token uncached."""
        if not self.enable_prefix_caching or not self._cached:
            return []
        tokens = seq.token_ids
        bs = self.block_size
        max_blocks = (len(tokens) - 1) // bs
        hashes = seq.block_hashes
        hits: list[int] = []
        parent = None
        for i in range(max_blocks):
            if i >= len(hashes):
                self._block_hashes(seq, i + 1)
            h = hashes[i]
            b = self._cached.get(h)
            if b is None:
                break
            blk = self._blocks[b]
            if blk.parent_hash != parent or blk.token_ids != tuple(tokens[i * bs : (i + 1) * bs]):
                break  # hash collision
            hits.append(b)
            parent = h
        return hits

    def _take_free_block(self) -> int:
        if self._free:
            b = self._free.popleft()
        elif self._evictable:
            b, _ = self._evictable.popitem(last=False)  # least recently released
            self._uncache(b)
            self.stats.num_evictions += 1
        else:
            raise NoFreeBlocksError("KV block pool exhausted")
        self._blocks[b].ref_count = 1
        return b

    def _incref(self, b: int) -> None:
        blk = self._blocks[b]
        if blk.ref_count == 0:
            del self._evictable[b]
        blk.ref_count += 1

    def _decref(self, b: int) -> None:
        blk = self._blocks[b]
        blk.ref_count -= 1
        if blk.ref_count < 0:
            raise RuntimeError(f"block {b} released more times than referenced")
        if blk.ref_count == 0:
            if self._pending_copies:  # a copy into a released block is pointless
                self._pending_copies = [c for c in self._pending_copies if c[1] != b]
            if blk.hash is not None:
                self._evictable[b] = None  # most recently released: evicted last
            else:
                self._free.append(b)

    def _uncache(self, b: int) -> None:
        blk = self._blocks[b]
        if blk.hash is not None and self._cached.get(blk.hash) == b:
            del self._cached[blk.hash]
        blk.reset_hash()
