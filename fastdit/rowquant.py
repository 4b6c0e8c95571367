"""Per-row fp8 (e4m3) quantization of activations, and GELU + quantization in one pass.

`quantize_rows(x)`: values and float32 scales per row (scale = absmax / 448, the e4m3 maximum).

`gelu_quantize_rows(h)` is the input side of an fp8 MLP's second GEMM. fc1's GEMM (`torch._scaled_mm`) has
no GELU epilogue, so between the two GEMMs sits h (M, 4 * dim) bf16 -> GELU -> per-row amax -> e4m3 values +
float32 scales. Compiled, inductor emits a looped reduction that reads h twice and evaluates GELU twice:
0.35 ms per block at 1024^2 with CFG on an H100 (21 ms per step). This kernel holds a whole row in registers
(12288 values over 8 warps), so h is read once and GELU evaluated once.

`gelu_quantize_rows(h)` takes any float h (..., N) and returns (values (..., N) e4m3, scales (..., 1)
float32); on CUDA with Triton it runs the kernel, elsewhere the same math in torch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448.0
# An all-zero row gets this absmax, so its scale is tiny but finite and it quantizes to zeros.
MIN_AMAX = 1e-12

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def missing_fp8_tensor_cores(device: torch.device) -> str | None:
    """None when the (visible) CUDA `device` has fp8 tensor cores (compute capability >= 8.9), else why not."""
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) >= (8, 9):
        return None
    return f"{torch.cuda.get_device_name(device)} has compute capability {major}.{minor}, fp8 needs >= 8.9"


def to_e4m3(x: Tensor, scale: Tensor) -> Tensor:
    """x / scale as e4m3, saturating at +-448: e4m3fn has no inf, so out of range would be NaN (the clamp
    catches rounding a hair above an absmax scale, or a bound that is too small)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """(..., K) -> (e4m3 values (..., K), float32 scales (..., 1)) with x ~= values * scales, per row."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=MIN_AMAX) / FP8_MAX
    return to_e4m3(xf, scale), scale


def gelu_quantize_rows_torch(h: Tensor) -> tuple[Tensor, Tensor]:
    """The kernel's math in torch: GELU(tanh) in float32, then `quantize_rows`."""
    return quantize_rows(F.gelu(h.float(), approximate="tanh"))


def _launch(kernel, h: Tensor) -> tuple[Tensor, Tensor]:
    n = h.shape[-1]
    x = h.reshape(-1, n)
    if x.stride(1) != 1:
        x = x.contiguous()
    values = torch.empty(x.shape, device=h.device, dtype=FP8)
    scales = torch.empty((x.shape[0], 1), device=h.device, dtype=torch.float32)
    # int(): under torch.compile a width that became dynamic (one function compiled for several widths) is
    # specialized here, since Triton's block size must be a constant.
    block = triton.next_power_of_2(int(n))
    # ~64 float32 values per thread: 8 warps at 12288 wide (H100: 0.151 ms at 8192 rows, 0.156 with 16 warps)
    warps = max(4, min(16, block // 2048))
    kernel[(x.shape[0],)](x, values, scales, n, x.stride(0), BLOCK=block, num_warps=warps)
    return values.view(h.shape), scales.view(*h.shape[:-1], 1)


if triton is not None:

    @triton.jit
    def _gelu_quantize_rows_kernel(X, Y, SCALE, N, stride_x, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        keep = offs < N
        x = tl.load(X + row * stride_x + offs, mask=keep, other=0.0).to(tl.float32)
        # GELU(tanh): 0.5 x (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2 / pi) (x + 0.044715 x^3)
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        g = x * tl.sigmoid(2.0 * u)
        scale = tl.maximum(tl.max(tl.abs(g), axis=0), 1e-12) / 448.0
        y = tl.clamp(g / scale, -448.0, 448.0).to(tl.float8e4nv)
        tl.store(Y + row * N + offs, y, mask=keep)
        tl.store(SCALE + row, scale)

    @torch.library.triton_op("fastdit::gelu_quantize_rows", mutates_args=())
    def _gelu_quantize_rows_op(h: Tensor) -> tuple[Tensor, Tensor]:
        return _launch(torch.library.wrap_triton(_gelu_quantize_rows_kernel), h)


def gelu_quantize_rows(h: Tensor) -> tuple[Tensor, Tensor]:
    """h (..., N) -> (GELU(h) as e4m3 (..., N), float32 per-row scales (..., 1))."""
    if triton is not None and h.is_cuda and math.prod(h.shape[:-1]) > 0:
        return _gelu_quantize_rows_op(h)
    return gelu_quantize_rows_torch(h)
