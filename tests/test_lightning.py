"""The Lightning few-step path: `scheduler="lightning"` on the pipeline, `--scheduler` on generate and serve.

Images are compared with diffusers' QwenImagePipeline using a FlowMatchEulerDiscreteScheduler built from the
Qwen-Image-Lightning config, on the tiny folder in float32: uint8 pixels within 1.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

from fastdit.cli.main import main
from fastdit.pipelines.scheduler import LIGHTNING_SCHEDULER_CONFIG
from fastdit.validation import InputError


@pytest.fixture(scope="module")
def lightning_reference(tiny_dir, tiny_pipe):
    """diffusers' pipeline on the tiny folder with the Lightning scheduler (the tokenizer shared to save its load)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers import QwenImagePipeline as DiffusersQwenImagePipeline

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(LIGHTNING_SCHEDULER_CONFIG)
    ref = DiffusersQwenImagePipeline.from_pretrained(
        tiny_dir, tokenizer=tiny_pipe.tokenizer, scheduler=scheduler, dtype=torch.float32
    )
    ref.set_progress_bar_config(disable=True)
    return ref


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB")) for im in images]).astype(np.int16)


# ours: the fastdit call's arguments besides the prompt; ref: diffusers' (steps given explicitly, CFG by scale).
CASES = {
    "default-8-steps": (dict(), dict(num_inference_steps=8, true_cfg_scale=1.0)),
    "negative-prompt-ignored": (
        dict(negative_prompt=" ", num_inference_steps=4),
        dict(negative_prompt=" ", num_inference_steps=4, true_cfg_scale=1.0),
    ),
    "cfg-when-asked": (
        dict(negative_prompt="blurry", num_inference_steps=4, true_cfg_scale=4.0),
        dict(negative_prompt="blurry", num_inference_steps=4, true_cfg_scale=4.0),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lightning_matches_diffusers(tiny_pipe, lightning_reference, case):
    """scheduler="lightning" gives diffusers' image with the Lightning scheduler: 8 steps and no CFG by default, a
    negative prompt alone does not turn CFG on, a scale > 1 with one does."""
    ours_kw, ref_kw = CASES[case]
    size = dict(height=48, width=80)
    ours = tiny_pipe("a red fox in the snow", scheduler="lightning", seed=3, show_progress=False, **size, **ours_kw)
    gen = torch.Generator("cpu").manual_seed(3)
    ref = lightning_reference("a red fox in the snow", generator=gen, **size, **ref_kw).images
    assert ours.steps == ref_kw["num_inference_steps"]
    diff = np.abs(_pixels(ours) - _pixels(ref)).max()
    assert diff <= 1, f"max |fastdit - diffusers| = {diff}/255"


def test_lightning_is_one_dit_pass_per_step(tiny_pipe, monkeypatch):
    """With the Lightning schedule and a negative prompt but no scale, each step is one DiT forward on B rows."""
    batches = []
    forward = tiny_pipe.transformer.forward

    def spy(**kw):
        batches.append(kw["hidden_states"].shape[0])
        return forward(**kw)

    monkeypatch.setattr(tiny_pipe.transformer, "forward", spy)
    out = tiny_pipe("a cat", negative_prompt=" ", scheduler="lightning", height=32, width=32, seed=0)
    assert out.steps == 8 and batches == [1] * 8


def test_unknown_scheduler_is_an_input_error(tiny_pipe):
    """A scheduler name fastdit does not know is refused, naming the field, before any work."""
    with pytest.raises(InputError, match="scheduler must be one of checkpoint, lightning"):
        tiny_pipe("a cat", scheduler="euler", height=32, width=32)


def test_generate_scheduler_flag(tiny_dir, tiny_pipe, tmp_path, capsys):
    """`fastdit generate --scheduler lightning` runs 8 steps by default and draws the pipeline's Lightning image;
    a negative prompt without --cfg-scale gets a one-line note."""
    out, timings = tmp_path / "l.png", tmp_path / "t.json"
    argv = ["generate", "--model", str(tiny_dir), "--prompt", "a kite", "--height", "32", "--width", "32"]
    argv += ["--scheduler", "lightning", "--negative-prompt", " ", "--seed", "4", "--device", "cpu"]
    assert main([*argv, "--output", str(out), "--timings-json", str(timings)]) == 0
    assert json.loads(timings.read_text())["steps"] == 8
    assert "--negative-prompt is ignored with --scheduler lightning" in capsys.readouterr().err
    alone = tiny_pipe("a kite", height=32, width=32, scheduler="lightning", seed=4, show_progress=False)
    with Image.open(out) as im:
        assert np.abs(_pixels([im]) - _pixels(alone)).max() <= 1


class _Recorder:
    """A generator (the server engine's contract) that records each call's keyword arguments."""

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, prompt, *, height=1024, width=1024, **kwargs):
        self.calls.append(kwargs)
        return [Image.new("RGB", (width, height)) for _ in ([prompt] if isinstance(prompt, str) else prompt)]


@pytest.mark.parametrize(
    "scheduler, body, expected",
    [
        ("checkpoint", {}, {"num_inference_steps": 50, "true_cfg_scale": 1.0, "scheduler": "checkpoint"}),
        ("checkpoint", {"negative_prompt": " "}, {"num_inference_steps": 50, "true_cfg_scale": 4.0}),
        ("lightning", {"negative_prompt": " "}, {"num_inference_steps": 8, "true_cfg_scale": 1.0}),
        ("lightning", {"num_inference_steps": 4}, {"num_inference_steps": 4, "scheduler": "lightning"}),
        (
            "lightning",
            {"negative_prompt": " ", "true_cfg_scale": 3.0},
            {"true_cfg_scale": 3.0, "negative_prompt": [" "]},
        ),
    ],
)
def test_server_scheduler_defaults(scheduler, body, expected):
    """`serve --scheduler lightning`: every request runs the Lightning schedule, 8 steps and CFG off unless the
    request asks; the default server keeps 50 steps and CFG 4.0 with a negative prompt."""
    from fastapi.testclient import TestClient

    from fastdit.server.app import create_app
    from fastdit.server.engine import Engine

    generator = _Recorder()
    app = create_app(Engine(lambda: generator, warmup=None), model_id="m", scheduler=scheduler)
    with TestClient(app) as client:  # its lifespan starts the engine, which loads the generator
        deadline = time.monotonic() + 20
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "the engine did not start"
            time.sleep(0.05)
        response = client.post("/v1/images/generations", json={"prompt": "x", "size": "32x32", **body})
    assert response.status_code == 200, response.text
    (call,) = generator.calls
    assert expected.items() <= call.items()
