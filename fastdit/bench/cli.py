"""`fastdit bench`: time one denoising step of the full-size DiT with random weights (no download), or the
pipeline's other stages. The parser is here; the measurements are in fastdit.bench.dit / stages, imported when
the command runs (this module imports no torch)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
from contextlib import nullcontext, suppress
from dataclasses import replace

from fastdit.bench.config import BenchConfig
from fastdit.bench.edit import add_edit_arguments, bench_edit, check_edit_run, default_text_len, print_edit_warmup
from fastdit.bench.family import QWEN21, add_family_arguments, model_config
from fastdit.bench.memory_cli import STAGES as MEMORY_STAGES
from fastdit.bench.memory_cli import add_memory_bench_arguments, memory_bench_main
from fastdit.cache.cli import cache_spec
from fastdit.cli.common import (
    ATTENTION_CHOICES,
    ATTENTION_HELP,
    add_parallel_arguments,
    parallel_degrees,
    parallel_requested,
)
from fastdit.cli.lora import add_lora_bench_arguments
from fastdit.cli.scheduler import add_scheduler_arguments
from fastdit.errors import FastditError
from fastdit.validation import DTYPE_NAMES, dtype_name

PRESET_NAMES = ["qwen-image", "tiny"]
SHORT_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
DESCRIPTION = """Time one denoising step of the full-size DiT with random weights (no download).

