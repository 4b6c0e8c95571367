"""The engine: one worker thread owns the accelerator and runs batched pipeline calls.

- Each HTTP request becomes a `Job` in a bounded FIFO queue; a full queue raises `QueueFull` and the
  app answers 429 with Retry-After.
- The worker takes the oldest job plus every other queued job with the same `BatchKey` (size, steps,
  CFG scale, with/without negative prompt, adapters, an edit's reference images) up to `max_batch`
  images, and runs them as ONE pipeline call: prompts are expanded to one entry per image with one
  seed per image, so each denoising step is one DiT forward over the whole batch. Jobs that arrive
  while a batch runs are batched into the next call; there is no batching window that would delay a
  lone request.
- A job's `concurrent.futures.Future` carries the result. The worker moves it to RUNNING when it takes
  the job, so a queued job can be cancelled (dropped) and a running one cannot; a running job whose
  client went away is marked `abandoned`, and a batch whose jobs are all abandoned stops at the next
  step.
- A failing batch of several jobs is retried one job at a time, so an exception (CUDA OOM, bad input)
  fails only the request that causes it. The failed call's memory is given back first: its frames (and the
  tensors they hold) are cleared from the exception's traceback, then the allocator's cache is emptied.
- The generator is loaded and warmed up on the worker thread, so the server can answer /health (503)
  while a large checkpoint loads. A generator that raises `GeneratorBroken` (it can run no more calls), or
  a sticky device error (a CUDA device-side assert or illegal address: every later kernel fails too), stops
  the engine as a load failure does: /health reports "failed" and the process exits non-zero, so that a
  supervisor restarts it.
"""

from __future__ import annotations

import collections
import logging
import math
import secrets
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from PIL import Image

from fastdit.errors import FastditError
from fastdit.server.metrics import Metrics
from fastdit.validation import SEED_LIMIT, image_seeds

log = logging.getLogger("fastdit.server")

# Messages of CUDA errors after which the context is unusable: every later call fails the same way.
STICKY_DEVICE_ERRORS = (
    "device-side assert",
    "illegal memory access",
    "illegal address",
    "illegal instruction",
    "misaligned address",
    "unspecified launch failure",
    "uncorrectable ecc error",
)


def is_sticky_device_error(error: BaseException) -> bool:
    """Whether `error` left the accelerator unusable for the rest of the process (not an out-of-memory)."""
    return isinstance(error, RuntimeError) and any(m in str(error).lower() for m in STICKY_DEVICE_ERRORS)


class Generator(Protocol):
    """What the engine runs: a pipeline's `__call__` (the prompt passed by keyword), or a fake in tests. An edit's
    reference images come as `image=`, only to a generator whose `max_images` allows them (fastdit.server.edits);
    one that `needs_image` is warmed up with a grey image."""

    def __call__(
        self,
        prompt: str | list[str],
        *,
        image: list[Image.Image] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int = 1024,
        width: int = 1024,
        num_inference_steps: int = 50,
        true_cfg_scale: float = 4.0,
        seed: int | list[int] | None = None,
        num_images_per_prompt: int = 1,
        scheduler: str = "checkpoint",
        progress: Callable[[int, int], None] | None = None,
        show_progress: bool = True,
    ) -> list[Image.Image]: ...


