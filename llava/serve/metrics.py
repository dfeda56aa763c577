"""Prometheus metrics of the API server, served as text at ``GET /metrics``.

One :class:`ServerMetrics` per server holds its own registry (two servers in one process do not mix their
counts). It is the batching engine's observer (:class:`~llava.serve.batching.EngineObserver`) and the app
reports each answered request to it. Metric names start with ``slowfast_``:

* ``slowfast_requests_total{route,status}``: answered requests by route and HTTP status (refusals included);
* ``slowfast_requests_open``: requests held (reading, decoding, queued or generating; ``--max-queue`` bounds
  it); ``slowfast_engine_jobs``: of those, queued or generating; ``slowfast_reserved_bytes``: memory reserved
  by them (``--max-inflight-mb`` bounds it);
* ``slowfast_batch_size``: rows per generation batch (histogram);
* ``slowfast_prompt_tokens_total``, ``slowfast_generation_tokens_total``: tokens read and generated;
* ``slowfast_videos_encoded_total``, ``slowfast_video_cache_hits_total``: videos and images through the
  vision tower, and those found in the cache instead;
* ``slowfast_decode_seconds``, ``slowfast_generation_seconds``, ``slowfast_time_to_first_token_seconds``:
  histograms of decoding one request's media, of a job from queueing to its end, of a request from arrival
  to its first token.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from llava.serve.batching import EngineObserver, Failed, Finished, GenerationJob

__all__ = ["CONTENT_TYPE", "ServerMetrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ServerMetrics(EngineObserver):
    """The server's metrics; ``open_requests``, ``engine_jobs`` and ``reserved_bytes`` are read when scraped."""

    def __init__(self, open_requests: Callable[[], float], engine_jobs: Callable[[], float],
                 reserved_bytes: Callable[[], float]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("slowfast_requests", "Answered requests by route and HTTP status", ["route", "status"],
                                registry=r)
        Gauge("slowfast_requests_open", "Requests held: reading, decoding, queued or generating",
              registry=r).set_function(open_requests)
        Gauge("slowfast_engine_jobs", "Requests queued for generation or generating", registry=r).set_function(
            engine_jobs)
        Gauge("slowfast_reserved_bytes", "Memory reserved by the requests held", registry=r).set_function(
            reserved_bytes)
        self.batch_size = Histogram("slowfast_batch_size", "Rows per generation batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.prompt_tokens = Counter("slowfast_prompt_tokens", "Prompt tokens read (text and fast tokens)",
                                     registry=r)
        self.generation_tokens = Counter("slowfast_generation_tokens", "Tokens generated", registry=r)
        self.videos_encoded = Counter("slowfast_videos_encoded", "Videos and images encoded by the vision tower",
                                      registry=r)
        self.cache_hits = Counter("slowfast_video_cache_hits", "Videos and images found in the cache", registry=r)
        self.decode_seconds = Histogram("slowfast_decode_seconds", "Decoding one request's videos and images",
                                        buckets=_SECONDS, registry=r)
        self.generation_seconds = Histogram("slowfast_generation_seconds", "A job from queueing to its end",
                                            buckets=_SECONDS, registry=r)
        self.first_token_seconds = Histogram("slowfast_time_to_first_token_seconds",
                                             "A request from arrival to its first token", buckets=_SECONDS,
                                             registry=r)

    # -- engine observer ------------------------------------------------------------------------------------
    def batch_started(self, size: int) -> None:
        self.batch_size.observe(size)

    def visuals_encoded(self, encoded: int, cache_hits: int) -> None:
        self.videos_encoded.inc(encoded)
        self.cache_hits.inc(cache_hits)

    def job_finished(self, job: GenerationJob, event: Finished | Failed, seconds: float) -> None:
        self.generation_seconds.observe(seconds)
        if isinstance(event, Finished):
            self.generation_tokens.inc(event.completion_tokens)

    # -- app ------------------------------------------------------------------------------------------------
    def answered(self, status: int, route: str) -> None:
        """A request to ``route`` (a route's pattern, or ``"other"``) was answered with ``status``."""
        self.requests.labels(route=route, status=str(status)).inc()

    def render(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)
