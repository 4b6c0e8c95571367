"""fastdit's OpenAI-compatible image server: `engine` (batching worker), `app` (HTTP API), `run` (socket and
uvicorn), `cli` (`fastdit serve`), `ranks` (multi-GPU serving), `metrics` and `static/` (the web page at /).
Nothing is imported here, so `fastdit --help` loads no fastapi or uvicorn."""
