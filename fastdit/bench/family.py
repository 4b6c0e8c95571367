"""Which DiT `fastdit bench --stage dit` times: Qwen-Image (the default) or Qwen-Image 2.1, and the size of 2.1's
prefix. Its flags are declared here (no torch at import: the parser stays fast); fastdit.bench.dit21 measures 2.1."""

from __future__ import annotations

FAMILIES = ("qwen-image", "qwen-image-2.1")
QWEN21 = "qwen-image-2.1"


def add_family_arguments(parser) -> None:
    """--family and --condition-images."""
    parser.add_argument(
        "--family",
        choices=FAMILIES,
        default="qwen-image",
        help="the DiT architecture (--preset qwen-image is the family's full size, tiny its test size); "
        "qwen-image-2.1 also times the prefix prefill, once per image",
    )
    parser.add_argument(
        "--condition-images",
        type=int,
        default=0,
        help="qwen-image-2.1: condition images in the prefix, each of --height x --width (their latent tokens join "
        "the --text-len text tokens; default 0: text-to-image)",
    )


def model_config(family: str, preset: str):
    """The DiT config the bench builds for `family` at `preset` ("qwen-image": the family's full size, or "tiny")."""
    if family == QWEN21:
        from fastdit.models.qwenimage21 import PRESETS as PRESETS21

        return PRESETS21[QWEN21 if preset == "qwen-image" else preset]
    from fastdit.models.qwenimage import PRESETS

    return PRESETS[preset]
