"""`fastdit bench`: time one denoising step of the full-size DiT with random weights (no download).

One step = one DiT forward over the CFG batch (cond + uncond batched). Times come from CUDA events
(host clock on CPU) around each step after warm-up; we report the median with min/max, the achieved
TFLOP/s, and that as a share of the bf16 matmul ceiling measured in the same run. `--compare diffusers`
runs diffusers' QwenImageTransformer2DModel on the very same weights (views of ours: no extra memory),
eager and compiled, and prints the ratios. `--stage vae|text-encoder` times those stages instead.
`--tp / --sp / --cfg-parallel` time the DiT step on that many ranks (fastdit.parallel: one process per GPU,
each with its shard of the random weights; rank 0 reports).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext, suppress

import torch
from torch import nn

from fastdit.attention import BACKENDS
from fastdit.cli import add_parallel_arguments, parallel_degrees, parallel_requested
from fastdit.cudagraph import CudaGraphStep
from fastdit.errors import FastditError
from fastdit.inductor import backend as inductor_backend
from fastdit.loader import diffusers_state_dict
from fastdit.model import PRESETS, DiTConfig, QwenImageTransformer, compile_blocks, set_attention_backend
from fastdit.text import TEMPLATE_PREFIX_TOKENS

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---------------------------------------------------------------------------------------------------------
# Counting and timing


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
    """fn (fixed inputs, no host syncs) captured in a CUDA graph (fastdit.cudagraph) after two warm-up runs;
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


# ---------------------------------------------------------------------------------------------------------
# Models with random weights


def random_dit(cfg: DiTConfig, dtype: torch.dtype, device: torch.device, seed: int = 0) -> QwenImageTransformer:
    """Build on meta, allocate on the device, fill with scaled random weights (activations stay O(1))."""
    with torch.device("meta"):
        model = QwenImageTransformer(cfg).to(dtype)  # cast on meta: never a float32 copy on the device
    model.to_empty(device=device)
    fill_random_(model, device, seed)
    return model.eval().requires_grad_(False)


def parallel_random_dit(cfg: DiTConfig, dtype: torch.dtype, state, seed: int = 0) -> QwenImageTransformer:
    """`random_dit` with this rank's tensor / sequence-parallel layers (fastdit.parallel.parallelize)."""
    from fastdit.parallel import parallelize

    with torch.device("meta"):
        model = QwenImageTransformer(cfg)
    parallelize(model, state)  # its parallel layers are created in the default dtype: cast after the swap
    model.to(dtype).to_empty(device=state.device)
    fill_random_(model, state.device, seed)
    return model.eval().requires_grad_(False)


def fill_random_(model: nn.Module, device: torch.device, seed: int) -> None:
    """Weights ~ N(0, 1 / fan_in) (a layer's whole fan-in, also for a tensor-parallel shard of it), biases
    N(0, 0.02^2), norm weights 1, modulation 10x smaller; in place, from one seeded generator."""
    g = torch.Generator(device=device).manual_seed(seed)
    randn = lambda shape: torch.randn(shape, device=device, dtype=torch.float32, generator=g)  # noqa: E731
    with torch.no_grad():
        for module_name, module in model.named_modules():
            for p_name, p in module.named_parameters(recurse=False):
                name = f"{module_name}.{p_name}"
                fan_in = getattr(module, "in_features", p.shape[-1])
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith("mod.lin.weight") or name.endswith("final.mod.weight"):
                    # Trained DiTs keep modulation small (AdaLN-Zero starts it at 0); full-scale random
                    # modulation makes a 60-layer stack so ill-conditioned that bf16 itself is 10% off fp32.
                    p.copy_(randn(p.shape) * 0.1 / math.sqrt(fan_in))
                elif p.ndim == 2:
                    p.copy_(randn(p.shape) / math.sqrt(fan_in))
                else:
                    p.copy_(randn(p.shape) * 0.02)


def diffusers_twin(model: QwenImageTransformer) -> nn.Module:
    """diffusers' QwenImageTransformer2DModel sharing our weight storage (views, so no extra memory)."""
    try:
        from accelerate import init_empty_weights
        from diffusers import QwenImageTransformer2DModel
    except ImportError as e:
        raise FastditError(f"--compare diffusers needs diffusers and accelerate installed ({e})") from None
    cfg = model.cfg
    with init_empty_weights():
        ref = QwenImageTransformer2DModel(
            patch_size=cfg.patch_size,
            in_channels=cfg.in_channels,
            out_channels=cfg.out_channels,
            num_layers=cfg.num_layers,
            attention_head_dim=cfg.head_dim,
            num_attention_heads=cfg.num_heads,
            joint_attention_dim=cfg.joint_dim,
            axes_dims_rope=tuple(cfg.axes_dims_rope),
        )
    ref.load_state_dict(diffusers_state_dict(model), assign=True, strict=True)
    return ref.eval().requires_grad_(False)


