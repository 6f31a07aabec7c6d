"""Host-side pieces the engine added to the scheduler: multi-step look-ahead, token pop
(beam search), and admission without prefix-cache lookups (prompt log-probs).

Reuses the fake paged runner of tests/test_scheduler.py: it reads the context back
through the block tables, so a wrong look-ahead page or slot changes the tokens."""

from __future__ import annotations

import pytest

from jaxllm.cache import BlockAllocator, compute_slot_mapping
from jaxllm.engine import Scheduler, SequenceStatus
from test_scheduler import FakeRunner, check_output, make_requests, next_token, reference


def run_multi_step(sched: Scheduler, requests: dict, k: int):
    """Like test_scheduler.run, but decode-only steps produce up to ``k`` tokens."""
    runner = FakeRunner(sched.allocator)
    bs = sched.allocator.block_size
    for rid, (prompt, _) in requests.items():
        sched.add_request(rid, prompt)
    results, multi = {}, 0
    while sched.has_unfinished_requests():
        out = sched.schedule()
        check_output(sched, out)
        want = {}
        if out.num_prefill_tokens == 0 and out.scheduled_seqs:
            for e in out.scheduled_seqs:
                seq = sched.get_seq(e.seq_id)
                want[e.seq_id] = min(k, requests[seq.request_id][1] - seq.num_output_tokens)
            copies = sched.reserve_lookahead(out, want)
            if copies is None:  # the pool cannot take it: one token this step
                want = {}
            else:
                assert copies == []
            sched.allocator.check_invariants()
        first = runner.execute(out)
        extra = {}
        for e, t in zip(out.scheduled_seqs, first):
            n = want.get(e.seq_id, 1)
            toks, pos = [t], e.end_pos
            table = sched.get_seq(e.seq_id).block_table
            while len(toks) < n:  # the device: write the last token, sample the next
                runner.kv[compute_slot_mapping(table, bs, pos, pos + 1)[0]] = toks[-1]
                ctx = [runner.kv[s] for s in compute_slot_mapping(table, bs, 0, pos + 1)]
                toks.append(next_token(ctx))
                pos += 1
            extra[e.seq_id] = toks[1:]
            multi += len(toks) > 1
        new = sched.update(out, first)
        for seq in new:
            sched.extend_decoded(seq.seq_id, extra.get(seq.seq_id, []))
            m = requests[seq.request_id][1]
            if seq.num_output_tokens >= m:
                results[seq.request_id] = list(seq.output_token_ids[:m])
                sched.finish_seq(seq.seq_id, SequenceStatus.FINISHED_LENGTH)
    assert sched.allocator.num_free_blocks == sched.allocator.num_usable_blocks
    return results, multi


@pytest.mark.parametrize("k", [2, 5])
@pytest.mark.parametrize("num_blocks", [40, 12])
def test_lookahead_decode_matches_reference(k, num_blocks):
    reqs = make_requests(5, prompt_len=lambda i: 3 + 2 * i, max_tokens=11)
    sched = Scheduler(BlockAllocator(num_blocks, 4), max_num_seqs=4, max_num_batched_tokens=16)
    res, multi = run_multi_step(sched, reqs, k)
    assert multi > 0
    assert num_blocks > 12 or sched.num_preemptions > 0
    assert res == {rid: reference(p, m) for rid, (p, m) in reqs.items()}


def test_lookahead_is_all_or_nothing():
    alloc = BlockAllocator(6, 4, enable_prefix_caching=False)
    sched = Scheduler(alloc, max_num_seqs=2, max_num_batched_tokens=16)
    sched.add_request("a", [1, 2, 3])
    sched.update(sched.schedule(), [4])
    out = sched.schedule()  # decode at position 3 (block 0 has room)
    free = alloc.num_free_blocks
    assert sched.reserve_lookahead(out, {out.scheduled_seqs[0].seq_id: 100}) is None
    assert alloc.num_free_blocks == free
    assert sched.reserve_lookahead(out, {out.scheduled_seqs[0].seq_id: 6}) == []
    assert alloc.num_free_blocks == free - 2  # positions 3..8 span 3 blocks


def test_pop_token_and_uncached_admission():
    sched = Scheduler(BlockAllocator(32, 4), 4, 64)
    g = sched.add_request("a", list(range(10)))
    out = sched.schedule()
    sched.update(out, [7])
    seq = g.seqs[0]
    assert seq.pop_token() == 7 and seq.num_uncomputed_tokens == 0
    with pytest.raises(ValueError):
        seq.pop_token()
    assert sched.schedule().is_empty  # nothing to feed: the sequence waits
    seq.append_token(8)
    sched.update(sched.schedule(), [9])
    sched.finish_seq(seq.seq_id)
    # the prompt is cached now; a request may opt out of the lookup
    g2 = sched.add_request("b", list(range(10)), use_prefix_cache=False)
    out = sched.schedule()
    assert g2.seqs[0].num_cached_tokens == 0
    g3 = sched.add_request("c", list(range(10)))
    sched.abort("b")
    sched.discard(out)
    sched.schedule()
    assert g3.seqs[0].num_cached_tokens == 8
