"""fastdit's edit pipelines against diffusers' QwenImageEditPipeline / QwenImageEditPlusPipeline on the tiny folders.

Parity is checked on the 8-bit RGB output (largest per-channel difference <= 1), float32 on CPU, 2 steps.

The reference pipelines resize their images to fixed areas (1024 * 1024 for the VAE and the output, 384 * 384 for
the Edit-2509 / 2511 encoder images); at those areas a CPU call takes seconds, mostly in the VAE. Most cases
therefore run both sides at small areas: fastdit through its `vae_image_area` / `vl_image_area` arguments, diffusers
with its module-level `calculate_dimensions` mapping those fixed areas to the same small ones (the rest of its
code path unchanged). `test_default_areas_match_diffusers` runs once at the real defaults.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fastdit.validation import InputError

VAE_AREA = 64 * 64
VL_AREA = 48 * 48
PROMPT = "make the sky green"


def _noise_image(width: int, height: int, seed: int, mode: str = "RGB") -> Image.Image:
    image = Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))
    return image if mode == "RGB" else image.convert(mode)


WIDE = _noise_image(96, 48, seed=0)  # 2:1
TALL = _noise_image(40, 72, seed=1)  # 5:9


@pytest.fixture
def small_areas(monkeypatch):
    """diffusers' edit pipelines resizing to VAE_AREA / VL_AREA instead of their fixed areas (for one test)."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus

    areas = {1024 * 1024: VAE_AREA, 384 * 384: VL_AREA}
    for module in (edit, plus):
        original = module.calculate_dimensions
        monkeypatch.setattr(
            module, "calculate_dimensions", lambda area, ratio, f=original: f(areas.get(area, area), ratio)
        )


@pytest.fixture(scope="module")
def pipes(tiny_folders):
    """kind -> (fastdit pipeline, diffusers pipeline), each loaded once; diffusers' pipeline shares fastdit's text
    encoder, VAE, tokenizer and processor objects (read-only) to save their loading time."""
    from diffusers import DiffusionPipeline

    from fastdit import load_pipeline

    loaded = {}

    def get(kind):
        if kind not in loaded:
            ours = load_pipeline(tiny_folders(kind), dtype=torch.float32, device="cpu")
            shared = {n: getattr(ours, n) for n in ("text_encoder", "vae", "tokenizer", "processor")}
            ref = DiffusionPipeline.from_pretrained(tiny_folders(kind), dtype=torch.float32, **shared)
            ref.set_progress_bar_config(disable=True)
            loaded[kind] = ours, ref
        return loaded[kind]

    return get


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


def _compare(pipes, kind, image, negative_prompt, small=True, **kw):
    """Run both pipelines with the same inputs; returns fastdit's image after checking parity."""
    ours, ref = pipes(kind)
    areas = dict(vae_image_area=VAE_AREA, vl_image_area=VL_AREA) if small else {}
    cfg = dict(true_cfg_scale=3.0) if negative_prompt is not None else {}
    got = ours(
        image=image,
        prompt=PROMPT,
        negative_prompt=negative_prompt,
        num_inference_steps=2,
        seed=3,
        show_progress=False,
        **areas,
        **cfg,
        **kw,
    )
    expected = ref(
        image=image,
        prompt=PROMPT,
        negative_prompt=negative_prompt,
        true_cfg_scale=cfg.get("true_cfg_scale", 1.0),
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(3),
        **kw,
    ).images
    assert len(got) == len(expected) == 1
    assert got[0].size == expected[0].size
    diff = np.abs(_pixels(got[0]) - _pixels(expected[0])).max()
    assert diff <= 1, f"{kind}: max |fastdit - diffusers| = {diff}/255"
    return got[0]


def test_load_pipeline_picks_the_edit_classes(pipes):
    """model_index.json's _class_name picks the pipeline: Edit, and Edit-Plus for both 2509 and 2511 (the latter with
    the zero_cond_t DiT)."""
    from fastdit.pipelines.edit import QwenImageEditPipeline, QwenImageEditPlusPipeline

    assert type(pipes("edit")[0]) is QwenImageEditPipeline
    assert type(pipes("edit-2509")[0]) is QwenImageEditPlusPipeline
    assert pipes("edit-2511")[0].transformer.cfg.zero_cond_t and not pipes("edit-2509")[0].transformer.cfg.zero_cond_t


def test_edit_2509_two_references_with_cfg(pipes, small_areas):
    """Edit-2509, two references of different aspect ratios, true CFG: the output takes the last one's aspect."""
    out = _compare(pipes, "edit-2509", [WIDE, TALL], " ")
    assert out.size == (32, 96)  # 5:9 at 64 * 64 px: 47.7 x 85.9, each side rounded to a multiple of 32


