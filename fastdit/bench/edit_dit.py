"""`fastdit bench --task edit`: one denoising step of the Edit-2511 DiT (`zero_cond_t`) with reference images, with
random weights, against diffusers' QwenImageTransformer2DModel(zero_cond_t=True) on the same weights.

The step is what the edit pipeline runs: the CFG batch [cond; uncond] in one forward over the target's tokens and
`--refs` reference images at the target's size (4096 tokens each at 1024^2), the text stream with the image
tokens of the VL prompt (~330 tokens), the per-step modulation table plus the constant t = 0 table, the per-token
index. Compiled, the token counts are symbolic (fastdit.runtime.compile.dynamic_tokens, as the pipeline runs), and
the warm-up is measured twice: the first step, and the first step at a second reference size and text length
(what a new request with other images costs). diffusers' model is compiled by its own regional compile
(`compile_repeated_blocks`) and measured the same way.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch
from torch._dynamo.utils import counters

from fastdit.bench.config import BenchConfig, log
from fastdit.bench.timing import cuda_graph, dit_flops, measure, summarize, sync
from fastdit.bench.weights import diffusers_twin, random_dit
from fastdit.errors import FastditError
from fastdit.models.layers import set_attention_backend
from fastdit.models.qwenimage import PRESETS
from fastdit.quant.fp8 import quantize_model
from fastdit.runtime.compile import compile_blocks, dynamic_tokens


def edit_inputs(cfg, refs: int, height: int, width: int, ref_grid, text_len: int, uncond_len, dtype, device, seed=0):
    """One CFG step's inputs: latents over [target; refs], text (B=2), key mask / lengths, sigma, img_shapes."""
    if height % 16 or width % 16:
        raise FastditError(f"--height/--width must be multiples of 16, got {height}x{width}")
    layout = [(1, height // 16, width // 16)] + [(1, *ref_grid)] * refs
    n = sum(f * h * w for f, h, w in layout)
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(2, n, cfg.in_channels, device=device, generator=g).to(dtype)
    enc = torch.randn(2, text_len, cfg.joint_dim, device=device, generator=g).to(dtype)
    mask, lens = None, None
    if uncond_len is not None:
        lens = (text_len, uncond_len)
        mask = torch.arange(text_len, device=device)[None, :] < torch.tensor(lens, device=device)[:, None]
    t = torch.full((2,), 0.7, device=device)
    return x, enc, mask, lens, t, [layout] * 2


def bench_edit_dit(run: BenchConfig, device: torch.device, dtype: torch.dtype) -> dict:
    cfg = dataclasses.replace(PRESETS[run.preset], zero_cond_t=True)
    if run.uncond_text_len is not None and not 1 <= run.uncond_text_len <= run.text_len:
        raise FastditError("--uncond-text-len needs a value in [1, --text-len]")
    grid = (run.height // 16, run.width // 16)
    # The second shape a compiled model meets: references at 3/4 of the height, 1/16 fewer text tokens (never 1 or 0:
    # the sizes compilers specialize).
    grid2 = (max(2, grid[0] * 3 // 4), grid[1])
    text2 = max(2, run.text_len - max(1, run.text_len // 16))
    uncond2 = None if run.uncond_text_len is None else min(run.uncond_text_len, text2)
    args = (cfg, run.refs, run.height, run.width)
    x, enc, mask, lens, t, shapes = edit_inputs(*args, grid, run.text_len, run.uncond_text_len, dtype, device)
    x2, enc2, mask2, lens2, t2, shapes2 = edit_inputs(*args, grid2, text2, uncond2, dtype, device, seed=1)
    n_img = x.shape[1]
    flops = dit_flops(cfg, 2, n_img, run.text_len)
    model = random_dit(cfg, dtype, device, run.seed)
    if run.quantize:
        quantize_model(model)
    backend = set_attention_backend(model, run.attention)

    def plan(shapes, n_txt):
        """What the pipeline precomputes once per call: RoPE tables, the token index, this step's modulation."""
        mod = model.modulation_table(torch.full((1,), 0.7, device=device))[0] if run.modulation == "table" else None
        return model.make_rope(shapes, n_txt, device), model.modulation_index(shapes, device), mod

    results: dict = {
        "stage": "dit",
        "task": "edit",
        "shapes": {
            "batch": 2,
            "image_tokens": n_img,
            "target_tokens": grid[0] * grid[1],
            "reference_images": run.refs,
            "tokens_per_reference": grid[0] * grid[1],
            "text_tokens": run.text_len,
            "uncond_text_tokens": run.uncond_text_len,
            "second_shape": {"image_tokens": x2.shape[1], "text_tokens": text2},
            "zero_cond_t": True,
        },
        "flops_per_step": flops,
        "attention_backend": backend,
        "quantize": run.quantize,
        "modulation": run.modulation,
        "runs": {},
        "warmup": {},
    }
    runs, warmup = results["runs"], results["warmup"]

    def timed(name: str, fn: Callable[[], torch.Tensor], compile_first: bool = False):
        log(f"[{name}] warming up" + (" (compiling)" if compile_first else ""))
        out, first, times, peak = measure(fn, device, run.warmup, run.iters)
        r = summarize(times, flops)
        r["first_call_s"] = first
        if peak is not None:
            r["peak_mem_gib"] = peak
        runs[name] = r
        log(f"[{name}] {r['median_s']:.4f} s/step (min {r['min_s']:.4f}), first call {first:.1f} s")
        return out

    def first_call(name: str, fn: Callable[[], torch.Tensor]) -> None:
        """Seconds of fn's first call at the second shape, and the graphs dynamo compiled for it."""
        graphs = counters["stats"]["unique_graphs"]
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        warmup[name] = {"first_call_s": time.perf_counter() - t0, "graphs": counters["stats"]["unique_graphs"] - graphs}
        log(f"[{name}] second shape: first call {warmup[name]['first_call_s']:.1f} s, {warmup[name]['graphs']} graphs")

    ours = "fastdit fp8" if run.quantize else "fastdit"
    with torch.inference_mode():  # as the pipeline runs (see fastdit.runtime.compile.dynamic_tokens)
        rope, index, mod = plan(shapes, run.text_len)
        rope2, index2, mod2 = plan(shapes2, text2)

        def step(x=x, enc=enc, mask=mask, t=t, rope=rope, lens=lens, mod=mod, index=index):
            with dynamic_tokens():
                return model(x, enc, mask, t, rope=rope, txt_lens=lens, modulation=mod, mod_index=index)

        ours_out = timed(f"{ours} eager", step)
        if run.compile:
            torch._dynamo.reset()
            compile_blocks(model)
            ours_out = timed(f"{ours} compiled (regional)", step, True)
            first_call(f"{ours} compiled (regional)", lambda: step(x2, enc2, mask2, t2, rope2, lens2, mod2, index2))
        if run.cuda_graph:
            suffix = "compiled (regional)" if run.compile else "eager"
            timed(f"{ours} {suffix} + CUDA graph", cuda_graph(step))
        if run.compare and run.quantize:
            log("note: --compare is skipped with --quantize fp8; run the comparison without --quantize")
        elif run.compare:
            ref = diffusers_twin(model)

            def ref_step(x=x, enc=enc, mask=mask, t=t, shapes=shapes):
                kw = dict(encoder_hidden_states_mask=mask, timestep=t, img_shapes=shapes, return_dict=False)
                return ref(hidden_states=x, encoder_hidden_states=enc, **kw)[0]

            ref_out = timed("diffusers eager", ref_step)
            err = ((ours_out.float() - ref_out.float()).norm() / ref_out.float().norm()).item()
            results["rel_l2_vs_diffusers"] = err
            log(f"relative L2 error fastdit vs diffusers ({run.dtype}): {err:.3e}")
            if run.compile and run.compare == "diffusers":
                torch._dynamo.reset()
                ref.compile_repeated_blocks(fullgraph=True)  # diffusers' regional compile
                timed("diffusers compiled", ref_step, True)
                first_call("diffusers compiled", lambda: ref_step(x2, enc2, mask2, t2, shapes2))
    return results
