"""fastdit's single-frame VAE decode (fastdit.pipelines.vae) against diffusers' AutoencoderKLQwenImage.decode."""

from __future__ import annotations

import pytest
import torch

from fastdit.pipelines.latents import decode, latent_stats
from fastdit.pipelines.vae import FrameDecoder, compile_decoder, decode_frames, frame_decoder


def _tiny_vae(seed: int = 0):
    """The tiny pipelines' VAE geometry: 4 levels (two time-upsampling 3D resamplers, one 2D), shortcut convs
    where widths change, the middle block's attention."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(
        base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()


@pytest.fixture(scope="module")
def vae():
    return _tiny_vae()


@pytest.fixture(scope="module")
def latents():
    """(2, 16, 1, 6, 10) un-normalised latents: a batch of two non-square images."""
    return torch.randn(2, 16, 1, 6, 10, generator=torch.Generator().manual_seed(1)) * 2


def _reference(vae, z):
    with torch.no_grad():
        return vae.decode(z, return_dict=False)[0][:, :, 0]


@pytest.mark.parametrize("channels_last", [False, True])
def test_frame_decoder_matches_diffusers(vae, latents, channels_last):
    """The 2D re-expression gives diffusers' decoded pixels in float32, up to summation order (< 1e-5 on [-1, 1]),
    in NCHW and in channels-last layout."""
    ref = _reference(vae, latents)
    with torch.no_grad():
        ours = FrameDecoder(vae, channels_last=channels_last)(latents[:, :, 0])
    assert ours.shape == ref.shape == (2, 3, 48, 80)
    assert (ours - ref).abs().max().item() < 1e-5
    assert ref.abs().mean() > 0.05  # the comparison is not between two blank images


def test_pipeline_decode_uses_the_frame_decoder(vae, latents, monkeypatch):
    """latents.decode (what every pipeline calls) runs the frame decoder, never diffusers' decode, and gives its
    image; the decoder is built once per VAE."""
    ref = _reference(vae, latents)
    mean, inv_std = latent_stats(vae, latents)
    normalised = (latents - mean) * inv_std

    def refuse(*args, **kwargs):
        raise AssertionError("diffusers' decode ran")

    monkeypatch.setattr(vae, "decode", refuse)
    with torch.no_grad():
        ours = decode(vae, normalised)
    assert (ours - ref).abs().max().item() < 1e-5
    assert frame_decoder(vae) is frame_decoder(vae)


def test_falls_back_to_diffusers_where_it_does_not_apply(latents):
    """With tiling enabled, or several frames, decode_frames is diffusers' decode."""
    vae = _tiny_vae()
    video = torch.cat([latents, latents * 0.5], dim=2)  # (2, 16, 2, 6, 10)
    assert torch.equal(decode_frames(vae, video), _reference(vae, video))
    vae.enable_tiling()
    assert frame_decoder(vae) is None
    assert torch.equal(decode_frames(vae, latents), _reference(vae, latents))


def test_rebuilt_when_the_vae_changes_dtype(latents):
    """A VAE moved to another dtype gets a decoder of that dtype (the 2D weights are copies). In float64 the
    difference is diffusers' own: its upsamplers round their input to float32."""
    vae = _tiny_vae()
    assert frame_decoder(vae).dtype == torch.float32
    vae.to(torch.float64)
    decoder = frame_decoder(vae)
    assert decoder.dtype == torch.float64
    z = latents.double()
    assert (decode_frames(vae, z) - _reference(vae, z)).abs().max().item() < 1e-6


def test_compiles_as_one_graph(latents):
    """The decoder traces as one full graph (no graph break) and the compiled decode gives the same pixels;
    compile_decoder marks the VAE so a rebuilt decoder is compiled too."""
    vae = _tiny_vae()
    decoder = FrameDecoder(vae).compile_layers(backend="aot_eager")
    with torch.no_grad():
        out = decoder(latents[:, :, 0])
    assert (out - _reference(vae, latents)).abs().max().item() < 1e-5
    assert compile_decoder(vae) and frame_decoder(vae).compiled
