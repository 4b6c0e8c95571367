"""`fastdit serve`: the OpenAI-compatible image server, tested through a real uvicorn on 127.0.0.1.

Servers run in a thread of the test process (so a test can inject a fake generator), on a free port,
except the signal tests, which run `python -m fastdit serve` as a subprocess. The
OpenAI-client, batching and web-page tests use the real tiny random-weight pipeline at 64x64; the
queue, 429, 500, disconnect and schema-fuzzing tests use `FakeGenerator`, whose timing is controlled.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import uvicorn
from PIL import Image

from fastdit.cli.main import main
from fastdit.errors import FastditError
from fastdit.server.app import create_app
from fastdit.server.engine import Engine, Warmup
from fastdit.server.run import bind_socket

CHROMIUM = "/usr/bin/chromium"
REPO = Path(__file__).resolve().parents[1]


# ---- fixtures -----------------------------------------------------------------------------------


class FakeGenerator:
    """Follows the pipeline's call contract and returns solid-colour images. `step_s` sleeps per step;
    while `gate` is clear every step waits for it (bounded); a prompt containing 'FAIL' raises, as a
    CUDA OOM would. `calls` records the prompt list of every call. `max_images` > 0: it also takes an
    edit's images (as Qwen-Image 2.1, none too), whose bytes `images` records per call (None: none)."""

    def __init__(
        self, step_s: float = 0.0, gate: threading.Event | None = None, side: int | None = None, max_images: int = 0
    ):
        self.step_s, self.gate, self.side = step_s, gate, side  # side: fixed image size, cheap to encode
        self.max_images = max_images
        self.calls: list[list[str]] = []
        self.images: list[list[bytes] | None] = []

    def output_size(self, images):
        return 32, 32

    def __call__(self, prompt, *, height=1024, width=1024, num_inference_steps=50, progress=None, image=None, **kw):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        self.calls.append(prompts)
        self.images.append(None if image is None else [im.tobytes() for im in image])
        if any("FAIL" in p for p in prompts):
            raise RuntimeError("CUDA out of memory (fake)")
        for step in range(1, num_inference_steps + 1):
            if self.gate is not None:
                self.gate.wait(timeout=30)
            time.sleep(self.step_s)
            if progress is not None:
                progress(step, num_inference_steps)
        size = (self.side, self.side) if self.side else (width, height)
        return [Image.new("RGB", size, (17 * i % 256, 80, 160)) for i in range(len(prompts))]


class LiveServer:
    """uvicorn serving `create_app(engine)` in a thread on a free 127.0.0.1 port."""

    def __init__(self, engine: Engine, **app_kwargs):
        self.engine = engine
        sock = bind_socket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        app = create_app(engine, model_id="test-model", **app_kwargs)
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)

    def wait_ready(self, timeout: float = 120) -> None:
        assert self.engine.ready.wait(timeout), f"engine not ready: {self.engine.load_error!r}"

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics").text
        return {name: float(value) for name, value in re.findall(r"^(\S+) (\S+)$", text, re.M)}

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "uvicorn did not stop"


@pytest.fixture
def serve():
    """Factory: serve(generator, **engine_kwargs) -> a ready LiveServer, stopped after the test."""
    servers = []

    def start(generator, *, max_side: int = 256, **engine_kwargs) -> LiveServer:
        server = LiveServer(Engine(lambda: generator, **engine_kwargs), max_side=max_side)
        servers.append(server)
        server.wait_ready()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def tiny_server(tiny_dir):
    """The real tiny pipeline (fp32, CPU), warmed up at 64x64, shared by the tests of this module."""
    import torch

    from fastdit.pipelines.qwenimage import QwenImagePipeline

    engine = Engine(
        lambda: QwenImagePipeline.from_pretrained(tiny_dir, dtype=torch.float32, device="cpu"),
        max_queue=16,
        max_batch=4,
        warmup=Warmup(64, 64, 1),
    )
    server = LiveServer(engine, max_side=256)
    server.wait_ready()
    yield server
    server.stop()


EDIT_AREAS = (("vae_image_area", 64 * 64), ("vl_image_area", 48 * 48))