def dit_inputs(cfg: DiTConfig, batch: int, height: int, width: int, text_len: int, dtype, device, seed=0):
    if height % 16 or width % 16:
        raise FastditError(f"--height/--width must be multiples of 16, got {height}x{width}")
    h, w = height // 16, width // 16  # VAE /8, then 2x2 patches
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, h * w, cfg.in_channels, device=device, generator=g).to(dtype)
    enc = torch.randn(batch, text_len, cfg.joint_dim, device=device, generator=g).to(dtype)
    t = torch.full((batch,), 0.7, device=device)
    return x, enc, t, [[(1, h, w)]] * batch


# ---------------------------------------------------------------------------------------------------------
# Stages


def bench_dit(args, device: torch.device, dtype: torch.dtype, state=None) -> dict:
    """`state`: this rank's fastdit.parallel.ParallelState when the step runs on several ranks (every rank
    calls this; rank 0's result is reported), else None."""
    cfg = PRESETS[args.preset]
    batch = args.batch * (1 if args.no_cfg else 2)
    x, enc, t, shapes = dit_inputs(cfg, batch, args.height, args.width, args.text_len, dtype, device)
    n_img = x.shape[1]
    flops = dit_flops(cfg, batch, n_img, args.text_len)
    say = log if state is None or state.is_main else lambda msg: None
    blocks = (
        random_dit(cfg, dtype, device, args.seed)
        if state is None
        else parallel_random_dit(cfg, dtype, state, args.seed)
    )
    if args.quantize:  # fastdit.quant: the block linears in fp8, quantized from the random weights (after sharding)
        from fastdit.quant import quantize_model

        quantize_model(blocks)
    backend = set_attention_backend(blocks, args.attention)
    if state is None:
        model = blocks
    else:  # the same call as the model's; splits the CFG batch / image tokens and gathers the output
        from fastdit.parallel import ParallelTransformer

        model = ParallelTransformer(blocks, state)
    rope = model.make_rope(shapes, args.text_len, device)
    # As the pipeline runs a step: AdaLN vectors from a table built once for all steps (all samples share t).
    mod, table_s = None, None
    if args.modulation == "table":
        with torch.no_grad():
            steps = torch.linspace(1.0, 0.02, 50, device=device)  # a 50-step run's table
            model.modulation_table(steps)  # warm-up (first-use cuBLAS / allocator work)
            sync(device)
            t0 = time.perf_counter()
            model.modulation_table(steps)
            sync(device)
            table_s = time.perf_counter() - t0
            mod = model.modulation_table(t[:1])[0]
    # A CFG batch whose negative prompt is shorter: its text is padded, masked or passed as lengths.
    mask, txt_lens = None, None
    if args.uncond_text_len is not None:
        if args.no_cfg or not 1 <= args.uncond_text_len <= args.text_len:
            raise FastditError("--uncond-text-len needs CFG and a value in [1, --text-len]")
        lens = (args.text_len,) * (batch // 2) + (args.uncond_text_len,) * (batch // 2)
        mask = torch.arange(args.text_len, device=device)[None, :] < torch.tensor(lens, device=device)[:, None]
        txt_lens = lens if args.padding == "lengths" else None
    results: dict = {
        "stage": "dit",
        "shapes": {
            "batch": batch,
            "image_tokens": n_img,
            "text_tokens": args.text_len,
            "height": args.height,
            "width": args.width,
            "cfg_batched": not args.no_cfg,
            "uncond_text_tokens": args.uncond_text_len,
            "padding": args.padding if args.uncond_text_len is not None else None,
        },
        "flops_per_step": flops,
        "ranks": None if state is None else {"tp": state.tp, "sp": state.sp, "cfg": state.cfg},
        "attention_backend": backend,
        "quantize": args.quantize,
        "modulation": args.modulation,
        "modulation_table_50_steps_s": table_s,
        "runs": {},
    }
    runs = results["runs"]

    def run(name: str, fn: Callable[[], torch.Tensor], compile_first: bool):
        say(f"[{name}] warming up" + (" (compiling)" if compile_first else ""))
        out, first, times, peak = measure(fn, device, args.warmup, args.iters)
        r = summarize(times, flops)
        r["first_call_s"] = first
        if peak is not None:
            r["peak_mem_gib"] = peak
        if args.profile:
            r.update(kernel_time_split(fn, device))
        runs[name] = r
        say(
            f"[{name}] {r['median_s']:.4f} s/step (min {r['min_s']:.4f}, max {r['max_s']:.4f}), "
            f"{r['tflops']:.0f} TFLOP/s, first call {first:.1f} s"
        )
        return out

    ours = "fastdit fp8" if args.quantize else "fastdit"
    with torch.no_grad():
        ours_out = run(
            f"{ours} eager", lambda: model(x, enc, mask, t, rope=rope, txt_lens=txt_lens, modulation=mod), False
        )
        if args.compile:
            compiled = (
                torch.compile(model, fullgraph=True, backend=inductor_backend()) if args.compile == "full" else model
            )
            if args.compile == "regional":
                compile_blocks(blocks)
            ours_out = run(
                f"{ours} compiled ({args.compile})",
                lambda: compiled(x, enc, mask, t, rope=rope, txt_lens=txt_lens, modulation=mod),
                True,
            )
        if args.cuda_graph:  # the same step (compiled if --compile) captured once, replayed: no launch cost
            step = compiled if args.compile else model
            replay = cuda_graph(lambda: step(x, enc, mask, t, rope=rope, txt_lens=txt_lens, modulation=mod))
            suffix = f"compiled ({args.compile})" if args.compile else "eager"
            run(f"{ours} {suffix} + CUDA graph", replay, False)
        if args.compare and args.quantize:
            # diffusers' model would need a second, bf16 copy of the weights next to the fp8 one.
            log("note: --compare is skipped with --quantize fp8; run the comparison without --quantize")
        elif args.compare in ("diffusers", "diffusers-eager"):
            ref = diffusers_twin(model)
            kw = dict(
                hidden_states=x,
                encoder_hidden_states=enc,
                encoder_hidden_states_mask=mask,
                timestep=t,
                img_shapes=shapes,
                return_dict=False,
            )
            ref_out = run("diffusers eager", lambda: ref(**kw)[0], False)
            err = ((ours_out.float() - ref_out.float()).norm() / ref_out.float().norm()).item()
            results["rel_l2_vs_diffusers"] = err
            log(f"relative L2 error fastdit vs diffusers ({args.dtype}): {err:.3e}")
            if args.compile and args.compare == "diffusers":
                ref_c = torch.compile(ref)  # diffusers' model graph-breaks under fullgraph=True
                run("diffusers compiled", lambda: ref_c(**kw)[0], True)
    return results


def bench_vae(args, device: torch.device, dtype: torch.dtype) -> dict:
    from diffusers import AutoencoderKLQwenImage

    with torch.device(device):
        vae = AutoencoderKLQwenImage().to(dtype).eval()  # Qwen-Image's VAE geometry
    z = torch.randn(args.batch, 16, 1, args.height // 8, args.width // 8, device=device, dtype=dtype)
    with torch.no_grad():
        times = time_steps(lambda: vae.decode(z, return_dict=False)[0], device, args.warmup, args.iters)
    return {
        "stage": "vae",
        "shapes": {"batch": args.batch, "height": args.height, "width": args.width},
        "runs": {"vae decode": summarize(times)},
    }


def bench_text_encoder(args, device: torch.device, dtype: torch.dtype) -> dict:
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    if args.preset == "tiny":
        cfg = Qwen2_5_VLTextConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=1024,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        )
    else:  # Qwen2.5-VL-7B's language model
        cfg = Qwen2_5_VLTextConfig(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
            rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
        )
    with torch.device(device):
        enc = Qwen2_5_VLTextModel(cfg).to(dtype).eval()
    # The prompt template adds its prefix in front of the prompt; cond + uncond are encoded together.
    tokens = args.text_len + TEMPLATE_PREFIX_TOKENS
    ids = torch.randint(0, cfg.vocab_size, (args.batch * 2, tokens), device=device)
    with torch.no_grad():
        times = time_steps(lambda: enc(input_ids=ids).last_hidden_state, device, args.warmup, args.iters)
    return {
        "stage": "text-encoder",
        "shapes": {"batch": args.batch * 2, "tokens": tokens},
        "runs": {"text encoder": summarize(times)},
    }


# ---------------------------------------------------------------------------------------------------------
# CLI


def log(msg: str):
    print(msg, file=sys.stderr, flush=True)


def environment(device: torch.device) -> dict:
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
    base = runs.get("diffusers compiled") or runs.get("diffusers eager")
    print(f"\n{res['stage']} {json.dumps(res.get('shapes', {}))}")
    if "matmul_tflops" in res:
        print(f"{res.get('dtype', 'bf16')} matmul ceiling this run: {_tflops(res['matmul_tflops'])} TFLOP/s")
    width = max([32, *map(len, runs)])
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
    if res.get("modulation_table_50_steps_s") is not None:
        print(f"modulation table for 50 steps, built once per image: {res['modulation_table_50_steps_s']:.4f} s")
    if "rel_l2_vs_diffusers" in res:
        print(f"relative L2 error vs diffusers: {res['rel_l2_vs_diffusers']:.3e}")
    if base:
        print("vs base = diffusers compiled (or eager without --compile) median / this run's median")


def add_parser(subparsers):
    p = subparsers.add_parser(
        "bench",
        help="time one denoising step of the full-size DiT (random weights, no download)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--stage", choices=["dit", "vae", "text-encoder"], default="dit")
    p.add_argument("--preset", choices=sorted(PRESETS), default="qwen-image", help="model size (tiny: for tests)")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--text-len", type=int, default=128, help="text tokens per prompt")
    p.add_argument("--batch", type=int, default=1, help="prompts per step (CFG doubles the DiT batch)")
    p.add_argument("--no-cfg", action="store_true", help="time a batch without the uncond half")
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
        choices=BACKENDS,
        default="auto",
        help="attention backend (int8: fastdit's 8-bit kernel; fp8: cuDNN's)",
    )
    p.add_argument(
        "--quantize", choices=["fp8"], default=None, help="fp8 (e4m3) block linears (fastdit.quant; CUDA >= 8.9)"
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also profile two steps of each run: GPU kernel time per step and the share in NCCL collectives",
    )
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="FILE", help="write all numbers and the environment here")
    add_parallel_arguments(p, "parallelism: the DiT step on tp x sp x cfg ranks (one process per GPU; gloo on CPU)")
    p.set_defaults(func=bench_main)
    return p


