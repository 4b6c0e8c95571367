"""Memory plans: where a pipeline's weights live so that an image fits the device's memory.

| plan             | DiT                               | text encoder                   | VAE                          |
| ---------------- | --------------------------------- | ------------------------------ | ---------------------------- |
| `full`           | on the device                     | on the device                  | on the device                |
| `offload-text`   | on the device                     | host memory; each module on    | on the device; decodes in    |
|                  |                                   | the device while it runs       | tiles above the plan's size  |
| `offload-blocks` | as many blocks as fit on the      | as offload-text                | as offload-text              |
|                  | device, the rest streamed from    |                                |                              |
|                  | pinned host memory; modulation    |                                |                              |
|                  | projections in host memory        |                                |                              |
| `auto`           | the first of the three that fits the device's free memory (one line says which)               |

A plan is made before any weight is read, from the folder's headers and configs (`Footprint`: bytes of each part
as they will be held, after quantization) and an estimate of the activations of one call (`Workload`: 1024 x 1024,
one image, CFG, 512 text tokens unless told). A plan that cannot fit raises `PlanError` naming the plan that would.
The activation constants are peaks measured on the CPU allocator (see each constant) with a margin added; the
benchmark (`fastdit bench --stage pipeline --memory ...`) reports the GPU's measured peak per plan.

With a quantization recipe on a float folder whose float DiT does not fit, the plan stages on the host: fastdit.load
reads the weights into host memory and `place` puts them on the device block by block, quantizing each there.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from fastdit.errors import FastditError
from fastdit.load import read_family
from fastdit.memory.offload import ALIGN
from fastdit.memory.place import place_dit
from fastdit.quant.checkpoint import folder_quantization
from fastdit.quant.recipes import parse_quantize, quantize_blocks, saved_recipe

PLANS = ("auto", "full", "offload-text", "offload-blocks")
ORDER = ("full", "offload-text", "offload-blocks")
GIB = 2**30
# Peak activations of one DiT step in units of batch x tokens x dim elements: 14 measured (one full-width block,
# eager, CPU allocator), rounded up.
DIT_ACTIVATION_FACTOR = 16
# Peak of the Qwen-Image VAE decode per output pixel, in elements: 6930 bytes per pixel measured in float32 on the
# CPU allocator at 128 to 384 pixels square (it scales with the pixels), rounded up.
VAE_ELEMENTS_PER_PIXEL = 1800
VAE_TILE_PIXELS = 256 * 256  # diffusers' default tile of AutoencoderKLQwenImage.enable_tiling
TEMPLATE_TOKENS = 34  # the prompt template's prefix (fastdit.pipelines.text)
MARGIN_BYTES = GIB  # cuBLAS / cuDNN workspaces, CUDA graph pools, allocator fragmentation
MARGIN_SHARE = 0.05


class PlanError(FastditError):
    """A memory plan that does not fit; the message names one that would, or what to change."""


@dataclass(frozen=True)
class Workload:
    """One call the plan must hold: image size, images per call, CFG, longest prompt, steps; for an edit, the
    reference images' DiT tokens (appended to each row's image tokens) and the largest one's pixels (VAE-encoded
    before the denoising loop)."""

    height: int = 1024
    width: int = 1024
    images: int = 1
    cfg: bool = True
    text_tokens: int = 512
    steps: int = 50
    reference_tokens: int = 0
    reference_pixels: int = 0


@dataclass(frozen=True)
class Footprint:
    """Bytes of each part as held in memory (dtype and quantization applied)."""

    dit_other: int  # outside the blocks
    block: int  # one block without its modulation, as one aligned streamed buffer
    modulation: int  # every block's modulation projections
    modulation_one: int  # the largest single modulation projection
    num_blocks: int
    dim: int
    dit_float: int  # the whole DiT unquantized (what a float folder reads before quantizing)
    quantized_from_float: bool  # a recipe quantizes a float folder at load
    modulation_paths: tuple[str, ...]  # the family's per-block modulation projections
    text_encoder: int
    text_encoder_one: int  # the largest single tensor (what module-by-module loading holds at once)
    text_hidden: int
    text_intermediate: int
    text_layers: int
    vae: int
    element: int  # bytes per element of the compute dtype

    @property
    def dit(self) -> int:
        return self.dit_other + self.num_blocks * self.block + self.modulation


def _tensor_sizes(folder: Path, element: int) -> tuple[int, int]:
    """(total, largest) bytes of a safetensors folder's tensors, floating ones at `element` bytes each."""
    total = largest = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for key in h.keys():  # noqa: SIM118 (safe_open handles are not dicts)
                sl = h.get_slice(key)
                dtype = sl.get_dtype()
                size = (
                    element
                    if dtype in ("F32", "F16", "BF16", "F64")
                    else {"F8_E4M3": 1, "U8": 1, "I8": 1}.get(dtype, 4)
                )
                n = math.prod(sl.get_shape()) * size
                total += n
                largest = max(largest, n)
    return total, largest


