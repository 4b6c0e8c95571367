"""What the subcommands share: their common arguments, `--model` resolution, output checks, one-line notes.

Nothing here imports torch at module level: `fastdit --help` and argument errors stay fast.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fastdit.cache.config import StepCache
from fastdit.errors import FastditError
from fastdit.runtime.env import under_torchrun
from fastdit.runtime.prepare import exclusive
from fastdit.validation import DTYPE_NAMES, InputError, dtype_name

TINY_RANDOM = "tiny-random"
MODEL_HELP = (
    "a diffusers-format Qwen-Image pipeline folder, a Hugging Face repo id (owner/name, e.g. Qwen/Qwen-Image; "
    f"downloaded with huggingface_hub), or {TINY_RANDOM!r}: a tiny random-weight pipeline that draws noise (tests)"
)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
# Python API field names -> CLI flags, for InputErrors raised by the shared validation layer.
FLAGS = {
    "true_cfg_scale": "--cfg-scale",
    "num_inference_steps": "--steps",
    "negative_prompt": "--negative-prompt",
    "num_images_per_prompt": "--num-images",
    "height": "--height",
    "width": "--width",
    "seed": "--seed",
    "prompt": "--prompt",
    "dtype": "--dtype",
    "image": "--image",
    "vae_image_area": "--vae-image-area",
    "vl_image_area": "--vl-image-area",
}
IMAGE_AREAS = ("vae_image_area", "vl_image_area")  # the edit pipelines' resize areas (fastdit.cli.edit)
ATTENTION_CHOICES = ("auto", "sdpa", "cudnn", "flash", "flash_attn", "int8", "fp8")
ATTENTION_HELP = (
    "attention kernel of the DiT (default: auto = cuDNN on CUDA, else PyTorch SDPA). flash: PyTorch's bundled "
    "FlashAttention-2; flash_attn: the separate flash-attn package (FlashAttention-3 if installed); int8: fastdit's "
    "8-bit kernel (INT8 Q.K, FP8 P.V; compute capability >= 8.9); fp8: cuDNN's fp8 attention (Hopper, needs "
    "pip install 'fastdit[fp8-attention]'); int8 and fp8 are approximate"
)
# owner/name as the Hugging Face Hub spells repo ids.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`fastdit generate: error: ...`) and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def flag_error(e: InputError) -> FastditError:
    """An InputError from the validation layer, re-worded with the CLI's flag name."""
    return FastditError(f"{FLAGS.get(e.field, e.field)} {e.problem}")


@dataclass(frozen=True)
class ModelOptions:
    """How to load and run the model: the model-side flags of generate, edit, serve and bench."""

    dtype: str = "auto"  # a validation.DTYPE_NAMES spelling
    device: str | None = None
    quantize: str | None = None
    attention: str = "auto"
    compile: bool = False
    cuda_graph: bool = False
    loras: tuple = ()  # fastdit.cli.lora.LoraSpec of each --lora
    fuse_lora: bool = False
    cache: StepCache | None = None  # --cache, where the subcommand has it (fastdit.cache.cli)
    memory: str | None = None  # a fastdit.memory plan name (fastdit.cli.memory adds --memory)
    # (name, pixels) of --vae-image-area / --vl-image-area, where the subcommand has them (fastdit.cli.edit): the
    # edit pipelines' keyword arguments for every call with images
    image_areas: tuple[tuple[str, int], ...] = ()

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ModelOptions:
        loras = tuple(getattr(args, "lora", None) or ())  # LoRA flags: fastdit.cli.lora.add_lora_arguments
        areas = tuple((n, getattr(args, n)) for n in IMAGE_AREAS if getattr(args, n, None) is not None)
        return cls(
            args.dtype, args.device, args.quantize, args.attention, args.compile, args.cuda_graph,
            loras, getattr(args, "fuse_lora", False), getattr(args, "cache", None), getattr(args, "memory", None),
            areas,
        )  # fmt: skip


