"""Weights that live in host memory and come to the device when they are used.

Two mechanisms, both applied to a finished model from outside (nothing in the model files knows of them):

`BlockStreamer`: DiT blocks kept in pinned host memory and streamed to the device ahead of use. All blocks of a
DiT have the same parameters, so a block is one flat byte buffer of a fixed layout (`Layout`): on the host one
pinned buffer per streamed block, on the device `slots` buffers that streamed blocks take turns in. A block's
call is wrapped (its class is swapped for a subclass whose `__call__` brackets the original, as FSDP2's
`fully_shard` does): before it runs, the compute stream waits for its copy and the block's parameters are
pointed at the slot's views; after it, they point back at the host buffer, the slot is marked free at that
point of the compute stream, and the next streamed blocks are copied into free slots on a side stream, so the
copies overlap the blocks computing in between (streamed blocks are spread evenly among resident ones). Each
forward starts anew: the first block's call forks the copy stream from the compute stream and the final
layer's call joins it back, so one forward is self-contained and a CUDA graph can record it (the host-to-device
copies become graph nodes reading the same pinned buffers at each replay). The block's own code runs unchanged:
compiled blocks (fastdit.runtime.compile) run the same graph on a slot's weights as on a resident block's, since
the parameters keep their shapes, dtypes and strides. A block skipped by a step cache is simply not copied; one
that was not prefetched is copied when it is called.

`OnDemand`: modules whose weights come to the device for each call of the module and go again after it (the
text encoder, used once per prompt; the DiT's modulation projections, used once per image to build the
modulation table). The host copy stays; leaving the device frees the device copy, it copies nothing back.

Copies go through a `Copier`: on CUDA a side stream with events; on any other device plain copies, so the CPU
tests run this module's logic with real copies between separate buffers.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from fastdit.errors import ConfigError

ALIGN = 256  # bytes: every tensor in a flat buffer starts aligned for any kernel's vector loads


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def can_pin(device: torch.device) -> bool:
    """Pinned host memory is what CUDA copies asynchronously; elsewhere host memory is plain."""
    return device.type == "cuda" and torch.cuda.is_available()


def host_buffer(nbytes: int, pin: bool) -> Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)


class Copier:
    """Host-to-device copies on a side stream (CUDA), or done at once (other devices)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def fork(self) -> None:
        """The copy stream waits for all work queued so far on the compute stream."""
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def join(self) -> None:
        """The compute stream waits for every copy queued so far."""
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def marker(self):
        """An event at this point of the compute stream (None off CUDA)."""
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def copy(self, dst: Tensor, src: Tensor, after=None):
        """dst <- src once `after` (a `marker`) has passed; returns an event marking the copy's end."""
        if self.stream is None:
            dst.copy_(src)
            return None
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return done

    def wait(self, event) -> None:
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)


class Layout:
    """Where each parameter of a block sits in the block's flat buffer: (module path, name, shape, dtype, offset)."""

    def __init__(self, block: nn.Module, skip: tuple[str, ...]):
        self.entries: list[tuple[str, str, torch.Size, torch.dtype, int]] = []
        offset = 0
        for path, module in block.named_modules():
            if any(path == s or path.startswith(s + ".") for s in skip):
                continue
            for name, p in module.named_parameters(recurse=False):
                self.entries.append((path, name, p.shape, p.dtype, offset))
                offset += _align(p.numel() * p.element_size())
        self.nbytes = offset

    def signature(self) -> list[tuple]:
        return [(path, name, tuple(shape), dtype) for path, name, shape, dtype, _ in self.entries]

    def views(self, flat: Tensor) -> list[Tensor]:
        out = []
        for _, _, shape, dtype, offset in self.entries:
            n = shape.numel() * dtype.itemsize
            out.append(flat[offset : offset + n].view(dtype).view(shape))
        return out

    def targets(self, block: nn.Module) -> list[tuple[nn.Module, str]]:
        return [(block.get_submodule(path), name) for path, name, *_ in self.entries]


class _Streamed:
    """Mixed into a streamed model's blocks (and its final layer) in front of their own class."""

    def __call__(self, *args, **kwargs):
        streamer, index = self.__dict__["_fastdit_stream"]
        streamer.enter(index)
        try:
            return super().__call__(*args, **kwargs)
        finally:
            streamer.exit(index)


