"""`fastdit bench --stage quant`: the quantization recipes on the full-size DiT with random weights: one denoising
step's time (eager; compiled with --compile; replayed from a CUDA graph with --cuda-graph), peak memory, and the
output's cosine similarity and relative L2 error against the bf16 step on the same weights; then the int4 GEMM
kernels at the block linears' shapes (fastdit's Triton W4A16, the dequantize-then-cuBLAS reference compiled, and
PyTorch's own tinygemm `_weight_int4pack_mm`, which torchao's int4 weight-only tile-packed layout runs on) against
the bf16 GEMM.

Each recipe's model is rebuilt from the same seed (fastdit.bench.weights.random_dit is deterministic), so every
recipe quantizes the very weights the bf16 reference ran with. The bf16 step always runs once as the reference; it
is timed (and compiled) only when `--recipes` lists bf16.
"""

from __future__ import annotations

import gc

import torch
import torch.nn.functional as F

from fastdit.bench.config import log
from fastdit.bench.timing import cuda_graph, dit_flops, measure, summarize, time_steps
from fastdit.bench.weights import dit_inputs, random_dit
from fastdit.kernels.w4a16 import quantize_int4, w4a16_linear, w4a16_reference
from fastdit.load import FAMILIES
from fastdit.models.qwenimage import PRESETS
from fastdit.quant.int4 import set_int4_kernel
from fastdit.quant.recipes import parse_quantize, quantize_blocks
from fastdit.runtime.compile import compile_blocks

FAMILY = FAMILIES["QwenImageTransformer2DModel"]


def _errors(out: torch.Tensor, ref: torch.Tensor) -> dict:
    a, b = out.double().flatten(), ref.double().flatten()
    return {
        "cosine_vs_bf16": F.cosine_similarity(a, b, dim=0).item(),
        "rel_l2_vs_bf16": ((a - b).norm() / b.norm()).item(),
    }


def bench_recipes(run, device: torch.device, dtype: torch.dtype) -> dict:
    cfg = PRESETS[run.preset]
    batch = 2 * run.batch  # CFG: cond + uncond
    x, enc, t, shapes = dit_inputs(cfg, batch, run.height, run.width, run.text_len, dtype, device)
    flops = dit_flops(cfg, batch, x.shape[1], run.text_len)
    runs, ref = {}, None
    for name in ("bf16", *[r for r in run.recipes if r != "bf16"]):
        recipe = parse_quantize(None if name == "bf16" else name)
        if recipe is not None and device.type != "cuda" and recipe.method == "fp8":
            recipe = parse_quantize(name + "-emulated")  # CPU tests: the same rounding in float32
        try:
            if recipe is not None:
                recipe.check_device(device)
        except Exception as e:  # a recipe this device cannot run is reported, the others still run
            runs[name] = {"error": str(e)}
            continue
        model = random_dit(cfg, dtype, device, run.seed)
        if recipe is not None:
            quantize_blocks(model, recipe.layers(FAMILY.roles), recipe.emulate)
            set_int4_kernel(model, run.int4_kernel)
        rope = model.make_rope(shapes, run.text_len, device)
        mod = model.modulation_table(t[:1])[0]

        def step(model=model, rope=rope, mod=mod):
            return model(x, enc, None, t, rope=rope, modulation=mod)

        if name == "bf16" and "bf16" not in run.recipes:  # the reference output only, untimed
            ref = step().float().clone()
            del model, step
            gc.collect()
            continue
        log(f"[quant {name}] eager")
        out, first, times, peak = measure(step, device, run.warmup, run.iters)
        record = summarize(times, flops) | {"first_call_s": first, "peak_mem_gib": peak}
        record["weights_gib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
        if ref is None:
            ref = out.float().clone()
        record |= _errors(out, ref)
        runs[f"{name} eager"] = record
        if run.compile:
            compile_blocks(model)
            log(f"[quant {name}] compiled")
            out, first, times, peak = measure(step, device, run.warmup, run.iters)
            runs[f"{name} compiled"] = summarize(times, flops) | {"first_call_s": first, "peak_mem_gib": peak}
            runs[f"{name} compiled"] |= _errors(out, ref)
        if run.cuda_graph and device.type == "cuda":
            replay = cuda_graph(step)
            _, first, times, peak = measure(replay, device, run.warmup, run.iters)
            suffix = "compiled + CUDA graph" if run.compile else "eager + CUDA graph"
            runs[f"{name} {suffix}"] = summarize(times, flops) | {"peak_mem_gib": peak}
        del model, step, out
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return runs


def _tinygemm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor):
    """PyTorch's tinygemm int4 GEMM on our weights, or None where it does not run: it packs pairs (even element in
    the high nibble), groups of 128, and computes w = (q - 8) * scale + zero with (K / 128, N, 2) scales and zeros."""
    n, groups = scale.shape
    half = q.shape[1] // groups
    codes = torch.cat([q.reshape(n, groups, half) & 15, q.reshape(n, groups, half) >> 4], -1).reshape(n, -1)
    pairs = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8)
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), 8)
        zeros = (offset.float() + 8 * scale.float()).to(x.dtype)
        sz = torch.stack([scale.to(x.dtype), zeros], dim=-1).transpose(0, 1).contiguous()  # (K / 128, N, 2)
        group = 2 * q.shape[1] // groups
        return lambda: torch.ops.aten._weight_int4pack_mm(x, packed, group, sz)
    except (RuntimeError, NotImplementedError) as e:
        return str(e).splitlines()[0][:160]


