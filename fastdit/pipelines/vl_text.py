"""Prompt + images -> text conditioning for Qwen-Image-Edit, with Qwen2.5-VL (its vision tower too) as the encoder.

The edit pipelines condition on the last hidden layer of Qwen2.5-VL run over a chat template whose system turn
asks to describe the input image and how the instruction changes it; the user turn holds the image(s) as
vision spans followed by the prompt:

- Qwen-Image-Edit (one image): `<|vision_start|><|image_pad|><|vision_end|>{prompt}`;
- Edit-2509 / 2511 (several): `Picture 1: <|vision_start|><|image_pad|><|vision_end|>Picture 2: ...{prompt}`.

The processor (the folder's `Qwen2VLProcessor`) resizes each image to multiples of 28 px and expands its
`<|image_pad|>` to one token per 2x2 group of 14 px patches; the encoder puts the vision tower's features there.
The first 64 tokens (system turn and user header) are dropped from the conditioning, so it starts at the first
vision span (Edit) or at "Picture" (2509 / 2511). The image tokens are part of the text stream the DiT sees.

Positions: every token, image tokens included, gets the plain sequential position in all three multimodal RoPE
sections. That is what the reference pipelines get (they pass no `mm_token_type_ids`, so transformers does not
build Qwen2.5-VL's 3-D image positions); fastdit passes the positions explicitly so nothing else can change them.

All prompts of a call (and their negatives) are encoded in one batched call, right-padded: a row's valid tokens
then sit at the positions they have alone, and each row is cut back to its own length.
"""

from __future__ import annotations

import torch
from PIL import Image

from fastdit.validation import InputError

SYSTEM_PROMPT = (
    "Describe the key features of the input image (color, shape, size, texture, objects, background), then explain "
    "how the user's text instruction should alter or modify the image. Generate a new image that meets the user's "
    "requirements while maintaining consistency with the original input where appropriate."
)
PROMPT_TEMPLATE = (
    "<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
IMAGE_SPAN = "<|vision_start|><|image_pad|><|vision_end|>"
# Tokens of the template before the user content; encoded (they shape the context) but dropped.
TEMPLATE_PREFIX_TOKENS = 64
# Most tokens a prompt may have (without the template and the image tokens): the reference's tokenizer limit.
MAX_PROMPT_TOKENS = 1024


def inline_images(count: int) -> str:
    """Qwen-Image-Edit's user content before the prompt: the image's vision span (one image)."""
    return IMAGE_SPAN * count


def numbered_images(count: int) -> str:
    """Edit-2509 / 2511's user content before the prompt: 'Picture k: <vision span>' for each image."""
    return "".join(f"Picture {k + 1}: {IMAGE_SPAN}" for k in range(count))


def check_prompt_lengths(tokenizer, prompts: list[str], field: str) -> None:
    """InputError naming `field` for a prompt longer than MAX_PROMPT_TOKENS tokens."""
    for i, ids in enumerate(tokenizer(prompts).input_ids):
        if len(ids) > MAX_PROMPT_TOKENS:
            which = f" (entry {i})" if len(prompts) > 1 else ""
            raise InputError(
                field, f"is too long{which}: {len(ids)} tokens, the limit is {MAX_PROMPT_TOKENS}; shorten it"
            )


@torch.inference_mode()
def encode_vl_prompts(
    text_encoder, processor, prompts: list[str], images: list[Image.Image], image_prefix: str, device
) -> list[torch.Tensor]:
    """Encode each prompt with the same `images` (RGB, already at the encoder's size) in one batched call.

    `image_prefix`: the user content before each prompt (`inline_images` / `numbered_images`). Returns one
    (L_i, D) tensor per prompt: its image and prompt tokens and the 5-token answer header.
    """
    texts = [PROMPT_TEMPLATE.format(image_prefix + p) for p in prompts]
    batch = processor(
        text=texts, images=images * len(texts), padding=True, padding_side="right", return_tensors="pt"
    ).to(device)
    n_rows, length = batch.input_ids.shape
    positions = torch.arange(length, device=device).expand(3, n_rows, length)  # (3 RoPE sections, B, L)
    out = text_encoder(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=positions,
        pixel_values=batch.pixel_values,
        image_grid_thw=batch.image_grid_thw,
        output_hidden_states=True,
        logits_to_keep=1,  # only the hidden states are used: skip the (L, vocab) logits
    )
    hidden = out.hidden_states[-1]  # (B, L_pad, D)
    valid = batch.attention_mask.bool()
    return [row[keep][TEMPLATE_PREFIX_TOKENS:] for row, keep in zip(hidden, valid, strict=True)]
