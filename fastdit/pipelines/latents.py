"""Latents between the VAE and the DiT: noise, 2x2 patch packing, the VAE's normalisation, and pixels.

The DiT sees a latent image (C, H, W) as H/2 * W/2 tokens of C * 4 values (each token a 2x2 patch, ordered
(c, dy, dx)). The VAE's latents are normalised per channel (`latents_mean`, `latents_std` in its config) before
the DiT sees them and un-normalised before decoding.
"""

from __future__ import annotations

import torch
from PIL import Image
from torch import Tensor

from fastdit.pipelines.vae import decode_frames


def pack_latents(latents: Tensor) -> Tensor:
    """(B, 1, C, H, W) VAE latents -> (B, H/2 * W/2, C * 4) tokens, each a 2x2 patch as (c, dy, dx)."""
    b, _, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, H/2, W/2, C, 2, 2)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, h: int, w: int) -> Tensor:
    """Inverse of `pack_latents` for an (h, w) latent grid: (B, N, C * 4) -> (B, C, 1, h, w)."""
    b, _, c4 = tokens.shape
    x = tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, H/2, 2, W/2, 2)
    return x.reshape(b, c4 // 4, 1, h, w)


def initial_noise(seeds: int | list[int], shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """(B, ...) Gaussian noise drawn on the CPU: one generator for an int, one per image for a list."""
    if isinstance(seeds, int):
        return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seeds), dtype=dtype)
    one = (1, *shape[1:])
    return torch.cat([torch.randn(one, generator=torch.Generator("cpu").manual_seed(s), dtype=dtype) for s in seeds])


def latent_stats(vae, like: Tensor) -> tuple[Tensor, Tensor]:
    """The VAE's per-channel latent mean and 1 / std, shaped (1, C, 1, 1, 1) like `like`'s device and dtype."""
    cfg = vae.config
    shape = (1, cfg.z_dim, 1, 1, 1)
    mean = torch.tensor(cfg.latents_mean).view(shape).to(like.device, like.dtype)
    inv_std = 1.0 / torch.tensor(cfg.latents_std).view(shape).to(like.device, like.dtype)
    return mean, inv_std


def decode(vae, latents: Tensor) -> Tensor:
    """(B, C, 1, h, w) normalised latents -> (B, channels, 8h, 8w) images in [-1, 1] (fastdit.pipelines.vae: the
    single-frame decoder where it applies, diffusers' decode otherwise)."""
    latents = latents.to(vae.dtype)
    mean, inv_std = latent_stats(vae, latents)
    return decode_frames(vae, latents / inv_std + mean)


def encode(vae, pixels: Tensor) -> Tensor:
    """(B, 3, H, W) images in [-1, 1] -> (B, C, 1, H/8, W/8) normalised latents (the posterior's mode)."""
    posterior = vae.encode(pixels[:, :, None].to(vae.dtype)).latent_dist
    latents = posterior.mode()
    mean, inv_std = latent_stats(vae, latents)
    return (latents - mean) * inv_std


def to_pil(images: Tensor) -> list[Image.Image]:
    """(B, C, H, W) decoded images in [-1, 1] -> PIL images (C = 3: RGB, 4: RGBA), rounded to 8-bit levels.

    The arithmetic is diffusers' (to [0, 1] in the images' dtype, then x 255 and round half to even in float32), run
    where the images are: only the 8-bit pixels are copied to the host, and the CPU does no per-pixel work."""
    x = ((images / 2 + 0.5).clamp(0, 1).float() * 255).round().to(torch.uint8)
    pixels = x.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, C)
    return [Image.fromarray(a) for a in pixels]
