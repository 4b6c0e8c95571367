"""What one `fastdit bench` run measures: the flags as a plain dataclass, so the stages take explicit values."""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class BenchConfig:
    stage: str = "dit"
    preset: str = "qwen-image"
    height: int = 1024
    width: int = 1024
    text_len: int = 128
    batch: int = 1
    no_cfg: bool = False
    uncond_text_len: int | None = None
    padding: str = "lengths"
    compile: str | None = None  # None, "regional" or "full"
    modulation: str = "table"
    cuda_graph: bool = False
    compare: str | None = None
    attention: str = "auto"
    quantize: str | None = None
    profile: bool = False
    warmup: int = 3
    iters: int = 10
    dtype: str = "bf16"
    seed: int = 0
    lora_rank: tuple[int, ...] | None = None  # fastdit.bench.lora: the ranks to time, one after the other
    loras: int = 1
    steps: int | None = None  # --stage pipeline / --cache-schedule: denoising steps (None: the default)
    scheduler: str = "checkpoint"  # --stage pipeline: sampling schedule (validation.SCHEDULER_STEPS)
    family: str = "qwen-image"  # fastdit.bench.family
    condition_images: int = 0
    cache_schedule: str | None = None  # fastdit.bench.cache: a fixed step-cache schedule over `steps` steps
    cache: object = None  # a fastdit.cache.StepCache (front / back blocks) for cache_schedule; None: its defaults
    task: str = "t2i"  # "edit": the Edit-2511 step with reference images (fastdit.bench.edit)
    refs: int = 1

    @classmethod
    def from_args(cls, args) -> BenchConfig:
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
