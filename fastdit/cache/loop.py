"""The step cache at run time: one call's decisions on the host, the reused residuals on the device.

A cached call runs each DiT step as three segments of the block loop (`QwenImageTransformer.run_segment`), with
L blocks, F = front_blocks and B = back_blocks:

    front   blocks [0, F)        every step. Its image-stream residual r (front output - input) is compared with
                                 r_ref, the one of the last computed step: change = sum |r - r_ref| / sum |r_ref|.
    middle  blocks [F, L - B)    computed steps only. Their residual (output - input, image and text streams, per
                                 row: the cond and uncond rows of a CFG batch keep their own) is stored; a cached
                                 step adds the stored residual (or its extrapolation) to the front output instead.
    back    blocks [L - B, L)    every step, then the final layer.

The decision is taken once per step for the whole batch (one forward stays one forward under CFG), on the host,
from one (2,) float32 statistic (sum |r - r_ref|, sum |r_ref| over this rank's image tokens) copied to the host.
Under tensor / sequence / CFG parallelism the statistic is all-reduced over every rank first, so every rank takes
the same decision and a cached step skips the middle blocks' collectives on all ranks alike. Decisions that need
no measurement (step 0, warm-up, caps, a fixed schedule, threshold 0 or inf) copy nothing.

Taylor order K > 0: the cached residual at step i is p(i), p the polynomial of degree <= K through the residuals of
the last K + 1 computed steps (fewer while fewer exist), evaluated as weights over those steps (the Lagrange form
of Newton's divided-difference polynomial; exact for residuals that are polynomials of degree <= K in the step
index). cache-dit's TaylorSeer uses Taylor terms with the latest step gap as the divisor: the same for K = 1.
The residuals sit in a ring of K + 1 slots; the host picks the slot written and the weights read, and passes
them as small tensors, so each segment is one fixed function of tensors: compiled without recompiles across
steps, and with CUDA graphs replayed as three graphs (front, computed rest, cached rest) chosen on the host.

Qwen-Image 2.1's single-stream DiT (its text and condition prefix held as per-layer K/V, computed once per image)
runs the same three segments over its one stream (`SingleStreamFunctions`, through `CachedLoop.run_single_stream`):
the residual measured, stored and reused is the noise tokens' only.

Device buffers live in a `Workspace` (per set of shapes; the pipeline keeps it, and its graphs, for later calls
of the same shapes); a call's decisions live in its `CachedLoop`, so no decision carries over between calls.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed._functional_collectives as funcol
from torch import Tensor

from fastdit.cache.config import StepCache
from fastdit.models.layers import Rope
from fastdit.models.qwenimage import Modulation, Residual, StepModulation
from fastdit.runtime.compile import backend
from fastdit.runtime.cudagraph import CudaGraphStep


def extrapolation_weights(nodes: Sequence[int], x: int) -> list[float]:
    """w with p(x) = sum_j w[j] * y[j] for the polynomial p of degree len(nodes) - 1 through (nodes[j], y[j])."""
    weights = []
    for j, xj in enumerate(nodes):
        w = 1.0
        for m, xm in enumerate(nodes):
            if m != j:
                w *= (x - xm) / (xj - xm)
        weights.append(w)
    return weights


# ---------------------------------------------------------------------------------------------------------
# The tensor work between segments (compiled with the model: one small graph each).


def _measure(img_in: Tensor, front: Residual, now: Tensor, ref: Tensor, valid: int, index: Tensor | None) -> Tensor:
    """Writes the front residual into `now`; (2,) float32: sum |now - ref|, sum |ref| over the first `valid` tokens.
    `index` (1, S_img, 1): the zero_cond_t reference tokens, whose pending update has the reference gate."""
    return _change(front.total(index) - img_in, now, ref, valid)


def _measure_single(x_in: Tensor, front: Tensor, now: Tensor, ref: Tensor, valid: int) -> Tensor:
    """`_measure` for a single-stream DiT, whose blocks hand on plain tensors."""
    return _change(front - x_in, now, ref, valid)


def _change(res: Tensor, now: Tensor, ref: Tensor, valid: int) -> Tensor:
    """res (B, S, dim) into `now`; (2,) float32: sum |res - ref|, sum |ref| over the first `valid` tokens."""
    now.copy_(res)
    res, ref = res[:, :valid], ref[:, :valid]
    return torch.stack([(res - ref).abs().sum(dtype=torch.float32), ref.abs().sum(dtype=torch.float32)])


def _store_single(front: Tensor, mid: Tensor, hist: Tensor, slot: Tensor, now: Tensor | None, ref: Tensor | None):
    """`_store` for a single-stream DiT."""
    hist.index_copy_(0, slot, (mid - front)[None])
    if ref is not None:
        ref.copy_(now)


def _store(
    front_img: Residual,
    front_txt: Residual,
    mid_img: Residual,
    mid_txt: Residual,
    hist_img: Tensor,
    hist_txt: Tensor | None,
    slot: Tensor,
    now: Tensor | None,
    ref: Tensor | None,
    index: Tensor | None,
) -> None:
    """The middle blocks' residuals into ring slot `slot` (1,); this step's front residual becomes the reference."""
    hist_img.index_copy_(0, slot, (mid_img.total(index) - front_img.total(index))[None])
    if hist_txt is not None:
        hist_txt.index_copy_(0, slot, (mid_txt.total() - front_txt.total())[None])
    if ref is not None:
        ref.copy_(now)


def _extrapolate(hist: Tensor, weights: Tensor) -> Tensor:
    """sum_j weights[j] * hist[j], accumulated in float32 (or wider): (K + 1, B, S, dim) -> (B, S, dim)."""
    dtype = torch.promote_types(hist.dtype, torch.float32)
    acc = weights[0] * hist[0].to(dtype)
    for j in range(1, hist.shape[0]):
        acc = acc + weights[j] * hist[j].to(dtype)
    return acc.to(hist.dtype)


def _reuse(
    front_img: Residual,
    front_txt: Residual,
    hist_img: Tensor,
    hist_txt: Tensor | None,
    weights: Tensor,
    one_img: Tensor,
    one_txt: Tensor,
    one_ref: Tensor | None,
    index: Tensor | None,
) -> tuple[Residual, Residual]:
    """The front output plus the (extrapolated) middle residual, handed on as a pending update with gate 1 (for the
    zero_cond_t reference tokens too), so the next block (or the final layer) adds it in its first kernel, as after
    any block."""
    img = Residual(front_img.total(index), one_img, _extrapolate(hist_img, weights), one_ref)
    if hist_txt is None:  # no back blocks: the text stream ends here
        return img, front_txt
    return img, Residual(front_txt.total(), one_txt, _extrapolate(hist_txt, weights))


@functools.cache
def _compiled_glue():
    """The three functions above compiled once for the process (full graph; one backend, so no recompiles)."""
    compile_fn = functools.partial(torch.compile, fullgraph=True, backend=backend())
    return compile_fn(_measure), compile_fn(_store), compile_fn(_reuse)


@functools.cache
def _compiled_single_glue():
    """The single-stream glue, compiled likewise; the reuse is `_extrapolate` plus an add."""
    compile_fn = functools.partial(torch.compile, fullgraph=True, backend=backend())
    return compile_fn(_measure_single), compile_fn(_store_single), compile_fn(_extrapolate)


# ---------------------------------------------------------------------------------------------------------
# Device state and the three step functions


class Workspace:
    """A cached loop's device buffers for one set of shapes, and its step functions (CUDA-graphed if asked).

    Buffers are allocated at the first step; the step functions read and write them in place, so a graph recorded
    in one call serves the next with the same shapes. `compiled`: compile the tensor work between segments too
    (the pipeline passes whether its blocks are compiled)."""

    def __init__(self, cache: StepCache, *, cuda_graph: bool = False, compiled: bool = False):
        self.cache, self.cuda_graph, self.compiled = cache, cuda_graph, compiled
        self.slots = cache.taylor_order + 1
        self.hist_img: Tensor | None = None  # (slots, B, S_img, dim) middle residuals of computed steps
        self.hist_txt: Tensor | None = None  # (slots, B, S_txt, dim); None without back blocks
        self.now: Tensor | None = None  # (B, S_img, dim) this step's front residual; None when nothing is measured
        self.ref: Tensor | None = None  # (B, S_img, dim) the last computed step's front residual
        self.one_img: Tensor | None = None  # gate 1, shaped and strided like a block's gate
        self.one_txt: Tensor | None = None
        self.one_ref: Tensor | None = None  # gate 1 like a block's reference gate (zero_cond_t); else None
        self.slot_ids: list[Tensor] = []
        self.functions: StepFunctions | None = None

    def allocate_single(self, x: Tensor) -> None:
        """The buffers of a single-stream DiT: the stream's stored residuals and statistics only."""
        if self.hist_img is not None:
            return
        self.hist_img = x.new_zeros(self.slots, *x.shape)
        if self.cache.measures:
            self.now, self.ref = torch.zeros_like(x), torch.zeros_like(x)
        self.slot_ids = [torch.tensor([k], device=x.device) for k in range(self.slots)]

    def allocate(self, img: Tensor, txt: Tensor, gate_rows: int, ref_table: Tensor | None) -> None:
        if self.hist_img is not None:
            return
        self.hist_img = img.new_zeros(self.slots, *img.shape)
        if self.cache.back_blocks:
            self.hist_txt = txt.new_zeros(self.slots, *txt.shape)
        if self.cache.measures:
            self.now, self.ref = torch.zeros_like(img), torch.zeros_like(img)
        # (1,) slot indices made once: the step that writes slot k passes slot_ids[k], no host-to-device copy.
        self.slot_ids = [torch.tensor([k], device=img.device) for k in range(self.slots)]
        self.one_img = Modulation.split(img.new_ones(gate_rows, 6 * img.shape[-1]))[1].gate
        self.one_txt = Modulation.split(txt.new_ones(gate_rows, 6 * txt.shape[-1]))[1].gate
        if ref_table is not None:
            self.one_ref = Modulation.split(torch.ones_like(ref_table[0]))[1].gate

    def reset(self) -> None:
        """Zero the stored residuals at a call's start: a weight of 0 on a slot from an earlier call stays 0."""
        self.hist_img.zero_()
        if self.hist_txt is not None:
            self.hist_txt.zero_()


