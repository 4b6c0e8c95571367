"""One function of fixed-shape tensors, replayed from a CUDA graph.

A DiT step launches about 2000 kernels; from Python that takes longer than the GPU needs for the small ones,
so the GPU waits between them (measured in benchmarks/RESULTS.md). A CUDA graph
records the launches once and replays them with one call.

`CudaGraphStep(fn)` wraps fn(*tensors) -> a tensor or a tuple of tensors. Its first call runs fn on a side stream
(compiling, building cuDNN plans, returning the real output) and then records fn into a graph over private copies
of the arguments; each later call copies its arguments into those copies and replays. Later arguments must have the
first call's shapes and dtypes; whoever holds one `CudaGraphStep` keys it by them (fastdit.pipelines.qwenimage). The
returned tensors are the graph's memory: the next call overwrites them.

An argument that is the very tensor object copied in last time is not copied again: what stays fixed for all the
steps of a call (text states; Qwen-Image 2.1's prefix K/V cache, gigabytes) is copied once per call, not once per
step. So arguments must not be modified in place between calls: pass a new tensor for new values.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import Tensor

from fastdit.errors import FastditError


class CudaGraphStep:
    def __init__(self, fn: Callable[..., Tensor | tuple[Tensor, ...]], warmup: int = 1):
        self.fn, self.warmup = fn, warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: list[Tensor | None] = []
        self.sources: list[weakref.ref | None] = []  # the tensor last copied into each input
        self.output: Tensor | tuple[Tensor, ...] | None = None

    def __call__(self, *args: Tensor | None) -> Tensor | tuple[Tensor, ...]:
        if self.graph is None:
            return self._capture(args)
        for i, (static, arg) in enumerate(zip(self.inputs, args, strict=True)):
            if static is not None and (self.sources[i] is None or self.sources[i]() is not arg):
                static.copy_(arg)
                self.sources[i] = weakref.ref(arg)
        self.graph.replay()
        return self.output

    def _capture(self, args) -> Tensor | tuple[Tensor, ...]:
        if any(a is not None and not a.is_cuda for a in args):
            raise FastditError("CUDA graphs need the step's tensors on a CUDA device")
        # None stays None (an absent optional input); clone keeps the strides of dense tensors.
        self.inputs = [None if a is None else a.clone() for a in args]
        self.sources = [None if a is None else weakref.ref(a) for a in args]
        main = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):  # capture wants the lazy first-call work done off the default stream
            for _ in range(self.warmup):
                out = self.fn(*self.inputs)
        main.wait_stream(side)
        for t in out if isinstance(out, tuple) else (out,):
            t.record_stream(main)  # allocated on the side stream, used and freed on this one
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.output = self.fn(*self.inputs)
        self.graph = graph
        return out
