"""The pipelines, one class per task, and `load_pipeline`, which picks the class a folder's model_index.json names.

Shared pieces: `folder` (checking a pipeline folder before loading), `text` (prompt encoding), `scheduler`
(flow-match sigmas), `latents` (noise, packing, VAE normalisation), `loop` (the denoising loop and a call's
result), `base` (the DiT's fast paths).
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from fastdit.errors import CheckpointError
from fastdit.pipelines.folder import read_model_index

# model_index.json _class_name -> (module, class) of the fastdit pipeline that runs it.
PIPELINES = {
    "QwenImagePipeline": ("fastdit.pipelines.qwenimage", "QwenImagePipeline"),
    "QwenImage21Pipeline": ("fastdit.pipelines.qwenimage21", "QwenImage21Pipeline"),
    "QwenImageEditPipeline": ("fastdit.pipelines.edit", "QwenImageEditPipeline"),
    "QwenImageEditPlusPipeline": ("fastdit.pipelines.edit", "QwenImageEditPlusPipeline"),
}


def pipeline_class(path: str | os.PathLike) -> type:
    """The fastdit pipeline class for a diffusers-format folder; CheckpointError naming an unknown class."""
    root = Path(path)
    name = read_model_index(root)["_class_name"]
    if name not in PIPELINES:
        raise CheckpointError(
            f"{root / 'model_index.json'}: pipeline class {name!r} is not one fastdit runs "
            f"(supported: {', '.join(PIPELINES)})"
        )
    module, cls = PIPELINES[name]
    return getattr(importlib.import_module(module), cls)


def load_pipeline(path: str | os.PathLike, **kwargs):
    """Load the pipeline folder `path` with the class its model_index.json names; `kwargs` go to that class's
    `from_pretrained` (dtype, device, parallel, quantize, attention)."""
    return pipeline_class(path).from_pretrained(path, **kwargs)