class StepFunctions:
    """front(...) -> the front output streams (+ the statistic); computed(...) and cached(...) -> the velocity.
    The image stream is (x, gate, update) or, with zero_cond_t reference tokens, (x, gate, update, reference gate).

    Flat tensor arguments (None for an absent one) and tensor results, as CUDA graphs want them; the model, text
    lengths, this rank's valid image tokens and the reduce group are fixed for the workspace."""

    def __init__(self, model, ws: Workspace, txt_lens, valid_img_tokens: int | None, group):
        self.model, self.ws, self.txt_lens, self.group = model, ws, txt_lens, group
        cache = ws.cache
        n = len(model.blocks)
        self.front_end, self.back_start = cache.front_blocks, n - cache.back_blocks
        self.valid = ws.hist_img.shape[2] if valid_img_tokens is None else valid_img_tokens
        self._measure, self._store, self._reuse = _compiled_glue() if ws.compiled else (_measure, _store, _reuse)
        wrap: Callable = CudaGraphStep if ws.cuda_graph else (lambda f: f)
        self.front, self.computed, self.cached = wrap(self._front), wrap(self._computed), wrap(self._cached)

    def _front(self, img, txt, temb, cos, sin, key_mask, mod_img, mod_txt, mod_final, ref_table, index):
        mod = None if mod_img is None else StepModulation(mod_img, mod_txt, mod_final)
        rows = temb.shape[0] if mod is None else 1  # as QwenImageTransformer.run_blocks
        r_img, r_txt = Residual.start(img, rows, ref_table), Residual.start(txt, rows)
        refs = None if index is None else (ref_table, index)
        r_img, r_txt = self.model.run_segment(
            0, self.front_end, r_img, r_txt, temb, Rope(cos, sin), key_mask, self.txt_lens, mod, refs
        )
        streams = (*_img_stream(r_img), *r_txt[:3])
        if self.ws.now is None:
            return streams
        stats = self._measure(img, r_img, self.ws.now, self.ws.ref, self.valid, index)
        if self.group is not None:
            stats = funcol.wait_tensor(funcol.all_reduce(stats, "sum", self.group))
        return (*streams, stats)

    def _finish(self, r_img, r_txt, temb, rope, key_mask, mod, ref_table, index):
        refs = None if index is None else (ref_table, index)
        r_img, r_txt = self.model.run_segment(
            self.back_start, len(self.model.blocks), r_img, r_txt, temb, rope, key_mask, self.txt_lens, mod, refs
        )
        return self.model.final(r_img, temb, None if mod is None else mod.final, index)

    def _computed(self, *args):
        # args: the image stream (3 or 4 tensors), the text stream (3), then temb, cos, sin, key_mask, the three
        # modulation tensors, the reference table, the token index and the ring slot.
        f_img, f_txt, (temb, cos, sin, key_mask, mod_img, mod_txt, mod_final, ref_table, index, slot) = _split(args)
        mod = None if mod_img is None else StepModulation(mod_img, mod_txt, mod_final)
        rope, ws = Rope(cos, sin), self.ws
        refs = None if index is None else (ref_table, index)
        m_img, m_txt = self.model.run_segment(
            self.front_end, self.back_start, f_img, f_txt, temb, rope, key_mask, self.txt_lens, mod, refs
        )
        self._store(f_img, f_txt, m_img, m_txt, ws.hist_img, ws.hist_txt, slot, ws.now, ws.ref, index)
        return self._finish(m_img, m_txt, temb, rope, key_mask, mod, ref_table, index)

    def _cached(self, *args):
        # args: as `_computed`'s, with the extrapolation weights in place of the slot.
        f_img, f_txt, (temb, cos, sin, key_mask, mod_img, mod_txt, mod_final, ref_table, index, weights) = _split(args)
        mod = None if mod_img is None else StepModulation(mod_img, mod_txt, mod_final)
        ws = self.ws
        r_img, r_txt = self._reuse(
            f_img, f_txt, ws.hist_img, ws.hist_txt, weights, ws.one_img, ws.one_txt, ws.one_ref, index
        )
        return self._finish(r_img, r_txt, temb, Rope(cos, sin), key_mask, mod, ref_table, index)


