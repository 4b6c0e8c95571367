"""What every fastdit pipeline shares: the DiT and its fast paths (compile, CUDA graph), stage timing.

Each pipeline (text-to-image, edit, Qwen-Image 2.1) reduces to: encode conditions -> build the step (a closure
over the step plan) -> `fastdit.pipelines.loop.denoise` -> decode. This base holds the parts that do not depend
on the task: switching the DiT's fast paths on, and turning a step function into one replayed from a CUDA graph.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch

from fastdit.errors import FastditError
from fastdit.memory.place import Placement
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


class DiTPipeline:
    """Base of the pipelines: `transformer` (a DiT, or fastdit.parallel's wrapper of one), `device`, `dtype`."""

    def __init__(self, *, transformer, device, dtype):
        self.transformer = transformer
        self.device = torch.device(device)
        self.dtype = dtype
        self.cuda_graph = False  # see enable_cuda_graph
        self._graph_key, self._graph = None, None
        self._graph_lock = threading.Lock()
        # The run-time side of a memory plan (fastdit.memory): brackets text encoding and VAE decoding.
        self.memory = Placement()

    def compile(self):
        """Compile the DiT block by block (`fastdit.compile_blocks`): full-graph, one warm-up for all blocks.

        The first call at a new image size or text length compiles (seconds); later ones reuse the graph."""
        compile_blocks(self.transformer)
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
        with self._graph_lock:
            if self._graph_key != key:  # the old graph (and its memory) goes first, before the new one records
                self._graph_key, self._graph = key, None
                self._graph = CudaGraphStep(fn)
            return self._graph
