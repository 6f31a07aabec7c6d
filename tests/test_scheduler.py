"""Scheduler: decode-first batching, chunked prefill, recompute preemption, prefix reuse, abort.

A fake model runner keeps a paged "KV cache" of token ids: it applies the CoW copies,
writes each step's tokens through the slot mapping, and "samples" the next token as a
deterministic function of the context it *reads back through the block table*. So a
wrong block table, slot mapping, copy or prefix hit changes the generated tokens, and
every run can be compared with plain greedy generation.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from jaxllm.cache import BlockAllocator, compute_slot_mapping
from jaxllm.engine import Scheduler, SchedulerOutput, SequenceStatus

VOCAB = 97


def next_token(context) -> int:
    return hash(tuple(context)) % VOCAB


def reference(prompt, max_tokens, first=None) -> list[int]:
    """Greedy generation without any cache; ``first`` overrides the first sampled token."""
    toks = list(prompt)
    out = []
    for k in range(max_tokens):
        t = first if (k == 0 and first is not None) else next_token(toks)
        toks.append(t)
        out.append(t)
    return out


class FakeRunner:
    def __init__(self, alloc: BlockAllocator) -> None:
        self.bs = alloc.block_size
        self.kv: list[int | None] = [None] * (alloc.num_blocks * alloc.block_size)
        self.fed: dict[int, list[tuple[int, int]]] = {}  # seq_id -> [(position, token)] fed
        self.num_copies = 0

    def execute(self, out: SchedulerOutput) -> list[int | None]:
        bs = self.bs
        pages = [self.kv[s * bs : (s + 1) * bs] for s, _ in out.blocks_to_copy]
        for (_, d), page in zip(out.blocks_to_copy, pages):
            self.kv[d * bs : (d + 1) * bs] = page
        self.num_copies += len(out.blocks_to_copy)
        for slot, tok in zip(out.slot_mapping(), out.input_ids()):
            self.kv[slot] = tok
        sampled: list[int | None] = []
        for e in out.scheduled_seqs:
            self.fed.setdefault(e.seq_id, []).extend(zip(e.positions, e.token_ids))
            if e.do_sample:
                ctx = [self.kv[s] for s in compute_slot_mapping(e.block_table, bs, 0, e.end_pos)]
                sampled.append(next_token(ctx))
            else:
                sampled.append(None)
        return sampled


def check_output(sched: Scheduler, out: SchedulerOutput) -> None:
    """Properties every step must have."""
    assert out.num_scheduled_tokens <= sched.max_num_batched_tokens
    assert out.num_seqs <= sched.max_num_seqs
    assert out.num_scheduled_tokens == len(out.input_ids()) == len(out.positions()) == len(out.slot_mapping())
    flags = [e.is_prefill for e in out.scheduled_seqs]
    assert flags == sorted(flags), "decodes must come before prefills"
    assert out.num_decode_tokens == flags.count(False)
    assert len({e.seq_id for e in out.scheduled_seqs}) == out.num_seqs
    assert len(set(out.slot_mapping())) == len(out.slot_mapping()), "two tokens write the same slot"
    for e in out.scheduled_seqs:
        seq = sched.get_seq(e.seq_id)
        assert e.num_tokens >= 1 and e.start_pos == seq.num_computed_tokens
        assert e.do_sample == (e.end_pos == seq.num_tokens)
        assert tuple(seq.token_ids[e.start_pos : e.end_pos]) == e.token_ids
        if not e.is_prefill:
            assert e.num_tokens == 1 and e.do_sample
    sched.allocator.check_invariants()


def run(sched: Scheduler, requests: dict, *, arrivals: dict | None = None, n: dict | None = None,
        max_steps: int = 5000):
    """Drive the scheduler like an engine. ``requests``: id -> (prompt, max_tokens).

    ``arrivals``: id -> step at which it is added (default 0). ``n``: id -> number of
    parallel samples (the extra ones are forked after the first token, with first tokens
    ``t + 1, t + 2, ...``). Returns ({seq key: output tokens}, stats).
    """
    runner = FakeRunner(sched.allocator)
    arrivals = arrivals or {}
    n = n or {}
    results: dict[tuple[str, int], list[int]] = {}
    stats = {"preempted": [], "steps": 0, "max_tokens_step": 0}
    pending = sorted(requests, key=lambda r: arrivals.get(r, 0))
    branch: dict[int, int] = {}  # seq_id -> branch index within its request
    step = 0
    while pending or sched.has_unfinished_requests():
        while pending and arrivals.get(pending[0], 0) <= step:
            rid = pending.pop(0)
            g = sched.add_request(rid, requests[rid][0], n=n.get(rid, 1))
            branch[g.seqs[0].seq_id] = 0
        out = sched.schedule()
        check_output(sched, out)
        stats["preempted"] += out.preempted_request_ids
        stats["max_tokens_step"] = max(stats["max_tokens_step"], out.num_scheduled_tokens)
        new = sched.update(out, runner.execute(out))
        for seq in list(new):
            rid = seq.request_id
            if seq.num_output_tokens == 1 and branch[seq.seq_id] == 0:
                for k in range(1, n.get(rid, 1)):
                    child = sched.fork_seq(seq.seq_id, new_token_id=(seq.last_token_id + k) % VOCAB)
                    branch[child.seq_id] = k
                    new.append(child)  # it got its first token too
        for seq in new:
            if seq.num_output_tokens >= requests[seq.request_id][1]:
                results[(seq.request_id, branch[seq.seq_id])] = list(seq.output_token_ids)
                sched.finish_seq(seq.seq_id, SequenceStatus.FINISHED_LENGTH)
        step += 1
        assert step < max_steps, "no progress"
    stats["steps"] = step
    stats["fed"] = runner.fed
    stats["copies"] = runner.num_copies
    assert sched.allocator.num_free_blocks == sched.allocator.num_usable_blocks
    return results, stats


def expected(requests: dict, n: dict | None = None) -> dict:
    n = n or {}
    res = {}
    for rid, (prompt, m) in requests.items():
        base = reference(prompt, m)
        res[(rid, 0)] = base
        for k in range(1, n.get(rid, 1)):
            res[(rid, k)] = reference(prompt, m, first=(base[0] + k) % VOCAB)
    return res


def make_requests(num, prompt_len, max_tokens, shared_prefix=0):
    reqs = {}
    for i in range(num):
        L = prompt_len(i) if callable(prompt_len) else prompt_len
        prompt = [(7 * j + 3) % VOCAB for j in range(min(shared_prefix, L))]
        prompt += [(13 * i + 5 * j + 1) % VOCAB for j in range(L - len(prompt))]
        reqs[f"r{i}"] = (prompt, max_tokens)
    return reqs


# ---------------------------------------------------------------------------- basics
def test_single_request_prefill_then_decode():
    alloc = BlockAllocator(16, 4)
    sched = Scheduler(alloc, max_num_seqs=4, max_num_batched_tokens=32)
    g = sched.add_request("a", [1, 2, 3, 4, 5])
    out = sched.schedule()
    (e,) = out.scheduled_seqs
    assert (e.token_ids, e.start_pos, e.do_sample, e.is_prefill) == ((1, 2, 3, 4, 5), 0, True, True)
    assert out.num_prefill_tokens == 5 and out.num_decode_tokens == 0
    assert out.query_start_loc() == [0, 5] and out.seq_lens() == [5] and out.logits_indices() == [4]
    assert out.slot_mapping() == compute_slot_mapping(e.block_table, 4, 0, 5)
    assert sched.update(out, {e.seq_id: 42}) == g.seqs
    out = sched.schedule()
    (e,) = out.scheduled_seqs
    assert (e.token_ids, e.start_pos, e.do_sample, e.is_prefill) == ((42,), 5, True, False)
    assert out.num_decode_tokens == 1 and out.positions() == [5]
    sched.update(out, [43])
    assert g.seqs[0].output_token_ids == [42, 43] and g.seqs[0].num_computed_tokens == 6


def test_schedule_requires_update_between_steps():
    sched = Scheduler(BlockAllocator(16, 4), 4, 32)
    sched.add_request("a", [1, 2, 3])
    sched.schedule()
    with pytest.raises(RuntimeError):
        sched.schedule()
    empty = Scheduler(BlockAllocator(16, 4), 4, 32).schedule()
    assert empty.is_empty and empty.num_scheduled_tokens == 0


def test_decodes_come_before_prefills():
    alloc = BlockAllocator(64, 4)
    sched = Scheduler(alloc, max_num_seqs=8, max_num_batched_tokens=64)
    sched.add_request("old0", [1, 2, 3])
    sched.add_request("old1", [4, 5, 6, 7, 8])
    out = sched.schedule()
    sched.update(out, [10, 11])
    sched.add_request("new", list(range(20, 30)))
    out = sched.schedule()
    assert [(e.request_id, e.is_prefill, e.num_tokens) for e in out.scheduled_seqs] == [
        ("old0", False, 1),
        ("old1", False, 1),
        ("new", True, 10),
    ]
    assert out.num_decode_tokens == 2 and out.num_prefill_tokens == 10


def test_add_request_validation():
    sched = Scheduler(BlockAllocator(5, 4), max_num_seqs=2, max_num_batched_tokens=8)  # 16 tokens of KV
    with pytest.raises(ValueError, match="KV blocks"):
        sched.add_request("big", list(range(17)))
    sched.add_request("fits", list(range(16)))
    with pytest.raises(ValueError, match="already exists"):
        sched.add_request("fits", [1])
    with pytest.raises(ValueError, match="empty"):
        sched.add_request("empty", [])
    with pytest.raises(ValueError, match="n=3"):
        sched.add_request("wide", [1], n=3)
    nochunk = Scheduler(BlockAllocator(64, 4), 2, 8, enable_chunked_prefill=False)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        nochunk.add_request("long", list(range(9)))


# ---------------------------------------------------------------------------- chunked prefill
@pytest.mark.parametrize("budget", [1, 7, 64])
def test_chunked_prefill_budget_and_exact_coverage(budget):
    reqs = make_requests(3, prompt_len=lambda i: [100, 9, 40][i], max_tokens=5)
    reqs["r0"] = (list(range(100)), 5)
    alloc = BlockAllocator(128, 8)
    sched = Scheduler(alloc, max_num_seqs=4, max_num_batched_tokens=budget)
    res, stats = run(sched, reqs, arrivals={"r1": 2, "r2": 3})
    assert res == expected(reqs)
    assert stats["max_tokens_step"] <= budget
    assert not stats["preempted"]
    # Every token was fed exactly once, in order: the prompt, then all outputs but the last.
    for i, (rid, (prompt, m)) in enumerate(reqs.items()):
        fed = stats["fed"][i]  # seq ids are assigned in add order
        assert [p for p, _ in fed] == list(range(len(prompt) + m - 1))
        assert [t for _, t in fed] == list(prompt) + res[(rid, 0)][:-1]


def test_chunks_do_not_sample_until_prompt_end():
    sched = Scheduler(BlockAllocator(64, 4), max_num_seqs=4, max_num_batched_tokens=7)
    g = sched.add_request("a", list(range(20)))
    chunks = []
    while not g.seqs[0].output_token_ids:
        out = sched.schedule()
        (e,) = out.scheduled_seqs
        chunks.append((e.start_pos, e.num_tokens, e.do_sample))
        sched.update(out, [99])
    assert chunks == [(0, 7, False), (7, 7, False), (14, 6, True)]
    assert g.seqs[0].status is SequenceStatus.RUNNING


def test_chunked_prefill_does_not_stall_decodes():
    sched = Scheduler(BlockAllocator(256, 8), max_num_seqs=4, max_num_batched_tokens=16)
    sched.add_request("short", [1, 2, 3])
    out = sched.schedule()
    sched.update(out, [5])
    sched.add_request("long", list(range(200)))
    for _ in range(5):
        out = sched.schedule()
        assert out.scheduled_seqs[0].request_id == "short" and not out.scheduled_seqs[0].is_prefill
        assert out.num_decode_tokens == 1 and out.num_prefill_tokens == 15
        sched.update(out, [7] * out.num_seqs)


def test_no_chunking_admits_whole_prompts_only():
    reqs = make_requests(4, prompt_len=lambda i: 5 + 3 * i, max_tokens=4)
    sched = Scheduler(BlockAllocator(64, 4), max_num_seqs=4, max_num_batched_tokens=16, enable_chunked_prefill=False)
    res, stats = run(sched, reqs)
    assert res == expected(reqs)
    for fed in stats["fed"].values():
        assert fed[0][0] == 0


# ---------------------------------------------------------------------------- preemption
def test_preemption_on_tiny_pool_matches_big_pool():
    reqs = make_requests(5, prompt_len=lambda i: 6 + 2 * i, max_tokens=14)
    big_res, big_stats = run(Scheduler(BlockAllocator(256, 4), 8, 64), reqs)
    assert not big_stats["preempted"]
    for caching in (True, False):
        alloc = BlockAllocator(9, 4, enable_prefix_caching=caching)  # 8 usable blocks = 32 tokens
        sched = Scheduler(alloc, max_num_seqs=8, max_num_batched_tokens=64)
        res, stats = run(sched, reqs)
        assert stats["preempted"], "the pool is too small not to preempt"
        assert sched.num_preemptions == len(stats["preempted"])
        assert res == big_res == expected(reqs)


def test_preempted_request_goes_to_front_and_victim_is_newest():
    alloc = BlockAllocator(5, 4)  # 4 usable blocks
    sched = Scheduler(alloc, max_num_seqs=4, max_num_batched_tokens=64)
    sched.add_request("a", [1, 2, 3, 4, 5, 6, 7, 8])  # 2 blocks
    sched.add_request("b", [9, 10, 11, 12, 13, 14, 15, 16])  # 2 blocks
    sched.add_request("c", [1])  # waits: no blocks left
    out = sched.schedule()
    assert [e.request_id for e in out.scheduled_seqs] == ["a", "b"]
    sched.update(out, [20, 21])
    out = sched.schedule()  # both need a 3rd block: b (newest) is preempted
    assert out.preempted_request_ids == ["b"]
    assert [e.request_id for e in out.scheduled_seqs] == ["a"]
    assert [g.request_id for g in sched.waiting] == ["b", "c"]
    b = sched.get_request("b").seqs[0]
    assert b.status is SequenceStatus.PREEMPTED and b.block_table == [] and b.num_computed_tokens == 0
    assert b.output_token_ids == [21]
    sched.update(out, [22])
    sched.abort("a")
    out = sched.schedule()  # b is recomputed from prompt + output so far
    (e,) = [e for e in out.scheduled_seqs if e.request_id == "b"]
    assert e.token_ids[-1] == 21 and e.end_pos == 9 and e.do_sample


def test_request_outgrowing_the_pool_is_ignored():
    alloc = BlockAllocator(3, 4)  # 8 tokens of KV
    sched = Scheduler(alloc, max_num_seqs=2, max_num_batched_tokens=16)
    g = sched.add_request("a", [1, 2, 3, 4, 5, 6])
    ignored = []
    for _ in range(20):
        out = sched.schedule()
        ignored += out.ignored_request_ids
        if not sched.has_unfinished_requests():
            break
        if not out.is_empty:
            sched.update(out, [7] * out.num_seqs)
    assert ignored == ["a"] and g.seqs[0].status is SequenceStatus.FINISHED_IGNORED
    assert g.seqs[0].num_tokens == 9  # got 3 tokens before it stopped fitting
    assert alloc.num_free_blocks == alloc.num_usable_blocks


# ---------------------------------------------------------------------------- prefix caching
def test_prefix_cache_hit_skips_shared_blocks():
    bs = 4
    alloc = BlockAllocator(64, bs)
    sched = Scheduler(alloc, max_num_seqs=4, max_num_batched_tokens=64)
    prefix = list(range(50, 50 + 3 * bs))
    ga = sched.add_request("a", prefix + [1, 2])
    out = sched.schedule()
    sched.update(out, [0])
    gb = sched.add_request("b", prefix + [3, 4, 5])
    out = sched.schedule()
    (e,) = [e for e in out.scheduled_seqs if e.request_id == "b"]
    assert e.start_pos == 3 * bs and e.token_ids == (3, 4, 5)
    assert gb.seqs[0].num_cached_tokens == 3 * bs
    assert e.block_table[:3] == tuple(ga.seqs[0].block_table[:3])


def test_identical_prompt_recomputes_last_block_and_matches_reference():
    prompt = list(range(16))  # exactly 4 blocks of 4
    reqs = {"a": (prompt, 3), "b": (prompt, 3)}
    sched = Scheduler(BlockAllocator(64, 4), max_num_seqs=4, max_num_batched_tokens=64)
    res, stats = run(sched, reqs, arrivals={"b": 2})
    assert res == expected(reqs)
    b_fed = stats["fed"][1]
    assert b_fed[0][0] == 12  # started at the last block, never at 16
    assert sched.allocator.stats.prefix_cache_hits == 12


# ---------------------------------------------------------------------------- n > 1
def test_parallel_samples_share_prompt_blocks_with_cow():
    reqs = {"a": (list(range(10)), 6), "b": (list(range(30, 37)), 5)}
    n = {"a": 3}
    sched = Scheduler(BlockAllocator(64, 4), max_num_seqs=4, max_num_batched_tokens=64)
    res, stats = run(sched, reqs, n=n)
    assert res == expected(reqs, n)
    assert stats["copies"] == 2  # the shared half-full block, copied for 2 of the 3 sequences
    with pytest.raises(ValueError, match="n=1"):
        s2 = Scheduler(BlockAllocator(64, 4), 4, 64)
        s2.add_request("x", [1, 2])
        out = s2.schedule()
        s2.update(out, [3])
        s2.fork_seq(out.scheduled_seqs[0].seq_id)


def test_parallel_samples_survive_preemption():
    reqs = make_requests(3, prompt_len=lambda i: 5 + i, max_tokens=10)
    n = {"r0": 2, "r2": 2}
    sched = Scheduler(BlockAllocator(11, 4), max_num_seqs=6, max_num_batched_tokens=32)
    res, stats = run(sched, reqs, n=n)
    assert stats["preempted"]
    assert res == expected(reqs, n)


# ---------------------------------------------------------------------------- abort / finish
def test_abort_frees_all_blocks():
    alloc = BlockAllocator(32, 4)
    sched = Scheduler(alloc, max_num_seqs=4, max_num_batched_tokens=8)
    sched.add_request("a", list(range(10)))
    sched.add_request("b", list(range(20, 26)))
    sched.add_request("w", list(range(40, 50)))
    out = sched.schedule()  # a: 8-token chunk; b, w still waiting (budget)
    sched.update(out, [None] * out.num_seqs)
    out = sched.schedule()  # a: last 2 tokens, b: 6 tokens
    assert {e.request_id for e in out.scheduled_seqs} == {"a", "b"}
    a_blocks = set(sched.get_request("a").seqs[0].block_table)
    assert sched.abort("a")  # between schedule() and update(): update skips it
    assert all(alloc.ref_count(b) == 0 for b in a_blocks)
    new = sched.update(out, [1] * out.num_seqs)
    assert [s.request_id for s in new] == ["b"]
    assert sched.abort("w") and sched.get_request("w") is None  # waiting request
    assert sched.abort("b")
    assert not sched.abort("b") and not sched.has_unfinished_requests()
    assert alloc.num_free_blocks == alloc.num_usable_blocks and alloc.usage == 0.0
    assert not sched.running and not sched.waiting
    alloc.check_invariants()


def test_finish_one_of_several_sequences_keeps_request():
    sched = Scheduler(BlockAllocator(32, 4), 4, 32)
    g = sched.add_request("a", list(range(6)), n=2)
    out = sched.schedule()
    sched.update(out, [1])
    child = sched.fork_seq(g.seqs[0].seq_id, new_token_id=2)
    sched.finish_seq(g.seqs[0].seq_id, SequenceStatus.FINISHED_STOPPED)
    assert sched.has_unfinished_requests() and child.status is SequenceStatus.RUNNING
    out = sched.schedule()
    assert [e.seq_id for e in out.scheduled_seqs] == [child.seq_id] and out.blocks_to_copy == []
    sched.update(out, [3])
    sched.finish_seq(child.seq_id, SequenceStatus.FINISHED_LENGTH)
    assert not sched.has_unfinished_requests()
    assert sched.allocator.num_free_blocks == sched.allocator.num_usable_blocks


# ---------------------------------------------------------------------------- randomized
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    bs=st.sampled_from([1, 2, 4, 8]),
    budget=st.integers(1, 40),
    max_num_seqs=st.integers(1, 4),
    chunked=st.booleans(),
    caching=st.booleans(),
)
def test_random_workloads_match_reference(data, bs, budget, max_num_seqs, chunked, caching):
    num = data.draw(st.integers(1, 6), label="num_requests")
    shared = data.draw(st.lists(st.integers(0, 3), min_size=0, max_size=12), label="shared_prefix")
    reqs, arrivals, n = {}, {}, {}
    for i in range(num):
        tail = data.draw(st.lists(st.integers(0, 3), min_size=0 if shared else 1, max_size=12))
        k = data.draw(st.integers(0 if tail else 1, len(shared)))
        reqs[f"r{i}"] = (shared[:k] + tail, data.draw(st.integers(1, 8)))
        arrivals[f"r{i}"] = data.draw(st.integers(0, 6))
        n[f"r{i}"] = data.draw(st.integers(1, min(2, max_num_seqs, budget)))
    # A request must fit alone (all its sequences, recomputed without sharing), or it
    # would be ignored and the outputs could not match.
    longest = max(n[r] * (len(p) + m) for r, (p, m) in reqs.items())
    if not chunked:
        budget = max(budget, longest)  # recompute of prompt + outputs must fit one step
    min_blocks = max(n[r] * -(-(len(p) + m) // bs) for r, (p, m) in reqs.items()) + 1
    num_blocks = data.draw(st.just(min_blocks) | st.integers(min_blocks, min_blocks + 8), label="num_blocks")
    sched = Scheduler(
        BlockAllocator(num_blocks, bs, enable_prefix_caching=caching),
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=budget,
        enable_chunked_prefill=chunked,
    )
    res, _ = run(sched, reqs, arrivals=arrivals, n=n)
    assert res == expected(reqs, n)


@pytest.mark.parametrize("seed", range(8))
def test_tight_pool_workloads_seeded(seed):
    """Many requests, pool just big enough for the largest one: heavy preemption."""
    rng = random.Random(seed)
    bs = rng.choice([2, 4, 8])
    shared = [rng.randrange(4) for _ in range(rng.randint(0, 16))]
    reqs, arrivals, n = {}, {}, {}
    for i in range(rng.randint(6, 10)):
        tail = [rng.randrange(4) for _ in range(rng.randint(1, 12))]
        reqs[f"r{i}"] = (shared[: rng.randint(0, len(shared))] + tail, rng.randint(1, 12))
        arrivals[f"r{i}"] = rng.randint(0, 10)
        n[f"r{i}"] = rng.choice([1, 1, 2])
    min_blocks = max(n[r] * -(-(len(p) + m) // bs) for r, (p, m) in reqs.items()) + 1
    sched = Scheduler(
        BlockAllocator(min_blocks + rng.randint(0, 2), bs, enable_prefix_caching=seed % 2 == 0),
        max_num_seqs=rng.randint(4, 8),
        max_num_batched_tokens=rng.choice([5, 16, 64]),
    )
    res, stats = run(sched, reqs, arrivals=arrivals, n=n)
    assert stats["preempted"]
    assert res == expected(reqs, n)
