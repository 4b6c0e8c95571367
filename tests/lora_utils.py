"""Random LoRAs for the tiny pipeline's DiT, written in each trainer's key layout (shared by the LoRA tests)."""

from __future__ import annotations

import torch

from fastdit.lora import qwen_image_lora_targets

# The tiny pipeline's transformer (fastdit.tiny): 2 blocks, 2 heads x 16, 64 latent channels, text width 32.
TINY_PIPE = dict(num_layers=2, dim=32, mlp_hidden=128, in_channels=64, joint_dim=32, out_dim=64)
TINY_TARGETS = qwen_image_lora_targets(**TINY_PIPE)


def _flat(layer: str) -> str:
    return layer.replace(".", "_")


# layout -> (down key, up key, alpha key or None) of a layer
LAYOUTS = {
    "diffusers": lambda m: (f"transformer.{m}.lora_A.weight", f"transformer.{m}.lora_B.weight", None),
    "kohya": lambda m: (
        f"lora_unet_{_flat(m)}.lora_down.weight",
        f"lora_unet_{_flat(m)}.lora_up.weight",
        f"lora_unet_{_flat(m)}.alpha",
    ),
    "comfyui": lambda m: (
        f"diffusion_model.{m}.lora_A.weight",
        f"diffusion_model.{m}.lora_B.weight",
        f"diffusion_model.{m}.alpha",
    ),
    "musubi": lambda m: (
        f"diffusion_model.{m}.lora_down.weight",
        f"diffusion_model.{m}.lora_up.weight",
        f"diffusion_model.{m}.alpha",
    ),
    "diffsynth": lambda m: (f"{m}.lora_A.default.weight", f"{m}.lora_B.default.weight", None),
}


def random_lora(
    seed: int, layout: str = "diffusers", rank: int = 4, layers=None, std: float = 0.3, targets=None
) -> dict[str, torch.Tensor]:
    """A LoRA state dict of every linear (or `layers`) of the tiny DiT: ranks rank..rank + 2, alpha = 2 x rank
    where the layout has an alpha key; the update is of the order of the weights, so the image changes."""
    targets = targets or TINY_TARGETS
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, layer in enumerate(layers or targets):
        out_features, in_features = targets[layer]
        r = rank + i % 3
        down_key, up_key, alpha_key = LAYOUTS[layout](layer)
        sd[down_key] = torch.randn(r, in_features, generator=g) * std / in_features**0.5
        sd[up_key] = torch.randn(out_features, r, generator=g) * std / r**0.5
        if alpha_key is not None:
            sd[alpha_key] = torch.tensor(2.0 * r)
    return sd
