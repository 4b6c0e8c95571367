"""LoRA adapters on a finished DiT of the family, applied from outside the model file: `DiTLoras`.

One `DiTLoras` per model (a `QwenImageTransformer` or `QwenImage21Transformer`, or fastdit.parallel's wrapper of
one, possibly with fp8 layers; `fastdit.lora.families` says which linears each architecture offers). It holds the loaded adapters, already cut to this rank's slices, and applies them two ways:

- dynamic (`activate`): each layer an active adapter touches becomes a `fastdit.lora.layer.LoraLinear` whose
  stacked factors are rewritten for every new set of adapters or scales; the base weights are untouched;
- merged (`fuse`): `W += sum_k scale_k * alpha_k / r_k * B_k @ A_k` in float32, cast back to the weight's dtype;
  an fp8 layer is dequantized, merged in float32 and quantized again (per-row scales recomputed). The
  original tensors of every touched layer are kept in host memory, so `unfuse` / `unload` put the base
  weights back bit for bit. Cost: one host copy of the touched layers (all of them for a LoRA of every linear:
  ~41 GB in bf16, ~21 GB for an fp8 model's e4m3 block weights plus its bf16 others), none on the GPU.

Names: adapters are addressed by diffusers' module names (`transformer_blocks.1.attn.to_q`, as
`fastdit.lora.formats.read_lora` returns them); the family's `diffusers_modules` maps each of our linear layers to
the diffusers module(s) it holds (a fused Q/K/V: three, in row order; 2.1's fused SwiGLU gate / up: two).

Tensor parallelism: how a layer is split is read from its shape against the full model's: fewer output rows is a
column shard (each part's up factor cut to this rank's rows: B rows split), fewer input columns a row shard (the
down factor cut to this rank's columns: A columns split; `LoraLinear` adds the partial side product before the
base's all-reduce). The merged update of a shard is the same cut of the full update.

Nothing is half-applied: a LoRA is read and checked against the model's layer shapes (`check_lora`) before any
state changes, an unknown adapter name or bad scale is refused before any layer is repacked, and a merge that
fails midway puts back the layers it had already changed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from fastdit.errors import LoraError
from fastdit.kernels.fp8_rows import quantize_rows
from fastdit.lora.families import lora_family
from fastdit.lora.formats import LoraWeights, check_lora, read_lora
from fastdit.lora.layer import LoraLinear
from fastdit.memory.offload import streamed_modules
from fastdit.quant.fp8 import Fp8Linear

LoraSource = str | os.PathLike | Mapping[str, Tensor] | Mapping[str, LoraWeights]


@dataclass(frozen=True)
class Target:
    """One of our linear layers as LoRA sees it: the diffusers modules it holds (row blocks, in order), the rows
    and columns of the full layer this rank holds."""

    parent: nn.Module
    leaf: str
    parts: tuple[str, ...]
    part_rows: slice  # of each part's full output rows (the same for every part)
    cols: slice  # of the full input columns


@dataclass(frozen=True)
class Factors:
    """One adapter's factors for one diffusers module, cut to this rank: down (r, in_local), up (rows, r)."""

    row: int  # first output row of the part inside our (fused) layer
    down: Tensor
    up: Tensor
    ratio: float  # alpha / rank


@dataclass(frozen=True)
class Adapter:
    name: str
    source: str
    rank: int  # the largest rank over its layers
    layers: tuple[str, ...]  # diffusers module names
    factors: dict[str, list[Factors]]  # our module name -> factors


def _tp_rank(model: nn.Module) -> int:
    state = getattr(model, "state", None)
    return 0 if state is None else state.tp_rank


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear | Fp8Linear)


def check_scale(scale, what: str) -> float:
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale):
        raise LoraError(f"{what}: the scale must be a finite number, got {scale!r}")
    return float(scale)