# Arguments after the two streams: temb, cos, sin, key_mask, 3 modulation tensors, reference table, index, slot.
_TRAILING = 10


def _img_stream(r: Residual) -> tuple[Tensor, ...]:
    """The image stream as flat tensors: (x, gate, update), plus the reference gate with zero_cond_t."""
    return tuple(r) if r.ref_gate is not None else tuple(r[:3])


def _split(args: tuple) -> tuple[Residual, Residual, tuple]:
    """Flat step-function arguments -> (image stream, text stream, the rest); the image stream has 4 tensors with a
    reference gate, else 3."""
    n_img = len(args) - 3 - _TRAILING
    return Residual(*args[:n_img]), Residual(*args[n_img : n_img + 3]), args[n_img + 3 :]


class SingleStreamFunctions:
    """front / computed / cached for a single-stream DiT with a prefix K/V cache (Qwen-Image 2.1): its blocks map
    x (B, N, dim) to x, block i reading the prefix's K/V of layer i; `model.final(x, scale)` ends the step.

    Flat tensor arguments as `StepFunctions`': x, then the prefix K and V (L, B, P, H, D), cos, sin, the key mask
    (or None) and the modulation fields; the prefix lengths (host ints) are fixed for the workspace."""

    def __init__(self, model, ws: Workspace, lens, mod_type, valid_img_tokens: int | None, group):
        self.model, self.ws, self.lens, self.mod_type, self.group = model, ws, lens, mod_type, group
        cache, n = ws.cache, len(model.blocks)
        self.front_end, self.back_start = cache.front_blocks, n - cache.back_blocks
        self.valid = ws.hist_img.shape[2] if valid_img_tokens is None else valid_img_tokens
        glue = _compiled_single_glue() if ws.compiled else (_measure_single, _store_single, _extrapolate)
        self._measure, self._store, self._extrapolate = glue
        wrap: Callable = CudaGraphStep if ws.cuda_graph else (lambda f: f)
        self.front, self.computed, self.cached = wrap(self._front), wrap(self._computed), wrap(self._cached)

    def _blocks(self, start: int, end: int, x: Tensor, k, v, cos, sin, key_mask, mod) -> Tensor:
        rope = Rope(cos, sin)
        for i in range(start, end):
            x = self.model.blocks[i](x, mod, rope, k[i], v[i], self.lens, key_mask)
        return x

    def _front(self, x, k, v, cos, sin, key_mask, *mod):
        front = self._blocks(0, self.front_end, x, k, v, cos, sin, key_mask, self.mod_type(*mod))
        if self.ws.now is None:
            return (front,)
        stats = self._measure(x, front, self.ws.now, self.ws.ref, self.valid)
        if self.group is not None:
            stats = funcol.wait_tensor(funcol.all_reduce(stats, "sum", self.group))
        return front, stats

    def _finish(self, x, k, v, cos, sin, key_mask, mod) -> Tensor:
        x = self._blocks(self.back_start, len(self.model.blocks), x, k, v, cos, sin, key_mask, mod)
        return self.model.final(x, mod.final_scale)

    def _computed(self, front, k, v, cos, sin, key_mask, *rest):
        *mod, slot = rest
        mod, ws = self.mod_type(*mod), self.ws
        mid = self._blocks(self.front_end, self.back_start, front, k, v, cos, sin, key_mask, mod)
        self._store(front, mid, ws.hist_img, slot, ws.now, ws.ref)
        return self._finish(mid, k, v, cos, sin, key_mask, mod)

    def _cached(self, front, k, v, cos, sin, key_mask, *rest):
        *mod, weights = rest
        x = front + self._extrapolate(self.ws.hist_img, weights)
        return self._finish(x, k, v, cos, sin, key_mask, self.mod_type(*mod))


