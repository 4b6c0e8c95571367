"""`--lora [NAME=]PATH[:SCALE]` (repeatable) and `--fuse-lora` for `fastdit generate` and `fastdit serve`; and
`--lora-rank` / `--loras` for `fastdit bench`.

`add_lora_arguments(parser)` declares them; `ModelOptions` carries them (`loras`, `fuse_lora`). Before the
pipeline loads, `read_loras` reads every file and checks it against the model folder's transformer shapes, so
a missing, corrupt or mismatched LoRA stops the command at once (exit 2, one line); `apply_loras` then loads
them into the pipeline (active at their scales, or merged with --fuse-lora). The server keeps them as named
adapters that each request may choose (fastdit.server.lora).

This module imports no torch at module level (`fastdit --help` stays fast).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from fastdit.errors import LoraError

_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


@dataclass(frozen=True)
class LoraSpec:
    """One --lora: the adapter's name (default: the file's stem), its file, and its scale (default 1)."""

    name: str
    path: str
    scale: float = 1.0


def lora_spec(text: str) -> LoraSpec:
    """argparse type of --lora: `[NAME=]PATH[:SCALE]` (the file is checked by `check_lora_flags`)."""
    name, path, scale = None, text, 1.0
    head, sep, tail = text.partition("=")
    if sep and head and set(head) <= _NAME_CHARS:
        name, path = head, tail
    body, sep, tail = path.rpartition(":")
    if sep and body:
        try:
            scale = float(tail)
        except ValueError:
            pass
        else:
            path = body
            if not math.isfinite(scale):
                raise argparse.ArgumentTypeError(f"{text}: the scale after ':' must be a finite number")
    return LoraSpec(name or Path(path).stem, path, scale)


def add_lora_arguments(parser) -> None:
    """--lora (repeatable) and --fuse-lora."""
    group = parser.add_argument_group("LoRA")
    group.add_argument(
        "--lora",
        type=lora_spec,
        action="append",
        default=[],
        metavar="[NAME=]PATH[:SCALE]",
        help="a LoRA .safetensors (diffusers/PEFT, kohya, ComfyUI/musubi or DiffSynth keys) applied at SCALE "
        "(1 unless given); repeat for several. The server keeps them as adapters NAME (the file's stem unless given) "
        'that a request picks with "loras": [{"name": ..., "scale": ...}]',
    )
    group.add_argument(
        "--fuse-lora",
        action="store_true",
        help="merge the --lora adapters into the DiT's weights once (no per-step cost; fp8 layers are "
        "re-quantized) instead of running them as side GEMMs; a server then applies them to every request",
    )


def check_lora_flags(specs, fuse: bool) -> None:
    """Before any loading: the files exist, the names are unique, --fuse-lora comes with --lora."""
    if fuse and not specs:
        raise LoraError("--fuse-lora needs at least one --lora")
    for spec in specs:
        if not Path(spec.path).is_file():
            raise LoraError(f"--lora {spec.path}: no such LoRA file")
    names = [spec.name for spec in specs]
    for name in names:
        if names.count(name) > 1:
            raise LoraError(f"--lora: two adapters are named {name!r}; give them names (NAME=PATH)")


def read_loras(specs, model_folder) -> dict:
    """{name: read_lora result} for every --lora, each checked against the transformer of `model_folder`;
    LoraError (one line, naming the file and layer) on the first that is missing, corrupt or does not fit."""
    if not specs:
        return {}
    from fastdit.load import read_config
    from fastdit.lora import check_lora, read_lora
    from fastdit.lora.families import lora_family

    cfg = read_config(model_folder)
    family = lora_family(cfg)
    shapes = family.targets(cfg)
    loras = {}
    for spec in specs:
        loras[spec.name] = read_lora(spec.path, names=family.names)
        check_lora(loras[spec.name], shapes, spec.path)
    return loras


def apply_loras(pipe, specs, fuse: bool, loras: dict | None = None) -> None:
    """Load every --lora into `pipe` (already read by `read_loras`, else read now), active at its scale; merged
    into the weights with `fuse`."""
    for spec in specs:
        source = loras[spec.name] if loras and spec.name in loras else spec.path
        pipe.load_lora(source, adapter_name=spec.name, scale=spec.scale)
    if fuse:
        pipe.fuse_loras()


def add_lora_bench_arguments(parser) -> None:
    """`fastdit bench --lora-rank R --loras K` (fastdit.bench.lora)."""
    group = parser.add_argument_group("LoRA (the DiT step with dynamic adapters, then merged)")
    group.add_argument(
        "--lora-rank",
        type=_ranks,
        default=None,
        metavar="R[,R...]",
        help="also time the step with LoRA adapters of rank R (several: one after the other, e.g. 16,64,128)",
    )
    group.add_argument("--loras", type=int, default=1, metavar="K", help="adapters active at once (default: 1)")


def _ranks(text: str) -> tuple[int, ...]:
    try:
        ranks = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rank or a comma-separated list of ranks") from None
    if any(r < 1 for r in ranks):
        raise argparse.ArgumentTypeError(f"{text}: ranks must be >= 1")
    return ranks
