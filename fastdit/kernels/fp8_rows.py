"""Per-row fp8 (e4m3) quantization of activations, and GELU + quantization in one pass.

`quantize_rows(x)`: values and float32 scales per row (scale = absmax / 448, the e4m3 maximum).

`gelu_quantize_rows(h)` is the input side of an fp8 MLP's second GEMM. fc1's GEMM (`torch._scaled_mm`) has
no GELU epilogue, so between the two GEMMs sits h (M, 4 * dim) bf16 -> GELU -> per-row amax -> e4m3 values +
float32 scales. Compiled, inductor emits a looped reduction that reads h twice and evaluates GELU twice
(benchmarks/RESULTS.md has the cost). This kernel holds a whole row in registers
(12288 values over 8 warps, as three chunks of 4096), so h is read once and GELU evaluated once.

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
    # The row is up to four chunks of a power-of-two width (Triton's block sizes are powers of two): 12288 is
    # 3 x 4096, where one 16384-wide block would leave a quarter of its registers masked off (slower; measured in
    # benchmarks/HISTORY.md). int(): under torch.compile a width that became dynamic (one
    # function compiled for several widths) is specialized here.
    width = max(16, triton.next_power_of_2(int(n)) // 4)
    chunks = triton.cdiv(int(n), width)
    # ~48 float32 values per thread at 12288 wide with 8 warps (4 and 16 warps measured slower)
    warps = max(1, min(8, width * chunks // 1536))
    kernel[(x.shape[0],)](
        x, values, scales, n, x.stride(0), WIDTH=width, CHUNKS=chunks, EVEN=chunks * width == n, num_warps=warps
    )
    return values.view(h.shape), scales.view(*h.shape[:-1], 1)


if triton is not None:

    @triton.jit
    def _gelu_chunk(row_ptr, offs, N, EVEN: tl.constexpr):
        if EVEN:
            x = tl.load(row_ptr + offs).to(tl.float32)
        else:
            x = tl.load(row_ptr + offs, mask=offs < N, other=0.0).to(tl.float32)
        # GELU(tanh): 0.5 x (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2 / pi) (x + 0.044715 x^3)
        return x * tl.sigmoid(2.0 * (0.7978845608028654 * (x + 0.044715 * x * x * x)))

    @triton.jit
    def _store_chunk(row_ptr, offs, g, scale, N, EVEN: tl.constexpr):
        y = tl.clamp(g / scale, -448.0, 448.0).to(tl.float8e4nv)
        if EVEN:
            tl.store(row_ptr + offs, y)
        else:
            tl.store(row_ptr + offs, y, mask=offs < N)

    @triton.jit
    def _gelu_quantize_rows_kernel(
        X, Y, SCALE, N, stride_x, WIDTH: tl.constexpr, CHUNKS: tl.constexpr, EVEN: tl.constexpr
    ):
        # One row per program, held in registers as CHUNKS (1 to 4) chunks of WIDTH values, each its own
        # variable: read once, GELU once, one absmax over all, then the scaled e4m3 writes.
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, WIDTH)
        x_row = X + row * stride_x
        y_row = Y + row * N
        g0 = _gelu_chunk(x_row, offs, N, EVEN)
        amax = tl.max(tl.abs(g0), axis=0)
        if CHUNKS > 1:
            g1 = _gelu_chunk(x_row, offs + WIDTH, N, EVEN)
            amax = tl.maximum(amax, tl.max(tl.abs(g1), axis=0))
        if CHUNKS > 2:
            g2 = _gelu_chunk(x_row, offs + 2 * WIDTH, N, EVEN)
            amax = tl.maximum(amax, tl.max(tl.abs(g2), axis=0))
        if CHUNKS > 3:
            g3 = _gelu_chunk(x_row, offs + 3 * WIDTH, N, EVEN)
            amax = tl.maximum(amax, tl.max(tl.abs(g3), axis=0))
        scale = tl.maximum(amax, 1e-12) / 448.0
        _store_chunk(y_row, offs, g0, scale, N, EVEN)
        if CHUNKS > 1:
            _store_chunk(y_row, offs + WIDTH, g1, scale, N, EVEN)
        if CHUNKS > 2:
            _store_chunk(y_row, offs + 2 * WIDTH, g2, scale, N, EVEN)
        if CHUNKS > 3:
            _store_chunk(y_row, offs + 3 * WIDTH, g3, scale, N, EVEN)
        tl.store(SCALE + row, scale)

    @torch.library.triton_op("fastdit::gelu_quantize_rows", mutates_args=())
    def _gelu_quantize_rows_op(h: Tensor) -> tuple[Tensor, Tensor]:
        return _launch(torch.library.wrap_triton(_gelu_quantize_rows_kernel), h)


def gelu_quantize_rows(h: Tensor) -> tuple[Tensor, Tensor]:
    """h (..., N) -> (GELU(h) as e4m3 (..., N), float32 per-row scales (..., 1))."""
    if triton is not None and h.is_cuda and math.prod(h.shape[:-1]) > 0:
        return _gelu_quantize_rows_op(h)
    return gelu_quantize_rows_torch(h)
