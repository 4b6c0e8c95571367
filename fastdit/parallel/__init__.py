"""Tensor (tp), Ulysses sequence (sp) and CFG parallelism for the DiT, applied from outside the model.

- state.py:    `ParallelState` (degrees, ranks, process groups) and the group layout, cfg > sp > tp;
- layers.py:   Replicated / ColumnParallel / RowParallel linear layers (functional collectives);
- ulysses.py:  the sequence-parallel attention core (all-to-all around attention);
- transformer.py: `parallelize`, `shard_plan`, `ParallelTransformer` (loading a sharded model: fastdit.load);
- launch.py:   spawn the ranks on one machine (or join torchrun) and propagate failures.
"""

from fastdit.parallel.launch import RankError, launch
from fastdit.parallel.layers import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
from fastdit.parallel.state import ParallelState, make_parallel_state, single_device
from fastdit.parallel.transformer import ParallelTransformer, check_parallel_config, parallelize, shard_plan
from fastdit.parallel.ulysses import UlyssesAttention

__all__ = [
    "ColumnParallelLinear",
    "ParallelState",
    "ParallelTransformer",
    "RankError",
    "ReplicatedLinear",
    "RowParallelLinear",
    "UlyssesAttention",
    "check_parallel_config",
    "launch",
    "make_parallel_state",
    "parallelize",
    "shard_plan",
    "single_device",
]
