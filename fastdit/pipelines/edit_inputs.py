"""Reference images of an edit: checked, converted to RGB, and sized for the VL encoder and the VAE.

Sizing follows the reference pipelines: an image of aspect ratio r = w / h is resized to a pixel area A as
width = sqrt(A * r), height = width / r, each rounded to a multiple of 32 (Python's round: half to even), with
PIL's LANCZOS filter from the original image. The VL processor then snaps the encoder image to multiples of
28 px itself (bicubic). Inputs are converted as `diffusers.utils.load_image` does: EXIF orientation applied,
then PIL's `convert("RGB")` (alpha dropped, grayscale replicated, palettes looked up).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageOps

from fastdit.validation import InputError, check_image_count

# The VL processor refuses images whose long side is this many times the short one.
MAX_ASPECT = 200
ORIENTATION_TAG = 0x0112  # EXIF "Orientation"


def calculate_dimensions(area: int, ratio: float) -> tuple[int, int]:
    """(width, height) of about `area` pixels at aspect ratio `ratio` (w / h), each a multiple of 32."""
    width = math.sqrt(area * ratio)
    height = width / ratio
    return round(width / 32) * 32, round(height / 32) * 32


def reference_images(image, max_images: int) -> list[Image.Image]:
    """`image` (one PIL image or a list of them) -> RGB images, checked: InputError naming `image`."""
    images = image if isinstance(image, list | tuple) else [image]
    check_image_count(len(images), max_images)
    out = []
    for k, im in enumerate(images):
        which = f"image {k}" if len(images) > 1 else "image"
        if not isinstance(im, Image.Image):
            raise InputError("image", f"must be PIL images; {which} is a {type(im).__name__}")
        if min(im.size) < 1:
            raise InputError("image", f"{which} is empty ({im.width}x{im.height})")
        out.append(ImageOps.exif_transpose(im).convert("RGB"))
    return out


def oriented_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of `image` once its EXIF orientation is applied (as `reference_images` does), read from the
    header alone: orientations 5 to 8 turn the image by a quarter."""
    turned = image.getexif().get(ORIENTATION_TAG, 1) in (5, 6, 7, 8)
    return (image.height, image.width) if turned else (image.width, image.height)


def sized(image: Image.Image, area: int, field: str, k: int) -> tuple[int, int]:
    """(width, height) of reference image k (EXIF orientation applied) at `area` pixels; InputError when a side
    would vanish."""
    w, h = oriented_size(image)
    width, height = calculate_dimensions(area, w / h)
    if min(width, height) < 32 or max(width, height) >= MAX_ASPECT * min(width, height):
        raise InputError(
            "image",
            f"image {k} is {w}x{h}: too elongated to resize to {field}={area} pixels "
            f"(it would be {width}x{height}; each side must come out at least 32 px, within 1:{MAX_ASPECT})",
        )
    return width, height


def resize(image: Image.Image, width: int, height: int) -> Image.Image:
    return image.resize((width, height), resample=Image.LANCZOS)


def to_pixels(image: Image.Image) -> torch.Tensor:
    """An RGB image -> (1, 3, H, W) float32 in [-1, 1] (value / 255 * 2 - 1, as the reference's image processor)."""
    x = np.asarray(image).astype(np.float32) / 255.0
    return torch.from_numpy(x).permute(2, 0, 1)[None] * 2.0 - 1.0
