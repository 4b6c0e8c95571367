"""`--scheduler {checkpoint,lightning}`: the sampling schedule of generate, serve and bench (no torch imported here).

`lightning` is the schedule the Qwen-Image-Lightning distilled LoRAs were trained for (constant shift 3, no terminal
stretch; fastdit.pipelines.scheduler.LIGHTNING_SCHEDULER_CONFIG): with such a LoRA loaded, 8 (or 4) steps without
CFG, one DiT pass per step, instead of 50 steps with CFG:

    fastdit generate --model Qwen/Qwen-Image --lora Qwen-Image-Lightning-8steps-V1.1.safetensors \\
        --scheduler lightning --steps 8 --prompt "..."
"""

from __future__ import annotations

import argparse

from fastdit.validation import SCHEDULER_STEPS

SCHEDULER_HELP = (
    "sampling schedule: checkpoint (the one its scheduler_config.json describes; the default) or lightning (the "
    f"Qwen-Image-Lightning LoRAs' schedule: {SCHEDULER_STEPS['lightning']} steps unless asked otherwise, CFG off "
    "unless a scale > 1 comes with a negative prompt)"
)


def add_scheduler_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--scheduler {checkpoint,lightning}."""
    parser.add_argument("--scheduler", choices=list(SCHEDULER_STEPS), default="checkpoint", help=SCHEDULER_HELP)


def default_steps(scheduler: str) -> int:
    """Denoising steps when none are asked for: 50, or 8 with the Lightning schedule."""
    return SCHEDULER_STEPS[scheduler]


def request_sampling(scheduler: str, steps: int | None, cfg_scale: float | None) -> dict:
    """A server request's `steps`, `cfg_scale` and `scheduler` (Job fields), its missing values filled in for the
    server's schedule: 50 steps and CFG 4.0 (it runs with a negative prompt), or 8 steps and CFG off for Lightning."""
    lightning = scheduler == "lightning"
    return {
        "steps": steps if steps is not None else default_steps(scheduler),
        "cfg_scale": cfg_scale if cfg_scale is not None else (1.0 if lightning else 4.0),
        "scheduler": scheduler,
    }


def scheduler_notes(scheduler: str, negative_prompt: str | None, cfg_scale: float | None) -> list[str]:
    """What the user should know about the flags together: a negative prompt the Lightning schedule ignores."""
    if scheduler == "lightning" and negative_prompt is not None and (cfg_scale is None or cfg_scale <= 1):
        return ["--negative-prompt is ignored with --scheduler lightning unless --cfg-scale > 1 (CFG is off)"]
    return []
