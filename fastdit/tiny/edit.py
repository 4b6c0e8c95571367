"""Tiny random-weight Qwen-Image-Edit pipeline folders (diffusers format), the oracles for fastdit's edit pipelines.

Three kinds, each loadable by diffusers' own pipeline class:

- "edit": `QwenImageEditPipeline` (Qwen-Image-Edit, one condition image);
- "edit-2509": `QwenImageEditPlusPipeline` with `zero_cond_t=False` (Qwen-Image-Edit-2509, several images);
- "edit-2511": `QwenImageEditPlusPipeline` with `zero_cond_t=True` (Qwen-Image-Edit-2511: condition-image
  tokens modulated at t = 0; the released transformer config sets no other new flag).

Components beyond the text-to-image folder of `fastdit.tiny`:

- text encoder: the same 2-layer Qwen2.5-VL text model (hidden 32) with a 2-block vision tower (patch 14,
  spatial merge 2, temporal patch 2, window 112 px) whose block 0 uses window attention and block 1 full
  attention, as the released tower mixes both;
- tokenizer and processor/: the Qwen2.5-VL tokenizer (vision tokens at their released ids) and a
  `Qwen2VLProcessor` folder whose image processor has the released Qwen-Image-Edit settings (patch 14,
  merge 2, min_pixels 56 * 56, max_pixels 28 * 28 * 16384, CLIP mean / std).

The released edit scheduler config equals Qwen-Image's, and the transformer and VAE match the
text-to-image tiny folder (same seeds), so only the conditioning path differs.
"""

from __future__ import annotations

from pathlib import Path

# kind -> (diffusers pipeline class, transformer zero_cond_t)
EDIT_KINDS = {
    "edit": ("QwenImageEditPipeline", False),
    "edit-2509": ("QwenImageEditPlusPipeline", False),
    "edit-2511": ("QwenImageEditPlusPipeline", True),
}

# Released Qwen-Image-Edit processor/preprocessor_config.json (Qwen2.5-VL's image processor).
EDIT_PATCH_SIZE = 14
EDIT_MERGE_SIZE = 2
EDIT_MIN_PIXELS = 3136
EDIT_MAX_PIXELS = 12845056


def write_edit_folder(folder: Path, kind: str, seed: int) -> None:
    """Write every component of the tiny `kind` edit pipeline into `folder` (which must exist)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fastdit.tiny.common import QWEN_IMAGE_SCHEDULER_CONFIG, _text_encoder, _transformer, _vae, write_model_index
    from fastdit.tiny.vl import save_vl_processor, save_vl_tokenizer

    class_name, zero_cond_t = EDIT_KINDS[kind]
    save_vl_tokenizer(folder / "tokenizer", "qwen2.5-vl")
    save_vl_processor(
        folder / "processor",
        flavour="qwen2.5-vl",
        patch_size=EDIT_PATCH_SIZE,
        merge_size=EDIT_MERGE_SIZE,
        min_pixels=EDIT_MIN_PIXELS,
        max_pixels=EDIT_MAX_PIXELS,
    )
    _text_encoder(seed, vision_depth=2, fullatt_block_indexes=(1,)).save_pretrained(folder / "text_encoder")
    _transformer(seed, zero_cond_t=zero_cond_t).save_pretrained(folder / "transformer")
    _vae(seed).save_pretrained(folder / "vae")
    FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG).save_pretrained(folder / "scheduler")
    components = {
        "processor": ("transformers", "Qwen2VLProcessor"),
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
        "text_encoder": ("transformers", "Qwen2_5_VLForConditionalGeneration"),
        "tokenizer": ("transformers", "Qwen2Tokenizer"),
        "transformer": ("diffusers", "QwenImageTransformer2DModel"),
        "vae": ("diffusers", "AutoencoderKLQwenImage"),
    }
    write_model_index(folder, class_name, components)
