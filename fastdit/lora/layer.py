"""`LoraLinear`: a block's linear layer (any `fastdit.models.layers.LinearLayer` kind) plus dynamic LoRA side GEMMs.

The layer computes `base(x) + (x @ down.T) @ up.T`, where `down` (R, in) stacks the down factors of every active
adapter (for a fused Q/K/V layer: of every active adapter's q, k and v parts) along the rank dimension and `up`
(out, R) stacks the up factors with each adapter's `scale * alpha / rank` folded in (block-diagonal for the fused
Q/K/V layer: part j's factors fill rows [j * out / 3, (j + 1) * out / 3)). K adapters cost one extra pair of
GEMMs, whatever K.

`down` and `up` are buffers of the module, so under torch.compile they are inputs of the compiled graph, not
constants: switching adapters or scales rewrites them in place (`pack`) and neither recompiles nor invalidates a
recorded CUDA graph. Their rank dimension is a fixed capacity (a multiple of `RANK_ALIGN`, zero-padded past the
active rank), and grows only when an active set needs more; a growth is a new shape (one recompile, one new CUDA
graph). With no active adapter the layer calls its base layer and nothing else (`active` is False: the compiled
graph of that case has no side GEMM).

Where the side product joins the base product depends on the kind, read from the `LinearLayer` attributes:

- a float layer that widens (`wide`: plain or column-parallel, resident, more outputs than inputs: the fused
  Q/K/V and the MLPs' first linears): one GEMM over the input widened by its down product,
  `[x | x @ down.T] @ [W | up].T`. The weight is stored as (out, in + capacity) with the base weight a view of
  its first `in` columns and `up` of the rest, and the input is padded to in + capacity by the kernel that
  produces it (compiled: the LayerNorm + modulation pass writes the wider rows; the down product then fills the
  last columns in place). Against a side product added to the output this saves the (M, out) product's write
  and read, and keeps the GELU in the GEMM's epilogue; the cost is one more read of x and `capacity` more
  columns of K. Layers with out <= in (the out-projections, the MLPs' second linears, whose inputs come from
  another GEMM or the attention) gain nothing from it and keep the side GEMMs below;
- other plain, replicated or column-parallel float layers: the side product is the base GEMM's C operand
  (`addmm`, beta = 1: no elementwise pass); a gathering column (sharded modulation) adds it to its local slice
  before the gather;
- row-parallel (`partial_sum_group` set, float or fp8): its `down` holds this rank's columns, so the side product
  is a partial sum too; it is added to the base's partial sums before their one all-reduce, and the bias after;
- fp8 (`fastdit.quant.fp8.Fp8Linear`): the base GEMM stays e4m3; the side GEMMs run in the compute dtype on the
  layer's float input (GELU'd or dequantized first for the `forward_gelu_input` / `forward_e4m3` entry points).
"""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import Tensor, nn

from fastdit.models.layers import linear_gelu
from fastdit.parallel.layers import all_gather
from fastdit.quant.fp8 import Fp8Linear

# The rank capacity of a layer's stacked factors is a multiple of this: GEMM-friendly, and fewer distinct shapes.
RANK_ALIGN = 16