# ---------------------------------------------------------------------------------------------------------
# One call


class CachedLoop:
    """One call's step cache: pass it as `cache=` to the DiT (or its parallel wrapper) at every step of the call,
    one DiT call per step. Afterwards `cached` lists the steps whose middle blocks were skipped and `changes` the
    measured relative change per step (None where none was needed)."""

    def __init__(self, cache: StepCache, steps: int, workspace: Workspace | None = None):
        cache.check_steps(steps)
        self.cache, self.steps = cache, steps
        self.ws = Workspace(cache) if workspace is None else workspace
        self.step = 0
        self.cached: list[int] = []
        self.changes: list[float | None] = []
        self._computed: deque[tuple[int, int]] = deque(maxlen=self.ws.slots)  # (step, slot), oldest first
        self._n_computed = 0
        self._in_a_row = 0
        self._weights: Tensor | None = None  # (steps, slots) on the host

    @property
    def cached_steps(self) -> int:
        return len(self.cached)

    def shard(self, valid_img_tokens: int | None, group) -> ShardedLoop:
        """This loop as run on one rank of a parallel DiT: statistics over its `valid_img_tokens` image tokens (None:
        all), all-reduced over `group` (None: one rank)."""
        return ShardedLoop(self, valid_img_tokens, group)

    def run(
        self,
        model,
        img: Tensor,
        txt: Tensor,
        temb: Tensor | None,
        rope: Rope,
        key_mask: Tensor | None,
        txt_lens=None,
        modulation: StepModulation | None = None,
        valid_img_tokens: int | None = None,
        group=None,
        refs: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """One step: `QwenImageTransformer.run_blocks`' arguments and result, the middle blocks run or reused.
        `refs`: (the t = 0 table (L, 1, 6 * dim), the token index (1, S_img, 1)) with zero_cond_t reference tokens."""
        ws = self.ws
        ref_table, index = (None, None) if refs is None else refs
        ws.allocate(img, txt, temb.shape[0] if modulation is None else 1, ref_table)
        if ws.functions is None:
            ws.functions = StepFunctions(model, ws, txt_lens, valid_img_tokens, group)
        self._begin(img)
        mods = (None, None, None) if modulation is None else tuple(modulation)[:3]  # the t = 0 table: ref_table
        shared = (temb, *rope, key_mask, *mods, ref_table, index)
        # front: (img x, gate, update[, ref gate], txt x, gate, update[, statistic])
        return self._advance(ws.functions, (img, txt), shared, 7 if index is not None else 6, img)

    def run_single_stream(
        self, model, x: Tensor, prefix, rope: Rope, modulation, key_mask=None, valid_img_tokens=None, group=None
    ) -> Tensor:
        """One step of a single-stream DiT with a prefix K/V cache (Qwen-Image 2.1; see `SingleStreamFunctions`):
        x (B, N, dim) after the input projection, the `PrefixCache`, RoPE, the step's AdaLN -> the velocity."""
        ws = self.ws
        ws.allocate_single(x)
        if ws.functions is None:
            ws.functions = SingleStreamFunctions(model, ws, prefix.lens, type(modulation), valid_img_tokens, group)
        self._begin(x)
        shared = (prefix.k, prefix.v, *rope, key_mask, *modulation)
        return self._advance(ws.functions, (x,), shared, 1, x)

    def _begin(self, like: Tensor) -> None:
        """Checks the step count; at step 0 clears the stored residuals and makes the host buffer of weights."""
        if self.step >= self.steps:
            raise RuntimeError(f"a CachedLoop for {self.steps} steps was run a {self.step + 1}th time")
        if self.step == 0:
            self.ws.reset()
            # Each step's extrapolation weights go to the device from their own row of one pinned buffer: an
            # asynchronous copy, so a step whose decision needs no measurement does not wait for the GPU.
            self._weights = torch.zeros(self.steps, self.ws.slots, pin_memory=like.is_cuda)

    def _advance(self, fn, inputs: tuple, shared: tuple, n_streams: int, like: Tensor) -> Tensor:
        """Step `self.step`: the front segment on `inputs`, the decision, then the computed or the cached rest, each
        given the front's `n_streams` output tensors and `shared`."""
        i, ws = self.step, self.ws
        front = fn.front(*inputs, *shared)
        streams, stats = front[:n_streams], front[n_streams] if len(front) > n_streams else None
        if self._decide(i, stats):
            slot = self._n_computed % ws.slots
            out = fn.computed(*streams, *shared, ws.slot_ids[slot])
            self._computed.append((i, slot))
            self._n_computed += 1
            self._in_a_row = 0
        else:
            weights = self._weights[i]
            nodes = [step for step, _ in self._computed]
            for (_, slot), w in zip(self._computed, extrapolation_weights(nodes, i), strict=True):
                weights[slot] = w
            out = fn.cached(*streams, *shared, weights.to(like.device, non_blocking=True, copy=True))
            self.cached.append(i)
            self._in_a_row += 1
        self.step += 1
        return out

    def _decide(self, i: int, stats: Tensor | None) -> bool:
        """Whether step i computes its middle blocks; reads `stats` (the one device-to-host copy) only if needed."""
        c = self.cache
        self.changes.append(None)
        if not self._computed:
            return True
        if c.schedule is not None:
            return c.schedule[i]
        if i < c.warmup_steps or c.threshold <= 0:
            return True
        if 0 <= c.max_cached_steps <= len(self.cached) or 0 <= c.max_consecutive_cached <= self._in_a_row:
            return True
        if not c.measures:  # threshold inf: cache whenever allowed
            return False
        diff, ref = stats.tolist()
        change = diff / ref if ref > 0 else (0.0 if diff == 0 else float("inf"))
        self.changes[-1] = change
        return not change < c.threshold


@dataclass(frozen=True)
class ShardedLoop:
    """A `CachedLoop` seen from one rank of a parallel DiT (see `CachedLoop.shard`)."""

    loop: CachedLoop
    valid_img_tokens: int | None
    group: object

    def run(self, model, img, txt, temb, rope, key_mask, txt_lens=None, modulation=None, refs=None) -> Tensor:
        return self.loop.run(
            model, img, txt, temb, rope, key_mask, txt_lens, modulation, self.valid_img_tokens, self.group, refs
        )

    def run_single_stream(self, model, x, prefix, rope, modulation, key_mask=None) -> Tensor:
        return self.loop.run_single_stream(
            model, x, prefix, rope, modulation, key_mask, self.valid_img_tokens, self.group
        )
