"""Process groups for tensor (tp), Ulysses sequence (sp) and CFG (cfg) parallelism.

Layout of the global ranks, cfg outermost and tp innermost (tp peers are neighbours, so on one host they
share the fastest links; the tp all-reduces are the most frequent collectives):

    rank = cfg_rank * (sp * tp) + sp_rank * tp + tp_rank

Everything a parallel layer needs is in one frozen `ParallelState`, passed explicitly to the functions
that build layers; no layer reads global state. A dimension of size 1 has no group (`None`) and the layers
along it run no collective at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from fastdit.errors import ConfigError


@dataclass(frozen=True)
class ParallelState:
    tp: int
    sp: int
    cfg: int
    tp_rank: int = 0
    sp_rank: int = 0
    cfg_rank: int = 0
    tp_group: ProcessGroup | None = None
    sp_group: ProcessGroup | None = None
    cfg_group: ProcessGroup | None = None
    device: torch.device = torch.device("cpu")

    @property
    def world_size(self) -> int:
        return self.tp * self.sp * self.cfg

    @property
    def rank(self) -> int:
        return (self.cfg_rank * self.sp + self.sp_rank) * self.tp + self.tp_rank

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files and shows progress."""
        return self.rank == 0


def single_device(device: torch.device | str = "cpu") -> ParallelState:
    return ParallelState(1, 1, 1, device=torch.device(device))


def check_degrees(tp: int, sp: int, cfg: int) -> None:
    for name, v in (("tp", tp), ("sp", sp)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"--{name} must be a positive integer, got {v!r}")
    if cfg not in (1, 2):
        raise ConfigError(f"cfg parallel degree must be 1 or 2 (cond / uncond), got {cfg!r}")


def group_ranks(tp: int, sp: int, cfg: int) -> dict[str, list[list[int]]]:
    """The rank lists of every tp, sp and cfg group (each rank is in exactly one group of each kind)."""

    def rank(c, s, t):
        return (c * sp + s) * tp + t

    return {
        "tp": [[rank(c, s, t) for t in range(tp)] for c in range(cfg) for s in range(sp)],
        "sp": [[rank(c, s, t) for s in range(sp)] for c in range(cfg) for t in range(tp)],
        "cfg": [[rank(c, s, t) for c in range(cfg)] for s in range(sp) for t in range(tp)],
    }


def make_parallel_state(tp: int, sp: int, cfg: int, device: torch.device | str) -> ParallelState:
    """Create the groups on an initialised default process group of exactly tp * sp * cfg ranks.

    Collective: every rank must call it with the same degrees (new_group is called for every group on
    every rank, in the same order).
    """
    check_degrees(tp, sp, cfg)
    if not dist.is_initialized():
        raise ConfigError("torch.distributed is not initialised: start the ranks with fastdit.parallel.launch")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != tp * sp * cfg:
        raise ConfigError(f"tp={tp} x sp={sp} x cfg={cfg} = {tp * sp * cfg} ranks, but the world has {world}")
    mine: dict[str, ProcessGroup | None] = {}
    for kind, all_ranks in group_ranks(tp, sp, cfg).items():
        mine[kind] = None
        for ranks in all_ranks:
            if len(ranks) == 1:
                continue
            group = dist.new_group(ranks)
            if rank in ranks:
                mine[kind] = group
    t, rest = rank % tp, rank // tp
    return ParallelState(
        tp=tp,
        sp=sp,
        cfg=cfg,
        tp_rank=t,
        sp_rank=rest % sp,
        cfg_rank=rest // sp,
        tp_group=mine["tp"],
        sp_group=mine["sp"],
        cfg_group=mine["cfg"],
        device=torch.device(device),
    )
