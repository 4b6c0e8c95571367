"""`fastdit bench --stage pipeline`: whole images, end to end, with random weights built on the device (no download).

The pipeline is fastdit's `QwenImagePipeline` itself, called as a user calls it, on random-weight components of the
released geometry: Qwen2.5-VL-7B's language model as text encoder (a one-block vision tower: text-to-image never
runs it), the 20B DiT (bf16, or fp8 block linears), Qwen-Image's VAE; the tokenizer is the real Qwen2 one (rebuilt
offline, fastdit.tiny). A prompt of exactly `text_len` conditioning tokens; CFG (negative prompt " ", scale 4)
only with the default schedule. Each call's stage clock gives the split: text encoding, denoising, VAE decode
(including the 8-bit conversion). The VAE decode alone is then timed on the same VAE: fastdit's
single-frame decoder (as the pipeline runs it) against diffusers' `decode`.

Memory at 1024^2: about 58 GB in bf16 (DiT 41 GB + text encoder 15 GB + activations), about 38 GB with fp8.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastdit.bench.config import BenchConfig, log
from fastdit.bench.stages import QWEN25_VL_7B_TEXT
from fastdit.bench.timing import summarize, sync, time_steps
from fastdit.bench.vae import default_dtype, random_vae
from fastdit.bench.weights import random_dit
from fastdit.errors import FastditError
from fastdit.kernels.attention import resolve_backend
from fastdit.models.layers import set_attention_backend
from fastdit.models.qwenimage import PRESETS
from fastdit.pipelines.qwenimage import QwenImagePipeline
from fastdit.pipelines.text import conditioning_lengths
from fastdit.pipelines.vae import decode_frames
from fastdit.validation import SCHEDULER_STEPS

ANSWER_HEADER_TOKENS = 5  # `<|im_end|>\n<|im_start|>assistant\n` after the prompt, kept in the conditioning
STAGES = ("text_encode_s", "denoise_s", "vae_decode_s")


@dataclass(frozen=True)
class PipelineBench:
    """One pipeline benchmark: the image, the sampling and the fast paths, as explicit values."""

    preset: str = "qwen-image"
    height: int = 1024
    width: int = 1024
    batch: int = 1  # prompts per call
    text_len: int = 128  # conditioning tokens per prompt
    steps: int = 8
    scheduler: str = "lightning"
    cfg: bool = False  # negative prompt " " at scale 4 (the default schedule only)
    dtype: torch.dtype = torch.bfloat16
    quantize: str | None = None
    attention: str = "auto"
    compile: bool = False
    cuda_graph: bool = False
    warmup: int = 1
    iters: int = 5
    seed: int = 0

    @classmethod
    def from_config(cls, run: BenchConfig, dtype: torch.dtype) -> PipelineBench:
        if run.compile == "full" or run.compare or run.profile:
            raise FastditError(
                "--stage pipeline times whole images: --compile means the pipeline's own (block by block, and the "
                "VAE decoder on CUDA); --compile full, --compare and --profile are for --stage dit"
            )
        if run.text_len <= ANSWER_HEADER_TOKENS:
            raise FastditError(f"--text-len must be > {ANSWER_HEADER_TOKENS} for --stage pipeline (the answer header)")
        steps = run.steps if run.steps is not None else SCHEDULER_STEPS[run.scheduler]
        return cls(
            preset=run.preset,
            height=run.height,
            width=run.width,
            batch=run.batch,
            text_len=run.text_len,
            steps=steps,
            scheduler=run.scheduler,
            cfg=run.scheduler == "checkpoint" and not run.no_cfg,
            dtype=dtype,
            quantize=run.quantize,
            attention=run.attention,
            compile=run.compile is not None,
            cuda_graph=run.cuda_graph,
            warmup=run.warmup,
            iters=run.iters,
            seed=run.seed,
        )


def qwen2_tokenizer():
    """The real Qwen2 tokenizer, built offline once per fastdit cache (fastdit.tiny)."""
    from transformers import Qwen2Tokenizer

    from fastdit.tiny.common import build_qwen2_tokenizer, save_cached_tokenizer

    with tempfile.TemporaryDirectory() as folder:
        save_cached_tokenizer(Path(folder), "qwen2-tokenizer", build_qwen2_tokenizer)
        return Qwen2Tokenizer.from_pretrained(folder)


def random_text_encoder(preset: str, joint_dim: int, dtype: torch.dtype, device: torch.device):
    """Qwen2_5_VLForConditionalGeneration with random weights made in `dtype` on `device`: Qwen2.5-VL-7B's language
    model (tiny: 2 layers of width `joint_dim`) and a one-block vision tower."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    if preset == "tiny":
        heads = 4
        text = {
            "hidden_size": joint_dim,
            "intermediate_size": 2 * joint_dim,
            "num_hidden_layers": 2,
            "num_attention_heads": heads,
            "num_key_value_heads": 2,
            "vocab_size": 151680,  # the Qwen2 tokenizer's ids, rounded up to a multiple of 64
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 2, 2]},
        }
    else:
        text = dict(QWEN25_VL_7B_TEXT)
    if text["hidden_size"] != joint_dim:
        raise FastditError(f"text encoder width {text['hidden_size']} != the DiT's joint_dim {joint_dim}")
    vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": joint_dim}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision)
    with torch.device(device), default_dtype(dtype):
        model = Qwen2_5_VLForConditionalGeneration(config)
    return model.eval().requires_grad_(False)