@pytest.mark.parametrize("refs", [1, 2])
@pytest.mark.parametrize("negative_prompt", [" ", None], ids=["cfg", "no-cfg"])
def test_edit_2511(pipes, small_areas, refs, negative_prompt):
    """Edit-2511 (reference tokens modulated at t = 0) with one and two references, with and without CFG."""
    _compare(pipes, "edit-2511", [TALL, WIDE][:refs], negative_prompt)


def test_edit_non_square_image(pipes, small_areas):
    """Qwen-Image-Edit with a 2:1 image: the one resized condition feeds the encoder and the VAE; output 2:1 too."""
    out = _compare(pipes, "edit", WIDE, "blurry")
    assert out.size == (96, 32)


def test_explicit_height_and_width(pipes, small_areas):
    """An explicit output size different from the references' (which keep their own sizes and RoPE grids)."""
    out = _compare(pipes, "edit-2511", [WIDE, TALL], " ", height=32, width=64)
    assert out.size == (64, 32)
    out = _compare(pipes, "edit", TALL, None, height=48, width=48)
    assert out.size == (48, 48)


def test_default_areas_match_diffusers(pipes):
    """The defaults (references at 1024 * 1024 px for the VAE, 384 * 384 for the encoder) are diffusers' fixed sizes.
    A small explicit output keeps the decode cheap."""
    _compare(pipes, "edit-2511", TALL, None, small=False, height=32, width=32)


@pytest.mark.parametrize("mode", ["RGBA", "L", "P"])
def test_non_rgb_images_are_converted_as_diffusers_load_image(pipes, mode):
    """RGBA, grayscale and palette images become what `diffusers.utils.load_image` makes of them (the reference
    pipelines take RGB only): the same edit as from that RGB image."""
    from diffusers.utils import load_image

    from fastdit.pipelines.edit_inputs import reference_images

    image = _noise_image(40, 24, seed=2, mode=mode)
    (converted,) = reference_images(image, 1)
    assert converted.mode == "RGB"
    assert np.array_equal(np.asarray(converted), np.asarray(load_image(image)))
    ours, _ = pipes("edit-2509")
    kw = dict(prompt=PROMPT, num_inference_steps=1, seed=0, vae_image_area=VAE_AREA, vl_image_area=VL_AREA)
    a = ours(image=image, show_progress=False, **kw)[0]
    b = ours(image=load_image(image), show_progress=False, **kw)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_prompt_list_equals_separate_runs(pipes):
    """Two prompts in one call (their texts padded to one length, CFG rows batched) give each prompt's own image."""
    ours, _ = pipes("edit-2511")
    kw = dict(negative_prompt=" ", num_inference_steps=2, vae_image_area=VAE_AREA, vl_image_area=VL_AREA)
    both = ours(image=[WIDE, TALL], prompt=["make it blue", PROMPT], seed=[4, 5], show_progress=False, **kw)
    one = ours(image=[WIDE, TALL], prompt="make it blue", seed=4, show_progress=False, **kw)
    two = ours(image=[WIDE, TALL], prompt=PROMPT, seed=5, show_progress=False, **kw)
    assert np.abs(_pixels(both[0]) - _pixels(one[0])).max() <= 1
    assert np.abs(_pixels(both[1]) - _pixels(two[0])).max() <= 1
    assert both.seeds == [4, 5] and both.steps == 2 and both.timings["vae_encode_s"] > 0


@pytest.mark.parametrize(
    "kind, kwargs, field, match",
    [
        ("edit", dict(image=[WIDE, TALL]), "image", "takes at most 1 image"),
        ("edit-2509", dict(image=[WIDE] * 4), "image", "takes at most 3 images"),
        ("edit-2509", dict(image=[]), "image", "non-empty list"),
        ("edit-2509", dict(image=np.zeros((8, 8, 3))), "image", "must be PIL images"),
        ("edit-2509", dict(image=[WIDE, "b.png"]), "image", "image 1 is a str"),
        ("edit-2509", dict(image=_noise_image(400, 2, 0)), "image", "too elongated"),
        ("edit-2509", dict(vae_image_area=100), "vae_image_area", "between 1024 and"),
        ("edit-2509", dict(vl_image_area=2.5), "vl_image_area", "must be an integer"),
        ("edit-2509", dict(height=50), "height", "multiple of 16"),
        ("edit-2509", dict(prompt=" "), "prompt", "must not be empty"),
        ("edit-2509", dict(prompt="word " * 1100), "prompt", "too long"),
        ("edit-2509", dict(true_cfg_scale=0.5, negative_prompt=" "), "true_cfg_scale", "between 1 and"),
        ("edit-2509", dict(seed=[1, 2]), "seed", "2 values for 1 images"),
    ],
)
def test_bad_input_names_the_field(pipes, kind, kwargs, field, match):
    """Bad arguments raise InputError naming the field, before any model runs."""
    ours, _ = pipes(kind)
    args = {"image": WIDE, "prompt": PROMPT, **kwargs}
    with pytest.raises(InputError, match=match) as err:
        ours(**args)
    assert err.value.field == field


