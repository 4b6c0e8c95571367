"""Weight-only int4 layers for the DiT (W4A16), applied from outside the model file.

Each swapped linear keeps W as group-wise asymmetric int4 (groups of 128 along the input dimension, a scale and an
offset per group in the compute dtype: fastdit.kernels.w4a16 has the format) and computes in the activations'
dtype: 0.53 bytes per weight instead of 2. The recipe `int4` (fastdit.quant.recipes) swaps the block linears
and the modulation projections, which brings the Qwen-Image DiT from 40.9 GB to under 11.5 GB (tests compute it
from the preset's shapes).

Kernels (`Int4Linear.kernel`): "triton", the fused W4A16 GEMM (dequantization in the GEMM's K loop, GELU in its
epilogue; CUDA, bf16 / fp16 activations), or "torch", the dequantize-then-GEMM reference (any device; compiled on
CUDA it is one fused dequantization kernel + cuBLAS). "auto" takes Triton where it runs. The weights do not
depend on the kernel, so a checkpoint serves both.

Tensor parallelism is not offered: `quantize_block` refuses sharded layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdit.errors import ConfigError
from fastdit.kernels.w4a16 import dequantize_int4, group_size, quantize_int4, w4a16_linear, w4a16_reference

KERNELS = ("auto", "triton", "torch")


class Int4Linear(nn.Module):
    """y = x @ W.T + b with W (out, in) in int4 groups of G = 128 (64 or 32 where 128 does not divide `in`):
    `qweight` (out, in / 2) uint8, `weight_scale` and `weight_offset` (out, in / G) and `bias` (out,) in the
    compute dtype."""

    # The loader keeps the packed weight as uint8 instead of casting it to the model dtype.
    keep_dtype = ("qweight",)
    # fastdit.models.layers.LinearLayer: GELU after the GEMM (in the Triton kernel's epilogue); no e4m3 input.
    fuses_gelu_input = False
    takes_e4m3 = False
    partial_sum_group = None
    gathers_output = False
    world = 1

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, *, dtype=torch.bfloat16, kernel: str = "auto"
    ):
        super().__init__()
        self.group = group_size(in_features)
        if kernel not in KERNELS:
            raise ConfigError(f"int4 kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
        self.in_features, self.out_features, self.kernel = in_features, out_features, kernel
        groups = in_features // self.group
        self.qweight = nn.Parameter(torch.empty(out_features, in_features // 2, dtype=torch.uint8), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, groups, dtype=dtype), requires_grad=False)
        self.weight_offset = nn.Parameter(torch.empty(out_features, groups, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"int4 groups of {self.group}, kernel={self.kernel}"
        )

    def load_float(self, weight: Tensor, bias: Tensor | None) -> None:
        """Quantize a float (out, in) weight into this layer (same device, scales in the weight's dtype)."""
        q, scale, offset = quantize_int4(weight, weight.dtype)
        self.qweight = nn.Parameter(q, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)
        self.weight_offset = nn.Parameter(offset, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def dequantized(self, dtype: torch.dtype | None = None) -> Tensor:
        """The (out, in) weight this layer multiplies by, in `dtype` (default: the scales' dtype)."""
        return dequantize_int4(self.qweight, self.weight_scale, self.weight_offset, dtype or self.weight_scale.dtype)

    def _run(self, x: Tensor, gelu: bool) -> Tensor:
        if self.kernel == "torch":
            return w4a16_reference(x, self.qweight, self.weight_scale, self.weight_offset, self.bias, gelu)
        return w4a16_linear(x, self.qweight, self.weight_scale, self.weight_offset, self.bias, gelu)

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x, gelu=False)

    def forward_gelu(self, x: Tensor) -> Tensor:
        return self._run(x, gelu=True)

    def forward_gelu_input(self, h: Tensor) -> Tensor:
        return self(F.gelu(h, approximate="tanh"))

    def forward_e4m3(self, x8: Tensor, scale: Tensor) -> Tensor:
        return self((x8.float() * scale).to(self.weight_scale.dtype))


def int4_layer(layer: nn.Module, kernel: str = "auto") -> Int4Linear:
    """The int4 replacement of a float linear layer; on meta an empty one for the loader to fill."""
    if isinstance(layer, Int4Linear):
        return layer
    if not isinstance(layer, nn.Linear):
        raise ConfigError(f"cannot quantize a {type(layer).__name__} to int4 (expected a linear layer)")
    if getattr(layer, "partial_sum_group", None) is not None or getattr(layer, "gathers_output", False):
        raise ConfigError("int4 layers do not run tensor-parallel; load without --tp or without int4")
    n, k = layer.weight.shape
    with torch.device("meta"):
        out = Int4Linear(k, n, layer.bias is not None, dtype=layer.weight.dtype, kernel=kernel)
    if layer.weight.device.type != "meta":
        out.load_float(layer.weight, layer.bias)
    return out


def set_int4_kernel(model: nn.Module, kernel: str) -> None:
    """Point every int4 layer of `model` at `kernel` (one of KERNELS)."""
    if kernel not in KERNELS:
        raise ConfigError(f"int4 kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    for module in model.modules():
        if isinstance(module, Int4Linear):
            module.kernel = kernel
