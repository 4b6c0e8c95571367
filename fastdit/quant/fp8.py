"""FP8 (e4m3) W8A8 inference for the DiT, applied from outside the model file.

Scheme (per GEMM y = x @ W.T + b):
- weights: e4m3 with one float32 scale per output channel (row of W), computed once at load
  (`quantize_rows`: scale = absmax / 448, the e4m3 maximum);
- activations: e4m3 with one float32 scale per token (row of x), computed on the fly in `forward`
  (torch.compile fuses this into the kernel that produces x);
- the GEMM is `torch._scaled_mm` with row-wise scales: scale_a (M, 1), scale_b (1, N), bf16 out, bias in
  the epilogue. K and N must be multiples of 16; b must be column-major, so we pass `weight.t()` of the
  (N, K) row-major fp8 weight. Needs CUDA compute capability >= 8.9 (Ada, Hopper).

What is quantized: the block linears (`BLOCK_LINEARS`: fused QKV, attention out-projections, MLPs): about
two thirds of the weights and almost all the FLOPs. Modulation (`MODULATION`, one third of the weights but
only B rows of activations), norms, attention, img_in / txt_in / final stay in bf16 unless asked. Which of the
block linears a `quantize=` value swaps is its recipe's choice (fastdit.quant.recipes: `fp8` keeps the MLPs'
second linears in bf16, `fp8-fast` swaps all of them).

Where fp8 cannot run (CPU, GPUs below 8.9) `FastditError` is raised; nothing falls back silently. Tests
use the explicit emulation mode (`emulate=True`, or the mode string "fp8-emulated"): the same fp8 rounding
of weights and activations, with float32 math for the product.

Tensor parallelism: quantize AFTER sharding, on each rank's local weights. `quantize_model` reads only the
`fastdit.models.layers.LinearLayer` interface of the layer it replaces: a column-parallel shard becomes an
`Fp8Linear` of the local shape (it had no collective); a row-parallel shard (`partial_sum_group` set) becomes
an `Fp8Linear` that all-reduces its dequantized partial sums over that group before adding the bias once, so
no scale crosses ranks.

Checkpoints written in fp8 are fastdit.quant.checkpoint's.
"""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import Tensor, nn

from fastdit.errors import ConfigError, FastditError
from fastdit.kernels.fp8_rows import FP8, gelu_quantize_rows, missing_fp8_tensor_cores, quantize_rows

# Block submodules (paths inside `Block`) that `quantize_model` swaps by default, and the opt-in extra.
BLOCK_LINEARS = (
    "attn.img_qkv",
    "attn.txt_qkv",
    "attn.img_out",
    "attn.txt_out",
    "img_mlp.fc1",
    "img_mlp.fc2",
    "txt_mlp.fc1",
    "txt_mlp.fc2",
)
MODULATION = ("img_mod.lin", "txt_mod.lin")


def check_fp8_device(device: str | torch.device) -> None:
    """Raise FastditError unless `device` can run e4m3 GEMMs (CUDA, compute capability >= 8.9)."""
    device = torch.device(device)
    hint = "run in bf16 instead (no --quantize); emulation (quantize='fp8-emulated') is for tests, not speed"
    if device.type != "cuda":
        raise FastditError(
            f"fp8 (e4m3) GEMMs need a CUDA GPU with compute capability >= 8.9 (Ada, Hopper or newer), "
            f"but the model is on {device}: {hint}"
        )
    if not torch.cuda.is_available():
        raise FastditError(f"fp8 asked for on {device}, but no CUDA GPU is visible")
    if problem := missing_fp8_tensor_cores(device):
        raise FastditError(f"fp8 (e4m3) GEMMs need Ada, Hopper or newer: {problem}; {hint}")


# ---------------------------------------------------------------------------------------------------------
# Layers