def aligned_rank(rank: int) -> int:
    return -(-rank // RANK_ALIGN) * RANK_ALIGN


class LoraLinear(nn.Module):
    """`base` (a linear layer of any kind) with stacked LoRA factors; see the module docstring. `device`: where the
    factors live (the compute device, also for a base whose weights are streamed from host memory); `movable`:
    the base weight may be moved into a wider tensor (not for a block whose weights a streamer re-points).

    A base with forward hooks (fastdit.memory's on-demand weights, brought to the device for each call) is
    always called as a module, its side product added after: its weights exist on the device only inside its
    call, and it is never widened."""

    def __init__(self, base: nn.Module, *, dtype: torch.dtype, device: torch.device, movable: bool = True):
        super().__init__()
        self.base = base
        # fastdit.models.layers.LinearLayer: the same fusions and split as the base layer.
        self.fuses_gelu_input = base.fuses_gelu_input
        self.takes_e4m3 = base.takes_e4m3
        self.partial_sum_group = base.partial_sum_group
        self.gathers_output = base.gathers_output
        self.world = getattr(base, "world", 1)
        self.fp8 = isinstance(base, Fp8Linear)
        out_features, in_features = base.weight.shape
        self.in_features = in_features
        self.hooked = bool(base._forward_pre_hooks or base._forward_hooks)
        self.wide = (
            movable
            and not self.hooked
            and not self.fp8
            and self.partial_sum_group is None
            and out_features > in_features
            and base.weight.dtype == dtype
        )
        self.active = False
        self.register_buffer("down", torch.zeros(0, in_features, dtype=dtype, device=device), persistent=False)
        # wide: (out, in + capacity), the base weight's columns then up's, made by the first `pack`; else up alone.
        self.register_buffer("widened", None, persistent=False)
        self.register_buffer("side_up", torch.zeros(out_features, 0, dtype=dtype, device=device), persistent=False)

    @property
    def up(self) -> Tensor:
        """(out, capacity): the stacked up factors, scales folded in."""
        return self.side_up if self.widened is None else self.widened[:, self.in_features :]

    @property
    def weight(self) -> Tensor:
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    @property
    def capacity(self) -> int:
        return self.down.shape[0]

    def extra_repr(self) -> str:
        return f"rank capacity={self.capacity}, active={self.active}"

    @torch.no_grad()
    def pack(self, blocks: list[tuple[int, Tensor, Tensor]], rank: int) -> bool:
        """Load the active factors: `blocks` of (first output row, down (r, in), up (rows, r) with the scale
        folded in), `rank` their total r. In place when the capacity suffices (compiled graphs and CUDA graphs
        keep reading these buffers); else the buffers grow. Returns whether they grew (a new shape)."""
        grow = rank > self.capacity
        if grow:
            cap = aligned_rank(rank)
            self.down = self.down.new_zeros(cap, self.down.shape[1])
            if self.wide:
                self._widen(cap)
            else:
                self.side_up = self.side_up.new_zeros(self.side_up.shape[0], cap)
        else:
            self.down.zero_()
            self.up.zero_()
        col = 0
        for row, down, up in blocks:
            r = down.shape[0]
            self.down[col : col + r].copy_(down)
            self.up[row : row + up.shape[0], col : col + r].copy_(up)
            col += r
        self.active = rank > 0
        return grow

    def _widen(self, cap: int) -> None:
        """Move the base weight into a new (out, in + cap) tensor and make it a view of its first columns (the
        old storage is freed unless something else holds it); in place of the base's parameter, so merging and
        restoring weights act on the view."""
        weight = self.base.weight
        widened = weight.new_zeros(weight.shape[0], self.in_features + cap)
        widened[:, : self.in_features].copy_(weight)
        self.base.weight = nn.Parameter(widened[:, : self.in_features], requires_grad=False)
        self.widened = widened

    def release(self) -> nn.Module:
        """The base layer, with a weight of its own again (contiguous, the same values) if it was widened."""
        if self.widened is not None:
            self.base.weight = nn.Parameter(self.base.weight.contiguous(), requires_grad=False)
            self.widened = None
        return self.base

    def clear(self) -> None:
        """No active adapter: the base layer alone (the buffers keep their capacity for the next set)."""
        self.active = False

    # ---- the LinearLayer entry points ---------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        if not self.active:
            return self.base(x)
        if self.hooked:  # a single-device layer (memory plans run on one device): nothing to finish
            return self.base(x) + self._side(x)
        if self.fp8:
            return self._finish(self.base._gemm(x) + self._side(x))
        if self.wide:
            return self._finish(F.linear(self._widened_input(x), self.widened, self.base.bias))
        return self._finish(self._float_product(x))

    def forward_gelu(self, x: Tensor) -> Tensor:
        if not self.active:
            return self.base.forward_gelu(x)
        if self.wide:  # the GELU stays in the GEMM's epilogue
            return self._finish(linear_gelu(self._widened_input(x), self.widened, self.base.bias))
        return F.gelu(self(x), approximate="tanh")

    def forward_gelu_input(self, h: Tensor) -> Tensor:
        if not self.active:
            return self.base.forward_gelu_input(h)
        g = F.gelu(h, approximate="tanh")
        if not self.fp8 or self.hooked:
            return self(g)
        # The e4m3 GEMM keeps GELU inside its quantization pass; the side GEMMs take the GELU'd input.
        return self._finish(self.base._gemm(h, gelu_input=True) + self._side(g))

    def forward_e4m3(self, x8: Tensor, scale: Tensor) -> Tensor:
        if not self.active:
            return self.base.forward_e4m3(x8, scale)
        x = (x8.float() * scale).to(self.down.dtype)
        if not self.fp8 or self.hooked:
            return self(x)
        return self._finish(self.base._gemm(x8, x_scale=scale) + self._side(x))

    # ---- the parts --------------------------------------------------------------------------------------

    def _widened_input(self, x: Tensor) -> Tensor:
        """(..., in) -> (..., in + capacity): [x | x @ down.T]. The pad fuses into the kernel producing x, the
        down product reads x back from the wider rows and writes its columns in place (compiled, a slice scatter
        that is re-inplaced: no copy of x)."""
        xc = F.pad(x.to(self.down.dtype), (0, self.capacity))
        xc[..., self.in_features :] = F.linear(xc[..., : self.in_features], self.down)
        return xc

    def _side(self, x: Tensor) -> Tensor:
        """(..., in) -> (..., out): the stacked LoRA product, in the compute dtype (a partial sum on a row shard)."""
        return F.linear(F.linear(x.to(self.down.dtype), self.down), self.up)

    def _float_product(self, x: Tensor) -> Tensor:
        """x @ W.T + side(x) (+ the bias, unless a row shard adds it after its all-reduce), before any collective.

        As two GEMM epilogues rather than elementwise passes: the up-projection adds the bias, and the base GEMM
        adds the side product as its C operand (beta = 1), where the read of (M, out) hides under the compute."""
        x2 = x.reshape(-1, x.shape[-1])
        bias = None if self.partial_sum_group is not None else self.base.bias
        side = F.linear(F.linear(x2, self.down), self.up, bias)  # (M, out)
        return torch.addmm(side, x2, self.base.weight.t()).view(*x.shape[:-1], side.shape[-1])

    def _finish(self, y: Tensor) -> Tensor:
        """The base layer's collective: a row shard's all-reduce (then the bias), a gathering column's all-gather."""
        if self.fp8:
            return self.base._finish(y)
        if self.partial_sum_group is not None:
            y = funcol.all_reduce(y, "sum", self.partial_sum_group)
            return y if self.base.bias is None else y + self.base.bias
        if self.gathers_output:
            y = all_gather(y, y.dim() - 1, self.base.group)
        return y
