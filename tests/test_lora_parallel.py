"""LoRA under tensor parallelism (tp=2, gloo on CPU) against one process: A and B cut like their base layers
(column: B rows; row: A columns, the partial side product reduced with the base's all-reduce; sharded
modulation: the local slice before the all-gather), dynamic and merged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastdit.parallel import ParallelState, launch
from tests.lora_utils import random_lora

pytestmark = pytest.mark.dist

ARGS = dict(negative_prompt=" ", height=32, width=48, num_inference_steps=2, true_cfg_scale=3.0, seed=5)
ATTENTION = [
    k.split(".lora_A")[0].removeprefix("transformer.") for k in random_lora(0) if ".attn." in k and "lora_A" in k
]
LORAS = {"a": (random_lora(20, "kohya"), 0.8), "b": (random_lora(21, "diffusers", layers=ATTENTION), 0.5)}


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB")) for im in images]).astype(np.int16)


def _images(pipe, show: bool) -> dict[str, np.ndarray]:
    """Base, two dynamic adapters, the same merged, and base again after unload."""
    run = lambda: _pixels(pipe("a red fox in the snow", show_progress=show, **ARGS))  # noqa: E731
    out = {"base": run()}
    for name, (sd, scale) in LORAS.items():
        pipe.load_lora(sd, adapter_name=name, scale=scale)
    out["dynamic"] = run()
    pipe.fuse_loras()
    out["fused"] = run()
    pipe.unload_loras()
    out["unloaded"] = run()
    return out


def _worker(state: ParallelState, folder: str) -> dict:
    from fastdit.parallel.layers import ColumnParallelLinear
    from fastdit.pipelines.qwenimage import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(folder, dtype=torch.float32, device="cpu", parallel=state)
    mods = [m for m in pipe.transformer.modules() if isinstance(m, ColumnParallelLinear) and m.gathers_output]
    assert mods, "tp=2 shards the modulation (column-parallel + all-gather) by default"
    return _images(pipe, state.is_main)


def test_tp2_images_match_one_process(tiny_dir):
    """tp=2 (gloo): the images with two dynamic adapters, with them merged, and after unload equal one process's
    within 1/255 (sharded sums round differently in the last bits); unload gives the tp=2 base image exactly."""
    from fastdit.pipelines.qwenimage import QwenImagePipeline

    sharded = launch(_worker, str(tiny_dir), tp=2, device="cpu", timeout_s=150)
    single = _images(QwenImagePipeline.from_pretrained(tiny_dir, dtype=torch.float32, device="cpu"), False)
    for key in single:
        assert np.abs(sharded[key] - single[key]).max() <= 1, key
    assert np.abs(single["dynamic"] - single["base"]).max() > 10
    assert np.array_equal(sharded["unloaded"], sharded["base"])
