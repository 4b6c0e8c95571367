"""fastdit's OpenAI-compatible image server: `engine` (batching worker), `app` (HTTP API), `cli`
(`fastdit serve`), `metrics` (Prometheus text) and `static/` (the web page at /)."""

from fastdit.server.app import create_app
from fastdit.server.engine import Engine, Generator, Job, Warmup

__all__ = ["Engine", "Generator", "Job", "Warmup", "create_app"]
