"""Loading a DiT: the one place that composes the model file, the checkpoint reader, fp8 and parallelism.

`load_transformer(path, dtype=, device=, quantize=, parallel=)`:

1. read config.json and pick the model family from its `_class_name` (`FAMILIES`);
2. build the model on the meta device;
3. with several ranks, swap in this rank's tensor / sequence-parallel layers (fastdit.parallel) and take
   the slice of every tensor it reads from their types (`shard_plan`);
4. for a folder written by `fastdit quantize`, swap in empty fp8 layers for its e4m3 tensors (fastdit.quant);
5. stream the tensors in (fastdit.checkpoint), every key and shape checked first;
6. quantize a float folder's block linears when `quantize` asks for it (after sharding: each rank its own);
7. wrap a parallel model in `ParallelTransformer`, which has the single-device model's call.

The checkpoint reader, fp8 and parallel code do not know about each other; only this module does.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from fastdit.checkpoint import default_device, load_state_dict_into, read_json, resolve_transformer_dir, weight_map
from fastdit.errors import CheckpointError, ConfigError, FastditError
from fastdit.models.qwenimage import DiTConfig, QwenImageTransformer
from fastdit.models.qwenimage21 import QwenImage21Config, QwenImage21Transformer
from fastdit.models.qwenimage21_keys import checkpoint_keys as qwenimage21_keys
from fastdit.models.qwenimage_keys import checkpoint_keys
from fastdit.parallel.state import ParallelState
from fastdit.parallel.transformer import ParallelTransformer, check_parallel_config, parallelize, shard_plan
from fastdit.quant.checkpoint import check_fp8_checkpoint, folder_quantization
from fastdit.quant.fp8 import BLOCK_LINEARS, check_fp8_device, parse_mode, quantize_model


@dataclass(frozen=True)
class Family:
    """A DiT architecture as the loader sees it: its config, its module, its checkpoint-name table, the block
    linears fp8 quantizes (paths inside a block), and whether fastdit.parallel can shard it."""

    config_from_diffusers: Callable[[dict], object]
    model: type[nn.Module]
    checkpoint_keys: Callable[[str], list[str]]  # our parameter name -> [diffusers keys]
    block_linears: tuple[str, ...]
    parallel: bool = True


FAMILIES: dict[str, Family] = {
    "QwenImageTransformer2DModel": Family(
        DiTConfig.from_diffusers, QwenImageTransformer, checkpoint_keys, BLOCK_LINEARS
    ),
    "QwenImage21Transformer2DModel": Family(
        QwenImage21Config.from_diffusers,
        QwenImage21Transformer,
        qwenimage21_keys,
        ("qkv", "out", "mlp.gate_up", "mlp.down"),
        parallel=False,
    ),
}


def read_family(folder: Path) -> tuple[Family, object]:
    """The family and config of a transformer folder; CheckpointError naming config.json if either is bad."""
    cfg_file = folder / "config.json"
    raw = read_json(cfg_file)
    name = raw.get("_class_name", "QwenImageTransformer2DModel")
    if name not in FAMILIES:
        raise CheckpointError(f"{cfg_file}: _class_name {name!r} is not a DiT fastdit runs ({', '.join(FAMILIES)})")
    family = FAMILIES[name]
    try:
        return family, family.config_from_diffusers(raw)
    except ConfigError as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None


def read_config(path: str | os.PathLike):
    """The model config of a transformer folder (or a pipeline root holding `transformer/`)."""
    return read_family(resolve_transformer_dir(path))[1]


def quantized_keys(num_layers: int, modules: tuple[str, ...], keys=checkpoint_keys) -> list[str]:
    """The checkpoint keys of the block weights `modules` (paths inside a block) that fp8 stores in e4m3."""
    return [k for i in range(num_layers) for m in modules for k in keys(f"blocks.{i}.{m}.weight")]


def _check_fp8(folder: Path, saved: dict | None, quantize: str | None, dtype, device) -> bool | None:
    """Whether fp8 is emulated (None: no fp8), after the device and dtype checks, before any tensor is read."""
    if saved is None and quantize is None:
        return None
    emulate = parse_mode(quantize or "fp8")
    if not emulate:
        try:
            check_fp8_device(device)
        except FastditError:
            if saved is None:
                raise
            where = str(device)
            if device.type == "cuda" and torch.cuda.is_available():
                where += f" ({torch.cuda.get_device_name(device)})"
            raise FastditError(
                f"{folder} holds fp8 (e4m3) weights written by `fastdit quantize`: they run only on a CUDA GPU with "
                f"fp8 tensor cores (compute capability >= 8.9: Ada, Hopper or newer), not on {where}; here, load "
                "the float folder it was quantized from"
            ) from None
        if dtype != torch.bfloat16:
            raise FastditError(f"fp8 layers compute in bfloat16; load with dtype=torch.bfloat16, not {dtype}")
    return emulate


def _check_size_against_weights(model: nn.Module, folder: Path) -> None:
    """A config.json describing a far bigger model than the weights beside it (another model's config, or an
    empty one, which means the full-size defaults) is named as the problem, rather than the 1800 keys it lacks."""
    wanted = sum(p.numel() for p in model.parameters())
    stored = 0
    for f in sorted(set(weight_map(folder).values())):
        try:
            with safe_open(str(f), framework="pt") as h:
                stored += sum(math.prod(h.get_slice(k).get_shape()) for k in h.keys())  # noqa: SIM118
        except (SafetensorError, OSError, ValueError):
            return  # an unreadable file: the loader names it
    if wanted > 10 * stored:  # closer mismatches are reported key by key (missing keys, shape mismatches)
        raise CheckpointError(
            f"{folder / 'config.json'} describes a DiT of {wanted:,} parameters, but the weights in {folder} hold "
            f"{stored:,} values: the config does not belong to these weights"
        )


def load_transformer(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device | None = None,
    quantize: str | None = None,
    parallel: ParallelState | None = None,
    shard_modulation: bool | None = None,
) -> nn.Module:
    """Load a diffusers-format DiT folder (or a pipeline root holding `transformer/`).

    `quantize="fp8"` runs the block linears in fp8 (fastdit.quant; "fp8-emulated" for CPU tests); a folder written
    by `fastdit quantize` (config.json has a `quantization` entry) loads as fp8 without being asked.
    `parallel`: this rank's `ParallelState`; with several ranks each rank builds its parallel layers, reads only
    its slices, and gets a `ParallelTransformer`. `shard_modulation` (default: when tp > 1) also splits the
    modulation linears (a third of the weights) at one all-gather per stream and block.
    """
    folder = resolve_transformer_dir(path)
    family, cfg = read_family(folder)
    device = torch.device(device) if device is not None else (parallel.device if parallel else default_device())
    sharded = parallel is not None and parallel.world_size > 1
    saved = folder_quantization(folder)
    emulate = _check_fp8(folder, saved, quantize, dtype, device)
    if sharded:
        if not family.parallel:
            raise ConfigError(
                f"{folder}: tensor / sequence / CFG parallelism is not available for {family.model.__name__}"
            )
        check_parallel_config(cfg, parallel.tp, parallel.sp)
        if shard_modulation is None:
            shard_modulation = parallel.tp > 1
        if saved is not None and any(m.endswith("_mod.lin") for m in saved["modules"]):
            shard_modulation = False  # an all-gathered sharded layer cannot be fp8
    with torch.device("meta"):
        model = family.model(cfg)
    _check_size_against_weights(model, folder)
    plan = lambda name: None  # noqa: E731
    if sharded:
        parallelize(model, parallel, shard_modulation=shard_modulation)
        plan = shard_plan(model, parallel)  # from the parallel layer types, before fp8 layers replace them
    if saved is not None:
        modules = tuple(saved["modules"])
        check_fp8_checkpoint(folder, quantized_keys(cfg.num_layers, modules, family.checkpoint_keys))
        quantize_model(model, emulate=emulate, modules=modules)  # empty e4m3 layers for the loader
    load_state_dict_into(model, folder, dtype=dtype, device=device, shard_plan=plan, key_map=family.checkpoint_keys)
    model = model.eval().requires_grad_(False)
    if emulate is not None:
        # A float folder's block linears (a no-op on layers already fp8).
        quantize_model(model, emulate=emulate, modules=family.block_linears)
    return ParallelTransformer(model, parallel) if sharded else model
