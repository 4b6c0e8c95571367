"""The denoising loop every pipeline runs, and what a call returns.

`denoise(step, latents, sigmas, ...)` integrates the flow ODE with Euler steps. It knows nothing of the task:
the pipeline builds `step(x, i) -> velocity`, a closure over everything that stays fixed during a call (text
states, RoPE tables, the modulation table, a step cache's state: the step plan), and tells the loop whether to
batch CFG and which tokens to append after the noise tokens (an edit's reference latents). With true CFG, the
conditional and unconditional rows run as ONE batched DiT forward: [cond; uncond].
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torch import Tensor

from fastdit.pipelines.scheduler import euler_step


class Images(list):
    """The images of one pipeline call (a list of PIL images), with what the call measured and decided.

    `seeds`: the seed(s) the noise was drawn with; `timings`: stage times in seconds (`text_encode_s`,
    `denoise_s`, `denoise_s_per_step`, `vae_decode_s`, `total_s`); `steps`: denoising steps run;
    `cached_steps`: steps whose middle blocks a step cache skipped (fastdit.cache; 0 without one).
    Returned rather than kept on the pipeline, so one pipeline serves calls from several threads.
    """

    def __init__(self, images: list[Image.Image], *, seeds, timings: dict[str, float], steps: int, cached_steps=0):
        super().__init__(images)
        self.seeds, self.timings, self.steps, self.cached_steps = seeds, timings, steps, cached_steps


def guided_velocity(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """True CFG, rescaled per token so the guided velocity keeps the conditional velocity's norm."""
    combined = uncond + scale * (cond - uncond)
    cond_norm = torch.norm(cond, dim=-1, keepdim=True)
    combined_norm = torch.norm(combined, dim=-1, keepdim=True)
    return combined * (cond_norm / combined_norm)


def denoise(
    step: Callable[[Tensor, int], Tensor],
    latents: Tensor,
    sigmas: Tensor,
    *,
    cfg_scale: float | None = None,
    appended: Tensor | None = None,
    progress: Callable[[int, int], None] | None = None,
    show_progress: bool = False,
) -> Tensor:
    """Euler-integrate (B, N, C) noise tokens from sigmas[0] to sigmas[-1]; returns the final tokens.

    `step(x, i)` is the DiT at step i: x (B', N + N_app, C) -> velocity (B', >= N, C), of which the first N
    tokens count. `cfg_scale`: true CFG (x is [latents; latents], the step's rows [cond; uncond]); None: off.
    `appended` (B', N_app, C): tokens concatenated after the noise tokens at every step (not denoised).
    `progress(i + 1, total)` after each step may raise to stop the call.
    """
    total = len(sigmas) - 1
    n = latents.shape[1]
    bar = None
    if show_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="denoising", unit="step")
    try:
        for i in range(total):
            x = torch.cat([latents, latents]) if cfg_scale is not None else latents
            if appended is not None:
                x = torch.cat([x, appended], dim=1)
            velocity = step(x, i)[:, :n]
            if cfg_scale is not None:
                velocity = guided_velocity(*velocity.chunk(2), cfg_scale)
            latents = euler_step(latents, velocity, sigmas[i], sigmas[i + 1])
            if bar is not None:
                bar.update()
            if progress is not None:
                progress(i + 1, total)
    finally:
        if bar is not None:
            bar.close()
    return latents
