"""Prometheus metrics for `GET /metrics`, one registry per app (tests run several apps).

Names follow vLLM's where the meaning is the same (time to first token, time per output
token, end-to-end latency, running and waiting sequences, prefix cache queries and hits: the hit
rate is hits / queries), prefixed `llmquant:`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
TPOT_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                1.0, 2.5)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("llmquant:requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("llmquant:prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("llmquant:generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter("llmquant:sequences_finished", "Sequences finished, by reason", ["finish_reason"],
                                registry=r)
        self.ttft = Histogram("llmquant:time_to_first_token_seconds", "Time from arrival to the first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("llmquant:time_per_output_token_seconds", "Time between consecutive output tokens",
                              buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("llmquant:e2e_request_latency_seconds", "Time from arrival to the last token",
                             buckets=E2E_BUCKETS, registry=r)
        running = Gauge("llmquant:num_requests_running", "Sequences being prefilled or decoded", registry=r)
        waiting = Gauge("llmquant:num_requests_waiting", "Sequences waiting to be admitted", registry=r)
        running.set_function(lambda: engine.num_running)
        waiting.set_function(lambda: engine.num_waiting)
        r.register(_PrefixCacheCounters(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _PrefixCacheCounters:
    """The engine's prefix-cache counters, read at each scrape (the engine counts; a Counter here
    would need the engine to call into the app)."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        yield CounterMetricFamily("llmquant:prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                  value=getattr(self.engine, "prefix_cache_queries", 0))
        yield CounterMetricFamily("llmquant:prefix_cache_hits",
                                  "Prompt tokens whose keys and values came from the prefix cache",
                                  value=getattr(self.engine, "prefix_cache_hits", 0))
