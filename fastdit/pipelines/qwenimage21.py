"""Qwen-Image 2.1: text-to-image and image-conditioned generation with one model.

encode (Qwen3-VL over the prompt with the condition images in its vision slots; the VAE over the condition
images) -> prefill (the prefix's K/V, once per image) -> flow-match Euler steps over the noise tokens -> VAE decode
(RGBA). Images match diffusers' `QwenImage21Pipeline` for the same seed (same noise, schedule, guidance and decode
arithmetic); what differs is how the work is done:

- The prefix once per image: the text and condition-image tokens never attend to the noise tokens, and they are
  modulated from t = 0, so `prefill` runs them through every block once and keeps each layer's K/V; every step
  then runs only the N noise tokens, attending over [their own K/V; the cached prefix K/V].
- True CFG is one batched forward per step over [cond; uncond]: both prefixes are prefilled in one batch (padded,
  each row keeping its own valid length), the guided velocity is the plain `uncond + s * (cond - uncond)`.
- Each row keeps the positions it has alone: padding a prompt to a longer one in the batch would move the noise
  image's RoPE frame (it follows the whole padded prefix), so each row's noise table is built from its own
  length. A list of prompts (or a prompt with its negative) thus gives the images of separate calls. (diffusers
  pads a list of prompts together, so there a shorter prompt's image changes with its batch-mates.)
- One text-encoder call for all prompts and negatives; the timestep modulation of every step in one GEMM.

Parameters mean what they mean in diffusers: CFG only with `true_cfg_scale > 1` and a negative prompt (default
off: 2.1 is sampled without guidance); without height / width the size is the last condition image's aspect ratio
at output_resolution^2 pixels (or output_resolution square), floored to multiples of 32; each condition image is
resized to output_resolution^2 pixels at its aspect ratio (sides multiples of 32, LANCZOS), converted to RGBA for
the VAE and composited over white for the text encoder. The folder's `sample_sigmas` (model_index.json, e.g. the
distilled Turbo release) replace the default schedule and set the step count, unless the call passes `sigmas`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from fastdit.cache.config import StepCache
from fastdit.errors import CheckpointError, ConfigError
from fastdit.models.layers import Rope
from fastdit.models.qwenimage21 import AdaLN, PrefixCache, QwenImage21Config
from fastdit.models.qwenimage21_layout import LATENTS_PER_SLOT, prefix_layout
from fastdit.pipelines.base import DiTPipeline, StageClock
from fastdit.pipelines.folder import read_model_index
from fastdit.pipelines.latents import initial_noise, to_pil
from fastdit.pipelines.loading import load_parts
from fastdit.pipelines.loop import Images, denoise
from fastdit.pipelines.qwen3vl import encode_prompts
from fastdit.pipelines.qwenimage import negative_prompts
from fastdit.pipelines.scheduler import flow_match_sigmas
from fastdit.pipelines.text import pad_embeds
from fastdit.validation import InputError, check_cfg_scale, check_int, check_prompts, check_seed, check_steps

log = logging.getLogger("fastdit")

COMPONENTS = ("processor", "scheduler", "text_encoder", "transformer", "vae")
# Pixels per latent token along each side (the 16x VAE; the DiT reads latents unpatched); sides are floored to
# multiples of twice that, as one vision slot of the text encoder covers 2 x 2 latent tokens.
VAE_SCALE = 16
SIZE_MULTIPLE = 2 * VAE_SCALE


def calculate_dimensions(area: int, ratio: float) -> tuple[int, int]:
    """(width, height) of `area` pixels at aspect ratio `ratio` (w / h), each rounded to a multiple of 32 (Python's
    round: halves to even)."""
    width = math.sqrt(area * ratio)
    height = width / ratio
    return round(width / SIZE_MULTIPLE) * SIZE_MULTIPLE, round(height / SIZE_MULTIPLE) * SIZE_MULTIPLE


def check_sigmas(sigmas, field: str) -> list[float]:
    """A sampling grid (terminal 0 excluded): a non-empty list of numbers in (0, 1]."""
    ok = isinstance(sigmas, list | tuple) and sigmas
    if ok:
        ok = all(not isinstance(s, bool) and isinstance(s, int | float) and 0 < s <= 1 for s in sigmas)
    if not ok:
        raise InputError(field, f"must be a non-empty list of numbers in (0, 1] (terminal 0 excluded), got {sigmas!r}")
    return [float(s) for s in sigmas]


def condition_images(image) -> list[Image.Image]:
    """None, a PIL image or (H, W, C) uint8 array, or a flat list of them -> PIL images in RGBA."""
    if image is None:
        return []
    items = image if isinstance(image, list | tuple) else [image]
    if not items:
        raise InputError("image", "is an empty list; give one or more images, or None")
    out = []
    for item in items:
        if isinstance(item, np.ndarray):
            item = Image.fromarray(item)
        if not isinstance(item, Image.Image):
            raise InputError(
                "image",
                f"must be PIL images or numpy arrays (one flat list for every prompt), got {type(item).__name__}",
            )
        out.append(item if item.mode == "RGBA" else item.convert("RGBA"))
    return out


def on_white(image: Image.Image) -> Image.Image:
    """An RGBA image composited over white (what the text encoder was trained to see)."""
    white = Image.new("RGB", image.size, (255, 255, 255))
    white.paste(image, mask=image.getchannel("A"))
    return white


def to_pixels(image: Image.Image) -> Tensor:
    """An RGBA PIL image -> (1, 4, H, W) float32 in [-1, 1]."""
    x = torch.from_numpy(np.asarray(image).astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    return 2.0 * x - 1.0


def pack(latents: Tensor) -> Tensor:
    """(B, C, 1, h, w) latents -> (B, h * w, C) tokens in row-major order (the 2.1 DiT reads them unpatched)."""
    b, c, _, h, w = latents.shape
    return latents.reshape(b, c, h * w).transpose(1, 2)


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """(B, h * w, C) tokens -> (B, C, 1, h, w) latents."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], 1, h, w)


