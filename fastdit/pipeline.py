"""Text-to-image generation with Qwen-Image: text encoding -> flow-match Euler sampling -> VAE decode.

Images match diffusers' `QwenImagePipeline` for the same seed (same noise, schedule, guidance and
decode arithmetic); what differs is how the work is done:

- fastdit's own DiT (`fastdit.model`) denoises; the text encoder (Qwen2.5-VL) comes from
  transformers and the VAE (`AutoencoderKLQwenImage`) from diffusers.
- With true CFG, the conditional and unconditional branches run as ONE batched DiT forward: texts
  padded to a common length with a boolean mask, latents duplicated, (2B, ...) in one call.
- All prompts (and negative prompts) are encoded in one text-encoder call, without vocab logits.
- RoPE tables are built once per generation and reused for every step.

Guidance follows the reference rule: true CFG runs only when `true_cfg_scale > 1` AND a negative
prompt is given (" " is a valid negative prompt); `true_cfg_scale > 1` alone only logs a warning.
The guided velocity is rescaled to the norm of the conditional one, per token.

Seeds: an int seeds one CPU generator that draws the noise for the whole batch at once (as diffusers
does with one generator); a list gives image i its own CPU generator, so each image equals a separate
single-image run with that seed.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastdit.errors import CheckpointError, FastditError
from fastdit.scheduler import check_scheduler_config, euler_step, flow_match_sigmas
from fastdit.text import check_lengths, encode_prompts, pad_embeds

log = logging.getLogger("fastdit")

PIPELINE_PARTS = ("model_index.json", "scheduler", "text_encoder", "tokenizer", "transformer", "vae")
# Pixels per packed latent token along each side: VAE 8x downsampling, then 2x2 patches.
PIXELS_PER_TOKEN = 16


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, 1, C, H, W) VAE latents -> (B, H/2 * W/2, C * 4) tokens, each a 2x2 patch as (c, dy, dx)."""
    b, _, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, H/2, W/2, C, 2, 2)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `pack_latents` for an (h, w) latent grid: (B, N, C * 4) -> (B, C, 1, h, w)."""
    b, _, c4 = tokens.shape
    x = tokens.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, H/2, 2, W/2, 2)
    return x.reshape(b, c4 // 4, 1, h, w)


def guided_velocity(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """True CFG, rescaled per token so the guided velocity keeps the conditional velocity's norm."""
    combined = uncond + scale * (cond - uncond)
    cond_norm = torch.norm(cond, dim=-1, keepdim=True)
    combined_norm = torch.norm(combined, dim=-1, keepdim=True)
    return combined * (cond_norm / combined_norm)


def initial_noise(seeds: int | list[int], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, C, H, W) Gaussian noise drawn on the CPU: one generator for an int, one per image for a list."""
    if isinstance(seeds, int):
        return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seeds), dtype=dtype)
    one = (1, *shape[1:])
    return torch.cat([torch.randn(one, generator=torch.Generator("cpu").manual_seed(s), dtype=dtype) for s in seeds])


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) decoded images in [-1, 1] -> RGB PIL images (rounded to the nearest 8-bit level)."""
    x = (images / 2 + 0.5).clamp(0, 1)
    x = x.cpu().permute(0, 2, 3, 1).float().numpy()
    return [Image.fromarray(a) for a in (x * 255).round().astype(np.uint8)]


def _as_list(value, name: str) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(p, str) for p in items):
        raise FastditError(f"{name} must be a non-empty string or a non-empty list of strings")
    return items


