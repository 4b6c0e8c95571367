"""The step cache under tensor, sequence and CFG parallelism (gloo, 2 ranks): every rank takes the same decisions
and the image is the one-process cached image.

The pipeline is the tiny one with a 4-block DiT, so that front (1), middle (2) and back (1) segments all exist;
48x80 px gives 15 image tokens, which sequence parallelism pads to 16 (the padded token must not count).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.distributed as dist

from fastdit.cache import StepCache
from fastdit.parallel import ParallelState, launch, make_parallel_state

pytestmark = pytest.mark.dist

# The decisions at threshold 0.5 are clear: the measured changes sit 0.03 or more away from it.
CACHE = StepCache(front_blocks=1, back_blocks=1, threshold=0.5, warmup_steps=1, taylor_order=1)
ARGS = dict(negative_prompt=" ", height=48, width=80, num_inference_steps=8, true_cfg_scale=3.0, seed=7)
LAYOUTS = [(2, 1, 1), (1, 2, 1), (1, 1, 2)]


@pytest.fixture(scope="module")
def pipe4_dir(tiny_dir, tmp_path_factory):
    """The tiny pipeline folder with a 4-block transformer."""
    from diffusers import QwenImageTransformer2DModel

    from fastdit.tiny.common import TINY_TEXT_DIM

    folder = tmp_path_factory.mktemp("pipe4") / "pipe"
    shutil.copytree(tiny_dir, folder, ignore=shutil.ignore_patterns("transformer"))
    torch.manual_seed(11)
    dit = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=4,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TINY_TEXT_DIM,
        axes_dims_rope=(4, 6, 6),
    )
    dit.save_pretrained(folder / "transformer")
    return folder


def _cached_run(pipe) -> tuple[np.ndarray, int, list[int]]:
    """One cached call: its pixels, its cached-step count and the loop's list of cached steps."""
    loops, make = [], pipe.cached_loop
    pipe.cached_loop = lambda *a: loops.append(make(*a)) or loops[-1]
    out = pipe("a red fox in the snow", cache=CACHE, show_progress=False, **ARGS)
    return np.asarray(out[0]).astype(np.int16), out.cached_steps, loops[0].cached


def _with_dit(pipe, folder: str, state: ParallelState | None):
    """`pipe`'s text encoder, tokenizer and VAE (loaded once: the slow part) around the DiT of `folder`, sharded
    for `state`."""
    from fastdit.load import load_transformer
    from fastdit.pipelines.qwenimage import QwenImagePipeline

    dit = load_transformer(f"{folder}/transformer", dtype=torch.float32, device="cpu", parallel=state)
    return QwenImagePipeline(
        transformer=dit,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        vae=pipe.vae,
        scheduler_config=pipe.scheduler_config,
        device="cpu",
        dtype=torch.float32,
    )


def _worker(state: ParallelState, folder: str) -> dict:
    from fastdit.pipelines.qwenimage import QwenImagePipeline

    first = QwenImagePipeline.from_pretrained(folder, dtype=torch.float32, device="cpu", parallel=state)
    results = {}
    for layout in LAYOUTS:
        st = state if layout == (state.tp, state.sp, state.cfg) else make_parallel_state(*layout, state.device)
        pipe = first if st is state else _with_dit(first, folder, st)
        pixels, count, cached = _cached_run(pipe)
        every_rank = [None] * dist.get_world_size()
        dist.all_gather_object(every_rank, cached)
        results[layout] = (pixels, count, every_rank)
    return results


@pytest.fixture(scope="module")
def world2(pipe4_dir):
    return launch(_worker, str(pipe4_dir), tp=2, device="cpu", timeout_s=240)


@pytest.fixture(scope="module")
def reference(pipe4_dir, tiny_pipe):
    """The one-process cached run (the tiny pipeline's other parts are the same files)."""
    return _cached_run(_with_dit(tiny_pipe, str(pipe4_dir), None))


@pytest.mark.parametrize("layout", LAYOUTS, ids=["tp2", "sp2", "cfg2"])
def test_parallel_cached_image_matches_one_process(world2, reference, layout):
    """tp=2, sp=2 (padded tokens) and cfg-parallel cache the same steps on every rank as one process does, and
    draw its cached image within one 8-bit level."""
    expected, expected_count, expected_cached = reference
    assert 0 < expected_count < ARGS["num_inference_steps"] - 1  # both computed and cached steps after warm-up
    pixels, count, every_rank = world2[layout]
    assert count == expected_count
    assert every_rank == [expected_cached] * 2
    assert np.abs(pixels - expected).max() <= 1
