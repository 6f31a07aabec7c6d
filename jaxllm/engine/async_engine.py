"""`AsyncLLMEngine`: stream many concurrent requests from one engine (asyncio).

One background task owns the engine: it adds queued requests, runs ``engine.step()`` in
a worker thread (so the event loop stays responsive while the device computes) and
routes each :class:`RequestOutput` to its request's queue.  ``generate`` validates the
request synchronously (a bad request raises in the caller, before it reaches the
engine), then yields cumulative outputs until the finished one.  Leaving the iterator
early (``break``, cancellation, a client disconnect) aborts the request and frees its
pages.

    engine = AsyncLLMEngine(LLMEngine(params, cfg, tokenizer=tok))
    async for out in engine.generate("Hello", SamplingParams(max_tokens=32), "req-1"):
        print(out.outputs[0].text)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import threading
import time
from typing import AsyncIterator, Sequence

from jaxllm.engine.engine import LLMEngine
from jaxllm.outputs import RequestOutput
from jaxllm.sampling import SamplingParams

__all__ = ["AsyncLLMEngine", "EngineSnapshot"]


@dataclasses.dataclass(frozen=True)
class EngineSnapshot:
    """The engine's load at one moment (for a server's metrics and back-pressure)."""

    num_running: int  # requests holding KV pages
    num_waiting: int  # requests queued, not yet scheduled (incl. ones not yet handed over)
    num_pages: int  # usable KV pages in the pool
    num_free_pages: int  # free now (incl. evictable prefix-cache pages)
    num_preemptions: int  # since start
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache, since start
    prefix_cache_hits: int  # of those, tokens served from it
    # speculative decoding counters per method since start (SpecStats.as_dict()); empty
    # without a speculator
    spec: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of usable KV pages held by requests (0.0 .. 1.0)."""
        return 1.0 - self.num_free_pages / self.num_pages if self.num_pages else 0.0


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._lock = threading.Lock()  # guards the two lists below (event loop <-> worker)
        self._to_add: list = []
        self._to_abort: list[str] = []
        self._streams: dict[str, asyncio.Queue] = {}
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxllm-engine")
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.error: BaseException | None = None
        # request id -> time.monotonic() of the step that first scheduled it (queue time);
        # kept until the request's stream ends
        self.scheduled_at: dict[str, float] = {}

    @classmethod
    def from_llm(cls, llm) -> "AsyncLLMEngine":
        """Wrap the engine of a :class:`jaxllm.LLM`."""
        return cls(llm.engine)

    # ------------------------------------------------------------------ public API

    async def generate(self, prompt: str | Sequence[int], sampling_params: SamplingParams | None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as it runs (text and token ids are cumulative);
        the last one has ``finished=True``."""
        self._ensure_running()
        if self.error is not None:
            raise RuntimeError("the engine loop failed") from self.error
        with self._lock:
            taken = set(self._streams) | {r.request_id for r in self._to_add}
            if request_id is not None and request_id in taken:
                raise ValueError(f"request {request_id!r} already exists")
            # validation happens here, in the caller; engine state is not touched
            req = self.engine.prepare_request(request_id, prompt, sampling_params)
            queue: asyncio.Queue = asyncio.Queue()
            self._streams[req.request_id] = queue
            self._to_add.append(req)
        self._wake.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True  # nothing left to abort
                    raise RuntimeError(f"request {req.request_id!r} failed: {item}") from item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                with self._lock:
                    self._to_abort.append(req.request_id)
                if self._wake is not None:
                    self._wake.set()
            with self._lock:  # (the worker thread sets scheduled_at under the lock too)
                self._streams.pop(req.request_id, None)
                self.scheduled_at.pop(req.request_id, None)

    def snapshot(self) -> EngineSnapshot:
        """The engine's load now.  Reads scheduler / allocator counters (plain ints, safe to
        read from the event loop while a step runs: the worst case is a value one step old)."""
        eng = self.engine
        sched, alloc = eng.scheduler, eng.allocator
        with self._lock:
            pending = len(self._to_add)
        return EngineSnapshot(
            num_running=len(sched.running), num_waiting=len(sched.waiting) + pending,
            num_pages=alloc.num_usable_blocks, num_free_pages=alloc.num_free_blocks,
            num_preemptions=eng.num_preemptions,
            prefix_cache_queries=alloc.stats.prefix_cache_queries,
            prefix_cache_hits=alloc.stats.prefix_cache_hits,
            spec={method: st.as_dict() for method, st in list(eng.stats.spec.items())})

    async def abort(self, request_id: str) -> None:
        with self._lock:
            self._to_abort.append(request_id)
        if self._wake is not None:
            self._wake.set()

    async def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
        self._executor.shutdown(wait=True)

    # ------------------------------------------------------------------ the loop

    def _ensure_running(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._loop is not loop:
            self._loop = loop
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._run())

    def _step_sync(self) -> list[tuple[str, RequestOutput | BaseException]]:
        """Runs in the worker thread: apply queued adds/aborts, then one engine step."""
        with self._lock:
            adds, self._to_add = self._to_add, []
            aborts, self._to_abort = self._to_abort, []
        outs: list[tuple[str, RequestOutput | BaseException]] = []
        for req in adds:
            try:
                self.engine.add_prepared(req)
            except Exception as e:  # e.g. the id was taken meanwhile: fail only this request
                outs.append((req.request_id, e))
        for rid in aborts:
            self.engine.abort(rid)
        if self.engine.has_unfinished_requests():
            t = time.monotonic()
            waiting = [g.request_id for g in self.engine.scheduler.waiting]
            outs.extend((o.request_id, o) for o in self.engine.step())
            still = {g.request_id for g in self.engine.scheduler.waiting}
            with self._lock:
                for rid in waiting:  # left the waiting queue in this step: scheduled at t
                    if rid not in still and rid in self._streams:
                        self.scheduled_at.setdefault(rid, t)
        return outs

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                with self._lock:
                    pending = bool(self._to_add or self._to_abort)
                if not pending and not self.engine.has_unfinished_requests():
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                outs = await loop.run_in_executor(self._executor, self._step_sync)
                for rid, o in outs:
                    q = self._streams.get(rid)
                    if q is not None:
                        q.put_nowait(o)
                await asyncio.sleep(0)  # let consumers run between steps
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # the engine failed: every stream gets the error
            self.error = e
            for q in self._streams.values():
                q.put_nowait(e)
            raise