_SUBCLASSES: dict[type, type] = {}


def streamed_modules(root: nn.Module) -> set[int]:
    """The ids of every module under `root` inside a block whose parameters a `BlockStreamer` re-points at each
    call (a resident block's are its own)."""
    out: set[int] = set()
    for module in root.modules():
        stream = module.__dict__.get("_fastdit_stream")
        if stream is not None and stream[1] in stream[0].rank:
            out.update(id(m) for m in module.modules())
    return out


def _wrap_calls(module: nn.Module, streamer: BlockStreamer, index: int | None) -> None:
    cls = type(module)
    if issubclass(cls, _Streamed):
        raise ConfigError(f"{cls.__name__} is streamed already")
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(f"Streamed{cls.__name__}", (_Streamed, cls), {})
    module.__class__ = _SUBCLASSES[cls]
    module.__dict__["_fastdit_stream"] = (streamer, index)


class BlockStreamer:
    """Stream `streamed` (indices into `blocks`) from host memory through `slots` device buffers; see the module
    docstring. `skip`: paths inside a block left out of the streamed buffer (the modulation, on demand instead).
    `final`: the module called after the last block (its call joins the copy stream)."""

    def __init__(
        self,
        blocks: nn.ModuleList,
        streamed: list[int],
        device: torch.device,
        *,
        final: nn.Module,
        slots: int = 2,
        skip: tuple[str, ...] = (),
    ):
        if not streamed or slots < 1:
            raise ConfigError("a block streamer needs at least one streamed block and one slot")
        self.device, self.order = device, list(streamed)
        self.rank = {index: r for r, index in enumerate(self.order)}
        self.layout = Layout(blocks[self.order[0]], skip)
        pin = can_pin(device)
        self.host_params: dict[int, list[nn.Parameter]] = {}
        self.host: dict[int, Tensor] = {}
        self.targets: dict[int, list[tuple[nn.Module, str]]] = {}
        for index in self.order:
            block = blocks[index]
            layout = Layout(block, skip)
            if layout.signature() != self.layout.signature():
                raise ConfigError(f"block {index} has other parameters than block {self.order[0]}: cannot stream it")
            flat = host_buffer(self.layout.nbytes, pin)
            targets = self.layout.targets(block)
            params = []
            for (module, name), view in zip(targets, self.layout.views(flat), strict=True):
                view.copy_(getattr(module, name).detach())
                param = nn.Parameter(view, requires_grad=False)
                module._parameters[name] = param
                params.append(param)
            self.host[index], self.host_params[index], self.targets[index] = flat, params, targets
        self.slots = [torch.empty(self.layout.nbytes, dtype=torch.uint8, device=device) for _ in range(slots)]
        self.slot_params = [[nn.Parameter(v, requires_grad=False) for v in self.layout.views(s)] for s in self.slots]
        self.copier = Copier(device)
        self.copies = 0  # host-to-device block copies issued (tests, benchmarks)
        self._reset()
        self.last: int | None = None
        for index, block in enumerate(blocks):
            _wrap_calls(block, self, index)
        _wrap_calls(final, self, None)

    @property
    def slot_bytes(self) -> int:
        return self.layout.nbytes * len(self.slots)

    def _reset(self) -> None:
        n = len(self.slots)
        self.in_slot: list[int | None] = [None] * n  # the rank each slot holds or is receiving
        self.copied: list = [None] * n  # event: the slot's copy is done
        self.freed: list = [None] * n  # event: the compute stream is done with the slot

    def _load(self, rank: int, slot: int) -> None:
        self.in_slot[slot] = rank
        self.copied[slot] = self.copier.copy(self.slots[slot], self.host[self.order[rank]], after=self.freed[slot])
        self.copies += 1

    def _prefetch(self, start: int) -> None:
        """Copy ranks start, start + 1, ... into free slots (as many as are free)."""
        for rank in range(start, min(start + len(self.slots), len(self.order))):
            if rank in self.in_slot:
                continue
            if None not in self.in_slot:
                return
            self._load(rank, self.in_slot.index(None))

    def _slot_for(self, rank: int) -> int:
        if rank in self.in_slot:
            return self.in_slot.index(rank)
        # Not prefetched (blocks before it were skipped): take a free slot, else the one holding the furthest rank.
        free = [s for s, r in enumerate(self.in_slot) if r is None or r < rank]
        slot = free[0] if free else max(range(len(self.slots)), key=lambda s: self.in_slot[s])
        self._load(rank, slot)
        return slot

    def _point(self, index: int, params: list[nn.Parameter]) -> None:
        for (module, name), param in zip(self.targets[index], params, strict=True):
            module._parameters[name] = param

    def enter(self, index: int | None) -> None:
        if index is None:
            return
        if self.last is None or index <= self.last:  # a new forward
            self.copier.fork()
            self._reset()
            self._prefetch(0)
        self.last = index
        rank = self.rank.get(index)
        if rank is None:
            return
        slot = self._slot_for(rank)
        self.copier.wait(self.copied[slot])
        self._point(index, self.slot_params[slot])

    def exit(self, index: int | None) -> None:
        if index is None:  # the final layer: every copy joins the compute stream
            self.copier.join()
            self.last = None
            return
        rank = self.rank.get(index)
        if rank is None:
            return
        slot = self.in_slot.index(rank)
        self._point(index, self.host_params[index])
        self.freed[slot] = self.copier.marker()
        self.in_slot[slot] = None
        self._prefetch(rank + 1)


