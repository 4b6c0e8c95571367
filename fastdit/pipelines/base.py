"""What every fastdit pipeline shares: the DiT and its fast paths (compile, CUDA graph), stage timing.

Each pipeline (text-to-image, edit, Qwen-Image 2.1) reduces to: encode conditions -> build the step (a closure
over the step plan) -> `fastdit.pipelines.loop.denoise` -> decode. This base holds the parts that do not depend
on the task: switching the DiT's fast paths on, and turning a step function into one replayed from a CUDA graph.
A step cache (fastdit.cache) hooks in the same way in every pipeline: `loop = self.cached_loop(cache, key, steps)`
once per call, `cache=loop` on every DiT call, not graphed as a whole (the loop replays its segments' graphs), and
`loop.cached_steps` into the call's `Images`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch

from fastdit.cache.config import StepCache
from fastdit.cache.loop import CachedLoop, Workspace
from fastdit.errors import ConfigError, FastditError
from fastdit.lora.pipeline import LoraPipelineMixin
from fastdit.memory.place import Placement
from fastdit.memory.plan import ORDER
from fastdit.pipelines.scheduler import check_scheduler_config
from fastdit.pipelines.vae import compile_decoder
from fastdit.runtime.compile import compile_blocks
from fastdit.runtime.cudagraph import CudaGraphStep


class StageClock:
    """Wall time of a call's stages, synchronised with the device so GPU work is counted where it happens."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = self.last = time.perf_counter()
        self.stages: dict[str, float] = {}

    def lap(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.stages[name] = now - self.last
        self.last = now

    def timings(self, steps: int) -> dict[str, float]:
        out = dict(self.stages)
        if "denoise_s" in out:
            out["denoise_s_per_step"] = out["denoise_s"] / steps
        out["total_s"] = self.last - self.start
        return out


class DiTPipeline(LoraPipelineMixin):
    """Base of the pipelines: `transformer` (a DiT, or fastdit.parallel's wrapper of one), `device`, `dtype`.
    LoRA methods (`load_lora`, `set_loras`, `fuse_loras`, `unload_loras`): fastdit.lora.pipeline."""

    # The images a call takes as `image=` (readable from the class, before loading): at most `max_images` (0: text
    # only; None: no fixed limit), at least one when `needs_image`. Such a pipeline's `output_size(images, ...)`
    # gives the (width, height) a call without height / width makes.
    max_images: int | None = 0
    memory_plans: tuple[str, ...] = ORDER  # the memory plans `from_pretrained(memory=)` takes (fastdit.memory)
    needs_image = False

    def __init__(self, *, transformer, device, dtype, text_encoder=None, vae=None, scheduler_config=None):
        self.transformer = transformer
        self.device = torch.device(device)
        self.dtype = dtype
        self.text_encoder = text_encoder
        self.vae = vae
        if scheduler_config is not None:
            check_scheduler_config(scheduler_config)
        self.scheduler_config = None if scheduler_config is None else dict(scheduler_config)
        self.latent_channels = None if vae is None else vae.config.z_dim
        self.cuda_graph = False  # see enable_cuda_graph
        self._graph_key, self._graph = None, None
        self._graph_lock = threading.Lock()
        self.compiled = False  # see compile
        self.step_cache: StepCache | None = None  # see enable_step_cache
        self._cache_key, self._cache_workspace = None, None
        # The run-time side of a memory plan (fastdit.memory): brackets text encoding and VAE decoding.
        self.memory = Placement()

    def compile(self, *, vae: bool | None = None):
        """Compile the DiT block by block (`fastdit.compile_blocks`): full-graph, one warm-up for all blocks.

        The first call at a new image size or text length compiles (seconds); later ones reuse the graph.
        `vae`: also compile the VAE's single-frame decoder (fastdit.pipelines.vae; its first decode at a size
        compiles: `fastdit bench --stage vae --compile` reports that warm-up). Default: on CUDA only (on the CPU the
        compile takes minutes and gains little)."""
        compile_blocks(self.transformer)
        if (self.device.type == "cuda" if vae is None else vae) and getattr(self, "vae", None) is not None:
            compile_decoder(self.vae)
        self.compiled = True
        return self

    def enable_cuda_graph(self):
        """Replay each denoising step from a CUDA graph (fastdit.runtime.cudagraph): the GPU no longer waits for
        Python to launch the step's ~2000 kernels. Per set of shapes, the first step of a call runs normally and
        is recorded; the graph is kept for later calls of the same shapes (one at a time: its activations stay in
        GPU memory). Works compiled or not, on every rank of a parallel run."""
        if self.device.type != "cuda":
            raise FastditError(f"CUDA graphs need a CUDA device; this pipeline runs on {self.device}")
        self.cuda_graph = True
        return self

    def graphed(self, key, fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """`fn` (tensor arguments only), or its CUDA graph for the shapes `key` when CUDA graphs are on. The graph
        reads every input from its arguments, so a graph recorded in an earlier call serves this one."""
        if not self.cuda_graph:
            return fn
        key = (key, self.lora_graph_key())  # a graph records which layers run LoRA side GEMMs
        with self._graph_lock:
            if self._graph_key != key:  # the old graph (and its memory) goes first, before the new one records
                self._graph_key, self._graph = key, None
                self._graph = CudaGraphStep(fn)
            return self._graph

    def enable_step_cache(self, cache: StepCache | None):
        """Run every call with this step cache (fastdit.cache.StepCache; None: none) unless the call passes its own
        `cache=`. Checked against the DiT's block count here."""
        if cache is not None:
            self._check_cache(cache)
        self.step_cache = cache
        return self

    def _check_cache(self, cache) -> None:
        if not isinstance(cache, StepCache):
            raise ConfigError(f"cache must be a fastdit.StepCache, got {type(cache).__name__}")
        cache.check_fits(self.transformer.base.cfg.num_layers)

    def cached_loop(self, cache: StepCache | None, key, steps: int) -> CachedLoop | None:
        """A call's step-cache loop: `cache`, else the pipeline's default (None: no cache). Its decisions start
        afresh; its device buffers, and with CUDA graphs the graphs of its segments, are kept for later calls with
        the same shapes (`key`) and cache, as `graphed` keeps the step's graph."""
        cache = self.step_cache if cache is None else cache
        if cache is None:
            return None
        self._check_cache(cache)
        if not self.cuda_graph:
            return CachedLoop(cache, steps, Workspace(cache, compiled=self.compiled))
        with self._graph_lock:
            if self._cache_key != (key, cache):
                self._cache_key, self._cache_workspace = (key, cache), None  # the old graphs go first
                self._cache_workspace = Workspace(cache, cuda_graph=True, compiled=self.compiled)
            return CachedLoop(cache, steps, self._cache_workspace)
