"""The rules every entry point applies to a request: one definition each, shared by the Python API, the CLI and
the server, so that the same input gets the same answer wherever it comes in.

Each check raises `InputError`, which names the field in the Python API's spelling (`true_cfg_scale`,
`num_inference_steps`, ...); the CLI and the server translate that name into their own (`--cfg-scale`, a JSON
field) when they report it. Nothing here imports torch at module level: the CLI checks its arguments before
anything heavy is loaded.
"""

from __future__ import annotations

import math
import secrets

from fastdit.errors import FastditError

# Pixels per packed latent token along each side: VAE 8x downsampling, then 2x2 patches. Image sides are
# multiples of it.
PIXELS_PER_TOKEN = 16
# Seeds are integers in [0, SEED_LIMIT); image i of a request seeded s uses (s + i) % SEED_LIMIT.
SEED_LIMIT = 2**63
MAX_STEPS = 1000
MAX_CFG_SCALE = 100.0
# --dtype / "dtype" spellings -> torch dtype names; "auto": bfloat16 on CUDA, float32 elsewhere.
DTYPE_NAMES = {
    "auto": None,
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "fp32": "float32",
    "float32": "float32",
}
# Sampling schedules a call may choose (fastdit.pipelines.scheduler.sampling_for) -> its steps when none are given:
# the checkpoint's own schedule, or the one the Qwen-Image-Lightning distilled LoRAs need (few steps, no CFG).
SCHEDULER_STEPS = {"checkpoint": 50, "lightning": 8}


class InputError(FastditError):
    """A request field with a bad value. `field` is its Python API name; str() is the whole sentence."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(value, field: str, minimum: int, maximum: int | None = None) -> int:
    if not _is_int(value) or value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise InputError(field, f"must be an integer {bound}, got {value!r}")
    return value


def check_size(height, width, max_side: int | None = None) -> tuple[int, int]:
    """Image height and width in pixels: positive multiples of 16, at most `max_side` when one is given."""
    for field, v in (("height", height), ("width", width)):
        if not _is_int(v) or v <= 0 or v % PIXELS_PER_TOKEN:
            raise InputError(field, f"must be a positive multiple of {PIXELS_PER_TOKEN}, got {v!r}")
        if max_side is not None and v > max_side:
            raise InputError(field, f"must be at most {max_side} pixels, got {v}")
    return height, width


def check_steps(steps) -> int:
    return check_int(steps, "num_inference_steps", 1, MAX_STEPS)


def check_scheduler(name) -> str:
    if not isinstance(name, str) or name not in SCHEDULER_STEPS:
        raise InputError("scheduler", f"must be one of {', '.join(SCHEDULER_STEPS)}, got {name!r}")
    return name


def check_cfg_scale(scale) -> float:
    """True CFG scale: a finite number in [1, 100]; 1 turns CFG off."""
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise InputError("true_cfg_scale", f"must be a number, got {scale!r}")
    if not 1 <= scale <= MAX_CFG_SCALE:
        raise InputError("true_cfg_scale", f"must be between 1 and {MAX_CFG_SCALE:g} (1 turns CFG off), got {scale!r}")
    return float(scale)


def check_seed(seed, num_images: int) -> int | list[int]:
    """None -> a random seed; an int in [0, 2**63); or one such int per image."""
    if seed is None:
        return secrets.randbelow(SEED_LIMIT)
    seeds = seed if isinstance(seed, list) else [seed]
    for s in seeds:
        if not _is_int(s) or not 0 <= s < SEED_LIMIT:
            raise InputError("seed", f"must be an integer in [0, 2**63), got {s!r}")
    if isinstance(seed, list) and len(seed) != num_images:
        raise InputError("seed", f"has {len(seed)} values for {num_images} images; give one seed or one per image")
    return seed


def image_seeds(first: int, count: int) -> list[int]:
    """The seeds of `count` images of a request seeded `first`: image i uses (first + i) mod 2**63."""
    return [(first + i) % SEED_LIMIT for i in range(count)]


def check_prompts(value, field: str = "prompt", allow_blank: bool = False) -> list[str]:
    """A string or a non-empty list of strings -> the list; blank ones only with `allow_blank` (a negative
    prompt of " " is the usual way to turn CFG on without steering away from anything)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(p, str) for p in items):
        raise InputError(field, "must be a string or a non-empty list of strings")
    if not allow_blank and any(not p.strip() for p in items):
        raise InputError(field, "must not be empty")
    if any(p == "" for p in items):
        raise InputError(field, "must not be the empty string (use ' ' for an empty negative prompt)")
    return items


def dtype_name(name: str, on_cuda: bool) -> str:
    """A dtype spelling (DTYPE_NAMES) -> the torch dtype's name; "auto" -> bfloat16 on CUDA, else float32."""
    if name not in DTYPE_NAMES:
        raise InputError("dtype", f"must be one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    return DTYPE_NAMES[name] or ("bfloat16" if on_cuda else "float32")


# Reference images of an edit: each is resized to a pixel area (`vae_image_area`, `vl_image_area`) before encoding.
MIN_IMAGE_AREA = 32 * 32
MAX_IMAGE_AREA = 2048 * 2048


def check_image_area(value, field: str) -> int:
    """A pixel area reference images are resized to: an integer in [32 * 32, 2048 * 2048]."""
    return check_int(value, field, MIN_IMAGE_AREA, MAX_IMAGE_AREA)


def check_image_count(count: int, max_images: int) -> int:
    """The number of reference images of an edit: 1 to `max_images` (what the model's layout takes)."""
    if count < 1:
        raise InputError("image", "must be one image or a non-empty list of images")
    if count > max_images:
        plural = "image" if max_images == 1 else "images"
        raise InputError("image", f"has {count} images; this model takes at most {max_images} {plural}")
    return count


def decode_image(data: bytes, field: str, max_pixels: int | None = None):
    """Encoded image bytes (a file's, an upload's) -> a decoded PIL image, its mode and EXIF kept (the pipelines
    convert it). InputError naming `field` when the bytes are no image PIL reads, a truncated or corrupt one, or one
    of more than `max_pixels` pixels (read from the header, before anything is decoded)."""
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InputError(field, "is not an image (PNG, JPEG, WebP, ... as PIL reads them)") from None
    except Image.DecompressionBombError as e:
        raise InputError(field, f"is too large to decode ({e})") from None
    except Exception as e:  # a malformed header: PIL raises what its format plugin meets
        raise InputError(field, f"is not a readable image ({type(e).__name__}: {e})") from None
    if max_pixels is not None and image.width * image.height > max_pixels:
        raise InputError(field, f"is {image.width}x{image.height} pixels; at most {max_pixels} pixels are accepted")
    try:
        image.load()
    except Exception as e:  # truncated or corrupt data; the message says which
        raise InputError(field, f"is a truncated or corrupt image ({type(e).__name__}: {e})") from None
    return image
