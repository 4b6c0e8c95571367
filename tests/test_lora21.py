"""LoRA on Qwen-Image 2.1 (tiny pipeline, float32, CPU): diffusers' QwenImage21Pipeline with load_lora_weights +
set_adapters is the oracle; every trainer layout reads to the same adapter; unload restores the base weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fastdit.errors import LoraError
from fastdit.load import read_config
from fastdit.lora.formats import qwen_image21_lora_targets
from fastdit.tiny.vl import allow_vl_processors_without_torchvision
from tests.lora_utils import LAYOUTS, TINY_TARGETS, random_lora

ARGS = dict(prompt="a red fox", negative_prompt="blurry", true_cfg_scale=3.0, height=64, width=64)
ARGS |= dict(num_inference_steps=2)


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im) for im in images]).astype(np.int16)


@pytest.fixture(scope="module")
def folder(tiny_folders):
    return tiny_folders("qwen-image-2.1")


@pytest.fixture(scope="module")
def targets(folder):
    return qwen_image21_lora_targets(read_config(folder))


@pytest.fixture(scope="module")
def pipes(folder):
    """(fastdit's pipeline, diffusers' QwenImage21Pipeline) on the tiny 2.1 folder."""
    from diffusers import QwenImage21Pipeline

    from fastdit import load_pipeline

    allow_vl_processors_without_torchvision()
    ref = QwenImage21Pipeline.from_pretrained(folder, dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    ours = load_pipeline(folder, dtype=torch.float32, device="cpu")
    yield ours, ref
    ours.unload_loras()


def _ours(pipe) -> np.ndarray:
    return _pixels(pipe(seed=4, show_progress=False, **ARGS))


def _theirs(ref) -> np.ndarray:
    return _pixels(ref(generator=torch.Generator().manual_seed(4), **ARGS).images)


def _file(tmp_path, name, sd) -> str:
    path = tmp_path / f"{name}.safetensors"
    save_file(sd, str(path))
    return str(path)


def test_two_adapters_unfused_and_fused_match_diffusers(pipes, targets, tmp_path):
    """Two LoRAs of every linear (Q/K/V into the fused QKV, the SwiGLU's gate and up into its fused projection,
    the shared modulation, the text projection, ...) at 0.8 and 0.5: diffusers' image, dynamic and merged; unloading
    gives the base image back bit for bit."""
    ours, ref = pipes
    base = _ours(ours)
    paths = [_file(tmp_path, name, random_lora(k, "diffusers", targets=targets)) for k, name in enumerate("ab")]
    for name, path in zip("ab", paths, strict=True):
        ours.load_lora(path, adapter_name=name)
        ref.load_lora_weights(path, adapter_name=name)
    ours.set_loras({"a": 0.8, "b": 0.5})
    ref.set_adapters(["a", "b"], [0.8, 0.5])
    try:
        want = _theirs(ref)
        dynamic = _ours(ours)
        ours.fuse_loras()
        fused = _ours(ours)
    finally:
        ours.unload_loras()
        ref.unload_lora_weights()
    assert np.abs(dynamic - want).max() <= 1 and np.abs(fused - want).max() <= 1
    assert np.abs(dynamic - base).max() > 10  # the adapters do change the image
    assert np.array_equal(_ours(ours), base)


@pytest.mark.parametrize("layout", ["kohya", "comfyui", "musubi", "diffsynth"])
def test_every_layout_reads_to_the_same_adapter(pipes, targets, tmp_path, layout):
    """The same factors in each trainer's key layout give the diffusers-layout adapter's image (layouts with alpha
    keys store alpha = 2 x rank, so they run at half the scale)."""
    ours, _ = pipes
    images = []
    for name in ("diffusers", layout):
        scale = 0.35 if LAYOUTS[name]("x")[2] is not None else 0.7
        ours.load_lora(_file(tmp_path, name, random_lora(7, name, targets=targets)), adapter_name=name, scale=scale)
        try:
            images.append(_ours(ours))
        finally:
            ours.unload_loras()
    assert np.abs(images[0] - images[1]).max() <= 1


def test_cli_and_a_qwen_image_lora(folder, targets, tmp_path, capsys, pipes):
    """`fastdit generate --lora FILE:0.7` on a 2.1 folder writes the Python API's image; a Qwen-Image LoRA (its
    txt_mod / img_mod layers) is refused with one line naming a key, before the pipeline loads."""
    from PIL import Image

    from fastdit.cli.main import main

    ours, _ = pipes
    path = _file(tmp_path, "style", random_lora(3, "kohya", targets=targets))
    ours.load_lora(path, adapter_name="style", scale=0.7)
    try:
        expected = _pixels(ours(seed=4, show_progress=False, **dict(ARGS, negative_prompt=None, true_cfg_scale=1.0)))
    finally:
        ours.unload_loras()
    argv = ["generate", "--model", str(folder), "--prompt", ARGS["prompt"], "--height", "64", "--width", "64"]
    argv += ["--steps", "2", "--seed", "4", "--device", "cpu", "--dtype", "float32"]
    assert main([*argv, "--lora", f"{path}:0.7", "--output", str(tmp_path / "o.png")]) == 0
    assert np.array_equal(_pixels([Image.open(tmp_path / "o.png")]), expected)
    capsys.readouterr()
    qwen = _file(tmp_path, "qwen", random_lora(1, "diffusers", targets=TINY_TARGETS))
    assert main([*argv, "--lora", qwen, "--output", str(tmp_path / "q.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "names no linear layer of the Qwen-Image 2.1 transformer" in err[0], err
    with pytest.raises(LoraError, match="Qwen-Image 2.1"):
        ours.load_lora(qwen)
