"""`fastdit bench --family qwen-image-2.1`: the Qwen-Image 2.1 DiT with random weights (no download).

Two things are timed, as the pipeline runs them: the prefix prefill (text + condition-image tokens through every
block, once per image; it keeps each layer's K/V) and one denoising step (the noise tokens alone, over the cached
prefix K/V), eager / compiled / replayed from a CUDA graph, in bf16 or with fp8 block linears. `--compare diffusers`
runs diffusers' QwenImage21Transformer2DModel on the same weights (views of ours, also with --quantize fp8: the bf16
weights stay alive for it): its first step ("extract": prefix + noise, storing the K/V) and its later steps
("cached"), on the same inputs, with the relative L2 error of its step against ours.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from fastdit.bench.config import BenchConfig, log
from fastdit.bench.family import QWEN21, model_config
from fastdit.bench.timing import cuda_graph, kernel_time_split, measure, summarize
from fastdit.bench.weights import fill_random_, twin_config, twin_of
from fastdit.errors import FastditError
from fastdit.load import FAMILIES
from fastdit.models.layers import set_attention_backend
from fastdit.models.qwenimage21 import QwenImage21Config, QwenImage21Transformer
from fastdit.models.qwenimage21_keys import checkpoint_keys
from fastdit.models.qwenimage21_layout import LATENTS_PER_SLOT, PrefixLayout, prefix_layout
from fastdit.parallel.qwenimage21 import ParallelQwenImage21, parallelize_qwenimage21
from fastdit.quant.fp8 import quantize_model
from fastdit.runtime.compile import backend as inductor_backend
from fastdit.runtime.compile import compile_blocks

BLOCK_LINEARS = FAMILIES["QwenImage21Transformer2DModel"].block_linears


def random_dit21(cfg: QwenImage21Config, dtype: torch.dtype, device: torch.device, seed: int = 0, state=None):
    """The 2.1 DiT on the device with scaled random weights (fastdit.bench.weights.fill_random_; the shared
    modulation 10x smaller), this rank's parallel layers when `state` has several ranks."""
    with torch.device("meta"):
        model = QwenImage21Transformer(cfg)
    if state is not None:
        parallelize_qwenimage21(model, state)
    model.to(dtype).to_empty(device=device)
    fill_random_(model, device, seed)
    with torch.no_grad():
        model.mod.weight.mul_(0.1)
    return model.eval().requires_grad_(False)


def diffusers_twin21(model: QwenImage21Transformer) -> nn.Module:
    """diffusers' QwenImage21Transformer2DModel sharing our weight storage (fused weights split into views)."""
    cfg = model.cfg
    config = twin_config(
        cfg, context_in_dim=cfg.context_dim, mlp_ratio=cfg.mlp_ratio, causal_condition=cfg.causal_condition
    )
    state = {}
    for name, p in model.named_parameters():
        keys = checkpoint_keys(name)
        state.update(zip(keys, p.chunk(len(keys)), strict=True))  # fused along dim 0 in equal parts
    return twin_of("QwenImage21Transformer2DModel", config, state)


