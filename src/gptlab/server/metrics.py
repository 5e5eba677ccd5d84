"""Prometheus metrics of one server (its own registry, so several apps in one process do not collide)."""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

# Latency buckets from a fast GPU step (~ms) to a loaded CPU (seconds).
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ServerMetrics:
    """Request, token and latency counters; queue length and running rows are read from the engine at scrape."""

    def __init__(self, engine_stats: Callable[[], dict[str, Any]]) -> None:
        disable_created_metrics()  # the *_created series only double the scrape for nothing here
        self.registry = r = CollectorRegistry()
        self.requests = Counter("gptlab_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("gptlab_prompt_tokens", "prompt tokens received", registry=r)
        self.generation_tokens = Counter("gptlab_generation_tokens", "tokens generated", registry=r)
        self.rows_finished = Counter("gptlab_rows_finished", "generated rows (choices) by finish reason",
                                     ["reason"], registry=r)
        self.ttft = Histogram("gptlab_time_to_first_token_seconds", "request arrival to a row's first token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram("gptlab_inter_token_latency_seconds", "time between consecutive tokens of a row",
                             buckets=_ITL_BUCKETS, registry=r)
        self.queue = Gauge("gptlab_queue_length", "rows waiting for a slot in the running batch", registry=r)
        self.running = Gauge("gptlab_running_rows", "rows in the running batch", registry=r)
        self._stats = engine_stats
        self.queue.set_function(lambda: float(self._stat("queue_len")))
        self.running.set_function(lambda: float(self._stat("running_rows")))

    def _stat(self, key: str) -> float:
        try:
            return float(self._stats().get(key, 0) or 0)
        except Exception:  # an engine still loading (or gone) has no queue
            return 0.0

    def render(self) -> bytes:
        return generate_latest(self.registry)
