"""Tiny random-weight diffusers checkpoints for DiT tests (diffusers' own save_pretrained)."""

from __future__ import annotations

import torch

TINY = dict(
    num_layers=2,
    attention_head_dim=32,
    num_attention_heads=2,
    joint_attention_dim=48,
    axes_dims_rope=(8, 12, 12),
    in_channels=64,
    out_channels=16,
    patch_size=2,
)


def tiny_reference(seed: int = 0, **overrides):
    """diffusers QwenImageTransformer2DModel with every parameter (norm weights too) drawn at random."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    ref = QwenImageTransformer2DModel(**{**TINY, **overrides})
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.2)
    return ref.eval()


def save_tiny(path, seed: int = 0, sharded: bool = False, **overrides):
    ref = tiny_reference(seed, **overrides)
    ref.save_pretrained(path, max_shard_size="60KB" if sharded else "10GB")
    return ref


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def save_random_q21(path, config: dict, seed: int = 3) -> None:
    """A diffusers QwenImage21Transformer2DModel of `config` with N(0, 0.2) weights (large enough that every block
    matters), saved to `path`."""
    from diffusers import QwenImage21Transformer2DModel

    torch.manual_seed(seed)
    ref = QwenImage21Transformer2DModel(**config)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.2)
    ref.save_pretrained(path)
