"""Memory plans (`plan`), the mechanics of host-resident weights (`offload`) and placing a pipeline's parts
(`place`): what lets a pipeline run on a device smaller than its weights."""

from __future__ import annotations

from fastdit.memory.place import Placement, attach, place_dit
from fastdit.memory.plan import ORDER, PLANS, MemoryPlan, PlanError, Workload, offload_blocks_plan, plan_memory

__all__ = [
    "ORDER",
    "PLANS",
    "MemoryPlan",
    "PlanError",
    "Placement",
    "Workload",
    "attach",
    "offload_blocks_plan",
    "place_dit",
    "plan_memory",
]