class Fp8Linear(nn.Module):
    """y = x @ W.T + b with W (out, in) in e4m3 + per-output-channel float32 scales, x quantized per token.

    Parameters: `weight` (out, in) float8_e4m3fn, `weight_scale` (out,) float32, `bias` (out,) in the
    compute dtype (bf16 on the GPU). `emulate=True` does the same rounding with float32 matmuls (any
    device, any float dtype): for tests only. `fast_accum` is `_scaled_mm`'s use_fast_accum (Hopper's
    faster fp8 accumulation; the usual choice for inference).
    """

    # The loader keeps these parameters in the dtype declared here instead of casting them to the model dtype.
    keep_dtype = ("weight", "weight_scale")
    # fastdit.models.layers.LinearLayer: GELU goes into the input's quantization pass; e4m3 inputs are taken as is.
    fuses_gelu_input = True
    takes_e4m3 = True
    gathers_output = False

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        dtype: torch.dtype = torch.bfloat16,
        emulate: bool = False,
        fast_accum: bool = True,
        partial_sum_group=None,
        world: int = 1,
    ):
        super().__init__()
        if world > 1 and partial_sum_group is None:
            raise ConfigError(f"an fp8 layer summing partial products over {world} ranks needs a process group")
        self.partial_sum_group, self.world = partial_sum_group, world
        if in_features % 16 or out_features % 16:
            raise ConfigError(
                f"fp8 GEMMs need in and out features divisible by 16, got {in_features} -> {out_features}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.emulate, self.fast_accum = emulate, fast_accum
        self.out_dtype = dtype  # of an e4m3 input's output (forward_e4m3); float inputs keep their own dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=torch.float32), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

    def extra_repr(self) -> str:
        mode = "emulated" if self.emulate else "e4m3"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {mode}"

    def load_float(self, weight: Tensor, bias: Tensor | None) -> None:
        """Quantize a float (out, in) weight into this layer (same device); the bias is kept as given."""
        w, scale = quantize_rows(weight.detach())
        self.weight = nn.Parameter(w, requires_grad=False)
        self.weight_scale = nn.Parameter(scale.squeeze(1), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return self._finish(self._gemm(x))

    def forward_gelu(self, x: Tensor) -> Tensor:
        """GELU(tanh)(linear(x)), for an MLP's fc1 when fc2 is not fp8: the fp8 GEMM has no GELU epilogue."""
        return F.gelu(self(x), approximate="tanh")

    def forward_gelu_input(self, h: Tensor) -> Tensor:
        """linear(GELU(tanh)(h)), for an MLP's fc2: the GELU runs inside the per-row quantization of h, one pass
        over the MLP's widest activation (fastdit.kernels.fp8_rows)."""
        return self._finish(self._gemm(h, gelu_input=True))

    def forward_e4m3(self, x8: Tensor, scale: Tensor) -> Tensor:
        """linear(x8 * scale) for an input that is already e4m3 with one (1,) float32 scale (the fp8 attention's
        output, fastdit.kernels.attention_fp8): no quantization pass. Returns the compute dtype (bf16 on the GPU)."""
        return self._finish(self._gemm(x8, x_scale=scale))

    def _finish(self, y: Tensor) -> Tensor:
        """The bias, in the GEMM's epilogue on one rank; after the all-reduce of the partial sums on several."""
        if self.world > 1:
            y = funcol.all_reduce(y, "sum", self.partial_sum_group)
            return y if self.bias is None else y + self.bias
        return y

    def _gemm(self, x: Tensor, gelu_input: bool = False, x_scale: Tensor | None = None) -> Tensor:
        bias = self.bias if self.world == 1 else None  # several ranks: added once, after the reduction
        shape = x.shape
        if x_scale is None:
            quantize = gelu_quantize_rows if gelu_input else quantize_rows
            xq, x_scale = quantize(x.reshape(-1, shape[-1]))  # (M, K) e4m3, (M, 1) float32
            out_dtype = x.dtype
        else:  # x is e4m3 already, one scale for all rows
            xq = x.reshape(-1, shape[-1])
            x_scale = x_scale.reshape(1, 1).expand(xq.shape[0], 1).contiguous()
            out_dtype = self.out_dtype if self.bias is None else self.bias.dtype
        if self.emulate:
            y = (xq.float() @ self.weight.float().t()) * x_scale * self.weight_scale  # (M, N) float32
            if bias is not None:
                y = y + bias.float()
            y = y.to(out_dtype)
        else:
            if not x.is_cuda or out_dtype != torch.bfloat16:
                raise FastditError(
                    f"Fp8Linear runs on CUDA in bfloat16, got a {out_dtype} input on {x.device} "
                    "(use quantize='fp8-emulated' for CPU tests)"
                )
            y = torch._scaled_mm(
                xq,
                self.weight.t(),  # (K, N) column-major view of the (N, K) row-major weight
                scale_a=x_scale,
                scale_b=self.weight_scale[None, :],  # (1, N)
                bias=bias,
                out_dtype=torch.bfloat16,
                use_fast_accum=self.fast_accum,
            )
        return y.reshape(*shape[:-1], y.shape[-1])


def fp8_layer(layer: nn.Module, emulate: bool, fast_accum: bool) -> Fp8Linear:
    """The fp8 replacement of a (possibly sharded) linear layer; on meta an empty one for the loader to fill."""
    if isinstance(layer, Fp8Linear):
        return layer
    if not isinstance(layer, nn.Linear):
        raise ConfigError(f"cannot quantize a {type(layer).__name__} to fp8 (expected a linear layer)")
    if layer.gathers_output:
        raise ConfigError("a column-parallel layer that all-gathers its output (sharded modulation) can't be fp8")
    n, k = layer.weight.shape
    group = layer.partial_sum_group
    world = 1 if group is None else layer.world
    with torch.device("meta"):
        out = Fp8Linear(
            k,
            n,
            layer.bias is not None,
            dtype=layer.weight.dtype,
            emulate=emulate,
            fast_accum=fast_accum,
            partial_sum_group=group,
            world=world,
        )
    if layer.weight.device.type != "meta":
        out.load_float(layer.weight, layer.bias)
    return out


def quantize_model(
    model: nn.Module, *, emulate: bool = False, modules: tuple[str, ...] = BLOCK_LINEARS, fast_accum: bool = True
) -> nn.Module:
    """Swap each block's `modules` (paths inside a Block) for fp8 layers, in place; returns the model.

    Works on a loaded model (quantizes its weights, one layer at a time, freeing each float weight as it
    goes), on a model built on meta (empty fp8 layers for the loader to fill), and on a
    `fastdit.parallel.ParallelTransformer` or any model whose layers were swapped for parallel ones (their
    `fastdit.models.layers.LinearLayer` attributes say how each one is sharded).
    Without `emulate`, raises FastditError unless the weights are on an fp8-capable GPU.
    """
    inner = model.base  # the model under a fastdit.parallel wrapper
    device = next(inner.parameters()).device
    if not emulate and device.type != "meta":
        check_fp8_device(device)
    for block in inner.blocks:
        for path in modules:
            parent_name, _, leaf = path.rpartition(".")
            parent = block.get_submodule(parent_name)
            setattr(parent, leaf, fp8_layer(getattr(parent, leaf), emulate, fast_accum))
    return model
