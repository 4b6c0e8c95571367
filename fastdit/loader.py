"""Load diffusers-format Qwen-Image transformer checkpoints into `QwenImageTransformer`.

The model is built on the meta device; each tensor is streamed from safetensors straight to the target
device (one tensor at a time, mmap-backed, so host memory never holds a second copy of the model) and
assigned in place. Every key and shape is checked before anything is read; bad input raises
`CheckpointError` naming the file and the key, and no half-loaded model is ever returned.

diffusers' parameter names (with container indices such as `img_mod.1` or `to_out.0`) are mapped to
ours in ONE table, `checkpoint_keys`, and only there. Fusions (Q/K/V into one weight) happen here.
Tensor parallelism passes a `ShardSpec` per parameter so each rank reads only its slice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from fastdit.errors import CheckpointError, ConfigError
from fastdit.model import DiTConfig, QwenImageTransformer

INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
SINGLE_NAME = "diffusion_pytorch_model.safetensors"

# Our parameter (without .weight/.bias) -> diffusers module(s) concatenated along dim 0.
_TOP = {
    "img_in": ["img_in"],
    "txt_norm": ["txt_norm"],
    "txt_in": ["txt_in"],
    "time_embed.fc1": ["time_text_embed.timestep_embedder.linear_1"],
    "time_embed.fc2": ["time_text_embed.timestep_embedder.linear_2"],
    "final.mod": ["norm_out.linear"],
    "final.proj": ["proj_out"],
}
_BLOCK = {
    "img_mod.lin": ["img_mod.1"],
    "txt_mod.lin": ["txt_mod.1"],
    "attn.img_qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "attn.txt_qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "attn.img_q_norm": ["attn.norm_q"],
    "attn.img_k_norm": ["attn.norm_k"],
    "attn.txt_q_norm": ["attn.norm_added_q"],
    "attn.txt_k_norm": ["attn.norm_added_k"],
    "attn.img_out": ["attn.to_out.0"],
    "attn.txt_out": ["attn.to_add_out"],
    "img_mlp.fc1": ["img_mlp.net.0.proj"],
    "img_mlp.fc2": ["img_mlp.net.2"],
    "txt_mlp.fc1": ["txt_mlp.net.0.proj"],
    "txt_mlp.fc2": ["txt_mlp.net.2"],
}


def checkpoint_keys(name: str) -> list[str]:
    """Our parameter name -> the diffusers checkpoint keys it is made of (concatenated along dim 0)."""
    module, _, leaf = name.rpartition(".")
    if module.startswith("blocks."):
        _, idx, rest = module.split(".", 2)
        return [f"transformer_blocks.{idx}.{src}.{leaf}" for src in _BLOCK[rest]]
    return [f"{src}.{leaf}" for src in _TOP[module]]


@dataclass(frozen=True)
class ShardSpec:
    """Take slice `rank` of `world` along `dim` of each source tensor (before fusing them)."""

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


def read_config(folder: Path) -> DiTConfig:
    cfg_file = folder / "config.json"
    try:
        raw = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {cfg_file}: {e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_file} is not a JSON object")
    try:
        return DiTConfig.from_diffusers(raw)
    except ConfigError as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None


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
    shard_plan: Callable[[str], ShardSpec | None] = lambda name: None,
    key_map: Callable[[str], list[str]] = checkpoint_keys,
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
    """`dtype`, unless the parameter's module lists it in `keep_dtype` (fastdit.quant: fp8 weights, scales)."""
    module_name, _, leaf = name.rpartition(".")
    return p.dtype if leaf in getattr(model.get_submodule(module_name), "keep_dtype", ()) else dtype


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_transformer(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device | None = None,
    quantize: str | None = None,
) -> QwenImageTransformer:
    """Load a diffusers-format Qwen-Image transformer folder (or a pipeline root holding `transformer/`).

    `quantize="fp8"` quantizes the block linears at load (see fastdit.quant); a folder written by
    `fastdit quantize` (config.json has a `quantization` entry) loads as fp8 without being asked.
    """
    from fastdit import quant  # imported here: quant builds on this module

    folder = resolve_transformer_dir(path)
    device = torch.device(device) if device is not None else default_device()
    if quantize is not None or quant.folder_quantization(folder) is not None:
        return quant.load_quantized(folder, quantize, dtype=dtype, device=device)
    cfg = read_config(folder)
    with torch.device("meta"):
        model = QwenImageTransformer(cfg)
    load_state_dict_into(model, folder, dtype=dtype, device=device)
    return model.eval().requires_grad_(False)


def diffusers_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our parameters under diffusers' names, as views (fused Q/K/V split along dim 0): no copy.

    Used to run diffusers' model on exactly our weights (benchmarks and tests).
    """
    out = {}
    for name, p in model.named_parameters():
        keys = checkpoint_keys(name)
        for key, part in zip(keys, p.detach().chunk(len(keys), dim=0), strict=True):
            out[key] = part
    return out