class QueueFull(Exception):
    """The queue holds `max_queue` jobs; retry after `retry_after` seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the request queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


class EngineClosed(Exception):
    """The server is shutting down (or the model failed to load) and takes no more jobs."""


class GeneratorBroken(Exception):
    """Raised by a generator that can run no more calls (e.g. the ranks of a multi-rank pipeline are out
    of step after a failed call): the engine fails the batch, stops, and reports it as `load_error`."""


class BatchKey(NamedTuple):
    """Jobs with equal keys share one pipeline call."""

    width: int
    height: int
    steps: int
    cfg_scale: float
    has_negative: bool  # the pipeline takes a list of negative prompts or None, never a mix
    scheduler: str
    loras: tuple[tuple[str, float], ...] = ()  # LoRA adapters and scales: one set per call (fastdit.server.lora)
    images: str = ""  # an edit's reference images (their digest): one set per call; "" for text-to-image


class _BatchAbandoned(Exception):
    """Raised from the progress callback to stop a batch whose clients have all gone away."""


@dataclass(eq=False)
class Job:
    """One request: `n` images of one prompt. Compared by identity (it is removed from the queue by
    identity)."""

    prompt: str
    negative_prompt: str | None
    n: int
    width: int
    height: int
    steps: int
    cfg_scale: float
    seed: int | None = None  # None: a random seed per image, reported nowhere
    loras: tuple[tuple[str, float], ...] = ()
    scheduler: str = "checkpoint"  # the pipeline's sampling schedule (validation.SCHEDULER_STEPS)
    images: tuple[Image.Image, ...] = ()  # an edit's reference images, decoded; () for text-to-image
    image_key: str = ""  # identifies `images` (a digest of the uploaded files): equal keys, equal images
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    future: Future[list[Image.Image]] = field(default_factory=Future)
    # Written by the worker, read by the app for progress reports.
    step: int = 0
    total: int = 0
    # Called from the worker thread with (step, total) after each denoising step (the app's event streams).
    listeners: list[Callable[[int, int], None]] = field(default_factory=list)
    abandoned: bool = False  # the client went away while the job ran
    seeds: list[int] = field(init=False)  # one per image, from `seed`

    def __post_init__(self):
        # The pipeline runs true CFG only when cfg_scale > 1 AND a negative prompt is given. Otherwise
        # both are moot: normalize them, so such jobs share one batch key and the pipeline does not
        # warn about an ineffective scale.
        if self.negative_prompt is None or self.cfg_scale <= 1:
            self.negative_prompt, self.cfg_scale = None, 1.0
        # One seed per image: image i of a seeded request uses seed + i, so n=4 with seed s gives
        # the same images as four n=1 requests with seeds s..s+3.
        self.seeds = image_seeds(secrets.randbelow(SEED_LIMIT) if self.seed is None else self.seed, self.n)

    @property
    def key(self) -> BatchKey:
        return BatchKey(
            self.width,
            self.height,
            self.steps,
            self.cfg_scale,
            self.negative_prompt is not None,
            self.scheduler,
            self.loras,
            self.image_key,
        )


@dataclass(frozen=True)
class Warmup:
    """One short generation run before /health turns 200 (allocator, kernels, compile caches)."""

    width: int = 512
    height: int = 512
    steps: int = 2

    def image(self) -> Image.Image:
        """The reference image of an edit model's warmup: grey, at the warmup size."""
        return Image.new("RGB", (self.width, self.height), (128, 128, 128))


