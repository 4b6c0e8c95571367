"""Flow-matching Euler schedule for Qwen-Image, as small pure functions.

The sampler integrates dx/dsigma = v from sigma = 1 (noise) to sigma = 0 (image):
`x_next = x + (sigma_next - sigma) * v`. Only the sigma schedule depends on the checkpoint's
scheduler config (diffusers' `FlowMatchEulerDiscreteScheduler` keys):

1. sigmas start evenly spaced in [1/n, 1];
2. they are shifted towards noise, by a resolution-dependent amount (`use_dynamic_shifting`, the
   Qwen-Image default: `mu` interpolates linearly in the image token count) or by a fixed `shift`;
3. with `shift_terminal`, the tail is stretched so the last sigma equals it;
4. a terminal 0 is appended.

The arithmetic (float64 linspace, then float32 numpy, then a float32 tensor) follows diffusers
operation for operation so that schedules, and therefore images, are bit-identical.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fastdit.errors import ConfigError
from fastdit.validation import SCHEDULER_STEPS, check_scheduler

# Config keys whose non-default values select schedules fastdit does not implement.
_UNSUPPORTED_FLAGS = (
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "invert_sigmas",
    "stochastic_sampling",
)


# The schedule the Qwen-Image-Lightning LoRAs (lightx2v) were distilled for: a constant shift of 3, written as
# dynamic shifting with base_shift = max_shift = log(3) so that mu = log(3) at every resolution, and no
# terminal stretch. Values as in ModelTC/Qwen-Image-Lightning's generate_with_diffusers.py.
LIGHTNING_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": math.log(3),
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": math.log(3),
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": None,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}


@dataclass(frozen=True)
class Sampling:
    """What a call's scheduler choice sets: the flow-match config its sigmas come from, the steps when the call gives
    none, and the CFG scale when it gives a negative prompt but no scale (None: CFG off)."""

    config: dict
    steps: int
    cfg_scale: float | None


def sampling_for(name: str, folder_config: dict, default_cfg_scale: float) -> Sampling:
    """The sampling a pipeline call runs with for scheduler `name` (validation.SCHEDULER_STEPS):

    - "checkpoint": the checkpoint's scheduler config (`folder_config`), 50 steps, CFG at `default_cfg_scale` when a
      negative prompt is given;
    - "lightning": LIGHTNING_SCHEDULER_CONFIG, 8 steps, and no CFG unless the call gives a scale > 1 (with a negative
      prompt): the distilled LoRAs have guidance folded in, so each step is one DiT pass with no uncond batch.
    """
    check_scheduler(name)
    if name == "lightning":
        return Sampling(dict(LIGHTNING_SCHEDULER_CONFIG), SCHEDULER_STEPS[name], None)
    return Sampling(dict(folder_config), SCHEDULER_STEPS[name], default_cfg_scale)


def check_scheduler_config(config: dict) -> None:
    """Raise ConfigError for scheduler settings this sampler would silently ignore."""
    enabled = [k for k in _UNSUPPORTED_FLAGS if config.get(k)]
    if enabled:
        raise ConfigError(
            f"scheduler config sets {', '.join(enabled)}; fastdit only implements the deterministic "
            "flow-match Euler schedule (set these to false)"
        )
    shift_type = config.get("time_shift_type", "exponential")
    if shift_type not in ("exponential", "linear"):
        raise ConfigError(f"scheduler time_shift_type must be 'exponential' or 'linear', got {shift_type!r}")


def dynamic_shift_mu(image_seq_len: int, config: dict) -> float:
    """Shift exponent for `image_seq_len` image tokens, linear in the token count:
    (base_image_seq_len, base_shift) -> (max_image_seq_len, max_shift)."""
    base_len = config.get("base_image_seq_len", 256)
    max_len = config.get("max_image_seq_len", 4096)
    base_shift = config.get("base_shift", 0.5)
    max_shift = config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + (base_shift - slope * base_len)


def flow_match_sigmas(
    num_steps: int, image_seq_len: int, config: dict, sigmas: list[float] | None = None
) -> torch.Tensor:
    """The (num_steps + 1,) float32 sigma schedule, descending from about 1 to a terminal 0. `sigmas`: the
    unshifted schedule to start from instead of the even one (diffusers' `sigmas=`; then num_steps is its length)."""
    check_scheduler_config(config)
    if sigmas is None:
        sigmas = np.linspace(1.0, 1.0 / num_steps, num_steps).astype(np.float32)
    else:
        sigmas = np.array(sigmas, dtype=np.float32)
    if config.get("use_dynamic_shifting", False):
        mu = dynamic_shift_mu(image_seq_len, config)
        if config.get("time_shift_type", "exponential") == "exponential":
            sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
        else:
            sigmas = mu / (mu + (1 / sigmas - 1) ** 1.0)
    else:
        shift = config.get("shift", 1.0)
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    terminal = config.get("shift_terminal")
    # With one step the only sigma is 1 and the stretch below is 0/0 (diffusers returns NaN there);
    # fastdit keeps [1, 0]: a single Euler step from pure noise.
    if terminal and sigmas[-1] < 1:
        # Rescale 1 - sigma so the last step lands on `terminal` instead of 1/n (shifted).
        one_minus = 1 - sigmas
        sigmas = 1 - one_minus / (one_minus[-1] / (1 - terminal))
    sigmas = torch.from_numpy(sigmas).to(torch.float32)
    return torch.cat([sigmas, torch.zeros(1)])


def euler_step(latents: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor):
    """One Euler step of the flow ODE, accumulated in float32 and returned in the velocity's dtype."""
    return (latents.to(torch.float32) + (sigma_next - sigma) * velocity).to(velocity.dtype)
