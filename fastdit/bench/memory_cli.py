"""The flags and entry of `fastdit bench --stage memory` (memory plans under a cap, fastdit.bench.memory) and
`--stage quant` (quantization recipes on the full-size DiT, fastdit.bench.quant). No torch at import time: the
bench parser (fastdit.bench.cli) stays light."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from fastdit.errors import FastditError

STAGES = ("memory", "quant")
RECIPES = ("bf16", "fp8", "fp8-fast", "fp8-blockwise", "int4")
REFERENCE_MODES = ("model", "group", "sequential")


def _names(choices: tuple[str, ...]):
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(n for n in text.split(",") if n)
        bad = [n for n in names if n not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"{', '.join(bad)}: choose from {', '.join(choices)}")
        return names

    return parse


def add_memory_bench_arguments(parser) -> None:
    g = parser.add_argument_group("--stage memory / quant (memory plans and quantization)")
    g.add_argument(
        "--memory",
        choices=["all", "full", "offload-text", "offload-blocks"],
        default="all",
        help="pipeline: the memory plan(s) to time (default: all three); one that cannot fit is reported, not run",
    )
    g.add_argument(
        "--memory-cap-gb",
        type=float,
        nargs="+",
        default=[0.0],
        help="pipeline: cap the GPU at these GiB, one after the other (0: no cap; default: 0)",
    )
    g.add_argument("--warmup-steps", type=int, default=2, help="pipeline: steps of the warm-up image (default: 2)")
    g.add_argument(
        "--recipes",
        type=_names(RECIPES),
        default=("bf16", "fp8", "int4"),
        help=f"comma-separated quantizations to time ({', '.join(RECIPES)}; default: bf16,fp8,int4)",
    )
    g.add_argument(
        "--reference",
        type=_names(REFERENCE_MODES + ("none",)),
        default=REFERENCE_MODES,
        help="pipeline: diffusers' offloading modes on the same weights (model = enable_model_cpu_offload, group = "
        "group offloading with a side stream, sequential = enable_sequential_cpu_offload; none; default: all)",
    )
    g.add_argument("--reference-steps", type=int, default=2, help="pipeline: steps of each diffusers image (default 2)")
    g.add_argument(
        "--resident-blocks",
        type=int,
        default=None,
        help="pipeline: DiT blocks kept on the device under offload-blocks (default: as many as the cap leaves room for)",
    )
    g.add_argument(
        "--int4-kernel",
        choices=["auto", "triton", "torch"],
        default="auto",
        help="int4 GEMM (default: auto = triton on CUDA)",
    )
    g.add_argument("--baseline-s", type=float, default=None, help="pipeline: image time the ratios are taken against")
    g.add_argument(
        "--quant-part",
        choices=["all", "dit", "gemm"],
        default="all",
        help="quant: the recipes on the DiT step, the int4 GEMM kernels, or both (default: all)",
    )


@dataclass(frozen=True)
class MemoryBenchConfig:
    stage: str
    preset: str
    height: int
    width: int
    batch: int
    text_len: int
    memory: str
    memory_cap_gb: tuple[float, ...]
    steps: int
    warmup_steps: int
    recipes: tuple[str, ...]
    reference: tuple[str, ...]
    reference_steps: int
    resident_blocks: int | None
    int4_kernel: str
    quant_part: str
    compile: str | None
    cuda_graph: bool
    warmup: int
    iters: int
    seed: int

    @classmethod
    def from_args(cls, args) -> MemoryBenchConfig:
        reference = () if "none" in args.reference else args.reference
        run = cls(
            args.stage, args.preset, args.height, args.width, args.batch, args.text_len, args.memory,
            tuple(args.memory_cap_gb), 50 if args.steps is None else args.steps, args.warmup_steps, args.recipes, reference, args.reference_steps,
            args.resident_blocks, args.int4_kernel, args.quant_part, args.compile, args.cuda_graph, args.warmup,
            args.iters, args.seed,
        )  # fmt: skip
        if min(run.steps, run.warmup_steps, run.reference_steps, run.height, run.width, run.batch) < 1:
            raise FastditError("--steps, --warmup-steps, --reference-steps, --height, --width, --batch must be >= 1")
        if run.height % 16 or run.width % 16:
            raise FastditError(f"--height/--width must be multiples of 16, got {run.height}x{run.width}")
        if any(g < 0 for g in run.memory_cap_gb):
            raise FastditError("--memory-cap-gb takes GiB >= 0 (0: no cap)")
        return run


def memory_bench_main(args, dtype_name: str, environment) -> int:
    """`fastdit bench --stage memory | quant`; `dtype_name` is the torch dtype's name, `environment(device)` the
    versions record of fastdit.bench.cli."""
    import json
    import sys

    import torch

    run = MemoryBenchConfig.from_args(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FastditError("--device cuda asked for, but no CUDA GPU is visible")
    dtype = getattr(torch, dtype_name)
    if run.stage == "memory":
        from fastdit.bench.memory import bench_pipeline_memory, print_pipeline_table

        with torch.no_grad():  # not inference mode: diffusers' offload hooks re-wrap the shared weights as Parameters
            res = bench_pipeline_memory(run, device, dtype)
        res["environment"] = environment(device)
        print_pipeline_table(res, args.baseline_s)
    else:
        from fastdit.bench.quant import bench_quant, print_quant_table

        with torch.inference_mode():
            res = bench_quant(run, device, dtype)
        res["environment"] = environment(device)
        print_quant_table(res)
    res["command"] = "fastdit " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("fastdit") else None
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0