def bench_int4_gemms(run, device: torch.device, dtype: torch.dtype) -> dict:
    """The int4 kernels at the block linears' shapes, M = the image tokens of the CFG batch."""
    cfg = PRESETS[run.preset]
    d = cfg.dim
    m = 2 * run.batch * (run.height // 16) * (run.width // 16)
    out = {}
    g = torch.Generator(device=device).manual_seed(run.seed)
    for label, n, k in (("qkv", 3 * d, d), ("out", d, d), ("fc1", 4 * d, d), ("fc2", d, 4 * d)):
        x = torch.randn(m, k, device=device, generator=g).to(dtype)
        w = (torch.randn(n, k, device=device, generator=g) / k**0.5).to(dtype)
        q, s, o = quantize_int4(w, dtype)
        ref = w4a16_reference(x.float(), q, s, o, None)
        fns = {
            "bf16 F.linear": lambda x=x, w=w: F.linear(x, w),
            "int4 triton": lambda x=x, q=q, s=s, o=o: w4a16_linear(x, q, s, o, None),
        }
        if device.type == "cuda":
            dequant = torch.compile(w4a16_reference, fullgraph=True)
            fns["int4 torch (compiled dequant + cuBLAS)"] = lambda x=x, q=q, s=s, o=o, f=dequant: f(x, q, s, o, None)
            tiny = _tinygemm(x, q, s, o)
            if callable(tiny):
                fns["int4 tinygemm (torch._weight_int4pack_mm)"] = tiny
            else:
                out[f"{label} int4 tinygemm"] = {"error": tiny}
        for name, fn in fns.items():
            y = fn()
            times = time_steps(fn, device, run.warmup, run.iters)
            r = summarize(times, 2 * m * n * k) | {"shape": [m, n, k]}
            if name != "bf16 F.linear":
                r["rel_l2_vs_dequantized"] = ((y.float() - ref).norm() / ref.norm()).item()
            out[f"{label} {name}"] = r
    return out


def bench_quant(run, device: torch.device, dtype: torch.dtype) -> dict:
    res = {
        "stage": "quant",
        "shapes": {"batch": 2 * run.batch, "height": run.height, "width": run.width, "text_tokens": run.text_len},
        "runs": bench_recipes(run, device, dtype) if run.quant_part != "gemm" else {},
        "gemms": bench_int4_gemms(run, device, dtype) if run.quant_part != "dit" else {},
    }
    return res


def print_quant_table(res: dict) -> None:
    print(f"\nquant {res['shapes']}")
    print(f"{'run':34s} {'s/step':>8s} {'TFLOP/s':>8s} {'peak GiB':>8s} {'weights':>8s} {'cosine':>9s} {'rel L2':>8s}")
    for name, r in res["runs"].items():
        if "median_s" not in r:
            print(f"{name:34s} {r.get('error')}")
            continue
        print(
            f"{name:34s} {r['median_s']:8.4f} {r.get('tflops', float('nan')):8.1f} "
            f"{r.get('peak_mem_gib') or float('nan'):8.1f} {r.get('weights_gib', float('nan')):8.1f} "
            f"{r.get('cosine_vs_bf16', float('nan')):9.6f} {r.get('rel_l2_vs_bf16', float('nan')):8.4f}"
        )
    if res["gemms"]:
        print(f"\n{'int4 GEMM (M, N, K)':58s} {'ms':>8s} {'TFLOP/s':>8s} {'rel L2':>8s}")
        for name, r in res["gemms"].items():
            if "median_s" not in r:
                print(f"{name:58s} {r['error']}")
                continue
            label = f"{name} {tuple(r['shape'])}"
            print(
                f"{label:58s} {1e3 * r['median_s']:8.3f} {r['tflops']:8.1f} "
                f"{r.get('rel_l2_vs_dequantized', float('nan')):8.1e}"
            )
