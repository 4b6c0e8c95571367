"""`fastdit generate`: images from a text prompt, written to files.

The arguments become one `GenerateRun` (checked: sizes, steps, seeds, output paths, device flags) before any
model work; `run_generate` runs it in this process or, with --tp / --sp / --cfg-parallel, on every rank that
fastdit.parallel.launch starts (rank 0 alone prints and writes). `fastdit edit` (fastdit.cli.edit) shares the
flags (`add_run_arguments`), their checks (`prepare`), the launch (`start`) and the run, with reference images.
"""

from __future__ import annotations

import argparse
import json
import secrets
import time
from dataclasses import dataclass, replace
from pathlib import Path

from fastdit.cache.cli import add_cache_arguments, check_cache_fits
from fastdit.cli.common import (
    ModelOptions,
    add_model_arguments,
    add_parallel_arguments,
    check_model_options,
    check_writable_file,
    flag_error,
    integer,
    note,
    number,
    output_paths,
    parallel_degrees,
    parallel_requested,
    resolve_model,
    torch_device,
    torch_dtype,
)
from fastdit.cli.lora import add_lora_arguments, apply_loras, check_lora_flags, read_loras
from fastdit.cli.memory import add_memory_arguments, memory_plan
from fastdit.cli.scheduler import add_scheduler_arguments, scheduler_notes
from fastdit.errors import FastditError
from fastdit.validation import (
    PIXELS_PER_TOKEN,
    SEED_LIMIT,
    InputError,
    check_cfg_scale,
    check_int,
    check_prompts,
    check_size,
    check_steps,
    image_seeds,
)


@dataclass(frozen=True)
class GenerateRun:
    """One `fastdit generate`, checked: what to draw, where the images go, how to run the model."""

    model: str  # as given; resolved to a folder once, before any rank starts
    options: ModelOptions
    prompt: str
    negative_prompt: str | None
    height: int | None  # None (edit): the pipeline's default for the images
    width: int | None
    steps: int | None  # None: the pipeline's default (its folder's sampling grid, if it has one)
    cfg_scale: float | None
    seeds: list[int]
    paths: list[Path]
    timings_json: Path | None = None
    scheduler: str = "checkpoint"
    images: tuple = ()  # edit: the reference / condition images (PIL, read and checked), given as `image=`


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate",
        help="generate images from a text prompt",
        description=(
            "Generate images with a Qwen-Image pipeline. Images match diffusers' QwenImagePipeline for the same "
            "seed. Prompts longer than the text encoder's limit (512 tokens including the chat template's answer "
            "header) are refused, not truncated."
        ),
    )
    add_model_arguments(p)
    add_memory_arguments(p)
    add_run_arguments(p, prompt_help="what to draw", size_default=1024)
    p.set_defaults(func=generate_main)
    return p


def add_run_arguments(p: argparse.ArgumentParser, *, prompt_help: str, size_default: int | None) -> None:
    """The flags of a sampling run that generate and edit share: prompt, size, steps, schedule, CFG, seed, number of
    images, outputs, step cache, parallelism, LoRA. `size_default`: --height / --width when not given (None: the
    pipeline's choice from the reference images)."""
    p.add_argument("--prompt", required=True, help=prompt_help)
    p.add_argument(
        "--negative-prompt",
        default=None,
        help="what to avoid; true CFG runs only with a negative prompt (use ' ' for an empty one), as in diffusers",
    )
    size = f"({size_default})" if size_default else "(default: the reference image's aspect ratio at its area)"
    p.add_argument(
        "--height", type=integer, default=size_default, help=f"image height in pixels, a multiple of 16 {size}"
    )
    p.add_argument(
        "--width", type=integer, default=size_default, help=f"image width in pixels, a multiple of 16 {size}"
    )
    p.add_argument(
        "--steps",
        type=integer,
        default=None,
        help="denoising steps (default: the pipeline's: 50 for Qwen-Image, 8 with --scheduler lightning, 40 for "
        "Qwen-Image 2.1; a folder with sample_sigmas, such as 2.1 Turbo, uses its own grid)",
    )
    add_scheduler_arguments(p)
    p.add_argument(
        "--cfg-scale",
        type=number,
        default=None,
        help="true CFG scale, 1 to 100; CFG runs only with --negative-prompt (default: 4.0 with a negative "
        "prompt, off without one)",
    )
    p.add_argument(
        "--seed",
        type=integer,
        default=None,
        help="seed of image 0, in [0, 2**63); image i uses seed + i, so each image is reproducible alone "
        "(default: random)",
    )
    p.add_argument("--num-images", type=integer, default=1, help="images to generate (default: 1)")
    p.add_argument(
        "--output",
        default="fastdit.png",
        help="image file (several images: NAME-0.png, NAME-1.png, ...) or a folder (ends with / or exists) "
        "(default: fastdit.png)",
    )
    p.add_argument("--timings-json", default=None, metavar="FILE", help="also write stage timings as JSON")
    add_cache_arguments(p)
    add_parallel_arguments(p, "parallelism (one process per GPU; gloo on CPU)")
    add_lora_arguments(p)


