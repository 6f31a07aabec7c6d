"""`LLMEngine`: continuous batching over a paged KV cache.

One :meth:`LLMEngine.step`:

1. ``Scheduler.schedule()`` picks this step's tokens (decodes first, then prefill chunks,
   admitting waiting requests, preempting the newest ones when the page pool is full);
2. the engine lists the rows to sample (one per sequence that reaches the end of its
   known tokens; n rows for the first token of an n > 1 request) and, for a decode-only
   batch that needs no host work between tokens, reserves look-ahead pages so the device
   can run ``num_scheduler_steps`` tokens in one dispatch;
3. ``ModelRunner.execute`` runs ONE jitted step and returns the sampled ids;
4. the engine appends them, forks n > 1 children / advances beams, checks stops (EOS,
   stop ids, ``max_tokens``, context limit, stop strings through ``TextTracker``) and
   returns a :class:`RequestOutput` for every request that changed.

Requests are validated completely in :meth:`add_request` before anything touches the
scheduler or the pool, so a bad request never disturbs the others; :meth:`abort` frees
every page of a request at once.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
import time
from typing import Any, Iterable, Sequence

import jax.numpy as jnp

from jaxllm.attention import resolve_impl
from jaxllm.cache.block_allocator import BlockAllocator
from jaxllm.cache.page_pool import PagePool
from jaxllm.config import ModelConfig
from jaxllm.engine.beam import Beam, BeamSearchState
from jaxllm.engine.runner import ModelRunner, RowParams, SampleRow, StepResult
from jaxllm.engine.scheduler import Scheduler, SchedulerOutput
from jaxllm.engine.sequence import Sequence as Seq, SequenceStatus
from jaxllm.outputs import CompletionOutput, RequestOutput, TextTracker
from jaxllm.sampling import SamplingParams, per_prompt
from jaxllm.tokenizer import encode_prompt

__all__ = ["EngineConfig", "LLMEngine"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class EngineConfig:
    """Engine arguments (vLLM's names).

    Attributes:
        max_model_len: context limit (prompt + output) of one sequence.
        page_size: tokens per KV page (power of two).
        num_pages: pages in the pool (incl. the reserved null page); None: from
            ``memory_utilization`` (see :mod:`jaxllm.cache.page_pool`).
        memory_utilization: fraction of device memory the pool may take (after weights).
        kv_cache_dtype: pool dtype ("float32" / "bfloat16"); None: the weights' dtype.
        max_num_seqs: sequences per step (also the largest sample-row bucket).
        max_num_batched_tokens: tokens per step (prefill chunks + decodes).
        enable_prefix_caching: reuse computed prompt blocks across requests.
        enable_chunked_prefill: split long prompts over steps (else a prompt runs whole).
        num_scheduler_steps: decode tokens per dispatch when no request needs the host in
            between (1: always one).
        attention_impl: "auto" | "xla" | "pallas".
        seed: seeds the random seeds of requests that set none.
    """

    max_model_len: int
    page_size: int = 16
    num_pages: int | None = None
    memory_utilization: float = 0.9
    kv_cache_dtype: str | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    num_scheduler_steps: int = 8
    attention_impl: str = "auto"
    seed: int = 0

    @classmethod
    def resolve(cls, cfg: ModelConfig, config: "EngineConfig | None" = None,
                **kwargs: Any) -> "EngineConfig":
        """``config`` with ``kwargs`` applied (no config: the fields from ``kwargs``,
        ``max_model_len`` defaulting to the model's), validated."""
        if config is None:
            kwargs.setdefault("max_model_len", cfg.max_position_embeddings)
            config = cls(**kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        config.validate()
        return config

    def validate(self) -> None:
        def bad(name, why):
            raise ValueError(f"{name} {why}, got {getattr(self, name)!r}")

        if self.max_model_len < 2:
            bad("max_model_len", "must be >= 2")
        if self.max_num_seqs < 1:
            bad("max_num_seqs", "must be >= 1")
        if self.max_num_batched_tokens < 1:
            bad("max_num_batched_tokens", "must be >= 1")
        if self.num_scheduler_steps < 1:
            bad("num_scheduler_steps", "must be >= 1")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"without chunked prefill max_num_batched_tokens ({self.max_num_batched_tokens}) "
                f"must be >= max_model_len ({self.max_model_len}): a whole prompt (or a "
                "preempted sequence's recompute) must fit one step")


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


class _Request:
    """Host-side state of one request."""

    def __init__(self, request_id: str, prompt: str | None, prompt_ids: list[int],
                 params: SamplingParams, max_out: int) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        self.params = params
        self.max_out = max_out
        self.beam: BeamSearchState | None = None
        self.num_seqs = 1
        self.index: dict[int, int] = {}  # seq id -> completion index
        self.rows: list[RowParams] = []  # per completion index
        self.trackers: list[TextTracker] = []
        self.emitted: list[str] = []
        self.logprobs: list[list[dict[int, float]]] | None = None
        self.cum: list[float] = []
        self.forked = False
        self.stop_set: frozenset[int] = frozenset()
        self.prompt_lp_k = -1
        self.prompt_logprobs: list[dict[int, float] | None] | None = None
        self.finished = False
        self.abort_reason: str | None = None
        self.arrival = time.monotonic()


def _lp_ext(parent: Beam, cand) -> list[dict[int, float]] | None:
    if parent.logprobs is None or cand.token_logprobs is None:
        return None
    return parent.logprobs + [cand.token_logprobs]


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
                                    model=model)
        self.allocator = BlockAllocator(self.pool.num_pages, config.page_size,
                                        config.enable_prefix_caching)
        self.scheduler = Scheduler(self.allocator, config.max_num_seqs,
                                   config.max_num_batched_tokens, config.enable_chunked_prefill)
        self.runner = ModelRunner(params, cfg, self.pool, max_model_len=config.max_model_len,
                                  max_num_seqs=config.max_num_seqs,
                                  max_num_batched_tokens=config.max_num_batched_tokens,
                                  impl=resolve_impl(config.attention_impl),
                                  min_stop_width=len(self.eos_token_ids))
        self.stats = EngineStats(kv_pool_slots=self.pool.num_slots)
        self.track_kv_usage = False
        self._rng = random.Random(config.seed)
        self._reqs: dict[str, _Request] = {}
        self._finished_outputs: list[RequestOutput] = []
        self._ids = itertools.count()
        self.request_id_prefix = "req"  # data-parallel replicas make theirs distinct

    # ------------------------------------------------------------------ requests

    @property
    def num_preemptions(self) -> int:
        return self.scheduler.num_preemptions

    def has_unfinished_requests(self) -> bool:
        return bool(self._reqs) or bool(self._finished_outputs)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._reqs)

    def new_request_id(self) -> str:
        return f"{self.request_id_prefix}-{next(self._ids)}"

    def add_request(self, request_id: str | None, prompt: str | Sequence[int],
                    sampling_params: SamplingParams | None = None, *,
                    prompt_token_ids: Sequence[int] | None = None) -> str:
        """Queue a request (``prompt``: text or token ids; ``prompt_token_ids`` skips the
        tokenizer for a text prompt).  Raises ValueError/TypeError for a bad request without
        changing any state; returns the request id (``None``: one is made up)."""
        req = self._prepare(request_id, prompt, sampling_params, prompt_token_ids)
        self._admit(req)
        return req.request_id

    def _prepare(self, request_id: str | None, prompt: str | Sequence[int],
                 sp: SamplingParams | None,
                 prompt_token_ids: Sequence[int] | None = None) -> _Request:
        """Validate and build a request's host state (no side effects)."""
        sp = sp if sp is not None else SamplingParams()
        if not isinstance(sp, SamplingParams):
            raise TypeError(f"sampling_params must be SamplingParams, got {type(sp).__name__}")
        request_id = self.new_request_id() if request_id is None else str(request_id)
        if request_id in self._reqs:
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
        req = _Request(request_id, text, ids, sp, max_out)
        stop_ids = tuple(([] if sp.ignore_eos else list(self.eos_token_ids)) + sp.stop_token_ids)
        req.stop_set = frozenset(stop_ids)
        user_lp = -1 if sp.logprobs is None else sp.logprobs
        if sp.use_beam_search:
            if sp.stop:
                raise ValueError("use_beam_search does not support stop strings")
            if 2 * width > self.cfg.vocab_size:
                raise ValueError(f"beam width {width} is too large for a vocabulary of "
                                 f"{self.cfg.vocab_size}")
            req.beam = BeamSearchState(width, len(ids), stop_ids if not sp.ignore_eos else
                                       sp.stop_token_ids, length_penalty=sp.length_penalty,
                                       ignore_eos=False, keep_logprobs=sp.logprobs is not None)
            req.num_seqs = width
            req.rows = [RowParams(temperature=0.0, min_tokens=sp.min_tokens, stop_ids=stop_ids,
                                  logprobs=max(2 * width, user_lp))]
            if self.tokenizer is not None:
                TextTracker(self.tokenizer, sp)  # validates
        else:
            req.num_seqs = width
            want_cum = width > sp.n
            lp = user_lp if user_lp >= 0 else (0 if want_cum else -1)
            for i in range(width):
                if sp.seed is not None:
                    seed = sp.seed + i if width > 1 else sp.seed
                else:
                    seed = self._rng.getrandbits(32)
                req.rows.append(RowParams(
                    temperature=float(sp.temperature), top_k=int(sp.top_k), top_p=float(sp.top_p),
                    min_p=float(sp.min_p), repetition_penalty=float(sp.repetition_penalty),
                    presence_penalty=float(sp.presence_penalty),
                    frequency_penalty=float(sp.frequency_penalty), seed=int(seed) & 0xFFFFFFFF,
                    min_tokens=int(sp.min_tokens), stop_ids=stop_ids, logprobs=lp))
                req.trackers.append(TextTracker(self.tokenizer, sp))  # raises for bad stops
                req.emitted.append("")
                req.cum.append(0.0)
            if sp.logprobs is not None:
                req.logprobs = [[] for _ in range(width)]
        if sp.prompt_logprobs is not None:
            req.prompt_lp_k = sp.prompt_logprobs
            req.prompt_logprobs = [None] * len(ids)
        return req

    def _admit(self, req: _Request) -> None:
        group = self.scheduler.add_request(
            req.request_id, req.prompt_ids, req.params, n=req.num_seqs,
            use_prefix_cache=req.prompt_lp_k < 0)
        seq = group.seqs[0]
        req.index[seq.seq_id] = 0
        if req.beam is not None:
            req.beam.running[seq.seq_id] = Beam([], 0.0, [] if req.beam.keep_logprobs else None)
        self._reqs[req.request_id] = req

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free all its pages; its final output (finish_reason
        ``"abort"``) comes with the next :meth:`step`.  False if it is unknown/finished."""
        req = self._reqs.get(request_id)
        if req is None:
            return False
        self.scheduler.abort(request_id)
        self._finish_request(req, "abort")
        return True

    # ------------------------------------------------------------------ stepping

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; return the outputs of every request that changed
        (finished ones with ``finished=True``)."""
        outputs = self._finished_outputs
        self._finished_outputs = []
        out = self.scheduler.schedule()
        for rid in out.ignored_request_ids:
            req = self._reqs.get(rid)
            if req is not None:
                self._finish_request(req, "length")
                outputs.extend(self._finished_outputs)
                self._finished_outputs = []
        for rid in out.preempted_request_ids:
            req = self._reqs.get(rid)
            if req is not None and req.beam is not None:
                req.beam.pending.clear()  # recomputed beams propose again
        if out.is_empty:
            return outputs
        self.stats.steps += 1
        rows, plp, next_ids = self._sample_rows(out)
        num_steps, extra_copies, tables = self._plan_multi_step(out, rows)
        if not out.num_prefill_tokens:
            # decode-only steps always run the k-token program (one compiled shape per
            # batch bucket); a row's allowance stops it, 1 when no look-ahead was reserved
            allow = num_steps
            num_steps = self.config.num_scheduler_steps
            rows = [[r._replace(max_new=min(allow, r.max_new)) for r in rs] for rs in rows]
        try:
            res = self.runner.execute(out, rows, prompt_lp=plp, prompt_next_ids=next_ids,
                                      num_steps=num_steps, extra_copies=extra_copies,
                                      block_tables=tables)
        except Exception:
            self._fail_all("engine step failed")
            raise
        self.stats.dispatches += 1
        self.stats.multi_step_dispatches += extra_copies is not None and tables is not None
        self.stats.prefill_tokens += out.num_prefill_tokens
        first = [rs[0][0] if rs else None for rs in res.tokens]
        self.scheduler.update(out, first)
        touched: dict[str, _Request] = {}
        for i, e in enumerate(out.scheduled_seqs):
            req = self._reqs.get(e.request_id)
            if req is None:
                continue
            if res.prompt_logprobs is not None and res.prompt_logprobs[i] is not None:
                self._record_prompt_logprobs(req, res.prompt_logprobs[i])
            if not rows[i]:
                continue
            try:
                self._on_sampled(req, e.seq_id, res, i, touched)
            except Exception as exc:  # a request's host processing failed: only it ends
                log.exception("request %s failed", req.request_id)
                self.scheduler.abort(req.request_id)
                self._finish_request(req, "abort", error=repr(exc))
            touched[req.request_id] = req
            if not e.is_prefill:
                self.stats.decode_tokens += len(res.tokens[i][0])
        if self.track_kv_usage:
            self._track_kv()
        for req in touched.values():
            if not req.finished:
                outputs.append(self._output(req))
        outputs.extend(self._finished_outputs)
        self._finished_outputs = []
        return outputs

    def _sample_rows(self, out: SchedulerOutput):
        rows: list[list[SampleRow]] = []
        plp: list[int] = []
        next_ids: list[list[int] | None] = []
        for e in out.scheduled_seqs:
            req = self._reqs[e.request_id]
            seq = self.scheduler.get_seq(e.seq_id)
            k = req.prompt_lp_k if (e.is_prefill and req.prompt_logprobs is not None
                                    and req.index.get(e.seq_id) == 0) else -1
            plp.append(k)
            if k >= 0:
                p = req.prompt_ids
                next_ids.append([p[q + 1] if q + 1 < len(p) else -1 for q in e.positions])
            else:
                next_ids.append(None)
            if not e.do_sample:
                rows.append([])
                continue
            n_out = seq.num_output_tokens
            if req.beam is None and req.num_seqs > 1 and not req.forked:
                rows.append([SampleRow(rp, n_out, req.max_out - n_out, seq.output_token_ids,
                                       seq.prompt_token_ids) for rp in req.rows])
            else:
                rp = req.rows[0] if req.beam is not None else req.rows[req.index[e.seq_id]]
                rows.append([SampleRow(rp, n_out, max(1, req.max_out - n_out),
                                       seq.output_token_ids, seq.prompt_token_ids)])
        return rows, plp, next_ids

    def _plan_multi_step(self, out: SchedulerOutput, rows):
        """Decode-only steps with no beam search run several tokens per dispatch, unless a
        waiting request could be admitted now (it would wait for the whole dispatch)."""
        k = self.config.num_scheduler_steps
        if k <= 1 or out.num_prefill_tokens or not out.scheduled_seqs:
            return 1, (), None
        if any(self._reqs[e.request_id].beam is not None for e in out.scheduled_seqs):
            return 1, (), None
        sched = self.scheduler
        if sched.waiting:
            seats = sum(g.max_num_running_seqs for g in sched.running)
            if seats + sched.waiting[0].max_num_running_seqs <= sched.max_num_seqs:
                return 1, (), None
        want = {}
        for e, rs in zip(out.scheduled_seqs, rows):
            want[e.seq_id] = max(1, min(k, rs[0].max_new))
        if max(want.values()) <= 1:
            return 1, (), None
        copies = sched.reserve_lookahead(out, want)
        if copies is None:
            return 1, (), None
        tables = [tuple(sched.get_seq(e.seq_id).block_table) for e in out.scheduled_seqs]
        # always k iterations (static: one program); rows stop at their own allowance
        return k, copies, tables

    # ------------------------------------------------------------------ results

    def _on_sampled(self, req: _Request, seq_id: int, res: StepResult, i: int,
                    touched: dict) -> None:
        seq = self.scheduler.get_seq(seq_id)
        if seq is None or seq.status is not SequenceStatus.RUNNING:
            return
        toks = res.tokens[i]
        lps = res.logprobs[i] if res.logprobs is not None else None
        if len(toks[0]) > 1:
            self.scheduler.extend_decoded(seq_id, toks[0][1:])
        self.stats.generated_tokens += len(toks[0])
        if req.beam is not None:
            self._beam_step(req, seq, lps[0][0])
            return
        pairs = [(seq, req.index[seq_id], toks[0], lps[0] if lps else None)]
        if req.num_seqs > 1 and not req.forked:
            req.forked = True
            for j in range(1, req.num_seqs):
                child = self.scheduler.fork_seq(seq_id, toks[j][0])
                req.index[child.seq_id] = j
                pairs.append((child, j, toks[j], lps[j] if lps else None))
                self.stats.generated_tokens += 1
        for s, idx, t, lp in pairs:
            self._add_tokens(req, s, idx, t, lp)
        if all(tr.finished for tr in req.trackers):
            self._finish_request(req, None)

    def _add_tokens(self, req: _Request, seq: Seq, idx: int, tokens: list[int], lps) -> None:
        tr = req.trackers[idx]
        status = None
        for j, t in enumerate(tokens):
            if tr.finished:
                break
            req.emitted[idx] += tr.add([t])
            if lps is not None:
                chosen, top_ids, top_lps = lps[j]
                req.cum[idx] += chosen
                if req.logprobs is not None:
                    d = {int(a): float(b) for a, b in zip(top_ids[:req.params.logprobs],
                                                         top_lps[:req.params.logprobs])}
                    d[int(t)] = float(chosen)
                    req.logprobs[idx].append(d)
            if tr.finished:  # stop string
                status = SequenceStatus.FINISHED_STOPPED
            elif t in req.stop_set:
                req.emitted[idx] += tr.finish("stop", t)
                status = SequenceStatus.FINISHED_STOPPED
            elif len(tr.token_ids) >= req.max_out:
                req.emitted[idx] += tr.finish("length")
                status = SequenceStatus.FINISHED_LENGTH
        if status is not None and seq.status is SequenceStatus.RUNNING:
            self.scheduler.finish_seq(seq.seq_id, status)

    def _beam_step(self, req: _Request, seq: Seq, lp) -> None:
        bs = req.beam
        seq.pop_token()  # the placeholder argmax; the beam step appends the real token
        _, top_ids, top_lps = lp
        w = 2 * bs.width
        bs.pending[seq.seq_id] = (list(map(int, top_ids[:w])), list(map(float, top_lps[:w])))
        if not bs.ready():
            return  # siblings still (re)computing
        new = bs.select()
        parents = bs.running
        bs.running = {}
        n_gen = len(next(iter(parents.values())).tokens) + 1
        done = not new or n_gen >= req.max_out
        if done:
            for c in new:
                p = parents[c.parent]
                bs.completed.append(Beam(p.tokens + [c.token], c.cum_logprob,
                                         _lp_ext(p, c)))
            for sid in parents:
                self.scheduler.finish_seq(sid, SequenceStatus.FINISHED_LENGTH)
            self._finish_request(req, None)
            return
        children: dict[int, list] = {}
        for c in new:
            children.setdefault(c.parent, []).append(c)
        for sid in parents:
            if sid not in children:  # dropped beam: its pages go back (shared ones stay)
                self.scheduler.finish_seq(sid, SequenceStatus.FINISHED_ABORTED)
                req.index.pop(sid, None)
        for sid, cs in children.items():
            p = parents[sid]
            s = self.scheduler.get_seq(sid)
            s.append_token(cs[0].token)
            bs.running[sid] = Beam(p.tokens + [cs[0].token], cs[0].cum_logprob, _lp_ext(p, cs[0]))
            for c in cs[1:]:
                child = self.scheduler.fork_seq(sid, c.token)
                req.index[child.seq_id] = 0
                bs.running[child.seq_id] = Beam(p.tokens + [c.token], c.cum_logprob,
                                                _lp_ext(p, c))

    def _record_prompt_logprobs(self, req: _Request, plp) -> None:
        positions, chosen = plp[0], plp[1]
        k = req.prompt_lp_k
        for j, p in enumerate(positions):
            q = int(p) + 1
            if q >= len(req.prompt_ids) or req.prompt_logprobs[q] is not None:
                continue
            d = {}
            if k > 0:
                d = {int(a): float(b) for a, b in zip(plp[2][j][:k], plp[3][j][:k])}
            d[req.prompt_ids[q]] = float(chosen[j])
            req.prompt_logprobs[q] = d

    # ------------------------------------------------------------------ finishing

    def _finish_request(self, req: _Request, reason: str | None, error: str | None = None) -> None:
        """Mark a request finished (its sequences are already finished in the scheduler,
        or ``reason`` is given and every unfinished completion gets it)."""
        if req.finished:
            return
        if reason is not None:
            if self.scheduler.get_request(req.request_id) is not None:
                self.scheduler.abort(req.request_id)
            for idx, tr in enumerate(req.trackers):
                if not tr.finished:
                    req.emitted[idx] += tr.finish(reason)
            req.abort_reason = reason if req.beam is not None or error else None
            if req.beam is not None and reason != "abort":
                req.beam.finish_running()
        req.finished = True
        self._reqs.pop(req.request_id, None)
        outp = self._output(req)
        if error is not None:
            for o in outp.outputs:
                o.stop_reason = error
        self._finished_outputs.append(outp)

    def _fail_all(self, why: str) -> None:
        """The device step raised: the pool's contents are gone.  Every in-flight request
        ends (finish_reason "abort"), and cached prefix blocks are dropped."""
        for req in list(self._reqs.values()):
            self._finish_request(req, "abort", error=why)
        self.scheduler._pending = None  # noqa: SLF001 - the step never ran
        self.allocator.reset_prefix_cache()

    def _output(self, req: _Request) -> RequestOutput:
        sp = req.params
        if req.beam is not None:
            bs = req.beam
            if req.finished:
                beams = bs.best(sp.n) if bs.completed else []
            else:
                beams = sorted(bs.running.values(), key=lambda b: b.cum_logprob,
                               reverse=True)[:sp.n]
            outs = []
            for i, b in enumerate(beams):
                text = (self.tokenizer.decode(b.tokens, skip_special_tokens=sp.skip_special_tokens)
                        if self.tokenizer is not None else "")
                last = b.tokens[-1] if b.tokens else None
                stopped = last is not None and last in req.stop_set and not sp.ignore_eos
                reason = None
                if req.finished:
                    reason = req.abort_reason or ("stop" if stopped else "length")
                outs.append(CompletionOutput(
                    index=i, text=text, token_ids=list(b.tokens), finish_reason=reason,
                    cumulative_logprob=b.cum_logprob, logprobs=b.logprobs,
                    stop_reason=last if stopped and req.finished else None))
            if not outs:
                outs = [CompletionOutput(0, "", [], req.abort_reason if req.finished else None)]
        else:
            idxs = range(len(req.trackers))
            if req.finished and req.num_seqs > sp.n:  # best_of: the n most likely
                idxs = sorted(idxs, key=lambda j: req.cum[j], reverse=True)[:sp.n]
            elif not req.forked:
                idxs = [0] if not req.finished else idxs
            outs = []
            for k, j in enumerate(list(idxs)[:max(sp.n, 1)] if req.finished else idxs):
                tr = req.trackers[j]
                outs.append(CompletionOutput(
                    index=k, text=tr.text if req.finished else req.emitted[j],
                    token_ids=list(tr.token_ids), finish_reason=tr.finish_reason,
                    cumulative_logprob=(req.cum[j] if req.rows[j].logprobs >= 0 else None),
                    logprobs=(list(req.logprobs[j]) if req.logprobs is not None else None),
                    stop_reason=tr.stop_reason))
        return RequestOutput(request_id=req.request_id, prompt=req.prompt,
                             prompt_token_ids=list(req.prompt_ids), outputs=outs,
                             finished=req.finished,
                             prompt_logprobs=(list(req.prompt_logprobs)
                                              if req.prompt_logprobs is not None else None))

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
                reqs.append(self._prepare(None, p, sp, tok))
            except (ValueError, TypeError) as e:
                raise type(e)(f"prompt {i}: {e}") from None
        for r in reqs:
            self._admit(r)
        want = {r.request_id: i for i, r in enumerate(reqs)}
        results: list[RequestOutput | None] = [None] * len(reqs)
        try:
            while any(r is None for r in results):
                for o in self.step():
                    if o.finished and o.request_id in want:
                        results[want[o.request_id]] = o
        except BaseException:
            for r in reqs:
                self.abort(r.request_id)
            raise
        return results  # type: ignore[return-value]

    def warmup(self, num_steps: Iterable[int] | None = None) -> int:
        """Compile the greedy programs of every reachable bucket now (instead of on first
        use); returns how many step shapes were run.  Writes only into the null page."""
        from jaxllm.engine.scheduler import ScheduledSequence

        r = self.runner
        greedy = RowParams(stop_ids=self.eos_token_ids)
        steps = sorted(set(num_steps or {self.config.num_scheduler_steps}))

        def dec(j):
            return ScheduledSequence(-1 - j, "", (0,), 0, (0,), True, False)

        n = 0
        for d in r.decode_buckets:
            for k in steps:
                out = SchedulerOutput([dec(j) for j in range(d)], num_decode_tokens=d,
                                      block_size=r.page_size)
                rows = [[SampleRow(greedy, 0, k)] for _ in range(d)]
                self.runner.execute(out, rows, num_steps=k)
                n += 1
        for d, p, s in r.mixed_shapes():
            lens = [1] * (s - 1) + [p - (s - 1)]
            pf = [ScheduledSequence(-100 - j, "", (0,) * q, 0, (0,) * -(-q // r.page_size), True,
                                    True) for j, q in enumerate(lens)]
            out = SchedulerOutput([dec(j) for j in range(d)] + pf, num_decode_tokens=d,
                                  num_prefill_tokens=p, block_size=r.page_size)
            rows = [[SampleRow(greedy, 0)] for _ in range(d + s)]
            self.runner.execute(out, rows)
            n += 1
        return n
