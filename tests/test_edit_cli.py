"""`fastdit edit`: reference images and a prompt -> the Python API's edited image, written to a file, for the edit
folders and Qwen-Image 2.1; bad images and flags exit 2 with one line naming the file or flag, before any loading.

Runs in-process (`fastdit.cli.main.main`) on the tiny folders, float32 on CPU, at small reference areas."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fastdit.cli.main import main

AREAS = dict(vae_image_area=64 * 64, vl_image_area=48 * 48)
AREA_FLAGS = ["--vae-image-area", "4096", "--vl-image-area", "2304"]
CPU = ["--device", "cpu", "--dtype", "float32"]


def _noise(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture
def files(tmp_path):
    """A 2:1 RGB PNG and a 5:9 RGBA PNG."""
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    _noise(96, 48, 0).save(a)
    _noise(40, 72, 1).convert("RGBA").save(b)
    return a, b


def _pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in lines if not line.startswith("fastdit: warning")]
    assert len(lines) == 1, lines
    return lines[0]


def test_edit_2509_three_image_modes_end_to_end(tiny_pipes, tiny_folders, tmp_path, capsys):
    """Three files (RGBA, grayscale, palette), CFG, two outputs with seeds s and s + 1: the files hold the images the
    Python API gives for diffusers' `load_image` of each file (the conversion the pipelines apply), and the timings
    JSON has the VAE encode stage and the output size (the last image's ratio)."""
    from diffusers.utils import load_image

    paths = [tmp_path / f"in-{mode}.png" for mode in ("RGBA", "L", "P")]
    for k, path in enumerate(paths):
        _noise(96 - 24 * k, 48 + 12 * k, k).convert(path.stem[3:]).save(path)
    out, timings = tmp_path / "out.png", tmp_path / "t.json"
    argv = ["edit", "--model", str(tiny_folders("edit-2509")), *[f"--image={p}" for p in paths], *AREA_FLAGS, *CPU]
    argv += ["--prompt", "make it blue", "--negative-prompt", " ", "--steps", "2", "--seed", "3", "--num-images", "2"]
    assert main([*argv, "--output", str(out), "--timings-json", str(timings)]) == 0
    printed = capsys.readouterr().out
    assert "VAE encode" in printed and "(64x64, seed 4)" in printed
    expected = tiny_pipes("edit-2509")(
        [load_image(str(p)) for p in paths], "make it blue", negative_prompt=" ", num_inference_steps=2, seed=[3, 4],
        num_images_per_prompt=2, show_progress=False, **AREAS,
    )  # fmt: skip
    for i, image in enumerate(expected):
        assert np.array_equal(_pixels(Image.open(tmp_path / f"out-{i}.png")), _pixels(image))
    record = json.loads(timings.read_text())
    assert record["vae_encode_s"] > 0 and (record["width"], record["height"]) == (64, 64)


def test_qwen_image_2_1_condition_image(tiny_pipes, tiny_folders, files, tmp_path, monkeypatch):
    """A Qwen-Image 2.1 folder takes --image as its condition image: the file holds the Python API's RGBA image
    (the 2.1 resize area made small for the test)."""
    import fastdit.pipelines.qwenimage21 as q21

    original = q21.calculate_dimensions
    monkeypatch.setattr(q21, "calculate_dimensions", lambda area, ratio: original(64 * 64, ratio))
    a, _ = files
    out = tmp_path / "q21.png"
    argv = ["edit", "--model", str(tiny_folders("qwen-image-2.1")), "--image", str(a), *CPU]
    assert main([*argv, "--prompt", "a cat", "--steps", "2", "--seed", "5", "--output", str(out)]) == 0
    expected = tiny_pipes("qwen-image-2.1")(
        "a cat", image=Image.open(a), num_inference_steps=2, seed=[5], show_progress=False
    )
    written = Image.open(out)
    assert written.mode == "RGBA" and written.size == expected[0].size == (96, 32)
    assert np.array_equal(_pixels(written), _pixels(expected[0]))


def _bad_files(tmp_path):
    (tmp_path / "text.png").write_text("not an image")
    _noise(64, 64, 3).save(tmp_path / "whole.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "whole.png").read_bytes()[:300])
    _noise(400, 2, 4).save(tmp_path / "thin.png")
    (tmp_path / "folder").mkdir()


# (folder kind, arguments after the prompt, what the one line must start with); {t} is the test's tmp_path.
CASES = {
    "missing": ("edit", ["--image", "{t}/none.png"], "--image {t}/none.png: no such file"),
    "a folder": ("edit", ["--image", "{t}/folder"], "--image {t}/folder is a folder"),
    "not an image": ("edit", ["--image", "{t}/text.png"], "--image {t}/text.png is not an image"),
    "truncated": ("edit", ["--image", "{t}/cut.png"], "--image {t}/cut.png is a truncated or corrupt image"),
    "unreadable": ("edit", ["--image", "{t}/whole.png"], "--image {t}/whole.png: cannot read it (Permission denied)"),
    "too many for Edit": (
        "edit",
        ["--image", "{t}/a.png", "--image", "{t}/b.png"],
        "--image {t}/b.png: QwenImageEditPipeline takes at most 1 image, 2 were given",
    ),
    "too many for 2509": (
        "edit-2509",
        ["--image", "{t}/a.png"] * 3 + ["--image", "{t}/b.png"],
        "--image {t}/b.png: QwenImageEditPlusPipeline takes at most 3 images, 4 were given",
    ),
    "too elongated": (
        "edit-2509",
        ["--image", "{t}/thin.png"],
        "--image {t}/thin.png: image 0 is 400x2: too elongated",
    ),
    "text-to-image folder": ("qwen-image", ["--image", "{t}/a.png"], "--model {m} is a text-to-image pipeline"),
    "area": ("edit", ["--image", "{t}/a.png", "--vae-image-area", "100"], "--vae-image-area must be an integer"),
    "2.1 and an area": (
        "qwen-image-2.1",
        ["--image", "{t}/a.png", "--vl-image-area", "4096"],
        "--vl-image-area is for the Qwen-Image-Edit pipelines; QwenImage21Pipeline does not take it",
    ),
    "2.1 and lightning": (
        "qwen-image-2.1",
        ["--image", "{t}/a.png", "--scheduler", "lightning"],
        "--scheduler lightning is for the Qwen-Image-Edit pipelines",
    ),
    "cache too deep": (
        "edit-2511",
        ["--image", "{t}/a.png", "--cache", "F2B0"],
        "--cache F2B0,threshold=0.12,warmup=8,taylor=0,max-cached=-1,max-consecutive=-1: StepCache.front_blocks=2",
    ),
    "steps": ("edit", ["--image", "{t}/a.png", "--steps", "0"], "--steps must be an integer between 1 and 1000"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_line_before_loading(case, tiny_folders, files, tmp_path, capsys, monkeypatch):
    """Each bad file or flag: exit 2, one line `fastdit: error: ...` naming it, and no pipeline loaded."""
    import pathlib

    import fastdit.pipelines

    kind, args, says = CASES[case]
    _bad_files(tmp_path)
    model = str(tiny_folders(kind))
    monkeypatch.setattr(fastdit.pipelines, "load_pipeline", lambda *a, **k: pytest.fail("a pipeline was loaded"))
    if case == "unreadable":  # the tests run as root, which reads any file: the denial is simulated
        read = pathlib.Path.read_bytes

        def denied(self):
            if self.name == "whole.png":
                raise PermissionError(13, "Permission denied")
            return read(self)

        monkeypatch.setattr(pathlib.Path, "read_bytes", denied)
    argv = ["edit", "--model", model, "--prompt", "x", *[a.format(t=tmp_path) for a in args], *CPU]
    assert main([*argv, "--output", str(tmp_path / "o.png")]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("fastdit: error: " + says.format(t=tmp_path, m=model)), line
    assert not (tmp_path / "o.png").exists()


def test_edit_2511_with_the_step_cache(tiny_pipes, tiny_folders, tmp_path, capsys):
    """`fastdit edit --cache` on Edit-2511 (zero_cond_t) caches the steps it is told to and writes the image the
    Python API gives with the same StepCache."""
    from fastdit import StepCache

    source, out = tmp_path / "in.png", tmp_path / "out.png"
    _noise(80, 48, 7).save(source)
    spec = "F1B0,threshold=inf,warmup=1"
    argv = ["edit", "--model", str(tiny_folders("edit-2511")), "--image", str(source), *AREA_FLAGS, *CPU]
    argv += ["--prompt", "make it blue", "--negative-prompt", " ", "--steps", "3", "--seed", "2", "--cache", spec]
    assert main([*argv, "--output", str(out)]) == 0
    assert "(3 steps, 2 cached" in capsys.readouterr().out
    expected = tiny_pipes("edit-2511")(
        [Image.open(source)], "make it blue", negative_prompt=" ", num_inference_steps=3, seed=2,
        cache=StepCache.parse(spec), show_progress=False, **AREAS,
    )  # fmt: skip
    assert expected.cached_steps == 2
    assert np.array_equal(_pixels(Image.open(out)), _pixels(expected[0]))


def test_generate_on_an_edit_folder_points_to_edit(tiny_folders, tmp_path, capsys):
    """`fastdit generate` on an edit folder exits 2 with one line pointing to `fastdit edit`, before loading."""
    argv = [
        "generate",
        "--model",
        str(tiny_folders("edit")),
        "--prompt",
        "x",
        *CPU,
        "--output",
        str(tmp_path / "o.png"),
    ]
    assert main(argv) == 2
    assert _one_error_line(capsys).endswith("edits images: give them with fastdit edit --image FILE ...")


def test_memory_plans_count_the_reference_tokens(tiny_folders, monkeypatch):
    """The edit pipelines take memory plans sized with their references: three references need more than one, the
    server's plan (references unknown) holds as many as the pipeline takes; Qwen-Image 2.1 offloads its text encoder
    but keeps its DiT resident (offload-blocks: a one-line PlanError naming the plans it runs)."""
    import fastdit.memory
    from fastdit.cli.common import ModelOptions
    from fastdit.cli.memory import memory_plan
    from fastdit.memory import PlanError

    folder, options = (
        tiny_folders("edit-2511"),
        ModelOptions(memory="offload-text", image_areas=(("vae_image_area", 4096),)),
    )
    seen = []
    plan_memory = fastdit.memory.plan_memory
    monkeypatch.setattr(
        fastdit.memory, "plan_memory", lambda *a, **k: seen.append(k["workload"]) or plan_memory(*a, **k)
    )
    for n in (1, 3, None):
        plan = memory_plan(options, folder, device="cpu", dtype=torch.float32, height=None, width=None, references=n)
        assert plan.offload_text
    assert [(w.reference_tokens, w.reference_pixels, w.height, w.width) for w in seen] == [
        (16, 4096, 64, 64),
        (48, 4096, 64, 64),
        (48, 4096, 64, 64),
    ]
    q21 = tiny_folders("qwen-image-2.1")
    plan = memory_plan(ModelOptions(memory="offload-text"), q21, device="cpu", dtype=torch.float32)
    assert plan.offload_text and not plan.streamed
    assert memory_plan(ModelOptions(memory="auto"), q21, device="cpu", dtype=torch.float32) is None  # no budget
    with pytest.raises(PlanError, match="'offload-blocks' is not one this pipeline runs; it runs full, offload-text"):
        memory_plan(ModelOptions(memory="offload-blocks"), q21, device="cpu", dtype=torch.float32)
