"""Counting and timing for `fastdit bench`: FLOPs of a DiT step, CUDA-event timings, profiles, the matmul ceiling."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from fastdit.models.qwenimage import DiTConfig
from fastdit.runtime.cudagraph import CudaGraphStep


def dit_flops(cfg: DiTConfig, batch: int, n_img: int, n_txt: int) -> float:
    """FLOPs of one DiT forward (matmuls and attention; elementwise work is not counted)."""
    d = cfg.dim
    per_token = 2 * (3 * d * d + d * d + 2 * cfg.mlp_ratio * d * d)  # QKV, out-proj, MLP
    s = n_img + n_txt
    per_block = batch * (n_img + n_txt) * per_token + 4 * batch * s * s * d  # + QK^T and PV
    per_block += 2 * 2 * batch * d * 6 * d  # two modulation projections
    io = 2 * batch * (n_img * cfg.in_channels * d + n_txt * cfg.joint_dim * d + n_img * d * cfg.out_dim)
    return cfg.num_layers * per_block + io


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> list[float]:
    """Seconds per call of fn, measured one call at a time after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def measure(
    fn: Callable[[], torch.Tensor], device: torch.device, warmup: int, iters: int
) -> tuple[torch.Tensor, float, list[float], float | None]:
    """(first output, seconds of the first call (compiles), `time_steps` of the rest, peak GPU GiB or None)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    first = time.perf_counter() - t0
    times = time_steps(fn, device, warmup, iters)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return out, first, times, peak


def kernel_time_split(fn: Callable[[], object], device: torch.device) -> dict:
    """GPU kernel time per call of fn and the share of it spent in NCCL kernels (the collectives of a
    multi-GPU step, including any wait for the other ranks inside them), from two profiled calls."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            fn()
        sync(device)
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events)  # microseconds, both calls
    nccl = sum(e.device_time_total for e in events if "nccl" in e.key.lower())
    return {"gpu_kernel_s": total / 2e6, "nccl_share": nccl / total if total else 0.0}


def summarize(times: list[float], flops: float | None = None) -> dict:
    out = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times)}
    if flops:
        out["tflops"] = flops / out["median_s"] / 1e12
    return out


def cuda_graph(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """fn (fixed inputs, no host syncs) captured in a CUDA graph (fastdit.runtime.cudagraph) after two warm-up runs;
    returns the replay, which gives fn's output tensor (the graph's memory, overwritten by each replay)."""
    step = CudaGraphStep(fn, warmup=2)
    step()  # warm-up and capture
    return step


def matmul_ceiling(device: torch.device, dtype: torch.dtype) -> float:
    """Achieved TFLOP/s of a large square matmul on random data (the ceiling for this run)."""
    n = 8192 if device.type == "cuda" else 512
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    times = time_steps(lambda: a @ b, device, warmup=3, iters=20 if device.type == "cuda" else 3)
    return 2 * n**3 / statistics.median(times) / 1e12
