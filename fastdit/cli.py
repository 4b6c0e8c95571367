"""The `fastdit` command line: `fastdit generate` here; `bench` and `serve` register themselves.

Bad input (sizes, steps, paths, prompts, incomplete models) exits with status 2 and one line on
stderr, `fastdit: error: ...`; never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import re
import sys
from pathlib import Path

from fastdit.attention import BACKENDS
from fastdit.errors import FastditError

TINY_RANDOM = "tiny-random"
MODEL_HELP = (  # --model of generate, serve and quantize: all three go through resolve_model
    "diffusers-format Qwen-Image folder, a Hugging Face repo id (e.g. Qwen/Qwen-Image; downloaded with "
    f"huggingface_hub), or {TINY_RANDOM!r}: a tiny random-weight pipeline that draws noise (tests)"
)
DTYPES = {"auto": None, "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}
DTYPES |= {"float32": "float32", "fp32": "float32"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
# owner/name as the Hugging Face Hub spells repo ids.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Modules that add their own subcommands: (module, what it provides).
_PLUGINS = (("fastdit.bench", "bench"), ("fastdit.server.cli", "serve"), ("fastdit.quant", "quantize"))


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`fastdit generate: error: ...`) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_attention_argument(parser) -> None:
    """--attention, shared by `generate` and `serve` (`math` is the tests' oracle, not offered)."""
    parser.add_argument(
        "--attention",
        choices=[b for b in BACKENDS if b != "math"],
        default="auto",
        help="attention backend of the DiT (auto: cuDNN on CUDA, else SDPA; int8: fastdit's 8-bit kernel, INT8 "
        "Q.K and FP8 P.V, CUDA compute capability >= 8.9 with Triton; fp8: cuDNN's fp8 attention, Hopper or "
        "newer with nvidia-cudnn-frontend; both approximate)",
    )


def add_cuda_graph_argument(parser) -> None:
    """--cuda-graph, shared by `generate` and `serve` (fastdit.pipeline.QwenImagePipeline.enable_cuda_graph)."""
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="replay each denoising step from a CUDA graph, recorded at a call's first step (CUDA only; the "
        "graph of the latest image size and text length stays in GPU memory for later calls)",
    )


def _on_cuda(device) -> bool:
    """Whether the pipeline runs on CUDA: `--device`, or CUDA when there is one; FastditError if malformed."""
    import torch

    try:
        return torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    except RuntimeError as e:
        raise FastditError(f"--device {device}: {e}") from None


def check_cuda_graph_device(device) -> None:
    """--cuda-graph on a device that is not CUDA: a one-line error before anything loads."""
    if not _on_cuda(device):
        raise FastditError(f"--cuda-graph needs a CUDA device, but the pipeline would run on {device or 'cpu'}")


def cuda_graph_hint(args: argparse.Namespace) -> str | None:
    """A one-line note when tp or sp runs on CUDA without --cuda-graph: those steps launch their collectives
    from Python and wait on the host (1.7-3.2x slower per step than replayed; benchmarks/RESULTS.md)."""
    tp, sp, _ = parallel_degrees(args)
    if args.cuda_graph or tp * sp == 1:
        return None
    try:
        if not _on_cuda(args.device):
            return None
    except FastditError:
        return None  # a malformed --device is reported by the device checks
    return "note: --tp/--sp steps are host-bound without --cuda-graph; add it to replay each step from a CUDA graph"


def add_parallel_arguments(parser, title: str) -> None:
    """--tp / --sp / --cfg-parallel / --master-port (fastdit.parallel), shared by generate, serve and bench."""
    par = parser.add_argument_group(title)
    par.add_argument("--tp", type=_positive_int, default=1, help="tensor-parallel degree (splits the DiT's heads)")
    par.add_argument(
        "--sp", type=_positive_int, default=1, help="Ulysses sequence-parallel degree (splits image tokens)"
    )
    par.add_argument(
        "--cfg-parallel", action="store_true", help="run the cond and uncond CFG branches on two rank groups"
    )
    par.add_argument(
        "--master-port", type=_int, default=None, help="rendezvous port on 127.0.0.1 (default: a free one)"
    )