def prepare(args: argparse.Namespace, **images) -> GenerateRun:
    """The arguments checked and turned into a run; every user error is raised here, before any loading.
    `images`: an edit's `images` (a GenerateRun field), read and checked by the caller."""
    steps = args.steps  # None: the pipeline's default for its schedule
    try:
        check_prompts(args.prompt)
        if args.negative_prompt is not None:
            check_prompts(args.negative_prompt, "negative_prompt", allow_blank=True)
        # An unset side (edit only) is the pipeline's to choose from the images: any valid value stands in for it.
        unset = PIXELS_PER_TOKEN
        check_size(unset if args.height is None else args.height, unset if args.width is None else args.width)
        if steps is not None:
            check_steps(steps)
        cfg = None if args.cfg_scale is None else check_cfg_scale(args.cfg_scale)
        check_int(args.num_images, "num_images_per_prompt", 1, 64)
        if args.seed is not None:
            check_int(args.seed, "seed", 0, SEED_LIMIT - 1)
    except InputError as e:
        raise flag_error(e) from None
    negative = args.negative_prompt
    # Said here with the flags' names; the pipeline then gets a consistent pair and has nothing to warn about.
    if cfg is not None and cfg > 1 and negative is None:
        note(f"--cfg-scale {args.cfg_scale:g} has no effect without --negative-prompt: CFG is off")
        cfg = None
    elif cfg == 1 and negative is not None:
        note("--negative-prompt has no effect with --cfg-scale 1: CFG is off")
        negative = None
    for line in scheduler_notes(args.scheduler, negative, cfg):
        note(line)  # the Lightning schedule without a scale > 1: the negative prompt is not used
        negative = None
    first = args.seed if args.seed is not None else secrets.randbelow(SEED_LIMIT)
    seeds = image_seeds(first, args.num_images)
    paths = output_paths(args.output, args.num_images, seeds)
    timings = Path(args.timings_json) if args.timings_json else None
    if timings is not None:
        check_writable_file(timings, "--timings-json")
    options = ModelOptions.from_args(args)
    check_model_options(options, args.tp, args.sp)
    check_lora_flags(options.loras, options.fuse_lora)
    return GenerateRun(
        args.model, options, args.prompt, negative, args.height, args.width, steps,
        cfg, seeds, paths, timings, scheduler=args.scheduler, **images,
    )  # fmt: skip


def generate_main(args: argparse.Namespace) -> int:
    return start(prepare(args), args)


def start(run: GenerateRun, args: argparse.Namespace) -> int:
    """Run `run` here, or on every rank of the parallel layout the arguments ask for."""
    tp, sp, cfg = parallel_degrees(args)
    if parallel_requested(tp, sp, cfg):
        from fastdit.load import read_config
        from fastdit.parallel import check_parallel_config, launch
        from fastdit.parallel.launch import check_world, device_type

        check_world(tp, sp, cfg, device_type(run.options.device))  # before any download or load
        folder = resolve_model(run.model)  # once, here: a Hub download must not race between ranks
        check_parallel_config(read_config(folder), tp, sp)
        read_loras(run.options.loras, folder)  # a bad LoRA stops here, before any rank starts
        run = replace(run, model=str(folder))
        return launch(_rank, run, tp=tp, sp=sp, cfg=cfg, device=run.options.device, master_port=args.master_port)
    return run_generate(run)


