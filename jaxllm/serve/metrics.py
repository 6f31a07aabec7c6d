"""Prometheus metrics under vLLM's names (so existing vLLM dashboards work), plus a few
``jaxllm:`` ones.

Per-request latencies are histograms observed as requests run; engine state (running /
waiting requests, KV usage, preemptions, prefix-cache counters) is read from the engine
at scrape time by a collector, so it is never stale and costs nothing between scrapes.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from jaxllm.engine.async_engine import EngineSnapshot
from jaxllm.outputs import RequestOutput

disable_created_metrics()  # no "*_created" series (vLLM drops them too): half the scrape size

# vLLM's bucket edges
_TTFT = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
         7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
_TPOT = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
         10.0, 20.0, 40.0, 80.0]
_E2E = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
        120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
_TOKENS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000]


# (metric, SpecStats field, help): counters, so rates and the acceptance rate
# (accepted / draft tokens) come from PromQL, as with vLLM's
_SPEC_COUNTERS = (
    ("vllm:spec_decode_num_drafts", "verifies", "Sequence-steps that verified a draft."),
    ("vllm:spec_decode_num_draft_tokens", "drafted_tokens", "Draft tokens verified."),
    ("vllm:spec_decode_num_accepted_tokens", "accepted_tokens", "Draft tokens accepted."),
    ("jaxllm:spec_decode_num_emitted_tokens", "emitted_tokens",
     "Tokens the verifies produced (accepted drafts + the target's own)."),
    ("jaxllm:spec_decode_disabled_steps", "disabled_steps",
     "Engine steps the load-aware switch ran without speculation."),
)


class _EngineCollector(Collector):
    """Gauges and counters read from the engine when /metrics is scraped."""

    def __init__(self, snapshot: Callable[[], EngineSnapshot], model_name: str,
                 in_flight: Callable[[], int]) -> None:
        self._snapshot, self._model, self._in_flight = snapshot, model_name, in_flight

    def collect(self) -> Iterable:
        s = self._snapshot()
        labels = ["model_name"]

        def gauge(name, doc, value):
            g = GaugeMetricFamily(name, doc, labels=labels)
            g.add_metric([self._model], value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric([self._model], value)
            return c

        yield gauge("vllm:num_requests_running", "Requests holding KV pages (running).",
                    s.num_running)
        yield gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.",
                    s.num_waiting)
        yield gauge("vllm:kv_cache_usage_perc",
                    "KV-cache usage: fraction of usable pages held by requests (1 = full).",
                    s.kv_cache_usage)
        yield counter("vllm:num_preemptions", "Preemptions (a sequence lost its pages).",
                      s.num_preemptions)
        yield counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      s.prefix_cache_queries)
        yield counter("vllm:prefix_cache_hits", "Prompt tokens served from the prefix cache.",
                      s.prefix_cache_hits)
        yield gauge("jaxllm:kv_cache_free_pages", "Free KV pages (incl. evictable cached pages).",
                    s.num_free_pages)
        yield gauge("jaxllm:kv_cache_pages", "Usable KV pages in the pool.", s.num_pages)
        yield gauge("jaxllm:server_requests_in_flight",
                    "Sequences admitted by the server and not yet finished.", self._in_flight())
        if s.spec:  # speculative decoding, per method (vLLM's names, plus a method label)
            for name, key, doc in _SPEC_COUNTERS:
                c = CounterMetricFamily(name, doc, labels=["model_name", "method"])
                for method, st in s.spec.items():
                    c.add_metric([self._model, method], st[key])
                yield c


class Metrics:
    """The server's metrics registry (one per app, so several apps can share a process)."""

    def __init__(self, model_name: str, snapshot: Callable[[], EngineSnapshot],
                 in_flight: Callable[[], int]) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        r, ln = self.registry, ["model_name"]
        self.ttft = Histogram("vllm:time_to_first_token_seconds",
                              "Time to first token (arrival to first token out).", ln,
                              buckets=_TTFT, registry=r).labels(model_name)
        self.tpot = Histogram("vllm:time_per_output_token_seconds",
                              "Mean time per output token after the first, per request.", ln,
                              buckets=_TPOT, registry=r).labels(model_name)
        self.itl = Histogram("vllm:inter_token_latency_seconds",
                             "Time between consecutive output tokens.", ln,
                             buckets=_TPOT, registry=r).labels(model_name)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds",
                             "End-to-end request latency.", ln, buckets=_E2E,
                             registry=r).labels(model_name)
        self.queue = Histogram("vllm:request_queue_time_seconds",
                               "Time a request waited before it was first scheduled.", ln,
                               buckets=_E2E, registry=r).labels(model_name)
        self.prompt_len = Histogram("vllm:request_prompt_tokens", "Prompt tokens per request.",
                                    ln, buckets=_TOKENS, registry=r).labels(model_name)
        self.gen_len = Histogram("vllm:request_generation_tokens",
                                 "Generated tokens per request.", ln, buckets=_TOKENS,
                                 registry=r).labels(model_name)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed.", ln,
                                     registry=r).labels(model_name)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.", ln,
                                         registry=r).labels(model_name)
        self.success = Counter("vllm:request_success", "Finished requests by finish reason.",
                               ["model_name", "finished_reason"], registry=r)
        self.http_rejected = Counter("jaxllm:requests_rejected",
                                     "Requests refused by back-pressure (429).", ln,
                                     registry=r).labels(model_name)
        self.http_errors = Counter("jaxllm:request_errors", "Requests answered with an error.",
                                   ["model_name", "status"], registry=r)
        r.register(_EngineCollector(snapshot, model_name, in_flight))

    def request(self, prompt_len: int) -> "RequestTimer":
        """Start timing one engine request (call at arrival)."""
        return RequestTimer(self, prompt_len)


class RequestTimer:
    """Observes one engine request's latencies as its outputs arrive."""

    def __init__(self, metrics: Metrics, prompt_len: int) -> None:
        self.m = metrics
        self.prompt_len = prompt_len
        self.arrival = time.monotonic()
        self.first: float | None = None
        self.last: float | None = None
        self.tokens = 0
        self.done = False

    def on_output(self, out: RequestOutput, scheduled_at: float | None = None) -> None:
        """Record the tokens that ``out`` (cumulative) adds; finish on the last output."""
        now = time.monotonic()
        total = sum(len(o.token_ids) for o in out.outputs)
        new = total - self.tokens
        if new > 0:
            if self.first is None:
                self.first = now
                self.m.ttft.observe(now - self.arrival)
                if scheduled_at is not None:
                    self.m.queue.observe(max(0.0, scheduled_at - self.arrival))
                new -= 1
            if new > 0 and self.last is not None:
                gap = (now - self.last) / new  # several tokens can come in one dispatch
                for _ in range(new):
                    self.m.itl.observe(gap)
            self.last = now
            self.tokens = total
        if out.finished:
            self.finish(out.outputs[0].finish_reason or "abort")

    def finish(self, reason: str) -> None:
        """Record the request's end (idempotent)."""
        if self.done:
            return
        self.done = True
        now = time.monotonic()
        self.m.e2e.observe(now - self.arrival)
        self.m.prompt_tokens.inc(self.prompt_len)
        self.m.generation_tokens.inc(self.tokens)
        self.m.prompt_len.observe(self.prompt_len)
        self.m.gen_len.observe(self.tokens)
        if self.first is not None and self.tokens > 1:
            self.m.tpot.observe((now - self.first) / (self.tokens - 1))
        self.m.success.labels(self.m.model_name, reason).inc()
