"""Putting a loaded DiT where a memory plan says, and what a pipeline does differently at run time.

`place_dit(model, device, ...)` takes a DiT whose weights are in host memory (read there by fastdit.load, or random
in a benchmark) and moves it block by block: each block comes to the device (quantized there when a recipe asks:
the device never holds more than one float block), then stays (resident) or goes back to host memory to be
streamed (fastdit.memory.offload.BlockStreamer); the modulation projections may stay in host memory and come to
the device for each use (`OnDemand`), which is once per image.

`Placement` is what a pipeline holds at run time (`pipeline.memory`): `text_encoder()` brackets prompt encoding
(the text encoder's weights come to the device module by module during it, see `attach`) and `vae(vae, pixels)`
brackets decoding (in tiles above the plan's size). Without a plan both do nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from fastdit.memory.offload import BlockStreamer, OnDemand

HOST = torch.device("cpu")


@dataclass
class OffloadedDiT:
    """What `place_dit` set up: the block streamer (None: every block resident) and the on-demand modulation."""

    streamer: BlockStreamer | None
    modulation: OnDemand | None


def place_dit(
    model: nn.Module,
    device: torch.device,
    *,
    streamed: tuple[int, ...] = (),
    slots: int = 2,
    host_modules: tuple[str, ...] = (),
    quantize: Callable[[nn.Module], nn.Module] | None = None,
) -> OffloadedDiT:
    """Move `model` (weights in host memory) onto `device` block by block; see the module docstring.

    `streamed`: block indices kept in host memory and streamed through `slots` device buffers; `host_modules`:
    paths inside a block kept in host memory and loaded for each call; `quantize(block)`: swaps a block's layers
    for quantized ones (on the device)."""
    base = model.base
    for name, child in base.named_children():
        if name != "blocks":
            child.to(device)
    on_demand = []
    for index, block in enumerate(base.blocks):
        if quantize is not None or index not in streamed:
            block.to(device)
        if quantize is not None:
            quantize(block)
        for path in host_modules:
            module = block.get_submodule(path)
            module.to(HOST)
            on_demand.append(module)
        if index in streamed:
            block.to(HOST)
    modulation = OnDemand(on_demand, device) if on_demand else None
    streamer = None
    if streamed:
        streamer = BlockStreamer(
            base.blocks, list(streamed), device, final=base.final, slots=slots, skip=tuple(host_modules)
        )
    model.offload = OffloadedDiT(streamer, modulation)
    return model.offload


class Placement:
    """A pipeline's run-time side of a memory plan (`plan` None: nothing is offloaded)."""

    def __init__(self, plan=None, text_encoder: OnDemand | None = None):
        self.plan = plan
        self.text = text_encoder

    @contextmanager
    def text_encoder(self):
        """Around prompt encoding: the text encoder's modules come to the device as they run and go after; on
        the way out (an error included) nothing of it is left on the device."""
        try:
            yield
        finally:
            if self.text is not None:
                self.text.release_all()

    @contextmanager
    def vae(self, vae, pixels: int):
        """Around decoding `pixels` (all images' pixels): tiled when the plan says the whole decode won't fit."""
        limit = None if self.plan is None else self.plan.vae_tiled_above
        tile = limit is not None and pixels > limit and not getattr(vae, "use_tiling", False)
        if tile:
            vae.enable_tiling()
        try:
            yield
        finally:
            if tile:
                vae.disable_tiling()


def attach(plan, text_encoder: nn.Module, device: torch.device) -> Placement:
    """The run-time placement of `plan` for a pipeline whose text encoder was loaded into host memory when the
    plan offloads it."""
    if plan is None or not plan.offload_text:
        return Placement(plan)
    return Placement(plan, OnDemand(list(text_encoder.modules()), device))
