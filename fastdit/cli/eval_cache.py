"""`fastdit eval-cache`: what a step cache costs in quality and gains in speed, on your prompts.

Each prompt of the file (one per line; blank lines and lines starting with # are skipped) is rendered twice with
the same seed, without and with `--cache`; per image it prints the cached steps, PSNR (dB) and SSIM of the cached
image against the uncached one, and both denoising times. SSIM comes from scikit-image (`pip install
"fastdit[eval]"`). Before measuring, `--warmup` untimed calls of the first prompt with each setting compile and
record CUDA graphs.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from fastdit.cache.cli import cache_spec, check_cache_fits
from fastdit.cli.common import (
    ModelOptions,
    add_model_arguments,
    check_model_options,
    check_writable_file,
    flag_error,
    integer,
    number,
    resolve_model,
    torch_device,
    torch_dtype,
)
from fastdit.errors import FastditError
from fastdit.validation import InputError, check_cfg_scale, check_prompts, check_size, check_steps


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval-cache",
        help="render prompts with and without a step cache: PSNR, SSIM and speed-up",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(p)
    p.add_argument("--prompts", required=True, metavar="FILE", help="text file, one prompt per line")
    p.add_argument(
        "--cache", type=cache_spec, required=True, metavar="SPEC", help="the step cache to evaluate (as generate)"
    )
    p.add_argument("--negative-prompt", default=None, help="negative prompt for every image (CFG needs one)")
    p.add_argument("--cfg-scale", type=number, default=None, help="true CFG scale (default: 4.0 with a negative)")
    p.add_argument("--height", type=integer, default=1024, help="image height in pixels (default: 1024)")
    p.add_argument("--width", type=integer, default=1024, help="image width in pixels (default: 1024)")
    p.add_argument("--steps", type=integer, default=50, help="denoising steps (default: 50)")
    p.add_argument("--seed", type=integer, default=0, help="seed of every image (default: 0)")
    p.add_argument("--warmup", type=integer, default=1, help="untimed calls per setting before measuring (1)")
    p.add_argument("--output-dir", default=None, metavar="DIR", help="also write N-base.png and N-cache.png here")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the numbers as JSON")
    p.set_defaults(func=eval_cache_main)
    return p


def read_prompts(path: str) -> list[str]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise FastditError(f"--prompts {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise FastditError(f"--prompts {path}: no prompt in it (one per line; # starts a comment)")
    return prompts


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio of two uint8 images in dB (inf when equal)."""
    import numpy as np

    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def ssim(a, b) -> float:
    """Structural similarity of two uint8 RGB images (scikit-image's defaults: uniform 7x7 windows)."""
    try:
        from skimage.metrics import structural_similarity
    except ImportError:
        raise FastditError('eval-cache needs scikit-image for SSIM: pip install "fastdit[eval]"') from None
    return float(structural_similarity(a, b, channel_axis=2, data_range=255))


def eval_cache_main(args: argparse.Namespace) -> int:
    import numpy as np

    from fastdit.pipelines import load_pipeline

    prompts = read_prompts(args.prompts)
    try:
        for prompt in prompts:
            check_prompts(prompt)
        check_size(args.height, args.width)
        check_steps(args.steps)
        cfg = None if args.cfg_scale is None else check_cfg_scale(args.cfg_scale)
    except InputError as e:
        raise flag_error(e) from None
    if args.warmup < 0:
        raise FastditError(f"--warmup {args.warmup}: must be >= 0")
    args.cache.check_steps(args.steps)
    options = ModelOptions.from_args(args)
    check_model_options(options)
    out_dir = Path(args.output_dir) if args.output_dir else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    if args.json:
        check_writable_file(Path(args.json), "--json")
    folder = resolve_model(args.model)
    check_cache_fits(args.cache, folder)
    dtype = torch_dtype(options.dtype, options.device)
    pipe = load_pipeline(
        folder, dtype=dtype, device=torch_device(options.device), quantize=options.quantize, attention=options.attention
    )
    if options.compile:
        pipe.compile()
    if options.cuda_graph:
        pipe.enable_cuda_graph()
    kw = dict(
        negative_prompt=args.negative_prompt,
        true_cfg_scale=cfg,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        seed=args.seed,
        show_progress=False,
    )
    for _ in range(args.warmup):
        pipe(prompts[0], **kw)
        pipe(prompts[0], cache=args.cache, **kw)
    print(f"cache {args.cache.spec()}, {args.steps} steps, {args.width}x{args.height}, seed {args.seed}")
    print(
        f"{'#':>3s} {'cached':>6s} {'PSNR dB':>8s} {'SSIM':>7s} {'base s':>8s} {'cache s':>8s} {'speed-up':>8s}  prompt"
    )
    records = []
    for n, prompt in enumerate(prompts):
        base = pipe(prompt, **kw)
        cached = pipe(prompt, cache=args.cache, **kw)
        a, b = np.asarray(base[0].convert("RGB")), np.asarray(cached[0].convert("RGB"))
        r = {
            "prompt": prompt,
            "cached_steps": cached.cached_steps,
            "psnr_db": psnr(a, b),
            "ssim": ssim(a, b),
            "base_denoise_s": base.timings["denoise_s"],
            "cache_denoise_s": cached.timings["denoise_s"],
        }
        records.append(r)
        speedup = r["base_denoise_s"] / r["cache_denoise_s"]
        print(
            f"{n:3d} {r['cached_steps']:6d} {r['psnr_db']:8.2f} {r['ssim']:7.4f} {r['base_denoise_s']:8.3f} "
            f"{r['cache_denoise_s']:8.3f} {speedup:7.2f}x  {prompt[:60]}"
        )
        if out_dir is not None:
            base[0].save(out_dir / f"{n}-base.png")
            cached[0].save(out_dir / f"{n}-cache.png")
    total_base = sum(r["base_denoise_s"] for r in records)
    total_cache = sum(r["cache_denoise_s"] for r in records)
    summary = {
        "mean_psnr_db": float(np.mean([min(r["psnr_db"], 100.0) for r in records])),
        "mean_ssim": float(np.mean([r["ssim"] for r in records])),
        "mean_cached_steps": float(np.mean([r["cached_steps"] for r in records])),
        "speedup": total_base / total_cache,
    }
    print(
        f"mean: {summary['mean_cached_steps']:.1f} of {args.steps} steps cached, PSNR {summary['mean_psnr_db']:.2f} dB "
        f"(identical images count as 100), SSIM {summary['mean_ssim']:.4f}; denoising {total_base:.3f} s -> "
        f"{total_cache:.3f} s, {summary['speedup']:.2f}x"
    )
    if args.json:
        images = [{**r, "psnr_db": r["psnr_db"] if math.isfinite(r["psnr_db"]) else None} for r in records]
        record = {"cache": args.cache.spec(), "steps": args.steps, "images": images, **summary}
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0