def _bench_parallel(args, device: torch.device, dtype: torch.dtype) -> dict:
    """The DiT step on tp x sp x cfg ranks (fastdit.parallel.launch: spawned here, or torchrun's)."""
    from fastdit.parallel import check_parallel_config, launch

    unsupported = [
        flag
        for flag, on in (
            (f"--stage {args.stage}", args.stage != "dit"),
            ("--compare", args.compare),
            ("--compile full", args.compile == "full"),
        )
        if on
    ]
    if unsupported:
        raise FastditError(
            f"{', '.join(unsupported)} cannot be combined with --tp / --sp / --cfg-parallel: the parallel bench "
            "times the DiT step eager, with --compile (block by block) and with --cuda-graph"
        )
    tp, sp, cfg = parallel_degrees(args)
    check_parallel_config(PRESETS[args.preset], tp, sp)  # before spawning; launch checks the devices
    return launch(_bench_rank, args, dtype, tp=tp, sp=sp, cfg=cfg, device=device.type, master_port=args.master_port)


def _bench_rank(state, args, dtype: torch.dtype) -> dict:
    return bench_dit(args, state.device, dtype, state)


def bench_main(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FastditError("--device cuda asked for, but no CUDA GPU is visible")
    if min(args.height, args.width, args.text_len, args.batch, args.iters) < 1 or args.warmup < 0:
        raise FastditError("--height, --width, --text-len, --batch and --iters must be >= 1")
    if args.cuda_graph and (device.type != "cuda" or args.stage != "dit"):
        raise FastditError("--cuda-graph times the DiT step on a CUDA GPU (--stage dit, --device cuda)")
    if args.profile and (device.type != "cuda" or args.stage != "dit"):
        raise FastditError("--profile reads the GPU's kernel times of the DiT step (--stage dit, --device cuda)")
    dtype = DTYPES[args.dtype]
    if parallel_requested(args):
        res = _bench_parallel(args, device, dtype)
        if int(os.environ.get("RANK", 0)) != 0:  # under torchrun every rank returns; rank 0 reports
            return 0
    else:
        stage = {"dit": bench_dit, "vae": bench_vae, "text-encoder": bench_text_encoder}[args.stage]
        with torch.inference_mode() if args.stage != "dit" else nullcontext():
            res = stage(args, device, dtype)
    if args.stage == "dit":
        res["matmul_tflops"] = matmul_ceiling(device, dtype)
    res["dtype"] = args.dtype
    res["environment"] = environment(device)
    res["command"] = "fastdit " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("fastdit") else None
    print_table(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":  # python -m fastdit.bench ... (same flags as `fastdit bench`)
    parser = argparse.ArgumentParser(prog="python -m fastdit.bench")
    add_parser(parser.add_subparsers(dest="cmd"))
    sys.exit(bench_main(parser.parse_args(["bench", *sys.argv[1:]])))