def prefix_slots(text_len: int, cond_tokens: int) -> list[bool]:
    """A prompt's vision-slot mask as the 2.1 template lays it out: 2 text tokens, the condition images' slots
    (4 latent tokens each), the rest of the text."""
    return [False] * 2 + [True] * (cond_tokens // LATENTS_PER_SLOT) + [False] * (text_len - 2)


def step_flops(cfg: QwenImage21Config, batch: int, n: int, p: int) -> float:
    """FLOPs of one cached step: the block linears (QKV, out, SwiGLU) on N tokens and attention over N + P keys."""
    d = cfg.dim
    per_token = 2 * (4 * d * d + 3 * cfg.mlp_ratio * d * d)
    per_block = batch * n * per_token + 4 * batch * n * (n + p) * d
    return cfg.num_layers * per_block + 2 * 2 * batch * n * cfg.in_channels * d


def prefill_flops(cfg: QwenImage21Config, batch: int, layout: PrefixLayout) -> float:
    """FLOPs of the prefill: the block linears on P tokens and each segment's attention over the keys before it."""
    d = cfg.dim
    pairs = 0
    for start, end, grid in layout.segments:
        n = end - start
        pairs += n * start + (n * (n + 1) // 2 if grid is None else n * n)
    per_block = batch * len(layout.source) * 2 * (4 * d * d + 3 * cfg.mlp_ratio * d * d) + 4 * batch * pairs * d
    return cfg.num_layers * per_block


def bench_dit21(run: BenchConfig, device: torch.device, dtype: torch.dtype, state=None) -> dict:
    """`state`: this rank's fastdit.parallel.ParallelState when the step runs on several ranks (every rank calls
    this; rank 0's result is reported), else None."""
    cfg = model_config(QWEN21, run.preset)
    if run.height % 32 or run.width % 32:
        raise FastditError(f"--height/--width must be multiples of 32 for qwen-image-2.1, got {run.height}x{run.width}")
    if run.condition_images < 0 or run.text_len < 3:
        raise FastditError("--condition-images must be >= 0 and --text-len >= 3 for qwen-image-2.1")
    say = log if state is None or state.is_main else lambda msg: None
    batch = run.batch * (1 if run.no_cfg else 2)
    grid = (run.height // 16, run.width // 16)
    n = grid[0] * grid[1]
    cond_grids = [grid] * run.condition_images
    slots = prefix_slots(run.text_len, n * run.condition_images)
    layout = prefix_layout(slots, cond_grids)
    g = torch.Generator(device=device).manual_seed(run.seed)
    text = torch.randn(batch, len(slots), cfg.context_dim, device=device, generator=g).to(dtype)
    cond = torch.randn(batch, n * run.condition_images, cfg.in_channels, device=device, generator=g).to(dtype)
    cond = cond if run.condition_images else None
    noise = torch.randn(batch, n, cfg.in_channels, device=device, generator=g).to(dtype)
    t = torch.full((batch,), 0.7, device=device)
    mask = None
    if run.uncond_text_len is not None:  # a shorter negative prompt: the uncond rows' text is right-padded
        if run.no_cfg or not 3 <= run.uncond_text_len <= run.text_len:
            raise FastditError("--uncond-text-len needs CFG and a value in [3, --text-len]")
        mask = torch.ones(batch, len(slots), dtype=torch.bool, device=device)
        mask[batch // 2 :, len(slots) - (run.text_len - run.uncond_text_len) :] = False

    model = random_dit21(cfg, dtype, device, run.seed, state)
    ref = diffusers_twin21(model) if run.compare and state is None else None  # before fp8 swaps our linears
    if run.quantize:
        quantize_model(model, modules=BLOCK_LINEARS)
    backend = set_attention_backend(model, run.attention)
    wrapped = model if state is None else ParallelQwenImage21(model, state)
    prefix_rope, noise_rope = wrapped.make_rope(layout, grid, device)
    p = len(layout.source)
    flops = step_flops(cfg, batch, n, p)
    results: dict = {
        "stage": "dit",
        "family": QWEN21,
        "shapes": {
            "batch": batch,
            "image_tokens": n,
            "prefix_tokens": p,
            "text_tokens": run.text_len,
            "condition_images": run.condition_images,
            "height": run.height,
            "width": run.width,
            "cfg_batched": not run.no_cfg,
            "uncond_text_tokens": run.uncond_text_len,
        },
        "flops_per_step": flops,
        "ranks": None if state is None else {"tp": state.tp, "sp": state.sp, "cfg": state.cfg},
        "attention_backend": backend,
        "quantize": run.quantize,
        "modulation": run.modulation,
        "runs": {},
        "prefill": {},
        "weights_gib": weights_gib(cfg, 2 if dtype in (torch.bfloat16, torch.float16) else 4),
        "prefix_cache_gib": cache_gib(cfg, batch, p, 2 if dtype in (torch.bfloat16, torch.float16) else 4),
    }
    say(
        f"DiT weights {results['weights_gib']:.1f} GiB (unsharded), prefix K/V cache {results['prefix_cache_gib']:.2f} GiB"
    )

    def timed(table: dict, name: str, fn: Callable[[], object], compile_first: bool, work: float | None):
        say(f"[{name}] warming up" + (" (compiling)" if compile_first else ""))
        out, first, times, peak = measure(fn, device, run.warmup, run.iters)
        r = summarize(times, work)
        r["first_call_s"] = first
        if peak is not None:
            r["peak_mem_gib"] = peak
        if run.profile:
            r.update(kernel_time_split(fn, device))
        table[name] = r
        say(f"[{name}] {r['median_s']:.4f} s (min {r['min_s']:.4f}, max {r['max_s']:.4f}), first call {first:.1f} s")
        return out

    ours = "fastdit fp8" if run.quantize else "fastdit"
    with torch.no_grad():
        prefill = lambda: wrapped.prefill(text, mask, cond, layout, prefix_rope)  # noqa: E731
        cache = timed(results["prefill"], ours, prefill, False, prefill_flops(cfg, batch, layout))
        mod = wrapped.modulation(t[:1]) if run.modulation == "table" else None  # computed ahead, as the pipeline
        step_t = None if mod is not None else t
        ours_out = timed(
            results["runs"], f"{ours} eager", lambda: wrapped(noise, step_t, cache, noise_rope, mod), False, flops
        )
        step = wrapped
        if run.compile:
            if run.compile == "regional":
                compile_blocks(wrapped)
            else:
                step = torch.compile(wrapped, fullgraph=True, backend=inductor_backend())
            name = f"{ours} compiled ({run.compile})"
            ours_out = timed(results["runs"], name, lambda: step(noise, step_t, cache, noise_rope, mod), True, flops)
        if run.cuda_graph:  # the same step (compiled if --compile) captured once, replayed: no launch cost
            replay = cuda_graph(lambda: step(noise, step_t, cache, noise_rope, mod))
            suffix = f"compiled ({run.compile})" if run.compile else "eager"
            timed(results["runs"], f"{ours} {suffix} + CUDA graph", replay, False, flops)
        if ref is not None:
            _compare(ref, results, timed, run, text, mask, cond, noise, t, slots, cond_grids, grid, ours_out, flops)
    return results


def _compare(ref, results, timed, run, text, mask, cond, noise, t, slots, cond_grids, grid, ours_out, flops) -> None:
    """diffusers' model on the same inputs: its prefill step ("extract") and cached step, eager and compiled."""
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

    batch, n = noise.shape[:2]
    img_mask = torch.tensor(slots + [True] * (n // LATENTS_PER_SLOT), device=noise.device)[None].expand(batch, -1)
    shapes = [[(1, h, w) for h, w in [*cond_grids, grid]]] * batch
    latents = noise if cond is None else torch.cat([cond, noise], dim=1)
    kv = QwenImage21KVCache(len(ref.transformer_blocks))
    kw = dict(
        hidden_states=latents,
        encoder_hidden_states=text,
        encoder_hidden_states_mask=mask,
        timestep=t,
        img_shapes=shapes,
        img_mask=img_mask,
        kv_cache=kv,
        return_dict=False,
    )
    extract = dict(kw, kv_cache_mode="extract")
    cached = dict(kw, kv_cache_mode="cached")  # diffusers takes [condition; noise] latents at every step
    timed(results["prefill"], "diffusers (first step: prefix + noise)", lambda: ref(**extract)[0], False, None)
    ref_out = timed(results["runs"], "diffusers eager", lambda: ref(**cached)[0][:, -n:], False, flops)
    err = ((ours_out.float() - ref_out.float()).norm() / ref_out.float().norm()).item()
    results["rel_l2_vs_diffusers"] = err
    log(f"relative L2 error fastdit vs diffusers ({run.dtype}): {err:.3e}")
    if run.compile and run.compare == "diffusers":
        ref_c = torch.compile(ref)  # diffusers' model graph-breaks under fullgraph=True
        timed(results["runs"], "diffusers compiled", lambda: ref_c(**cached)[0][:, -n:], True, flops)


def cache_gib(cfg: QwenImage21Config, batch: int, prefix_tokens: int, bytes_per_value: int = 2) -> float:
    """Size of the prefix K/V cache: num_layers x (K, V) x B x P x dim values."""
    return cfg.num_layers * 2 * batch * prefix_tokens * cfg.dim * bytes_per_value / 2**30


def weights_gib(cfg: QwenImage21Config, bytes_per_value: int = 2) -> float:
    """Size of the DiT's weights."""
    with torch.device("meta"):
        model = QwenImage21Transformer(cfg)
    return sum(math.prod(p.shape) for p in model.parameters()) * bytes_per_value / 2**30