class QwenImage21Pipeline(DiTPipeline):
    """Qwen-Image 2.1. Build with `from_pretrained`, call with prompts (and condition images), get `Images` (RGBA)."""

    max_images = None  # condition images: any number
    # Memory plans: the DiT (14 GB in bf16) stays resident; the Qwen3-VL text encoder may wait in host memory.
    memory_plans = ("full", "offload-text")

    def __init__(
        self,
        *,
        transformer,
        text_encoder,
        processor,
        vae,
        scheduler_config: dict,
        device,
        dtype,
        sample_sigmas: list[float] | None = None,
    ):
        super().__init__(
            transformer=transformer, device=device, dtype=dtype, text_encoder=text_encoder, vae=vae,
            scheduler_config=scheduler_config,
        )  # fmt: skip
        if not isinstance(transformer.cfg, QwenImage21Config):
            raise ConfigError(f"QwenImage21Pipeline needs a Qwen-Image 2.1 DiT, got {type(transformer.base).__name__}")
        if not transformer.cfg.causal_condition:
            raise ConfigError(
                "the transformer has causal_condition=false: its prefix depends on the step, and fastdit runs 2.1 "
                "checkpoints with the prefix computed once per image (causal_condition=true, as released)"
            )
        self.processor = processor
        self.sample_sigmas = None if sample_sigmas is None else check_sigmas(sample_sigmas, "sample_sigmas")

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
        """Load a diffusers-format QwenImage21Pipeline folder, every component checked before anything is loaded.

        `parallel`: this rank's `fastdit.parallel.ParallelState`; the DiT is then loaded sharded (tp / sp / cfg),
        the text encoder and VAE whole on every rank. `quantize`: "fp8" runs the DiT's block linears in fp8
        ("fp8-emulated" for CPU tests). `attention`: the DiT's attention backend (fastdit.kernels.attention).
        `memory`: a memory plan (`memory_plans`: full or offload-text, or auto), as for Qwen-Image."""
        root = Path(path)
        sample_sigmas = read_model_index(root).get("sample_sigmas")
        if sample_sigmas is not None:
            try:
                check_sigmas(sample_sigmas, "sample_sigmas")
            except InputError as e:
                raise CheckpointError(f"{root / 'model_index.json'}: {e}") from None
        parts = load_parts(
            root, COMPONENTS, dtype=dtype, device=device, parallel=parallel, quantize=quantize, attention=attention,
            memory=memory, plans=cls.memory_plans, config_type=QwenImage21Config,
        )  # fmt: skip
        return parts.build(cls, sample_sigmas=sample_sigmas)

    # ---- the stages ----------------------------------------------------------------------------------------

    def _vae_stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        shape = (1, self.latent_channels, 1, 1, 1)
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean).view(shape).to(like.device, like.dtype)
        std = torch.tensor(cfg.latents_std).view(shape).to(like.device, like.dtype)
        return mean, std

    def encode_condition(self, image: Image.Image) -> Tensor:
        """An RGBA image at its encoding size -> (1, h * w, C) normalised latent tokens (the posterior's mode)."""
        pixels = to_pixels(image)[:, :, None].to(self.device, self.dtype)  # (1, 4, 1, H, W)
        latents = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist.mode()
        mean, std = self._vae_stats(latents)
        return pack((latents - mean) / std)

    def decode(self, tokens: Tensor, h: int, w: int) -> list[Image.Image]:
        latents = unpack(tokens, h, w).to(self.vae.dtype)
        mean, std = self._vae_stats(latents)
        return to_pil(self.vae.decode(latents * std + mean, return_dict=False)[0][:, :, 0])

    def noise_rope(self, layout_slots: list[Tensor], cond_grids, grid: tuple[int, int]) -> Rope:
        """The noise tokens' RoPE table of each row, from the row's own (unpadded) prefix: (N, D) when every row
        has the same length, else (B, N, D)."""
        tables: dict[int, Rope] = {}
        for slots in layout_slots:
            if len(slots) not in tables:
                layout = prefix_layout(slots.tolist(), cond_grids)
                tables[len(slots)] = self.transformer.make_rope(layout, grid, self.device)[1]
        if len(tables) == 1:
            return next(iter(tables.values()))
        rows = [tables[len(slots)] for slots in layout_slots]
        return Rope(torch.stack([r.cos for r in rows]), torch.stack([r.sin for r in rows]))

    def dit_step(
        self, key, cache: PrefixCache, rope: Rope, modulation: AdaLN, cfg: float | None, loop=None
    ) -> Callable:
        """The DiT at step i as `step(x, i)` for `denoise`, the prefix cache, RoPE and modulation fixed for the call;
        with CFG it runs [x; x] over the [cond; uncond] prefixes and returns the guided velocity. Every tensor the
        (possibly CUDA-graphed) forward reads is an argument, so a graph recorded in an earlier call with the same
        shapes (`key`) serves this one. `loop`: the call's step cache (`cached_loop`), which graphs its own
        segments."""
        transformer = self.transformer  # not self: a graph held by the pipeline must not keep it alive in a cycle
        lens = cache.lens

        def forward(x, k, v, cos, sin, scale1, gate1, scale2, gate2, final_scale):
            mod = AdaLN(scale1, gate1, scale2, gate2, final_scale)
            return transformer(x, None, PrefixCache(k, v, lens), Rope(cos, sin), mod, step_cache=loop)

        run = self.graphed(key, forward) if loop is None else forward

        def step(x: Tensor, i: int) -> Tensor:
            mod = (field[i : i + 1] for field in modulation)  # (1, 1, dim) each: every row shares the timestep
            out = run(torch.cat([x, x]) if cfg is not None else x, cache.k, cache.v, *rope, *mod)
            if cfg is None:
                return out
            cond, uncond = out.chunk(2)
            return uncond + cfg * (cond - uncond)

        return step

    # ---- the call ------------------------------------------------------------------------------------------

    def output_size(self, images: list[Image.Image], output_resolution: int = 1024) -> tuple[int, int]:
        """The default output (width, height) for these condition images (PIL): the last one's aspect ratio at
        output_resolution^2 pixels."""
        height, width = self._size(None, None, output_resolution, images)
        return width, height

    def _size(self, height, width, output_resolution: int, images: list[Image.Image]) -> tuple[int, int]:
        if images:
            w, h = calculate_dimensions(output_resolution**2, images[-1].width / images[-1].height)
            height, width = height or h, width or w
        height, width = height or output_resolution, width or output_resolution
        for field, v in (("height", height), ("width", width)):
            check_int(v, field, SIZE_MULTIPLE)
        if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
            log.warning("height and width are floored to multiples of %d: %dx%d", SIZE_MULTIPLE, width, height)
        return height // SIZE_MULTIPLE * SIZE_MULTIPLE, width // SIZE_MULTIPLE * SIZE_MULTIPLE

    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | list[str],
        *,
        image=None,
        negative_prompt: str | list[str] | None = None,
        true_cfg_scale: float | None = 1.0,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 40,
        sigmas: list[float] | None = None,
        seed: int | list[int] | None = None,
        num_images_per_prompt: int = 1,
        output_resolution: int = 1024,
        scheduler: str = "checkpoint",
        cache: StepCache | None = None,
        progress: Callable[[int, int], None] | None = None,
        show_progress: bool = True,
    ) -> Images:
        """Generate len(prompt) * num_images_per_prompt images (RGBA), prompt-major (p0, p0, p1, ...).

        `image`: condition image(s) shared by every prompt (PIL or uint8 arrays; RGBA kept for the VAE).
        `sigmas`: a sampling grid for this call (terminal 0 excluded), overriding the folder's `sample_sigmas`;
        either sets the step count, and `num_inference_steps` is then unused. `true_cfg_scale` None means 1.0.
        `scheduler`: only "checkpoint" (the Lightning schedule belongs to Qwen-Image's distilled LoRAs).
        `cache`: a `fastdit.StepCache` for this call (default: the one `enable_step_cache` set, if any): the middle
        blocks' residual reused on the steps it caches, one decision per step for the whole (CFG) batch."""
        if scheduler != "checkpoint":
            raise InputError("scheduler", f"{scheduler!r} is for Qwen-Image; Qwen-Image 2.1 runs its own schedule")
        clock = StageClock(self.device)
        cache_setting = self.step_cache if cache is None else cache
        if cache_setting is not None:
            self._check_cache(cache_setting)
        prompts = check_prompts(prompt)
        images = condition_images(image)
        check_int(output_resolution, "output_resolution", SIZE_MULTIPLE)
        height, width = self._size(height, width, output_resolution, images)
        grid = (height // VAE_SCALE, width // VAE_SCALE)
        grid_sigmas = sigmas if sigmas is not None else self.sample_sigmas
        steps = check_steps(num_inference_steps) if grid_sigmas is None else len(check_sigmas(grid_sigmas, "sigmas"))
        check_int(num_images_per_prompt, "num_images_per_prompt", 1)
        negatives = negative_prompts(negative_prompt, len(prompts))
        scale = 1.0 if true_cfg_scale is None else check_cfg_scale(true_cfg_scale)
        if scale > 1 and negatives is None:
            log.warning("true_cfg_scale=%s has no effect without a negative prompt: CFG is off", scale)
        elif scale == 1 and negatives is not None:
            log.warning("negative prompt ignored: CFG needs true_cfg_scale > 1")
        cfg = scale if scale > 1 and negatives is not None else None
        num_images = len(prompts) * num_images_per_prompt
        seed = check_seed(seed, num_images)

        # 1. Conditions: each image at output_resolution^2 pixels; RGBA to the VAE, over white to the text encoder.
        sizes = [calculate_dimensions(output_resolution**2, im.width / im.height) for im in images]
        if any(min(s) < SIZE_MULTIPLE for s in sizes):
            raise InputError("image", f"has an aspect ratio too extreme for output_resolution {output_resolution}")
        resized = [im.resize(s, resample=Image.Resampling.LANCZOS) for im, s in zip(images, sizes, strict=True)]
        cond_grids = [(h // VAE_SCALE, w // VAE_SCALE) for w, h in sizes]
        texts = prompts + (negatives if cfg is not None else [])
        with self.memory.text_encoder():
            encoded = encode_prompts(
                self.text_encoder, self.processor, texts, [on_white(im) for im in resized], self.device
            )
        expected = sum(h * w for h, w in cond_grids) // LATENTS_PER_SLOT
        if any(int(s.sum()) != expected for s in encoded.slots):
            raise InputError(
                "output_resolution",
                f"{output_resolution} does not suit the text encoder's image processor: it resized the condition "
                f"images (min / max pixels), so their vision slots no longer match the {expected} expected",
            )
        cond = torch.cat([self.encode_condition(im) for im in resized], dim=1) if images else None  # (1, N_c, C)
        clock.lap("text_encode_s")

        # 2. The prefix of every row (prompts prompt-major, then negatives), prefilled once.
        rows = [i for i in range(len(texts)) for _ in range(num_images_per_prompt)]
        text, text_mask = pad_embeds([encoded.embeds[i] for i in rows], self.dtype)
        if bool(text_mask.all()):
            text_mask = None
        first = torch.zeros(text.shape[1], dtype=torch.bool)
        first[: len(encoded.slots[rows[0]])] = encoded.slots[rows[0]].cpu()  # every row has its slots there
        layout = prefix_layout(first.tolist(), cond_grids)
        prefix_rope, _ = self.transformer.make_rope(layout, grid, self.device)
        cond_rows = None if cond is None else cond.expand(len(rows), -1, -1)
        cache = self.transformer.prefill(text, text_mask, cond_rows, layout, prefix_rope)
        rope = self.noise_rope([encoded.slots[i].cpu() for i in rows], cond_grids, grid)
        clock.lap("prefill_s")

        # 3. Noise (B, h * w, C), the schedule and every step's modulation.
        noise = initial_noise(seed, (num_images, 1, self.latent_channels, *grid), self.dtype)
        latents = pack(noise.transpose(1, 2)).to(self.device)
        schedule = flow_match_sigmas(steps, latents.shape[1], self.scheduler_config, grid_sigmas)
        # The reference feeds sigma as a timestep in [0, 1000] rounded to the latent dtype, then / 1000.
        timesteps = (schedule[:steps] * 1000).to(self.device, latents.dtype) / 1000
        modulation = self.transformer.modulation(timesteps)  # (steps, 1, dim) each
        key = ("qwen-image-2.1", tuple(latents.shape), tuple(cache.k.shape), cache.lens, cfg is not None)
        key = (*key, tuple(rope.cos.shape))
        loop = self.cached_loop(cache_setting, key, steps)
        step = self.dit_step(key, cache, rope, modulation, cfg, loop)
        latents = denoise(step, latents, schedule, progress=progress, show_progress=show_progress)
        clock.lap("denoise_s")

        with self.memory.vae(self.vae, num_images * height * width):
            images_out = self.decode(latents, *grid)
        clock.lap("vae_decode_s")
        cached_steps = 0 if loop is None else loop.cached_steps
        return Images(images_out, seeds=seed, timings=clock.timings(steps), steps=steps, cached_steps=cached_steps)
