"""Text-to-image with Qwen-Image: text encoding -> flow-match Euler sampling -> VAE decode.

Images match diffusers' `QwenImagePipeline` for the same seed (same noise, schedule, guidance and decode
arithmetic); what differs is how the work is done:

- fastdit's own DiT (`fastdit.models.qwenimage`) denoises; the text encoder (Qwen2.5-VL) comes from
  transformers and the VAE (`AutoencoderKLQwenImage`) from diffusers.
- With true CFG, the conditional and unconditional branches run as ONE batched DiT forward: texts padded
  to a common length with a boolean mask, latents duplicated, (2B, ...) in one call.
- All prompts (and negative prompts) are encoded in one text-encoder call, without vocab logits.
- RoPE tables and every block's modulation for every step are computed once per call (the step plan).

Guidance follows the reference rule: true CFG runs only when `true_cfg_scale > 1` AND a negative prompt is
given (" " is a valid negative prompt). The scale defaults to 4.0 with a negative prompt and to off without
one; a scale > 1 given without a negative prompt logs a warning. The guided velocity is rescaled to the
norm of the conditional one, per token.

`scheduler="lightning"` samples with the schedule the Qwen-Image-Lightning distilled LoRAs need
(fastdit.pipelines.scheduler.sampling_for): 8 steps unless told otherwise, and CFG off unless the call gives a
scale > 1 with its negative prompt.

Seeds: an int seeds one CPU generator that draws the noise for the whole batch at once (as diffusers does
with one generator); a list gives image i its own CPU generator, so each image equals a separate
single-image run with that seed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from fastdit.cache.config import StepCache
from fastdit.models.layers import Rope
from fastdit.models.qwenimage import StepModulation
from fastdit.pipelines.base import DiTPipeline, StageClock
from fastdit.pipelines.latents import decode, initial_noise, pack_latents, to_pil, unpack_latents
from fastdit.pipelines.loading import load_parts
from fastdit.pipelines.loop import Images, denoise
from fastdit.pipelines.scheduler import flow_match_sigmas, sampling_for
from fastdit.pipelines.text import check_lengths, encode_prompts, pad_embeds
from fastdit.validation import (
    InputError,
    check_cfg_scale,
    check_int,
    check_prompts,
    check_seed,
    check_size,
    check_steps,
)

log = logging.getLogger("fastdit")

DEFAULT_CFG_SCALE = 4.0
COMPONENTS = ("scheduler", "text_encoder", "tokenizer", "transformer", "vae")


def resolve_cfg(true_cfg_scale, negatives: list[str] | None, default: float | None = DEFAULT_CFG_SCALE) -> float | None:
    """The CFG scale a call runs with, or None for no CFG: CFG needs a scale > 1 and a negative prompt. `default`:
    the scale when none is given (None: CFG off, as with the Lightning schedule)."""
    if true_cfg_scale is None:
        if negatives is not None and default is None:
            log.warning("negative prompt ignored: this schedule runs without CFG unless true_cfg_scale > 1 is given")
        return default if negatives is not None else None
    scale = check_cfg_scale(true_cfg_scale)
    if scale > 1 and negatives is None:
        log.warning("true_cfg_scale=%s has no effect without a negative prompt: CFG is off", true_cfg_scale)
    elif negatives is not None and scale == 1:
        log.warning("negative prompt ignored: CFG needs true_cfg_scale > 1")
    return scale if scale > 1 and negatives is not None else None


def negative_prompts(negative_prompt, count: int) -> list[str] | None:
    """None, one negative prompt for all, or one per prompt -> a list of `count` or None."""
    if negative_prompt is None:
        return None
    negatives = check_prompts(negative_prompt, "negative_prompt", allow_blank=True)
    if len(negatives) == 1:
        return negatives * count
    if len(negatives) != count:
        raise InputError("negative_prompt", f"has {len(negatives)} entries for {count} prompts; give one or one each")
    return negatives


class QwenImagePipeline(DiTPipeline):
    """Qwen-Image text-to-image. Build with `from_pretrained`, call with prompts, get an `Images` list."""

    def __init__(self, *, transformer, text_encoder, tokenizer, vae, scheduler_config: dict, device, dtype):
        super().__init__(
            transformer=transformer, device=device, dtype=dtype, text_encoder=text_encoder, vae=vae,
            scheduler_config=scheduler_config,
        )  # fmt: skip
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: str | torch.device | None = None,
        parallel=None,
        quantize: str | None = None,
        attention: str = "auto",
        memory=None,
    ):
        """Load a diffusers-format pipeline folder (model_index.json + one folder per part), every component
        checked before anything is loaded.

        `parallel`: this rank's `fastdit.parallel.ParallelState` (see `fastdit.parallel.launch`); the DiT is then
        loaded sharded (tp / sp / cfg), the text encoder and VAE whole on every rank.
        `quantize`: "fp8" runs the DiT's block linears in fp8 e4m3 (fastdit.quant; "fp8-emulated" for CPU tests);
        a transformer folder written by `fastdit quantize` is fp8 without it.
        `attention`: the DiT's attention backend (fastdit.kernels.attention.BACKENDS; "int8" and "fp8" are 8-bit).
        `memory`: a memory plan (fastdit.memory.PLANS name or a MemoryPlan): where the weights live; one that
        cannot fit raises PlanError before any weight is read. None: every part on `device`.
        """
        parts = load_parts(
            Path(path), COMPONENTS, dtype=dtype, device=device, parallel=parallel, quantize=quantize,
            attention=attention, memory=memory, plans=cls.memory_plans,
        )  # fmt: skip
        return parts.build(cls)

    def dit_step(
        self, key, img_shapes, txt: torch.Tensor, txt_mask, txt_lens, rope: Rope, modulation, loop=None
    ) -> Callable:
        """The DiT at step i as `step(x, i)` for `denoise`: text, mask, RoPE and the step's modulation vectors
        fixed for the call. Every tensor it reads is an argument of the (possibly CUDA-graphed) call, so a graph
        recorded in an earlier call with the same shapes (`key`) reads this call's values. `loop`: the call's
        step cache (`cached_loop`), which graphs its own segments."""
        transformer = self.transformer  # not self: a graph held by the pipeline must not keep it alive in a cycle

        def forward(x, txt, mask, timestep, cos, sin, mod_img, mod_txt, mod_final, mod_ref):
            return transformer(
                hidden_states=x,
                encoder_hidden_states=txt,
                encoder_hidden_states_mask=mask,
                timestep=timestep,
                img_shapes=img_shapes,
                rope=Rope(cos, sin),
                txt_lens=txt_lens,
                modulation=StepModulation(mod_img, mod_txt, mod_final, mod_ref),
                cache=loop,
            )

        run = self.graphed(key, forward) if loop is None else forward
        timestep = torch.zeros(txt.shape[0], device=self.device)  # unused with the table; a fixed graph input

        def step(x: torch.Tensor, i: int) -> torch.Tensor:
            return run(x, txt, txt_mask, timestep, *rope, *modulation[i])

        return step

    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | list[str],
        *,
        negative_prompt: str | list[str] | None = None,
        height: int = 1024,
        width: int = 1024,
        num_inference_steps: int | None = None,
        true_cfg_scale: float | None = None,
        seed: int | list[int] | None = None,
        num_images_per_prompt: int = 1,
        sigmas: list[float] | None = None,
        scheduler: str = "checkpoint",
        progress: Callable[[int, int], None] | None = None,
        show_progress: bool = True,
        cache: StepCache | None = None,
    ) -> Images:
        """Generate len(prompt) * num_images_per_prompt images, ordered prompt-major (p0, p0, p1, ...).

        `num_inference_steps`: default 50 (8 with the Lightning schedule). `sigmas`: a custom descending schedule
        (its length sets the steps), as diffusers' `sigmas=`. `scheduler`: "checkpoint" (the checkpoint's schedule) or
        "lightning" (the Qwen-Image-Lightning LoRAs' schedule, CFG off unless a scale > 1 is given).
        `cache`: a `fastdit.StepCache` for this call (default: the one `enable_step_cache` set, if any); the
        result's `cached_steps` counts the steps whose middle blocks it skipped."""
        clock = StageClock(self.device)
        prompts = check_prompts(prompt)
        check_size(height, width)
        sampling = sampling_for(scheduler, self.scheduler_config, DEFAULT_CFG_SCALE)
        if num_inference_steps is None:
            num_inference_steps = sampling.steps
        steps = check_steps(num_inference_steps) if sigmas is None else len(sigmas)
        check_int(num_images_per_prompt, "num_images_per_prompt", 1)
        negatives = negative_prompts(negative_prompt, len(prompts))
        cfg = resolve_cfg(true_cfg_scale, negatives, sampling.cfg_scale)
        num_images = len(prompts) * num_images_per_prompt
        seed = check_seed(seed, num_images)
        check_lengths(self.tokenizer, prompts)
        if cfg is not None:
            check_lengths(self.tokenizer, negatives, "negative prompt")

        # 1. Text: one encoder call for prompts and negatives, rows repeated per image (prompt-major).
        texts = prompts + (negatives if cfg is not None else [])
        with self.memory.text_encoder():
            rows = encode_prompts(self.text_encoder, self.tokenizer, texts, self.device)
        rows = [r for r in rows for _ in range(num_images_per_prompt)]
        # (B', L, D) with B' = 2 * num_images under CFG: conditional rows first, then unconditional.
        txt, txt_mask = pad_embeds(rows, self.dtype)
        # Nothing padded: attention runs unmasked, its fast path. Padded: the valid lengths let attention run one
        # unmasked call per row instead of a masked batch (fastdit.kernels.attention).
        txt_lens = tuple(r.shape[0] for r in rows)
        if bool(txt_mask.all()):
            txt_mask, txt_lens = None, None
        clock.lap("text_encode_s")

        # 2. Noise, packed into (B, N, C * 4) tokens; latent grid h x w, token grid h/2 x w/2.
        lat_h, lat_w = height // 8, width // 8
        noise = initial_noise(seed, (num_images, 1, self.latent_channels, lat_h, lat_w), self.dtype)
        latents = pack_latents(noise).to(self.device)
        img_shapes = [(1, lat_h // 2, lat_w // 2)] * txt.shape[0]
        rope = self.transformer.make_rope(img_shapes, txt.shape[1], self.device)
        schedule = flow_match_sigmas(steps, latents.shape[1], sampling.config, sigmas)
        # The reference feeds sigma as a timestep in [0, 1000] rounded to the latent dtype, then / 1000.
        timesteps = (schedule[:steps] * 1000).to(self.device, latents.dtype) / 1000
        # Every block's AdaLN vectors for all steps in one GEMM per layer (they depend on the timestep only).
        modulation = self.transformer.modulation_table(timesteps)

        # 3. Flow-match Euler sampling.
        key = ("t2i", tuple(latents.shape), cfg is not None, tuple(txt.shape), txt_mask is not None, txt_lens)
        loop = self.cached_loop(cache, key, steps)
        step = self.dit_step(key, img_shapes, txt, txt_mask, txt_lens, rope, modulation, loop)
        latents = denoise(step, latents, schedule, cfg_scale=cfg, progress=progress, show_progress=show_progress)
        clock.lap("denoise_s")

        # 4. VAE decode: undo the latent normalisation, decode the single frame.
        with self.memory.vae(self.vae, num_images * height * width):
            images = to_pil(decode(self.vae, unpack_latents(latents, lat_h, lat_w)))
        clock.lap("vae_decode_s")
        cached_steps = 0 if loop is None else loop.cached_steps
        return Images(images, seeds=seed, timings=clock.timings(steps), steps=steps, cached_steps=cached_steps)