One step = one DiT forward over the CFG batch (cond + uncond batched). Times come from CUDA events (host clock
on CPU) around each step after warm-up; the median is reported with min/max, the achieved TFLOP/s, and that as a
share of the matmul ceiling measured in the same run. `--compare diffusers` runs diffusers'
QwenImageTransformer2DModel on the very same weights (views of ours: no extra memory), eager and compiled, and
prints the ratios. `--stage vae|text-encoder` times those stages instead (the VAE: fastdit's decode against
diffusers'); `--stage pipeline` times whole images (text encoder + --steps DiT steps + VAE decode, --scheduler).
`--tp / --sp / --cfg-parallel` time the DiT step on that many ranks (one process per GPU, each with its shard of
the random weights; rank 0 reports).
"""


def environment(device) -> dict:
    import torch

    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            pass
    for name in ("diffusers", "transformers"):
        with suppress(ImportError):
            env[name] = __import__(name).__version__
    return env


def _tflops(x: float) -> str:
    """A GPU's hundreds as integers; a CPU's fractions of a TFLOP/s with three significant digits."""
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def print_table(res: dict):
    runs = res.get("runs", {})
    base = runs.get(res.get("base_run", "")) or runs.get("diffusers compiled") or runs.get("diffusers eager")
    print(f"\n{res['stage']} {json.dumps(res.get('shapes', {}))}")
    if "matmul_tflops" in res:
        print(f"{res.get('dtype', 'bf16')} matmul ceiling this run: {_tflops(res['matmul_tflops'])} TFLOP/s")
    width = max([32, *map(len, runs), *(len(f"prefill {name}") for name in res.get("prefill", {}))])
    ranks = res.get("ranks")
    world = 1 if not ranks else ranks["tp"] * ranks["sp"] * ranks["cfg"]
    if ranks:
        print(f"ranks: tp={ranks['tp']} sp={ranks['sp']} cfg={ranks['cfg']} (%ceil: of {world} x the ceiling)")
    print(
        f"{'run':{width}s} {'s/step':>8s} {'min':>8s} {'max':>8s} {'TFLOP/s':>8s} {'%ceil':>6s} {'vs base':>8s} "
        f"{'warm-up s':>9s} {'peak GiB':>8s}"
    )
    for name, r in runs.items():
        tf = r.get("tflops")
        pct = f"{100 * tf / (world * res['matmul_tflops']):.0f}" if tf and res.get("matmul_tflops") else "-"
        ratio = f"{base['median_s'] / r['median_s']:.2f}x" if base else "-"
        print(
            f"{name:{width}s} {r['median_s']:8.4f} {r['min_s']:8.4f} {r['max_s']:8.4f} "
            f"{'-' if tf is None else _tflops(tf):>8} {pct:>6s} {ratio:>8s} "
            f"{r.get('first_call_s', float('nan')):9.1f} {r.get('peak_mem_gib', float('nan')):8.1f}"
        )
    for name, r in runs.items():
        if "nccl_share" in r:
            print(
                f"{name}: GPU kernel time {r['gpu_kernel_s'] * 1e3:.1f} ms/step, {100 * r['nccl_share']:.1f} % in NCCL"
            )
    for name, r in res.get("prefill", {}).items():  # Qwen-Image 2.1: once per image, before the steps
        print(f"{'prefill ' + name:{width}s} {r['median_s']:8.4f} {r['min_s']:8.4f} {r['max_s']:8.4f} (once per image)")
    if res.get("modulation_table_50_steps_s") is not None:
        print(f"modulation table for 50 steps, built once per image: {res['modulation_table_50_steps_s']:.4f} s")
    for name, extra in res.get("lora", {}).get("overhead", {}).items():
        print(f"{name}: {100 * extra:+.1f} % per step vs the same run without LoRA")
    if "rel_l2_vs_diffusers" in res:
        print(f"relative L2 error vs diffusers: {res['rel_l2_vs_diffusers']:.3e}")
    for line in res.get("notes", []):
        print(line)
    if base:
        base_name = res.get("base_run") or "diffusers compiled (or eager without --compile)"
        print(f"vs base = {base_name} median / this run's median")


def add_parser(subparsers):
    p = subparsers.add_parser(
        "bench",
        help="time one denoising step of the full-size DiT (random weights, no download)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--stage",
        choices=["dit", "vae", "text-encoder", "pipeline", *MEMORY_STAGES],
        default="dit",
        help="what to time: one DiT denoising step (default), the VAE decode, the text encoder, whole images "
        "(pipeline: text encoder + --steps DiT steps + VAE), whole images under memory plans (memory), or the "
        "quantization recipes (quant)",
    )
    p.add_argument(
        "--preset",
        choices=PRESET_NAMES,
        default="qwen-image",
        help="model size: qwen-image (default; the full 20.4B DiT: 41 GB of weights in bf16, a GPU) or tiny (a 2-layer "
        "model for tests; the only one that runs on a CPU)",
    )
    p.add_argument("--height", type=int, default=1024, help="image height in pixels (default: 1024)")
    p.add_argument("--width", type=int, default=1024, help="image width in pixels (default: 1024)")
    p.add_argument(
        "--text-len", type=int, default=None, help="text tokens per prompt (default: 128; 330 with --task edit)"
    )
    p.add_argument("--batch", type=int, default=1, help="prompts per step (CFG doubles the DiT batch)")
    p.add_argument("--no-cfg", action="store_true", help="time a batch without the uncond half")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="denoising steps of --stage pipeline (the scheduler's unless given) and of --cache-schedule (50 unless "
        "given)",
    )
    add_scheduler_arguments(p)
    p.add_argument(
        "--uncond-text-len",
        type=int,
        default=None,
        help="valid text tokens of the uncond half (padded to --text-len), as with a short negative prompt",
    )
    p.add_argument(
        "--padding",
        choices=["lengths", "mask"],
        default="lengths",
        help="with --uncond-text-len: pass the text lengths (unmasked attention per sample, as the pipeline "
        "does) or only the key mask",
    )
    p.add_argument(
        "--compile",
        nargs="?",
        const="regional",
        choices=["regional", "full"],
        default=None,
        help="also time torch.compile: regional (each block, fast warm-up) or full graph",
    )
    p.add_argument(
        "--modulation",
        choices=["table", "per-step"],
        default="table",
        help="fastdit's AdaLN vectors: from a table built once for all steps (as the pipeline runs; the time to "
        "build a 50-step table is reported) or computed in every step (as diffusers does)",
    )
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="also time the step captured in a CUDA graph and replayed (CUDA only)",
    )
    p.add_argument(
        "--compare",
        choices=["diffusers", "diffusers-eager"],
        default=None,
        help="also time diffusers' model on the same weights: eager and (with --compile) compiled; "
        "diffusers-eager skips compiling it (its compile takes minutes)",
    )
    p.add_argument(
        "--attention",
        choices=(*ATTENTION_CHOICES, "math"),
        default="auto",
        help=ATTENTION_HELP + "; math: the unfused reference (slow)",
    )
    p.add_argument(
        "--quantize", choices=["fp8"], default=None, help="fp8 (e4m3) block linears (fastdit.quant.fp8; CUDA >= 8.9)"
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also profile two steps of each run: GPU kernel time per step and the share in NCCL collectives",
    )
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones (default: 3)")
    p.add_argument("--iters", type=int, default=10, help="timed steps; the median is reported (default: 10)")
    p.add_argument(
        "--dtype", choices=list(DTYPE_NAMES), default="auto", help="auto: bfloat16 on CUDA, float32 otherwise"
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda; cpu needs --preset tiny)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs (default: 0)")
    p.add_argument("--json", default=None, metavar="FILE", help="write all numbers and the environment here")
    cache = p.add_argument_group("step cache: DiT seconds per image with a fixed schedule (fastdit.bench.cache)")
    cache.add_argument(
        "--cache-schedule",
        default=None,
        metavar="SCHEDULE",
        help="time whole images (--steps DiT calls; --warmup / --iters count images) with a step cache whose "
        "decisions are fixed: 'compute 4, then every 2nd' (caches 23 of 50), 'compute 8, cache 2, ...' or a 0/1 "
        "digit per step; with --compare diffusers, also diffusers + cache-dit (DBCache, static "
        "steps_computation_mask) on the same weights",
    )
    cache.add_argument(
        "--cache",
        type=cache_spec,
        default=None,
        metavar="SPEC",
        help="fastdit's cache for --cache-schedule, as generate's --cache (front / back blocks, taylor); default F8B0",
    )
    add_parallel_arguments(p, "parallelism: the DiT step on tp x sp x cfg ranks (one process per GPU; gloo on CPU)")
    add_lora_bench_arguments(p)
    add_family_arguments(p)
    add_edit_arguments(p)
    add_memory_bench_arguments(p)
    p.set_defaults(func=bench_main)
    return p


def _bench_parallel(run: BenchConfig, device, dtype, tp: int, sp: int, cfg: int, master_port: int | None) -> dict:
    """The DiT step on tp x sp x cfg ranks (fastdit.parallel.launch: spawned here, or torchrun's)."""
    from fastdit.parallel import check_parallel_config, launch

    unsupported = [
        flag
        for flag, on in (
            (f"--stage {run.stage}", run.stage != "dit"),
            ("--compare", run.compare),
            ("--compile full", run.compile == "full"),
        )
        if on
    ]
    if unsupported:
        raise FastditError(
            f"{', '.join(unsupported)} cannot be combined with --tp / --sp / --cfg-parallel: the parallel bench "
            "times the DiT step eager, with --compile (block by block) and with --cuda-graph"
        )
    check_parallel_config(model_config(run.family, run.preset), tp, sp)  # before spawning; launch checks the devices
    return launch(_bench_rank, run, dtype, tp=tp, sp=sp, cfg=cfg, device=device.type, master_port=master_port)


def _bench_rank(state, run: BenchConfig, dtype) -> dict:
    from fastdit.bench.dit import bench_dit
    from fastdit.bench.dit21 import bench_dit21

    return (bench_dit21 if run.family == QWEN21 else bench_dit)(run, state.device, dtype, state)


def _bench_cache(run: BenchConfig, device, dtype, json_path: str | None, parallel: bool) -> int:
    from fastdit.bench.cache import bench_cache_schedule, print_cache_table

    if parallel or run.stage != "dit" or run.profile:
        drop = "--tp / --sp / --cfg-parallel, --stage and --profile"
        raise FastditError(f"--cache-schedule times the DiT on one device: drop {drop}")
    run = dataclasses.replace(run, steps=50 if run.steps is None else run.steps)
    if run.steps < 1:
        raise FastditError(f"--steps {run.steps}: must be >= 1")
    res = bench_cache_schedule(run, device, dtype)
    res["dtype"] = run.dtype
    res["environment"] = environment(device)
    print_cache_table(res)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(res, f, indent=2)
    return 0


def check_device_and_preset(device: str | None, preset: str, cuda_available: bool) -> None:
    """The full-size model runs on a CUDA GPU only; without one, bench needs --device cpu and the tiny preset (the
    full-size DiT alone is 41 GB in bf16: building it on a CPU takes the machine's memory)."""
    import torch

    try:
        kind = torch.device(device).type if device else ("cuda" if cuda_available else None)
    except RuntimeError as e:
        raise FastditError(f"--device {device}: {e}") from None
    if kind is None:
        raise FastditError(
            "fastdit bench times the full-size model on a CUDA GPU, and none is visible here; on a CPU give "
            "--device cpu --preset tiny"
        )
    if kind == "cuda" and not cuda_available:
        raise FastditError(f"--device {device}: no CUDA GPU is visible")
    if kind != "cuda" and preset != "tiny":
        raise FastditError(
            f"--preset {preset} is the full-size model, too big for --device {device}; use --preset tiny"
        )


def bench_main(args) -> int:
    import torch

    from fastdit.bench.dit import bench_dit
    from fastdit.bench.dit21 import bench_dit21
    from fastdit.bench.pipeline import PipelineBench, bench_pipeline, print_pipeline
    from fastdit.bench.stages import bench_text_encoder
    from fastdit.bench.timing import matmul_ceiling
    from fastdit.bench.vae import bench_vae

    if args.text_len is None:
        args.text_len = default_text_len(args.task)
    if args.stage in MEMORY_STAGES:  # whole images under memory plans; quantization recipes (fastdit.bench.memory_cli)
        return memory_bench_main(args, dtype_name(args.dtype, torch.cuda.is_available()), environment)
    run = BenchConfig.from_args(args)
    check_device_and_preset(args.device, run.preset, torch.cuda.is_available())
    device = torch.device(args.device or "cuda")
    torch_name = dtype_name(run.dtype, device.type == "cuda")
    run = replace(run, dtype=SHORT_DTYPE[torch_name])  # results name dtypes the short way: bf16, fp16, fp32
    if min(run.height, run.width, run.text_len, run.batch, run.iters) < 1 or run.warmup < 0:
        raise FastditError("--height, --width, --text-len, --batch and --iters must be >= 1")
    if run.cuda_graph and (device.type != "cuda" or run.stage not in ("dit", "pipeline")):
        raise FastditError("--cuda-graph times the DiT step on a CUDA GPU (--stage dit or pipeline, --device cuda)")
    if run.profile and (device.type != "cuda" or run.stage != "dit"):
        raise FastditError("--profile reads the GPU's kernel times of the DiT step (--stage dit, --device cuda)")
    dtype = getattr(torch, torch_name)
    tp, sp, cfg = parallel_degrees(args)
    if run.cache_schedule is not None:
        return _bench_cache(run, device, dtype, args.json, parallel_requested(tp, sp, cfg))
    check_edit_run(run, parallel_requested(tp, sp, cfg))
    if run.task == "edit":
        res = bench_edit(run, device, dtype)
    elif parallel_requested(tp, sp, cfg):
        res = _bench_parallel(run, device, dtype, tp, sp, cfg, args.master_port)
        if int(os.environ.get("RANK", 0)) != 0:  # under torchrun every rank returns; rank 0 reports
            return 0
    elif run.stage == "pipeline":
        res = bench_pipeline(PipelineBench.from_config(run, dtype), device)
    else:
        dit = bench_dit21 if run.family == QWEN21 else bench_dit
        stage = {"dit": dit, "vae": bench_vae, "text-encoder": bench_text_encoder}[run.stage]
        with torch.inference_mode() if run.stage != "dit" else nullcontext():
            res = stage(run, device, dtype)
    if run.stage == "dit":
        res["matmul_tflops"] = matmul_ceiling(device, dtype)
    res["dtype"] = run.dtype
    res["environment"] = environment(device)
    res["command"] = "fastdit " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("fastdit") else None
    (print_pipeline if run.stage == "pipeline" else print_table)(res)
    print_edit_warmup(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0
