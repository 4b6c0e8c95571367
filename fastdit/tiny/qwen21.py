"""Tiny random-weight Qwen-Image 2.1 pipeline folders (diffusers format), the oracles for fastdit's 2.1 pipeline.

Two kinds, both loadable by diffusers' `QwenImage21Pipeline`:

- "qwen-image-2.1": the base release (40 steps by default, dynamic shifting);
- "qwen-image-2.1-turbo": the distilled release, whose model_index.json carries `sample_sigmas` (8 sigmas,
  terminal 0 excluded) and whose scheduler leaves them untouched (no dynamic shift, shift 1, no terminal
  stretch). The pipeline uses `sample_sigmas` whenever the call passes no `sigmas`, and their count overrides
  `num_inference_steps`.

Components:

- text encoder: a 2-layer `Qwen3VLForConditionalGeneration` (hidden 32, 2 heads x 16, 1 KV head, interleaved
  M-RoPE sections 4 + 2 + 2) with a 2-block vision tower (patch 16, spatial merge 2, temporal patch 2,
  8 x 8 learned position grid, DeepStack from block 0), so one vision token covers 32 x 32 pixels: the 2 x 2
  latent tokens of the 16x VAE that the transformer expands each `<|image_pad|>` slot into;
- processor/: `Qwen3VLProcessor` layout with the Qwen3-VL tokenizer and image processor (mean / std 0.5).
  min_pixels is 32 * 32 instead of the released 256 * 256 so that small condition images keep their size:
  the image processor must not resize them, or the vision-token count stops matching the VAE tokens;
- transformer: a 2-layer `QwenImage21Transformer2DModel` (2 heads x 16, RoPE axes 4 + 6 + 6, 64 latent
  channels unpatched, causal_condition);
- VAE: an `AutoencoderKLQwenImage21` (RGBA in and out, z_dim 64 with the released latent mean / std,
  16x spatial compression from five stages, encoder base 8 / decoder base 12 like the released 96 / 144).
"""

from __future__ import annotations

from pathlib import Path

TINY_TEXT_DIM = 32
# The sampling grid in Qwen/Qwen-Image-2.1-Turbo's model_index.json (terminal sigma 0 excluded).
QWEN21_TURBO_SIGMAS = [1.0, 0.978453, 0.954180, 0.926626, 0.895080, 0.845148, 0.704534, 0.414568]
# Scheduler settings that keep a fixed grid as given (diffusers' QwenImage21Pipeline docs, "Fixed sampling grids").
QWEN21_TURBO_SCHEDULER_OVERRIDES = {
    "use_dynamic_shifting": False,
    "shift": 1.0,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
}
# Qwen3-VL image processor grid; min_pixels lowered from 65536 (see the module docstring).
QWEN21_PATCH_SIZE = 16
QWEN21_MERGE_SIZE = 2
QWEN21_MIN_PIXELS = 32 * 32
QWEN21_MAX_PIXELS = 16777216


def _text_encoder(seed: int):
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from fastdit.tiny.common import TINY_VOCAB

    heads, head_dim = 2, 16
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": TINY_VOCAB,
            "hidden_size": TINY_TEXT_DIM,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": heads,
            "num_key_value_heads": 1,
            "head_dim": head_dim,
            "max_position_embeddings": 4096,
            # (t, h, w) sections of head_dim / 2 = 8 frequencies, interleaved t h w t h w t t as in the release.
            "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 2, 2]},
            "bos_token_id": 151643,
            "eos_token_id": 151645,
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": TINY_TEXT_DIM,
            "patch_size": QWEN21_PATCH_SIZE,
            "spatial_merge_size": QWEN21_MERGE_SIZE,
            "temporal_patch_size": 2,
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0],
        },
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return Qwen3VLForConditionalGeneration(config).eval()


def _transformer(seed: int):
    import torch
    from diffusers import QwenImage21Transformer2DModel

    torch.manual_seed(seed + 1)
    return QwenImage21Transformer2DModel(
        patch_size=1,
        in_channels=64,
        out_channels=64,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        context_in_dim=TINY_TEXT_DIM,
        mlp_ratio=3,
        axes_dims_rope=(4, 6, 6),
        causal_condition=True,
    ).eval()


def _vae(seed: int):
    import torch
    from diffusers import AutoencoderKLQwenImage21

    torch.manual_seed(seed + 2)
    return AutoencoderKLQwenImage21(
        base_dim=8,
        decoder_base_dim=12,
        z_dim=64,
        dim_mult=[1, 2, 4, 4, 4],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True, True],
    ).eval()


def write_qwen21_folder(folder: Path, kind: str, seed: int) -> None:
    """Write every component of the tiny `kind` Qwen-Image 2.1 pipeline into `folder` (which must exist)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fastdit.tiny.common import QWEN_IMAGE_SCHEDULER_CONFIG, write_model_index
    from fastdit.tiny.vl import save_vl_processor

    turbo = kind == "qwen-image-2.1-turbo"
    save_vl_processor(
        folder / "processor",
        flavour="qwen3-vl",
        patch_size=QWEN21_PATCH_SIZE,
        merge_size=QWEN21_MERGE_SIZE,
        min_pixels=QWEN21_MIN_PIXELS,
        max_pixels=QWEN21_MAX_PIXELS,
        image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5),
    )
    _text_encoder(seed).save_pretrained(folder / "text_encoder")
    _transformer(seed).save_pretrained(folder / "transformer")
    _vae(seed).save_pretrained(folder / "vae")
    scheduler = dict(QWEN_IMAGE_SCHEDULER_CONFIG, **(QWEN21_TURBO_SCHEDULER_OVERRIDES if turbo else {}))
    FlowMatchEulerDiscreteScheduler(**scheduler).save_pretrained(folder / "scheduler")
    components = {
        "processor": ("transformers", "Qwen3VLProcessor"),
        "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
        "text_encoder": ("transformers", "Qwen3VLForConditionalGeneration"),
        "transformer": ("diffusers", "QwenImage21Transformer2DModel"),
        "vae": ("diffusers", "AutoencoderKLQwenImage21"),
    }
    config = {"sample_sigmas": QWEN21_TURBO_SIGMAS} if turbo else {}
    write_model_index(folder, "QwenImage21Pipeline", components, **config)
