"""The server's Prometheus metrics (``/metrics``), kept in a registry of the server's own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)


class Metrics:
    """Counters, gauges and histograms of one server. Gauges of the loop's state are read when
    ``/metrics`` is scraped, from the callables given here."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, waiting, running, slots: int, healthy):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("tpllama_http_requests", "HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("tpllama_prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self.generation_tokens = Counter("tpllama_generation_tokens", "Tokens generated.", registry=r)
        self.aborted = Counter("tpllama_requests_aborted", "Requests aborted (client gone).", registry=r)
        self.ttft = Histogram("tpllama_time_to_first_token_seconds", "Time from arrival to first token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("tpllama_time_per_output_token_seconds",
                              "Mean time per output token after the first, per request.", buckets=TPOT_BUCKETS, registry=r)
        Gauge("tpllama_requests_waiting", "Requests queued for a KV-cache slot.", registry=r).set_function(waiting)
        Gauge("tpllama_requests_running", "Requests decoding in a KV-cache slot.", registry=r).set_function(running)
        Gauge("tpllama_kv_slots", "KV-cache slots (--max-batch).", registry=r).set(slots)
        Gauge("tpllama_healthy", "1 while every rank is up.", registry=r).set_function(lambda: float(healthy()))

    def count_request(self, endpoint: str, status: int) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
