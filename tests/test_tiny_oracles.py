"""The tiny pipeline folders of every kind load in diffusers' own pipeline classes and produce images (CPU, fp32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fastdit.errors import ConfigError
from fastdit.tiny import TINY_KINDS, build_tiny_pipeline, default_cache_dir
from fastdit.tiny.qwen21 import QWEN21_TURBO_SIGMAS
from fastdit.tiny.vl import QWEN3_VL_ADDED_TOKENS, allow_vl_processors_without_torchvision

PROMPT = "make the sky green"


@pytest.fixture(scope="module")
def tiny_folder(tiny_folders):
    """kind -> its folder, built at most once per session (conftest's tiny_folders)."""
    allow_vl_processors_without_torchvision()
    return tiny_folders


def _noise_image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8))


def _load(pipeline_class, folder):
    pipe = pipeline_class.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _check_image(images: np.ndarray, shape: tuple[int, ...]) -> None:
    assert images.shape == shape
    assert np.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0
    assert images.std() > 0.0


def test_cache_dirs_per_kind_and_unknown_kind(tmp_path):
    """qwen-image keeps its cache folder name; other kinds get their own; an unknown kind names the choices."""
    assert default_cache_dir().name == "tiny-random-v1"
    assert len({default_cache_dir(kind).name for kind in TINY_KINDS}) == len(TINY_KINDS)
    with pytest.raises(ConfigError, match="'edit-2512' is not one of qwen-image, edit"):
        build_tiny_pipeline(tmp_path / "x", kind="edit-2512")
    assert not (tmp_path / "x").exists()


def test_vl_tokenizers_use_released_ids(tiny_folder):
    """Edit tokenizer/processor and the 2.1 processor map the added tokens to their released ids and order."""
    from transformers import Qwen2Tokenizer

    released = {"<|im_start|>": 151644, "<|im_end|>": 151645}
    released.update({content: 151646 + i for i, (content, _) in enumerate(QWEN3_VL_ADDED_TOKENS)})
    assert released["<|vision_start|>"] == 151652 and released["<|image_pad|>"] == 151655
    assert released["<|video_pad|>"] == 151656 and released["<|file_sep|>"] == 151664
    assert released["</think>"] == 151668
    edit = tiny_folder("edit")
    qwen21 = tiny_folder("qwen-image-2.1")
    assert (edit / "processor" / "tokenizer.json").read_bytes() == (edit / "tokenizer" / "tokenizer.json").read_bytes()
    for folder, last in ((edit / "tokenizer", 151664), (qwen21 / "processor", 151668)):
        tok = Qwen2Tokenizer.from_pretrained(folder)
        assert len(tok) == last + 1
        assert {t: tok.convert_tokens_to_ids(t) for t in released if released[t] <= last} == {
            t: i for t, i in released.items() if i <= last
        }
        ids = tok("<|vision_start|><|image_pad|><|vision_end|>a cat").input_ids
        assert ids[:3] == [151652, 151655, 151653]


def test_edit_pipeline(tiny_folder):
    """QwenImageEditPipeline loads the "edit" folder and edits a 64x48 image with true CFG (2 steps).

    The VL image is the condition resized to 1024*1024 area (1184x896, multiples of 32), which the Qwen2.5-VL
    processor snaps to multiples of 28 (1176x896): 84*64 patches, 42*32 = 1344 image tokens in the prompt.
    """
    from diffusers import QwenImageEditPipeline

    pipe = _load(QwenImageEditPipeline, tiny_folder("edit"))
    image = _noise_image(64, 48, seed=0)
    embeds, _ = pipe.encode_prompt(PROMPT, image=pipe.image_processor.resize(image, 896, 1184))
    # 64 template tokens dropped; kept: <|vision_start|> 1344 x <|image_pad|> <|vision_end|> prompt, then
    # <|im_end|> \n <|im_start|> assistant \n.
    prompt_tokens = len(pipe.tokenizer(PROMPT).input_ids)
    assert embeds.shape == (1, 1 + 1344 + 1 + prompt_tokens + 5, 32)
    out = pipe(
        image=image,
        prompt=PROMPT,
        negative_prompt=" ",
        true_cfg_scale=2.0,
        num_inference_steps=2,
        height=64,
        width=48,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    _check_image(out.images, (1, 64, 48, 3))


@pytest.mark.parametrize("kind, zero_cond_t", [("edit-2509", False), ("edit-2511", True)])
def test_edit_plus_pipeline(tiny_folder, kind, zero_cond_t):
    """QwenImageEditPlusPipeline loads the 2509 / 2511 folder and edits from two images of different aspect ratios."""
    from diffusers import QwenImageEditPlusPipeline

    pipe = _load(QwenImageEditPlusPipeline, tiny_folder(kind))
    assert pipe.transformer.config.zero_cond_t is zero_cond_t
    out = pipe(
        image=[_noise_image(64, 48, seed=0), _noise_image(64, 96, seed=1)],
        prompt=PROMPT,
        true_cfg_scale=1.0,
        num_inference_steps=2,
        height=48,
        width=32,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    _check_image(out.images, (1, 48, 32, 3))


def test_qwen21_pipeline(tiny_folder):
    """QwenImage21Pipeline loads the 2.1 folder: text-to-image, then conditioned on one image (RGBA output).

    With output_resolution 64 the 64x48 condition becomes 64x64 (1024 * 1024 area scaled to 64 * 64, multiples
    of 32): 2 x 2 vision tokens, each expanded to the 2 x 2 latent tokens of the 16x VAE.
    """
    from diffusers import QwenImage21Pipeline

    pipe = _load(QwenImage21Pipeline, tiny_folder("qwen-image-2.1"))
    assert pipe.config.sample_sigmas is None
    generator = torch.Generator().manual_seed(0)
    out = pipe(prompt=PROMPT, num_inference_steps=2, height=64, width=32, generator=generator, output_type="np")
    _check_image(out.images, (1, 64, 32, 4))
    assert pipe.num_timesteps == 2
    out = pipe(
        prompt=PROMPT,
        image=_noise_image(64, 48, seed=0),
        num_inference_steps=2,
        output_resolution=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    _check_image(out.images, (1, 64, 64, 4))


def test_qwen21_turbo_samples_its_grid(tiny_folder):
    """The Turbo folder's model_index.json sample_sigmas set the 8-step grid, unshifted, whatever num_inference_steps."""
    from diffusers import QwenImage21Pipeline

    pipe = _load(QwenImage21Pipeline, tiny_folder("qwen-image-2.1-turbo"))
    assert pipe.config.sample_sigmas == QWEN21_TURBO_SIGMAS
    generator = torch.Generator().manual_seed(0)
    out = pipe(prompt=PROMPT, num_inference_steps=2, height=32, width=32, generator=generator, output_type="np")
    _check_image(out.images, (1, 32, 32, 4))
    assert pipe.num_timesteps == len(QWEN21_TURBO_SIGMAS)
    expected = torch.tensor(QWEN21_TURBO_SIGMAS + [0.0])
    torch.testing.assert_close(pipe.scheduler.sigmas, expected, rtol=0, atol=1e-6)
