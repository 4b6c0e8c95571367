"""Server metrics in the Prometheus text exposition format (version 0.0.4), without a dependency.

Three instrument kinds, each thread-safe: `Counter` (optionally with one label), `Gauge` (a value
read from a function at scrape time) and `Histogram` (cumulative buckets, sum, count).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if value != int(value) else str(int(value))


class Counter:
    def __init__(self, name: str, help: str, label: str | None = None):
        self.name, self.help, self.label = name, help, label
        self._values: dict[str, float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, label_value: str = "") -> None:
        with self._lock:
            self._values[label_value] = self._values.get(label_value, 0.0) + amount

    def expose(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        with self._lock:
            values = dict(self._values) if self._values or self.label else {"": 0.0}
        for label_value, value in sorted(values.items()):
            labels = f'{{{self.label}="{label_value}"}}' if self.label else ""
            lines.append(f"{self.name}{labels} {_fmt(value)}")
        return lines


class Gauge:
    def __init__(self, name: str, help: str):
        self.name, self.help = name, help
        self._read: Callable[[], float] = lambda: 0.0

    def set_function(self, read: Callable[[], float]) -> None:
        self._read = read

    def expose(self) -> list[str]:
        return [
            f"# HELP {self.name} {self.help}",
            f"# TYPE {self.name} gauge",
            f"{self.name} {_fmt(self._read())}",
        ]


class Histogram:
    def __init__(self, name: str, help: str, buckets: Iterable[float]):
        self.name, self.help = name, help
        self.bounds = sorted(buckets) + [math.inf]
        self._counts = [0] * len(self.bounds)  # per bucket, not cumulative
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self._sum += value
            for i, bound in enumerate(self.bounds):
                if value <= bound:
                    self._counts[i] += 1
                    break

    def expose(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative = 0
        for bound, count in zip(self.bounds, counts, strict=True):
            cumulative += count
            lines.append(f'{self.name}_bucket{{le="{_fmt(bound)}"}} {cumulative}')
        lines += [f"{self.name}_sum {_fmt(total)}", f"{self.name}_count {cumulative}"]
        return lines


class Metrics:
    """Every metric the server exports. The engine and the app write; /metrics reads."""

    def __init__(self):
        self.ready = Gauge("fastdit_ready", "1 once the model is loaded and warmed up, else 0.")
        self.queue_depth = Gauge("fastdit_queue_depth", "Generation requests waiting in the queue.")
        self.requests = Counter(
            "fastdit_requests_total",
            "Generation requests by HTTP status; 499 means the client went away before the answer.",
            label="status",
        )
        self.dropped = Counter(
            "fastdit_requests_dropped_total",
            "Requests whose client disconnected, by stage: queued (dropped unrun) or running.",
            label="stage",
        )
        self.images_generated = Counter("fastdit_images_generated_total", "Images generated.")
        self.step_seconds = Histogram(
            "fastdit_step_seconds",
            "Wall time of one denoising step of a batch.",
            [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
        )
        self.batch_seconds = Histogram(
            "fastdit_batch_seconds",
            "Wall time of one pipeline call (text encoding, denoising, VAE decode).",
            [0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300],
        )
        self.cached_steps = Counter(
            "fastdit_cached_steps_total", "Denoising steps whose middle DiT blocks the step cache (--cache) skipped."
        )
        self.batch_images = Histogram("fastdit_batch_images", "Images per pipeline call.", [1, 2, 4, 8, 16, 32, 64])
        self.batch_requests = Histogram(
            "fastdit_batch_requests", "Requests merged into one pipeline call.", [1, 2, 4, 8, 16, 32, 64]
        )

    def expose(self) -> str:
        instruments = [
            self.ready,
            self.queue_depth,
            self.requests,
            self.dropped,
            self.images_generated,
            self.cached_steps,
            self.step_seconds,
            self.batch_seconds,
            self.batch_images,
            self.batch_requests,
        ]
        return "\n".join(line for m in instruments for line in m.expose()) + "\n"
