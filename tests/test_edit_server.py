"""`POST /v1/images/edits` (and /stream): OpenAI's Images edit API on a live server (uvicorn in a thread, as
tests/test_server.py starts them). The official `openai` client's `images.edit` gets the Python API's images from
the tiny Edit-2509 folder (float32, CPU, small reference areas through `fastdit serve`'s loader); bad uploads are
400s naming the field; edits share the queue, batches (same images only) and metrics, shown with a fake generator.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import io
import threading

import httpx
import numpy as np
import pytest
from PIL import Image

from fastdit.server.engine import Engine
from tests.test_server import EDIT_AREAS, FakeGenerator, LiveServer, _wait_for, start_edit_server


def _noise(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    image = Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))
    return image.convert(mode)


def _encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _decoded(data: dict) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data["b64_json"])))


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


WIDE, TALL = _noise(96, 48, 0), _noise(40, 72, 1, "RGBA")


@pytest.fixture(scope="module")
def edit_server(tiny_folders):
    """The tiny Edit-2509 folder served with --vae-image-area 4096 and --vl-image-area 2304 (start_edit_server)."""
    server = start_edit_server(tiny_folders("edit-2509"))
    yield server
    server.stop()


def test_openai_client_edits_one_and_two_images(edit_server, tmp_path):
    """`client.images.edit` unchanged: one image (a file) with n=2 and the fastdit extensions via extra_body, then two
    images (`image[]`) answered by URL. Each image is the Python API's for the same seeds; size "auto" is the last
    image's ratio at the VAE area."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{edit_server.url}/v1", api_key="x", max_retries=0)
    (tmp_path / "wide.png").write_bytes(_encoded(WIDE))
    extensions = {"num_inference_steps": 2, "seed": 7, "negative_prompt": " ", "true_cfg_scale": 3.0}
    with open(tmp_path / "wide.png", "rb") as file:
        one = client.images.edit(image=file, prompt="make it blue", n=2, size="64x48", extra_body=extensions)
    two = client.images.edit(
        image=[("wide.png", _encoded(WIDE), "image/png"), ("tall.png", _encoded(TALL), "image/png")],
        prompt="put them together",
        response_format="url",
        quality="high",
        input_fidelity="high",
        extra_body={"num_inference_steps": 2, "seed": 3},
    )
    pipe = edit_server.engine.generator  # the loader's pipeline, with the server's areas
    areas = dict(EDIT_AREAS)
    kw = dict(num_inference_steps=2, show_progress=False, **areas)
    expected_one = pipe.pipe(
        [WIDE], ["make it blue"] * 2, negative_prompt=[" "] * 2, true_cfg_scale=3.0, seed=[7, 8], height=48, width=64,
        **kw,
    )  # fmt: skip
    got_one = [_decoded(d.model_dump()) for d in one.data]
    assert [im.size for im in got_one] == [(64, 48)] * 2
    for got, want in zip(got_one, expected_one, strict=True):
        assert np.abs(_pixels(got) - _pixels(want)).max() <= 1
    (image,) = two.data
    fetched = httpx.get(image.url)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    got_two = Image.open(io.BytesIO(fetched.content))
    want_two = pipe.pipe([WIDE, TALL], "put them together", seed=3, **kw)[0]
    assert got_two.size == want_two.size == (32, 96)
    assert np.abs(_pixels(got_two) - _pixels(want_two)).max() <= 1


def test_stream_route_reports_progress(edit_server):
    """/v1/images/edits/stream answers `progress` events (at most one per step; the server polls), then `result` with
    the image."""
    files = {"image": ("wide.png", _encoded(WIDE), "image/png")}
    data = {"prompt": "x", "num_inference_steps": "3", "size": "32x32"}
    with httpx.stream("POST", f"{edit_server.url}/v1/images/edits/stream", files=files, data=data, timeout=60) as r:
        assert r.status_code == 200
        events = [line.removeprefix("event: ") for line in r.iter_lines() if line.startswith("event:")]
    assert 1 <= len(events) - 1 <= 3 and set(events[:-1]) == {"progress"} and events[-1] == "result", events


