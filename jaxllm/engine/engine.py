"""`LLMEngine`: continuous batching over a paged KV cache.

One :meth:`LLMEngine.step` is three calls:

1. ``Scheduler.schedule()`` picks this step's tokens (decodes first, then prefill chunks,
   admitting waiting requests, preempting the newest ones when the page pool is full);
   the engine then plans the step (:meth:`LLMEngine._plan`): the rows to sample and, for a
   decode-only batch that needs no host work between tokens, look-ahead pages so the
   device runs ``num_scheduler_steps`` tokens in one dispatch;
2. ``ModelRunner.execute`` runs ONE jitted step and returns the sampled ids;
3. ``OutputProcessor.process`` appends them, forks n > 1 children / advances beams, checks
   stops and returns a :class:`RequestOutput` for every request that changed.

With a ``speculative_config`` the engine first asks its proposer for draft tokens for
the sequences about to decode (:meth:`LLMEngine._propose`: adaptive per-request ``k``,
switched off when the batch is large); the scheduler turns those decodes into verifies,
the runner verifies them in the same step as everything else, and the processor appends
the kept tokens (docs/spec.md).

Requests are validated completely (:meth:`LLMEngine.prepare_request`) before anything
touches the scheduler or the pool, so a bad request never disturbs the others;
:meth:`LLMEngine.abort` frees every page of a request at once.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Iterable, Sequence

import jax.numpy as jnp

from jaxllm.attention import resolve_impl
from jaxllm.cache.block_allocator import BlockAllocator
from jaxllm.cache.page_pool import PagePool
from jaxllm.config import ModelConfig
from jaxllm.engine.config import EngineConfig
from jaxllm.engine.output_processor import OutputProcessor, RequestState
from jaxllm.engine.runner import ModelRunner, RowParams, SampleRow
from jaxllm.engine.scheduler import Scheduler, SchedulerOutput
from jaxllm.engine.sequence import SequenceStatus
from jaxllm.outputs import RequestOutput
from jaxllm.sampling import SamplingParams, per_prompt
from jaxllm.spec.controller import SpecStats, Speculator
from jaxllm.spec.proposer import Draft, DraftRequest, TargetModel, build_proposer
from jaxllm.tokenizer import encode_prompt

__all__ = ["EngineConfig", "EngineStats", "LLMEngine", "StepPlan"]


@dataclasses.dataclass
class EngineStats:
    steps: int = 0
    dispatches: int = 0
    multi_step_dispatches: int = 0
    prefill_tokens: int = 0  # prompt (and recompute) tokens computed
    decode_tokens: int = 0  # tokens fed by decode entries (incl. multi-step)
    generated_tokens: int = 0  # tokens appended to sequences
    kv_slots_used: int = 0  # sums over steps (tracked when track_kv_usage)
    kv_slots_allocated: int = 0
    kv_pool_slots: int = 0
    spec: dict[str, SpecStats] = dataclasses.field(default_factory=dict)  # per method


@dataclasses.dataclass
class StepPlan:
    """What the runner needs for one step besides the scheduler's output."""

    rows: list[list[SampleRow]]  # per scheduled entry: the rows it samples
    prompt_lp: list[int]  # per entry: prompt log-probs top-k (-1: none)
    prompt_next_ids: list[list[int] | None]  # per entry: the prompt token after each fed one
    num_steps: int = 1  # tokens per dispatch
    extra_copies: Any = ()  # copy-on-write copies of the look-ahead reservation
    block_tables: list[tuple[int, ...]] | None = None  # tables after it (None: no look-ahead)
    draft_probs: list[Any] | None = None  # per entry: a verify's draft distributions or None


