"""The server as a first user meets it: the same input rules as the CLI (fastdit.validation), clear 400s, an API
key, a dead engine that /health reports and that ends the process, and PNG storage bounded in bytes.

Servers run in a thread of the test process with a fake generator (tests/test_server.py's `LiveServer`)."""

from __future__ import annotations

import threading

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastdit.server.app import _ImageStore
from fastdit.server.engine import Engine
from fastdit.server.run import ServerOptions, bind_socket, run_server
from fastdit.validation import InputError, check_cfg_scale, check_seed, check_steps
from tests.test_server import FakeGenerator, LiveServer, _wait_for


@pytest.fixture
def server():
    live = LiveServer(Engine(lambda: FakeGenerator(side=16), max_batch=4), max_side=256)
    live.wait_ready()
    yield live
    live.stop()


def _rule(check, *args) -> str:
    with pytest.raises(InputError) as e:
        check(*args)
    return str(e.value)


@pytest.mark.parametrize(
    "field, value, check",
    [
        ("true_cfg_scale", 0.2, lambda v: check_cfg_scale(v)),
        ("true_cfg_scale", 101.5, lambda v: check_cfg_scale(v)),
        ("num_inference_steps", 1001, lambda v: check_steps(v)),
        ("seed", 2**63, lambda v: check_seed(v, 1)),
    ],
)
def test_server_refuses_what_the_cli_refuses_with_the_same_sentence(field, value, check, server):
    """A value outside the validation layer's rule is a 400 naming the field, with that layer's sentence."""
    answer = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "x", field: value})
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == field and error["message"] == _rule(check, value), error


def test_server_accepts_the_cli_ranges_and_says_size_too_big(server):
    """Seeds up to 2**63 - 1 and 1000 steps are served; a size above --max-size says it is too big; a JSON body
    sent without a content-type is a 400 that says how to send it."""
    url = f"{server.url}/v1/images/generations"
    for body in ({"seed": 2**63 - 1}, {"num_inference_steps": 1000}, {"true_cfg_scale": 1}):
        answer = httpx.post(url, json={"prompt": "x", "size": "32x32", **body}, timeout=60)
        assert answer.status_code == 200, (body, answer.text)
    too_big = httpx.post(url, json={"prompt": "x", "size": "100000x100000"}).json()["error"]
    assert too_big["param"] == "size" and "is too big: each side must be at most 256 pixels" in too_big["message"]
    bare = httpx.post(url, content=b'{"prompt": "x"}')
    assert bare.status_code == 400, bare.text
    assert "content-type: application/json" in bare.json()["error"]["message"]


def test_metrics_are_valid_prometheus_text(server):
    """/metrics parses with Prometheus' own parser and has every fastdit series."""
    httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "x", "size": "32x32"}, timeout=60)
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{server.url}/metrics").text)}
    for name in ("fastdit_ready", "fastdit_queue_depth", "fastdit_requests", "fastdit_requests_dropped"):
        assert name in families, sorted(families)
    for name in ("fastdit_images_generated", "fastdit_step_seconds", "fastdit_batch_seconds", "fastdit_batch_images"):
        assert name in families, sorted(families)
    (ok,) = [s for s in families["fastdit_requests"].samples if s.name.endswith("_total")]
    assert ok.labels == {"status": "200"} and ok.value == 1


def test_api_key():
    """With --api-key, /v1/* needs the bearer token (401, OpenAI-shaped, without or with a wrong one); the
    official client's api_key= works; /health and /metrics stay open."""
    from openai import AuthenticationError, OpenAI

    live = LiveServer(Engine(lambda: FakeGenerator(side=16)), max_side=256, api_key="sekrit")
    try:
        live.wait_ready()
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekrit"}):
            answer = httpx.get(f"{live.url}/v1/models", headers=headers)
            assert answer.status_code == 401, answer.text
            assert answer.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{live.url}/health").status_code == 200
        assert httpx.get(f"{live.url}/metrics").status_code == 200
        good = OpenAI(base_url=f"{live.url}/v1", api_key="sekrit", max_retries=0)
        assert len(good.images.generate(prompt="x", size="32x32").data) == 1
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=f"{live.url}/v1", api_key="nope", max_retries=0).images.generate(prompt="x")
    finally:
        live.stop()


def test_sticky_device_error_kills_the_server():
    """An illegal-address CUDA error (injected into the generator) fails its request with 500, turns /health to
    503 "failed", and ends `run_server` by raising the error (so `fastdit serve` exits non-zero, and a
    supervisor restarts it)."""

    class Crashing(FakeGenerator):
        def __call__(self, prompt, **kwargs):
            if "CRASH" in str(prompt):
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return super().__call__(prompt, **kwargs)

    sock = bind_socket("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    raised: list[BaseException] = []

    def serve():
        try:
            run_server(sock, lambda: Crashing(side=16), ServerOptions(model_id="t", warmup=None, log_level="error"))
        except BaseException as e:
            raised.append(e)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/health").status_code == 200
        except httpx.TransportError:
            return False

    _wait_for(healthy, 30, "the server")
    assert httpx.post(f"{url}/v1/images/generations", json={"prompt": "x", "size": "32x32"}).status_code == 200
    crash = httpx.post(f"{url}/v1/images/generations", json={"prompt": "CRASH", "size": "32x32"}, timeout=30)
    assert crash.status_code == 500 and "illegal memory access" in crash.json()["error"]["message"]
    thread.join(30)
    assert not thread.is_alive(), "the server did not stop"
    assert len(raised) == 1 and "illegal memory access" in str(raised[0]) and not isinstance(raised[0], ValueError)


def test_sticky_device_error_health_says_failed():
    """While a dead engine's server is still shutting down, /health answers 503 "failed" with the error."""
    live = LiveServer(Engine(lambda: FakeGenerator(side=16)), max_side=256)
    try:
        live.wait_ready()
        live.engine._fail(RuntimeError("CUDA error: device-side assert triggered"))
        health = httpx.get(f"{live.url}/health")
        assert health.status_code == 503 and health.json()["status"] == "failed"
        assert "device-side assert" in health.json()["error"]
    finally:
        live.stop()


def test_image_store_is_bounded_in_bytes():
    """The PNGs kept for url answers never exceed the byte budget; the oldest go first."""
    store = _ImageStore(capacity=100)
    first = store.put(b"a" * 60)
    second = store.put(b"b" * 30)
    assert store.get(first) is not None and store.size == 90
    third = store.put(b"c" * 50)
    assert store.get(first) is None and store.get(second) is not None and store.get(third) is not None
    assert store.size == 80 <= store.capacity


def test_serve_warns_about_an_open_public_bind(tmp_path, monkeypatch, capsys):
    """Binding beyond 127.0.0.1 without a key gets a one-line note; with FASTDIT_API_KEY set it does not; an
    empty key is refused."""
    from fastdit.cli.main import main

    argv = ["serve", "--model", str(tmp_path / "absent"), "--host", "0.0.0.0", "--port", "0", "--device", "cpu"]
    monkeypatch.delenv("FASTDIT_API_KEY", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "serving on 0.0.0.0 without --api-key" in err and "no such folder" in err, err
    monkeypatch.setenv("FASTDIT_API_KEY", "sekrit")
    assert main(argv) == 2
    assert "without --api-key" not in capsys.readouterr().err
    monkeypatch.setenv("FASTDIT_API_KEY", " ")
    assert main(argv) == 2
    assert "FASTDIT_API_KEY is empty" in capsys.readouterr().err
