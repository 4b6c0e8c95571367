"""fastdit: a fast inference engine for the Qwen-Image family of diffusion transformers.

The public names below are imported on first use, so `import fastdit` (and `fastdit --help`) stay light:
torch, transformers, diffusers, inductor and Triton load only when a model does.
"""

from __future__ import annotations

import importlib

from fastdit.errors import CheckpointError, ConfigError, FastditError

# name -> the module that defines it
_LAZY = {
    "load_pipeline": "fastdit.pipelines",
    "QwenImagePipeline": "fastdit.pipelines.qwenimage",
    "QwenImageEditPipeline": "fastdit.pipelines.edit",
    "QwenImageEditPlusPipeline": "fastdit.pipelines.edit",
    "load_transformer": "fastdit.load",
    "QwenImageTransformer": "fastdit.models.qwenimage",
    "DiTConfig": "fastdit.models.qwenimage",
    "PRESETS": "fastdit.models.qwenimage",
    "compile_blocks": "fastdit.runtime.compile",
    "StepCache": "fastdit.cache.config",
}

__all__ = ["CheckpointError", "ConfigError", "FastditError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastdit' has no attribute {name!r}")
