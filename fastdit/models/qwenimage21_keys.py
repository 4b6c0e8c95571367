"""Qwen-Image 2.1 checkpoints: diffusers' parameter names -> ours (one table), config.json, and loading.

Loading is fastdit.checkpoint's: built on meta, every key and shape checked before any tensor is read, tensors
streamed to the device; bad input raises `CheckpointError` naming the file and the key. Fusions: Q/K/V into
one weight, the SwiGLU's gate and up projections into one.
"""

from __future__ import annotations

# Our parameter (without .weight) -> diffusers module(s) concatenated along dim 0.
_TOP = {
    "img_in": ["img_in"],
    "txt_in.norm": ["txt_in.text_norm"],
    "txt_in.fc1": ["txt_in.in_layer"],
    "txt_in.fc2": ["txt_in.out_layer"],
    "time_embed.fc1": ["time_text_embed.timestep_embedder.linear_1"],
    "time_embed.fc2": ["time_text_embed.timestep_embedder.linear_2"],
    "mod": ["modulation.1"],
    "final.mod": ["norm_out.linear"],
    "final.proj": ["proj_out"],
}
_BLOCK = {
    "qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "q_norm": ["attn.norm_q"],
    "k_norm": ["attn.norm_k"],
    "out": ["attn.to_out.0"],
    "mlp.gate_up": ["img_mlp.gate_layer", "img_mlp.proj"],
    "mlp.down": ["img_mlp.out"],
}


def checkpoint_keys(name: str) -> list[str]:
    """Our parameter name -> the diffusers checkpoint keys it is made of (concatenated along dim 0)."""
    module, _, leaf = name.rpartition(".")
    if module.startswith("blocks."):
        _, idx, rest = module.split(".", 2)
        return [f"transformer_blocks.{idx}.{src}.{leaf}" for src in _BLOCK[rest]]
    return [f"{src}.{leaf}" for src in _TOP[module]]