def _check_int(value, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise FastditError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_size(height, width) -> None:
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % PIXELS_PER_TOKEN:
            raise FastditError(f"{name} must be a positive multiple of {PIXELS_PER_TOKEN}, got {v!r}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class QwenImagePipeline:
    """Qwen-Image text-to-image. Build with `from_pretrained`, call with prompts, get PIL images.

    After each call, `last_timings` holds the stage times in seconds (`text_encode_s`, `denoise_s`,
    `denoise_s_per_step`, `vae_decode_s`, `total_s`) and `last_seeds` the seed(s) used.
    """

    def __init__(self, *, transformer, text_encoder, tokenizer, vae, scheduler_config: dict, device, dtype):
        check_scheduler_config(scheduler_config)
        self.transformer = transformer
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.vae = vae
        self.scheduler_config = dict(scheduler_config)
        self.device = torch.device(device)
        self.dtype = dtype
        self.latent_channels = vae.config.z_dim
        self.last_timings: dict[str, float] = {}
        self.last_seeds: int | list[int] | None = None
        self.cuda_graph = False  # see enable_cuda_graph
        self._graph_key, self._graph = None, None

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
    ) -> QwenImagePipeline:
        """Load a diffusers-format Qwen-Image pipeline folder (model_index.json + one folder per part).

        `parallel`: this rank's `fastdit.parallel.ParallelState` (see `fastdit.parallel.launch`); the DiT is
        then loaded sharded (tp / sp / cfg), the text encoder and VAE whole on every rank.
        `quantize`: "fp8" runs the DiT's block linears in fp8 e4m3 (fastdit.quant; "fp8-emulated" for CPU
        tests); a transformer folder written by `fastdit quantize` is fp8 without it.
        `attention`: the DiT's attention backend (fastdit.attention.BACKENDS; "int8" and "fp8" are 8-bit).
        """
        from diffusers import AutoencoderKLQwenImage
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        from fastdit.attention import resolve_backend
        from fastdit.loader import default_device, load_transformer
        from fastdit.model import set_attention_backend

        root = Path(path)
        if not root.is_dir():
            raise CheckpointError(f"model folder does not exist: {root}")
        missing = [p for p in PIPELINE_PARTS if not (root / p).exists()]
        if missing:
            raise CheckpointError(f"{root} is not a complete Qwen-Image pipeline folder: missing {', '.join(missing)}")
        try:
            scheduler_config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"cannot read {root / 'scheduler' / 'scheduler_config.json'}: {e}") from e
        device = torch.device(device) if device is not None else default_device()
        resolve_backend(attention, device)  # an unavailable backend fails before any weight is read

        if parallel is not None and parallel.world_size > 1:  # fastdit.parallel: this rank's DiT shard
            from fastdit.parallel import load_transformer_parallel as load_sharded

            # Modulation sharded too: it is a third of the DiT's weights, so tp=2 halves them per rank, for one
            # all-gather of (B, 6 * dim) per stream and block.
            transformer = load_sharded(
                root / "transformer",
                parallel,
                dtype=dtype,
                device=device,
                shard_modulation=parallel.tp > 1,
                quantize=quantize,  # fastdit.quant: fp8 on each rank's shards, after sharding
            )
        else:
            transformer = load_transformer(root / "transformer", dtype=dtype, device=device, quantize=quantize)
        set_attention_backend(getattr(transformer, "model", transformer), attention)  # ParallelTransformer wraps it
        try:
            tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
            text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(root / "text_encoder", dtype=dtype)
            vae = AutoencoderKLQwenImage.from_pretrained(root / "vae", torch_dtype=dtype)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot load {root}: {e}") from e
        return cls(
            transformer=transformer,
            text_encoder=text_encoder.to(device).eval(),
            tokenizer=tokenizer,
            vae=vae.to(device).eval(),
            scheduler_config=scheduler_config,
            device=device,
            dtype=dtype,
        )

    def compile(self) -> QwenImagePipeline:
        """Compile the DiT block by block (`fastdit.compile_blocks`): full-graph, one warm-up for all blocks.

        The first call at a new image size or text length compiles (seconds); later ones reuse the graph.
        """
        from fastdit.model import compile_blocks

        compile_blocks(getattr(self.transformer, "model", self.transformer))  # ParallelTransformer wraps it
        return self

    def enable_cuda_graph(self) -> QwenImagePipeline:
        """Replay each denoising step from a CUDA graph (fastdit.cudagraph): the GPU no longer waits for
        Python to launch the step's ~2000 kernels. Per image size, batch and text length, the first step of a
        call runs normally and is recorded; the graph is kept for later calls of the same shapes (one at a
        time: its activations stay in GPU memory). Works compiled or not, on every rank of a parallel run."""
        if self.device.type != "cuda":
            raise FastditError(f"CUDA graphs need a CUDA device; this pipeline runs on {self.device}")
        self.cuda_graph = True
        return self

    def _step_fn(self, key, img_shapes, txt_lens):
        """The DiT call of one step: the transformer itself, or its CUDA graph for these shapes (`key`)."""
        from fastdit.cudagraph import CudaGraphStep
        from fastdit.model import Rope, StepModulation

        transformer = self.transformer  # not self: a graph held by the pipeline must not keep it alive in a cycle

        def step(x, txt, mask, timestep, cos, sin, mod_img, mod_txt, mod_final):
            return transformer(
                hidden_states=x,
                encoder_hidden_states=txt,
                encoder_hidden_states_mask=mask,
                timestep=timestep,
                img_shapes=img_shapes,
                rope=Rope(cos, sin),
                txt_lens=txt_lens,
                modulation=StepModulation(mod_img, mod_txt, mod_final),
            )

        if not self.cuda_graph:
            return step
        if self._graph_key != key:  # the old graph (and its memory) goes here, before the new one records
            self._graph_key, self._graph = key, CudaGraphStep(step)
        return self._graph

    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | list[str],
        *,
        negative_prompt: str | list[str] | None = None,
        height: int = 1024,
        width: int = 1024,
        num_inference_steps: int = 50,
        true_cfg_scale: float = 4.0,
        seed: int | list[int] | None = None,
        num_images_per_prompt: int = 1,
        progress: Callable[[int, int], None] | None = None,
        show_progress: bool = True,
    ) -> list[Image.Image]:
        """Generate len(prompt) * num_images_per_prompt images, ordered prompt-major (p0, p0, p1, ...)."""
        t_start = time.perf_counter()
        prompts = _as_list(prompt, "prompt")
        if any(not p.strip() for p in prompts):
            raise FastditError("prompt must not be empty")
        check_size(height, width)
        _check_int(num_inference_steps, "num_inference_steps", 1)
        _check_int(num_images_per_prompt, "num_images_per_prompt", 1)
        if not isinstance(true_cfg_scale, int | float) or not math.isfinite(true_cfg_scale) or true_cfg_scale < 1:
            raise FastditError(f"true_cfg_scale must be a number >= 1, got {true_cfg_scale!r}")
        negatives = None
        if negative_prompt is not None:
            negatives = _as_list(negative_prompt, "negative_prompt")
            if len(negatives) == 1:
                negatives = negatives * len(prompts)
            elif len(negatives) != len(prompts):
                raise FastditError(
                    f"got {len(negatives)} negative prompts for {len(prompts)} prompts; give one or one per prompt"
                )
        num_images = len(prompts) * num_images_per_prompt
        seed = self._check_seed(seed, num_images)

        do_cfg = true_cfg_scale > 1 and negatives is not None
        if true_cfg_scale > 1 and negatives is None:
            log.warning("true_cfg_scale=%s has no effect without a negative prompt: CFG is off", true_cfg_scale)
        elif negatives is not None and not do_cfg:
            log.warning("negative prompt ignored: CFG needs true_cfg_scale > 1")
        check_lengths(self.tokenizer, prompts)
        if do_cfg:
            check_lengths(self.tokenizer, negatives, "negative prompt")

        # 1. Text: one encoder call for prompts and negatives, rows repeated per image (prompt-major).
        rows = encode_prompts(self.text_encoder, self.tokenizer, prompts + (negatives if do_cfg else []), self.device)
        rows = [r for r in rows for _ in range(num_images_per_prompt)]
        # (B', L, D) with B' = 2 * num_images under CFG: conditional rows first, then unconditional.
        txt, txt_mask = pad_embeds(rows, self.dtype)
        # Nothing padded: attention runs unmasked, its fast path. Padded: the valid lengths let attention
        # run one unmasked call per row instead of a masked batch (fastdit.attention).
        txt_lens = tuple(r.shape[0] for r in rows)
        if bool(txt_mask.all()):
            txt_mask, txt_lens = None, None
        _sync(self.device)
        t_text = time.perf_counter()

        # 2. Noise, packed into (B, N, C * 4) tokens; latent grid h x w, token grid h/2 x w/2.
        lat_h, lat_w = height // 8, width // 8
        noise = initial_noise(seed, (num_images, 1, self.latent_channels, lat_h, lat_w), self.dtype)
        latents = pack_latents(noise).to(self.device)
        img_shapes = [(1, lat_h // 2, lat_w // 2)] * txt.shape[0]
        rope = self.transformer.make_rope(img_shapes, txt.shape[1], self.device)
        sigmas = flow_match_sigmas(num_inference_steps, latents.shape[1], self.scheduler_config)
        # The reference feeds sigma as a timestep in [0, 1000] rounded to the latent dtype, then / 1000.
        timesteps = (sigmas[:num_inference_steps] * 1000).to(self.device, latents.dtype) / 1000
        # Every block's AdaLN vectors for all steps in one GEMM per layer (they depend on the timestep only).
        modulation = self.transformer.modulation_table(timesteps)

        # 3. Flow-match Euler sampling.
        # Every tensor the step reads is an argument, so a CUDA graph recorded in an earlier call with the same
        # shapes reads this call's text, mask and RoPE tables (copied into its inputs).
        key = (tuple(latents.shape), do_cfg, tuple(txt.shape), txt_mask is not None, txt_lens)
        step = self._step_fn(key, img_shapes, txt_lens)
        bar = None
        if show_progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=num_inference_steps, desc="denoising", unit="step")
        for i in range(num_inference_steps):
            timestep = timesteps[i].expand(txt.shape[0])
            x = torch.cat([latents, latents]) if do_cfg else latents
            velocity = step(x, txt, txt_mask, timestep, *rope, *modulation[i])
            if do_cfg:
                cond, uncond = velocity.chunk(2)
                velocity = guided_velocity(cond, uncond, true_cfg_scale)
            latents = euler_step(latents, velocity, sigmas[i], sigmas[i + 1])
            if bar is not None:
                bar.update()
            if progress is not None:
                progress(i + 1, num_inference_steps)
        if bar is not None:
            bar.close()
        _sync(self.device)
        t_denoise = time.perf_counter()

        # 4. VAE decode: undo the latent normalisation, decode the single frame.
        images = self._decode(unpack_latents(latents, lat_h, lat_w))
        _sync(self.device)
        t_end = time.perf_counter()
        self.last_timings = {
            "text_encode_s": t_text - t_start,
            "denoise_s": t_denoise - t_text,
            "denoise_s_per_step": (t_denoise - t_text) / num_inference_steps,
            "vae_decode_s": t_end - t_denoise,
            "total_s": t_end - t_start,
        }
        self.last_seeds = seed
        return to_pil(images)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, 1, h, w) normalised latents -> (B, 3, 8h, 8w) images in [-1, 1]."""
        cfg = self.vae.config
        latents = latents.to(self.vae.dtype)
        shape = (1, cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(cfg.latents_mean).view(shape).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(shape).to(latents.device, latents.dtype)
        latents = latents / inv_std + mean
        return self.vae.decode(latents, return_dict=False)[0][:, :, 0]

    @staticmethod
    def _check_seed(seed, num_images: int) -> int | list[int]:
        if seed is None:
            return secrets.randbits(63)
        seeds = seed if isinstance(seed, list) else [seed]
        for s in seeds:
            if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**64:
                raise FastditError(f"seed must be an integer in [0, 2**64), got {s!r}")
        if isinstance(seed, list) and len(seed) != num_images:
            raise FastditError(f"got {len(seed)} seeds for {num_images} images; give one seed or one per image")
        return seed
