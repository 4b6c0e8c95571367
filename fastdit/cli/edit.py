"""`fastdit edit`: reference images and a prompt -> edited images, written to files.

    fastdit edit --model Qwen/Qwen-Image-Edit-2511 --image a.png [--image b.png ...] --prompt "..." --output out.png

It runs the image-editing folders (Qwen-Image-Edit: one image; Edit-2509 / Edit-2511: up to three) and Qwen-Image
2.1 folders (condition images). The flags of `fastdit generate` that apply are the same flags, checked and run by
the same code (fastdit.cli.generate: `add_run_arguments`, `prepare`, `start`); the size defaults to the pipeline's
choice from the images. Before any model loads, every --image is read and decoded, the folder's pipeline is known
to take that many images, and each flag suits that pipeline; a bad one exits 2 with one line naming it. Images keep
their mode here: the pipeline converts them (RGBA, grayscale and palette images as diffusers' `load_image` does).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from fastdit.cli.common import IMAGE_AREAS, add_model_arguments, flag_error, integer, resolve_model
from fastdit.cli.generate import add_run_arguments, prepare, start
from fastdit.cli.memory import add_memory_arguments
from fastdit.errors import FastditError
from fastdit.validation import InputError, check_image_area, decode_image

AREA_HELP = {
    "vae_image_area": "pixels each reference image is resized to for the VAE (Qwen-Image-Edit: for the text encoder "
    "too), at its aspect ratio; an output without --height / --width has this area too (default: 1048576 = 1024^2)",
    "vl_image_area": "pixels each reference image is resized to for the Qwen2.5-VL text encoder (Edit-2509 / 2511; "
    "default: 147456 = 384^2)",
}
EDIT_FOLDERS = "Qwen-Image-Edit, Edit-2509, Edit-2511 or Qwen-Image 2.1"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "edit",
        help="edit images as a prompt says",
        description=(
            f"Edit images with a {EDIT_FOLDERS} pipeline: images match diffusers' QwenImageEditPipeline / "
            "QwenImageEditPlusPipeline for the same seed. Prompts longer than the text encoder's limit are refused."
        ),
    )
    add_model_arguments(p)
    add_memory_arguments(p)
    p.add_argument(
        "--image",
        action="append",
        required=True,
        metavar="FILE",
        help="a reference image (PNG, JPEG, WebP, ...); repeat for several (Edit-2509 / 2511: up to 3, in order)",
    )
    add_image_area_arguments(p)
    add_run_arguments(p, prompt_help="what to change", size_default=None)
    p.set_defaults(func=edit_main)
    return p


def add_image_area_arguments(parser) -> None:
    """--vae-image-area and --vl-image-area (edit and serve)."""
    for name in IMAGE_AREAS:
        text = AREA_HELP[name]
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=integer, default=None, metavar="PIXELS", help=text)


def check_image_area_arguments(args: argparse.Namespace) -> dict[str, int]:
    """The areas given, checked: {name: pixels} (the pipelines' keyword arguments; `ModelOptions.image_areas`)."""
    areas = {name: getattr(args, name) for name in IMAGE_AREAS if getattr(args, name) is not None}
    try:
        for name, value in areas.items():
            check_image_area(value, name)
    except InputError as e:
        raise flag_error(e) from None
    return areas


def check_area_flags(cls, areas) -> None:
    """--vae-image-area / --vl-image-area only for the edit pipelines (`cls`: the folder's pipeline class)."""
    from fastdit.pipelines.edit import EditPipeline

    if areas and not issubclass(cls, EditPipeline):
        flag = "--" + next(iter(areas)).replace("_", "-")
        raise FastditError(f"{flag} is for the Qwen-Image-Edit pipelines; {cls.__name__} does not take it")


def read_image_file(path: str):
    """--image PATH -> the decoded PIL image; FastditError naming the file when it is missing, unreadable or no
    image."""
    file = Path(path)
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        raise FastditError(f"--image {path}: no such file") from None
    except IsADirectoryError:
        raise FastditError(f"--image {path} is a folder; give an image file") from None
    except OSError as e:
        raise FastditError(f"--image {path}: cannot read it ({e.strerror or e})") from None
    return decode_image(data, f"--image {path}")


def check_edit_model(cls, model: str, paths: list[str], images: list, areas: dict, args: argparse.Namespace) -> None:
    """The folder's pipeline class takes these images and these flags; FastditError naming the model, the file or
    the flag otherwise."""
    from fastdit.pipelines.edit import EditPipeline
    from fastdit.pipelines.edit_inputs import sized

    if cls.max_images == 0:
        raise FastditError(f"--model {model} is a text-to-image pipeline ({cls.__name__}); edit needs {EDIT_FOLDERS}")
    if cls.max_images is not None and len(images) > cls.max_images:
        plural = "image" if cls.max_images == 1 else "images"
        raise FastditError(
            f"--image {paths[cls.max_images]}: {cls.__name__} takes at most {cls.max_images} {plural}, "
            f"{len(images)} were given"
        )
    check_area_flags(cls, areas)
    if not issubclass(cls, EditPipeline):  # Qwen-Image 2.1: sized by its output resolution, its own schedule
        if args.scheduler != "checkpoint":
            raise FastditError(
                f"--scheduler {args.scheduler} is for the Qwen-Image-Edit pipelines; {cls.__name__} does not take it"
            )
        return
    from fastdit.pipelines.edit import DEFAULT_VAE_IMAGE_AREA, DEFAULT_VL_IMAGE_AREA, QwenImageEditPlusPipeline

    sizes = {"vae_image_area": areas.get("vae_image_area", DEFAULT_VAE_IMAGE_AREA)}
    if issubclass(cls, QwenImageEditPlusPipeline):
        sizes["vl_image_area"] = areas.get("vl_image_area", DEFAULT_VL_IMAGE_AREA)
    for k, (path, image) in enumerate(zip(paths, images, strict=True)):
        for field, area in sizes.items():
            try:
                sized(image, area, field, k)
            except InputError as e:
                raise FastditError(f"--image {path}: {e.problem}") from None


def edit_main(args: argparse.Namespace) -> int:
    from fastdit.pipelines import pipeline_class

    areas = check_image_area_arguments(args)
    images = [read_image_file(path) for path in args.image]
    folder = resolve_model(args.model)  # once: the folder's pipeline class decides what the flags may be
    check_edit_model(pipeline_class(folder), args.model, args.image, images, areas, args)
    run = prepare(args, images=tuple(images))
    return start(replace(run, model=str(folder)), args)
