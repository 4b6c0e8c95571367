"""Where one compiled DiT step spends its GPU time: the kernels of one step, largest first.

    python benchmarks/profile_step.py                                  # bf16
    python benchmarks/profile_step.py --quantize fp8 --attention fp8   # fp8 linears + cuDNN's fp8 attention

The full-size Qwen-Image DiT with random weights (fastdit.bench.weights.random_dit), 1024x1024, CFG batch 2,
128 text tokens, regional compile, modulation from the table (as the pipeline runs a step). Prints the
step time (CUDA events, and replayed from a CUDA graph), then torch.profiler's per-kernel GPU time.
"""

from __future__ import annotations

import argparse
import ast
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from fastdit.bench.timing import cuda_graph, time_steps
from fastdit.bench.weights import dit_inputs, random_dit
from fastdit.models.layers import set_attention_backend
from fastdit.models.qwenimage import PRESETS
from fastdit.runtime.compile import compile_blocks


def _option(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quantize", choices=["fp8"], default=None)
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--top", type=int, default=25, help="kernels to list")
    ap.add_argument(
        "--inductor",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an inductor config patch for the blocks' compile, e.g. combo_kernels=True (repeatable)",
    )
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    device = torch.device("cuda")
    cfg = PRESETS["qwen-image"]
    x, enc, t, shapes = dit_inputs(cfg, 2, 1024, 1024, 128, torch.bfloat16, device)
    model = random_dit(cfg, torch.bfloat16, device)
    if args.quantize:
        from fastdit.quant.fp8 import quantize_model

        quantize_model(model)
        torch.cuda.empty_cache()
    backend = set_attention_backend(model, args.attention)
    rope = model.make_rope(shapes, 128, device)
    mod = model.modulation_table(t[:1])[0]
    compile_blocks(model, options=dict(_option(o) for o in args.inductor) or None)
    step = lambda: model(x, enc, None, t, rope=rope, modulation=mod)
    step()
    s = statistics.median(time_steps(step, device, 3, 10))
    g = statistics.median(time_steps(cuda_graph(step), device, 3, 10))
    print(
        f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}; linears {args.quantize or 'bf16'}, "
        f"attention {backend}: {s:.4f} s/step compiled, {g:.4f} s/step replayed from a CUDA graph"
    )
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
    events = sorted((e for e in p.key_averages() if e.device_time_total > 0), key=lambda e: -e.device_time_total)
    print(f"GPU time: {sum(e.device_time_total for e in events) / 2e3:.1f} ms per step")
    for e in events[: args.top]:
        print(f"{e.device_time_total / 2e3:8.2f} ms {e.count // 2:5d}x  {e.key[:120]}")


if __name__ == "__main__":
    main()
