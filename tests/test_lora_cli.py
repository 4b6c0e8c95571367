"""`--lora` / `--fuse-lora` on `fastdit generate` and `fastdit serve`, the server's per-request adapters
(`"loras"` field, `GET /v1/loras`), and the one-line exit-2 errors for a missing, corrupt or mismatched file."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from fastdit.cli.common import ModelOptions
from fastdit.cli.lora import LoraSpec
from fastdit.cli.main import main
from fastdit.server.engine import Engine, Job
from fastdit.server.lora import serve_loras
from tests.lora_utils import random_lora
from tests.test_server import LiveServer

GEN = ["--prompt", "a fox", "--negative-prompt", " ", "--height", "32", "--width", "48", "--steps", "2", "--seed", "3"]


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    paths = {}
    for name, sd in {"style": random_lora(30, "kohya"), "detail": random_lora(31, "diffsynth")}.items():
        paths[name] = folder / f"{name}.safetensors"
        save_file(sd, str(paths[name]))
    paths["corrupt"] = folder / "corrupt.safetensors"
    paths["corrupt"].write_bytes(b"this is not a safetensors file")
    paths["wide"] = folder / "wide.safetensors"  # a LoRA of a 64-wide DiT
    wide = {"transformer_blocks.0.attn.to_q": (64, 64)}
    save_file(random_lora(32, targets=wide), str(paths["wide"]))
    return paths


def test_generate_with_lora_matches_the_python_api(tiny_dir, tiny_pipe, lora_files, tmp_path):
    """`--lora PATH:0.7` draws the image `load_lora(PATH, scale=0.7)` gives; `--fuse-lora` the same within 1/255."""
    dynamic, fused = tmp_path / "d.png", tmp_path / "f.png"
    lora = f"{lora_files['style']}:0.7"
    assert main(["generate", "--model", str(tiny_dir), *GEN, "--lora", lora, "--output", str(dynamic)]) == 0
    assert (
        main(["generate", "--model", str(tiny_dir), *GEN, "--lora", lora, "--fuse-lora", "--output", str(fused)]) == 0
    )
    tiny_pipe.load_lora(str(lora_files["style"]), scale=0.7)
    try:
        want = tiny_pipe("a fox", negative_prompt=" ", height=32, width=48, num_inference_steps=2, seed=3)[0]
    finally:
        tiny_pipe.unload_loras()
    assert np.abs(_pixels(Image.open(dynamic)) - _pixels(want)).max() <= 1
    assert np.abs(_pixels(Image.open(fused)) - _pixels(want)).max() <= 1


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        ("missing.safetensors", "no such LoRA file"),
        ("corrupt", "not a readable safetensors file"),
        ("wide", "transformer_blocks.0.attn.to_q: lora_up is (64, 4) but the layer is (32, 32)"),
    ],
)
@pytest.mark.parametrize("command", ["generate", "serve"])
def test_bad_lora_file_exits_2_with_one_line(tiny_dir, lora_files, tmp_path, capsys, command, lora, message):
    """A missing, corrupt or mismatched LoRA stops generate and serve at start: exit 2, one line, no traceback."""
    path = str(lora_files.get(lora, tmp_path / lora))
    argv = [command, "--model", str(tiny_dir), "--lora", path]
    argv += [*GEN, "--output", str(tmp_path / "x.png")] if command == "generate" else ["--port", "0"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_fuse_lora_needs_a_lora(tiny_dir, tmp_path, capsys):
    """--fuse-lora alone is refused; two adapters may not share a name."""
    assert main(["generate", "--model", str(tiny_dir), *GEN, "--fuse-lora", "--output", str(tmp_path / "x.png")]) == 2
    assert "--fuse-lora needs at least one --lora" in capsys.readouterr().err


def test_requests_with_different_loras_are_not_batched_together():
    """The LoRA set is part of the batch key: one set per pipeline call (no per-sample adapters)."""
    job = lambda loras: Job("p", None, 1, 64, 64, 2, 1.0, loras=loras)  # noqa: E731
    assert job(()).key != job((("style", 0.7),)).key != job((("style", 0.5),)).key
    assert job((("style", 0.7),)).key == job((("style", 0.7),)).key


def _image(response) -> Image.Image:
    assert response.status_code == 200, response.text
    return Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))


def test_server_requests_choose_preloaded_adapters(tiny_dir, lora_files):
    """`--lora NAME=PATH:SCALE` adapters are listed by GET /v1/loras; a request's `loras` picks them (scale default:
    the server's) and gets the image of the Python API with that set; no field: the base image; an unknown name is
    a 400 naming `loras.0.name`."""
    from fastdit.pipelines.qwenimage import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(tiny_dir, dtype=torch.float32, device="cpu")
    specs = (LoraSpec("style", str(lora_files["style"]), 0.7), LoraSpec("detail", str(lora_files["detail"]), 1.0))
    server = LiveServer(Engine(lambda: serve_loras(pipe, ModelOptions(loras=specs)), max_batch=4), max_side=256)
    server.wait_ready()
    body = dict(prompt="a fox", size="48x32", num_inference_steps=2, seed=3, negative_prompt=" ", true_cfg_scale=4.0)
    url = f"{server.url}/v1/images/generations"
    try:
        listed = httpx.get(f"{server.url}/v1/loras").json()["data"]
        with_loras = _image(
            httpx.post(url, json={**body, "loras": [{"name": "style"}, {"name": "detail", "scale": 0.5}]})
        )
        base = _image(httpx.post(url, json=body))
        unknown = httpx.post(url, json={**body, "loras": [{"name": "nope"}]})
    finally:
        server.stop()
    assert [(d["name"], d["scale"], d["fused"]) for d in listed] == [("style", 0.7, False), ("detail", 1.0, False)]
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "loras.0.name"
    assert "no LoRA adapter named 'nope'" in unknown.json()["error"]["message"]
    call = dict(negative_prompt=" ", height=32, width=48, num_inference_steps=2, seed=[3], true_cfg_scale=4.0)
    pipe.set_loras({"style": 0.7, "detail": 0.5})
    want = pipe("a fox", show_progress=False, **call)[0]
    pipe.set_loras({})
    want_base = pipe("a fox", show_progress=False, **call)[0]
    assert np.abs(_pixels(with_loras) - _pixels(want)).max() <= 1
    assert np.array_equal(_pixels(base), _pixels(want_base))


def test_bench_lora_runs_on_cpu(tmp_path, capsys):
    """`fastdit bench --lora-rank R --loras K` (tiny preset, CPU): the step with K dynamic adapters and merged,
    each against the same run without LoRA; dynamic and merged give the same output (float32)."""
    import json

    out = tmp_path / "lora.json"
    argv = ["bench", "--preset", "tiny", "--device", "cpu", "--dtype", "fp32", "--height", "32", "--width", "32"]
    argv += ["--text-len", "4", "--warmup", "0", "--iters", "2", "--lora-rank", "8,4", "--loras", "2"]
    assert main([*argv, "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    names = [
        "fastdit eager + 2 LoRA r8 dynamic",
        "fastdit eager + 2 LoRA r4 dynamic",
        "fastdit eager + 2 LoRA r4 merged",
    ]
    assert set(res["runs"]) == {"fastdit eager", *names}
    assert set(res["lora"]["overhead"]) == set(names) and res["lora"]["ranks"] == [8, 4]
    assert res["lora"]["rel_l2_dynamic_vs_merged"] < 1e-5
    assert "% per step vs the same run without LoRA" in capsys.readouterr().out
