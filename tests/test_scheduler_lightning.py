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