def _host_parameter(p: Tensor, pin: bool) -> nn.Parameter:
    """`p` in (pinned, if `pin`) host memory: itself when it is there already."""
    if p.device.type == "cpu" and (p.is_pinned() or not pin):
        return p if isinstance(p, nn.Parameter) else nn.Parameter(p, requires_grad=False)
    data = torch.empty(p.shape, dtype=p.dtype, pin_memory=pin)
    data.copy_(p.detach())
    return nn.Parameter(data, requires_grad=False)


def pin_parameters_(module: nn.Module) -> None:
    """Put every parameter of `module` in pinned host memory, in place (CUDA copies from it run asynchronously)."""
    done: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                done.setdefault(id(p), _host_parameter(p, pin=True))
                sub._parameters[name] = done[id(p)]


class OnDemand:
    """Each module of `modules` that owns parameters keeps them in (pinned) host memory and gets a device copy
    for the length of each of its calls. Buffers (small: RoPE tables, ...) move to the device for good."""

    def __init__(self, modules: Iterable[nn.Module], device: torch.device):
        self.device = device
        pin = can_pin(device)
        host: dict[int, nn.Parameter] = {}  # one host copy per parameter, even where modules share one (tied)
        self.owned: dict[nn.Module, list[tuple[str, nn.Parameter]]] = {}
        self.loaded: set[nn.Module] = set()
        self.handles = []
        for module in modules:
            for name, buf in list(module.named_buffers(recurse=False)):
                module._buffers[name] = buf.to(device)
            entries = []
            for name, p in module.named_parameters(recurse=False):
                if id(p) not in host:
                    host[id(p)] = _host_parameter(p, pin)
                entries.append((name, host[id(p)]))
                module._parameters[name] = host[id(p)]
            if entries and module not in self.owned:
                self.owned[module] = entries
                self.handles.append(module.register_forward_pre_hook(self._pre_hook))
                self.handles.append(module.register_forward_hook(self._post_hook, always_call=True))
        self.host_bytes = sum(p.numel() * p.element_size() for p in host.values())

    def load(self, module: nn.Module) -> None:
        with torch.inference_mode(False):
            for name, param in self.owned[module]:
                data = torch.empty(param.shape, dtype=param.dtype, device=self.device)
                data.copy_(param.detach(), non_blocking=True)
                module._parameters[name] = nn.Parameter(data, requires_grad=False)
        self.loaded.add(module)

    def release(self, module: nn.Module) -> None:
        for name, param in self.owned[module]:
            module._parameters[name] = param
        self.loaded.discard(module)

    def release_all(self) -> None:
        for module in list(self.loaded):
            self.release(module)

    def detach(self) -> None:
        """Stop loading on demand: the modules keep their host weights and lose the hooks."""
        self.release_all()
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _pre_hook(self, module, args):
        if module not in self.loaded:
            self.load(module)

    def _post_hook(self, module, args, output):
        self.release(module)
