"""Out of memory during a request: 500 for that request, its memory given back before the next one, the server
healthy after. The error is injected into the real tiny pipeline (offload-text plan) inside a DiT block, where a
CUDA OOM would surface."""

from __future__ import annotations

import weakref

import httpx
import pytest
import torch

from fastdit.pipelines.qwenimage import QwenImagePipeline
from fastdit.server.engine import Engine
from tests.test_server import LiveServer


def test_oom_in_a_request_is_a_500_and_frees_its_memory(tiny_dir, monkeypatch):
    """A torch.OutOfMemoryError raised in a DiT block during one request: that request gets 500 (server_error),
    the tensors of the failed call are unreachable when the engine empties the allocator's cache (its frames are
    cleared from the traceback the job keeps), nothing of the offloaded text encoder stays on the device, /health
    stays 200 and the next request draws the same image as before the failure."""
    pipe = QwenImagePipeline.from_pretrained(tiny_dir, dtype=torch.float32, device="cpu", memory="offload-text")
    block = pipe.transformer.blocks[1]
    forward = block.forward
    failing, held = [], []

    def block_forward(*args, **kwargs):
        if failing:
            activations = torch.empty(1 << 20)  # what a real step holds when it runs out of memory
            held.append(weakref.ref(activations))
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return forward(*args, **kwargs)

    monkeypatch.setattr(block, "forward", block_forward)
    freed_at_empty_cache = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: freed_at_empty_cache.append(held[-1]() is None))

    server = LiveServer(Engine(lambda: pipe, max_batch=2), max_side=256)
    try:
        server.wait_ready()
        url = f"{server.url}/v1/images/generations"
        body = {"prompt": "a red fox", "size": "64x64", "num_inference_steps": 2, "seed": 3}
        before = httpx.post(url, json=body, timeout=60)
        assert before.status_code == 200
        failing.append(True)
        failed = httpx.post(url, json=body, timeout=60)
        failing.clear()
        assert failed.status_code == 500 and failed.json()["error"]["type"] == "server_error"
        assert "out of memory" in failed.json()["error"]["message"]
        assert freed_at_empty_cache == [True]
        assert not pipe.memory.text.loaded
        assert httpx.get(f"{server.url}/health").status_code == 200
        after = httpx.post(url, json=body, timeout=60)
        assert after.status_code == 200 and after.json()["data"] == before.json()["data"]
    finally:
        server.stop()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_real_oom_under_a_cap_is_a_500_and_the_server_recovers(tiny_dir):
    """On CUDA with the process capped (torch.cuda.set_per_process_memory_fraction) at 256 MiB: a request too large
    for the cap runs out of memory for real and gets 500, the allocator is back near its level before it, and a
    small request after it draws the image it drew before."""
    device = torch.device("cuda")
    pipe = QwenImagePipeline.from_pretrained(tiny_dir, dtype=torch.float32, device="cuda")
    total = torch.cuda.get_device_properties(device).total_memory
    server = LiveServer(Engine(lambda: pipe, max_batch=1), max_side=4096)
    try:
        server.wait_ready()
        url = f"{server.url}/v1/images/generations"
        small = {"prompt": "a red fox", "size": "64x64", "num_inference_steps": 2, "seed": 3}
        before = httpx.post(url, json=small, timeout=120)
        assert before.status_code == 200
        torch.cuda.set_per_process_memory_fraction(256 * 2**20 / total, device)
        torch.cuda.empty_cache()
        level = torch.cuda.memory_allocated(device)
        large = {**small, "size": "4096x4096"}
        failed = httpx.post(url, json=large, timeout=300)
        assert failed.status_code == 500 and "out of memory" in failed.json()["error"]["message"]
        assert torch.cuda.memory_allocated(device) <= level + 64 * 2**20  # far below what the request wanted
        assert httpx.get(f"{server.url}/health").status_code == 200
        after = httpx.post(url, json=small, timeout=120)
        assert after.status_code == 200 and after.json()["data"] == before.json()["data"]
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        server.stop()
