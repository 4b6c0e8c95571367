"""Prompt -> text conditioning for Qwen-Image, using Qwen2.5-VL from transformers as the encoder.

Qwen-Image conditions on the last hidden layer of Qwen2.5-VL run over the prompt wrapped in a
chat template whose system turn asks for a detailed image description. The system turn and the
`<|im_start|>user\\n` header (the first 34 tokens) are dropped from the conditioning; the answer
header `<|im_end|>\\n<|im_start|>assistant\\n` after the prompt is kept. Each prompt keeps exactly its
own tokens: rows are cut to their valid length, then padded again (zeros + False in the mask) to
the longest row of the batch the caller asks for.
"""

from __future__ import annotations

import torch

from fastdit.errors import FastditError

PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
# Tokens of the template before the prompt; they are encoded (they shape the context) but dropped.
TEMPLATE_PREFIX_TOKENS = 34
# Most conditioning tokens (prompt + answer header) per prompt: the reference cuts longer prompts
# at this length; fastdit refuses them instead (see `check_lengths`).
MAX_TEXT_TOKENS = 512


def conditioning_lengths(tokenizer, prompts: list[str]) -> list[int]:
    """Conditioning tokens each prompt yields (its tokens plus the 5-token answer header)."""
    ids = tokenizer([PROMPT_TEMPLATE.format(p) for p in prompts]).input_ids
    return [len(row) - TEMPLATE_PREFIX_TOKENS for row in ids]


def check_lengths(tokenizer, prompts: list[str], what: str = "prompt") -> None:
    """Raise FastditError for a prompt longer than the text conditioning limit."""
    for i, n in enumerate(conditioning_lengths(tokenizer, prompts)):
        if n > MAX_TEXT_TOKENS:
            which = f"{what} {i}" if len(prompts) > 1 else what
            raise FastditError(
                f"{which} is too long: {n} text tokens (with the template's answer header), the limit is "
                f"{MAX_TEXT_TOKENS}; shorten it"
            )


@torch.inference_mode()
def encode_prompts(text_encoder, tokenizer, prompts: list[str], device) -> list[torch.Tensor]:
    """Encode prompts in one batched text-encoder call -> one (L_i, D) tensor per prompt (L_i <= 512)."""
    batch = tokenizer(
        [PROMPT_TEMPLATE.format(p) for p in prompts],
        max_length=MAX_TEXT_TOKENS + TEMPLATE_PREFIX_TOKENS,
        padding=True,
        truncation=True,
        return_tensors="pt",
    ).to(device)
    out = text_encoder(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        output_hidden_states=True,
        logits_to_keep=1,  # only the hidden states are used: skip the (L, vocab) logits
    )
    hidden = out.hidden_states[-1]  # (B, L_pad, D)
    valid = batch.attention_mask.bool()
    return [row[keep][TEMPLATE_PREFIX_TOKENS:] for row, keep in zip(hidden, valid, strict=True)]


def pad_embeds(rows: list[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack variable-length (L_i, D) rows -> (B, L_max, D) zero-padded embeds and a (B, L_max) bool mask."""
    length = max(r.shape[0] for r in rows)
    embeds = rows[0].new_zeros(len(rows), length, rows[0].shape[1], dtype=dtype)
    mask = torch.zeros(len(rows), length, dtype=torch.bool, device=rows[0].device)
    for i, r in enumerate(rows):
        embeds[i, : r.shape[0]] = r
        mask[i, : r.shape[0]] = True
    return embeds, mask
