"""The Qwen-Image-Lightning schedule (constant shift 3, no terminal stretch) against diffusers' scheduler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastdit.pipelines.scheduler import LIGHTNING_SCHEDULER_CONFIG, flow_match_sigmas


@pytest.mark.parametrize("steps", [4, 8])
@pytest.mark.parametrize("height, width", [(1024, 1024), (512, 768)])
def test_lightning_sigmas_match_diffusers(steps, height, width):
    """flow_match_sigmas equals FlowMatchEulerDiscreteScheduler.from_config(LIGHTNING_SCHEDULER_CONFIG) bit for bit,
    with set_timesteps called as QwenImagePipeline calls it (its sigmas and its mu for the image token count)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    cfg = LIGHTNING_SCHEDULER_CONFIG
    tokens = (height // 16) * (width // 16)  # VAE /8, then 2x2 patches
    ref = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    mu = calculate_shift(
        tokens, cfg["base_image_seq_len"], cfg["max_image_seq_len"], cfg["base_shift"], cfg["max_shift"]
    )
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = flow_match_sigmas(steps, tokens, cfg)
    assert ours.dtype == ref.sigmas.dtype == torch.float32
    assert torch.equal(ours, ref.sigmas)


def test_lightning_shift_is_three_at_any_resolution():
    """With base_shift = max_shift = log 3 the schedule is the fixed shift 3: sigma -> 3s / (1 + 2s)."""
    s = np.linspace(1.0, 0.25, 4).astype(np.float32)
    expected = torch.cat([torch.from_numpy(3 * s / (1 + 2 * s)), torch.zeros(1)])
    for tokens in (256, 1536, 4096, 12000):
        torch.testing.assert_close(flow_match_sigmas(4, tokens, LIGHTNING_SCHEDULER_CONFIG), expected)


@pytest.mark.parametrize("steps, height, width", [(4, 64, 64), (8, 48, 80)])
def test_pipeline_runs_the_lightning_schedule(tiny_pipe, monkeypatch, steps, height, width):
    """The sigmas the pipeline integrates over with scheduler="lightning" are diffusers' for the Lightning config at
    that image's token count, bit for bit (whatever the folder's own scheduler config says)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    import fastdit.pipelines.qwenimage as t2i

    seen = []
    denoise = t2i.denoise

    def spy(step, latents, sigmas, **kwargs):
        seen.append(sigmas)
        return denoise(step, latents, sigmas, **kwargs)

    monkeypatch.setattr(t2i, "denoise", spy)
    tiny_pipe("a cat", height=height, width=width, num_inference_steps=steps, scheduler="lightning", seed=0)
    cfg = LIGHTNING_SCHEDULER_CONFIG
    tokens = (height // 16) * (width // 16)
    ref = FlowMatchEulerDiscreteScheduler.from_config(cfg)
    mu = calculate_shift(
        tokens, cfg["base_image_seq_len"], cfg["max_image_seq_len"], cfg["base_shift"], cfg["max_shift"]
    )
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    assert tiny_pipe.scheduler_config["shift_terminal"] == 0.02  # the folder's schedule differs from Lightning's
    (ours,) = seen
    assert torch.equal(ours, ref.sigmas)