class DiTLoras:
    """The LoRA adapters of one DiT; see the module docstring. `dtype`: the compute dtype of the side GEMMs."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        base = model.base
        self.family = lora_family(base.cfg)
        self.model, self.dtype = model, dtype
        self.device = base.img_in.weight.device
        self.shapes = self.family.targets(base.cfg)
        self.targets = self._find_targets(base, _tp_rank(model))
        self.streamed = streamed_modules(model)  # layers whose weights a memory plan streams: not movable
        self.adapters: dict[str, Adapter] = {}
        self.scales: dict[str, float] = {}  # the active (dynamic) set
        self.fused: dict[str, float] = {}  # merged into the weights, in merge order
        self.wrappers: dict[str, LoraLinear] = {}
        self.originals: dict[str, dict[str, Tensor]] = {}  # our module -> its tensors before the first merge
        self.version = 0  # changes whenever the compiled step's structure changes (see `layout_key`)

    def _find_targets(self, base: nn.Module, tp_rank: int) -> dict[str, Target]:
        targets = {}
        for name, module in base.named_modules():
            if not _is_linear(module):
                continue
            parts = tuple(self.family.diffusers_modules(name))
            full_out = sum(self.shapes[p][0] for p in parts)
            full_in = self.shapes[parts[0]][1]
            out_local, in_local = module.weight.shape
            rows = out_local // len(parts)  # per part
            if full_out % out_local or full_in % in_local or (full_out != out_local and full_in != in_local):
                raise LoraError(f"{name}: a {out_local}x{in_local} layer is no tensor-parallel slice of {parts}")
            col_split, row_split = full_out // out_local, full_in // in_local
            part_rows = slice(tp_rank * rows, (tp_rank + 1) * rows) if col_split > 1 else slice(0, rows)
            cols = slice(tp_rank * in_local, (tp_rank + 1) * in_local) if row_split > 1 else slice(0, in_local)
            parent_name, _, leaf = name.rpartition(".")
            targets[name] = Target(base.get_submodule(parent_name), leaf, parts, part_rows, cols)
        return targets

    # ---- adapters -----------------------------------------------------------------------------------

    def load(self, source: LoraSource, name: str | None = None) -> str:
        """Read, check and cut one LoRA (path, state dict, or `read_lora`'s result); returns its name. Changes
        no layer: `activate` or `fuse` applies it."""
        label = str(source) if isinstance(source, str | os.PathLike) else (name or "<state dict>")
        if name is None:
            name = Path(source).stem if isinstance(source, str | os.PathLike) else f"lora{len(self.adapters)}"
        if not isinstance(name, str) or not name:
            raise LoraError(f"adapter_name must be a non-empty string, got {name!r}")
        if name in self.adapters:
            raise LoraError(f"adapter_name {name!r} is already loaded; pick another name or unload_loras() first")
        if isinstance(source, Mapping) and source and all(isinstance(v, LoraWeights) for v in source.values()):
            loras = dict(source)
        else:
            loras = read_lora(source, name_for_errors=label, names=self.family.names)
        check_lora(loras, self.shapes, label)
        factors: dict[str, list[Factors]] = {}
        for module, target in self.targets.items():
            for j, part in enumerate(target.parts):
                if part not in loras:
                    continue
                w = loras[part]
                rows = target.part_rows.stop - target.part_rows.start
                down = w.down[:, target.cols].to(self.device, self.dtype)
                up = w.up[target.part_rows].to(self.device, self.dtype)
                factors.setdefault(module, []).append(Factors(j * rows, down, up, w.alpha / w.rank))
        rank = max(w.rank for w in loras.values())
        self.adapters[name] = Adapter(name, label, rank, tuple(sorted(loras)), factors)
        return name

    def activate(self, scales: Mapping[str, float]) -> None:
        """Make `scales` ({adapter: scale}) the active dynamic set, replacing the previous one (adapters not named
        go inactive). Unchanged sets cost nothing; others repack the touched layers' stacked factors."""
        scales = self._checked(scales)
        if scales == self.scales:
            return
        touched: dict[str, list[tuple[int, Tensor, Tensor]]] = {}
        ranks: dict[str, int] = {}
        for name, scale in scales.items():
            for module, parts in self.adapters[name].factors.items():
                for f in parts:
                    up = (f.up.float() * (scale * f.ratio)).to(self.dtype)
                    touched.setdefault(module, []).append((f.row, f.down, up))
                    ranks[module] = ranks.get(module, 0) + f.down.shape[0]
        for module, blocks in touched.items():
            wrapper = self._wrapper(module)
            was_active = wrapper.active
            if wrapper.pack(blocks, ranks[module]) or not was_active:
                self.version += 1
        for module, wrapper in self.wrappers.items():
            if module not in touched and wrapper.active:
                wrapper.clear()
                self.version += 1
        self.scales = scales

    def _checked(self, scales: Mapping[str, float]) -> dict[str, float]:
        if not isinstance(scales, Mapping):
            raise LoraError(f"the active LoRAs must be a mapping {{adapter_name: scale}}, got {type(scales).__name__}")
        unknown = [name for name in scales if name not in self.adapters]
        if unknown:
            loaded = ", ".join(self.adapters) or "none"
            raise LoraError(f"no LoRA adapter named {unknown[0]!r} is loaded (loaded: {loaded})")
        return {name: check_scale(scale, f"LoRA {name!r}") for name, scale in scales.items()}

    def _wrapper(self, module: str) -> LoraLinear:
        if module not in self.wrappers:
            target = self.targets[module]
            base = getattr(target.parent, target.leaf)
            movable = id(base) not in self.streamed
            wrapper = LoraLinear(base, dtype=self.dtype, device=self.device, movable=movable)
            setattr(target.parent, target.leaf, wrapper)
            self.wrappers[module] = wrapper
            self.version += 1
        return self.wrappers[module]

    def layout_key(self) -> tuple:
        """Changes whenever the step's structure does (a layer's side GEMMs switched on or off, or grown): what a
        recorded CUDA graph depends on beyond the step's own shapes. Scales and factors do not change it."""
        return ("lora", self.version) if self.wrappers else ()

    # ---- merging ------------------------------------------------------------------------------------

    @torch.no_grad()
    def fuse(self, keep_originals: bool = True) -> None:
        """Merge the active set into the weights (see the module docstring); it is then no longer applied
        dynamically. `keep_originals=False` (benchmarks) keeps no host copy: `unfuse` is then impossible."""
        scales = dict(self.scales)
        if not scales:
            raise LoraError("no active LoRA to fuse: load_lora() or set_loras() first")
        changed: list[str] = []
        try:
            for module in self.targets:
                parts = [(s, f) for name, s in scales.items() for f in self.adapters[name].factors.get(module, ())]
                if not parts:
                    continue
                layer = self._base_layer(module)
                delta = torch.zeros(layer.weight.shape, dtype=torch.float32, device=layer.weight.device)
                for scale, f in parts:
                    rows = slice(f.row, f.row + f.up.shape[0])
                    delta[rows] += (scale * f.ratio) * (f.up.float() @ f.down.float())
                if keep_originals and module not in self.originals:
                    self.originals[module] = {k: v.detach().to("cpu", copy=True) for k, v in _weights(layer).items()}
                changed.append(module)
                _merge(layer, delta)
        except BaseException:
            if keep_originals:
                for module in changed:
                    self._restore(module)
            raise
        self.activate({})
        self._unwrap()  # the merged model has the base model's structure: not even an inactive side branch
        self.fused.update({name: self.fused.get(name, 0.0) + s for name, s in scales.items()})

    @torch.no_grad()
    def unfuse(self) -> None:
        """Put back the weights every merge changed, bit for bit."""
        if self.fused and not self.originals:
            raise LoraError("the LoRAs were fused without keeping the base weights; reload the model to undo them")
        for module in list(self.originals):
            self._restore(module)
        self.originals.clear()
        self.fused = {}

    def _restore(self, module: str) -> None:
        layer = self._base_layer(module)
        for k, v in self.originals[module].items():
            getattr(layer, k).copy_(v)

    def _base_layer(self, module: str) -> nn.Module:
        target = self.targets[module]
        layer = getattr(target.parent, target.leaf)
        return layer.base if isinstance(layer, LoraLinear) else layer

    def unload(self) -> None:
        """Every adapter gone: merged weights put back, the original layers back in place of the wrappers."""
        self.unfuse()
        self._unwrap()
        self.adapters.clear()
        self.scales = {}

    def _unwrap(self) -> None:
        """The original layers back in place of the wrappers (their stacked factors freed)."""
        for module, wrapper in self.wrappers.items():
            target = self.targets[module]
            setattr(target.parent, target.leaf, wrapper.release())
        self.wrappers.clear()
        self.version += 1

    def describe(self) -> list[dict]:
        """The loaded adapters: name, source, rank, layer count, active scale (None if inactive), fused scale."""
        return [
            {
                "name": a.name,
                "source": a.source,
                "rank": a.rank,
                "layers": len(a.layers),
                "scale": self.scales.get(a.name),
                "fused_scale": self.fused.get(a.name),
            }
            for a in self.adapters.values()
        ]


def _weights(layer: nn.Module) -> dict[str, Tensor]:
    """The tensors a merge rewrites: the weight, and an fp8 layer's per-row scales."""
    if isinstance(layer, Fp8Linear):
        return {"weight": layer.weight, "weight_scale": layer.weight_scale}
    return {"weight": layer.weight}


def _merge(layer: nn.Module, delta: Tensor) -> None:
    """weight += delta (float32), in place (the tensors a compiled graph or a CUDA graph reads stay the same)."""
    if isinstance(layer, Fp8Linear):
        w = layer.weight.float() * layer.weight_scale[:, None]
        q, scale = quantize_rows(w + delta)
        layer.weight.copy_(q)
        layer.weight_scale.copy_(scale.squeeze(1))
    else:
        layer.weight.copy_((layer.weight.float() + delta).to(layer.weight.dtype))
