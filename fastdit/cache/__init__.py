"""Step caching: skip the middle DiT blocks of steps whose first blocks' output barely changed (DBCache /
First-Block Cache, optionally extrapolated as in TaylorSeer), on one GPU and under CFG, tensor and sequence
parallelism, compiled or replayed from CUDA graphs.

- config.py: `StepCache` (what to cache; its compact text form) and fixed schedules; no torch;
- loop.py:   `CachedLoop`, one call's decisions, and `Workspace`, the device buffers (and CUDA graphs);
- cli.py:    the `--cache` flag of generate and serve.

The model side is `QwenImageTransformer.run_segment`; pipelines get a call's loop from
`DiTPipeline.cached_loop` and pass it to the DiT as `cache=`.
"""

from fastdit.cache.config import StepCache, parse_schedule

__all__ = ["StepCache", "parse_schedule"]
