"""One attention entry point over (B, S, H, D) tensors, with selectable backends and an SDPA fallback.

Backends:
- "sdpa":  torch's scaled_dot_product_attention with its own kernel choice (works everywhere).
- "cudnn": cuDNN's fused attention through its aten op (the fastest bf16 kernel on Hopper).
- "flash": torch's bundled FlashAttention-2 kernel (no mask support).
- "flash_attn": the `flash_attn` package (FA3's `flash_attn_interface` when installed, else FA2).
- "math":  the reference composition, float32 softmax; the oracle in tests.
- "int8":  fastdit's 8-bit kernel (INT8 Q.K^T with smoothed K, FP8 P.V; fastdit.kernels.attention_int8): Triton and
           compute capability >= 8.9. Approximate (a few percent of relative error per call): opt-in only.
- "fp8":   cuDNN's fp8 attention (e4m3 Q, K, V, P and O with per-tensor scales; fastdit.kernels.attention_fp8):
           Hopper or newer and the cuDNN frontend package. Approximate like int8, faster than bf16: opt-in only.

"auto" picks cudnn on CUDA when no mask is given, sdpa otherwise (never an 8-bit one). Keys that must not be attended to are
given as a (B, S) bool `key_mask`; backends that cannot take a mask fall back to sdpa for that call
(decided at trace time from `key_mask is None`, so it never breaks a compiled graph).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdit.errors import FastditError
from fastdit.kernels.attention_fp8 import (
    Fp8Scales,
    attention_fp8,
    check_fp8_attention_device,
    dequantize,
    missing_fp8_attention,
)
from fastdit.kernels.attention_int8 import attention_int8, check_int8_attention_device, int8_attention_available

BACKENDS = ("auto", "sdpa", "cudnn", "flash", "flash_attn", "math", "int8", "fp8")
# The opt-in 8-bit backends: each check raises FastditError with what the device lacks.
_CHECK_8BIT = {"int8": check_int8_attention_device, "fp8": check_fp8_attention_device}


def _flash_attn_func():
    try:
        from flash_attn_interface import flash_attn_func  # FA3 (Hopper)

        return flash_attn_func
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_func

        return flash_attn_func
    except ImportError:
        return None


def available_backends(device: torch.device | str) -> list[str]:
    device = torch.device(device)
    out = ["sdpa", "math"]
    if device.type == "cuda":
        out += ["flash"]
        if torch.backends.cudnn.is_available():
            out += ["cudnn"]
        if _flash_attn_func() is not None:
            out += ["flash_attn"]
        if int8_attention_available(device):
            out += ["int8"]
        if missing_fp8_attention(device) is None:
            out += ["fp8"]
    return out


def resolve_backend(name: str, device: torch.device | str) -> str:
    if name not in BACKENDS:
        raise FastditError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKENDS)}")
    device = torch.device(device)
    if name == "auto":
        return "cudnn" if "cudnn" in available_backends(device) else "sdpa"
    if name in _CHECK_8BIT:
        _CHECK_8BIT[name](device)  # FastditError saying what is missing
        return name
    if name not in available_backends(device):
        raise FastditError(
            f"attention backend {name!r} is not available on {device}; available: "
            f"{', '.join(available_backends(device))}"
        )
    return name


def math_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> Tensor:
    """(B, S, H, D) reference: float32 scores and softmax."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.float()).to(q.dtype)


def _unpadded_per_sample(
    q, k, v, backend: str, txt_lens: tuple[int, ...], num_txt: int, fp8: Fp8Scales | None = None
) -> Tensor:
    """Key padding without a mask: sample b attends over all image keys and its L_b valid text keys, one
    unmasked call each. The text is last in the joint sequence and padded at its end, so those keys are a
    prefix: views, no copies. Exact (masked keys get zero weight either way) and faster than one masked call
    (benchmarks/RESULTS.md)."""
    n_img = k.shape[1] - num_txt
    if backend == "fp8":  # one op: each sample writes its part of the sequence-major output (no stacking copy)
        return attention_fp8(q, k, v, fp8, kv_lens=[n_img + n for n in txt_lens])
    outs = []
    for b, n in enumerate(txt_lens):
        outs.append(attention(q[b : b + 1], k[b : b + 1, : n_img + n], v[b : b + 1, : n_img + n], None, backend))
    return torch.cat(outs, dim=0)


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_mask: Tensor | None = None,
    backend: str = "sdpa",
    txt_lens: tuple[int, ...] | None = None,
    num_txt: int = 0,
    fp8: Fp8Scales | None = None,
) -> Tensor:
    """q, k, v (B, S, H, D) -> (B, S, H, D). `backend` must already be resolved (not "auto").

    `txt_lens` (host ints, one per sample) says that the only masked keys are text padding: sample b's
    keys [S - num_txt + txt_lens[b], S) of the [image; text] sequence. Then `key_mask` is not needed and each
    sample runs unmasked (see `_unpadded_per_sample`). `fp8`: q, k, v are already e4m3 with these scales
    (backend "fp8" only; fastdit.kernels.attention_fp8.quantize_qkv).
    """
    if txt_lens is not None:
        return _unpadded_per_sample(q, k, v, backend, txt_lens, num_txt, fp8)
    if backend == "math":
        return math_attention(q, k, v, key_mask)
    if backend == "int8":
        return attention_int8(q, k, v, key_mask)
    if backend == "fp8" and key_mask is None:
        return attention_fp8(q, k, v, fp8)
    if fp8 is not None:  # a masked call: the exact fallback below on the dequantized operands
        q, k, v = dequantize(q, k, v, fp8)
    if q.dtype not in (torch.float16, torch.bfloat16):  # the cuDNN and flash kernels are half-precision only
        backend = "sdpa"
    if backend == "flash_attn" and key_mask is None:
        return _flash_attn_func()(q, k, v)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S, D)
    if backend == "cudnn" and key_mask is None:
        out = torch.ops.aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, False, 0.0, False, False)[0]
    elif backend == "flash" and key_mask is None:
        out = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt)[0]
    else:
        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, S)
        out = F.scaled_dot_product_attention(qt, kt, vt, mask)
    return out.transpose(1, 2)
