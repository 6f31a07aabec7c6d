"""The OpenAI-compatible HTTP app: routes, admission (back-pressure), cancellation.

Every route is a thin layer over :class:`jaxllm.engine.AsyncLLMEngine`: a request is
parsed and validated (``protocol``), admitted or refused with 429, tokenized, and run
as one engine request per prompt; its outputs become an OpenAI response or a stream of
server-sent events.  Leaving the engine's stream early -- client disconnect, timeout,
shutdown -- aborts the request in the engine, which frees its KV pages at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import secrets
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxllm.engine.async_engine import AsyncLLMEngine
from jaxllm.outputs import RequestOutput
from jaxllm.sampling import SamplingParams
from jaxllm.serve.metrics import Metrics, RequestTimer
from jaxllm.serve.protocol import (APIError, ChatCompletionRequest, ChatMessage,
                                   CompletionRequest, DetokenizeRequest, TokenizeRequest,
                                   parse_body)

log = logging.getLogger("jaxllm.serve")

__all__ = ["ServeConfig", "build_app"]


@dataclasses.dataclass
class ServeConfig:
    """Server settings (the engine's live in the engine).

    Attributes:
        served_model_names: names clients may put in ``model``; the first is reported.
        api_key: when set, every route but ``/health*`` and the playground page needs
            ``Authorization: Bearer <api_key>``.
        max_waiting_requests: sequences that may wait beyond the engine's ``max_num_seqs``
            running ones; more get 429 with ``Retry-After``.
        request_timeout: seconds a request may run before it is aborted (None: no limit).
        health_timeout: seconds ``/health/generate`` waits for its one token.
        retry_after: the ``Retry-After`` seconds sent with a 429.
    """

    served_model_names: list[str]
    api_key: str | None = None
    max_waiting_requests: int = 256
    request_timeout: float | None = 600.0
    health_timeout: float = 30.0
    retry_after: int = 1

    def __post_init__(self) -> None:
        if not self.served_model_names or not all(self.served_model_names):
            raise ValueError("served_model_names must name at least one model")
        if self.max_waiting_requests < 0:
            raise ValueError(f"max_waiting_requests must be >= 0, got {self.max_waiting_requests}")
        if self.request_timeout is not None and not self.request_timeout > 0:
            raise ValueError(f"request_timeout must be > 0, got {self.request_timeout}")


class _ClientGone(Exception):
    """The client closed the connection."""


@dataclasses.dataclass
class _Job:
    """One engine request: one prompt of an API request."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    prompt_text: str | None = None
    timer: RequestTimer | None = None  # set at admission


class Server:
    """State shared by the routes: the engine, tokenizer, limits and metrics."""

    def __init__(self, engine: AsyncLLMEngine, config: ServeConfig, *,
                 model_path: str | None = None) -> None:
        self.engine = engine
        self.config = config
        eng = engine.engine
        self.tokenizer = eng.tokenizer
        self.vocab_size = eng.cfg.vocab_size
        self.max_model_len = eng.config.max_model_len
        self.page_size = eng.config.page_size
        self.max_num_seqs = eng.config.max_num_seqs
        self.model_name = config.served_model_names[0]
        self.model_path = model_path
        self.created = int(time.time())
        self.in_flight = 0  # sequences admitted and not finished
        self.metrics = Metrics(self.model_name, engine.snapshot, lambda: self.in_flight)

    # ------------------------------------------------------------------ checks

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.config.served_model_names:
            raise APIError(f"The model `{name}` does not exist.", status=404, param="model",
                           code="model_not_found")

    def admit(self, jobs: list[_Job], cost: int) -> None:
        """Take ``cost`` sequence seats for ``jobs``, or raise 429 (queue full).  Their
        metrics start here: a request counts from admission, even if its client leaves
        before it reaches the engine."""
        capacity = self.max_num_seqs + self.config.max_waiting_requests
        if cost > capacity:
            raise APIError(f"the request needs {cost} sequences (prompts x n); this server "
                           f"holds at most {capacity}", param="n")
        if self.in_flight + cost > capacity:
            self.metrics.http_rejected.inc()
            raise APIError(f"the server is at capacity ({self.in_flight} sequences running or "
                           f"waiting, max {capacity}); retry later", status=429,
                           type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(self.config.retry_after)})
        self.in_flight += cost
        for job in jobs:
            job.timer = self.metrics.request(len(job.prompt_ids))

    def release(self, jobs: list[_Job], cost: int) -> None:
        """Give back what :meth:`admit` took; a job that did not finish ends as aborted."""
        self.in_flight -= cost
        for job in jobs:
            job.timer.finish("abort")  # no-op when it finished

    def need_tokenizer(self, what: str) -> Any:
        if self.tokenizer is None:
            raise APIError(f"{what} needs a tokenizer; this model has none (send token ids)",
                           param="prompt")
        return self.tokenizer

    def encode(self, prompt: str | list[int], param: str) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            ids = self.need_tokenizer("a text prompt").encode(prompt)
            text: str | None = prompt
        else:
            ids, text = list(prompt), None
            bad = [t for t in ids if t >= self.vocab_size]
            if bad:
                raise APIError(f"{param} has token id {bad[0]}, outside the vocabulary "
                               f"[0, {self.vocab_size})", param=param)
        if not ids:
            raise APIError(f"{param} is empty (no tokens)", param=param)
        return text, ids

    def check_length(self, n_prompt: int, max_tokens: int | None, param: str,
                     max_tokens_param: str, explicit: bool) -> int:
        """The ``max_tokens`` to use, or a 400 stating both lengths."""
        m = self.max_model_len
        if n_prompt >= m:
            raise APIError(f"This model's maximum context length is {m} tokens. However, your "
                           f"prompt has {n_prompt} tokens, which leaves no room to generate.",
                           param=param, code="context_length_exceeded")
        room = m - n_prompt
        if max_tokens is None or (not explicit and max_tokens > room):
            return room
        if max_tokens > room:
            raise APIError(f"This model's maximum context length is {m} tokens. However, you "
                           f"requested {n_prompt + max_tokens} tokens ({n_prompt} in the "
                           f"prompt, {max_tokens} for the completion). Please reduce the "
                           f"prompt or {max_tokens_param}.", param=max_tokens_param,
                           code="context_length_exceeded")
        return max_tokens

    # ------------------------------------------------------------------ running

    async def run_job(self, job: _Job) -> AsyncIterator[RequestOutput]:
        """The engine's outputs for one admitted job, observed by its metrics timer."""
        # aclosing: leaving early closes the engine's stream now (which aborts the request),
        # not whenever the generator is garbage-collected
        async with contextlib.aclosing(self.engine.generate(
                job.prompt_ids, job.params, job.request_id)) as outs:
            async for out in outs:
                job.timer.on_output(out, self.engine.scheduled_at.get(job.request_id))
                yield out

    async def run_jobs(self, jobs: list[_Job]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(job index, output) from all jobs as they come; closing this aborts them all."""
        if len(jobs) == 1:
            async with contextlib.aclosing(self.run_job(jobs[0])) as outs:
                async for out in outs:
                    yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, job: _Job) -> None:
            try:
                async with contextlib.aclosing(self.run_job(job)) as outs:
                    async for out in outs:
                        queue.put_nowait((i, out))
            except Exception as e:  # the engine failed this request: fail the API request
                queue.put_nowait((i, e))

        tasks = [asyncio.ensure_future(pump(i, j)) for i, j in enumerate(jobs)]
        try:
            left = len(jobs)
            while left:
                i, item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield i, item
                left -= item.finished
        finally:
            for t in tasks:  # each pump's engine stream aborts its request as it unwinds
                t.cancel()

    def outputs(self, jobs: list[_Job]) -> contextlib.AbstractAsyncContextManager:
        """``async with srv.outputs(jobs) as outs: async for i, out in outs``: the jobs'
        outputs under the request timeout; leaving the block aborts what still runs."""
        return contextlib.aclosing(self.with_deadline(self.run_jobs(jobs)))

    async def with_deadline(self, agen: AsyncIterator[Any]) -> AsyncIterator[Any]:
        """``agen`` under the request timeout: past it, ``agen`` is closed (its engine
        requests aborted) and a 408 error is raised."""
        timeout = self.config.request_timeout
        loop = asyncio.get_running_loop()
        end = None if timeout is None else loop.time() + timeout
        try:
            while True:
                try:
                    if end is None:
                        item = await agen.__anext__()
                    else:
                        item = await asyncio.wait_for(agen.__anext__(),
                                                      max(0.0, end - loop.time()))
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    raise APIError(f"the request did not finish within the server's request "
                                   f"timeout ({timeout:g} s) and was aborted", status=408,
                                   type="timeout_error", code="request_timeout") from None
                yield item
        finally:
            await agen.aclose()

    async def until_disconnect(self, request: Request, coro: Awaitable[Any]) -> Any:
        """Await ``coro``; if the client disconnects first, cancel it (which aborts its
        engine requests) and raise :class:`_ClientGone`."""
        task = asyncio.ensure_future(coro)

        async def gone() -> None:
            while True:  # the body is read already: the next message is the disconnect
                if (await request.receive())["type"] == "http.disconnect":
                    return

        watcher = asyncio.ensure_future(gone())
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
            watcher.cancel()
        if task.done() and not task.cancelled():
            return task.result()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass
        raise _ClientGone()

    # ------------------------------------------------------------------ token text

    def token_str(self, tid: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{tid}"
        return self.tokenizer.decode([tid], skip_special_tokens=False)


MAX_BODY_BYTES = 32 * 2**20
_BIG_TEXT = 16384  # characters: tokenizing more than this leaves the event loop


async def _read(request: Request, model: type) -> Any:
    """The request body parsed into ``model`` (413 beyond ``MAX_BODY_BYTES``)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise APIError(f"the body has {declared} bytes; the limit is {MAX_BODY_BYTES}",
                       status=413)
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise APIError(f"the body has {len(raw)} bytes; the limit is {MAX_BODY_BYTES}",
                       status=413)
    return parse_body(raw, model)


async def _off_loop(size: int, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, in a worker thread when ``size`` (characters to tokenize) is large,
    so that one enormous prompt does not stall every other stream."""
    if size > _BIG_TEXT:
        return await asyncio.to_thread(fn, *args)
    return fn(*args)


def _uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _top(d: dict[int, float] | None, k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely (id, logprob) of one position (the engine's dict also holds
    the sampled token, which may rank below them)."""
    if not d:
        return []
    return sorted(d.items(), key=lambda kv: kv[1], reverse=True)[:k]


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


# ---------------------------------------------------------------------- completions


class _CompletionLogprobs:
    """Builds the legacy completions ``logprobs`` object incrementally."""

    def __init__(self, srv: Server, k: int, offset: int = 0) -> None:
        self.srv, self.k, self.offset = srv, k, offset

    def build(self, ids: list[int], lps: list[dict[int, float] | None]) -> dict[str, Any]:
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                               "text_offset": []}
        for tid, d in zip(ids, lps):
            s = self.srv.token_str(tid)
            out["tokens"].append(s)
            out["token_logprobs"].append(None if d is None else d.get(tid))
            top: dict[str, float] | None = None
            if d is not None:
                top = {}
                for a, b in _top(d, self.k):  # ids that decode alike: keep the likelier
                    top.setdefault(self.srv.token_str(a), b)
            out["top_logprobs"].append(top)
            out["text_offset"].append(self.offset)
            self.offset += len(s)
        return out


def _merge_logprobs(a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
    if a is None:
        return b
    return {key: a[key] + b[key] for key in a}


async def _completions(srv: Server, request: Request) -> Response:
    req: CompletionRequest = await _read(request, CompletionRequest)
    srv.check_model(req.model)
    if req.suffix:
        raise APIError("suffix is not supported", param="suffix")
    if req.best_of is not None and req.best_of < req.n:
        raise APIError(f"best_of ({req.best_of}) must be >= n ({req.n})", param="best_of")
    if req.stream and req.best_of is not None and req.best_of > req.n:
        raise APIError("best_of > n cannot be streamed", param="best_of")
    explicit = "max_tokens" in req.model_fields_set and req.max_tokens is not None
    jobs: list[_Job] = []
    rid = _uid("cmpl")
    prompts = req.prompts()
    for i, p in enumerate(prompts):
        param = "prompt" if len(prompts) == 1 else f"prompt.{i}"
        text, ids = await _off_loop(len(p) if isinstance(p, str) else 0, srv.encode, p, param)
        max_tokens = srv.check_length(len(ids), req.max_tokens, param, "max_tokens", explicit)
        want_lp = req.logprobs
        sp = req.sampling_params(max_tokens=max_tokens, vocab_size=srv.vocab_size,
                                 logprobs=want_lp, best_of=req.best_of,
                                 prompt_logprobs=want_lp if req.echo and want_lp is not None
                                 else None)
        if (sp.best_of or sp.n) > srv.max_num_seqs:
            raise APIError(f"n/best_of ({sp.best_of or sp.n}) exceeds the server's "
                           f"max_num_seqs ({srv.max_num_seqs})", param="n")
        if -(-len(ids) // srv.page_size) > srv.engine.snapshot().num_pages:
            raise APIError(f"{param} of {len(ids)} tokens does not fit the KV cache",
                           param=param)
        if text is None and req.echo:
            text = srv.need_tokenizer("echo").decode(ids)
        jobs.append(_Job(f"{rid}-{i}", ids, sp, text))
    return await _answer(srv, request, jobs, len(jobs) * (req.best_of or req.n), req.stream,
                         lambda: _completion_events(srv, req, rid, jobs),
                         lambda: _completion_body(srv, req, rid, jobs))


async def _answer(srv: Server, request: Request, jobs: list[_Job], cost: int, stream: bool,
                  events: Callable[[], AsyncIterator[str]],
                  body: Callable[[], Awaitable[dict[str, Any]]]) -> Response:
    """Admit ``jobs`` (``cost`` seats) and answer with ``events()`` streamed or ``body()``
    as JSON; the seats come back however the request ends."""
    srv.admit(jobs, cost)
    try:
        if stream:
            return _stream_response(events(), lambda: srv.release(jobs, cost))
        result = await srv.until_disconnect(request, body())
    except BaseException:
        srv.release(jobs, cost)
        raise
    srv.release(jobs, cost)
    return JSONResponse(result)


async def _completion_body(srv: Server, req: CompletionRequest, rid: str,
                           jobs: list[_Job]) -> dict[str, Any]:
    final: dict[int, RequestOutput] = {}
    async with srv.outputs(jobs) as outs:
        async for i, out in outs:
            if out.finished:
                final[i] = out
    choices = []
    n_prompt = n_gen = 0
    for i, job in enumerate(jobs):
        out = final[i]
        n_prompt += len(job.prompt_ids)
        for o in out.outputs:
            n_gen += len(o.token_ids)
            text, lp = o.text, None
            if req.logprobs is not None:
                b = _CompletionLogprobs(srv, req.logprobs)
                if req.echo:
                    lp = b.build(job.prompt_ids,
                                 out.prompt_logprobs or [None] * len(job.prompt_ids))
                lp = _merge_logprobs(lp, b.build(o.token_ids, o.logprobs or []))
            if req.echo:
                text = (job.prompt_text or "") + text
            choices.append({"index": i * req.n + o.index, "text": text, "logprobs": lp,
                            "finish_reason": o.finish_reason, "stop_reason": o.stop_reason})
    return {"id": rid, "object": "text_completion", "created": int(time.time()),
            "model": srv.model_name, "choices": choices,
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_gen,
                      "total_tokens": n_prompt + n_gen}}


async def _completion_events(srv: Server, req: CompletionRequest, rid: str,
                             jobs: list[_Job]) -> AsyncIterator[str]:
    created = int(time.time())
    usage_on = bool(req.stream_options and req.stream_options.include_usage)
    sent_text: dict[tuple[int, int], int] = {}
    sent_tok: dict[tuple[int, int], int] = {}
    builders: dict[tuple[int, int], _CompletionLogprobs] = {}
    n_gen = 0

    def chunk(index: int, text: str, lp: Any, finish: str | None) -> str:
        c = {"id": rid, "object": "text_completion", "created": created,
             "model": srv.model_name,
             "choices": [{"index": index, "text": text, "logprobs": lp,
                          "finish_reason": finish}]}
        if usage_on:
            c["usage"] = None
        return _sse(c)

    async with srv.outputs(jobs) as outs:
        async for i, out in outs:
            job = jobs[i]
            for o in out.outputs:
                key = (i, o.index)
                index = i * req.n + o.index
                prefix, lp = "", None
                if key not in sent_text:
                    sent_text[key] = sent_tok[key] = 0
                    if req.logprobs is not None:
                        builders[key] = _CompletionLogprobs(srv, req.logprobs)
                    if req.echo:
                        prefix = job.prompt_text or ""
                        if req.logprobs is not None:
                            lp = builders[key].build(job.prompt_ids, out.prompt_logprobs
                                                     or [None] * len(job.prompt_ids))
                new_text = o.text[sent_text[key]:]
                new_ids = o.token_ids[sent_tok[key]:]
                if req.logprobs is not None and new_ids:
                    lp = _merge_logprobs(lp, builders[key].build(
                        new_ids, (o.logprobs or [])[sent_tok[key]:]))
                sent_text[key] = len(o.text)
                sent_tok[key] = len(o.token_ids)
                finish = o.finish_reason if out.finished else None
                if prefix or new_text or finish or lp:
                    yield chunk(index, prefix + new_text, lp, finish)
            if out.finished:
                n_gen += sum(len(o.token_ids) for o in out.outputs)
    if usage_on:
        n_prompt = sum(len(j.prompt_ids) for j in jobs)
        yield _sse({"id": rid, "object": "text_completion", "created": created,
                    "model": srv.model_name, "choices": [],
                    "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_gen,
                              "total_tokens": n_prompt + n_gen}})


# ---------------------------------------------------------------------- chat


def _render_chat(srv: Server, messages: list[ChatMessage], add_generation_prompt: bool
                 ) -> list[int]:
    tok = srv.need_tokenizer("chat")
    try:
        text = tok.apply_chat_template([{"role": m.role, "content": m.text()} for m in messages],
                                       add_generation_prompt=add_generation_prompt)
    except Exception as e:  # no template, or the template failed on these messages
        raise APIError(f"could not render the messages with the chat template: {e}",
                       param="messages") from None
    ids = tok.encode(text, add_special_tokens=False)
    if not ids:
        raise APIError("messages render to an empty prompt", param="messages")
    return ids


def _chat_logprobs(srv: Server, ids: list[int], lps: list[dict[int, float]],
                   k: int) -> list[dict[str, Any]]:
    out = []
    for tid, d in zip(ids, lps):
        s = srv.token_str(tid)
        out.append({"token": s, "logprob": d.get(tid), "bytes": list(s.encode()),
                    "top_logprobs": [{"token": (t := srv.token_str(a)), "logprob": b,
                                      "bytes": list(t.encode())} for a, b in _top(d, k)]})
    return out


async def _chat(srv: Server, request: Request) -> Response:
    req: ChatCompletionRequest = await _read(request, ChatCompletionRequest)
    srv.check_model(req.model)
    req.unsupported()
    ids = await _off_loop(sum(len(m.text()) for m in req.messages), _render_chat, srv,
                          req.messages, req.add_generation_prompt)
    if req.max_completion_tokens is not None:
        mt, mt_param = req.max_completion_tokens, "max_completion_tokens"
    else:
        mt, mt_param = req.max_tokens, "max_tokens"
    max_tokens = srv.check_length(len(ids), mt, "messages", mt_param, mt is not None)
    k = (req.top_logprobs or 0) if req.logprobs else None
    sp = req.sampling_params(max_tokens=max_tokens, vocab_size=srv.vocab_size, logprobs=k)
    if sp.n > srv.max_num_seqs:
        raise APIError(f"n ({sp.n}) exceeds the server's max_num_seqs ({srv.max_num_seqs})",
                       param="n")
    if -(-len(ids) // srv.page_size) > srv.engine.snapshot().num_pages:
        raise APIError(f"messages of {len(ids)} tokens do not fit the KV cache",
                       param="messages")
    rid = _uid("chatcmpl")
    echo = ""
    if req.echo and req.messages[-1].role == "assistant":
        echo = req.messages[-1].text()  # vLLM: the last assistant message goes in front
    job = _Job(rid, ids, sp)
    return await _answer(srv, request, [job], req.n, req.stream,
                         lambda: _chat_events(srv, req, rid, job, echo),
                         lambda: _chat_body(srv, req, rid, job, echo))


async def _chat_body(srv: Server, req: ChatCompletionRequest, rid: str, job: _Job,
                     echo: str) -> dict[str, Any]:
    out = None
    async with srv.outputs([job]) as outs:
        async for _, o in outs:
            out = o
    assert out is not None and out.finished
    choices = []
    for o in out.outputs:
        lp = None
        if req.logprobs:
            lp = {"content": _chat_logprobs(srv, o.token_ids, o.logprobs or [],
                                            req.top_logprobs or 0), "refusal": None}
        choices.append({"index": o.index, "message": {"role": "assistant",
                                                       "content": echo + o.text,
                                                       "refusal": None, "tool_calls": []},
                        "logprobs": lp, "finish_reason": o.finish_reason,
                        "stop_reason": o.stop_reason})
    n_gen = sum(len(o.token_ids) for o in out.outputs)
    return {"id": rid, "object": "chat.completion", "created": int(time.time()),
            "model": srv.model_name, "choices": choices,
            "usage": {"prompt_tokens": len(job.prompt_ids), "completion_tokens": n_gen,
                      "total_tokens": len(job.prompt_ids) + n_gen}}


async def _chat_events(srv: Server, req: ChatCompletionRequest, rid: str, job: _Job,
                       echo: str) -> AsyncIterator[str]:
    created = int(time.time())
    usage_on = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(index: int, delta: dict, lp: Any = None, finish: str | None = None) -> str:
        c = {"id": rid, "object": "chat.completion.chunk", "created": created,
             "model": srv.model_name,
             "choices": [{"index": index, "delta": delta, "logprobs": lp,
                          "finish_reason": finish}]}
        if usage_on:
            c["usage"] = None
        return _sse(c)

    sent_text: dict[int, int] = {}
    sent_tok: dict[int, int] = {}
    n_gen = 0
    async with srv.outputs([job]) as outs:
        async for _, out in outs:
            for o in out.outputs:
                if o.index not in sent_text:
                    sent_text[o.index] = sent_tok[o.index] = 0
                    yield chunk(o.index, {"role": "assistant", "content": echo})
                new_text = o.text[sent_text[o.index]:]
                new_ids = o.token_ids[sent_tok[o.index]:]
                lp = None
                if req.logprobs and new_ids:
                    lp = {"content": _chat_logprobs(srv, new_ids,
                                                    (o.logprobs or [])[sent_tok[o.index]:],
                                                    req.top_logprobs or 0), "refusal": None}
                sent_text[o.index], sent_tok[o.index] = len(o.text), len(o.token_ids)
                if new_text or lp:
                    yield chunk(o.index, {"content": new_text}, lp)
                if out.finished:
                    yield chunk(o.index, {}, None, o.finish_reason)
            if out.finished:
                n_gen = sum(len(o.token_ids) for o in out.outputs)
    if usage_on:
        yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                    "model": srv.model_name, "choices": [],
                    "usage": {"prompt_tokens": len(job.prompt_ids), "completion_tokens": n_gen,
                              "total_tokens": len(job.prompt_ids) + n_gen}})