def random_pipeline(opts: PipelineBench, device: torch.device) -> QwenImagePipeline:
    """fastdit's text-to-image pipeline on random-weight components of the preset's geometry."""
    from fastdit.quant.fp8 import quantize_model
    from fastdit.tiny import QWEN_IMAGE_SCHEDULER_CONFIG

    cfg = PRESETS[opts.preset]
    resolve_backend(opts.attention, device)  # an unavailable backend fails before anything is built
    log("building the text encoder")
    text_encoder = random_text_encoder(opts.preset, cfg.joint_dim, opts.dtype, device)
    log("building the DiT")
    transformer = random_dit(cfg, opts.dtype, device, opts.seed)
    if opts.quantize:
        quantize_model(transformer)
    set_attention_backend(transformer, opts.attention)
    return QwenImagePipeline(
        transformer=transformer,
        text_encoder=text_encoder,
        tokenizer=qwen2_tokenizer(),
        vae=random_vae(opts.preset, opts.dtype, device),
        scheduler_config=QWEN_IMAGE_SCHEDULER_CONFIG,
        device=device,
        dtype=opts.dtype,
    )


def prompt_of_length(tokenizer, tokens: int) -> str:
    """A prompt of exactly `tokens` conditioning tokens (its words and the answer header)."""
    prompt = " ".join(["photo"] * (tokens - ANSWER_HEADER_TOKENS))
    (got,) = conditioning_lengths(tokenizer, [prompt])
    if got != tokens:
        raise FastditError(f"could not make a prompt of {tokens} text tokens (got {got})")
    return prompt


