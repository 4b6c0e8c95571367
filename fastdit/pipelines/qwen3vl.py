"""Prompt and condition images -> text conditioning for Qwen-Image 2.1, with Qwen3-VL from transformers.

Qwen-Image 2.1 conditions on the last decoder layer of Qwen3-VL, BEFORE its final RMSNorm, run over a raw chat
template (not the processor's `apply_chat_template`: the checkpoints were trained on this exact string):

    <|im_start|>system\\nComprehend and analyze the provided prompt.<|im_end|>\\n
    <|im_start|>user\\n[<image1><|vision_start|><|image_pad|><|vision_end|> <image2>...]{prompt}<|im_end|>\\n
    <|im_start|>assistant\\n

The system turn (14 tokens) is encoded but dropped from the conditioning; everything after it is kept, the
condition images' vision slots (`<|image_pad|>`, one per 32 x 32 pixels after the processor's 2 x 2 merge) included:
the DiT puts each image's latent tokens into them. Prompts are encoded in one batched call, left-padded (the
side the checkpoint was trained with), and each row cut to its valid tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

SYSTEM_PROMPT = "Comprehend and analyze the provided prompt."
SYSTEM_TURN = f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
IMAGE_PAD = "<|image_pad|>"
IMAGE_SLOT = f"<|vision_start|>{IMAGE_PAD}<|vision_end|>"


def prompt_text(prompt: str, num_images: int) -> str:
    """The template around `prompt`, with `num_images` condition-image slots before it (none: text-to-image)."""
    images = " ".join(f"<image{i + 1}>{IMAGE_SLOT}" for i in range(num_images))
    return f"{SYSTEM_TURN}<|im_start|>user\n{images}{prompt}<|im_end|>\n<|im_start|>assistant\n"


def system_tokens(tokenizer) -> int:
    """How many leading tokens (the system turn) are dropped from the conditioning."""
    return len(tokenizer(SYSTEM_TURN).input_ids)


class EncodedPrompts(NamedTuple):
    """One row per prompt: `embeds` (T_i, D) the kept hidden states, `slots` (T_i,) bool, True at vision slots."""

    embeds: list[Tensor]
    slots: list[Tensor]


def _language_model(text_encoder):
    model = text_encoder.model
    return getattr(model, "language_model", model)


@torch.inference_mode()
def encode_prompts(text_encoder, processor, prompts: list[str], images: list, device) -> EncodedPrompts:
    """Encode `prompts`, each with every image of `images` (RGB PIL images, already at their encoding size) in its
    slots, in one text-encoder call."""
    batch = {"text": [prompt_text(p, len(images)) for p in prompts], "padding": True, "padding_side": "left"}
    if images:
        batch["images"] = [image for _ in prompts for image in images]
    inputs = processor(**batch, return_tensors="pt").to(device)
    forward = {"input_ids": inputs.input_ids, "attention_mask": inputs.attention_mask}
    if images:
        forward.update(pixel_values=inputs.pixel_values, image_grid_thw=inputs.image_grid_thw)
    if "mm_token_type_ids" in inputs:
        forward["mm_token_type_ids"] = inputs.mm_token_type_ids  # M-RoPE positions for the image tokens
    # The backbone alone (no vocab logits); its final norm is bypassed: the output is the last layer's input to it.
    bypass = _language_model(text_encoder).norm.register_forward_hook(lambda module, args, output: args[0])
    try:
        hidden = text_encoder.model(**forward).last_hidden_state  # (B, L_pad, D)
    finally:
        bypass.remove()
    drop = system_tokens(processor.tokenizer)
    pad_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    embeds, slots = [], []
    for row, ids, valid in zip(hidden, inputs.input_ids, inputs.attention_mask.bool(), strict=True):
        embeds.append(row[valid][drop:])
        slots.append((ids[valid] == pad_id)[drop:])
    return EncodedPrompts(embeds, slots)
