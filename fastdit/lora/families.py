"""Which linears a LoRA may change, per DiT architecture of the family: their diffusers names and shapes, and how
our (possibly fused) linears map onto them.

| architecture   | config              | LoRA-able linears (diffusers' names)                                         |
| -------------- | ------------------- | ---------------------------------------------------------------------------- |
| Qwen-Image     | `DiTConfig`         | per block: modulation, Q/K/V of both streams, out-projections, both MLPs;     |
|                |                     | img_in, txt_in, timestep embedder, norm_out, proj_out                        |
| Qwen-Image 2.1 | `QwenImage21Config` | per block: Q/K/V, out-projection, SwiGLU gate / up / down; img_in, the text  |
|                |                     | projection, timestep embedder, the shared modulation, norm_out, proj_out     |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastdit.errors import LoraError
from fastdit.lora.formats import (
    QWEN_IMAGE,
    QWEN_IMAGE_21,
    LoraNames,
    qwen_image21_lora_targets,
    qwen_image_lora_targets,
)
from fastdit.models import qwenimage21_keys, qwenimage_keys
from fastdit.models.qwenimage import DiTConfig
from fastdit.models.qwenimage21 import QwenImage21Config


@dataclass(frozen=True)
class LoraFamily:
    names: LoraNames
    targets: Callable[[object], dict[str, tuple[int, int]]]  # config -> {diffusers name: (out, in)}
    # our linear's module path -> the diffusers modules it holds, in fusion order (Q, K, V; gate, up)
    diffusers_modules: Callable[[str], list[str]]


def _qwen_image_targets(cfg: DiTConfig) -> dict[str, tuple[int, int]]:
    return qwen_image_lora_targets(
        cfg.num_layers, cfg.dim, cfg.mlp_ratio * cfg.dim, cfg.in_channels, cfg.joint_dim, cfg.out_dim
    )


def _qwen_image21_modules(name: str) -> list[str]:
    return [key.rpartition(".")[0] for key in qwenimage21_keys.checkpoint_keys(f"{name}.weight")]


FAMILIES: dict[type, LoraFamily] = {
    DiTConfig: LoraFamily(QWEN_IMAGE, _qwen_image_targets, qwenimage_keys.diffusers_module),
    QwenImage21Config: LoraFamily(QWEN_IMAGE_21, qwen_image21_lora_targets, _qwen_image21_modules),
}


def lora_family(cfg) -> LoraFamily:
    """The LoRA description of the architecture whose config is `cfg` (a model's `.cfg`, or `read_config`'s)."""
    family = FAMILIES.get(type(cfg))
    if family is None:
        raise LoraError(f"LoRA adapters apply to the Qwen-Image family's DiTs; this one is a {type(cfg).__name__}")
    return family
