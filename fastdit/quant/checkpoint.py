"""Quantized checkpoints (fp8 or int4): `fastdit quantize` writes them, the loader reads their layout from config.json.

A float transformer checkpoint is streamed one tensor at a time into safetensors shards, everything that is not
quantized in the float dtype, and a `quantization` entry in config.json names the method and the modules:
- fp8: each quantized weight as e4m3 under its own name, plus `<key>_scale` float32 (out,);
- int4: each quantized `<module>.weight` becomes `<module>.qweight` (out, in / 2) uint8 and `<module>.weight_scale`,
  `<module>.weight_offset` (out, in / 128) in the float dtype (fastdit.kernels.w4a16 has the format).
Loading such a folder builds the quantized layers on meta and streams the stored tensors in: no float copy of the
quantized weights ever exists. Which keys a model's modules have is the model's table, passed in (`quantized_keys`).
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
from fastdit.kernels.w4a16 import GROUP, group_size, quantize_int4

METHODS = ("fp8", "int4")


def folder_quantization(folder: Path) -> dict | None:
    """The `quantization` entry of a transformer folder's config.json (None: a float checkpoint)."""
    cfg_file = folder / "config.json"
    q = read_json(cfg_file).get("quantization")
    if q is None:
        return None
    if not isinstance(q, dict) or q.get("method") not in METHODS or not isinstance(q.get("modules"), list):
        raise CheckpointError(f"{cfg_file}: unsupported quantization entry {q!r} (fastdit writes methods {METHODS})")
    if q["method"] == "int4" and q.get("group_size") != GROUP:
        raise CheckpointError(f"{cfg_file}: int4 checkpoints have group_size {GROUP}, this one {q.get('group_size')!r}")
    return q


def stored_tensors(key: str, method: str) -> list[tuple[str, str | None]]:
    """The (name, safetensors dtype or None for the float dtype) a quantized weight `key` is stored as."""
    if method == "int4":
        base = key.removesuffix(".weight")
        return [(base + ".qweight", "U8"), (base + ".weight_scale", None), (base + ".weight_offset", None)]
    return [(key, "F8_E4M3"), (key + "_scale", "F32")]


def check_quantized_checkpoint(folder: Path, quantized_keys: list[str], method: str = "fp8") -> None:
    """Header reads only: each quantized weight is stored as its method stores it (e4m3 + float32 scales, or
    packed uint8 + scales and offsets)."""
    where = weight_map(folder)
    for key in quantized_keys:
        for name, want in stored_tensors(key, method):
            if name not in where:
                raise CheckpointError(f"missing key in quantized checkpoint {folder}: {name}")
            if want is None:
                continue
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
    method: str = "fp8",
    recipe: str | None = None,
) -> Path:
    """Write an fp8 or int4 (`method`) copy of a float transformer checkpoint; returns the new transformer folder.

    `quantized_keys` are the checkpoint keys stored quantized (the weights of the model's `modules`, which are
    recorded in config.json for the loader, with the `recipe` name they came from). Streams: one tensor at a time is read (cast to `dtype`, quantized
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
        _write_quantized(folder, out, set(quantized_keys), modules, dtype, device, max_shard_bytes, method, recipe)
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
    method: str,
    recipe: str | None,
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

    def stored_bytes(key: str) -> int:
        shape = shapes[key]
        if key not in quantized:
            return _tensor_bytes(shape, dtype)
        if method == "int4":
            groups = shape[1] // group_size(shape[1])
            return _tensor_bytes([shape[0], shape[1] // 2], torch.uint8) + 2 * _tensor_bytes([shape[0], groups], dtype)
        return _tensor_bytes(shape, FP8) + _tensor_bytes(shape[:1], torch.float32)

    shards: list[list[str]] = [[]]
    size = 0
    for key in sorted(where):
        n = stored_bytes(key)
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
            if key in quantized and method == "int4":
                names = [name for name, _ in stored_tensors(key, method)]
                tensors.update(zip(names, (x.cpu() for x in quantize_int4(t, dtype)), strict=True))
            elif key in quantized:
                w, scale = quantize_rows(t)
                tensors[key], tensors[key + "_scale"] = w.cpu(), scale.squeeze(1).cpu()
            else:
                tensors[key] = t.cpu().contiguous()
            del t
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        index |= dict.fromkeys(tensors, name)
        del tensors
    if len(names) > 1:
        total = sum(stored_bytes(k) for k in where)
        (out / "diffusion_pytorch_model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(index.items()))}, indent=2)
        )

    raw = read_json(folder / "config.json")
    raw["torch_dtype"] = str(dtype).removeprefix("torch.")
    if method == "int4":
        raw["quantization"] = {
            "method": "int4",
            "group_size": GROUP,
            "format": "uint8 pairs: in each group of G (128; 64 or 32 where 128 does not divide a layer's input), "
            "byte j holds element j (low nibble) and j + G / 2 (high)",
            "weights": "w = q * weight_scale + weight_offset per group, in <module>.qweight / .weight_scale / "
            ".weight_offset",
            "activations": "not quantized",
            "modules": list(modules),
        }
    else:
        raw["quantization"] = {
            "method": "fp8",
            "format": "float8_e4m3fn",
            "weights": "per output channel, float32 scale in <key>_scale",
            "activations": "per token, dynamic",
            "modules": list(modules),
        }
    if recipe is not None:
        raw["quantization"]["recipe"] = recipe
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