def _rank(state, run: GenerateRun) -> int:
    import torch.distributed as dist

    if dist.is_initialized():  # under torchrun each process drew its own random seed: take rank 0's
        box = [run.seeds]
        dist.broadcast_object_list(box, src=0)
        run = replace(run, seeds=box[0])
    return run_generate(run, state)


def run_generate(run: GenerateRun, parallel=None) -> int:
    """Load the pipeline, draw the images, write them (rank 0 only under `parallel`)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from fastdit.pipelines import load_pipeline, pipeline_class

    main = parallel is None or parallel.is_main
    # Our own bar covers the denoising steps; the libraries' per-file loading bars are noise here.
    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    device = parallel.device if parallel is not None else torch_device(run.options.device)
    dtype = torch_dtype(run.options.dtype, run.options.device)
    folder = resolve_model(run.model)
    if not run.images and pipeline_class(folder).needs_image:
        raise FastditError(f"--model {run.model} edits images: give them with fastdit edit --image FILE ...")
    loras = read_loras(run.options.loras, folder)  # read and checked before the pipeline loads
    check_cache_fits(run.options.cache, folder)
    cfg = run.negative_prompt is not None and (run.cfg_scale is None or run.cfg_scale > 1)
    size = dict(height=run.height, width=run.width, images=len(run.seeds), cfg=cfg, references=len(run.images))
    plan = memory_plan(run.options, folder, device=device, dtype=dtype, parallel=parallel, **size)
    t0 = time.perf_counter()
    pipe = load_pipeline(
        folder,
        dtype=dtype,
        device=device,
        parallel=parallel,
        quantize=run.options.quantize,
        attention=run.options.attention,
        **({} if plan is None else {"memory": plan}),
    )
    apply_loras(pipe, run.options.loras, run.options.fuse_lora, loras)
    if run.options.compile:
        pipe.compile()
    if run.options.cuda_graph:
        pipe.enable_cuda_graph()
    if run.options.cache is not None:
        pipe.enable_step_cache(run.options.cache)
    load_s = time.perf_counter() - t0
    if main:
        print(f"fastdit: loaded {folder} in {load_s:.1f} s ({pipe.device}, {str(dtype).removeprefix('torch.')})")
    edit = {"image": list(run.images), **dict(run.options.image_areas)} if run.images else {}
    images = pipe(
        prompt=run.prompt,
        **edit,
        negative_prompt=run.negative_prompt,
        height=run.height,
        width=run.width,
        **({} if run.steps is None else {"num_inference_steps": run.steps}),
        true_cfg_scale=run.cfg_scale,
        seed=run.seeds,
        num_images_per_prompt=len(run.seeds),
        scheduler=run.scheduler,
        show_progress=main,
    )
    if main:
        write_images(run, images, load_s, str(pipe.device), str(dtype))
    return 0


def write_images(run: GenerateRun, images, load_s: float, device: str, dtype: str) -> None:
    for path, image, seed in zip(run.paths, images, run.seeds, strict=True):
        try:
            image.save(path)
        except OSError as e:
            raise FastditError(f"cannot write {path}: {e.strerror or e}") from None
        print(f"wrote {path} ({image.width}x{image.height}, seed {seed})")
    t = images.timings
    print(f"text encoding  {t['text_encode_s']:8.3f} s")
    if "vae_encode_s" in t:  # edit: the reference images' latents
        print(f"VAE encode     {t['vae_encode_s']:8.3f} s")
    if "prefill_s" in t:  # Qwen-Image 2.1: the prefix K/V, computed once per image
        print(f"prefix prefill {t['prefill_s']:8.3f} s")
    cached = f", {images.cached_steps} cached" if run.options.cache is not None else ""
    print(
        f"denoising      {t['denoise_s']:8.3f} s  ({images.steps} steps{cached}, {t['denoise_s_per_step']:.3f} s/step)"
    )
    print(f"VAE decode     {t['vae_decode_s']:8.3f} s")
    if run.timings_json is not None:
        record = {"load_s": load_s, **t, "steps": images.steps, "height": images[0].height, "width": images[0].width}
        record["cached_steps"] = images.cached_steps
        record |= {"num_images": len(run.seeds), "seeds": run.seeds, "device": device, "dtype": dtype}
        run.timings_json.write_text(json.dumps(record, indent=2) + "\n")
