"""Paged KV cache: host-side block allocator (device page pools live with the model runner)."""

from jaxllm.cache.block_allocator import (
    NULL_BLOCK_ID,
    PAD_SLOT_ID,
    AllocatorStats,
    BlockAllocator,
    NoFreeBlocksError,
    compute_slot_mapping,
)

__all__ = [
    "NULL_BLOCK_ID",
    "PAD_SLOT_ID",
    "AllocatorStats",
    "BlockAllocator",
    "NoFreeBlocksError",
    "compute_slot_mapping",
]
