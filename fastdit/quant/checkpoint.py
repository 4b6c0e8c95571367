"""fp8 checkpoints: `fastdit quantize` writes them, the loader reads their layout from config.json.

A float transformer checkpoint is streamed one tensor at a time into safetensors shards: the weights of the
quantized modules as e4m3 plus `<key>_scale` float32 (out,) tensors under the original names, everything else
in the float dtype, and a `quantization` entry in config.json naming the modules. Loading such a folder builds
the fp8 layers on meta and streams the e4m3 tensors in: no float copy of the quantized weights ever exists.
Which keys a model's modules have is the model's table, passed in (`quantized_keys`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from fastdit.checkpoint import read_json, resolve_transformer_dir, weight_map
from fastdit.errors import CheckpointError, FastditError
from fastdit.kernels.fp8_rows import FP8, quantize_rows


def folder_quantization(folder: Path) -> dict | None:
    """The `quantization` entry of a transformer folder's config.json (None: a float checkpoint)."""
    cfg_file = folder / "config.json"
    q = read_json(cfg_file).get("quantization")
    if q is None:
        return None
    if not isinstance(q, dict) or q.get("method") != "fp8" or not isinstance(q.get("modules"), list):
        raise CheckpointError(f"{cfg_file}: unsupported quantization entry {q!r} (fastdit writes method 'fp8')")
    return q


def check_fp8_checkpoint(folder: Path, quantized_keys: list[str]) -> None:
    """Header reads only: each quantized weight is stored as e4m3 and each scale as float32."""
    where = weight_map(folder)
    for key in quantized_keys:
        for name, want in ((key, "F8_E4M3"), (key + "_scale", "F32")):
            if name not in where:
                raise CheckpointError(f"missing key in quantized checkpoint {folder}: {name}")
            with safe_open(str(where[name]), framework="pt") as f:
                got = f.get_slice(name).get_dtype()
            if got != want:
                raise CheckpointError(f"{name} in {where[name]} is {got}, a quantized checkpoint stores {want}")


def _tensor_bytes(shape: list[int], dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * dtype.itemsize


def check_new_output(out_root: Path) -> None:
    """`fastdit quantize` writes a new folder: an existing non-empty one is refused, never overwritten."""
    if out_root.exists() and any(out_root.iterdir()):
        raise FastditError(f"--output {out_root} exists and is not empty; give a new folder")


def quantize_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    quantized_keys: list[str],
    modules: tuple[str, ...],
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write an fp8 copy of a float transformer checkpoint; returns the new transformer folder.

    `quantized_keys` are the checkpoint keys stored in fp8 (the weights of the model's `modules`, which are
    recorded in config.json for the loader). Streams: one tensor at a time is read (cast to `dtype`, quantized
    on `device` when it is one of `quantized_keys`) and at most one shard (`max_shard_bytes`) is held before
    it is written. Everything else is stored in `dtype`. `src` may be a pipeline root: then `dst` becomes one
    too, with `transformer/` quantized and the other parts symlinked to the originals. Everything is written
    into a hidden sibling of `dst` and renamed into place at the end: a failure leaves no half-written folder.
    """
    src_root, out_root = Path(src), Path(dst)
    folder = resolve_transformer_dir(src_root)
    is_pipeline = folder != src_root
    check_new_output(out_root)
    if folder_quantization(folder) is not None:
        raise FastditError(f"{folder} is already quantized")
    try:
        out_root.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_root.name}-", dir=out_root.parent))
    except OSError as e:
        raise FastditError(f"--output {out_root}: cannot write there ({e.strerror or e})") from None
    try:
        out = staging / "transformer" if is_pipeline else staging
        _write_quantized(folder, out, set(quantized_keys), modules, dtype, device, max_shard_bytes)
        if is_pipeline:  # the other parts are unchanged: link them instead of copying gigabytes
            for entry in sorted(src_root.iterdir()):
                if entry.name == "transformer":
                    continue
                if entry.is_file() and entry.suffix == ".json":
                    shutil.copy2(entry, staging / entry.name)
                else:
                    os.symlink(entry.resolve(), staging / entry.name, target_is_directory=entry.is_dir())
        if out_root.exists():
            out_root.rmdir()  # empty (check_new_output)
        staging.rename(out_root)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out_root / "transformer" if is_pipeline else out_root


def _write_quantized(
    folder: Path,
    out: Path,
    quantized: set[str],
    modules: tuple[str, ...],
    dtype: torch.dtype,
    device,
    max_shard_bytes: int,
) -> None:
    where = weight_map(folder)
    missing = sorted(quantized - where.keys())
    if missing:
        raise CheckpointError(f"missing keys in {folder}: {', '.join(missing[:5])}")

    # Plan shards from the headers (sizes after conversion), so names are known before any tensor is read.
    shapes = {}
    for f in sorted(set(where.values())):
        with safe_open(str(f), framework="pt") as h:
            for key in h.keys():  # noqa: SIM118 (safe_open handles are not dicts)
                shapes[key] = h.get_slice(key).get_shape()
    shards: list[list[str]] = [[]]
    size = 0
    for key in sorted(where):
        n = _tensor_bytes(shapes[key], FP8 if key in quantized else dtype)
        n += _tensor_bytes(shapes[key][:1], torch.float32) if key in quantized else 0
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
    if len(shards) == 1:
        names = ["diffusion_pytorch_model.safetensors"]
    else:
        names = [f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

    out.mkdir(parents=True, exist_ok=True)
    index: dict[str, str] = {}
    for name, keys in zip(names, shards, strict=True):
        tensors: dict[str, Tensor] = {}
        for key in keys:
            with safe_open(str(where[key]), framework="pt", device=str(device)) as h:
                t = h.get_tensor(key).to(dtype)
            if key in quantized:
                w, scale = quantize_rows(t)
                tensors[key], tensors[key + "_scale"] = w.cpu(), scale.squeeze(1).cpu()
            else:
                tensors[key] = t.cpu().contiguous()
            del t
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        index |= dict.fromkeys(tensors, name)
        del tensors
    if len(names) > 1:
        total = sum(_tensor_bytes(shapes[k], FP8 if k in quantized else dtype) for k in where)
        (out / "diffusion_pytorch_model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(index.items()))}, indent=2)
        )

    raw = read_json(folder / "config.json")
    raw["torch_dtype"] = str(dtype).removeprefix("torch.")
    raw["quantization"] = {
        "method": "fp8",
        "format": "float8_e4m3fn",
        "weights": "per output channel, float32 scale in <key>_scale",
        "activations": "per token, dynamic",
        "modules": list(modules),
    }
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