def start_edit_server(folder: Path) -> LiveServer:
    """A ready server on a tiny edit folder through `fastdit serve`'s loader, float32 on the CPU, with small reference
    areas (--vae-image-area 4096 --vl-image-area 2304), uploads up to 4 MiB, warmed up at 32x32."""
    from fastdit.cli.common import ModelOptions
    from fastdit.server.run import load_generator

    options = ModelOptions(dtype="float32", device="cpu", image_areas=EDIT_AREAS)
    engine = Engine(lambda: load_generator(str(folder), options), max_batch=4, warmup=Warmup(32, 32, 1))
    server = LiveServer(engine, max_side=256, max_upload_bytes=4 << 20)
    server.wait_ready()
    return server


@pytest.fixture(scope="module")
def tiny_edit_server(tiny_folders):
    """The tiny Edit-2509 pipeline served (start_edit_server), shared by the tests of this module."""
    server = start_edit_server(tiny_folders("edit-2509"))
    yield server
    server.stop()


def _png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def _max_difference(a: Image.Image, b: Image.Image) -> int:
    """Largest per-channel difference; batched and single runs may differ by float rounding."""
    assert a.size == b.size
    return max(abs(x - y) for x, y in zip(a.tobytes(), b.tobytes(), strict=True))


def _wait_for(condition, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# ---- the real tiny pipeline ---------------------------------------------------------------------


def test_openai_client_generates_images(tiny_server):
    """The official `openai` client works unchanged, including the fields it sends that fastdit
    ignores, b64_json and url answers, and the fastdit extensions via extra_body."""
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=f"{tiny_server.url}/v1", api_key="x", max_retries=0)
    result = client.images.generate(
        model="qwen-image",
        prompt="a red fox in snow",
        n=2,
        size="64x64",
        quality="hd",
        style="vivid",
        user="test",
        extra_body={"num_inference_steps": 2, "seed": 7, "negative_prompt": " ", "true_cfg_scale": 4.0},
    )
    assert result.created > 0 and len(result.data) == 2
    first, second = (_png(image.b64_json) for image in result.data)
    assert first.size == (64, 64) and first.format == "PNG"
    assert first.tobytes() != second.tobytes(), "the two images of a request must use different seeds"

    again = client.images.generate(
        prompt="a red fox in snow",
        size="64x64",
        extra_body={"num_inference_steps": 2, "seed": 7, "negative_prompt": " "},
    )
    assert _max_difference(_png(again.data[0].b64_json), first) <= 2, "same seed, same image"

    by_url = client.images.generate(
        prompt="a lighthouse", size="64x48", response_format="url", extra_body={"num_inference_steps": 1}
    )
    (image,) = by_url.data
    assert image.b64_json is None and image.url.startswith(f"{tiny_server.url}/v1/images/files/")
    fetched = httpx.get(image.url)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(fetched.content)).size == (64, 48)

    with pytest.raises(BadRequestError) as error:
        client.images.generate(prompt="x", size="60x64")
    assert error.value.body["param"] == "size"

    models = client.models.list()
    assert [m.id for m in models.data] == ["test-model"]


def test_batching_is_visible_in_metrics(tiny_server):
    """Requests with the same (size, steps, CFG) that wait while a batch runs are merged into one
    pipeline call; /metrics shows a call of 4 requests, and each client gets the image its seed gives
    when run alone."""
    url = tiny_server.url
    before = tiny_server.metrics()
    same = {"size": "64x64", "num_inference_steps": 2}
    busy_body = {"prompt": "busy", "size": "64x64", "num_inference_steps": 200}
    with ThreadPoolExecutor(4) as pool:
        with httpx.stream("POST", f"{url}/v1/images/generations/stream", json=busy_body, timeout=60) as busy:
            lines = busy.iter_lines()
            assert next(line for line in lines if line.startswith("event:")) == "event: progress"
            # The worker is inside a 200-step call: the next four requests queue up together.
            futures = [
                pool.submit(
                    httpx.post,
                    f"{url}/v1/images/generations",
                    json={"prompt": f"prompt {i}", "seed": i, **same},
                    timeout=60,
                )
                for i in range(4)
            ]
            _wait_for(lambda: tiny_server.metrics()["fastdit_queue_depth"] == 4, what="4 queued requests")
        # Leaving the stream disconnects its client, which stops the busy call at its next step.
        answers = [future.result() for future in futures]
    assert [answer.status_code for answer in answers] == [200] * 4
    after = tiny_server.metrics()
    merged = after["fastdit_batch_requests_count"] - after['fastdit_batch_requests_bucket{le="2.0"}']
    merged -= before["fastdit_batch_requests_count"] - before['fastdit_batch_requests_bucket{le="2.0"}']
    assert merged == 1, "one pipeline call should have served the 4 queued requests"
    assert after["fastdit_images_generated_total"] - before["fastdit_images_generated_total"] == 4
    assert after["fastdit_step_seconds_count"] > before["fastdit_step_seconds_count"]

    alone = httpx.post(f"{url}/v1/images/generations", json={"prompt": "prompt 2", "seed": 2, **same}, timeout=60)
    batched = _png(answers[2].json()["data"][0]["b64_json"])
    solo = _png(alone.json()["data"][0]["b64_json"])
    assert _max_difference(batched, solo) <= 2, "a batched image must match the same request run alone"