class _EventStream(StreamingResponse):
    """A streaming response that runs ``on_close`` once it is over, however it ended
    (finished, client gone before or during the body, server shutdown)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _stream_response(events: AsyncIterator[str],
                     on_close: Callable[[], None]) -> StreamingResponse:
    """Server-sent events from ``events``, then ``data: [DONE]``.  An error mid-stream is
    sent as an error event (the status line has gone out already).  A disconnect cancels
    the stream (Starlette), which closes ``events`` and aborts its engine requests;
    ``on_close`` runs once the response is over, however it ended."""

    async def body() -> AsyncIterator[str]:
        try:
            async for ev in events:
                yield ev
        except APIError as e:
            yield _sse(e.body())
        except Exception as e:  # an engine failure ends this stream, not the server
            log.exception("stream failed")
            yield _sse(APIError(f"generation failed: {e}", status=500, type="server_error").body())
        finally:
            await events.aclose()
        yield "data: [DONE]\n\n"

    return _EventStream(body(), on_close)


# ---------------------------------------------------------------------- the app


def build_app(engine: AsyncLLMEngine, config: ServeConfig, *,
              model_path: str | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` under ``config`` (see the module docstring)."""
    from jaxllm import __version__

    srv = Server(engine, config, model_path=model_path)

    async def lifespan(app: FastAPI):
        yield
        await engine.shutdown()  # in-flight streams were cancelled (and aborted) by uvicorn

    app = FastAPI(title="jaxllm", version=__version__, docs_url=None, redoc_url=None,
                  lifespan=lifespan)
    app.state.server = srv

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        srv.metrics.http_errors.labels(srv.model_name, str(e.status)).inc()
        return _error_response(e)

    @app.exception_handler(_ClientGone)
    async def _gone(request: Request, e: _ClientGone) -> Response:
        return Response(status_code=499)  # nobody reads it: nginx's "client closed request"

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        typ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(str(e.detail), status=e.status_code, type=typ,
                                        headers=getattr(e, "headers", None)))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        srv.metrics.http_errors.labels(srv.model_name, "500").inc()
        return _error_response(APIError(f"internal error: {type(e).__name__}: {e}",
                                        status=500, type="server_error"))

    async def auth(request: Request) -> None:
        if config.api_key is None:
            return
        got = request.headers.get("authorization", "")
        scheme, _, token = got.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(),
                                                                    config.api_key.encode()):
            raise APIError("invalid or missing API key (Authorization: Bearer <key>)",
                           status=401, type="authentication_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    public = APIRouter()
    api = APIRouter(dependencies=[Depends(auth)])

    @public.get("/health")
    async def health() -> Response:
        """Cheap liveness: 200 while the engine loop is alive."""
        if engine.error is not None:
            return _error_response(APIError(f"the engine failed: {engine.error}", status=503,
                                            type="server_error"))
        return Response(status_code=200)

    @public.get("/health/generate")
    async def health_generate() -> Response:
        """Runs a one-token generation; 503 if it fails or takes longer than the timeout."""
        t0 = time.monotonic()
        ids = [0]
        if srv.tokenizer is not None:
            ids = srv.tokenizer.encode("ok") or ids
        sp = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

        async def one() -> int:
            n = 0
            async for out in engine.generate(ids, sp, _uid("health")):
                n = len(out.outputs[0].token_ids)
            return n

        try:
            n = await asyncio.wait_for(one(), config.health_timeout)
        except asyncio.TimeoutError:
            return _error_response(APIError(
                f"no token within {config.health_timeout:g} s: the engine is stuck or "
                "overloaded", status=503, type="server_error"))
        except Exception as e:
            return _error_response(APIError(f"generation failed: {e}", status=503,
                                            type="server_error"))
        return JSONResponse({"status": "ok", "tokens": n,
                             "latency_s": round(time.monotonic() - t0, 4)})

    @public.get("/", response_class=HTMLResponse)
    async def playground() -> HTMLResponse:
        """The browser playground (one static page)."""
        page = Path(__file__).with_name("playground.html")
        return HTMLResponse(page.read_text(encoding="utf-8"))

    @api.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": srv.created, "owned_by": "jaxllm",
             "root": model_path or name, "parent": None, "max_model_len": srv.max_model_len}
            for name in config.served_model_names]}

    @api.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _completions(srv, request)

    @api.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await _chat(srv, request)

    @api.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        req: TokenizeRequest = await _read(request, TokenizeRequest)
        srv.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError("send exactly one of prompt or messages", param="prompt")
        if req.messages is not None:
            if not req.messages:
                raise APIError("messages must not be empty", param="messages")
            ids = _render_chat(srv, req.messages, req.add_generation_prompt)
        else:
            ids = srv.need_tokenizer("tokenize").encode(req.prompt,
                                                        add_special_tokens=req.add_special_tokens)
        return {"count": len(ids), "max_model_len": srv.max_model_len, "tokens": ids}

    @api.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        req: DetokenizeRequest = await _read(request, DetokenizeRequest)
        srv.check_model(req.model)
        bad = [t for t in req.tokens if not 0 <= t < srv.vocab_size]
        if bad:
            raise APIError(f"token id {bad[0]} is outside the vocabulary [0, {srv.vocab_size})",
                           param="tokens")
        return {"prompt": srv.need_tokenizer("detokenize").decode(req.tokens)}

    @api.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @api.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(srv.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.include_router(public)
    app.include_router(api)
    return app