def add_model_arguments(parser, dtype_help: str = "auto: bfloat16 on CUDA, float32 otherwise") -> None:
    """--model, --dtype, --device, --quantize, --attention, --compile, --cuda-graph (see ModelOptions)."""
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    parser.add_argument("--dtype", choices=list(DTYPE_NAMES), default="auto", help=f"{dtype_help} (default: auto)")
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda:0 (default: cuda if available)")
    parser.add_argument(
        "--quantize",
        choices=["fp8", "fp8-fast", "fp8-blockwise", "int4"],
        default=None,
        help="quantize the DiT (fastdit.quant.recipes): fp8 = fp8 e4m3 block linears, the MLPs' second linears kept "
        "in bf16 (CUDA, compute capability >= 8.9); fp8-fast = every block linear in fp8 (faster); fp8-blockwise = "
        "fp8 with the MLPs' second linears in 1x128 / 128x128-scaled fp8 (Hopper); int4 = weight-only int4 for the "
        "block linears and modulation (any GPU; the DiT in < 11.5 GB). A folder written by `fastdit quantize` is "
        "quantized without this flag",
    )
    parser.add_argument("--attention", choices=ATTENTION_CHOICES, default="auto", help=ATTENTION_HELP)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the DiT block by block (full graph; the first step compiles, seconds on a GPU)",
    )
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="replay each denoising step from a CUDA graph, recorded at a call's first step (CUDA only; the "
        "graph of the latest image size and text length stays in GPU memory for later calls)",
    )