class _DevTools:
    """A minimal Chrome DevTools Protocol client over --remote-debugging-pipe (fds 3 and 4;
    messages are JSON terminated by NUL), so no websocket library is needed."""

    def __init__(self, user_data_dir: Path):
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()

        def child_fds():  # move the pipe ends to fds 3 and 4 (via fds >= 10, should they be 3 or 4)
            read_end = fcntl.fcntl(to_browser_r, fcntl.F_DUPFD, 10)
            write_end = fcntl.fcntl(from_browser_w, fcntl.F_DUPFD, 10)
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        flags = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--no-first-run",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--remote-debugging-pipe",
            f"--user-data-dir={user_data_dir}",
            "about:blank",
        ]
        self.process = subprocess.Popen(
            [CHROMIUM, *flags],
            preexec_fn=child_fds,
            pass_fds=(3, 4),  # kept open by the fd cleanup that runs after child_fds
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.session: str | None = None

    def send(self, method: str, params: dict | None = None, *, session: bool = True) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:  # skip events until our answer arrives
            while b"\0" not in self._buffer:
                chunk = os.read(self._from_browser, 1 << 16)
                assert chunk, "chromium closed the DevTools pipe"
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._next_id:
                assert "error" not in answer, answer["error"]
                return answer["result"]

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def close(self) -> None:
        self.process.kill()
        self.process.wait(10)
        os.close(self._to_browser)
        os.close(self._from_browser)


def _open_page(url: str, profile: Path) -> _DevTools:
    """Headless Chromium showing the server's page at `url`, loaded."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium)")
    browser = _DevTools(profile)
    try:
        (target,) = [t for t in browser.send("Target.getTargets")["targetInfos"] if t["type"] == "page"][:1]
        browser.session = browser.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}, session=False
        )["sessionId"]
        browser.send("Page.navigate", {"url": f"{url}/"})
        deadline = time.monotonic() + 20
        while browser.evaluate("document.readyState + ':' + !!document.getElementById('generate')") != "complete:true":
            assert time.monotonic() < deadline, "the page did not load"
            time.sleep(0.1)
    except BaseException:
        browser.close()
        raise
    return browser


def _wait_for_page(browser: _DevTools, timeout: float = 60) -> str:
    """Wait until the page's request is no longer running; returns #status's state."""
    deadline = time.monotonic() + timeout
    while (state := browser.evaluate("document.getElementById('status').dataset.state")) == "running":
        assert time.monotonic() < deadline, "generation did not finish"
        time.sleep(0.1)
    return state


@pytest.mark.slow
def test_web_page_generates_with_progress(tiny_server, tmp_path):
    """Headless Chromium opens /, fills the form, clicks Generate; the page shows the progress bar
    moving and then the generated image at the requested size. The model edits no images: the page
    shows no edit mode."""
    browser = _open_page(tiny_server.url, tmp_path / "profile")
    try:
        assert browser.evaluate("document.getElementById('mode').hidden && document.getElementById('images').hidden")
        browser.evaluate(
            """
            document.getElementById('prompt').value = 'a watercolor boat';
            const size = document.getElementById('size');
            size.add(new Option('64x64')); size.value = '64x64';
            document.getElementById('steps').value = '30';
            document.getElementById('seed').value = '5';
            // Record every progress value the page shows.
            window.seen = [];
            new MutationObserver(() => window.seen.push(document.getElementById('progress').value))
              .observe(document.getElementById('status'), {childList: true, subtree: true});
            document.getElementById('generate').click();
            """
        )
        state = _wait_for_page(browser)
        status = browser.evaluate("document.getElementById('status').textContent")
        assert state == "done", status
        image = browser.evaluate("(i => [i.naturalWidth, i.naturalHeight, i.hidden])(document.getElementById('image'))")
        assert image == [64, 64, False]
        seen = browser.evaluate("window.seen")
        assert any(0 < value < 30 for value in seen), f"no intermediate progress shown: {seen}"
        assert browser.evaluate("document.getElementById('model').textContent") == "model: test-model"
        # An error: its text shows in the status area, in the form's wide column (not the label column).
        browser.evaluate(  # submitted as an event: the input's own max="1000" would stop a click
            "document.getElementById('steps').value = '5000';"
            "document.getElementById('form').dispatchEvent(new Event('submit', {cancelable: true}))"
        )
        deadline = time.monotonic() + 20
        while browser.evaluate("document.getElementById('status').dataset.state") != "error":
            assert time.monotonic() < deadline, "the error was not shown"
            time.sleep(0.1)
        status, column, width, label_width = browser.evaluate(
            "(s => [s.textContent, getComputedStyle(s).gridColumnStart, s.offsetWidth,"
            " document.querySelector('label[for=prompt]').offsetWidth])(document.getElementById('status'))"
        )
        assert status.startswith("400: num_inference_steps must be an integer between 1 and 1000"), status
        assert column == "2" and width > 3 * label_width, (column, width, label_width)
        shot = browser.send("Page.captureScreenshot", {"format": "png"})["data"]
        (tmp_path / "page.png").write_bytes(base64.b64decode(shot))
    finally:
        browser.close()


@pytest.mark.slow
def test_web_page_edits_an_uploaded_image(tiny_edit_server, tmp_path):
    """On an edit model the page opens in edit mode (the model only edits): Chromium uploads a 2:1 PNG into the file
    input, clicks Generate, and the page shows the edited image at the size "auto" gives (the image's ratio at the
    server's VAE area: 96x32); a second upload of two images shows the last one's ratio."""
    wide, tall = tmp_path / "wide.png", tmp_path / "tall.png"
    Image.new("RGB", (96, 48), (200, 30, 30)).save(wide)
    Image.new("RGB", (40, 72), (30, 30, 200)).save(tall)
    browser = _open_page(tiny_edit_server.url, tmp_path / "profile")
    try:
        mode = browser.evaluate(
            "[document.getElementById('mode').value, document.getElementById('images').hidden,"
            " document.getElementById('size').value, document.getElementById('images').multiple]"
        )
        assert mode == ["edit", False, "auto", True]
        document = browser.send("DOM.getDocument")["root"]["nodeId"]
        files = browser.send("DOM.querySelector", {"nodeId": document, "selector": "#images"})["nodeId"]
        for paths, size in (([wide], [96, 32]), ([wide, tall], [32, 96])):
            browser.send("DOM.setFileInputFiles", {"nodeId": files, "files": [str(p) for p in paths]})
            browser.evaluate(
                """
                document.getElementById('images').dispatchEvent(new Event('change'));
                document.getElementById('prompt').value = 'make the sky green';
                document.getElementById('steps').value = '2';
                document.getElementById('seed').value = '3';
                document.getElementById('generate').click();
                """
            )
            state = _wait_for_page(browser)
            status = browser.evaluate("document.getElementById('status').textContent")
            assert state == "done", status
            image = "(i => [i.naturalWidth, i.naturalHeight, i.hidden])(document.getElementById('image'))"
            assert browser.evaluate(image) == [*size, False], status
            assert browser.evaluate("document.querySelectorAll('#previews img').length") == len(paths)
        shot = browser.send("Page.captureScreenshot", {"format": "png"})["data"]
        (tmp_path / "edit-page.png").write_bytes(base64.b64decode(shot))
    finally:
        browser.close()


# ---- the engine with a fake generator: health, queueing, failures, disconnects --------------------


def test_health_is_503_until_loaded_and_warmed(serve):
    """/health answers 503 while the model loads and 200 once it is warmed up; generation requests
    meanwhile get 503; /metrics reports readiness."""
    release = threading.Event()
    fake = FakeGenerator()

    def slow_load():
        release.wait(30)
        return fake

    server = LiveServer(Engine(slow_load, warmup=Warmup(32, 32, 1)))
    try:
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 503 and health.json() == {"status": "loading"}
        early = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "x"})
        assert early.status_code == 503 and early.json()["error"]["code"] == "not_ready"
        assert server.metrics()["fastdit_ready"] == 0
        release.set()
        server.wait_ready(10)
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert server.metrics()["fastdit_ready"] == 1
        assert fake.calls == [["warmup"]]
    finally:
        release.set()
        server.stop()


BAD_REQUESTS = [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "x" * 9000}, "prompt"),
    ({"prompt": "x", "size": "big"}, "size"),
    ({"prompt": "x", "size": "100x100"}, "size"),
    ({"prompt": "x", "size": "512x512"}, "size"),  # above the server's max side (256)
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 11}, "n"),
    ({"prompt": "x", "n": 5, "size": "32x32"}, "n"),  # above --max-batch (4)
    ({"prompt": "x", "n": "many"}, "n"),
    ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
    ({"prompt": "x", "num_inference_steps": 1001}, "num_inference_steps"),
    ({"prompt": "x", "true_cfg_scale": 0.2}, "true_cfg_scale"),  # the CLI's rule: 1 (off) to 100
    ({"prompt": "x", "response_format": "gif"}, "response_format"),
    ({"prompt": "x", "true_cfg_scale": -1}, "true_cfg_scale"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "stream": True}, "stream"),  # only on the non-streaming route
    ({"prompt": 3}, "prompt"),
]


def test_bad_input_is_400_naming_the_field(serve):
    """Each invalid field is answered 400 with an OpenAI error whose `param` names it; malformed JSON
    and an oversized body are rejected too; none of them reaches the engine."""
    fake = FakeGenerator()
    server = serve(fake, max_batch=4)
    url = f"{server.url}/v1/images/generations"
    for body, param in BAD_REQUESTS:
        for path in (url,) if "stream" in body else (url, f"{url}/stream"):
            answer = httpx.post(path, json=body)
            assert answer.status_code == 400, (body, answer.text)
            error = answer.json()["error"]
            assert error["param"] == param and error["type"] == "invalid_request_error", (body, error)
            assert param in error["message"], error
    not_json = httpx.post(url, content=b"{prompt", headers={"content-type": "application/json"})
    assert not_json.status_code == 400 and not_json.json()["error"]["param"] is None
    huge = httpx.post(url, json={"prompt": "x" * (2 << 20)})
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
    chunked = httpx.post(url, content=iter([b'{"prompt": "', b"x" * (2 << 20), b'"}']))
    assert chunked.status_code == 413
    assert fake.calls == []
    # Nulls mean defaults, and unknown OpenAI fields are ignored.
    ok = httpx.post(
        url,
        json={
            "prompt": "x",
            "n": None,
            "size": "32x32",
            "num_inference_steps": 1,
            "background": "auto",
            "output_format": "png",
            "moderation": "low",
        },
    )
    assert ok.status_code == 200, ok.text
    assert httpx.get(f"{server.url}/v1/images/files/nothing.png").status_code == 404


def test_engine_failure_is_500_for_that_request_only(serve):
    """A generator exception answers 500 to the request that caused it; a batch that fails is re-run
    one request at a time, so its other requests still succeed; the server keeps serving."""
    gate = threading.Event()
    fake = FakeGenerator(gate=gate)
    server = serve(fake, max_batch=4)
    url = f"{server.url}/v1/images/generations"
    body = {"size": "32x32", "num_inference_steps": 2}
    gate.set()
    failed = httpx.post(url, json={"prompt": "FAIL alone", **body})
    assert failed.status_code == 500
    assert failed.json()["error"]["type"] == "server_error" and "out of memory" in failed.json()["error"]["message"]

    gate.clear()
    with ThreadPoolExecutor(3) as pool:
        busy = pool.submit(httpx.post, url, json={"prompt": "busy", **body}, timeout=30)
        _wait_for(lambda: fake.calls[-1:] == [["busy"]], what="the busy call")
        good = pool.submit(httpx.post, url, json={"prompt": "good", **body}, timeout=30)
        bad = pool.submit(httpx.post, url, json={"prompt": "FAIL batched", **body}, timeout=30)
        _wait_for(lambda: server.metrics()["fastdit_queue_depth"] == 2, what="2 queued requests")
        gate.set()
        assert busy.result().status_code == 200
        assert good.result().status_code == 200
        assert bad.result().status_code == 500
    batched, *alone = fake.calls[-3:]  # the two requests race into the queue: either order
    assert sorted(batched) == ["FAIL batched", "good"] and alone == [[prompt] for prompt in batched]
    assert httpx.post(url, json={"prompt": "after", **body}).status_code == 200
    assert server.metrics()['fastdit_requests_total{status="500"}'] == 2


def test_50_concurrent_requests_get_200_or_429(serve):
    """50 simultaneous requests against a queue of 8: every answer is 200 or 429 (OpenAI-shaped,
    with Retry-After), both occur, and the server is healthy afterwards."""
    server = serve(FakeGenerator(step_s=0.01), max_queue=8, max_batch=4)

    async def burst():
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(
                *[
                    client.post(
                        f"{server.url}/v1/images/generations",
                        json={"prompt": f"p{i}", "size": "32x32", "num_inference_steps": 5},
                    )
                    for i in range(50)
                ]
            )

    answers = asyncio.run(burst())
    codes = [answer.status_code for answer in answers]
    assert set(codes) <= {200, 429} and 200 in codes and 429 in codes, codes
    for answer in answers:
        if answer.status_code == 429:
            assert int(answer.headers["retry-after"]) >= 1
            assert answer.json()["error"]["type"] == "rate_limit_error"
        else:
            assert len(answer.json()["data"]) == 1
    assert httpx.get(f"{server.url}/health").status_code == 200
    metrics = server.metrics()
    assert metrics['fastdit_requests_total{status="429"}'] == codes.count(429)
    assert metrics["fastdit_queue_depth"] == 0
    ok = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "after", "size": "32x32"})
    assert ok.status_code == 200


def test_client_disconnects(serve):
    """A client that disconnects while queued is dropped unrun (metrics: stage="queued"); one that
    disconnects mid-run stops a batch it was alone in (stage="running"); the server serves on."""
    gate = threading.Event()
    fake = FakeGenerator(gate=gate)
    server = serve(fake)
    url = f"{server.url}/v1/images/generations"
    body = {"size": "32x32", "num_inference_steps": 3}
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(httpx.post, url, json={"prompt": "busy", **body}, timeout=30)
        _wait_for(lambda: fake.calls == [["busy"]], what="the busy call")
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
            httpx.post(url, json={"prompt": "impatient", **body}, timeout=0.5)
        _wait_for(
            lambda: server.metrics().get('fastdit_requests_dropped_total{stage="queued"}') == 1,
            what="the queued drop",
        )
        gate.set()
        assert busy.result().status_code == 200
    assert fake.calls == [["busy"]], "the dropped request must never run"

    gate.clear()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json={"prompt": "leaves mid-run", **body}, timeout=0.5)
    _wait_for(
        lambda: server.metrics().get('fastdit_requests_dropped_total{stage="running"}') == 1,
        what="the running drop",
    )
    gate.set()
    answer = httpx.post(url, json={"prompt": "next", **body}, timeout=30)
    assert answer.status_code == 200
    assert fake.calls[-2:] == [["leaves mid-run"], ["next"]]
    metrics = server.metrics()
    assert metrics['fastdit_requests_total{status="499"}'] == 2
    assert metrics["fastdit_images_generated_total"] == 2  # busy + next; the abandoned batch stopped

    # The streaming endpoint drops a queued client the same way.
    gate.clear()
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(httpx.post, url, json={"prompt": "busy 2", **body}, timeout=30)
        _wait_for(lambda: fake.calls[-1:] == [["busy 2"]], what="the second busy call")
        with httpx.stream("POST", f"{url}/stream", json={"prompt": "stream leaves", **body}, timeout=30):
            _wait_for(lambda: server.metrics()["fastdit_queue_depth"] == 1, what="the stream request queued")
        _wait_for(
            lambda: server.metrics().get('fastdit_requests_dropped_total{stage="queued"}') == 2,
            what="the stream drop",
        )
        gate.set()
        assert busy.result().status_code == 200
    assert ["stream leaves"] not in fake.calls


def test_schemathesis_finds_no_server_errors(serve, tmp_path):
    """Schemathesis fuzzes every operation of the server's OpenAPI schema (30 examples each, positive
    and negative data; the edit routes' multipart bodies against a model that takes images) and no
    answer is a 5xx."""
    if shutil.which("schemathesis") is None:
        pytest.skip("schemathesis is not installed")
    server = serve(FakeGenerator(side=16, max_images=3), max_queue=64, max_batch=10, max_side=2048)
    command = [
        "schemathesis",
        "run",
        f"{server.url}/openapi.json",
        "--checks",
        "not_a_server_error",
        "--max-examples",
        "30",
        "--seed",
        "1",
        "--workers",
        "2",
        "--request-timeout",
        "20",
        "--generation-database",
        "none",
        "--no-color",
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


# ---- the CLI ------------------------------------------------------------------------------------


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    """A missing or unloadable model folder and a port in use are one-line errors with exit code 2."""
    assert main(["serve", "--model", str(tmp_path / "absent")]) == 2
    assert "no such folder" in capsys.readouterr().err
    taken = bind_socket("127.0.0.1", 0)
    try:
        with pytest.raises(FastditError, match="already in use"):
            bind_socket("127.0.0.1", taken.getsockname()[1])
        assert main(["serve", "--model", str(tmp_path), "--port", str(taken.getsockname()[1])]) == 2
        assert "already in use" in capsys.readouterr().err
    finally:
        taken.close()
    with pytest.raises(SystemExit):
        main(["serve", "--model", "x", "--max-batch", "0"])
    # A folder that does not load: the engine thread fails, the server stops, the error is one line.
    assert main(["serve", "--model", str(tmp_path), "--port", "0", "--log-level", "error"]) == 2
    assert "model_index.json is missing" in capsys.readouterr().err


def test_cli_refuses_int8_attention_on_cpu_before_binding(tmp_path, capsys):
    """--attention int8 --device cpu: exit 2 with one line naming CUDA, before the port is bound (a port in use is
    not what it reports) and before the model folder is looked at; the same through `python -m fastdit`."""
    argv = ["serve", "--model", str(tmp_path / "absent"), "--attention", "int8", "--device", "cpu"]
    taken = bind_socket("127.0.0.1", 0)
    try:
        assert main([*argv, "--port", str(taken.getsockname()[1])]) == 2
    finally:
        taken.close()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "8-bit attention" in err[0] and "CUDA" in err[0], err
    run = subprocess.run(
        [sys.executable, "-m", "fastdit", *argv, "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, run.stderr
    assert len(lines) == 1 and lines[0].startswith("fastdit: error: 8-bit attention") and "CUDA" in lines[0], lines


def test_cli_refuses_cuda_graph_on_cpu(tmp_path, capsys):
    """--cuda-graph --device cpu: exit 2 with one line, before the model folder is looked at."""
    assert main(["serve", "--model", str(tmp_path / "absent"), "--cuda-graph", "--device", "cpu", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--cuda-graph needs a CUDA device" in err[0], err


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_shuts_down_cleanly(sig, tmp_path, tiny_cache):
    """`python -m fastdit serve --model tiny-random` answers a request; SIGTERM/SIGINT then stop the engine and the
    app (lifespan shutdown) and the process exits by the signal (SIGTERM) or with 130 (SIGINT)."""
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fastdit",
                "serve",
                "--model",
                "tiny-random",
                "--port",
                str(port),
                "--warmup-size",
                "32x32",
                "--max-batch",
                "2",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, "FASTDIT_CACHE": str(tiny_cache)},  # the session's tiny folder, built
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the server did not become healthy"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/images/generations",
            json={"prompt": "x", "size": "32x32", "num_inference_steps": 1},
            timeout=60,
        )
        assert answer.status_code == 200
        process.send_signal(sig)
        code = process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    text = log.read_text()
    assert code == (-signal.SIGTERM if sig == signal.SIGTERM else 130), text
    assert "engine stopped" in text and "Application shutdown complete" in text, text