def dit_sizes(family, cfg, dtype: torch.dtype, layers: dict[str, str], from_float: bool) -> dict:
    """The DiT fields of a Footprint: `family` (fastdit.load.Family) and its config, the quantized `layers`
    ({path inside a block: kind}) and whether they are quantized from float weights at load."""
    modulation_paths = tuple(family.modulation)
    with torch.device("meta"):
        model = family.model(cfg)
        n_float = sum(p.numel() for p in model.parameters())
    quantize_blocks(model, layers, emulate=True)  # empty layers of the right kinds: their parameters' shapes

    def held(module, name, p) -> int:
        size = p.dtype.itemsize if name in getattr(module, "keep_dtype", ()) else dtype.itemsize
        return p.numel() * size

    block = model.base.blocks[0]
    streamed = modulation = modulation_one = 0
    for path, module in block.named_modules():
        in_mod = any(path == m or path.startswith(m + ".") for m in modulation_paths)
        sizes = [held(module, n, p) for n, p in module.named_parameters(recurse=False)]
        if in_mod:
            modulation += sum(sizes)
            modulation_one = max(modulation_one, sum(sizes))
        else:
            streamed += sum(-(-n // ALIGN) * ALIGN for n in sizes)
    other = sum(
        held(model.base.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2], p)
        for name, p in model.base.named_parameters()
        if not name.startswith("blocks.")
    )
    return {
        "dit_other": other,
        "block": streamed,
        "modulation": modulation * len(model.base.blocks),
        "modulation_one": modulation_one,
        "num_blocks": len(model.base.blocks),
        "dim": model.base.img_in.out_features,
        "dit_float": n_float * dtype.itemsize,
        "quantized_from_float": from_float and bool(layers),
        "modulation_paths": modulation_paths,
    }


def _dit_sizes(folder: Path, dtype: torch.dtype, quantize: str | None) -> dict:
    family, cfg = read_family(folder)
    saved = folder_quantization(folder)
    recipe = parse_quantize(quantize)
    layers = saved_recipe(saved)[1] if saved is not None else {}
    if recipe is not None:
        layers |= {k: v for k, v in recipe.layers(family.roles).items() if k not in layers}
    return dit_sizes(family, cfg, dtype, layers, from_float=saved is None)


def text_encoder_sizes(text_encoder, dtype: torch.dtype) -> dict:
    """The text-encoder fields of a Footprint from a loaded (or random) transformers model."""
    sizes = [
        p.numel() * (dtype.itemsize if p.is_floating_point() else p.element_size()) for p in text_encoder.parameters()
    ]
    text = getattr(text_encoder.config, "text_config", text_encoder.config)
    return {
        "text_encoder": sum(sizes),
        "text_encoder_one": max(sizes),
        "text_hidden": text.hidden_size,
        "text_intermediate": text.intermediate_size,
        "text_layers": text.num_hidden_layers,
    }


def _text_config(folder: Path) -> dict:
    raw = json.loads((folder / "config.json").read_text())
    return raw.get("text_config") or raw


def footprint(root: Path, dtype: torch.dtype, quantize: str | None) -> Footprint:
    """The Footprint of the pipeline folder `root` (reads configs and safetensors headers only)."""
    element = dtype.itemsize
    te_total, te_one = _tensor_sizes(root / "text_encoder", element)
    vae_total, _ = _tensor_sizes(root / "vae", element)
    text = _text_config(root / "text_encoder")
    hidden = int(text.get("hidden_size", 3584))
    return Footprint(
        **_dit_sizes(root / "transformer", dtype, quantize),
        text_encoder=te_total,
        text_encoder_one=te_one,
        text_hidden=hidden,
        text_intermediate=int(text.get("intermediate_size", 6 * hidden)),
        text_layers=int(text.get("num_hidden_layers", 28)),
        vae=vae_total,
        element=element,
    )


@dataclass(frozen=True)
class Activations:
    dit: int  # one denoising step, plus the modulation table kept through the call
    text: int  # one text-encoder call (every layer's hidden states are kept: output_hidden_states)
    vae: int  # the whole decode
    vae_tiled: int  # the decode in tiles
    pixels: int  # all images' pixels
    encode: int  # the VAE encode of the largest reference image (edits), bounded like a decode of its pixels


def activations(fp: Footprint, wl: Workload) -> Activations:
    rows = wl.images * (2 if wl.cfg else 1)
    tokens = (wl.height // 16) * (wl.width // 16) + wl.reference_tokens + wl.text_tokens
    table = 2 * fp.num_blocks * wl.steps * 6 * fp.dim * fp.element
    dit = rows * tokens * fp.dim * fp.element * DIT_ACTIVATION_FACTOR + table
    text_len = wl.text_tokens + TEMPLATE_TOKENS
    text = rows * text_len * fp.element * (fp.text_hidden * (fp.text_layers + 5) + 3 * fp.text_intermediate)
    pixels = wl.images * wl.height * wl.width
    vae = pixels * VAE_ELEMENTS_PER_PIXEL * fp.element
    vae_tiled = VAE_TILE_PIXELS * VAE_ELEMENTS_PER_PIXEL * fp.element + 2 * 3 * pixels * fp.element
    encode = wl.reference_pixels * VAE_ELEMENTS_PER_PIXEL * fp.element
    return Activations(dit, text, vae, vae_tiled, pixels, encode)


@dataclass(frozen=True)
class MemoryPlan:
    """A placement of the pipeline's parts (see the module docstring); `need`: estimated peak bytes."""

    name: str
    device: str
    budget: int | None  # bytes available on the device (None: no limit known)
    need: int
    num_blocks: int
    streamed: tuple[int, ...] = ()
    slots: int = 0
    offload_text: bool = False
    offload_modulation: bool = False
    modulation_paths: tuple[str, ...] = ()
    stage_on_host: bool = False
    vae_tiled_above: int | None = None  # decode in tiles above this many pixels (None: never)

    @property
    def resident(self) -> int:
        return self.num_blocks - len(self.streamed)

    def describe(self) -> str:
        parts = {
            "full": "every part on the device",
            "offload-text": "the DiT on the device, the text encoder in host memory (on the device while it encodes)",
            "offload-blocks": (
                f"{self.resident} of {self.num_blocks} DiT blocks on the device"
                + (f", {len(self.streamed)} streamed from pinned host memory through {self.slots} slots" if self.streamed else "")
                + ", modulation and text encoder in host memory"
            ),
        }[self.name]  # fmt: skip
        fits = "" if self.budget is None else f" of {self.budget / GIB:.1f} GiB"
        tiles = "" if self.vae_tiled_above is None else f"; VAE in tiles above {self.vae_tiled_above / 1e6:.1f} MP"
        return f"{self.name}: {parts}; needs ~{self.need / GIB:.1f} GiB{fits} on {self.device}{tiles}"

    def place(self, model, device: torch.device, quantize=None):
        """Called by fastdit.load with the DiT read into host memory (`stage_on_host`)."""
        return place_dit(
            model,
            device,
            streamed=self.streamed,
            slots=self.slots,
            host_modules=self.modulation_paths if self.offload_modulation else (),
            quantize=quantize,
        )


def spread(num_blocks: int, count: int) -> tuple[int, ...]:
    """`count` block indices spread evenly over `num_blocks`, the first ones late enough that the blocks before
    them cover the first copies."""
    return tuple((j + 1) * num_blocks // count - 1 for j in range(count))


def _margin(budget: int | None, need: int) -> int:
    return MARGIN_BYTES + int(MARGIN_SHARE * (budget if budget is not None else need))


def plan_for(name: str, fp: Footprint, wl: Workload, budget: int | None, device: str, slots: int = 2) -> MemoryPlan:
    """The plan `name` for this footprint and workload (it may not fit: compare `need` with `budget`)."""
    act = activations(fp, wl)
    dit_act = max(act.dit, act.encode)  # the references are encoded with the DiT resident, before the loop
    if name == "full":
        weights = fp.dit + fp.text_encoder + fp.vae
        peak = max(dit_act, act.text)
    elif name == "offload-text":
        weights = fp.dit + fp.vae
        peak = max(dit_act, act.text + fp.text_encoder_one)
    else:
        weights = fp.dit_other + fp.vae
        peak = max(dit_act, act.text + fp.text_encoder_one, fp.modulation_one + dit_act)
    base = weights + peak
    room = None if budget is None else budget - _margin(budget, base)
    streamed: tuple[int, ...] = ()
    used_slots = 0
    if name == "offload-blocks":
        all_in = fp.num_blocks * fp.block
        if room is None or base + all_in <= room:
            resident = fp.num_blocks
        else:
            resident = max(0, min(fp.num_blocks - 1, (room - base - slots * fp.block) // fp.block))
            used_slots = slots
            streamed = spread(fp.num_blocks, fp.num_blocks - resident)
        weights += (resident + used_slots) * fp.block
    # The VAE decodes after the DiT's activations are freed: whole if that fits, else in tiles.
    vae_room = None if room is None else room - weights
    vae_above = None if vae_room is None else max(0, vae_room // (VAE_ELEMENTS_PER_PIXEL * fp.element))
    vae_peak = act.vae if vae_above is None or act.pixels <= vae_above else act.vae_tiled
    need = weights + max(peak, vae_peak)
    need += _margin(budget, need)
    stage = name == "offload-blocks" or (
        fp.quantized_from_float and budget is not None and fp.dit_float + _margin(budget, fp.dit_float) > budget
    )
    return MemoryPlan(
        name=name,
        device=device,
        budget=budget,
        need=need,
        num_blocks=fp.num_blocks,
        streamed=streamed,
        slots=used_slots,
        offload_text=name != "full",
        offload_modulation=name == "offload-blocks",
        stage_on_host=stage,
        modulation_paths=fp.modulation_paths,
        vae_tiled_above=vae_above,
    )


def fits(plan: MemoryPlan) -> bool:
    return plan.budget is None or plan.need <= plan.budget


def choose(
    name: str, fp: Footprint, wl: Workload, budget: int | None, device: str, order: tuple[str, ...] = ORDER
) -> MemoryPlan:
    """The plan `name` (or, for "auto", the first of `order` that fits); PlanError if it cannot fit. `order`: the
    plans the pipeline runs, from the most resident to the least."""
    if name not in PLANS:
        raise PlanError(f"memory plan must be one of {', '.join(PLANS)}, got {name!r}")
    if name != "auto" and name not in order:
        raise PlanError(f"memory plan {name!r} is not one this pipeline runs; it runs {', '.join(order)}")
    plans = {n: plan_for(n, fp, wl, budget, device) for n in order}
    fitting = [n for n in order if fits(plans[n])]
    if name != "auto" and fits(plans[name]):
        return plans[name]
    size = f"at {wl.height}x{wl.width}, {wl.images} image(s)"
    free = f"{budget / GIB:.1f} GiB are free on {device}" if budget is not None else ""
    if not fitting:
        last = order[-1]
        what = " (every DiT block streamed)" if last == "offload-blocks" else ""
        raise PlanError(
            f"no memory plan fits: even {last}{what} needs ~{plans[last].need / GIB:.1f} GiB "
            f"{size} and {free}; quantize the DiT (int4: 0.53 bytes per weight) or make smaller images"
        )
    if name == "auto":
        return plans[fitting[0]]
    raise PlanError(
        f"memory plan {name!r} needs ~{plans[name].need / GIB:.1f} GiB {size}, but {free}; "
        f"{fitting[0]!r} fits (~{plans[fitting[0]].need / GIB:.1f} GiB)"
    )


def available_bytes(device: torch.device) -> int | None:
    """Bytes new allocations may take on `device`: the free memory, within a per-process cap if one is set
    (torch.cuda.set_per_process_memory_fraction); None off CUDA."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    reserved, allocated = torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 1.0)(device)
    return int(min(free + reserved - allocated, fraction * total - allocated))


def plan_memory(
    memory,
    root: Path,
    *,
    dtype: torch.dtype,
    device: torch.device,
    quantize: str | None = None,
    workload: Workload | None = None,
    budget: int | None = None,
    parallel=None,
    say=None,
    order: tuple[str, ...] = ORDER,
) -> MemoryPlan | None:
    """The plan for `memory` (a PLANS name, a MemoryPlan, or None: no plan) of the pipeline folder `root`.

    `budget` (bytes) overrides the device's available memory. "auto" off CUDA (no budget) is no plan. `say(line)`
    receives the one line saying what "auto" chose. `order`: the plans the pipeline runs (`choose`)."""
    if memory is None or isinstance(memory, MemoryPlan):
        return memory
    if memory not in PLANS:
        raise PlanError(f"memory plan must be one of {', '.join(PLANS)}, got {memory!r}")
    if parallel is not None and parallel.world_size > 1:
        if memory in ("auto", "full"):
            return None
        raise PlanError(f"memory plan {memory!r} runs on one device; with --tp / --sp / --cfg-parallel use 'full'")
    budget = budget if budget is not None else available_bytes(device)
    if memory == "auto" and budget is None:
        return None
    fp = footprint(root, dtype, quantize)
    plan = choose(memory, fp, workload or Workload(), budget, str(device), order)
    if memory == "auto" and say is not None:
        say(f"memory plan auto -> {plan.describe()}")
    return plan


def offload_blocks_plan(
    num_blocks: int,
    resident: int,
    *,
    slots: int = 2,
    device: str = "cpu",
    modulation_paths: tuple[str, ...] = (),
    offload_text: bool = True,
) -> MemoryPlan:
    """An offload-blocks plan with an explicit number of resident blocks (tests, benchmarks)."""
    streamed = spread(num_blocks, num_blocks - resident) if resident < num_blocks else ()
    return MemoryPlan(
        name="offload-blocks",
        device=device,
        budget=None,
        need=0,
        num_blocks=num_blocks,
        streamed=streamed,
        slots=slots if streamed else 0,
        offload_text=offload_text,
        offload_modulation=bool(modulation_paths),
        modulation_paths=modulation_paths,
        stage_on_host=True,
    )