class LLMEngine:
    """Continuous-batching engine over a paged KV cache (see the module docstring).

    Args:
        params: model parameters (per-layer list: unrolled; stacked dict: scanned).
        cfg: the model's :class:`ModelConfig`.
        tokenizer: for text prompts, detokenization and stop strings (None: ids only).
        eos_token_ids: end-of-sequence ids (default: the tokenizer's, else the config's).
        config: :class:`EngineConfig`, or its fields as keyword arguments.
        model: a ``sharding.ShardedModel`` (tensor / pipeline parallel, dp=1) with
            ``params`` placed by it (``sharding.setup``); the page pool is then sharded
            over its mesh (kv heads over ``tensor``, layers over ``pipeline``).
    """

    def __init__(self, params, cfg: ModelConfig, *, tokenizer=None,
                 eos_token_ids: Sequence[int] | None = None,
                 config: EngineConfig | None = None, model: Any = None,
                 **kwargs: Any) -> None:
        config = EngineConfig.resolve(cfg, config, **kwargs)
        spec = config.speculative_config
        self.config = config
        self.cfg = cfg
        self.params = params
        self.tokenizer = tokenizer
        if eos_token_ids is None:
            tok_eos = tokenizer.eos_token_ids if tokenizer is not None else ()
            eos_token_ids = tok_eos or cfg.eos_token_ids
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.max_model_len = config.max_model_len
        if model is not None and model.dp != 1:
            raise ValueError("LLMEngine runs one data-parallel replica: build its model on a "
                             "dp=1 mesh (sharding.data_parallel.replica_meshes; "
                             "jaxllm.engine.DataParallelEngine runs one engine per replica)")
        if model is not None and model.cfg != cfg:
            raise ValueError("LLMEngine: model= was built for a different ModelConfig than cfg")
        stacked = isinstance(params["layers"], dict)
        dtype = config.kv_cache_dtype or jnp.dtype(params["embed"].dtype).name
        self.pool = PagePool.create(cfg, page_size=config.page_size, num_pages=config.num_pages,
                                    memory_utilization=config.memory_utilization, dtype=dtype,
                                    stacked=stacked, max_model_len=config.max_model_len,
                                    max_pages=config.max_num_seqs * -(-config.max_model_len
                                                                      // config.page_size) + 1,
                                    model=model, impl=config.attention_impl)
        self.allocator = BlockAllocator(self.pool.num_pages, config.page_size,
                                        config.enable_prefix_caching)
        self.scheduler = Scheduler(self.allocator, config.max_num_seqs,
                                   config.max_num_batched_tokens, config.enable_chunked_prefill)
        self.runner = ModelRunner(params, cfg, self.pool, max_model_len=config.max_model_len,
                                  max_num_seqs=config.max_num_seqs,
                                  max_num_batched_tokens=config.max_num_batched_tokens,
                                  impl=resolve_impl(config.attention_impl),
                                  min_stop_width=len(self.eos_token_ids),
                                  num_scheduler_steps=config.num_scheduler_steps,
                                  num_speculative_tokens=spec.num_speculative_tokens
                                  if spec is not None else 0)
        self.stats = EngineStats(kv_pool_slots=self.pool.num_slots)
        self.speculator: Speculator | None = None
        self._hidden: dict[int, Any] = {}  # seq id -> state of its last token (draft heads)
        self._asked: set[int] = set()  # sequences offered to the proposer this step
        if spec is not None:
            target = TargetModel(params, cfg, config.max_model_len, config.page_size,
                                 resolve_impl(config.attention_impl), self.pool.num_pages,
                                 config.max_num_seqs, config.max_num_batched_tokens,
                                 jnp.dtype(params["embed"].dtype).name)
            self.use_speculator(Speculator(spec, build_proposer(spec, target), cfg.vocab_size))
        self.track_kv_usage = False
        self.processor = OutputProcessor(self.scheduler, tokenizer, self.eos_token_ids,
                                         cfg.vocab_size, self.stats, seed=config.seed)
        self._ids = itertools.count()
        self.request_id_prefix = "req"  # data-parallel replicas make theirs distinct

    def use_speculator(self, speculator: Speculator | None) -> None:
        """Speculate with ``speculator`` from the next step on (None: stop).  Its draft
        width must not exceed the configured ``num_speculative_tokens`` (the verify
        programs' width)."""
        if speculator is not None:
            if speculator.max_tokens > self.runner.num_speculative_tokens:
                raise ValueError(f"num_speculative_tokens={speculator.max_tokens} exceeds the "
                                 f"engine's {self.runner.num_speculative_tokens}")
            self.stats.spec[speculator.method] = speculator.stats
        self.speculator = speculator
        self.runner.return_hidden = speculator is not None and speculator.needs_hidden
        self.runner.lookup_n = speculator.lookup_n if speculator is not None else 0
        draft_layers = getattr(speculator.proposer, "draft_layers", 0) if speculator else 0
        if draft_layers and self.runner.pool.model is not None:
            raise ValueError("early_exit drafts inside the target's step on one device; "
                             "this engine's model is sharded over a mesh")
        self.runner.draft_layers = draft_layers
        if speculator is not None:
            self.runner.speculates = speculator.speculates

    # ------------------------------------------------------------------ requests

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    def has_unfinished_requests(self) -> bool:
        """Requests running, or finished ones whose outputs the next step returns."""
        return self.processor.has_unfinished()

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.processor.requests)

    def new_request_id(self) -> str:
        return f"{self.request_id_prefix}-{next(self._ids)}"

    def add_request(self, request_id: str | None, prompt: str | Sequence[int],
                    sampling_params: SamplingParams | None = None, *,
                    prompt_token_ids: Sequence[int] | None = None) -> str:
        """Queue a request (``prompt``: text or token ids; ``prompt_token_ids`` skips the
        tokenizer for a text prompt).  Raises ValueError/TypeError for a bad request without
        changing any state; returns the request id (``None``: one is made up)."""
        req = self.prepare_request(request_id, prompt, sampling_params,
                                   prompt_token_ids=prompt_token_ids)
        return self.add_prepared(req)

    def prepare_request(self, request_id: str | None, prompt: str | Sequence[int],
                        sampling_params: SamplingParams | None = None, *,
                        prompt_token_ids: Sequence[int] | None = None) -> RequestState:
        """Validate a request and build its state without queueing it (engine state is
        untouched: e.g. validate on one thread, :meth:`add_prepared` on the engine's)."""
        sp = sampling_params if sampling_params is not None else SamplingParams()
        if not isinstance(sp, SamplingParams):
            raise TypeError(f"sampling_params must be SamplingParams, got {type(sp).__name__}")
        request_id = self.new_request_id() if request_id is None else str(request_id)
        if request_id in self.processor.requests:
            raise ValueError(f"request {request_id!r} already exists")
        if isinstance(prompt, str) and prompt_token_ids is not None:
            text = prompt  # tokenized already: check the ids
            _, ids = encode_prompt(prompt_token_ids, self.tokenizer, self.cfg.vocab_size,
                                   self.max_model_len)
        else:
            text, ids = encode_prompt(prompt, self.tokenizer, self.cfg.vocab_size,
                                      self.max_model_len)
        width = sp.best_of or sp.n
        if width > self.config.max_num_seqs:
            raise ValueError(f"n/best_of ({width}) exceeds max_num_seqs "
                             f"({self.config.max_num_seqs})")
        blocks = -(-len(ids) // self.config.page_size)
        if blocks > self.allocator.num_usable_blocks:
            raise ValueError(f"prompt of {len(ids)} tokens needs {blocks} KV pages, the pool "
                             f"has {self.allocator.num_usable_blocks}")
        max_out = min(sp.max_tokens, self.max_model_len - len(ids))
        return self.processor.new_request(request_id, text, ids, sp, max_out)

    def add_prepared(self, request: RequestState) -> str:
        """Queue a request from :meth:`prepare_request`; returns its id."""
        self.processor.add(request)
        return request.request_id

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free all its pages; its final output (finish_reason
        ``"abort"``) comes with the next :meth:`step`.  False if it is unknown/finished."""
        return self.processor.abort(request_id)

    # ------------------------------------------------------------------ stepping

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; return the outputs of every request that changed
        (finished ones with ``finished=True``)."""
        drafts = self._propose()
        batch = self.scheduler.schedule({sid: d.token_ids for sid, d in drafts.items()})
        outputs = self.processor.on_schedule(batch)
        if batch.is_empty:
            return outputs
        self.stats.steps += 1
        plan = self._plan(batch, drafts)
        try:
            result = self.runner.execute(batch, plan.rows, prompt_lp=plan.prompt_lp,
                                         prompt_next_ids=plan.prompt_next_ids,
                                         num_steps=plan.num_steps,
                                         extra_copies=plan.extra_copies,
                                         block_tables=plan.block_tables,
                                         draft_probs=plan.draft_probs)
        except Exception:
            self._fail_all(batch, "engine step failed")
            raise
        self._count_dispatch(batch, plan)
        if result.drafts is not None:
            _fill_drafts(batch, result.drafts)
        self._record_verifies(batch, result)
        if result.hidden is not None:
            self._hidden.update((e.seq_id, h) for e, h in zip(batch.scheduled_seqs,
                                                              result.hidden) if h is not None)
        outputs += self.processor.process(batch, plan.rows, result)
        if self.track_kv_usage:
            self._track_kv()
        return outputs

    def _propose(self) -> dict[int, Draft]:
        """Drafts for the sequences about to decode (``{seq_id: Draft}``): none without a
        speculator or when the batch is large enough that verifying costs more than it
        saves; a draft never runs past a request's ``max_tokens`` (or the context limit)."""
        spec = self.speculator
        self._asked = set()
        if spec is None:
            return {}
        gone = [sid for sid in spec.tracked() if (s := self.scheduler.get_seq(sid)) is None
                or s.status is not SequenceStatus.RUNNING]
        spec.release(gone)  # finished or preempted
        for sid in [sid for sid in self._hidden if (s := self.scheduler.get_seq(sid)) is None
                    or s.status is not SequenceStatus.RUNNING]:
            del self._hidden[sid]
        seqs = self.scheduler.decoding_seqs()
        if not seqs or not spec.enabled_for(len(seqs)):
            return {}
        asks = []
        for s in seqs:
            req = self.processor.requests.get(s.request_id)
            if req is None or not self.processor.can_speculate(req):
                continue
            k = min(spec.max_tokens, req.max_out - s.num_output_tokens - 1)
            hidden = self._hidden.get(s.seq_id)
            if k >= 1 and (hidden is not None or not spec.needs_hidden):
                row = req.rows[req.index.get(s.seq_id, 0)]
                asks.append(DraftRequest(s.seq_id, s.token_ids, k, row.temperature, row.seed,
                                         s.num_output_tokens, hidden))
        self._asked = {r.seq_id for r in asks}
        return spec.propose(asks)

    def _record_verifies(self, batch: SchedulerOutput, result) -> None:
        """Tell the speculator how many drafted tokens each verify kept."""
        if self.speculator is None or not batch.num_verify_tokens:
            return
        self.speculator.stats.spec_steps += 1
        for e, toks in zip(batch.scheduled_seqs, result.tokens):
            if e.draft_ids:
                self.speculator.record(e.seq_id, len(e.draft_ids), len(toks[0]) - 1)

    def _plan(self, batch: SchedulerOutput, drafts: dict[int, Draft] | None = None) -> StepPlan:
        """The rows to sample; for a decode-only batch also the multi-step look-ahead."""
        plan = StepPlan(*self.processor.sample_rows(batch))
        if batch.num_verify_tokens:
            plan.draft_probs = [drafts[e.seq_id].probs if e.draft_ids else None
                                for e in batch.scheduled_seqs]
        if batch.num_prefill_tokens or batch.num_verify_tokens:
            return plan
        allow, plan.extra_copies, plan.block_tables = self._reserve_lookahead(batch, plan.rows)
        # decode-only steps always run the k-token program (one compiled shape per batch
        # bucket); a row's allowance stops it, 1 when no look-ahead was reserved
        plan.num_steps = self.config.num_scheduler_steps
        watch = self._watched(batch) if allow > 1 else set()
        plan.rows = [[r._replace(max_new=min(allow, r.max_new),
                                 lookup_ids=self.scheduler.get_seq(e.seq_id).token_ids
                                 if e.seq_id in watch else ()) for r in rs]
                     for e, rs in zip(batch.scheduled_seqs, plan.rows)]
        return plan

    def _watched(self, batch: SchedulerOutput) -> set[int]:
        """Sequences of a decode-only batch whose multi-token decode should stop once they
        could be drafted (prompt lookup finds a match): the proposer had nothing for them
        now but will be asked again next step."""
        spec = self.speculator
        if spec is None or not spec.lookup_n:
            return set()
        return {e.seq_id for e in batch.scheduled_seqs
                if e.seq_id in self._asked and spec.will_ask(e.seq_id)}

    def _reserve_lookahead(self, batch: SchedulerOutput, rows: list[list[SampleRow]]):
        """``(tokens per row allowed, extra copies, block tables)`` for a decode-only batch:
        several tokens per dispatch unless beam search needs the host after each, or a
        waiting request could be admitted now (it would wait for the whole dispatch)."""
        k = self.config.num_scheduler_steps
        none = (1, (), None)
        if k <= 1 or not batch.scheduled_seqs or self.processor.uses_beam_search(batch):
            return none
        sched = self.scheduler
        if sched.waiting:
            seats = sum(g.max_num_running_seqs for g in sched.running)
            if seats + sched.waiting[0].max_num_running_seqs <= sched.max_num_seqs:
                return none
        want = {e.seq_id: max(1, min(k, rs[0].max_new))
                for e, rs in zip(batch.scheduled_seqs, rows)}
        if max(want.values()) <= 1:
            return none
        copies = sched.reserve_lookahead(batch, want)
        if copies is None:
            return none
        tables = [tuple(sched.get_seq(e.seq_id).block_table) for e in batch.scheduled_seqs]
        return k, copies, tables

    def _count_dispatch(self, batch: SchedulerOutput, plan: StepPlan) -> None:
        self.stats.dispatches += 1
        self.stats.multi_step_dispatches += plan.block_tables is not None
        self.stats.prefill_tokens += batch.num_prefill_tokens

    def _fail_all(self, batch: SchedulerOutput, why: str) -> None:
        """The device step raised: the pool's contents are gone.  Every in-flight request
        ends (finish_reason "abort"), and cached prefix blocks are dropped."""
        self.processor.fail_all(why)
        self.scheduler.discard(batch)
        self.allocator.reset_prefix_cache()

    # ------------------------------------------------------------------ metrics

    def _track_kv(self) -> None:
        """Add this step's used / allocated KV slots (distinct pages) to the stats."""
        ps = self.config.page_size
        filled: dict[int, int] = {}
        for g in self.scheduler.running:
            for s in g.seqs:
                if s.status is not SequenceStatus.RUNNING:
                    continue
                n = s.num_computed_tokens
                for j, b in enumerate(s.block_table):
                    f = min(ps, max(0, n - j * ps))
                    if f > filled.get(b, -1):
                        filled[b] = f
        self.stats.kv_slots_used += sum(filled.values())
        self.stats.kv_slots_allocated += len(filled) * ps

    def kv_utilization(self) -> float:
        """Time-averaged used slots / slots in allocated pages (1.0 = no waste)."""
        s = self.stats
        return s.kv_slots_used / s.kv_slots_allocated if s.kv_slots_allocated else 0.0

    # ------------------------------------------------------------------ conveniences

    def generate(self, prompts: Sequence[str | Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 *, prompt_token_ids: Sequence[Sequence[int] | None] | None = None
                 ) -> list[RequestOutput]:
        """Run ``prompts`` to completion next to whatever else is queued; outputs in prompt
        order.  All requests are validated before any is queued (errors name the prompt);
        if stepping raises (or is interrupted), the requests are aborted.
        ``prompt_token_ids[i]`` skips tokenizing text prompt ``i``."""
        sps = per_prompt(sampling_params, len(prompts))
        ids = list(prompt_token_ids) if prompt_token_ids is not None else [None] * len(prompts)
        reqs = []
        for i, (p, sp, tok) in enumerate(zip(prompts, sps, ids)):
            try:
                reqs.append(self.prepare_request(None, p, sp, prompt_token_ids=tok))
            except (ValueError, TypeError) as e:
                raise type(e)(f"prompt {i}: {e}") from None
        return self._run_to_completion([self.add_prepared(r) for r in reqs])

    def _run_to_completion(self, request_ids: list[str]) -> list[RequestOutput]:
        """Step until every one of ``request_ids`` finished; their final outputs in order."""
        want = {rid: i for i, rid in enumerate(request_ids)}
        results: list[RequestOutput | None] = [None] * len(request_ids)
        try:
            while any(r is None for r in results):
                for o in self.step():
                    if o.finished and o.request_id in want:
                        results[want[o.request_id]] = o
        except BaseException:
            for rid in request_ids:
                self.abort(rid)
            raise
        return results  # type: ignore[return-value]

    def warmup(self, num_steps: Iterable[int] | None = None) -> int:
        """Compile the greedy programs of every reachable bucket now (instead of on first
        use); returns how many step shapes were run.  Writes only into the null page."""
        steps = sorted(set(num_steps or {self.config.num_scheduler_steps}))
        return self.runner.warmup(RowParams(stop_ids=self.eos_token_ids), steps)


def _fill_drafts(batch: SchedulerOutput, drafts: Sequence[tuple[int, ...] | None]) -> None:
    """Put the drafts a step made on device (early exit) in place of the placeholders its
    verify entries were scheduled with, so that the scheduler checks and appends the kept
    ones as it does any proposer's."""
    for i, (e, d) in enumerate(zip(batch.scheduled_seqs, drafts)):
        if d is not None and e.draft_ids:
            assert len(d) == len(e.draft_ids), (e, d)
            batch.scheduled_seqs[i] = dataclasses.replace(
                e, draft_ids=d, token_ids=e.token_ids[:len(e.token_ids) - len(d)] + d)
