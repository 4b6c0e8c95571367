"""Tensor, sequence and CFG parallelism on 2 and 4 GPUs (NCCL) against one GPU, at the DiT's full size in bf16.

The CPU tests (test_parallel.py, gloo, float32) check the parallel code to float32 rounding on a tiny model.
This one checks what a multi-GPU user gets: the full-width DiT (random weights scaled like a trained one's,
fastdit.bench.weights.fill_random_, saved as a diffusers checkpoint and loaded sharded by each rank), a 1024^2 CFG
batch, bf16 with NCCL's reductions: relative L2 error of each layout's output against the same checkpoint
on one GPU <= 1e-2. FASTDIT_PARITY_LAYERS sets the depth (default 60, the real model: a 41 GB checkpoint
written to a temporary folder; each GPU holds at most one full bf16 copy, ~45 GB with the activations).
And the pipeline's CUDA graph (`--cuda-graph`) with NCCL collectives inside, for each layout.
The 4-GPU layouts (tp=4, sp=4, tp x sp, CFG x sp, CFG x tp) run where the machine has 4 GPUs.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastdit.models.qwenimage import DiTConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
]

# (tp, sp, cfg) layouts by world size.
LAYOUTS = {
    2: [(2, 1, 1), (1, 2, 1), (1, 1, 2)],
    4: [(4, 1, 1), (1, 4, 1), (2, 2, 1), (1, 2, 2), (2, 1, 2)],
}
# The tiny pipeline has 2 heads: on 4 ranks only the layouts that split them at most in two.
GRAPH_LAYOUTS = {2: LAYOUTS[2], 4: [(1, 2, 2), (2, 1, 2)]}
TOL = 1e-2


def _world(n: int):
    return pytest.param(
        n, marks=pytest.mark.skipif(torch.cuda.device_count() < n, reason=f"needs {n} GPUs"), id=f"{n}gpus"
    )


def _name(layout) -> str:
    return "tp{}_sp{}_cfg{}".format(*layout)


def _save_checkpoint(model, folder) -> None:
    """Our model as a diffusers-format transformer folder: diffusers' own config.json (of the twin that
    fastdit.bench.weights builds on our weights) and one safetensors file of our weights under diffusers' names."""
    from safetensors.torch import save_file

    from fastdit.bench.weights import diffusers_twin
    from fastdit.models.qwenimage_keys import diffusers_state_dict

    diffusers_twin(model).save_config(folder)
    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in diffusers_state_dict(model).items()}
    save_file(tensors, folder / "diffusion_pytorch_model.safetensors")


def _worker(state, path: str, inputs, layouts) -> dict:
    from fastdit import load_transformer
    from fastdit.parallel import make_parallel_state

    x, enc, t, shapes = inputs
    outs = {}
    for layout in layouts:
        st = state if layout == (state.tp, state.sp, state.cfg) else make_parallel_state(*layout, state.device)
        model = load_transformer(path, parallel=st, dtype=torch.bfloat16, device=state.device)
        with torch.no_grad():
            out = model(x.to(state.device), enc.to(state.device), None, t.to(state.device), img_shapes=shapes)
        outs[layout] = out.float().cpu()
        del model
        torch.cuda.empty_cache()
    return outs


@pytest.fixture(scope="module")
def full_size_reference(tmp_path_factory):
    """The full-size checkpoint on disk, a 1024^2 CFG batch, and one GPU's bf16 output for it."""
    from fastdit import load_transformer
    from fastdit.bench.weights import dit_inputs, random_dit

    path = tmp_path_factory.mktemp("full_size")
    cfg = DiTConfig(num_layers=int(os.environ.get("FASTDIT_PARITY_LAYERS", 60)))
    dev = torch.device("cuda", 0)
    model = random_dit(cfg, torch.bfloat16, dev, seed=0)
    _save_checkpoint(model, path)
    del model
    torch.cuda.empty_cache()
    x, enc, t, shapes = dit_inputs(cfg, 2, 1024, 1024, 128, torch.bfloat16, dev)
    one = load_transformer(path, dtype=torch.bfloat16, device=dev)  # the same path the ranks load
    with torch.no_grad():
        ref = one(x, enc, None, t, img_shapes=shapes).float().cpu()
    del one
    torch.cuda.empty_cache()
    return path, (x.cpu(), enc.cpu(), t.cpu(), shapes), ref


@pytest.mark.parametrize("world", [_world(2), _world(4)])
def test_multi_gpu_matches_one_gpu_at_full_size(full_size_reference, world):
    from fastdit.parallel import launch

    path, inputs, ref = full_size_reference
    layouts = LAYOUTS[world]
    tp, sp, cfg = layouts[0]
    outs = launch(_worker, str(path), inputs, layouts, tp=tp, sp=sp, cfg=cfg, device="cuda", timeout_s=1500)
    errors = {layout: ((o - ref).norm() / ref.norm()).item() for layout, o in outs.items()}
    print("relative L2 error vs one GPU:", {_name(k): f"{e:.2e}" for k, e in errors.items()})
    assert set(errors) == set(layouts)
    assert all(e <= TOL for e in errors.values()), errors
    assert all(torch.isfinite(o).all() for o in outs.values())


def _pipeline_graph_worker(state, folder: str, layouts) -> dict:
    """Each layout's images without and with the steps replayed from a CUDA graph (rank 0's)."""
    import numpy as np

    from fastdit.parallel import make_parallel_state
    from fastdit.pipelines.qwenimage import QwenImagePipeline

    kw = dict(negative_prompt=" ", height=64, width=80, num_inference_steps=3, true_cfg_scale=3.0, seed=7)
    images = {}
    for layout in layouts:
        st = state if layout == (state.tp, state.sp, state.cfg) else make_parallel_state(*layout, state.device)
        pipe = QwenImagePipeline.from_pretrained(folder, dtype=torch.float32, device=state.device, parallel=st)
        plain = np.asarray(pipe("a red fox in the snow", show_progress=False, **kw)[0])
        pipe.enable_cuda_graph()
        graphed = np.asarray(pipe("a red fox in the snow", show_progress=False, **kw)[0])
        images[layout] = (plain, graphed, pipe._graph is not None)
        del pipe
        torch.cuda.empty_cache()
    return images


@pytest.mark.parametrize("world", [_world(2), _world(4)])
def test_cuda_graph_under_each_layout_gives_the_same_image(tiny_dir, world):
    """The tiny pipeline on 2 GPUs with tp=2, sp=2 and CFG parallel, and on 4 with CFG x sp and CFG x tp: the
    steps replayed from a CUDA graph (NCCL collectives captured in it) draw the image of the same layout's
    uncaptured run, bit for bit."""
    import numpy as np

    from fastdit.parallel import launch

    layouts = GRAPH_LAYOUTS[world]
    tp, sp, cfg = layouts[0]
    images = launch(_pipeline_graph_worker, str(tiny_dir), layouts, tp=tp, sp=sp, cfg=cfg, device="cuda", timeout_s=600)
    assert set(images) == set(layouts)
    for layout, (plain, graphed, recorded) in images.items():
        assert recorded, layout
        assert np.array_equal(plain, graphed), layout
