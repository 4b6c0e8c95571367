"""`fastdit bench --cache-schedule`: DiT seconds per image (all its denoising steps) with a step cache whose
decisions are fixed in advance, against diffusers + cache-dit with the same steps_computation_mask.

Random full-size weights make the adaptive decisions meaningless, so both sides run one fixed schedule
(fastdit.cache.config.parse_schedule; cache-dit's DBCache with steps_computation_policy="static"). One image =
`--steps` DiT calls on fixed random inputs with that step's timestep (the latents are not updated: the DiT's time
alone is measured). fastdit runs the CFG batch [cond; uncond] as one forward, through its pipeline base
(`DiTPipeline.cached_loop`: compiled, CUDA-graphed as the pipeline does); diffusers' model runs cond and uncond as
two calls per step, as its QwenImagePipeline does, on the very same weights (views of ours), with cache-dit's
hooks (`enable_separate_cfg=True`), regionally compiled with --compile. Without cache-dit installed the comparison
is skipped with a note. The outputs of every step are compared too (relative L2 of the cached runs).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from fastdit.bench.config import BenchConfig, log
from fastdit.bench.timing import measure, summarize
from fastdit.bench.weights import diffusers_twin, dit_inputs, random_dit
from fastdit.cache.config import StepCache, parse_schedule
from fastdit.errors import FastditError
from fastdit.models.layers import Rope, set_attention_backend
from fastdit.models.qwenimage import PRESETS, StepModulation
from fastdit.pipelines.base import DiTPipeline
from fastdit.quant.fp8 import quantize_model

CACHE_DIT_VERSION = "1.5.3"  # the cache-dit release this comparison is written against


def bench_cache_schedule(run: BenchConfig, device: torch.device, dtype: torch.dtype) -> dict:
    cfg = PRESETS[run.preset]
    if run.compile == "full":
        raise FastditError("--cache-schedule compiles block by block: use --compile (regional), not --compile full")
    if run.no_cfg or run.uncond_text_len is not None:
        raise FastditError("--cache-schedule times the CFG batch of one prompt: drop --no-cfg / --uncond-text-len")
    mask = parse_schedule(run.cache_schedule, run.steps)
    cache = replace(run.cache or StepCache(), schedule=mask)
    cache.check_fits(cfg.num_layers)
    batch = 2 * run.batch
    x, enc, t, shapes = dit_inputs(cfg, batch, run.height, run.width, run.text_len, dtype, device)
    model = random_dit(cfg, dtype, device, run.seed)
    # diffusers' twin shares the bf16 weights; fp8 replaces them, so the comparison runs in the bf16 bench.
    twin = diffusers_twin(model) if run.compare and not run.quantize else None
    if run.quantize:
        quantize_model(model)
    backend = set_attention_backend(model, run.attention)
    pipe = DiTPipeline(transformer=model, device=device, dtype=dtype)
    if run.compile:
        pipe.compile()
    if run.cuda_graph:
        pipe.enable_cuda_graph()
    rope = model.make_rope(shapes, run.text_len, device)
    sigmas = torch.linspace(1.0, 1.0 / run.steps, run.steps, device=device)

    def forward_with(loop):
        def forward(x, enc, cos, sin, mod_img, mod_txt, mod_final, mod_ref):
            modulation = StepModulation(mod_img, mod_txt, mod_final, mod_ref)
            return model(x, enc, None, t, rope=Rope(cos, sin), modulation=modulation, cache=loop)

        return forward

    key = ("bench-cache", tuple(x.shape), tuple(enc.shape))

    def image(cached: bool, keep: list | None = None) -> torch.Tensor:
        loop = pipe.cached_loop(cache, key, run.steps) if cached else None
        step = forward_with(loop) if cached else pipe.graphed(key, forward_with(None))
        with torch.no_grad():
            table = model.modulation_table(sigmas)  # built once per image, as the pipeline does: timed
            for i in range(run.steps):
                out = step(x, enc, *rope, *table[i])
                if keep is not None:
                    keep.append(out.float().clone())
        if loop is not None and loop.cached_steps != mask.count(False):
            raise RuntimeError(f"fastdit cached {loop.cached_steps} steps, the schedule says {mask.count(False)}")
        return out

    ours = "fastdit fp8" if run.quantize else "fastdit"
    ours += " compiled" if run.compile else " eager"
    ours += " + CUDA graph" if run.cuda_graph else ""
    results: dict = {
        "stage": "dit-cache-schedule",
        "shapes": {"batch": batch, "image_tokens": x.shape[1], "text_tokens": run.text_len, "height": run.height,
                   "width": run.width, "steps": run.steps},
        "schedule": "".join("1" if m else "0" for m in mask),
        "cached_steps": mask.count(False),
        "cache": cache.spec(),
        "attention_backend": backend,
        "quantize": run.quantize,
        "runs": {},
    }  # fmt: skip

    def timed(name: str, fn, cached_steps: int) -> None:
        log(f"[{name}] warming up")
        _, first, times, peak = measure(fn, device, run.warmup, run.iters)
        r = summarize(times) | {"first_call_s": first, "cached_steps": cached_steps}
        if peak is not None:
            r["peak_mem_gib"] = peak
        results["runs"][name] = r
        log(f"[{name}] {r['median_s']:.3f} s/image (min {r['min_s']:.3f}, max {r['max_s']:.3f})")

    timed(f"{ours}, no cache", lambda: image(False), 0)
    timed(f"{ours}, {cache.spec().split(',')[0]} cached", lambda: image(True), mask.count(False))
    if run.compare and run.quantize:
        log("note: the diffusers + cache-dit comparison runs in the bf16 bench (it shares the bf16 weights)")
    elif run.compare:
        _compare_cache_dit(run, cache, mask, twin, x, enc, sigmas, shapes, image, timed, results)
    return results


def _compare_cache_dit(run, cache, mask, twin, x, enc, sigmas, shapes, fastdit_image, timed, results) -> None:
    try:
        import cache_dit
        from cache_dit import DBCacheConfig
    except ImportError:
        note = f"cache-dit is not installed (pip install cache-dit=={CACHE_DIT_VERSION}): comparison skipped"
        log(f"note: {note}")
        results["note"] = note
        return
    config = DBCacheConfig(
        Fn_compute_blocks=cache.front_blocks,
        Bn_compute_blocks=cache.back_blocks,
        max_warmup_steps=run.steps,
        steps_computation_mask=[int(m) for m in mask],
        steps_computation_policy="static",
        num_inference_steps=run.steps,
        enable_separate_cfg=True,  # cond, then uncond: two transformer calls per step
    )
    cache_dit.enable_cache(twin, cache_config=config)
    if run.compile and run.compare == "diffusers":
        twin.compile_repeated_blocks(fullgraph=True)  # regional, as fastdit (cache-dit's hooks sit between blocks)
    rows = [slice(0, run.batch), slice(run.batch, 2 * run.batch)]  # [cond; uncond]

    def ref_image(keep: list | None = None) -> torch.Tensor:
        cache_dit.refresh_context(twin, cache_config=config)
        with torch.no_grad():
            for sigma in sigmas:
                t = sigma.expand(run.batch)
                outs = [
                    twin(
                        hidden_states=x[r],
                        encoder_hidden_states=enc[r],
                        timestep=t,
                        img_shapes=shapes[r],
                        return_dict=False,
                    )[0]
                    for r in rows
                ]
                if keep is not None:
                    keep.append(torch.cat(outs).float())
        return outs[-1]

    compiled = "compiled (regional)" if run.compile and run.compare == "diffusers" else "eager"
    timed(f"diffusers {compiled} + cache-dit {cache.spec().split(',')[0]}", ref_image, mask.count(False))
    # One more image each, every step's output kept: the same schedule must give the same outputs.
    ours, theirs = [], []
    fastdit_image(True, ours)
    ref_image(theirs)
    stats = cache_dit.summary(twin)
    stats = stats[0] if isinstance(stats, list) else stats
    results["cache_dit_cached_steps"] = len(stats.cached_steps)
    err = max(((a - b).norm() / b.norm()).item() for a, b in zip(ours, theirs, strict=True))
    results["max_rel_l2_vs_cache_dit"] = err
    log(f"largest relative L2 difference of a step's output, fastdit vs diffusers + cache-dit: {err:.3e}")


def print_cache_table(res: dict) -> None:
    runs = res["runs"]
    base = next((r for name, r in runs.items() if name.startswith("diffusers")), None)
    print(f"\nDiT seconds per image {json_shapes(res['shapes'])}, cache {res['cache']}")
    print(f"schedule ({res['cached_steps']} of {res['shapes']['steps']} steps cached): {res['schedule']}")
    width = max(40, *map(len, runs))
    print(f"{'run':{width}s} {'cached':>6s} {'s/image':>8s} {'min':>8s} {'max':>8s} {'vs base':>8s} {'peak GiB':>8s}")
    for name, r in runs.items():
        ratio = f"{base['median_s'] / r['median_s']:.2f}x" if base else "-"
        print(
            f"{name:{width}s} {r['cached_steps']:6d} {r['median_s']:8.3f} {r['min_s']:8.3f} {r['max_s']:8.3f} "
            f"{ratio:>8s} {r.get('peak_mem_gib', float('nan')):8.1f}"
        )
    if "max_rel_l2_vs_cache_dit" in res:
        print(
            f"cache-dit cached {res['cache_dit_cached_steps']} steps; largest relative L2 difference of a step's "
            f"output vs fastdit: {res['max_rel_l2_vs_cache_dit']:.3e}"
        )
    if base:
        print("vs base = diffusers + cache-dit median / this run's median")
    if "note" in res:
        print(f"note: {res['note']}")


def json_shapes(shapes: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in shapes.items())