def bench_pipeline(opts: PipelineBench, device: torch.device) -> dict:
    """Seconds per image (median over `iters` calls after a first call and `warmup` more), the stage split, peak
    memory, and the VAE decode alone: fastdit's against diffusers' on the same latents."""
    if opts.cuda_graph and device.type != "cuda":
        raise FastditError("--cuda-graph needs --device cuda")
    t0 = time.perf_counter()
    pipe = random_pipeline(opts, device)
    if opts.compile:
        pipe.compile()
    if opts.cuda_graph:
        pipe.enable_cuda_graph()
    build_s = time.perf_counter() - t0
    prompts = [prompt_of_length(pipe.tokenizer, opts.text_len)] * opts.batch
    kwargs = dict(
        negative_prompt=" " if opts.cfg else None,
        height=opts.height,
        width=opts.width,
        num_inference_steps=opts.steps,
        scheduler=opts.scheduler,
        seed=opts.seed,
        show_progress=False,
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    log("[pipeline] first call" + (" (compiling)" if opts.compile else ""))
    t0 = time.perf_counter()
    first = pipe(prompts, **kwargs).timings
    sync(device)
    first_s = time.perf_counter() - t0
    for _ in range(opts.warmup):
        pipe(prompts, **kwargs)
    calls = [pipe(prompts, **kwargs).timings for _ in range(opts.iters)]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    per_image = [c["total_s"] / opts.batch for c in calls]
    split = {k: statistics.median(c[k] for c in calls) for k in (*STAGES, "denoise_s_per_step", "total_s")}
    log(f"[pipeline] {statistics.median(per_image):.3f} s/image (first call {first_s:.1f} s)")

    # The VAE decode alone on one latent of this size: fastdit's (compiled if the pipeline is) and diffusers'.
    # Under inference mode, as in the pipeline call: the compiled decoder's graph is reused, not recompiled.
    z = torch.randn(opts.batch, pipe.latent_channels, 1, opts.height // 8, opts.width // 8, device=device)
    z = z.to(opts.dtype)
    with torch.inference_mode():
        fast_out, ref_out = decode_frames(pipe.vae, z), pipe.vae.decode(z, return_dict=False)[0][:, :, 0]
        decode = {
            "fastdit": summarize(time_steps(lambda: decode_frames(pipe.vae, z), device, 1, opts.iters)),
            "diffusers": summarize(time_steps(lambda: pipe.vae.decode(z, return_dict=False)[0], device, 1, opts.iters)),
            "max_abs_diff": (fast_out.float() - ref_out.float()).abs().max().item(),
        }
    return {
        "stage": "pipeline",
        "shapes": {"batch": opts.batch, "height": opts.height, "width": opts.width, "text_tokens": opts.text_len},
        "sampling": {"steps": opts.steps, "scheduler": opts.scheduler, "cfg": opts.cfg},
        "fast_paths": {
            "quantize": opts.quantize,
            "attention": opts.attention,
            "compile": opts.compile,
            "cuda_graph": opts.cuda_graph,
        },
        "build_s": build_s,
        "first_call_s": first_s,
        "first_call": first,
        "per_image": summarize(per_image),
        "split_median": split,
        "peak_mem_gib": peak,
        "vae_decode": decode,
    }


def print_pipeline(res: dict) -> None:
    s, sampling, fast, img = res["split_median"], res["sampling"], res["fast_paths"], res["per_image"]
    paths = [res["dtype"] if not fast["quantize"] else fast["quantize"], f"attention {fast['attention']}"]
    paths += ["compiled"] * fast["compile"] + ["CUDA graph"] * fast["cuda_graph"]
    cfg = "CFG" if sampling["cfg"] else "no CFG"
    shapes = res["shapes"]
    print(
        f"\npipeline {shapes['width']}x{shapes['height']}, batch {shapes['batch']}, {shapes['text_tokens']} text "
        f"tokens, {sampling['steps']} steps {sampling['scheduler']} ({cfg}), {', '.join(paths)}"
    )
    print(
        f"seconds per image: {img['median_s']:.3f} (min {img['min_s']:.3f}, max {img['max_s']:.3f}; {img['n']} calls); "
        f"first call {res['first_call_s']:.1f} s, build {res['build_s']:.1f} s"
        + (f", peak {res['peak_mem_gib']:.1f} GiB" if res["peak_mem_gib"] is not None else "")
    )
    print(
        f"split (median s per call): text encoder {s['text_encode_s']:.4f} | denoise {s['denoise_s']:.4f} "
        f"({s['denoise_s_per_step']:.4f}/step) | VAE decode + 8-bit {s['vae_decode_s']:.4f}"
    )
    d = res["vae_decode"]
    print(
        f"VAE decode alone: fastdit {d['fastdit']['median_s']:.4f} s, diffusers {d['diffusers']['median_s']:.4f} s "
        f"({d['diffusers']['median_s'] / d['fastdit']['median_s']:.2f}x); largest pixel difference {d['max_abs_diff']:.2e}"
    )
