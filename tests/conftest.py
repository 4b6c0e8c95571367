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


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory):
    """kind -> the tiny pipeline folder of that kind (fastdit.tiny.TINY_KINDS), built on first use."""
    from fastdit.tiny import tiny_pipeline_dir

    root = tmp_path_factory.mktemp("tiny-kinds")
    return lambda kind: tiny_pipeline_dir(root / kind, kind=kind)


@pytest.fixture(scope="session")
def tiny_pipes(tiny_folders):
    """kind -> fastdit's pipeline on that tiny folder (load_pipeline), float32 on the CPU, loaded once per session."""
    import torch

    from fastdit import load_pipeline

    loaded = {}

    def get(kind):
        if kind not in loaded:
            loaded[kind] = load_pipeline(tiny_folders(kind), dtype=torch.float32, device="cpu")
        return loaded[kind]

    return get
