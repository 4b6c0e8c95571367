"""What `fastdit bench --stage memory` runs on: every component of a Qwen-Image pipeline at full size with random
weights in host memory (built without a download), the host-to-device bandwidth, and diffusers' offloading modes
on the same components.

The random weights are drawn on the device, one part at a time, and copied to host memory, so building them is
fast and never holds more than one part on the device. `--preset tiny` takes the tiny pipeline folder's
components instead (CPU tests).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fastdit.bench.config import log
from fastdit.bench.weights import diffusers_twin, fill_random_
from fastdit.models.qwenimage import DiTConfig, QwenImageTransformer

# Qwen2.5-VL-7B-Instruct, the Qwen-Image text encoder (8.29 B parameters with its vision tower).
QWEN25_VL_7B = {
    "text_config": {
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "max_position_embeddings": 128000,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    },
    "vision_config": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": 3584,
        "fullatt_block_indexes": [7, 15, 23, 31],
    },
    "tie_word_embeddings": False,
}


@dataclass
class Parts:
    """A pipeline's components in host memory (the DiT as fastdit's model, float)."""

    dit: QwenImageTransformer
    text_encoder: nn.Module
    tokenizer: object
    vae: nn.Module
    scheduler_config: dict


def _fill_parts_on(device: torch.device, model: QwenImageTransformer, seed: int) -> None:
    """Random DiT weights as fastdit.bench.weights.random_dit draws them, for a model built on meta: each top-level
    part (each block) is materialised on `device`, filled there and moved to host memory. A part is filled under its
    own name (`holder`), so the initialisation rules that go by name (norms, modulation) apply as in the whole model."""
    parts = [(n, m) for n, m in model.named_children() if n != "blocks"] + [("block", b) for b in model.blocks]
    for i, (name, part) in enumerate(parts):
        holder = nn.Module()
        holder.add_module(name, part)
        part.to_empty(device=device)
        fill_random_(holder, device, seed + i)
        part.to("cpu")


def random_text_encoder(device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """Qwen2.5-VL-7B with random weights (std 0.02, norms 1, biases 0) in host memory."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.initialization import no_init_weights

    config = Qwen2_5_VLConfig(**QWEN25_VL_7B)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights():
            model = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("ln_q.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_((torch.randn(p.shape, device=device, generator=g) * 0.02).to(dtype))
    return model.eval().requires_grad_(False)


def full_size_parts(device: torch.device, dtype: torch.dtype, seed: int = 0) -> Parts:
    """Every Qwen-Image component at full size with random weights, in host memory."""
    from diffusers import AutoencoderKLQwenImage
    from transformers import Qwen2Tokenizer

    from fastdit.tiny import QWEN_IMAGE_SCHEDULER_CONFIG, tiny_pipeline_dir

    t0 = time.perf_counter()
    with torch.device("meta"):
        dit = QwenImageTransformer(DiTConfig()).to(dtype)
    _fill_parts_on(device, dit, seed)
    dit = dit.eval().requires_grad_(False)
    log(f"[parts] random DiT (40.9 GB) in host memory in {time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    text_encoder = random_text_encoder(device, dtype, seed)
    log(f"[parts] random Qwen2.5-VL-7B text encoder in host memory in {time.perf_counter() - t0:.0f} s")
    torch.manual_seed(seed)
    vae = AutoencoderKLQwenImage().to(dtype).eval().requires_grad_(False)  # Qwen-Image's VAE geometry
    tokenizer = Qwen2Tokenizer.from_pretrained(tiny_pipeline_dir() / "tokenizer")  # the real Qwen2 vocabulary
    return Parts(dit, text_encoder, tokenizer, vae, dict(QWEN_IMAGE_SCHEDULER_CONFIG))


def tiny_parts(dtype: torch.dtype) -> Parts:
    """The tiny pipeline folder's components (CPU tests of the benchmark)."""
    from fastdit.checkpoint import read_json
    from fastdit.load import load_transformer
    from fastdit.pipelines.folder import check_pipeline_folder
    from fastdit.pipelines.loading import load_components
    from fastdit.pipelines.qwenimage import COMPONENTS
    from fastdit.tiny import tiny_pipeline_dir

    root = tiny_pipeline_dir()
    parts = load_components(root, check_pipeline_folder(root, COMPONENTS), dtype, torch.device("cpu"))
    dit = load_transformer(root / "transformer", dtype=dtype, device="cpu")
    scheduler = read_json(root / "scheduler" / "scheduler_config.json")
    return Parts(dit, parts["text_encoder"], parts["tokenizer"], parts["vae"], scheduler)


def fresh_dit(source: QwenImageTransformer) -> QwenImageTransformer:
    """A new DiT module on the very tensors of `source` (no copy): placing and quantizing it replaces its own
    parameters and leaves `source` as it is."""
    with torch.device("meta"):
        model = type(source)(source.cfg)
    model.load_state_dict(source.state_dict(), assign=True)
    return model.eval().requires_grad_(False)


def h2d_bandwidth(device: torch.device, nbytes: int = 2**30) -> dict | None:
    """Host-to-device copy bandwidth in GB/s, from pinned and from pageable memory (median of 5 copies)."""
    if device.type != "cuda":
        return None
    out = {}
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    for kind, pin in (("pinned", True), ("pageable", False)):
        src = torch.ones(nbytes, dtype=torch.uint8, pin_memory=pin)
        times = []
        for _ in range(6):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=pin)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        out[f"{kind}_gb_s"] = nbytes / statistics.median(times[1:]) / 1e9
        del src
    return out


def diffusers_reference(parts: Parts, mode: str, device: torch.device, dtype: torch.dtype, run_call) -> dict:
    """diffusers' QwenImagePipeline on the same components with offloading `mode` ("model": enable_model_cpu_offload,
    "sequential": enable_sequential_cpu_offload, "group": block-level group offloading of the transformer with a
    side stream and leaf-level of the text encoder). `run_call(pipe)` times one call and returns its record; an
    out-of-memory error is recorded, not raised. The text encoder and VAE are left in host memory again."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    # The shared components' host tensors, put back afterwards: an offload mode may leave parameters on the
    # device or (sequential offload) on the meta device, and its hooks cannot always be undone.
    host = {module: _tensors(module) for module in (parts.text_encoder, parts.vae)}
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**parts.scheduler_config),
        vae=parts.vae,
        text_encoder=parts.text_encoder,
        tokenizer=parts.tokenizer,
        transformer=diffusers_twin(parts.dit),
    )
    try:
        if mode == "model":
            pipe.enable_model_cpu_offload(device=device)
        elif mode == "sequential":
            pipe.enable_sequential_cpu_offload(device=device)
        else:
            from diffusers.hooks import apply_group_offloading

            pipe.transformer.enable_group_offload(
                onload_device=device, offload_device="cpu", offload_type="block_level", num_blocks_per_group=1,
                use_stream=device.type == "cuda", low_cpu_mem_usage=True,
            )  # fmt: skip
            apply_group_offloading(
                pipe.text_encoder, onload_device=device, offload_type="leaf_level", use_stream=device.type == "cuda"
            )
            pipe.vae.to(device)
        return run_call(pipe)
    except torch.OutOfMemoryError as e:
        return {"error": f"out of memory: {str(e).splitlines()[0][:160]}"}
    except (RuntimeError, TypeError, ValueError) as e:  # the reference's failure is a result, not the bench's
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    finally:
        _restore_host(host)
        del pipe
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _tensors(module: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer of `module` by qualified name (shared ones under each of their names), detached:
    `module.to(...)` swaps a parameter's data in place, and these keep the host storage."""
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    return {name: t.detach() for name, t in named}


def _restore_host(host: dict[nn.Module, dict[str, Tensor]]) -> None:
    """Take diffusers' hooks off the shared components and put back the host tensors recorded in `host`."""
    from accelerate.hooks import remove_hook_from_module

    for module, tensors in host.items():
        try:
            remove_hook_from_module(module, recurse=True)
        except (TypeError, RuntimeError) as e:  # a sequential offload's hooks may fail to move weights back
            log(f"[reference] accelerate's hooks did not detach cleanly ({e}); restoring the weights directly")
        try:
            from diffusers.hooks import HookRegistry

            HookRegistry.check_if_exists_or_initialize(module).remove_hook("group_offloading", recurse=True)
        except (ImportError, AttributeError, KeyError, ValueError):
            pass
        for name, t in tensors.items():
            owner, _, attr = name.rpartition(".")
            sub = module.get_submodule(owner)
            if attr in sub._parameters:
                sub._parameters[attr] = nn.Parameter(t, requires_grad=False)
            else:
                sub._buffers[attr] = t
