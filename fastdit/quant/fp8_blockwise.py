"""Fine-grained fp8 (e4m3) linears: activations scaled per 1 x 128 group, weights per 128 x 128 block.

Where `fastdit.quant.fp8.Fp8Linear` gives each token one scale and each output channel one scale, this layer gives
each token one scale per 128 input channels and each 128 x 128 tile of W its own: an outlier channel sets the
scale of its own group only (the scheme of DeepSeek-V3's fp8 GEMMs). On CUDA the GEMM is `torch._scaled_mm` with
(BlockWise1x128, BlockWise128x128) scales, which cuBLAS runs on Hopper (CUDA >= 12.9); `check_blockwise_device`
tries one small product first and raises FastditError where it does not run. `emulate=True` does the same
rounding with float32 math (any device): for tests only.

Shapes: `weight` (N, K) e4m3, `weight_scale` (N / 128, K / 128) float32, `bias` (N,) in the compute dtype; N and
K multiples of 128.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdit.errors import ConfigError, FastditError
from fastdit.kernels.fp8_rows import FP8, MIN_AMAX, to_e4m3

BLOCK = 128


def quantize_groups(x: Tensor) -> tuple[Tensor, Tensor]:
    """(M, K) -> (e4m3 (M, K), float32 scales (M, K / 128)): one scale per row and 128 columns."""
    m, k = x.shape
    g = x.float().reshape(m, k // BLOCK, BLOCK)
    scale = g.abs().amax(dim=-1).clamp(min=MIN_AMAX) / torch.finfo(FP8).max
    return to_e4m3(g, scale[..., None]).reshape(m, k), scale


def quantize_blocks(w: Tensor) -> tuple[Tensor, Tensor]:
    """(N, K) -> (e4m3 (N, K), float32 scales (N / 128, K / 128)): one scale per 128 x 128 tile."""
    n, k = w.shape
    tiles = w.float().reshape(n // BLOCK, BLOCK, k // BLOCK, BLOCK)
    scale = tiles.abs().amax(dim=(1, 3)).clamp(min=MIN_AMAX) / torch.finfo(FP8).max
    return to_e4m3(tiles, scale[:, None, :, None]).reshape(n, k), scale


def dequantize_blocks(w8: Tensor, scale: Tensor) -> Tensor:
    n, k = w8.shape
    tiles = w8.float().reshape(n // BLOCK, BLOCK, k // BLOCK, BLOCK) * scale[:, None, :, None]
    return tiles.reshape(n, k)


def _scaled_mm_blockwise(x8: Tensor, x_scale: Tensor, w8: Tensor, w_scale: Tensor, out_dtype) -> Tensor:
    # cuBLAS wants the 1 x 128 scales outer-dim-major (column-major (M, K / 128)) and the weight column-major.
    return torch._scaled_mm(
        x8,
        w8.t(),
        scale_a=x_scale.t().contiguous().t(),
        scale_b=w_scale.t(),  # (K / 128, N / 128), column-major view of the (N / 128, K / 128) scales
        out_dtype=out_dtype,
    )


@functools.cache
def _blockwise_problem(device: torch.device) -> str | None:
    """None if `torch._scaled_mm` runs 1 x 128 / 128 x 128 scaling on `device` and matches the emulation."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(128, 256, device=device, generator=g)
    w = torch.randn(256, 256, device=device, generator=g)
    x8, xs = quantize_groups(x)
    w8, ws = quantize_blocks(w)
    try:
        y = _scaled_mm_blockwise(x8, xs, w8, ws, torch.bfloat16).float()
    except (RuntimeError, ValueError) as e:
        return f"torch._scaled_mm refused blockwise scales here ({str(e).splitlines()[0]})"
    ref = _emulated(x8, xs, w8, ws)
    err = ((y - ref).norm() / ref.norm()).item()
    return None if err < 1e-2 else f"torch._scaled_mm's blockwise product is {err:.2e} off the emulation"


def check_blockwise_device(device: torch.device) -> None:
    """FastditError unless blockwise-scaled fp8 GEMMs run on `device` (CUDA)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise FastditError(
            f"blockwise fp8 GEMMs need a CUDA GPU with fp8 tensor cores, not {device} (emulate them for tests)"
        )
    if problem := _blockwise_problem(device):
        raise FastditError(f"blockwise fp8 does not run on {torch.cuda.get_device_name(device)}: {problem}")


def _emulated(x8: Tensor, x_scale: Tensor, w8: Tensor, w_scale: Tensor) -> Tensor:
    m, k = x8.shape
    x = (x8.float().reshape(m, k // BLOCK, BLOCK) * x_scale[..., None]).reshape(m, k)
    return x @ dequantize_blocks(w8, w_scale).t()


class Fp8BlockLinear(nn.Module):
    """y = x @ W.T + b with 1 x 128 activation scales and 128 x 128 weight scales (see the module docstring)."""

    keep_dtype = ("weight", "weight_scale")
    fuses_gelu_input = False
    takes_e4m3 = False
    partial_sum_group = None
    gathers_output = False
    world = 1

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, dtype=torch.bfloat16, emulate=False):
        super().__init__()
        if in_features % BLOCK or out_features % BLOCK:
            raise ConfigError(
                f"blockwise fp8 needs in and out features divisible by {BLOCK}, got {in_features} -> {out_features}"
            )
        self.in_features, self.out_features, self.emulate = in_features, out_features, emulate
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8), requires_grad=False)
        self.weight_scale = nn.Parameter(
            torch.empty(out_features // BLOCK, in_features // BLOCK, dtype=torch.float32), requires_grad=False
        )
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

    def extra_repr(self) -> str:
        mode = "emulated" if self.emulate else "e4m3"
        return f"in_features={self.in_features}, out_features={self.out_features}, 1x128 / 128x128 scales, {mode}"

    def load_float(self, weight: Tensor, bias: Tensor | None) -> None:
        w8, scale = quantize_blocks(weight.detach())
        self.weight = nn.Parameter(w8, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x8, x_scale = quantize_groups(x.reshape(-1, shape[-1]))
        if self.emulate:
            y = _emulated(x8, x_scale, self.weight, self.weight_scale).to(x.dtype)
        else:
            y = _scaled_mm_blockwise(x8, x_scale, self.weight, self.weight_scale, x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def forward_gelu(self, x: Tensor) -> Tensor:
        return F.gelu(self(x), approximate="tanh")

    def forward_gelu_input(self, h: Tensor) -> Tensor:
        return self(F.gelu(h, approximate="tanh"))

    def forward_e4m3(self, x8: Tensor, scale: Tensor) -> Tensor:
        dtype = self.bias.dtype if self.bias is not None else torch.bfloat16
        return self((x8.float() * scale).to(dtype))


def fp8_block_layer(layer: nn.Module, emulate: bool) -> Fp8BlockLinear:
    """The blockwise fp8 replacement of a float linear layer; on meta an empty one for the loader to fill."""
    if isinstance(layer, Fp8BlockLinear):
        return layer
    if not isinstance(layer, nn.Linear) or getattr(layer, "partial_sum_group", None) is not None:
        raise ConfigError(f"cannot quantize a {type(layer).__name__} to blockwise fp8 (expected an unsharded linear)")
    n, k = layer.weight.shape
    with torch.device("meta"):
        out = Fp8BlockLinear(k, n, layer.bias is not None, dtype=layer.weight.dtype, emulate=emulate)
    if layer.weight.device.type != "meta":
        out.load_float(layer.weight, layer.bias)
    return out