def _upload(server, files, data=None, path="/v1/images/edits", **kw):
    return httpx.post(f"{server.url}{path}", files=files, data={"prompt": "x", **(data or {})}, timeout=60, **kw)


BAD_UPLOADS = {
    "not an image": ({"image": ("a.png", b"hello", "image/png")}, {}, "image", "image (a.png) is not an image"),
    "truncated": (
        {"image": ("cut.png", _encoded(WIDE)[:200], "image/png")},
        {},
        "image",
        "image (cut.png) is a truncated or corrupt image",
    ),
    "second of two is no image": (
        [("image[]", ("a.png", _encoded(WIDE), "image/png")), ("image[]", ("b.txt", b"text", "text/plain"))],
        {},
        "image[]",
        "image[] 1 (b.txt) is not an image",
    ),
    "too many images": (
        [("image[]", (f"{k}.png", _encoded(WIDE), "image/png")) for k in range(4)],
        {},
        "image",
        "this model takes at most 3 images; 4 were uploaded",
    ),
    "no image": ({"other": ("a.png", _encoded(WIDE), "image/png")}, {}, "image", "image is required"),
    "image as text": (None, {"image": "a.png"}, "image", "image must be an image file"),
    "mask": (
        {"image": ("a.png", _encoded(WIDE), "image/png"), "mask": ("m.png", _encoded(WIDE), "image/png")},
        {},
        "mask",
        "inpainting masks are not supported",
    ),
    "too elongated": (
        {"image": ("thin.png", _encoded(_noise(400, 2, 2)), "image/png")},
        {},
        "image",
        "too elongated",
    ),
    "size": ({"image": ("a.png", _encoded(WIDE), "image/png")}, {"size": "60x64"}, "size", "multiples of 16"),
    "n": ({"image": ("a.png", _encoded(WIDE), "image/png")}, {"n": "many"}, "n", "n: Input should be a valid integer"),
    "steps": (
        {"image": ("a.png", _encoded(WIDE), "image/png")},
        {"num_inference_steps": "0"},
        "num_inference_steps",
        "between 1 and 1000",
    ),
    "loras": (
        {"image": ("a.png", _encoded(WIDE), "image/png")},
        {"loras": '[{"name": "style"}]'},
        "loras",
        "this server has no LoRA adapters",
    ),
    "loras not JSON": (
        {"image": ("a.png", _encoded(WIDE), "image/png")},
        {"loras": "style"},
        "loras",
        "must be a JSON list",
    ),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_uploads_are_400_naming_the_field(edit_server, case):
    """Each bad upload or field answers 400 with an OpenAI error naming it, on both routes, and never runs."""
    files, data, param, says = BAD_UPLOADS[case]
    before = edit_server.metrics()["fastdit_images_generated_total"]
    for path in ("/v1/images/edits", "/v1/images/edits/stream"):
        if files is None:  # the text field alone still makes a multipart body
            answer = _upload(edit_server, {"x": ("x", b"", "text/plain")}, data, path)
        else:
            answer = _upload(edit_server, files, data, path)
        assert answer.status_code == 400, (case, answer.text)
        error = answer.json()["error"]
        assert error["param"] == param and says in error["message"], (case, error)
    assert edit_server.metrics()["fastdit_images_generated_total"] == before


def test_size_limits(edit_server, monkeypatch):
    """An upload above the generations' 1 MiB body limit passes (the edit routes' own limit is --max-upload-mb); a
    body above that is 413; an image of more pixels than MAX_UPLOAD_PIXELS is 400 naming `image`; JSON is refused
    with a hint."""
    import fastdit.server.edits as edits

    big = _encoded(_noise(720, 720, 5))  # ~1.5 MiB of noise PNG
    assert len(big) > 1 << 20
    ok = _upload(edit_server, {"image": ("big.png", big, "image/png")}, {"num_inference_steps": "1", "size": "32x32"})
    assert ok.status_code == 200, ok.text
    huge = _upload(edit_server, {"image": ("huge.png", b"\0" * (5 << 20), "image/png")})
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
    monkeypatch.setattr(edits, "MAX_UPLOAD_PIXELS", 100 * 100)
    wide = _upload(edit_server, {"image": ("wide.png", _encoded(_noise(200, 100, 6)), "image/png")})
    assert wide.status_code == 400 and wide.json()["error"]["param"] == "image"
    assert "is 200x100 pixels; at most 10000 pixels" in wide.json()["error"]["message"]
    as_json = httpx.post(f"{edit_server.url}/v1/images/edits", json={"prompt": "x", "image": "a.png"})
    assert as_json.status_code == 400 and "multipart/form-data" in as_json.json()["error"]["message"]


def test_generations_on_an_edit_model_need_an_image(edit_server):
    """/v1/images/generations on an edit model answers 400 naming `image`."""
    answer = httpx.post(f"{edit_server.url}/v1/images/generations", json={"prompt": "x", "size": "32x32"})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "image" and "/v1/images/edits" in error["message"]


@contextlib.contextmanager
def fake_server(generator, **engine_kwargs):
    """A live server around a fake generator, for one test."""
    server = LiveServer(Engine(lambda: generator, **engine_kwargs), max_side=256)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_edits_share_the_queue_and_batch_only_with_the_same_images():
    """While a call runs, two edits of the same image and one of another image wait: the same-image pair runs as one
    call, the other alone; /metrics counts the edit requests and their images."""
    gate = threading.Event()
    fake = FakeGenerator(gate=gate, max_images=3)
    a, b = _encoded(WIDE), _encoded(TALL)
    data = {"num_inference_steps": "2", "size": "32x32"}
    with fake_server(fake, max_batch=4) as server, httpx.Client(timeout=30) as client:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            post = lambda name, png, prompt: pool.submit(  # noqa: E731
                client.post,
                f"{server.url}/v1/images/edits",
                files={"image": (name, png, "image/png")},
                data={"prompt": prompt, **data},
            )
            busy = post("a.png", a, "busy")
            _wait_for(lambda: fake.calls == [["busy"]], what="the busy call")
            waiting = [post("a.png", a, "same 1"), post("a.png", a, "same 2"), post("b.png", b, "other")]
            _wait_for(lambda: server.metrics()["fastdit_queue_depth"] == 3, what="3 queued edits")
            gate.set()
            answers = [f.result() for f in [busy, *waiting]]
        assert [r.status_code for r in answers] == [200] * 4
        metrics = server.metrics()
        assert metrics['fastdit_requests_total{status="200"}'] == 4 and metrics["fastdit_images_generated_total"] == 4
        text = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "no image", "size": "32x32"})
        assert text.status_code == 200 and fake.images[-1] is None  # such a model also generates from text alone
    calls = {tuple(sorted(prompts)): images for prompts, images in zip(fake.calls, fake.images, strict=True)}
    assert sorted(calls) == [("busy",), ("no image",), ("other",), ("same 1", "same 2")]
    assert calls["same 1", "same 2"] == calls["busy",] != calls["other",]


def test_text_to_image_model_does_not_edit():
    """On a text-to-image model the edit routes answer 400 "this model does not edit images", naming `image`."""
    fake = FakeGenerator()
    with fake_server(fake) as server:
        for path in ("/v1/images/edits", "/v1/images/edits/stream"):
            answer = _upload(server, {"image": ("a.png", _encoded(WIDE), "image/png")}, path=path)
            assert answer.status_code == 400
            error = answer.json()["error"]
            assert error["param"] == "image" and error["message"].startswith("this model does not edit images")
    assert fake.calls == []


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--vae-image-area", "10"], "--vae-image-area must be an integer between 1024 and"),
        (["--vl-image-area", "4096"], "--vl-image-area is for the Qwen-Image-Edit pipelines; QwenImagePipeline"),
    ],
)
def test_serve_checks_the_area_flags_before_loading(tiny_dir, capsys, flags, says):
    """`fastdit serve --vae-image-area / --vl-image-area`: a bad area, or one for a text-to-image folder, exits 2 with
    one line before the model loads."""
    from fastdit.cli.main import main

    assert main(["serve", "--model", str(tiny_dir), "--port", "0", *flags]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"fastdit: error: {says}"), lines
