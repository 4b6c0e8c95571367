"""The edit pipelines' sampling options: `scheduler="lightning"` (the Qwen-Image-Edit-Lightning LoRAs' schedule) and
the step cache (`cache=StepCache`), on the tiny edit folders in float32 at small reference areas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fastdit import StepCache
from fastdit.pipelines.scheduler import LIGHTNING_SCHEDULER_CONFIG

AREAS = dict(vae_image_area=64 * 64, vl_image_area=48 * 48)
PROMPT = "make the sky green"
WIDE = Image.fromarray(np.random.RandomState(0).randint(0, 256, (48, 96, 3), dtype=np.uint8))
TALL = Image.fromarray(np.random.RandomState(1).randint(0, 256, (72, 40, 3), dtype=np.uint8))


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB")) for im in images]).astype(np.int16)


def _reference(kind, ours, tiny_folders, monkeypatch, **parts):
    """diffusers' QwenImageEditPlusPipeline on the tiny `kind` folder, sharing `ours`' text encoder, VAE, tokenizer
    and processor, its resize areas mapped to AREAS (the released defaults would make the tiny images large)."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus
    from diffusers import QwenImageEditPlusPipeline

    areas = {1024 * 1024: AREAS["vae_image_area"], 384 * 384: AREAS["vl_image_area"]}
    original = plus.calculate_dimensions
    monkeypatch.setattr(plus, "calculate_dimensions", lambda area, ratio: original(areas.get(area, area), ratio))
    shared = {n: getattr(ours, n) for n in ("text_encoder", "vae", "tokenizer", "processor")}
    ref = QwenImageEditPlusPipeline.from_pretrained(tiny_folders(kind), dtype=torch.float32, **shared, **parts)
    ref.set_progress_bar_config(disable=True)
    return ref


def test_lightning_matches_diffusers_with_the_lightning_scheduler(tiny_pipes, tiny_folders, monkeypatch):
    """scheduler="lightning" on Edit-2509 gives diffusers' QwenImageEditPlusPipeline with a scheduler built from the
    Lightning config: its sigmas, and no CFG although a negative prompt is given; uint8 within 1."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    ours = tiny_pipes("edit-2509")
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(LIGHTNING_SCHEDULER_CONFIG)
    ref = _reference("edit-2509", ours, tiny_folders, monkeypatch, scheduler=scheduler)
    kw = dict(num_inference_steps=3, show_progress=False, **AREAS)
    got = ours([WIDE, TALL], PROMPT, negative_prompt=" ", scheduler="lightning", seed=2, **kw)
    gen = torch.Generator().manual_seed(2)
    expected = ref(image=[WIDE, TALL], prompt=PROMPT, true_cfg_scale=1.0, num_inference_steps=3, generator=gen).images
    assert got.steps == 3
    diff = np.abs(_pixels(got) - _pixels(expected)).max()
    assert diff <= 1, f"max |fastdit - diffusers| = {diff}/255"
    default = ours([WIDE, TALL], PROMPT, seed=2, **kw)
    assert np.abs(_pixels(default) - _pixels(got)).max() > 0, "the checkpoint's schedule gives another image"


def test_lightning_defaults_to_8_steps_of_one_dit_pass(tiny_pipes, monkeypatch):
    """With the Lightning schedule and a negative prompt but no scale, the call runs 8 steps of one DiT forward on
    the image's row (CFG off); the sigmas are the Lightning config's for the target's tokens."""
    import fastdit.pipelines.edit as edit

    ours = tiny_pipes("edit")
    batches, configs = [], []
    forward = ours.transformer.forward
    sigmas = edit.flow_match_sigmas
    monkeypatch.setattr(
        ours.transformer, "forward", lambda **kw: batches.append(kw["hidden_states"].shape[0]) or forward(**kw)
    )
    monkeypatch.setattr(edit, "flow_match_sigmas", lambda *a: configs.append(a[2]) or sigmas(*a))
    out = ours(WIDE, PROMPT, negative_prompt=" ", scheduler="lightning", seed=0, show_progress=False, **AREAS)
    assert out.steps == 8 and batches == [1] * 8
    assert configs == [LIGHTNING_SCHEDULER_CONFIG]


