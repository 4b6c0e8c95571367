"""`fastdit bench --stage memory`: whole images under a memory cap, per memory plan and quantization, against
diffusers' offloading on the same weights.

One run builds every component at full size with random weights in host memory (fastdit.bench.offload_parts),
measures the host-to-device bandwidth, then for each `--memory-cap-gb` (0: no cap) caps the device with
`torch.cuda.set_per_process_memory_fraction` and times, for each recipe (`--recipes`) and plan (`--memory`):
the plan is chosen by fastdit.memory as `generate --memory` would (one that cannot fit is reported, not run),
the DiT is placed (quantized block by block on the device), one warm-up call (compiles, tunes, records the CUDA
graph) and one timed call of `--steps` steps. Each step's end is timestamped after a device synchronisation, so
the record splits the image into text encoding, the modulation table (its weights' transfer included under
offload-blocks), the median step, and the VAE decode; `image_50_s` extrapolates those to 50 steps (text + table
+ 50 x step + VAE: the steps are alike, the rest happens once). The peak is torch.cuda.max_memory_allocated over
the timed call. diffusers' modes (`--reference`) run after, on the same components, capped the same way, for
`--reference-steps` steps and extrapolated the same way (what is not a step counts once).
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import replace

import torch

from fastdit.bench.config import log
from fastdit.bench.offload_parts import (
    Parts,
    diffusers_reference,
    fresh_dit,
    full_size_parts,
    h2d_bandwidth,
    tiny_parts,
)
from fastdit.errors import FastditError
from fastdit.load import FAMILIES
from fastdit.memory.offload import OnDemand, pin_parameters_
from fastdit.memory.place import Placement, place_dit
from fastdit.memory.plan import (
    GIB,
    ORDER,
    Footprint,
    PlanError,
    Workload,
    choose,
    dit_sizes,
    spread,
    text_encoder_sizes,
)
from fastdit.pipelines.qwenimage import QwenImagePipeline
from fastdit.quant.int4 import set_int4_kernel
from fastdit.quant.recipes import Recipe, block_quantizer, parse_quantize

PROMPT = "a red fox in the snow at dawn, photographed with a telephoto lens"
FAMILY = FAMILIES["QwenImageTransformer2DModel"]


def footprint_of(parts: Parts, recipe: Recipe | None, dtype: torch.dtype) -> Footprint:
    layers = recipe.layers(FAMILY.roles) if recipe is not None else {}
    return Footprint(
        **dit_sizes(FAMILY, parts.dit.cfg, dtype, layers, from_float=True),
        **text_encoder_sizes(parts.text_encoder, dtype),
        vae=sum(p.numel() * dtype.itemsize for p in parts.vae.parameters()),
        element=dtype.itemsize,
    )


def set_cap(device: torch.device, gib: float) -> int | None:
    """Cap the process's device memory at `gib` GiB (0: the whole device); returns the budget in bytes."""
    if device.type != "cuda":
        return None
    total = torch.cuda.get_device_properties(device).total_memory
    fraction = 1.0 if gib == 0 else min(1.0, gib * GIB / total)
    torch.cuda.set_per_process_memory_fraction(fraction, device)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    return int(min(free, fraction * total - torch.cuda.memory_allocated(device)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None


def split_times(t0: float, stamps: list[float], total: float, first_part: float, last_part: float) -> dict:
    """Per-step and once-per-image times from step-end timestamps (see the module docstring)."""
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    step = statistics.median(steps) if steps else stamps[0] - t0 - first_part
    table = max(0.0, stamps[0] - t0 - first_part - step)
    return {
        "step_s": step,
        "step_min_s": min(steps) if steps else step,
        "modulation_table_s": table,
        "image_s": total,
        "image_50_s": first_part + table + 50 * step + last_part,
    }


def time_fastdit(pipe: QwenImagePipeline, run, device: torch.device) -> dict:
    kw = dict(negative_prompt=" ", true_cfg_scale=4.0, height=run.height, width=run.width, seed=0)
    kw |= dict(num_images_per_prompt=run.batch, show_progress=False)
    pipe(PROMPT, num_inference_steps=run.warmup_steps, **kw)
    _sync(device)
    _peak_reset(device)
    stamps: list[float] = []

    def progress(i: int, total: int) -> None:
        _sync(device)
        stamps.append(time.perf_counter())

    t0 = time.perf_counter()
    images = pipe(PROMPT, num_inference_steps=run.steps, progress=progress, **kw)
    total = time.perf_counter() - t0
    t = images.timings
    out = {"text_encode_s": t["text_encode_s"], "vae_decode_s": t["vae_decode_s"], "steps": run.steps}
    out |= split_times(t0, stamps, total, t["text_encode_s"], t["vae_decode_s"])
    out["peak_gib"] = _peak(device)
    return out


def time_diffusers(pipe, run, device: torch.device) -> dict:
    stamps: list[float] = []

    def on_step(pipeline, i, t, tensors):
        _sync(device)
        stamps.append(time.perf_counter())
        return {}

    _peak_reset(device)
    t0 = time.perf_counter()
    pipe(
        PROMPT,
        negative_prompt=" ",
        true_cfg_scale=4.0,
        height=run.height,
        width=run.width,
        num_inference_steps=run.reference_steps,
        num_images_per_prompt=run.batch,
        generator=torch.Generator("cpu").manual_seed(0),
        callback_on_step_end=on_step,
    )
    total = time.perf_counter() - t0
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    step = statistics.median(steps) if steps else stamps[0] - t0
    once = total - run.reference_steps * step  # text encoding, the first step's set-up, VAE: counted once
    return {
        "steps": run.reference_steps,
        "step_s": step,
        "image_s": total,
        "image_50_s": once + 50 * step,
        "peak_gib": _peak(device),
    }


def run_fastdit(parts: Parts, plan_name: str, recipe_name: str, budget, run, device, dtype) -> dict:
    recipe = parse_quantize(None if recipe_name == "bf16" else recipe_name)
    fp = footprint_of(parts, recipe, dtype)
    wl = Workload(height=run.height, width=run.width, images=run.batch)
    try:
        plan = choose(plan_name, fp, wl, budget, str(device))
    except PlanError as e:
        return {"skipped": str(e)}
    if plan.name == "offload-blocks" and run.resident_blocks is not None:
        resident = min(run.resident_blocks, fp.num_blocks)
        streamed = spread(fp.num_blocks, fp.num_blocks - resident) if resident < fp.num_blocks else ()
        plan = replace(plan, streamed=streamed, slots=2 if streamed else 0)
    streamed, slots = plan.streamed, plan.slots
    if recipe is not None:
        recipe.check_device(device)
    layers = recipe.layers(FAMILY.roles) if recipe is not None else {}
    dit = fresh_dit(parts.dit)
    text = None
    host_params = [(m, n, p) for m in parts.text_encoder.modules() for n, p in m._parameters.items() if p is not None]
    try:
        offload = place_dit(
            dit,
            device,
            streamed=streamed,
            slots=slots,
            host_modules=plan.modulation_paths if plan.offload_modulation else (),
            quantize=block_quantizer(layers, False) if layers else None,
        )
        if plan.offload_text:
            text = OnDemand(list(parts.text_encoder.modules()), device)
        else:  # device copies in new Parameters: the host ones (restored below) stay as they are
            for module, name, p in host_params:
                module._parameters[name] = torch.nn.Parameter(p.detach().to(device), requires_grad=False)
            parts.text_encoder.to(device)  # the buffers
        parts.vae.to(device)
        pipe = QwenImagePipeline(
            transformer=dit,
            text_encoder=parts.text_encoder,
            tokenizer=parts.tokenizer,
            vae=parts.vae,
            scheduler_config=parts.scheduler_config,
            device=device,
            dtype=dtype,
        )
        pipe.memory = Placement(plan, text)
        set_int4_kernel(dit, run.int4_kernel)
        if run.compile:
            pipe.compile()
        if run.cuda_graph:
            pipe.enable_cuda_graph()
        record = time_fastdit(pipe, run, device)
        record |= {
            "plan": plan.describe(),
            "resident_blocks": fp.num_blocks - len(streamed),
            "estimated_gib": plan.need / GIB,
        }
        if offload.streamer is not None:
            record["block_copies_per_step"] = len(streamed)
            record["streamed_gib_per_step"] = len(streamed) * offload.streamer.layout.nbytes / GIB
        return record
    except torch.OutOfMemoryError as e:
        return {"error": f"out of memory: {str(e).splitlines()[0][:160]}", "plan": plan.describe()}
    finally:
        if text is not None:
            text.detach()
        for module, name, p in host_params:  # the host (pinned) weights again, not a pageable copy back
            module._parameters[name] = p
        parts.text_encoder.to("cpu")
        parts.vae.to("cpu")
        del dit
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            if hasattr(torch._C, "_host_emptyCache"):
                torch._C._host_emptyCache()  # the pinned blocks of this run's host buffers


def bench_pipeline_memory(run, device: torch.device, dtype: torch.dtype) -> dict:
    if run.preset != "tiny" and device.type != "cuda":
        raise FastditError("--stage memory at full size needs a CUDA device (use --preset tiny on the CPU)")
    parts = tiny_parts(dtype) if run.preset == "tiny" else full_size_parts(device, dtype, run.seed)
    if device.type == "cuda":
        pin_parameters_(parts.text_encoder)  # once: every plan's runs copy from the same pinned weights
    plans = ORDER if run.memory == "all" else (run.memory,)
    results = {
        "stage": "memory",
        "shapes": {"height": run.height, "width": run.width, "images": run.batch, "cfg": True, "steps": run.steps},
        "bandwidth": h2d_bandwidth(device),
        "runs": {},
    }
    if results["bandwidth"]:
        log(f"[bandwidth] host-to-device {results['bandwidth']}")
    for gib in run.memory_cap_gb:
        budget = set_cap(device, gib)
        cap = f"{gib:g} GiB" if gib else "uncapped"
        for recipe in run.recipes:
            for plan in plans:
                name = f"fastdit {recipe} {plan} @ {cap}"
                log(f"[{name}] ...")
                results["runs"][name] = run_fastdit(parts, plan, recipe, budget, run, device, dtype)
                log(f"[{name}] {results['runs'][name]}")
        for mode in run.reference:
            name = f"diffusers bf16 {mode}-offload @ {cap}"
            log(f"[{name}] ...")
            results["runs"][name] = diffusers_reference(
                parts, mode, device, dtype, lambda p: time_diffusers(p, run, device)
            )
            log(f"[{name}] {results['runs'][name]}")
    set_cap(device, 0)
    return results


def print_pipeline_table(res: dict, baseline_s: float | None) -> None:
    bw = res.get("bandwidth") or {}
    print(f"\npipeline {res['shapes']}; host-to-device " + ", ".join(f"{k} {v:.1f}" for k, v in bw.items()))
    head = f"{'run':44s} {'peak GiB':>8s} {'text s':>7s} {'table s':>7s} {'s/step':>7s} {'vae s':>6s} {'image s':>8s}"
    print(head + f" {'@50 s':>7s} {'vs base':>7s}  plan")
    for name, r in res["runs"].items():
        if "step_s" not in r:
            print(f"{name:44s} {r.get('skipped') or r.get('error')}")
            continue
        ratio = f"{r['image_50_s'] / baseline_s:.2f}x" if baseline_s else "-"
        peak = "-" if r.get("peak_gib") is None else f"{r['peak_gib']:.1f}"
        print(
            f"{name:44s} {peak:>8s} {r.get('text_encode_s', float('nan')):7.2f} "
            f"{r.get('modulation_table_s', float('nan')):7.2f} {r['step_s']:7.3f} {r.get('vae_decode_s', float('nan')):6.2f} "
            f"{r['image_s']:8.2f} {r['image_50_s']:7.1f} {ratio:>7s}  {r.get('plan', '')}"
        )
    print("image s: the timed call of `steps` steps; @50 s: text + table + 50 x s/step + VAE (diffusers: what is not a "
          "step counted once); vs base: @50 s / --baseline-s")  # fmt: skip