def parallel_degrees(args: argparse.Namespace) -> tuple[int, int, int]:
    """(tp, sp, cfg) from the arguments `add_parallel_arguments` declares."""
    return args.tp, args.sp, 2 if args.cfg_parallel else 1


def parallel_requested(args: argparse.Namespace) -> bool:
    """Whether to run on several ranks: a degree above 1, or torchrun started this process."""
    from fastdit.parallel.launch import under_torchrun

    tp, sp, cfg = parallel_degrees(args)
    return tp * sp * cfg > 1 or under_torchrun()


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def add_generate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate",
        help="generate images from a text prompt",
        description=(
            "Generate images with a Qwen-Image pipeline. Images match diffusers' QwenImagePipeline for the "
            "same seed. Prompts longer than the text encoder's limit (512 tokens including the chat "
            "template's answer header) are refused, not truncated."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model",
        required=True,
        help=MODEL_HELP,
    )
    p.add_argument("--prompt", required=True, help="what to draw")
    p.add_argument(
        "--negative-prompt",
        default=None,
        help="what to avoid; true CFG runs only with a negative prompt and --cfg-scale > 1 (use ' ' for an "
        "empty one), as in diffusers",
    )
    p.add_argument("--height", type=_int, default=1024, help="image height in pixels, a multiple of 16")
    p.add_argument("--width", type=_int, default=1024, help="image width in pixels, a multiple of 16")
    p.add_argument("--steps", type=_int, default=50, help="denoising steps (>= 1)")
    p.add_argument("--cfg-scale", type=_float, default=4.0, help="true CFG scale (>= 1; 1 disables CFG)")
    p.add_argument(
        "--seed",
        type=_int,
        default=None,
        help="seed of image 0; image i uses seed + i, so each image is reproducible alone (default: random)",
    )
    p.add_argument("--num-images", type=_int, default=1, help="images to generate")
    p.add_argument("--dtype", choices=list(DTYPES), default="auto", help="auto: bfloat16 on CUDA, float32 otherwise")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda:0 (default: cuda if available)")
    p.add_argument(
        "--output",
        default="fastdit.png",
        help="image file (several images: NAME-0.png, NAME-1.png, ...) or a folder (ends with / or exists)",
    )
    p.add_argument("--timings-json", default=None, metavar="FILE", help="also write stage timings as JSON")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the DiT block by block (full graph; the first step compiles, seconds on a GPU)",
    )
    p.add_argument(
        "--quantize",
        choices=["fp8"],
        default=None,
        help="run the DiT's block linears in fp8 e4m3 (CUDA, compute capability >= 8.9); a folder written by "
        "`fastdit quantize` is fp8 without this flag",
    )
    add_attention_argument(p)
    add_cuda_graph_argument(p)
    # fastdit.parallel: one process per rank on this machine (or the ranks torchrun started).
    add_parallel_arguments(p, "parallelism (one process per GPU; gloo on CPU)")
    p.set_defaults(func=generate_main)
    return p


