"""`fastdit bench --lora-rank R[,R...] --loras K`: the DiT step with K dynamic LoRA adapters of rank R (every linear
of every block and the top-level ones), for each R in turn, then with the last set merged, against the step
without LoRA in the same run.

The adapters are random (seeded, the same on every rank; each rank keeps its tensor-parallel slices) and are made
active with `DiTLoras.activate`, as a server does per request. Each LoRA run repeats the step the base runs were
timed with: compiled when --compile is given (else eager), and replayed from a CUDA graph with --cuda-graph; its
overhead is its median over that base run's median. Each new rank is a new shape of the stacked factors, so with
--compile its first step recompiles the block graph. Merging keeps no host copy of the base weights (the
benchmark never unloads), and a merged model has the base model's structure: its step reuses the base graph.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from fastdit.bench.config import BenchConfig, log
from fastdit.bench.timing import cuda_graph, sync
from fastdit.errors import FastditError
from fastdit.lora import LoraWeights, qwen_image_lora_targets
from fastdit.lora.model import DiTLoras


def random_adapter(model: torch.nn.Module, rank: int, seed: int, device, dtype) -> dict[str, LoraWeights]:
    """A rank-`rank` LoRA of every linear of the DiT (full, unsharded factors: each rank cuts its slices), with an
    update about 1 % of the weights' size."""
    cfg = model.base.cfg
    shapes = qwen_image_lora_targets(
        cfg.num_layers, cfg.dim, cfg.mlp_ratio * cfg.dim, cfg.in_channels, cfg.joint_dim, cfg.out_dim
    )
    g = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, (n_out, n_in) in shapes.items():
        down = torch.randn(rank, n_in, device=device, generator=g).div_(n_in**0.5).to(dtype)
        up = torch.randn(n_out, rank, device=device, generator=g).mul_(0.01 / rank**0.5).to(dtype)
        out[name] = LoraWeights(down, up, float(rank))
    return out


def bench_lora(
    run: BenchConfig,
    model: torch.nn.Module,
    step: Callable[[], torch.Tensor],
    timed: Callable,
    base_name: str,
    results: dict,
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """Time `step` (the model's step as the base run `base_name` timed it, and its CUDA-graph replay with
    --cuda-graph) with `run.loras` dynamic adapters of each rank in `run.lora_rank`, then merged; `timed(name, fn,
    compile_first)` records each run. Adds results["lora"]: overheads, the merge's seconds, and the relative
    difference of the dynamic and merged outputs (a check that both apply the same update)."""
    k = run.loras
    if k < 1:
        raise FastditError("--loras must be >= 1")
    variants = [""] + ([" + CUDA graph"] if run.cuda_graph else [])
    runs = results["runs"]
    overhead: dict[str, float] = {}
    loras = DiTLoras(model, dtype)
    for i, rank in enumerate(run.lora_rank):
        if i:
            loras.unload()  # the previous rank's adapters and stacked factors freed first
            loras = DiTLoras(model, dtype)
        for a in range(k):
            loras.load(random_adapter(model, rank, run.seed + 1 + a, device, dtype), f"bench{a}")
        loras.activate({f"bench{a}": 1.0 for a in range(k)})
        dynamic = _time(
            f"{base_name} + {k} LoRA r{rank} dynamic", step, variants, run, timed, runs, base_name, overhead
        )
    sync(device)
    t0 = time.perf_counter()
    loras.fuse(keep_originals=False)
    sync(device)
    fuse_s = time.perf_counter() - t0
    log(f"[lora] merged {k} adapter(s) of rank {rank} into the weights in {fuse_s:.2f} s")
    merged = _time(f"{base_name} + {k} LoRA r{rank} merged", step, variants, run, timed, runs, base_name, overhead)
    err = ((dynamic - merged).norm() / merged.norm()).item()
    results["lora"] = {
        "ranks": list(run.lora_rank),
        "adapters": k,
        "overhead": overhead,
        "merge_s": fuse_s,
        "rel_l2_dynamic_vs_merged": err,
    }


def _time(name, step, variants, run, timed, runs, base_name, overhead) -> torch.Tensor:
    """Each variant of the step under `name`; records its overhead over the base run; returns the step's output."""
    out = None
    for suffix in variants:
        fn = cuda_graph(step) if suffix else step
        result = timed(f"{name}{suffix}", fn, bool(run.compile) and not suffix)
        out = result.float().clone() if out is None else out
        base = runs.get(f"{base_name}{suffix}")
        if base is not None:
            overhead[f"{name}{suffix}"] = runs[f"{name}{suffix}"]["median_s"] / base["median_s"] - 1
        del fn
    return out
