"""Tensor, sequence and CFG parallelism on 2 GPUs (NCCL) against one GPU, at the DiT's full size in bf16.

The CPU tests (test_parallel.py, gloo, float32) check the parallel code to float32 rounding on a tiny model.
This one checks what a 2-GPU user gets: the full-width DiT (random weights scaled like a trained one's,
fastdit.bench.fill_random_, saved as a diffusers checkpoint and loaded sharded by each rank), a 1024^2 CFG
batch, bf16 with NCCL's reductions: relative L2 error of each layout's output against the same checkpoint
on one GPU <= 1e-2. FASTDIT_PARITY_LAYERS sets the depth (default 60, the real model: a 41 GB checkpoint
written to a temporary folder; each GPU holds at most one full bf16 copy, ~45 GB with the activations).
And the pipeline's CUDA graph (`--cuda-graph`) with NCCL collectives inside, for each layout.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastdit.model import DiTConfig

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
]

LAYOUTS = [(2, 1, 1), (1, 2, 1), (1, 1, 2)]  # tp=2, sp=2, cfg=2
TOL = 1e-2


def _save_checkpoint(model, folder) -> None:
    """Our model as a diffusers-format transformer folder: diffusers' own config.json (of the twin that
    fastdit.bench builds on our weights) and one safetensors file of our weights under diffusers' names."""
    from safetensors.torch import save_file

    from fastdit.bench import diffusers_twin
    from fastdit.loader import diffusers_state_dict

    diffusers_twin(model).save_config(folder)
    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in diffusers_state_dict(model).items()}
    save_file(tensors, folder / "diffusion_pytorch_model.safetensors")


def _worker(state, path: str, inputs) -> dict:
    from fastdit.parallel import load_transformer_parallel, make_parallel_state

    x, enc, t, shapes = inputs
    outs = {}
    for layout in LAYOUTS:
        st = state if layout == (state.tp, state.sp, state.cfg) else make_parallel_state(*layout, state.device)
        model = load_transformer_parallel(path, st, dtype=torch.bfloat16, device=state.device)
        with torch.no_grad():
            out = model(x.to(state.device), enc.to(state.device), None, t.to(state.device), img_shapes=shapes)
        outs[layout] = out.float().cpu()
        del model
        torch.cuda.empty_cache()
    return outs


def test_two_gpus_match_one_gpu_at_full_size(tmp_path):
    from fastdit import load_transformer
    from fastdit.bench import dit_inputs, random_dit
    from fastdit.parallel import launch

    cfg = DiTConfig(num_layers=int(os.environ.get("FASTDIT_PARITY_LAYERS", 60)))
    dev = torch.device("cuda", 0)
    model = random_dit(cfg, torch.bfloat16, dev, seed=0)
    _save_checkpoint(model, tmp_path)
    del model
    torch.cuda.empty_cache()
    x, enc, t, shapes = dit_inputs(cfg, 2, 1024, 1024, 128, torch.bfloat16, dev)
    one = load_transformer(tmp_path, dtype=torch.bfloat16, device=dev)  # the same path the ranks load
    with torch.no_grad():
        ref = one(x, enc, None, t, img_shapes=shapes).float().cpu()
    del one
    torch.cuda.empty_cache()
    inputs = (x.cpu(), enc.cpu(), t.cpu(), shapes)
    outs = launch(_worker, str(tmp_path), inputs, tp=2, device="cuda", timeout_s=1200)
    errors = {layout: ((o - ref).norm() / ref.norm()).item() for layout, o in outs.items()}
    print("relative L2 error vs one GPU:", {f"tp{a}_sp{b}_cfg{c}": f"{e:.2e}" for (a, b, c), e in errors.items()})
    assert set(errors) == set(LAYOUTS)
    assert all(e <= TOL for e in errors.values()), errors
    assert all(torch.isfinite(o).all() for o in outs.values())


def _pipeline_graph_worker(state, folder: str) -> dict:
    """Each layout's images without and with the steps replayed from a CUDA graph (rank 0's)."""
    import numpy as np

    from fastdit.parallel import make_parallel_state
    from fastdit.pipeline import QwenImagePipeline

    kw = dict(negative_prompt=" ", height=64, width=80, num_inference_steps=3, true_cfg_scale=3.0, seed=7)
    images = {}
    for layout in LAYOUTS:
        st = state if layout == (state.tp, state.sp, state.cfg) else make_parallel_state(*layout, state.device)
        pipe = QwenImagePipeline.from_pretrained(folder, dtype=torch.float32, device=state.device, parallel=st)
        plain = np.asarray(pipe("a red fox in the snow", show_progress=False, **kw)[0])
        pipe.enable_cuda_graph()
        graphed = np.asarray(pipe("a red fox in the snow", show_progress=False, **kw)[0])
        images[layout] = (plain, graphed, pipe._graph is not None)
        del pipe
        torch.cuda.empty_cache()
    return images


def test_cuda_graph_under_each_layout_gives_the_same_image(tiny_dir):
    """The tiny pipeline on 2 GPUs with tp=2, sp=2 and CFG parallel: the steps replayed from a CUDA graph (NCCL
    collectives captured in it) draw the image of the same layout's uncaptured run, bit for bit."""
    import numpy as np

    from fastdit.parallel import launch

    images = launch(_pipeline_graph_worker, str(tiny_dir), tp=2, device="cuda", timeout_s=600)
    assert set(images) == set(LAYOUTS)
    for layout, (plain, graphed, recorded) in images.items():
        assert recorded, layout
        assert np.array_equal(plain, graphed), layout
