"""fastdit's Qwen-Image 2.1 pipeline draws diffusers' image for the same seed (tiny folders written with diffusers' and
transformers' own classes, float32, 8-bit pixels within one level): text-to-image, true CFG, non-square, a condition
image, the Turbo folder's sample_sigmas. Its compiled steps neither break graphs nor recompile, and bad input is
refused naming the field."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch._dynamo
from PIL import Image

from fastdit.errors import CheckpointError
from fastdit.pipelines import load_pipeline
from fastdit.pipelines.qwenimage21 import QwenImage21Pipeline
from fastdit.runtime.compile import compile_blocks
from fastdit.tiny.qwen21 import QWEN21_TURBO_SIGMAS
from fastdit.tiny.vl import allow_vl_processors_without_torchvision
from fastdit.validation import InputError


@pytest.fixture(scope="module")
def folders(tiny_folders):
    return {kind: tiny_folders(kind) for kind in ("qwen-image-2.1", "qwen-image-2.1-turbo")}


@pytest.fixture(scope="module")
def pipes(folders):
    """kind -> (diffusers' QwenImage21Pipeline, fastdit's), both float32 on the CPU."""
    from diffusers import QwenImage21Pipeline as Reference

    allow_vl_processors_without_torchvision()
    out = {}
    for kind, folder in folders.items():
        ref = Reference.from_pretrained(folder, dtype=torch.float32)
        ref.set_progress_bar_config(disable=True)
        out[kind] = (ref, load_pipeline(folder, dtype=torch.float32, device="cpu"))
    return out


def condition_image() -> Image.Image:
    """64 x 48 RGBA noise with a partly transparent alpha channel."""
    return Image.fromarray(np.random.RandomState(0).randint(0, 256, (48, 64, 4), dtype=np.uint8), "RGBA")


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


CASES = {
    "text-to-image": dict(prompt="a cat", height=64, width=64, num_inference_steps=2),
    "true CFG": dict(
        prompt="a red fox in the snow", negative_prompt="blurry", true_cfg_scale=3.0, height=64, width=64,
        num_inference_steps=2,
    ),
    "non-square, floored to 32": dict(prompt="a cat", height=80, width=96, num_inference_steps=2),
    "condition image": dict(prompt="make it blue", image="rgba", output_resolution=64, num_inference_steps=2),
    "condition image, CFG": dict(
        prompt="make it blue", image="rgba", negative_prompt=" ", true_cfg_scale=2.5, output_resolution=64,
        num_inference_steps=2,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", CASES)
def test_same_image_as_diffusers(pipes, name):
    """Same seed, same arguments: the same RGBA image, size included, within one 8-bit level."""
    ref, ours = pipes["qwen-image-2.1"]
    kwargs = dict(CASES[name])
    if kwargs.get("image") == "rgba":
        kwargs["image"] = condition_image()
    expected = ref(**kwargs, generator=torch.Generator().manual_seed(7)).images
    got = ours(**kwargs, seed=7, show_progress=False)
    assert len(got) == len(expected) == 1 and got.steps == 2
    assert got[0].mode == expected[0].mode == "RGBA" and got[0].size == expected[0].size
    assert np.abs(pixels(got[0]) - pixels(expected[0])).max() <= 1


def test_turbo_sample_sigmas(pipes, folders):
    """The Turbo folder's model_index.json sample_sigmas set the schedule and the step count (8, whatever
    num_inference_steps says), as in diffusers."""
    ref, ours = pipes["qwen-image-2.1-turbo"]
    assert json.loads((folders["qwen-image-2.1-turbo"] / "model_index.json").read_text())["sample_sigmas"]
    expected = ref(prompt="a cat", height=32, width=32, generator=torch.Generator().manual_seed(3)).images
    got = ours("a cat", height=32, width=32, seed=3, show_progress=False)
    assert got.steps == ref.num_timesteps == len(QWEN21_TURBO_SIGMAS)
    assert np.abs(pixels(got[0]) - pixels(expected[0])).max() <= 1


def test_a_list_of_prompts_draws_the_images_of_separate_calls(pipes):
    """Prompts of different lengths batched in one call (each row keeps its own noise RoPE frame) give exactly the
    images of one call each."""
    _, ours = pipes["qwen-image-2.1"]
    prompts, seeds = ["a cat", "a very long prompt about a red fox sitting in the snow at dawn"], [3, 4]
    together = ours(prompts, height=32, width=64, seed=seeds, num_inference_steps=2, show_progress=False)
    for prompt, seed, image in zip(prompts, seeds, together, strict=True):
        alone = ours(prompt, height=32, width=64, seed=seed, num_inference_steps=2, show_progress=False)[0]
        assert np.array_equal(pixels(image), pixels(alone))


def test_compiled_steps_do_not_break_or_recompile(folders):
    """Blocks compiled with fullgraph=True (aot_eager: dynamo's tracing without inductor's slow CPU codegen): a call
    with CFG and a condition image runs its prefill once and every step without one recompile, and matches eager."""
    pipe = QwenImage21Pipeline.from_pretrained(folders["qwen-image-2.1"], dtype=torch.float32, device="cpu")
    kwargs = dict(image=condition_image(), negative_prompt="blurry", true_cfg_scale=2.0, output_resolution=64)
    kwargs.update(num_inference_steps=3, seed=1, show_progress=False)
    eager = pipe("make it blue", **kwargs)
    torch._dynamo.reset()
    compile_blocks(pipe.transformer, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = pipe("make it blue", **kwargs)
        again = pipe("make it red", **kwargs)  # same token count: same shapes, no recompile
    assert np.abs(pixels(compiled[0]) - pixels(eager[0])).max() <= 1
    assert again[0].size == compiled[0].size


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(image=[]), "image"),
        (dict(image=["not an image"]), "image"),
        (dict(sigmas=[1.0, 1.5]), "sigmas"),
        (dict(output_resolution=16), "output_resolution"),
        (dict(height=16), "height"),
        (dict(true_cfg_scale=0.5), "true_cfg_scale"),
        (dict(negative_prompt=["a", "b"]), "negative_prompt"),
    ],
)
def test_bad_input_names_the_field(pipes, kwargs, field):
    _, ours = pipes["qwen-image-2.1"]
    with pytest.raises(InputError) as e:
        ours("a cat", **kwargs, show_progress=False)
    assert e.value.field == field


def test_bad_sample_sigmas_in_the_folder(folders, tmp_path):
    """A model_index.json whose sample_sigmas are not a sampling grid is refused naming the file."""
    folder = shutil.copytree(folders["qwen-image-2.1-turbo"], tmp_path / "turbo")
    index = json.loads((folder / "model_index.json").read_text())
    index["sample_sigmas"] = [1.0, -0.5]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model_index.json.*sample_sigmas"):
        load_pipeline(folder, dtype=torch.float32, device="cpu")


def test_cli_generate_runs_a_2_1_folder(pipes, folders, tmp_path, capsys):
    """`fastdit generate --model <2.1 folder>` loads it through load_pipeline and writes the Python API's RGBA image
    for the same seed, reporting the prefix prefill time."""
    from fastdit.cli.main import main

    out = tmp_path / "q21.png"
    argv = ["generate", "--model", str(folders["qwen-image-2.1"]), "--prompt", "a cat", "--height", "64"]
    argv += ["--width", "96", "--steps", "2", "--seed", "5", "--device", "cpu", "--dtype", "float32"]
    assert main([*argv, "--output", str(out)]) == 0
    assert "prefix prefill" in capsys.readouterr().out
    _, ours = pipes["qwen-image-2.1"]
    expected = ours("a cat", height=64, width=96, num_inference_steps=2, seed=[5], show_progress=False)[0]
    written = Image.open(out)
    assert written.mode == "RGBA" and np.array_equal(pixels(written), pixels(expected))


def test_server_serves_a_2_1_folder(pipes, folders):
    """`fastdit serve`'s loader and engine run a 2.1 folder: a request for 2 images gets the Python API's images
    for seeds s and s + 1."""
    import base64
    import io

    import httpx

    from fastdit.cli.common import ModelOptions
    from fastdit.server.engine import Engine, Warmup
    from fastdit.server.run import load_generator
    from tests.test_server import LiveServer

    options = ModelOptions(dtype="float32", device="cpu")
    engine = Engine(lambda: load_generator(str(folders["qwen-image-2.1"]), options), warmup=Warmup(32, 32, 1))
    server = LiveServer(engine, max_side=256)
    try:
        server.wait_ready()
        body = {"prompt": "a cat", "n": 2, "size": "64x32", "num_inference_steps": 2, "seed": 9}
        r = httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=120)
        assert r.status_code == 200, r.text
        got = [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in r.json()["data"]]
    finally:
        server.stop()
    _, ours = pipes["qwen-image-2.1"]
    expected = ours("a cat", height=32, width=64, num_inference_steps=2, seed=[9, 10], num_images_per_prompt=2)
    for image, want in zip(got, expected, strict=True):
        assert image.size == (64, 32) and np.abs(pixels(image) - pixels(want)).max() <= 1


def test_cuda_graph_copies_a_fixed_argument_once():
    """A replayed step copies an argument into the graph's input only when it is another tensor than last time, so
    the prefix cache (the same object at every step of a call) is copied once per call, not per step. (CPU check of
    the copy rule, with a stand-in for the recorded graph.)"""
    import weakref
    from types import SimpleNamespace

    from fastdit.runtime.cudagraph import CudaGraphStep

    step = CudaGraphStep(lambda x, cache: x + cache)
    cache = torch.ones(2)
    step.graph, step.output = SimpleNamespace(replay=lambda: None), torch.zeros(2)
    step.inputs, step.sources = [torch.zeros(2), torch.zeros(2)], [None, weakref.ref(cache)]
    step(torch.full((2,), 5.0), cache)
    assert step.inputs[0].tolist() == [5.0, 5.0] and step.inputs[1].tolist() == [0.0, 0.0]  # cache: not copied
    step(torch.full((2,), 6.0), torch.full((2,), 3.0))  # a new cache tensor (the next call's) is copied
    assert step.inputs[0].tolist() == [6.0, 6.0] and step.inputs[1].tolist() == [3.0, 3.0]


def test_offload_text_draws_the_resident_image(pipes, folders, tmp_path, capsys):
    """memory="offload-text": the Qwen3-VL text encoder waits in host memory and comes to the device only while it
    encodes (nothing of it left there after); the resident pipeline's image, bit for bit, with a condition image
    and CFG; `fastdit generate --memory offload-text` writes it too."""
    from fastdit.cli.main import main

    _, resident = pipes["qwen-image-2.1"]
    kwargs = dict(CASES["condition image, CFG"], image=condition_image(), seed=7, show_progress=False)
    expected = pixels(resident(**kwargs)[0])
    offloaded = load_pipeline(folders["qwen-image-2.1"], dtype=torch.float32, device="cpu", memory="offload-text")
    assert np.array_equal(pixels(offloaded(**kwargs)[0]), expected)
    assert offloaded.memory.text is not None and not offloaded.memory.text.loaded
    plain = pixels(resident(prompt="a cat", height=64, width=64, num_inference_steps=2, seed=3, show_progress=False)[0])
    argv = ["generate", "--model", str(folders["qwen-image-2.1"]), "--prompt", "a cat", "--height", "64"]
    argv += ["--width", "64", "--steps", "2", "--seed", "3", "--device", "cpu", "--dtype", "float32"]
    assert main([*argv, "--memory", "offload-text", "--output", str(tmp_path / "o.png")]) == 0, capsys.readouterr()
    assert np.array_equal(pixels(Image.open(tmp_path / "o.png")), plain)