def add_parallel_arguments(parser, title: str) -> None:
    """--tp / --sp / --cfg-parallel / --master-port (fastdit.parallel), shared by generate, edit, serve, bench."""
    par = parser.add_argument_group(title)
    par.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel degree (splits the DiT's heads)")
    par.add_argument(
        "--sp", type=positive_int, default=1, help="Ulysses sequence-parallel degree (splits image tokens)"
    )
    par.add_argument(
        "--cfg-parallel", action="store_true", help="run the cond and uncond CFG branches on two rank groups"
    )
    par.add_argument("--master-port", type=integer, default=None, help="rendezvous port on 127.0.0.1 (default: free)")


def parallel_degrees(args: argparse.Namespace) -> tuple[int, int, int]:
    """(tp, sp, cfg) from the arguments `add_parallel_arguments` declares."""
    return args.tp, args.sp, 2 if args.cfg_parallel else 1


def parallel_requested(tp: int, sp: int, cfg: int) -> bool:
    """Whether to run on several ranks: a degree above 1, or torchrun started this process."""
    return tp * sp * cfg > 1 or under_torchrun()


def positive_int(text: str) -> int:
    value = integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be >= 1")
    return value


def integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def on_cuda(device: str | None) -> bool:
    """Whether a run goes to CUDA: `--device`, or CUDA when there is one; FastditError if malformed."""
    import torch

    try:
        return torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    except RuntimeError as e:
        raise FastditError(f"--device {device}: {e}") from None


def torch_device(device: str | None):
    """--device as a torch.device (None: the default device), checked to exist here."""
    import torch

    try:
        dev = torch.device(device) if device else None
    except RuntimeError as e:
        raise FastditError(f"--device {device}: {e}") from None
    if dev is not None and dev.type == "cuda" and not torch.cuda.is_available():
        raise FastditError(f"--device {device}: no CUDA device is available here")
    return dev


def torch_dtype(name: str, device: str | None):
    import torch

    try:
        return getattr(torch, dtype_name(name, on_cuda(device)))
    except InputError as e:
        raise flag_error(e) from None


def check_model_options(options: ModelOptions, tp: int = 1, sp: int = 1) -> None:
    """Device-dependent flags checked before anything loads: --cuda-graph off CUDA, --quantize fp8 or an
    --attention backend the device lacks. Notes that tp / sp steps want a CUDA graph."""
    if options.cuda_graph and not on_cuda(options.device):
        raise FastditError(f"--cuda-graph needs a CUDA device, but the run would use {options.device or 'the cpu'}")
    if tp * sp > 1 and not options.cuda_graph and on_cuda(options.device):
        note("--tp/--sp steps are host-bound without --cuda-graph; add it to replay each step from a CUDA graph")
    if options.quantize is None and options.attention == "auto":
        return
    from fastdit.checkpoint import default_device
    from fastdit.kernels.attention import resolve_backend
    from fastdit.quant.recipes import parse_quantize

    device = torch_device(options.device) or default_device()
    if options.quantize is not None:
        parse_quantize(options.quantize).check_device(device)
    resolve_backend(options.attention, device)


def note(message: str) -> None:
    """One line for the user on stderr; under torchrun only rank 0 says it (every rank runs the same checks)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"fastdit: {message}", file=sys.stderr)


def is_repo_id(model: str) -> bool:
    """`owner/name` as the Hub spells it, and no local path: its first part does not exist here."""
    return bool(_REPO_ID.match(model)) and not Path(model.split("/", 1)[0]).exists()


def resolve_model(model: str) -> Path:
    """A local pipeline folder for --model: the folder itself, the cached tiny pipeline, or a Hub download.

    Only an `owner/name` string that is no local path goes to the Hub; anything else path-like (a separator
    beyond one `/`, a leading `.` or `~`, or an existing part) that does not exist is "no such folder"."""
    if model == TINY_RANDOM:
        from fastdit.tiny import tiny_pipeline_dir

        note("tiny-random is a tiny random-weight pipeline: it draws noise, not pictures")
        return tiny_pipeline_dir()
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise FastditError(f"--model {model} is a file; give a pipeline folder")
    if not is_repo_id(model):
        raise FastditError(
            f"--model {model}: no such folder (give a diffusers-format Qwen-Image folder, a Hugging Face repo id "
            f"such as Qwen/Qwen-Image, or {TINY_RANDOM})"
        )
    from huggingface_hub import snapshot_download

    note(f"{model} is not a local folder; fetching it from the Hugging Face Hub as a repo id")
    try:
        with exclusive(f"hub-{model}"):  # under torchrun: one rank downloads, the others wait for it
            return Path(snapshot_download(model))
    except Exception as e:  # network, auth, missing repo: all mean "could not fetch it"
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise FastditError(
            f"--model {model}: could not download it from the Hub ({type(e).__name__}: {first_line})"
        ) from e


def check_writable_file(path: Path, what: str) -> None:
    """`path` can be written: its folder exists and takes a new file, or the file exists and opens for writing.

    Nothing is left behind and nothing another process made is removed: under torchrun every rank runs this
    check on the same path at once, so a new file is probed with a uniquely named temporary file beside it.
    """
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise FastditError(f"{what} {path} is a folder; give a file name")
    if not parent.is_dir():
        raise FastditError(f"{what} {path}: folder {parent} does not exist")
    try:
        if path.exists():
            with open(path, "ab"):
                pass
        else:
            with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{path.name}.", suffix=".probe"):
                pass
    except OSError as e:
        raise FastditError(f"{what} {path} is not writable ({e.strerror or e})") from None


def output_paths(output: str, count: int, seeds: list[int]) -> list[Path]:
    """Where each image goes; checks that they can be written before any work starts."""
    out = Path(output)
    if output.endswith(("/", os.sep)) or out.is_dir():
        if out.exists() and not out.is_dir():
            raise FastditError(f"--output {out} exists and is not a folder")
        if not out.exists():
            try:
                out.mkdir(parents=True, exist_ok=True)  # ranks under torchrun may race here
            except OSError as e:
                raise FastditError(f"--output {out}: cannot create the folder ({e.strerror})") from None
        paths = [out / f"fastdit-{i}-seed{s}.png" for i, s in enumerate(seeds)]
    else:
        if out.suffix.lower() not in IMAGE_SUFFIXES:
            suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
            raise FastditError(f"--output {out}: use an image suffix ({suffixes}) or a folder ending in /")
        paths = [out] if count == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]
    for path in paths:
        check_writable_file(path, "--output")
    return paths