@pytest.mark.parametrize("kind", ["edit", "edit-2509", "edit-2511"])
def test_cache_with_threshold_zero_changes_no_bit(tiny_pipes, kind):
    """A step cache that never caches (threshold 0) runs the blocks as segments and gives the uncached image bit for
    bit, with CFG; an always-caching one (threshold inf after 1 warm-up step) skips the middle block on the other
    steps and still gives an image."""
    ours = tiny_pipes(kind)
    kw = dict(negative_prompt=" ", num_inference_steps=4, seed=5, show_progress=False, **AREAS)
    plain = ours([TALL], "make it blue", **kw)
    never = ours([TALL], "make it blue", cache=StepCache(front_blocks=1, back_blocks=0, threshold=0.0), **kw)
    assert np.array_equal(_pixels(never), _pixels(plain)) and never.cached_steps == 0
    always = StepCache(front_blocks=1, back_blocks=0, threshold=float("inf"), warmup_steps=1)
    cached = ours([TALL], "make it blue", cache=always, **kw)
    assert cached.cached_steps == 3 and cached[0].size == plain[0].size


def test_default_cache_of_the_pipeline(tiny_pipes):
    """`enable_step_cache` makes the cache every call's default; `cache=` of a call overrides it."""
    ours = tiny_pipes("edit")
    kw = dict(num_inference_steps=3, seed=1, show_progress=False, **AREAS)
    ours.enable_step_cache(StepCache(front_blocks=1, back_blocks=0, threshold=float("inf"), warmup_steps=1))
    try:
        assert ours(WIDE, PROMPT, **kw).cached_steps == 2
        assert ours(WIDE, PROMPT, cache=StepCache(front_blocks=1, back_blocks=0, threshold=0.0), **kw).cached_steps == 0
    finally:
        ours.enable_step_cache(None)
    assert ours(WIDE, PROMPT, **kw).cached_steps == 0


def test_edit_2511_first_block_cache_matches_diffusers(tiny_pipes, tiny_folders, monkeypatch):
    """Edit-2511 (zero_cond_t: reference tokens modulated at t = 0) with StepCache(front_blocks=1, back_blocks=0,
    warmup_steps=1) draws diffusers' QwenImageEditPlusPipeline image under its FirstBlockCache at the same threshold
    (no CFG: diffusers decides for cond and uncond apart), caching the same steps; uint8 within 1."""
    from diffusers.hooks import FirstBlockCacheConfig
    from diffusers.hooks.first_block_cache import FBCHeadBlockHook

    ours = tiny_pipes("edit-2511")
    ref = _reference("edit-2511", ours, tiny_folders, monkeypatch)
    threshold, steps = 0.15, 8  # between the changes of the tiny model's steps: some cached, some computed
    ref.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    decisions, decide = [], FBCHeadBlockHook._should_compute_remaining_blocks

    def spy(self, residual):
        decisions.append(decide(self, residual))
        return decisions[-1]

    monkeypatch.setattr(FBCHeadBlockHook, "_should_compute_remaining_blocks", spy)
    gen = torch.Generator().manual_seed(4)
    expected = ref(image=[WIDE, TALL], prompt=PROMPT, num_inference_steps=steps, generator=gen).images
    cache = StepCache(front_blocks=1, back_blocks=0, threshold=threshold, warmup_steps=1)
    got = ours([WIDE, TALL], PROMPT, num_inference_steps=steps, seed=4, cache=cache, show_progress=False, **AREAS)
    assert 0 < got.cached_steps == decisions.count(False) < steps - 1, decisions  # some steps of each kind
    diff = np.abs(_pixels(got) - _pixels(expected)).max()
    assert diff <= 1, f"max |fastdit - diffusers| = {diff}/255"


def test_num_images_per_prompt_and_output_size(tiny_pipes):
    """`num_images_per_prompt` gives prompt-major images with one seed each, each equal to its own single-image call;
    `output_size` is the size a call without height / width makes (Edit: the first image's ratio; 2509: the last)."""
    ours = tiny_pipes("edit-2509")
    kw = dict(num_inference_steps=2, show_progress=False, **AREAS)
    both = ours([WIDE, TALL], PROMPT, num_images_per_prompt=2, seed=[3, 4], **kw)
    alone = ours([WIDE, TALL], PROMPT, seed=4, **kw)
    assert len(both) == 2 and both.seeds == [3, 4]
    assert np.abs(_pixels(both[1:]) - _pixels(alone)).max() <= 1
    assert ours.output_size([WIDE, TALL], AREAS["vae_image_area"]) == both[0].size == (32, 96)
    assert tiny_pipes("edit").output_size([WIDE], AREAS["vae_image_area"]) == (96, 32)


