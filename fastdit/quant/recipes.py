"""Quantization recipes: which linears of a DiT block become which quantized layer, by name.

| recipe          | layers                                                                                      |
| --------------- | ------------------------------------------------------------------------------------------- |
| `fp8`           | fp8 W8A8 (per-token / per-channel scales) for the block linears except the MLPs' second     |
|                 | linears, which stay in the compute dtype (NVIDIA ModelOpt's Qwen-Image recipe, which SGLang |
|                 | ships, keeps `img_mlp.net.2` / `txt_mlp.net.2` unquantized; modulation, img_in / txt_in and  |
|                 | proj_out are never quantized by fastdit's fp8 recipes)                                      |
| `fp8-fast`      | fp8 for every block linear (the MLPs' second linears too): fastest, fastdit's first fp8     |
| `fp8-blockwise` | as `fp8`, with the MLPs' second linears in fine-grained fp8 (1 x 128 activation groups,     |
|                 | 128 x 128 weight blocks; fastdit.quant.fp8_blockwise) instead of the compute dtype         |
| `int4`          | weight-only int4, groups of 128 (fastdit.quant.int4), for the block linears and the         |
|                 | modulation projections: the DiT fits in 11.5 GB                                             |

tests/test_fp8_outliers.py measures each layer's fp8 error per scaling scheme on a full-width block whose
activations carry outlier channels (the results page quotes it). `-emulated` variants of the fp8 recipes do the
fp8 rounding with float32 math on any device, for tests; int4 runs on any device as it is (fastdit.quant.int4).

A model family names its block's roles (`BlockRoles`: every linear, the MLPs' second linears, the modulation
projections); a recipe turns them into {path inside a block: layer kind} (`Recipe.layers`), and `quantize_block`
swaps one block's layers, so a loader can quantize one block at a time (fastdit.memory places blocks one by one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fastdit.errors import ConfigError, FastditError
from fastdit.quant.fp8 import check_fp8_device, fp8_layer
from fastdit.quant.fp8_blockwise import check_blockwise_device, fp8_block_layer
from fastdit.quant.int4 import int4_layer

# Layer kinds a recipe assigns.
FP8, FP8_BLOCK, INT4 = "fp8", "fp8-block", "int4"


@dataclass(frozen=True)
class BlockRoles:
    """What a family's block holds, as paths inside one block."""

    linears: tuple[str, ...]  # every linear the fp8 recipes may quantize
    mlp_out: tuple[str, ...] = ()  # the MLPs' second linears (their input is the widest, most outlier-prone)
    modulation: tuple[str, ...] = ()  # per-block modulation projections (one GEMM per image with a modulation table)


@dataclass(frozen=True)
class Recipe:
    name: str  # a RECIPES key, without "-emulated"
    emulate: bool = False  # fp8 rounding with float32 math (tests)

    @property
    def method(self) -> str:
        return "int4" if self.name == "int4" else "fp8"

    def layers(self, roles: BlockRoles) -> dict[str, str]:
        """{path inside a block: layer kind} for a family's `roles`."""
        if self.name == "int4":
            return dict.fromkeys(roles.linears + roles.modulation, INT4)
        out = dict.fromkeys(roles.linears, FP8)
        for path in roles.mlp_out:
            if self.name == "fp8":
                del out[path]
            elif self.name == "fp8-blockwise":
                out[path] = FP8_BLOCK
        return out

    def check_device(self, device: torch.device) -> None:
        """FastditError unless this recipe's layers run on `device` (int4 and emulation run anywhere)."""
        if self.emulate or self.method == "int4":
            return
        check_fp8_device(device)
        if self.name == "fp8-blockwise":
            check_blockwise_device(device)


RECIPES = ("fp8", "fp8-fast", "fp8-blockwise", "int4")
QUANTIZE_CHOICES = RECIPES  # for --quantize; "-emulated" fp8 variants are accepted by the Python API (tests)


def parse_quantize(value: str | None) -> Recipe | None:
    """A `quantize=` value -> its Recipe (None: no quantization); FastditError naming the choices otherwise."""
    if value is None:
        return None
    name = value.removesuffix("-emulated")
    if name in RECIPES and (name == value or name != "int4"):
        return Recipe(name, emulate=name != value)
    names = ", ".join(repr(r) for r in RECIPES)
    raise FastditError(
        f"quantize must be one of {names} (the fp8 ones also as '<name>-emulated', for tests) or None, got {value!r}"
    )


def saved_recipe(entry: dict) -> tuple[Recipe, dict[str, str]]:
    """The recipe and {path: kind} of a checkpoint written by `fastdit quantize` (its config.json `quantization`)."""
    method = entry["method"]
    kind = INT4 if method == "int4" else FP8
    return Recipe("int4" if method == "int4" else "fp8-fast"), dict.fromkeys(entry["modules"], kind)


def swap_layer(layer: nn.Module, kind: str, emulate: bool) -> nn.Module:
    """The quantized replacement of one linear (empty on meta, quantized from its weights otherwise)."""
    if kind == FP8:
        return fp8_layer(layer, emulate, fast_accum=True)
    if kind == FP8_BLOCK:
        return fp8_block_layer(layer, emulate)
    if kind == INT4:
        return int4_layer(layer)
    raise ConfigError(f"unknown quantized layer kind {kind!r}")


def quantize_block(block: nn.Module, layers: dict[str, str], emulate: bool = False) -> nn.Module:
    """Swap `layers` ({path inside the block: kind}) of one block, in place; returns the block."""
    for path, kind in layers.items():
        parent_name, _, leaf = path.rpartition(".")
        parent = block.get_submodule(parent_name)
        setattr(parent, leaf, swap_layer(getattr(parent, leaf), kind, emulate))
    return block


def quantize_blocks(model: nn.Module, layers: dict[str, str], emulate: bool = False) -> nn.Module:
    """`quantize_block` over every block of `model` (or of the model under a fastdit.parallel wrapper)."""
    for block in model.base.blocks:
        quantize_block(block, layers, emulate)
    return model


def block_quantizer(layers: dict[str, str], emulate: bool) -> Callable[[nn.Module], nn.Module]:
    """A one-argument `quantize_block` for a placement that quantizes block by block."""
    return lambda block: quantize_block(block, layers, emulate)


def check_tensor_parallel(recipe: Recipe | None, kinds: dict[str, str], sharded: bool) -> None:
    """int4 and blockwise fp8 layers run on one rank only."""
    if sharded and any(kind in (INT4, FP8_BLOCK) for kind in kinds.values()):
        name = recipe.name if recipe is not None else "this checkpoint's"
        raise FastditError(f"quantize {name!r} does not run under --tp / --sp / --cfg-parallel; use fp8 or fp8-fast")
