"""Shared fixtures: one tiny random-weight Qwen-Image pipeline folder per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """A FASTDIT_CACHE folder holding the tiny pipeline, so `--model tiny-random` finds it built."""
    from fastdit.tiny import default_cache_dir, tiny_pipeline_dir

    cache = tmp_path_factory.mktemp("fastdit-cache")
    tiny_pipeline_dir(cache / default_cache_dir().name)
    return cache


@pytest.fixture(scope="session")
def tiny_dir(tiny_cache):
    """The tiny pipeline folder (diffusers format, model_index.json at its root)."""
    from fastdit.tiny import default_cache_dir

    return tiny_cache / default_cache_dir().name


@pytest.fixture(scope="session")
def tiny_pipe(tiny_dir):
    """fastdit's pipeline on the tiny folder, float32 on CPU."""
    import torch

    from fastdit.pipelines.qwenimage import QwenImagePipeline

    return QwenImagePipeline.from_pretrained(tiny_dir, dtype=torch.float32, device="cpu")
