"""`--memory`: the memory plan of `generate`, `edit` and `serve` (fastdit.memory), and the plan a run gets from it."""

from __future__ import annotations

from fastdit.cli.common import note

MEMORY_HELP = (
    "where the weights live (default: auto): full = every part on the GPU; offload-text = the text encoder in "
    "host memory, on the GPU only while it encodes, and the VAE decoding in tiles when a whole image would not fit; "
    "offload-blocks = also the DiT's modulation in host memory and as many DiT blocks on the GPU as fit, the rest "
    "streamed from pinned host memory ahead of use; auto = the first that fits the GPU's free memory (one line says "
    "which). A plan that cannot fit is refused before any weight is read"
)


def add_memory_arguments(parser) -> None:
    parser.add_argument(
        "--memory", choices=["auto", "full", "offload-text", "offload-blocks"], default="auto", help=MEMORY_HELP
    )


def memory_plan(
    options, folder, *, device, dtype, parallel=None, height=1024, width=1024, images=1, cfg=True, references=None
):
    """The MemoryPlan (or None) for a run's ModelOptions on the pipeline folder `folder`; `auto` says its choice
    in one line. Raises fastdit.memory.PlanError (one line) when the asked plan cannot fit, or is not one the
    folder's pipeline runs (its `memory_plans`: Qwen-Image 2.1 keeps its DiT resident).

    An edit pipeline's plan holds `references` reference images (None: as many as the pipeline takes, the server's
    worst case) at the run's --vae-image-area; an unset height / width (None) is the output at that area too."""
    if options.memory is None:
        return None
    import math
    from pathlib import Path

    import torch

    from fastdit.checkpoint import default_device
    from fastdit.memory import Workload, plan_memory
    from fastdit.pipelines import pipeline_class

    cls = pipeline_class(folder)
    device = torch.device(device) if device is not None else default_device()
    extra = {}
    if cls.max_images:  # an edit pipeline: the references' tokens ride along with the image tokens
        from fastdit.pipelines.edit import DEFAULT_VAE_IMAGE_AREA

        area = dict(options.image_areas).get("vae_image_area", DEFAULT_VAE_IMAGE_AREA)
        count = cls.max_images if references is None else references
        extra = {"reference_tokens": count * area // 256, "reference_pixels": area}
        side = math.isqrt(area) // 16 * 16  # the output's default area, as a square
        height, width = height or side, width or side
    height, width = height or 1024, width or 1024  # Qwen-Image 2.1 without a size: its default output resolution
    workload = Workload(height=height, width=width, images=images, cfg=cfg, **extra)
    return plan_memory(
        options.memory,
        Path(folder),
        dtype=dtype,
        device=device,
        quantize=options.quantize,
        workload=workload,
        parallel=parallel,
        say=note,
        order=cls.memory_plans,
    )
