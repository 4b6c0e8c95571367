"""Loading a DiT: the one place that composes the model file, the checkpoint reader, fp8 and parallelism.

`load_transformer(path, dtype=, device=, quantize=, parallel=)`:

1. read config.json and pick the model family from its `_class_name` (`FAMILIES`);
2. build the model on the meta device;
3. with several ranks, swap in this rank's tensor / sequence-parallel layers (fastdit.parallel) and take
   the slice of every tensor it reads from their types (`shard_plan`);
4. for a folder written by `fastdit quantize`, swap in empty quantized layers for its fp8 / int4 tensors
   (fastdit.quant);
5. stream the tensors in (fastdit.checkpoint), every key and shape checked first;
6. quantize a float folder's block linears as the `quantize` recipe says (fastdit.quant.recipes; after sharding:
   each rank its own);
7. wrap a parallel model in its family's wrapper (`ParallelTransformer`, ...), which has the single-device model's call.

With a memory plan that stages on the host (fastdit.memory: the DiT, or its float form, does not fit the GPU),
step 5 reads into host memory and the plan places the model on the device block by block, quantizing each block
on the way (step 6), so the GPU never holds more than one float block.

The checkpoint reader, quantization, parallel and memory code do not know about each other; only this module does.
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
from fastdit.parallel.qwenimage21 import ParallelQwenImage21, parallelize_qwenimage21
from fastdit.parallel.state import ParallelState
from fastdit.parallel.transformer import ParallelTransformer, check_parallel_config, parallelize, shard_plan
from fastdit.quant.checkpoint import check_quantized_checkpoint, folder_quantization
from fastdit.quant.fp8 import BLOCK_LINEARS, MODULATION
from fastdit.quant.recipes import (
    BlockRoles,
    Recipe,
    block_quantizer,
    check_tensor_parallel,
    parse_quantize,
    quantize_blocks,
    saved_recipe,
)


@dataclass(frozen=True)
class Family:
    """A DiT architecture as the loader sees it: its config, its module, its checkpoint-name table, the block
    linears quantization replaces (paths inside a block), and how fastdit.parallel shards it: `parallelize(model,
    state, shard_modulation=)` swaps the layers of a model on meta, `wrapper(model, state)` gives it the model's
    call. `mlp_out` (the MLPs' second linears) and `modulation` (per-block modulation projections) are the roles
    quantization recipes treat apart (fastdit.quant.recipes)."""

    config_from_diffusers: Callable[[dict], object]
    model: type[nn.Module]
    checkpoint_keys: Callable[[str], list[str]]  # our parameter name -> [diffusers keys]
    block_linears: tuple[str, ...]
    parallelize: Callable[..., nn.Module] = parallelize
    wrapper: Callable[[nn.Module, ParallelState], nn.Module] = ParallelTransformer
    mlp_out: tuple[str, ...] = ()
    modulation: tuple[str, ...] = ()

    @property
    def roles(self) -> BlockRoles:
        return BlockRoles(self.block_linears, self.mlp_out, self.modulation)


FAMILIES: dict[str, Family] = {
    "QwenImageTransformer2DModel": Family(
        DiTConfig.from_diffusers,
        QwenImageTransformer,
        checkpoint_keys,
        BLOCK_LINEARS,
        mlp_out=("img_mlp.fc2", "txt_mlp.fc2"),
        modulation=MODULATION,
    ),
    "QwenImage21Transformer2DModel": Family(
        QwenImage21Config.from_diffusers,
        QwenImage21Transformer,
        qwenimage21_keys,
        ("qkv", "out", "mlp.gate_up", "mlp.down"),
        parallelize_qwenimage21,
        ParallelQwenImage21,
        mlp_out=("mlp.down",),
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


def check_quantization(folder: Path, saved: dict | None, recipe: Recipe | None, dtype, device) -> bool:
    """Whether fp8 is emulated, after the device and dtype checks, before any tensor is read."""
    if saved is None and recipe is None:
        return False
    emulate = recipe is not None and recipe.emulate
    method = saved["method"] if saved is not None else recipe.method
    if recipe is not None and saved is not None and recipe.method != method:
        raise FastditError(
            f"{folder} holds {method} weights written by `fastdit quantize`; it cannot run as {recipe.name}"
        )
    if method == "int4" or emulate:
        return emulate
    try:
        (recipe or Recipe("fp8-fast")).check_device(device)
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
    memory=None,
) -> nn.Module:
    """Load a diffusers-format DiT folder (or a pipeline root holding `transformer/`).

    `quantize`: a recipe of fastdit.quant.recipes ("fp8", "fp8-fast", "fp8-blockwise", "int4"; the fp8 ones as
    "...-emulated" for CPU tests); a folder written by `fastdit quantize` (config.json has a `quantization` entry)
    loads quantized without being asked.
    `memory`: a fastdit.memory.MemoryPlan (anything with `stage_on_host` and `place(model, device, quantize)`);
    when it stages on the host, the weights are read into host memory and the plan puts them on `device`.
    `parallel`: this rank's `ParallelState`; with several ranks each rank builds its parallel layers, reads only
    its slices, and gets a `ParallelTransformer`. `shard_modulation` (default: when tp > 1) also splits the
    modulation linears (a third of the weights) at one all-gather per stream and block.
    """
    folder = resolve_transformer_dir(path)
    family, cfg = read_family(folder)
    device = torch.device(device) if device is not None else (parallel.device if parallel else default_device())
    sharded = parallel is not None and parallel.world_size > 1
    saved = folder_quantization(folder)
    recipe = parse_quantize(quantize)
    emulate = check_quantization(folder, saved, recipe, dtype, device)
    saved_layers = saved_recipe(saved)[1] if saved is not None else {}
    layers = recipe.layers(family.roles) if recipe is not None else {}
    check_tensor_parallel(recipe, saved_layers | layers, sharded)
    if sharded:
        check_parallel_config(cfg, parallel.tp, parallel.sp)
        if shard_modulation is None:
            shard_modulation = parallel.tp > 1
        if any(m in family.modulation for m in saved_layers | layers):
            shard_modulation = False  # an all-gathered sharded layer cannot be quantized
    with torch.device("meta"):
        model = family.model(cfg)
    _check_size_against_weights(model, folder)
    plan = lambda name: None  # noqa: E731
    if sharded:
        family.parallelize(model, parallel, shard_modulation=shard_modulation)
        plan = shard_plan(model, parallel)  # from the parallel layer types, before fp8 layers replace them
    if saved is not None:
        keys = quantized_keys(cfg.num_layers, tuple(saved_layers), family.checkpoint_keys)
        check_quantized_checkpoint(folder, keys, saved["method"])
        quantize_blocks(model, saved_layers, emulate)  # empty quantized layers for the loader
    if memory is not None and memory.stage_on_host:
        if sharded:
            raise ConfigError("memory plans that offload the DiT run on one device, not under --tp / --sp / --cfg")
        cpu = torch.device("cpu")
        load_state_dict_into(model, folder, dtype=dtype, device=cpu, shard_plan=plan, key_map=family.checkpoint_keys)
        model = model.eval().requires_grad_(False)
        memory.place(model, device, block_quantizer(layers, emulate) if layers else None)
        return model
    load_state_dict_into(model, folder, dtype=dtype, device=device, shard_plan=plan, key_map=family.checkpoint_keys)
    model = model.eval().requires_grad_(False)
    if layers:
        quantize_blocks(model, layers, emulate)  # a float folder's layers (a no-op on layers already quantized)
    return family.wrapper(model, parallel) if sharded else model
