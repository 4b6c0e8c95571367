"""GPU check of fastdit's fp8 (e4m3) DiT: accuracy, speed and weight memory against bf16. Needs CUDA >= 8.9.

    python benchmarks/fp8_check.py            # about 3 minutes on one H100
    python benchmarks/fp8_check.py --no-modulation --iters 5

The full-size Qwen-Image DiT with random bf16 weights (fastdit.bench.weights.random_dit) at 1024x1024, CFG batch 2,
128 text tokens; every variant runs with regional compile (fastdit.models.qwenimage.compile_blocks). The model is
quantized IN PLACE between variants (bf16 -> fp8 block linears -> fp8 + modulation -> the same with
fastdit's int8 attention kernel, then with cuDNN's fp8 attention), so at no point do a bf16 and an fp8 copy share the GPU. Each variant is also timed
captured in a CUDA graph (column "CUDA graph"). Also checks the real `torch._scaled_mm` layer against the float
emulation used by the CPU tests, and the compiled fp8 model against its eager run (cos(eager)).

Cosine similarity is of the velocity output against the bf16 output. Random weights have no outliers, so
this is the scheme's floor; trained checkpoints need their own check (e.g. images through the pipeline).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch._dynamo
import torch.nn.functional as F

from fastdit.bench.timing import cuda_graph, measure, time_steps
from fastdit.bench.weights import dit_inputs, random_dit
from fastdit.kernels.attention_fp8 import missing_fp8_attention
from fastdit.kernels.attention_int8 import int8_attention_available
from fastdit.models.layers import set_attention_backend
from fastdit.models.qwenimage import PRESETS
from fastdit.quant.fp8 import BLOCK_LINEARS, MODULATION, Fp8Linear, check_fp8_device, quantize_model
from fastdit.runtime.compile import compile_blocks


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def weight_gib(model) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def layer_check(device) -> float:
    """Relative L2 difference of the real fp8 GEMM vs the float emulation on the same quantized weights."""
    g = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(3072, 3072, device=device, generator=g, dtype=torch.float32) / 3072**0.5
    x = torch.randn(2, 4224, 3072, device=device, generator=g).to(torch.bfloat16)
    real = Fp8Linear(3072, 3072, emulate=False).to_empty(device=device)
    real.load_float(w.to(torch.bfloat16), torch.randn(3072, device=device, dtype=torch.bfloat16) * 0.02)
    emu = Fp8Linear(3072, 3072, emulate=True).to_empty(device=device)
    emu.load_float(w.to(torch.bfloat16), real.bias)
    with torch.no_grad():
        a, b = real(x).float(), emu(x).float()
    return ((a - b).norm() / b.norm()).item()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-modulation", action="store_true", help="skip the fp8 + modulation variant")
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--no-8bit-attention", action="store_true", help="skip the variants with 8-bit attention")
    ap.add_argument("--no-int8", action="store_true", help="skip the int8 attention variant (keep fp8 attention)")
    args = ap.parse_args()
    device = torch.device("cuda")
    check_fp8_device(device)
    torch.set_grad_enabled(False)
    cfg = PRESETS["qwen-image"]
    x, enc, t, shapes = dit_inputs(cfg, 2, 1024, 1024, 128, torch.bfloat16, device)
    log(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    log(f"fp8 layer vs float emulation: rel L2 {layer_check(device):.2e}")

    t0 = time.perf_counter()
    model = random_dit(cfg, torch.bfloat16, device)
    backend = set_attention_backend(model, args.attention)
    rope = model.make_rope(shapes, 128, device)
    log(f"built the bf16 DiT in {time.perf_counter() - t0:.0f} s, attention {backend}")
    compile_blocks(model)
    step = lambda: model(x, enc, None, t, rope=rope)

    rows, ref = [], None
    variants = [("bf16", None, backend), ("fp8 blocks", BLOCK_LINEARS, backend)]
    if not args.no_modulation:
        variants.append(("fp8 blocks + modulation", BLOCK_LINEARS + MODULATION, backend))
    name, last = variants[-1][:2]
    if not (args.no_8bit_attention or args.no_int8) and int8_attention_available(device):
        variants.append((f"{name} + int8 attention", last, "int8"))
    if not args.no_8bit_attention:
        why = missing_fp8_attention(device)
        if why is None:
            variants.append((f"{name} + fp8 attention", last, "fp8"))
        else:
            log(f"skipping the fp8 attention variant: {why}")
    for name, modules, attention in variants:
        extra = {}
        set_attention_backend(model, attention)
        if modules is not None:
            quantize_model(model, modules=modules)  # in place; layers already in fp8 are kept
            torch.cuda.empty_cache()
            with torch.compiler.set_stance("force_eager"):  # once, to check the compiled graph against it
                eager = model(x, enc, None, t, rope=rope)
        torch._dynamo.reset()
        out, first, times, extra["peak_gib"] = measure(step, device, args.warmup, args.iters)  # before the graph
        graphed = cuda_graph(step)
        extra["graph_s"] = statistics.median(time_steps(graphed, device, args.warmup, args.iters))
        del graphed
        if ref is None:
            ref = out.clone()
        if modules is not None:
            extra["eager_cos"] = cosine(out, eager)
        row = {
            "variant": name,
            "s_step": statistics.median(times),
            "min": min(times),
            "cos": cosine(out, ref),
            "weights_gib": weight_gib(model),
            "compile_s": first,
            **extra,
        }
        rows.append(row)
        log(f"[{name}] {row['s_step']:.4f} s/step, cos vs bf16 {row['cos']:.5f}, weights {row['weights_gib']:.1f} GiB")

    base = rows[0]["s_step"]
    print("\nQwen-Image DiT, 1024x1024, CFG batch 2, 128 text tokens, regional compile")
    print(
        f"{'variant':42s} {'s/step':>8s} {'min':>8s} {'speedup':>8s} {'cos(bf16)':>10s} {'cos(eager)':>10s} "
        f"{'weights GiB':>11s} {'peak GiB':>9s} {'compile s':>9s} {'CUDA graph':>10s}"
    )
    for r in rows:
        eager = f"{r['eager_cos']:.5f}" if "eager_cos" in r else "-"
        print(
            f"{r['variant']:42s} {r['s_step']:8.4f} {r['min']:8.4f} {base / r['s_step']:7.2f}x {r['cos']:10.5f} "
            f"{eager:>10s} {r['weights_gib']:11.1f} {r['peak_gib']:9.1f} {r['compile_s']:9.1f} {r['graph_s']:10.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
