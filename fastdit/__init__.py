"""fastdit: a fast inference engine for the Qwen-Image family of diffusion transformers."""

from fastdit.errors import CheckpointError, ConfigError, FastditError
from fastdit.loader import load_transformer
from fastdit.model import PRESETS, DiTConfig, QwenImageTransformer, compile_blocks

__all__ = [
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "DiTConfig",
    "FastditError",
    "QwenImagePipeline",
    "QwenImageTransformer",
    "compile_blocks",
    "load_transformer",
]


def __getattr__(name):
    # The pipeline pulls in transformers and diffusers: import it only when asked for.
    if name == "QwenImagePipeline":
        from fastdit.pipeline import QwenImagePipeline

        return QwenImagePipeline
    raise AttributeError(name)
