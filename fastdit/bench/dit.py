"""`fastdit bench --stage dit`: one denoising step of the full-size DiT (cond + uncond batched), with random
weights, eager / compiled / replayed from a CUDA graph, against diffusers' model on the same weights."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from fastdit.bench.config import BenchConfig, log
from fastdit.bench.lora import bench_lora
from fastdit.bench.timing import cuda_graph, dit_flops, kernel_time_split, measure, summarize, sync
from fastdit.bench.weights import diffusers_twin, dit_inputs, parallel_random_dit, random_dit
from fastdit.errors import FastditError
from fastdit.models.layers import set_attention_backend
from fastdit.models.qwenimage import PRESETS
from fastdit.parallel.transformer import ParallelTransformer
from fastdit.quant.fp8 import quantize_model
from fastdit.runtime.compile import backend as inductor_backend
from fastdit.runtime.compile import compile_blocks


def bench_dit(run: BenchConfig, device: torch.device, dtype: torch.dtype, state=None) -> dict:
    """`state`: this rank's fastdit.parallel.ParallelState when the step runs on several ranks (every rank
    calls this; rank 0's result is reported), else None."""
    cfg = PRESETS[run.preset]
    batch = run.batch * (1 if run.no_cfg else 2)
    x, enc, t, shapes = dit_inputs(cfg, batch, run.height, run.width, run.text_len, dtype, device)
    n_img = x.shape[1]
    flops = dit_flops(cfg, batch, n_img, run.text_len)
    say = log if state is None or state.is_main else lambda msg: None
    blocks = (
        random_dit(cfg, dtype, device, run.seed) if state is None else parallel_random_dit(cfg, dtype, state, run.seed)
    )
    if run.quantize:  # fastdit.quant.fp8: the block linears in fp8, quantized from the random weights (after sharding)
        quantize_model(blocks)
    backend = set_attention_backend(blocks, run.attention)
    # Several ranks: the same call as the model's, splitting the CFG batch / image tokens and gathering the output.
    model = blocks if state is None else ParallelTransformer(blocks, state)
    rope = model.make_rope(shapes, run.text_len, device)
    # As the pipeline runs a step: AdaLN vectors from a table built once for all steps (all samples share t).
    mod, table_s = None, None
    if run.modulation == "table":
        with torch.no_grad():
            steps = torch.linspace(1.0, 0.02, 50, device=device)  # a 50-step run's table
            model.modulation_table(steps)  # warm-up (first-use cuBLAS / allocator work)
            sync(device)
            t0 = time.perf_counter()
            model.modulation_table(steps)
            sync(device)
            table_s = time.perf_counter() - t0
            mod = model.modulation_table(t[:1])[0]
    # A CFG batch whose negative prompt is shorter: its text is padded, masked or passed as lengths.
    mask, txt_lens = None, None
    if run.uncond_text_len is not None:
        if run.no_cfg or not 1 <= run.uncond_text_len <= run.text_len:
            raise FastditError("--uncond-text-len needs CFG and a value in [1, --text-len]")
        lens = (run.text_len,) * (batch // 2) + (run.uncond_text_len,) * (batch // 2)
        mask = torch.arange(run.text_len, device=device)[None, :] < torch.tensor(lens, device=device)[:, None]
        txt_lens = lens if run.padding == "lengths" else None
    results: dict = {
        "stage": "dit",
        "shapes": {
            "batch": batch,
            "image_tokens": n_img,
            "text_tokens": run.text_len,
            "height": run.height,
            "width": run.width,
            "cfg_batched": not run.no_cfg,
            "uncond_text_tokens": run.uncond_text_len,
            "padding": run.padding if run.uncond_text_len is not None else None,
        },
        "flops_per_step": flops,
        "ranks": None if state is None else {"tp": state.tp, "sp": state.sp, "cfg": state.cfg},
        "attention_backend": backend,
        "quantize": run.quantize,
        "modulation": run.modulation,
        "modulation_table_50_steps_s": table_s,
        "runs": {},
    }
    runs = results["runs"]

    def timed(name: str, fn: Callable[[], torch.Tensor], compile_first: bool):
        say(f"[{name}] warming up" + (" (compiling)" if compile_first else ""))
        out, first, times, peak = measure(fn, device, run.warmup, run.iters)
        r = summarize(times, flops)
        r["first_call_s"] = first
        if peak is not None:
            r["peak_mem_gib"] = peak
        if run.profile:
            r.update(kernel_time_split(fn, device))
        runs[name] = r
        say(
            f"[{name}] {r['median_s']:.4f} s/step (min {r['min_s']:.4f}, max {r['max_s']:.4f}), "
            f"{r['tflops']:.0f} TFLOP/s, first call {first:.1f} s"
        )
        return out

    ours = "fastdit fp8" if run.quantize else "fastdit"
    with torch.no_grad():
        ours_out = timed(
            f"{ours} eager", lambda: model(x, enc, mask, t, rope=rope, txt_lens=txt_lens, modulation=mod), False
        )
        if run.compile:
            compiled = (
                torch.compile(model, fullgraph=True, backend=inductor_backend()) if run.compile == "full" else model
            )
            if run.compile == "regional":
                compile_blocks(blocks)
            ours_out = timed(
                f"{ours} compiled ({run.compile})",
                lambda: compiled(x, enc, mask, t, rope=rope, txt_lens=txt_lens, modulation=mod),
                True,
            )
        if run.cuda_graph:  # the same step (compiled if --compile) captured once, replayed: no launch cost
            step = compiled if run.compile else model
            replay = cuda_graph(lambda: step(x, enc, mask, t, rope=rope, txt_lens=txt_lens, modulation=mod))
            suffix = f"compiled ({run.compile})" if run.compile else "eager"
            timed(f"{ours} {suffix} + CUDA graph", replay, False)
            del replay  # its memory pool, before later runs record their own
        if run.compare and run.quantize:
            # diffusers' model would need a second, bf16 copy of the weights next to the fp8 one.
            log("note: --compare is skipped with --quantize fp8; run the comparison without --quantize")
        elif run.compare in ("diffusers", "diffusers-eager"):
            ref = diffusers_twin(model)
            kw = dict(
                hidden_states=x,
                encoder_hidden_states=enc,
                encoder_hidden_states_mask=mask,
                timestep=t,
                img_shapes=shapes,
                return_dict=False,
            )
            ref_out = timed("diffusers eager", lambda: ref(**kw)[0], False)
            err = ((ours_out.float() - ref_out.float()).norm() / ref_out.float().norm()).item()
            results["rel_l2_vs_diffusers"] = err
            log(f"relative L2 error fastdit vs diffusers ({run.dtype}): {err:.3e}")
            if run.compile and run.compare == "diffusers":
                ref_c = torch.compile(ref)  # diffusers' model graph-breaks under fullgraph=True
                timed("diffusers compiled", lambda: ref_c(**kw)[0], True)
        if run.lora_rank is not None:  # last: merging changes the weights (which diffusers' twin shares)
            step = compiled if run.compile else model
            base_name = f"{ours} compiled ({run.compile})" if run.compile else f"{ours} eager"
            fn = lambda: step(x, enc, mask, t, rope=rope, txt_lens=txt_lens, modulation=mod)  # noqa: E731
            bench_lora(run, model, fn, timed, base_name, results, device, dtype)
    return results