class Engine:
    """Owns the generator and the worker thread. `start()` once, `close()` + `join()` to stop."""

    def __init__(
        self,
        load: Callable[[], Generator],
        *,
        max_queue: int = 64,
        max_batch: int = 8,
        warmup: Warmup | None = None,
        metrics: Metrics | None = None,
        on_load_error: Callable[[BaseException], None] | None = None,
    ):
        if max_queue < 1 or max_batch < 1:
            raise ValueError(f"max_queue ({max_queue}) and max_batch ({max_batch}) must be >= 1")
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.metrics = metrics or Metrics()
        self.ready = threading.Event()  # set once the generator is loaded and warmed up
        self.load_error: BaseException | None = None
        self.generator: Generator | None = None  # once loaded
        self._load = load
        self._warmup = warmup
        self._on_load_error = on_load_error
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._last_batch_s = 1.0  # for Retry-After
        self._thread = threading.Thread(target=self._run, name="fastdit-engine", daemon=True)
        self.metrics.queue_depth.set_function(lambda: len(self._queue))
        self.metrics.ready.set_function(lambda: float(self.ready.is_set()))

    # ---- called from the server's event loop --------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue `job`; raises `QueueFull` or `EngineClosed`."""
        with self._cond:
            if self._closed:
                raise EngineClosed("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                # Roughly how long until a slot frees: one batch.
                raise QueueFull(retry_after=max(1, min(60, math.ceil(self._last_batch_s))))
            self._queue.append(job)
            self._cond.notify()

    def cancel(self, job: Job) -> str:
        """The client of `job` went away. Returns 'queued' if the job was dropped from the queue,
        'running' if it runs (its result is discarded), 'done' if it already finished."""
        with self._cond:
            if job in self._queue:
                self._queue.remove(job)
                job.future.cancel()
                return "queued"
        if job.future.done():
            return "done"
        job.abandoned = True
        return "running"

    def close(self) -> None:
        """Take no more jobs and fail the queued ones; the running batch finishes."""
        with self._cond:
            self._closed = True
            dropped = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in dropped:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(EngineClosed("the server is shutting down"))

    def join(self, timeout: float | None = None) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- the worker thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            generator = self._load()
            if self._warmup is not None:
                w = self._warmup
                t0 = time.perf_counter()
                edit = {"image": [w.image()]} if getattr(generator, "needs_image", False) else {}
                generator(
                    prompt="warmup",
                    **edit,
                    width=w.width,
                    height=w.height,
                    num_inference_steps=w.steps,
                    true_cfg_scale=1.0,
                    seed=0,
                    show_progress=False,
                )
                log.info(
                    "warmup (%dx%d, %d steps) took %.2f s",
                    w.width,
                    w.height,
                    w.steps,
                    time.perf_counter() - t0,
                )
        except BaseException as e:  # noqa: BLE001 - reported to the CLI, which exits with it
            log.error("loading the model failed: %s: %s", type(e).__name__, e)
            self._fail(e)
            return
        self.generator = generator
        self.ready.set()
        log.info("engine ready (max batch %d images, queue %d requests)", self.max_batch, self.max_queue)
        while (batch := self._next_batch()) is not None:
            self._run_batch(generator, batch)
        log.info("engine stopped")

    def _fail(self, error: BaseException) -> None:
        """Stop for good: record the error for the CLI, fail the queued jobs, tell the server."""
        self.load_error = error
        self.ready.clear()
        self.close()
        if self._on_load_error is not None:
            self._on_load_error(error)

    def _next_batch(self) -> list[Job] | None:
        """Wait for a job; take it and the queued jobs that can share its pipeline call."""
        with self._cond:
            while True:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return None
                head = self._queue.popleft()
                batch, images = [head], head.n
                for job in list(self._queue):
                    if job.key == head.key and images + job.n <= self.max_batch:
                        self._queue.remove(job)
                        batch.append(job)
                        images += job.n
                # From here on the jobs cannot be cancelled; one cancelled meanwhile is skipped.
                batch = [job for job in batch if job.future.set_running_or_notify_cancel()]
                if batch:
                    return batch

    def _run_batch(self, generator: Generator, jobs: list[Job]) -> None:
        """Run `jobs` as one call and resolve their futures. If a call of several jobs fails, each
        job is run alone, so only the job that causes the failure gets it."""
        try:
            results = self._generate(generator, jobs)
        except _BatchAbandoned:
            log.info("batch of %d requests stopped: every client went away", len(jobs))
            for job in jobs:
                job.future.set_exception(EngineClosed("the client went away"))
            return
        except GeneratorBroken as e:
            log.error("the generator broke, stopping: %s", e)
            for job in jobs:
                job.future.set_exception(e)
            self._fail(e)
            return
        except Exception as e:
            if is_sticky_device_error(e):
                log.error("the device failed, stopping: %s: %s", type(e).__name__, e)
                for job in jobs:
                    job.future.set_exception(e)
                self._fail(e)
                return
            _free_accelerator_memory(e)
            if len(jobs) == 1:
                if isinstance(e, FastditError):  # bad input that slipped past the app's checks: one line
                    log.warning("request %s refused: %s", jobs[0].id, e)
                else:
                    log.exception("generation failed for request %s", jobs[0].id)
                jobs[0].future.set_exception(e)
                return
            log.warning(
                "a batch of %d requests failed (%s: %s); running them one by one",
                len(jobs),
                type(e).__name__,
                e,
            )
            for job in jobs:
                self._run_batch(generator, [job])
            return
        for job, images in zip(jobs, results, strict=True):
            job.future.set_result(images)

    def _generate(self, generator: Generator, jobs: list[Job]) -> list[list[Image.Image]]:
        """One pipeline call for `jobs` (all with the same key); returns each job's images."""
        key = jobs[0].key
        # One entry per image: the pipeline then batches n images of every job in one forward.
        prompts = [job.prompt for job in jobs for _ in range(job.n)]
        negatives = [job.negative_prompt for job in jobs for _ in range(job.n)] if key.has_negative else None
        seeds = [seed for job in jobs for seed in job.seeds]
        last_tick: float | None = None

        def progress(step: int, total: int) -> None:
            nonlocal last_tick
            now = time.perf_counter()
            if last_tick is not None:  # the interval before the first tick includes text encoding
                self.metrics.step_seconds.observe(now - last_tick)
            last_tick = now
            for job in jobs:
                job.step, job.total = step, total
                for listener in job.listeners:
                    listener(step, total)
            if all(job.abandoned for job in jobs):
                raise _BatchAbandoned

        extra = {"loras": dict(key.loras)} if key.loras else {}  # a generator without adapters never sees it
        if jobs[0].images:  # an edit: the key holds the images' digest, so every job has the same images
            extra["image"] = list(jobs[0].images)
        t0 = time.perf_counter()
        images = generator(
            prompt=prompts,
            negative_prompt=negatives,
            height=key.height,
            width=key.width,
            num_inference_steps=key.steps,
            true_cfg_scale=key.cfg_scale,
            seed=seeds,
            num_images_per_prompt=1,
            scheduler=key.scheduler,
            progress=progress,
            show_progress=False,
            **extra,
        )
        if len(images) != len(prompts):
            raise RuntimeError(f"the pipeline returned {len(images)} images for {len(prompts)} prompts")
        elapsed = time.perf_counter() - t0
        self._last_batch_s = elapsed
        self.metrics.batch_seconds.observe(elapsed)
        self.metrics.batch_images.observe(len(prompts))
        self.metrics.batch_requests.observe(len(jobs))
        self.metrics.images_generated.inc(len(prompts))
        self.metrics.cached_steps.inc(getattr(images, "cached_steps", 0))
        results, start = [], 0
        for job in jobs:
            results.append(images[start : start + job.n])
            start += job.n
        return results


def _free_accelerator_memory(error: BaseException) -> None:
    """After a failure (often CUDA OOM), give its memory back before the next batch: the exception (kept in the
    job's future for the answer) would otherwise hold the failed call's frames and their tensors alive."""
    traceback.clear_frames(error.__traceback__)
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
