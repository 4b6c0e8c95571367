"""Every execution plan cuDNN offers for the DiT's attention, timed: is a faster engine than the heuristic's
first choice available? (B=2, S=4224, 24 heads x 128: 1024x1024 with CFG.)

    python benchmarks/cudnn_plans.py

For fp8 (e4m3 Q, K, V, O, as `--attention fp8` runs it) and bf16, in the (B, S, H, D) layout the DiT passes
and in a contiguous (B, H, S, D) one: the graph is built with heuristics A, B and the fallback, all plans
are built (`build_plan_policy.ALL`) and each is timed alone (CUDA events, median of 20). Then torch's cuDNN
and flash SDPA ops for reference. Needs nvidia-cudnn-frontend (`pip install "fastdit[fp8-attention]"`).
"""

from __future__ import annotations

import statistics

import cudnn
import torch

B, S, H, D = 2, 4224, 24, 128
FLOPS = 4 * B * H * S * S * D
FP8 = torch.float8_e4m3fn
# (B, H, S, D) strides of each memory layout
LAYOUTS = {"bshd": [S * H * D, D, H * D, 1], "bhsd": [H * S * D, S * D, D, 1]}


def median_time(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def operand(stride: list[int], dtype: torch.dtype) -> torch.Tensor:
    """A (B, H, S, D) view with `stride` over N(0, 1.5^2) values."""
    base = torch.randn(B * S * H * D, device="cuda") * 1.5
    return torch.as_strided(base.to(torch.bfloat16), (B, H, S, D), stride).to(dtype)


def time_plans(handle, kind: str, layout: str) -> None:
    stride = LAYOUTS[layout]
    io = cudnn.data_type.FP8_E4M3 if kind == "fp8" else cudnn.data_type.BFLOAT16
    f32 = cudnn.data_type.FLOAT
    g = cudnn.pygraph(handle=handle, io_data_type=io, intermediate_data_type=f32, compute_data_type=f32)
    q, k, v = (g.tensor(name=n, dim=[B, H, S, D], stride=stride, data_type=io) for n in "qkv")
    buffers = {}
    if kind == "fp8":
        values = dict(descale_q=0.01, descale_k=0.01, descale_v=0.01, descale_s=1 / 448, scale_s=448.0, scale_o=100.0)
        scalars = {n: g.tensor(name=n, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=f32) for n in values}
        o, _, amax_s, amax_o = g.sdpa_fp8(
            q=q, k=k, v=v, **scalars, generate_stats=False, attn_scale=D**-0.5, name="sdpa"
        )
        for amax in (amax_s, amax_o):
            amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(f32)
            buffers[amax] = torch.empty(1, 1, 1, 1, device="cuda")
        buffers.update({scalars[n]: torch.full((1, 1, 1, 1), x, device="cuda") for n, x in values.items()})
        dtype = FP8
    else:
        o, _ = g.sdpa(q=q, k=k, v=v, generate_stats=False, attn_scale=D**-0.5, name="sdpa")
        dtype = torch.bfloat16
    o.set_output(True).set_dim([B, H, S, D]).set_stride(stride).set_data_type(io)
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.B, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans(cudnn.build_plan_policy.ALL)
    buffers.update({q: operand(stride, dtype), k: operand(stride, dtype), v: operand(stride, dtype)})
    buffers[o] = torch.empty_strided((B, H, S, D), stride, device="cuda", dtype=dtype)
    count = g.get_execution_plan_count()
    print(f"{kind} {layout}: {count} plans")
    for i in range(count):
        workspace = torch.empty(max(g.get_workspace_size_plan_at_index(i), 1), device="cuda", dtype=torch.uint8)
        t = median_time(lambda i=i, ws=workspace: g.execute_plan_at_index(buffers, ws, i, handle=handle))
        print(f"  plan {i} {g.get_plan_name_at_index(i)}: {t * 1e3:.3f} ms, {FLOPS / t / 1e12:.0f} TFLOP/s")


def main() -> None:
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {cudnn.backend_version()}")
    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    for kind in ("fp8", "bf16"):
        for layout in LAYOUTS:
            time_plans(handle, kind, layout)
    ops = {
        "cudnn": lambda q, k, v: torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, False, 0.0, False, False
        ),
        "flash": lambda q, k, v: torch.ops.aten._scaled_dot_product_flash_attention(q, k, v),
    }
    for layout, stride in LAYOUTS.items():
        qkv = [operand(stride, torch.bfloat16) for _ in range(3)]
        for name, op in ops.items():
            t = median_time(lambda op=op, qkv=qkv: op(*qkv))
            print(f"torch {name} bf16 {layout}: {t * 1e3:.3f} ms, {FLOPS / t / 1e12:.0f} TFLOP/s")


if __name__ == "__main__":
    main()