def test_edit_2511_lora_matches_diffusers_and_the_cli(tiny_pipes, tiny_folders, tmp_path, monkeypatch, capsys):
    """A kohya LoRA of every linear (the modulation linears too, which also make the reference tokens' t = 0
    vectors) at scale 0.7 on Edit-2511 with CFG: diffusers' load_lora_weights + set_adapters image within 1/255;
    `fastdit edit --lora FILE:0.7` writes the same image; unloading gives the base image back."""
    from safetensors.torch import save_file

    from fastdit.cli.main import main
    from tests.lora_utils import random_lora

    ours = tiny_pipes("edit-2511")
    ref = _reference("edit-2511", ours, tiny_folders, monkeypatch)
    lora = tmp_path / "style.safetensors"
    save_file(random_lora(3, "kohya"), str(lora))
    WIDE.save(tmp_path / "wide.png")
    kw = dict(negative_prompt=" ", num_inference_steps=2, seed=6, show_progress=False, **AREAS)
    base = _pixels(ours([WIDE], PROMPT, **kw))
    ours.load_lora(str(lora), adapter_name="style", scale=0.7)
    ref.load_lora_weights(str(lora), adapter_name="style")
    ref.set_adapters(["style"], [0.7])
    try:
        got = _pixels(ours([WIDE], PROMPT, **kw))
    finally:
        ours.unload_loras()
    gen = torch.Generator().manual_seed(6)
    want = _pixels(ref(image=[WIDE], prompt=PROMPT, negative_prompt=" ", num_inference_steps=2, generator=gen).images)
    assert np.abs(got - want).max() <= 1
    assert np.abs(got - base).max() > 10  # the LoRA does change the image
    assert np.array_equal(_pixels(ours([WIDE], PROMPT, **kw)), base)

    out = tmp_path / "out.png"
    argv = ["edit", "--model", str(tiny_folders("edit-2511")), "--image", str(tmp_path / "wide.png")]
    argv += ["--vae-image-area", str(AREAS["vae_image_area"]), "--vl-image-area", str(AREAS["vl_image_area"])]
    argv += ["--prompt", PROMPT, "--negative-prompt", " ", "--steps", "2", "--seed", "6", "--device", "cpu"]
    argv += ["--dtype", "float32", "--lora", f"{lora}:0.7", "--output", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    assert np.array_equal(_pixels([Image.open(out)]), got)


@pytest.mark.parametrize("plan", ["offload-text", "offload-blocks"])
def test_memory_plans_draw_the_resident_image(tiny_pipes, tiny_folders, tmp_path, capsys, plan):
    """Edit-2511 (two references, CFG) with the text encoder offloaded, or also every DiT block streamed through one
    slot with the modulation linears (which make the reference tokens' t = 0 vectors too) loaded per use: the
    resident pipeline's image, bit for bit; `fastdit edit --memory offload-text` writes it too."""
    from fastdit import load_pipeline
    from fastdit.cli.main import main
    from fastdit.memory import offload_blocks_plan
    from fastdit.quant.fp8 import MODULATION

    folder = tiny_folders("edit-2511")
    kw = dict(negative_prompt=" ", num_inference_steps=2, seed=3, show_progress=False, **AREAS)
    resident = _pixels(tiny_pipes("edit-2511")([WIDE, TALL], PROMPT, **kw))
    memory = plan if plan == "offload-text" else offload_blocks_plan(2, 0, slots=1, modulation_paths=MODULATION)
    pipe = load_pipeline(folder, dtype=torch.float32, device="cpu", memory=memory)
    assert np.array_equal(_pixels(pipe([WIDE, TALL], PROMPT, **kw)), resident)
    assert not pipe.memory.text.loaded
    if plan == "offload-text":
        paths = [tmp_path / "wide.png", tmp_path / "tall.png"]
        WIDE.save(paths[0])
        TALL.save(paths[1])
        argv = ["edit", "--model", str(folder), *[f"--image={p}" for p in paths], "--memory", plan]
        argv += ["--vae-image-area", str(AREAS["vae_image_area"]), "--vl-image-area", str(AREAS["vl_image_area"])]
        argv += ["--prompt", PROMPT, "--negative-prompt", " ", "--steps", "2", "--seed", "3", "--device", "cpu"]
        argv += ["--dtype", "float32", "--output", str(tmp_path / "out.png")]
        assert main(argv) == 0, capsys.readouterr().err
        assert np.array_equal(_pixels([Image.open(tmp_path / "out.png")]), resident)
