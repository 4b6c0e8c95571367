"""Server metrics, exported in the Prometheus text format by `prometheus_client`.

Each `Metrics` has its own registry, so several servers (or tests) in one process do not share counts. The
engine and the app write; /metrics reads `expose()`.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """Every metric the server exports (the names are the /metrics series)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.ready = Gauge("fastdit_ready", "1 once the model is loaded and warmed up, else 0.", registry=r)
        self.queue_depth = Gauge("fastdit_queue_depth", "Generation requests waiting in the queue.", registry=r)
        self.requests = Counter(
            "fastdit_requests",
            "Generation requests by HTTP status; 499 means the client went away before the answer.",
            ["status"],
            registry=r,
        )
        self.dropped = Counter(
            "fastdit_requests_dropped",
            "Requests whose client disconnected, by stage: queued (dropped unrun) or running.",
            ["stage"],
            registry=r,
        )
        self.images_generated = Counter("fastdit_images_generated", "Images generated.", registry=r)
        self.step_seconds = Histogram(
            "fastdit_step_seconds",
            "Wall time of one denoising step of a batch.",
            buckets=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
            registry=r,
        )
        self.batch_seconds = Histogram(
            "fastdit_batch_seconds",
            "Wall time of one pipeline call (text encoding, denoising, VAE decode).",
            buckets=[0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300],
            registry=r,
        )
        self.batch_images = Histogram(
            "fastdit_batch_images", "Images per pipeline call.", buckets=[1, 2, 4, 8, 16, 32, 64], registry=r
        )
        self.cached_steps = Counter(
            "fastdit_cached_steps",
            "Denoising steps whose middle DiT blocks the step cache (--cache) skipped.",
            registry=r,
        )
        self.batch_requests = Histogram(
            "fastdit_batch_requests",
            "Requests merged into one pipeline call.",
            buckets=[1, 2, 4, 8, 16, 32, 64],
            registry=r,
        )

    def expose(self) -> str:
        return generate_latest(self.registry).decode()
