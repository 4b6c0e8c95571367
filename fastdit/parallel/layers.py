"""Linear layers for tensor parallelism. Each returns a plain Tensor.

Megatron's pairing: a column-parallel layer holds out_features / tp rows of the weight and needs no
collective (its input is replicated, its output stays sharded by feature); the row-parallel layer after it
holds in_features / tp columns, takes that sharded input and all-reduces its partial sums. The row bias is
added once, after the reduction. Collectives are functional (`torch.distributed._functional_collectives`)
so torch.compile(fullgraph=True) traces them into the graph; with one rank there is no collective at all.

Parameters are named `weight` and `bias` like nn.Linear's, so checkpoint names and the loader's key table
stay the same; the loader reads only this rank's slice (see `fastdit.parallel.transformer.shard_plan`).
"""

from __future__ import annotations

import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import Tensor
from torch.distributed import ProcessGroup

from fastdit.errors import ConfigError
from fastdit.models.layers import Linear

# all_gather_tensor was renamed all_gather_single (the old name warns on torch 2.13); same op underneath.
_gather_rows = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


def all_gather(x: Tensor, dim: int, group: ProcessGroup) -> Tensor:
    """Every rank's x joined along `dim` in rank order (a functional collective: traceable by torch.compile).

    The collective joins along dim 0; for another dim the (world, *x.shape) result is regrouped here (a view when
    every dim before `dim` has size 1, else one copy), not by funcol, whose regrouping torch 2.11's dynamo will not
    trace (a graph break per call)."""
    out = _gather_rows(x.contiguous(), 0, group)
    dim %= x.dim()
    if dim == 0:
        return out
    return out.unflatten(0, (-1, x.shape[0])).movedim(0, dim).flatten(dim, dim + 1)


def _split(n: int, world: int, what: str) -> int:
    if n % world:
        raise ConfigError(f"{what} of size {n} is not divisible by tp={world}")
    return n // world


class ReplicatedLinear(Linear):
    """The full weight on every rank; no collective."""


class ColumnParallelLinear(Linear):
    """Rows [rank * out / world, (rank + 1) * out / world) of the weight and bias: (..., in) -> (..., out / world).

    By default the output stays sharded by feature (no collective): the next layer is row-parallel or works
    per head. With `gather_output` the slices are all-gathered along the last dim back into (..., out), in
    the original feature order (used for modulation, whose shift/scale/gate every rank needs whole).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        world: int,
        bias: bool = True,
        group: ProcessGroup | None = None,
        gather_output: bool = False,
    ):
        if gather_output and world > 1 and group is None:
            raise ConfigError(f"ColumnParallelLinear gathering over {world} ranks needs a process group")
        super().__init__(in_features, _split(out_features, world, "output features"), bias)
        self.world, self.group = world, group
        self.gathers_output = gather_output and world > 1

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.gathers_output:
            y = all_gather(y, y.dim() - 1, self.group)
        return y

    def forward_gelu(self, x: Tensor) -> Tensor:
        if self.gathers_output:
            return F.gelu(self(x), approximate="tanh")
        return super().forward_gelu(x)


class RowParallelLinear(Linear):
    """Columns [rank * in / world, ...) of the weight: (..., in / world) -> (..., out), summed over the group."""

    def __init__(self, in_features: int, out_features: int, world: int, group: ProcessGroup | None, bias: bool = True):
        if world > 1 and group is None:
            raise ConfigError(f"RowParallelLinear over {world} ranks needs a process group")
        super().__init__(_split(in_features, world, "input features"), out_features, bias)
        self.world = world
        self.partial_sum_group = group if world > 1 else None

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight)
        if self.partial_sum_group is not None:
            y = funcol.all_reduce(y, "sum", self.partial_sum_group)
        return y if self.bias is None else y + self.bias

    def forward_gelu(self, x: Tensor) -> Tensor:
        return F.gelu(self(x), approximate="tanh")
