"""`fastdit bench --stage vae`: the image decode, fastdit's single-frame decoder against diffusers' decode on the
same random-weight `AutoencoderKLQwenImage` in the same run (fastdit.pipelines.vae says what differs)."""

from __future__ import annotations

import contextlib

import torch

from fastdit.bench.config import BenchConfig, log
from fastdit.bench.timing import measure, summarize
from fastdit.pipelines.vae import FrameDecoder, cudnn_autotune


def random_vae(preset: str, dtype: torch.dtype, device: torch.device):
    """Qwen-Image's VAE geometry (tiny: base width 8, one res block per level) with random weights, made in `dtype`
    on `device` (never a float32 copy there)."""
    from diffusers import AutoencoderKLQwenImage

    geometry = {"base_dim": 8, "num_res_blocks": 1} if preset == "tiny" else {}
    with torch.device(device), default_dtype(dtype):
        return AutoencoderKLQwenImage(**geometry).eval().requires_grad_(False)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def bench_vae(run: BenchConfig, device: torch.device, dtype: torch.dtype) -> dict:
    """Decode one (batch, 16, 1, H/8, W/8) latent: diffusers' `decode` (as the pipelines used to) and fastdit's
    FrameDecoder: NCHW, channels-last, with cuDNN autotuning (CUDA) and compiled (--compile). Reports each run's
    time, first-call time (compile warm-up, cuDNN search), peak memory and largest difference from diffusers."""
    vae = random_vae(run.preset, dtype, device)
    z = torch.randn(run.batch, vae.config.z_dim, 1, run.height // 8, run.width // 8, device=device, dtype=dtype)
    cuda = device.type == "cuda"
    runs, diffs = {}, {}
    reference = None

    def timed(name: str, fn, autotune: bool = False, first_note: str = ""):
        nonlocal reference
        log(f"[{name}] warming up{first_note}")
        with cudnn_autotune(autotune):
            out, first, times, peak = measure(fn, device, run.warmup, run.iters)
        r = summarize(times)
        r["first_call_s"] = first
        if peak is not None:
            r["peak_mem_gib"] = peak
        out = out.float()
        if reference is None:
            reference = out
        else:
            r["max_abs_diff_vs_diffusers"] = diffs[name] = (out - reference).abs().max().item()
        runs[name] = r
        log(f"[{name}] {r['median_s']:.4f} s/decode (first call {first:.1f} s)")

    timed("diffusers decode", lambda: vae.decode(z, return_dict=False)[0][:, :, 0])
    if cuda:
        timed("diffusers decode + cudnn.benchmark", lambda: vae.decode(z, return_dict=False)[0][:, :, 0], True)
    frame = z[:, :, 0]
    nchw = FrameDecoder(vae, channels_last=False)
    timed("fastdit decode (NCHW)", lambda: nchw(frame))
    nhwc = FrameDecoder(vae, channels_last=True)
    timed("fastdit decode (channels-last)", lambda: nhwc(frame))
    if cuda:
        timed("fastdit decode (channels-last) + cudnn.benchmark", lambda: nhwc(frame), True)
    if run.compile:
        # What the pipeline runs after pipe.compile() on CUDA: channels-last, cuDNN autotuning, compiled.
        compiled = FrameDecoder(vae, channels_last=True, cudnn_benchmark=cuda).compile_layers()
        timed("fastdit decode compiled (the pipeline's)", lambda: compiled(frame), first_note=" (compiling)")
    return {
        "stage": "vae",
        "shapes": {"batch": run.batch, "height": run.height, "width": run.width},
        "base_run": "diffusers decode",
        "runs": runs,
        "notes": [
            f"largest |fastdit - diffusers| pixel value ({run.dtype}; images in [-1, 1]): {max(diffs.values()):.2e}"
        ],
    }
