"""Image editing with Qwen-Image-Edit (one image) and Edit-2509 / Edit-2511 (several): reference images + prompt ->
an edited image, on the same fast DiT as text-to-image.

Images match diffusers' `QwenImageEditPipeline` / `QwenImageEditPlusPipeline` for the same seed. The call is
text-to-image's loop with a different step plan:

- Conditioning: Qwen2.5-VL sees the prompt and the reference images (fastdit.pipelines.vl_text); the image
  tokens are part of the text stream, so the prompt and the negative prompt differ in length and are padded to
  one batch (the text-to-image padding: per-sample unmasked attention from the valid lengths).
- Reference latents: each image's VAE posterior mode, normalised and packed at its own size, appended after the
  noise tokens at every step (never denoised). RoPE puts reference k at frame k; the scheduler's shift counts
  the target's tokens only.
- Edit-2511 (`zero_cond_t`): reference tokens modulated at t = 0. The per-token index and the t = 0 vectors (one
  table for all steps) are part of the plan, next to the per-step modulation table.
- With true CFG, conditional and unconditional rows run as ONE DiT forward, as in text-to-image.
- Compiled, the token counts are traced as symbolic (fastdit.runtime.compile.dynamic_tokens): a new reference
  size or prompt length reuses the compiled blocks instead of compiling them again.

Layouts: Qwen-Image-Edit takes one image, resized to `vae_image_area` for both the VL encoder and the VAE (its
vision span inline before the prompt); Edit-2509 / 2511 take up to `max_images`, each resized to
`vl_image_area` for the encoder and to `vae_image_area` for the VAE ("Picture k:" before each span). The output
size defaults to the first (Edit) / last (2509 / 2511) image's aspect ratio at `vae_image_area`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from fastdit.cache.config import StepCache
from fastdit.models.layers import Rope
from fastdit.models.qwenimage import StepModulation
from fastdit.pipelines.base import DiTPipeline, StageClock
from fastdit.pipelines.edit_inputs import reference_images, resize, sized, to_pixels
from fastdit.pipelines.latents import decode, encode, initial_noise, pack_latents, to_pil, unpack_latents
from fastdit.pipelines.loading import load_parts
from fastdit.pipelines.loop import Images, denoise
from fastdit.pipelines.qwenimage import DEFAULT_CFG_SCALE, negative_prompts, resolve_cfg
from fastdit.pipelines.scheduler import flow_match_sigmas, sampling_for
from fastdit.pipelines.text import pad_embeds
from fastdit.pipelines.vl_text import check_prompt_lengths, encode_vl_prompts, inline_images, numbered_images
from fastdit.runtime.compile import dynamic_tokens
from fastdit.validation import check_image_area, check_int, check_prompts, check_seed, check_size, check_steps

log = logging.getLogger("fastdit")

COMPONENTS = ("processor", "scheduler", "text_encoder", "tokenizer", "transformer", "vae")
DEFAULT_VAE_IMAGE_AREA = 1024 * 1024
DEFAULT_VL_IMAGE_AREA = 384 * 384


class EditPipeline(DiTPipeline):
    """What both edit layouts share; `QwenImageEditPipeline` and `QwenImageEditPlusPipeline` say how images are
    sized and shown to the encoder (`prepare_images`, `image_prefix`) and how many there may be (`max_images`)."""

    max_images = 1
    needs_image = True
    size_image = 0  # the reference whose aspect ratio the output takes by default

    def __init__(self, *, transformer, text_encoder, tokenizer, processor, vae, scheduler_config: dict, device, dtype):
        super().__init__(
            transformer=transformer, device=device, dtype=dtype, text_encoder=text_encoder, vae=vae,
            scheduler_config=scheduler_config,
        )  # fmt: skip
        self.tokenizer = tokenizer
        self.processor = processor

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
        """Load a diffusers-format edit pipeline folder, every component checked before anything is loaded.
        `parallel`, `quantize`, `attention`, `memory`: as `QwenImagePipeline.from_pretrained` (a plan sized for
        edits counts the reference tokens: fastdit.memory.Workload)."""
        parts = load_parts(
            Path(path), COMPONENTS, dtype=dtype, device=device, parallel=parallel, quantize=quantize,
            attention=attention, memory=memory, plans=cls.memory_plans,
        )  # fmt: skip
        return parts.build(cls)

    def output_size(self, images: list[Image.Image], vae_image_area: int = DEFAULT_VAE_IMAGE_AREA) -> tuple[int, int]:
        """The default output (width, height) for these references: the layout's image (`size_image`) at
        `vae_image_area` pixels; InputError when it is too elongated for that area."""
        k = self.size_image % len(images)
        return sized(images[k], check_image_area(vae_image_area, "vae_image_area"), "vae_image_area", k)

    def image_prefix(self, count: int) -> str:
        """The user content before the prompt for `count` images."""
        raise NotImplementedError

    def prepare_images(
        self, images: list[Image.Image], vae_image_area: int, vl_image_area: int
    ) -> tuple[list[Image.Image], list[Image.Image]]:
        """RGB references -> (encoder images, VAE images)."""
        raise NotImplementedError

    def dit_step(self, key, txt, txt_mask, txt_lens, rope: Rope, modulation, mod_index, loop=None) -> Callable:
        """The DiT at step i as `step(x, i)` for `denoise`: everything but x fixed for the call and passed as
        arguments of the (possibly CUDA-graphed) call, so a graph recorded for the same shapes (`key`) serves.
        `loop`: the call's step cache (`cached_loop`), which graphs its own segments."""
        transformer = self.transformer  # not self: a graph held by the pipeline must not keep it alive in a cycle

        def forward(x, txt, mask, timestep, cos, sin, mod_img, mod_txt, mod_final, mod_ref, index):
            return transformer(
                hidden_states=x,
                encoder_hidden_states=txt,
                encoder_hidden_states_mask=mask,
                timestep=timestep,
                rope=Rope(cos, sin),
                txt_lens=txt_lens,
                modulation=StepModulation(mod_img, mod_txt, mod_final, mod_ref),
                mod_index=index,
                cache=loop,
            )

        run = self.graphed(key, forward) if loop is None else forward
        timestep = torch.zeros(txt.shape[0], device=self.device)  # unused with the table; a fixed graph input

        def step(x: torch.Tensor, i: int) -> torch.Tensor:
            with dynamic_tokens():  # token counts symbolic where compiled: one graph for every size
                return run(x, txt, txt_mask, timestep, *rope, *modulation[i], mod_index)

        return step

    def encode_references(self, vae_images: list[Image.Image]) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
        """VAE images -> (1, N_ref, C * 4) tokens (posterior mode, normalised, packed per image, concatenated) and
        each image's (1, h, w) token grid."""
        tokens, grids = [], []
        for im in vae_images:
            latents = encode(self.vae, to_pixels(im).to(self.device))  # (1, C, 1, h, w)
            tokens.append(pack_latents(latents.movedim(2, 1)).to(self.dtype))
            grids.append((1, latents.shape[-2] // 2, latents.shape[-1] // 2))
        return torch.cat(tokens, dim=1), grids

    @torch.inference_mode()
    def __call__(
        self,
        image: Image.Image | list[Image.Image],
        prompt: str | list[str],
        *,
        negative_prompt: str | list[str] | None = None,
        true_cfg_scale: float | None = None,
        num_inference_steps: int | None = None,
        seed: int | list[int] | None = None,
        height: int | None = None,
        width: int | None = None,
        vae_image_area: int = DEFAULT_VAE_IMAGE_AREA,
        vl_image_area: int = DEFAULT_VL_IMAGE_AREA,
        num_images_per_prompt: int = 1,
        scheduler: str = "checkpoint",
        cache: StepCache | None = None,
        progress: Callable[[int, int], None] | None = None,
        show_progress: bool = True,
    ) -> Images:
        """Edit `image` (one PIL image or a list) as each prompt says: `num_images_per_prompt` images per prompt,
        prompt-major (p0, p0, p1, ...).

        `true_cfg_scale`: None -> 4.0 with a negative prompt, else off (CFG needs both a scale > 1 and a negative
        prompt). `height` / `width`: the output size (multiples of 16); each defaults to the layout's image at
        `vae_image_area` (`output_size`). `seed`: one int for the batch, or one per image.
        `num_inference_steps`: default 50 (8 with the Lightning schedule). `scheduler`: "checkpoint" (the checkpoint's
        schedule) or "lightning" (the Qwen-Image-Edit-Lightning LoRAs' schedule, CFG off unless a scale > 1 is
        given). `cache`: a `fastdit.StepCache` for this call (default: the one `enable_step_cache` set, if any)."""
        clock = StageClock(self.device)
        cache = self.step_cache if cache is None else cache
        if cache is not None:
            self._check_cache(cache)
        images = reference_images(image, self.max_images)
        prompts = check_prompts(prompt)
        sampling = sampling_for(scheduler, self.scheduler_config, DEFAULT_CFG_SCALE)
        steps = check_steps(sampling.steps if num_inference_steps is None else num_inference_steps)
        check_int(num_images_per_prompt, "num_images_per_prompt", 1)
        negatives = negative_prompts(negative_prompt, len(prompts))
        cfg = resolve_cfg(true_cfg_scale, negatives, sampling.cfg_scale)
        num_images = len(prompts) * num_images_per_prompt
        seed = check_seed(seed, num_images)
        check_image_area(vae_image_area, "vae_image_area")
        check_image_area(vl_image_area, "vl_image_area")
        vl_images, vae_images = self.prepare_images(images, vae_image_area, vl_image_area)
        default_w, default_h = self.output_size(images, vae_image_area)
        height, width = check_size(default_h if height is None else height, default_w if width is None else width)
        check_prompt_lengths(self.tokenizer, prompts, "prompt")
        if cfg is not None:
            check_prompt_lengths(self.tokenizer, negatives, "negative_prompt")

        # 1. Text + images: one encoder call for prompts and negatives, rows repeated per image (prompt-major);
        # (B', L, D) with B' = 2 * num_images under CFG, conditional rows first.
        texts = prompts + (negatives if cfg is not None else [])
        prefix = self.image_prefix(len(vl_images))
        with self.memory.text_encoder():
            rows = encode_vl_prompts(self.text_encoder, self.processor, texts, vl_images, prefix, self.device)
        rows = [r for r in rows for _ in range(num_images_per_prompt)]
        txt, txt_mask = pad_embeds(rows, self.dtype)
        txt_lens = tuple(r.shape[0] for r in rows)
        if bool(txt_mask.all()):  # nothing padded: attention runs unmasked, its fast path
            txt_mask, txt_lens = None, None
        clock.lap("text_encode_s")

        # 2. Reference latents (every row the same), then the noise: (B, N, C * 4) tokens on an h/2 x w/2 grid.
        refs, ref_grids = self.encode_references(vae_images)
        refs = refs.expand(txt.shape[0], -1, -1)
        clock.lap("vae_encode_s")
        lat_h, lat_w = height // 8, width // 8
        noise = initial_noise(seed, (num_images, 1, self.latent_channels, lat_h, lat_w), self.dtype)
        latents = pack_latents(noise).to(self.device)
        layout = [(1, lat_h // 2, lat_w // 2), *ref_grids]  # target first; reference k at RoPE frame k
        img_shapes = [layout] * txt.shape[0]
        rope = self.transformer.make_rope(img_shapes, txt.shape[1], self.device)
        mod_index = self.transformer.modulation_index(img_shapes, self.device)  # None unless zero_cond_t
        schedule = flow_match_sigmas(steps, latents.shape[1], sampling.config)  # target tokens only
        timesteps = (schedule[:steps] * 1000).to(self.device, latents.dtype) / 1000
        modulation = self.transformer.modulation_table(timesteps)

        # 3. Flow-match Euler sampling; the reference tokens ride along after the noise tokens.
        key = ("edit", tuple(latents.shape), tuple(layout), cfg is not None, tuple(txt.shape), txt_mask is not None)
        key = (*key, txt_lens)
        loop = self.cached_loop(cache, key, steps)
        step = self.dit_step(key, txt, txt_mask, txt_lens, rope, modulation, mod_index, loop)
        latents = denoise(
            step, latents, schedule, cfg_scale=cfg, appended=refs, progress=progress, show_progress=show_progress
        )
        clock.lap("denoise_s")

        # 4. VAE decode.
        with self.memory.vae(self.vae, num_images * height * width):
            out = to_pil(decode(self.vae, unpack_latents(latents, lat_h, lat_w)))
        clock.lap("vae_decode_s")
        cached_steps = 0 if loop is None else loop.cached_steps
        return Images(out, seeds=seed, timings=clock.timings(steps), steps=steps, cached_steps=cached_steps)


class QwenImageEditPipeline(EditPipeline):
    """Qwen-Image-Edit: one reference image, its vision span inline before the prompt. The image is resized once,
    to `vae_image_area`, and that one image is both the VL encoder's and the VAE's (`vl_image_area` is not used)."""

    max_images = 1

    def image_prefix(self, count: int) -> str:
        return inline_images(count)

    def prepare_images(self, images, vae_image_area, vl_image_area):
        if vl_image_area != DEFAULT_VL_IMAGE_AREA:
            log.warning("vl_image_area is not used by Qwen-Image-Edit: its image is encoded at vae_image_area")
        (im,) = images
        condition = resize(im, *sized(im, vae_image_area, "vae_image_area", 0))
        return [condition], [condition]


class QwenImageEditPlusPipeline(EditPipeline):
    """Qwen-Image-Edit-2509 / 2511: up to `max_images` reference images, "Picture k:" before each vision span; each
    image resized from the original to `vl_image_area` for the encoder and to `vae_image_area` for the VAE."""

    max_images = 3  # the released models are trained for 1 to 3 images
    size_image = -1

    def image_prefix(self, count: int) -> str:
        return numbered_images(count)

    def prepare_images(self, images, vae_image_area, vl_image_area):
        vl_images, vae_images = [], []
        for k, im in enumerate(images):
            vl_images.append(resize(im, *sized(im, vl_image_area, "vl_image_area", k)))
            vae_images.append(resize(im, *sized(im, vae_image_area, "vae_image_area", k)))
        return vl_images, vae_images
