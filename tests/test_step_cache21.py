"""The step cache on Qwen-Image 2.1's single-stream DiT (prefix K/V computed once per image): the pipeline's
invariants, a cached step's meaning checked block by block, compiled segments, the CLI. The parallel layouts are in
tests/test_qwenimage21_parallel.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastdit import StepCache, load_transformer
from fastdit.cache.loop import CachedLoop, Workspace
from fastdit.models.qwenimage21_layout import prefix_layout
from tests.dit_utils import save_random_q21
from tests.test_qwenimage21_parallel import CONFIG, make_case

KW = dict(height=64, width=64, num_inference_steps=8, show_progress=False)
CFG = dict(negative_prompt="blurry", true_cfg_scale=4.0)


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images]).astype(np.int16)


@pytest.fixture(scope="module")
def pipe(tiny_folders):
    from fastdit import load_pipeline

    return load_pipeline(tiny_folders("qwen-image-2.1"), dtype=torch.float32, device="cpu")


def test_threshold_zero_changes_no_bit_and_inf_caches_after_warmup(pipe):
    """With CFG: threshold 0 runs the segments and gives the uncached image bit for bit; threshold inf with 2
    warm-up steps caches the other 6 of 8; max_consecutive_cached=2 computes every third step after warm-up; the
    pipeline's default cache (enable_step_cache) applies to every call, a call's own cache overrides it."""
    plain = pipe("a red fox", seed=2, **CFG, **KW)
    never = pipe("a red fox", seed=2, cache=StepCache(front_blocks=1, threshold=0.0), **CFG, **KW)
    assert never.cached_steps == 0 and np.array_equal(_pixels(never), _pixels(plain))
    always = pipe("a red fox", cache=StepCache(front_blocks=1, threshold=math.inf, warmup_steps=2), **CFG, **KW)
    assert always.cached_steps == 6
    capped = StepCache(front_blocks=1, threshold=math.inf, warmup_steps=2, max_consecutive_cached=2)
    assert pipe("a red fox", cache=capped, **KW).cached_steps == 4  # steps 2, 3, 5, 6
    pipe.enable_step_cache(StepCache(front_blocks=1, threshold=math.inf, warmup_steps=1))
    try:
        assert pipe("a red fox", **KW).cached_steps == 7
        assert pipe("a red fox", cache=StepCache(front_blocks=1, threshold=0.0), **KW).cached_steps == 0
    finally:
        pipe.enable_step_cache(None)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A 2-block 2.1 DiT (4 heads x 16) with random N(0, 0.2) weights."""
    path = tmp_path_factory.mktemp("q21-cache")
    save_random_q21(path, CONFIG)
    return load_transformer(path, dtype=torch.float32, device="cpu")


def _prefill(model, case):
    layout = prefix_layout(case["slots"], case["cond_grids"])
    prefix_rope, noise_rope = model.make_rope(layout, case["grid"])
    return model.prefill(case["text"], case["mask"], case["cond"], layout, prefix_rope), noise_rope


def _steps(model, loop, case, prefix, rope, n):
    return [model(case["noise"][i % 2], case["t"][i % 2], prefix, rope, step_cache=loop) for i in range(n)]


@torch.no_grad()
def test_a_cached_step_adds_the_stored_middle_residual(model):
    """F1B0 with threshold inf: step 0 computes, step 1 is cached; its output is the final layer over block 0's
    output plus step 0's (block 1 output - block 0 output), computed here block by block."""
    case = make_case()
    prefix, rope = _prefill(model, case)
    loop = CachedLoop(StepCache(front_blocks=1, back_blocks=0, threshold=math.inf, warmup_steps=1), 2)
    outs = _steps(model, loop, case, prefix, rope, 2)
    assert loop.cached == [1]

    def block(i, x, mod):
        return model.blocks[i](x, mod, rope, prefix.k[i], prefix.v[i], prefix.lens)

    mod0, mod1 = model.modulation(case["t"][0]), model.modulation(case["t"][1])
    front0 = block(0, model.img_in(case["noise"][0]), mod0)
    stored = block(1, front0, mod0) - front0
    front1 = block(0, model.img_in(case["noise"][1]), mod1)
    expected = model.final(front1 + stored, mod1.final_scale)
    torch.testing.assert_close(outs[0], model(case["noise"][0], case["t"][0], prefix, rope), rtol=0, atol=0)
    torch.testing.assert_close(outs[1], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@torch.no_grad()
def test_compiled_segments_do_not_recompile_across_steps(model):
    """Compiled blocks and glue (aot_eager): computed and cached steps with a Taylor-extrapolated residual run
    without a recompile after the first of each, and give the eager loop's outputs."""
    from fastdit.runtime.compile import compile_blocks

    case = make_case()
    prefix, rope = _prefill(model, case)
    cache = StepCache(front_blocks=1, threshold=math.inf, warmup_steps=2, max_consecutive_cached=1, taylor_order=1)
    eager_loop = CachedLoop(cache, 6)
    eager = _steps(model, eager_loop, case, prefix, rope, 6)
    torch._dynamo.reset()
    compile_blocks(model, backend="aot_eager")
    try:
        warm = _steps(model, CachedLoop(cache, 6, Workspace(cache, compiled=True)), case, prefix, rope, 3)
        with torch._dynamo.config.patch(error_on_recompile=True):
            loop = CachedLoop(cache, 6, Workspace(cache, compiled=True))
            outs = _steps(model, loop, case, prefix, rope, 6)
    finally:
        for block in model.blocks:
            block._compiled_call_impl = None
        torch._dynamo.reset()
    assert loop.cached == eager_loop.cached == [2, 4]
    for a, b in zip(warm + outs, eager[:3] + eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_generate_with_cache_on_a_2_1_folder(tiny_folders, tmp_path, capsys):
    """`fastdit generate --cache` on a Qwen-Image 2.1 folder caches and says how many steps it cached."""
    from fastdit.cli.main import main

    argv = ["generate", "--model", str(tiny_folders("qwen-image-2.1")), "--prompt", "a fox", "--height", "64"]
    argv += ["--width", "64", "--steps", "4", "--device", "cpu", "--cache", "F1B0,threshold=inf,warmup=1"]
    assert main([*argv, "--output", str(tmp_path / "o.png")]) == 0
    assert "(4 steps, 3 cached" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_replay_computed_and_cached_steps(tiny_folders):
    """With CUDA graphs the single-stream segments replay their own graphs, decided on the host: the same cached
    steps and images as without graphs, with CFG; a second call of the same shapes reuses the graphs."""
    from fastdit import load_pipeline

    pipe = load_pipeline(tiny_folders("qwen-image-2.1"), dtype=torch.float32, device="cuda")
    cache = StepCache(front_blocks=1, threshold=math.inf, warmup_steps=1, max_consecutive_cached=1, taylor_order=1)
    plain = [pipe("a red fox", seed=s, cache=cache, **CFG, **KW) for s in (1, 2)]
    pipe.enable_cuda_graph()
    graphed, workspaces = [], []
    for s in (1, 2):
        graphed.append(pipe("a red fox", seed=s, cache=cache, **CFG, **KW))
        workspaces.append(pipe._cache_workspace)
    assert workspaces[0] is workspaces[1]
    fns = workspaces[0].functions
    assert all(f.graph is not None for f in (fns.front, fns.computed, fns.cached))
    for a, b in zip(graphed, plain, strict=True):
        assert a.cached_steps == b.cached_steps > 0
        assert np.abs(_pixels(a) - _pixels(b)).max() <= 1
