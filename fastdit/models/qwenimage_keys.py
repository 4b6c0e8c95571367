"""The Qwen-Image DiT's names in diffusers-format checkpoints: the one table from our parameters to theirs.

diffusers' names carry container indices (`img_mod.1`, `attn.to_out.0`, `img_mlp.net.0.proj`); they appear here
and nowhere else. A parameter made of several checkpoint tensors (the fused Q/K/V) lists them in the order they
are concatenated along dim 0.
"""

from __future__ import annotations

import torch
from torch import nn

# Our parameter (without .weight/.bias) -> diffusers module(s) concatenated along dim 0.
_TOP = {
    "img_in": ["img_in"],
    "txt_norm": ["txt_norm"],
    "txt_in": ["txt_in"],
    "time_embed.fc1": ["time_text_embed.timestep_embedder.linear_1"],
    "time_embed.fc2": ["time_text_embed.timestep_embedder.linear_2"],
    "final.mod": ["norm_out.linear"],
    "final.proj": ["proj_out"],
}
_BLOCK = {
    "img_mod.lin": ["img_mod.1"],
    "txt_mod.lin": ["txt_mod.1"],
    "attn.img_qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "attn.txt_qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "attn.img_q_norm": ["attn.norm_q"],
    "attn.img_k_norm": ["attn.norm_k"],
    "attn.txt_q_norm": ["attn.norm_added_q"],
    "attn.txt_k_norm": ["attn.norm_added_k"],
    "attn.img_out": ["attn.to_out.0"],
    "attn.txt_out": ["attn.to_add_out"],
    "img_mlp.fc1": ["img_mlp.net.0.proj"],
    "img_mlp.fc2": ["img_mlp.net.2"],
    "txt_mlp.fc1": ["txt_mlp.net.0.proj"],
    "txt_mlp.fc2": ["txt_mlp.net.2"],
}


def checkpoint_keys(name: str) -> list[str]:
    """Our parameter name -> the diffusers checkpoint keys it is made of (concatenated along dim 0)."""
    module, _, leaf = name.rpartition(".")
    if module.startswith("blocks."):
        _, idx, rest = module.split(".", 2)
        return [f"transformer_blocks.{idx}.{src}.{leaf}" for src in _BLOCK[rest]]
    return [f"{src}.{leaf}" for src in _TOP[module]]


def diffusers_module(name: str) -> list[str]:
    """Our module path (e.g. `blocks.3.attn.img_qkv`) -> the diffusers module(s) it holds, in fusion order."""
    return [key.rpartition(".")[0] for key in checkpoint_keys(f"{name}.weight")]


def diffusers_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our parameters under diffusers' names, as views (fused Q/K/V split along dim 0): no copy.

    Used to run diffusers' model on exactly our weights (benchmarks and tests)."""
    out = {}
    for name, p in model.named_parameters():
        keys = checkpoint_keys(name)
        for key, part in zip(keys, p.detach().chunk(len(keys), dim=0), strict=True):
            out[key] = part
    return out
