"""Reading diffusers-format checkpoints into a model built on the meta device: the machinery every DiT shares.

Each tensor is streamed from safetensors straight to the target device (one tensor at a time, mmap-backed, so
host memory never holds a second copy of the model) and assigned in place. Every key and shape is checked
before anything is read; bad input raises `CheckpointError` naming the file and the key, and no half-loaded
model is ever returned. Which checkpoint keys make each parameter is the model's own table (`key_map`);
tensor parallelism passes a `ShardSpec` per parameter so each rank reads only its slice. A module that lists
parameter names in `keep_dtype` keeps them in the dtype it declared (fp8 weights and their scales).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from fastdit.errors import CheckpointError, ConfigError

INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
SINGLE_NAME = "diffusion_pytorch_model.safetensors"


class ShardSpec(NamedTuple):
    """Take slice `rank` of `world` along `dim` of each source tensor (before fusing them). Any (dim, rank, world)
    tuple serves (fastdit.parallel.transformer.shard_plan returns plain tuples)."""

    dim: int
    rank: int
    world: int


# ---------------------------------------------------------------------------------------------------------
# Finding files


def resolve_transformer_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"model path does not exist: {p}")
    if not p.is_dir():
        raise CheckpointError(f"model path is not a folder: {p}")
    if not (p / "config.json").exists() and (p / "transformer").is_dir():
        p = p / "transformer"
    if not (p / "config.json").exists():
        raise CheckpointError(f"no config.json in {p} (expected a diffusers transformer folder or pipeline root)")
    return p


def read_json(path: Path) -> dict:
    """A JSON object from `path`; CheckpointError naming the file if it is missing, malformed or not an object."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return raw


def weight_map(folder: Path) -> dict[str, Path]:
    """Checkpoint key -> the safetensors file that holds it (one file, or many through the index)."""
    index = folder / INDEX_NAME
    if index.exists():
        try:
            entries = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"bad safetensors index {index}: {e}") from None
        files = {name: folder / name for name in set(entries.values())}
        for name, f in sorted(files.items()):
            if not f.exists():
                raise CheckpointError(f"{index} names shard {name}, which is not in {folder}")
        return {key: files[name] for key, name in entries.items()}
    single = folder / SINGLE_NAME
    if not single.exists():
        found = sorted(x.name for x in folder.glob("*.safetensors"))
        if len(found) != 1:
            raise CheckpointError(f"no {SINGLE_NAME} or {INDEX_NAME} in {folder} (found {found or 'none'})")
        single = folder / found[0]
    return {key: single for key in _keys_of(single)}


def _open(f: Path, device: str = "cpu"):
    try:
        return safe_open(str(f), framework="pt", device=device)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"corrupt or truncated safetensors file {f}: {e}") from None


def _keys_of(f: Path) -> list[str]:
    with _open(f) as h:
        return list(h.keys())


# ---------------------------------------------------------------------------------------------------------
# Loading


def _sliced_shape(shape: list[int], spec: ShardSpec | None) -> list[int]:
    if spec is None:
        return list(shape)
    spec = ShardSpec(*spec)
    out = list(shape)
    if out[spec.dim] % spec.world:
        raise ConfigError(f"dimension {spec.dim} of size {out[spec.dim]} is not divisible by {spec.world} ranks")
    out[spec.dim] //= spec.world
    return out


def load_state_dict_into(
    model: nn.Module,
    folder: Path,
    *,
    dtype: torch.dtype,
    device: torch.device,
    shard_plan: Callable[[str], tuple[int, int, int] | None] = lambda name: None,
    key_map: Callable[[str], list[str]],
) -> None:
    """Fill every parameter of `model` (built on meta) from the checkpoint in `folder`, checked first."""
    where = weight_map(folder)
    params = dict(model.named_parameters())
    wanted: dict[str, list[str]] = {name: key_map(name) for name in params}
    used = {k for keys in wanted.values() for k in keys}

    missing = sorted(k for k in used if k not in where)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"missing keys in {folder}: {', '.join(missing[:5])}{more}")
    unexpected = sorted(k for k in where if k not in used)
    if unexpected:
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        files = sorted({where[k].name for k in unexpected})
        raise CheckpointError(f"unexpected keys in {folder} ({', '.join(files)}): {', '.join(unexpected[:5])}{more}")

    handles: dict[Path, object] = {}
    dev = "cpu" if device.type == "cpu" else str(device)

    def handle(f: Path):
        if f not in handles:
            handles[f] = _open(f, dev)
        return handles[f]

    # Pass 1: shapes only (header reads), so a mismatch is reported before any tensor is read.
    for name, p in params.items():
        spec = shard_plan(name)
        parts = []
        for key in wanted[name]:
            try:
                shape = handle(where[key]).get_slice(key).get_shape()
            except SafetensorError as e:
                raise CheckpointError(f"cannot read {key} from {where[key]}: {e}") from None
            parts.append(_sliced_shape(shape, spec))
        fused = list(parts[0])
        fused[0] = sum(s[0] for s in parts)
        if any(s[1:] != parts[0][1:] for s in parts) or fused != list(p.shape):
            raise CheckpointError(
                f"shape mismatch for {', '.join(wanted[name])} in {where[wanted[name][0]]}: checkpoint gives "
                f"{[list(s) for s in parts]}, the model (config.json) needs {list(p.shape)} for {name}"
            )

    # Pass 2: stream tensors to the device and assign them.
    for name in params:
        spec = shard_plan(name)
        spec = None if spec is None else ShardSpec(*spec)
        tensors = []
        for key in wanted[name]:
            sl = handle(where[key]).get_slice(key)
            try:
                if spec is None:
                    t = sl[:]
                else:
                    n = sl.get_shape()[spec.dim] // spec.world
                    index = [slice(None)] * len(sl.get_shape())
                    index[spec.dim] = slice(spec.rank * n, (spec.rank + 1) * n)
                    t = sl[tuple(index)]
            except (SafetensorError, RuntimeError, ValueError) as e:
                raise CheckpointError(f"cannot read {key} from {where[key]}: {e}") from None
            tensors.append(t.to(device=device, dtype=_target_dtype(model, name, params[name], dtype)))
        value = tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=0)
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        setattr(module, leaf, nn.Parameter(value.contiguous(), requires_grad=False))


def _target_dtype(model: nn.Module, name: str, p: nn.Parameter, dtype: torch.dtype) -> torch.dtype:
    """`dtype`, unless the parameter's module lists it in `keep_dtype` (fastdit.quant.fp8: fp8 weights, scales)."""
    module_name, _, leaf = name.rpartition(".")
    return p.dtype if leaf in getattr(model.get_submodule(module_name), "keep_dtype", ()) else dtype


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