def _check_writable_file(path: Path, what: str) -> None:
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise FastditError(f"{what} {path} is a folder; give a file name")
    if not parent.is_dir():
        raise FastditError(f"{what} {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise FastditError(f"{what} {path} is not writable")


def output_paths(output: str, count: int, seeds: list[int]) -> list[Path]:
    """Where each image goes; checks that they can be written before any work starts."""
    out = Path(output)
    if output.endswith(("/", os.sep)) or out.is_dir():
        if out.exists() and not out.is_dir():
            raise FastditError(f"--output {out} exists and is not a folder")
        if not out.exists():
            try:
                out.mkdir(parents=True)
            except OSError as e:
                raise FastditError(f"--output {out}: cannot create the folder ({e.strerror})") from None
        if not os.access(out, os.W_OK):
            raise FastditError(f"--output {out} is not writable")
        return [out / f"fastdit-{i}-seed{s}.png" for i, s in enumerate(seeds)]
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise FastditError(f"--output {out}: use an image suffix ({', '.join(sorted(IMAGE_SUFFIXES))}) or a folder/")
    _check_writable_file(out, "--output")
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def note(message: str) -> None:
    """One line for the user on stderr; under torchrun only rank 0 says it (every rank runs the same checks)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"fastdit: {message}", file=sys.stderr)


def resolve_model(model: str) -> Path:
    """A local pipeline folder for --model: the folder itself, the cached tiny pipeline, or a Hub download."""
    if model == TINY_RANDOM:
        from fastdit.tiny import tiny_pipeline_dir

        note("tiny-random is a tiny random-weight pipeline: it draws noise, not pictures")
        return tiny_pipeline_dir()
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FastditError(f"--model {model} is a file; give a pipeline folder")
    if not _REPO_ID.match(model):
        raise FastditError(
            f"--model {model}: no such folder (give a diffusers-format Qwen-Image folder, a Hugging Face "
            f"repo id such as Qwen/Qwen-Image, or {TINY_RANDOM})"
        )
    from huggingface_hub import snapshot_download

    note(f"{model} is not a local folder; fetching it from the Hugging Face Hub")
    try:
        return Path(snapshot_download(model))
    except Exception as e:  # network, auth, missing repo: all mean "could not fetch it"
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise FastditError(f"--model {model}: could not download it from the Hub ({type(e).__name__}: {first})") from e


def _check_args(args: argparse.Namespace) -> None:
    from fastdit.pipeline import check_size

    if not args.prompt.strip():
        raise FastditError("--prompt must not be empty")
    try:
        check_size(args.height, args.width)
    except FastditError as e:
        raise FastditError(f"--{str(e)}") from None
    if args.steps < 1:
        raise FastditError(f"--steps must be >= 1, got {args.steps}")
    if not math.isfinite(args.cfg_scale) or args.cfg_scale < 1:
        raise FastditError(f"--cfg-scale must be >= 1, got {args.cfg_scale}")
    if args.num_images < 1:
        raise FastditError(f"--num-images must be >= 1, got {args.num_images}")
    if args.seed is not None and not 0 <= args.seed <= 2**63 - args.num_images:
        raise FastditError(f"--seed must be between 0 and 2**63, got {args.seed}")


def _torch_dtype(name: str, device):
    import torch

    if DTYPES[name] is None:
        on_cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
        return torch.bfloat16 if on_cuda else torch.float32
    return getattr(torch, DTYPES[name])


def generate_main(args: argparse.Namespace, parallel=None) -> int:
    """`fastdit generate`; `parallel` is this rank's ParallelState when started by `_generate_parallel`."""
    import secrets
    import time

    _check_args(args)
    first = args.seed if args.seed is not None else secrets.randbits(62)
    seeds = [first + i for i in range(args.num_images)]
    paths = output_paths(args.output, args.num_images, seeds)
    if args.timings_json:
        _check_writable_file(Path(args.timings_json), "--timings-json")
    if args.cuda_graph:
        check_cuda_graph_device(args.device)
    if parallel is None and parallel_requested(args):
        if hint := cuda_graph_hint(args):
            note(hint)
        return _generate_parallel(args, first)
    main = parallel is None or parallel.is_main  # only rank 0 prints, shows progress and writes

    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from fastdit.pipeline import QwenImagePipeline

    # Our own bar covers the denoising steps; the libraries' per-file loading bars are noise here.
    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()

    try:
        device = torch.device(args.device) if args.device else None
    except RuntimeError as e:
        raise FastditError(f"--device {args.device}: {e}") from None
    if device is not None and device.type == "cuda" and not torch.cuda.is_available():
        raise FastditError(f"--device {args.device}: no CUDA device is available here")
    if parallel is not None:
        device = parallel.device
    dtype = _torch_dtype(args.dtype, device)
    folder = resolve_model(args.model)
    t0 = time.perf_counter()
    pipe = QwenImagePipeline.from_pretrained(
        folder, dtype=dtype, device=device, parallel=parallel, quantize=args.quantize, attention=args.attention
    )
    if args.compile:
        pipe.compile()
    if args.cuda_graph:
        pipe.enable_cuda_graph()
    load_s = time.perf_counter() - t0
    if main:
        print(f"fastdit: loaded {folder} in {load_s:.1f} s ({pipe.device}, {str(dtype).removeprefix('torch.')})")

    images = pipe(
        args.prompt,
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        true_cfg_scale=args.cfg_scale,
        seed=seeds,
        num_images_per_prompt=args.num_images,
        show_progress=main,
    )
    if not main:
        return 0
    for path, image, seed in zip(paths, images, seeds, strict=True):
        try:
            image.save(path)
        except OSError as e:
            raise FastditError(f"cannot write {path}: {e.strerror or e}") from None
        print(f"wrote {path} ({image.width}x{image.height}, seed {seed})")

    t = pipe.last_timings
    print(f"text encoding  {t['text_encode_s']:8.3f} s")
    print(f"denoising      {t['denoise_s']:8.3f} s  ({args.steps} steps, {t['denoise_s_per_step']:.3f} s/step)")
    print(f"VAE decode     {t['vae_decode_s']:8.3f} s")
    if args.timings_json:
        record = {"load_s": load_s, **t, "steps": args.steps, "height": args.height, "width": args.width}
        record |= {
            "num_images": args.num_images,
            "seeds": seeds,
            "device": str(pipe.device),
            "dtype": str(dtype),
        }
        Path(args.timings_json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


# ---------------------------------------------------------------------------------------------------------
# fastdit.parallel: --tp / --sp / --cfg-parallel start one process per rank (or join torchrun's ranks);
# every rank runs generate_main with its ParallelState, rank 0 alone prints and writes.


def _generate_parallel(args: argparse.Namespace, seed: int) -> int:
    from fastdit.loader import read_config, resolve_transformer_dir
    from fastdit.parallel import check_parallel_config, launch
    from fastdit.parallel.launch import check_world, device_type

    tp, sp, cfg = parallel_degrees(args)
    check_world(tp, sp, cfg, device_type(args.device))  # before any download or load
    folder = resolve_model(args.model)  # once, here: a Hub download must not race between ranks
    check_parallel_config(read_config(resolve_transformer_dir(folder)), tp, sp)
    rank_args = argparse.Namespace(**{**vars(args), "model": str(folder), "seed": seed})
    return launch(_generate_rank, rank_args, tp=tp, sp=sp, cfg=cfg, device=args.device, master_port=args.master_port)


def _generate_rank(state, args: argparse.Namespace) -> int:
    import torch.distributed as dist

    if dist.is_initialized():  # under torchrun each process drew its own random seed: take rank 0's
        seed = [args.seed]
        dist.broadcast_object_list(seed, src=0)
        args.seed = seed[0]
    return generate_main(args, state)


def _add_plugins(sub) -> None:
    """Let other modules add subcommands; a module that is not there simply adds nothing."""
    for module, command in _PLUGINS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name is not None and module.startswith(e.name):
                continue  # the module itself is absent: this build has no such command
            print(f"fastdit: note: '{command}' is unavailable ({e})", file=sys.stderr)
            continue
        except ImportError as e:
            print(f"fastdit: note: '{command}' is unavailable ({e})", file=sys.stderr)
            continue
        mod.add_parser(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastdit", description="Fast inference for Qwen-Image diffusion transformers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_generate_parser(sub)
    _add_plugins(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="fastdit: warning: %(message)s")
    try:
        return int(args.func(args) or 0)
    except (FastditError, ValueError) as e:
        message = " ".join(str(e).split())  # one line, whatever the message held
        print(f"fastdit: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastdit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