def test_cuda_graph_key_holds_the_reference_layout(pipes, monkeypatch):
    """The shapes a step's CUDA graph is recorded for include the reference grids: two layouts with the same token
    count (a 2:1 and a 1:2 reference) get different keys."""
    ours, _ = pipes("edit-2511")
    keys = []
    monkeypatch.setattr(ours, "graphed", lambda key, fn: keys.append(key) or fn)
    kw = dict(prompt=PROMPT, num_inference_steps=1, seed=0, height=32, width=32, show_progress=False)
    kw.update(vae_image_area=VAE_AREA, vl_image_area=VL_AREA)
    ours(image=WIDE, **kw)
    ours(image=WIDE.transpose(Image.Transpose.TRANSPOSE), **kw)
    assert len(keys) == 2 and keys[0] != keys[1]
    assert list(keys[0][2]) == [(1, 2, 2), (1, 2, 6)] and list(keys[1][2]) == [(1, 2, 2), (1, 6, 2)]


def test_compiled_pipeline_serves_a_new_reference_size_without_recompiling(tiny_folders):
    """Compiled blocks (aot_eager here: dynamo's tracing and guards without a C++ build) with the pipeline's symbolic
    token counts: the image is the eager one, and a call with another reference size and prompt length compiles
    nothing."""
    from fastdit import load_pipeline
    from fastdit.runtime.compile import compile_blocks

    pipe = load_pipeline(tiny_folders("edit-2511"), dtype=torch.float32, device="cpu")
    kw = dict(negative_prompt=" ", num_inference_steps=2, seed=1, vae_image_area=VAE_AREA, vl_image_area=VL_AREA)
    calls = [dict(image=[WIDE, TALL], prompt=PROMPT), dict(image=[TALL, TALL], prompt="make the grass a lot bluer")]
    eager = [pipe(show_progress=False, **c, **kw)[0] for c in calls]
    torch._dynamo.reset()
    compile_blocks(pipe.transformer, backend="aot_eager")
    compiled = [pipe(show_progress=False, **calls[0], **kw)[0]]
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled.append(pipe(show_progress=False, **calls[1], **kw)[0])
    for a, b in zip(compiled, eager, strict=True):
        assert np.abs(_pixels(a) - _pixels(b)).max() <= 1


def test_fp8_emulated_edit(pipes, tiny_folders):
    """quantize="fp8-emulated" (fp8 block linears, CPU emulation) runs the Edit-2511 pipeline; the image stays close
    to the float one."""
    from fastdit import load_pipeline

    ours, _ = pipes("edit-2511")
    fp8 = load_pipeline(tiny_folders("edit-2511"), dtype=torch.float32, device="cpu", quantize="fp8-emulated")
    kw = dict(prompt=PROMPT, negative_prompt=" ", num_inference_steps=2, seed=2, show_progress=False)
    kw.update(image=[WIDE, TALL], vae_image_area=VAE_AREA, vl_image_area=VL_AREA)
    a, b = _pixels(fp8(**kw)[0]), _pixels(ours(**kw)[0])
    assert a.shape == b.shape and 0 < np.abs(a - b).mean() < 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_edit_gives_the_same_images(tmp_path):
    """Steps replayed from a CUDA graph give the plain pipeline's images; the same shapes with other images reuse the
    graph, another reference size records a new one."""
    from fastdit import load_pipeline
    from fastdit.tiny import tiny_pipeline_dir

    pipe = load_pipeline(tiny_pipeline_dir(tmp_path / "e", kind="edit-2511"), dtype=torch.float32, device="cuda")
    kw = dict(negative_prompt=" ", num_inference_steps=3, seed=4, vae_image_area=VAE_AREA, vl_image_area=VL_AREA)
    calls = [[WIDE, TALL], [_noise_image(96, 48, seed=9), TALL], [TALL, TALL]]
    plain = [_pixels(pipe(image=c, prompt=PROMPT, show_progress=False, **kw)[0]) for c in calls]
    pipe.enable_cuda_graph()
    graphs, graphed = [], []
    for c in calls:
        graphed.append(_pixels(pipe(image=c, prompt=PROMPT, show_progress=False, **kw)[0]))
        graphs.append(pipe._graph)
    assert graphs[0] is graphs[1] and graphs[2] is not graphs[0]
    for a, b in zip(graphed, plain, strict=True):
        assert np.abs(a - b).max() <= 1
