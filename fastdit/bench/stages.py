"""`fastdit bench --stage text-encoder`: the text encoder at full size, random weights (the VAE: fastdit.bench.vae;
whole images: fastdit.bench.pipeline)."""

from __future__ import annotations

import torch

from fastdit.bench.config import BenchConfig
from fastdit.bench.timing import summarize, time_steps
from fastdit.pipelines.text import TEMPLATE_PREFIX_TOKENS

# Qwen2.5-VL-7B's language model (transformers' Qwen2_5_VLTextConfig keys).
QWEN25_VL_7B_TEXT = {
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "vocab_size": 152064,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
}


def bench_text_encoder(run: BenchConfig, device: torch.device, dtype: torch.dtype) -> dict:
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    if run.preset == "tiny":
        cfg = Qwen2_5_VLTextConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=1024,
            rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        )
    else:
        cfg = Qwen2_5_VLTextConfig(**QWEN25_VL_7B_TEXT)
    with torch.device(device):
        enc = Qwen2_5_VLTextModel(cfg).to(dtype).eval()
    # The prompt template adds its prefix in front of the prompt; cond + uncond are encoded together.
    tokens = run.text_len + TEMPLATE_PREFIX_TOKENS
    ids = torch.randint(0, cfg.vocab_size, (run.batch * 2, tokens), device=device)
    with torch.no_grad():
        times = time_steps(lambda: enc(input_ids=ids).last_hidden_state, device, run.warmup, run.iters)
    return {
        "stage": "text-encoder",
        "shapes": {"batch": run.batch * 2, "tokens": tokens},
        "runs": {"text encoder": summarize(times)},
    }
