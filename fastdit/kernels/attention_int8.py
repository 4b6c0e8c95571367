"""8-bit attention: INT8 Q.K^T with smoothed K and per-block scales, FP8 (e4m3) P.V, float32 softmax.

The scheme (published as SageAttention / SageAttention2) and why each step is there:

- K minus its mean over the sequence. q.(k - c) = q.k - q.c shifts every score of a query row by the
  same amount, which softmax ignores; removing the mean removes the channel-wise bias that the keys of
  a DiT share, so the int8 grid spans the part of K that actually differs between tokens.
- Q and K in int8 with one scale per 128 tokens per head (symmetric, round to nearest), the softmax
  scale and log2(e) folded into Q's scale so the kernel works in base 2.
- P (the unnormalised probabilities, in [0, 1]) times 448 in e4m3, V in e4m3 with one scale per
  channel per head; the P.V products accumulate in float32.

So the kernel runs both GEMMs at Hopper's 8-bit tensor-core rate. The quantization pre-pass
(`quantize_qkv`) is plain torch so that, inside a compiled block, inductor fuses it with the QK-norm /
RoPE that produces q and k (and with the [image; text] concatenation).

`attention_int8(q, k, v, key_mask)` takes and returns (B, S, H, D) like fastdit.kernels.attention. Needs Triton
and a GPU with fp8 tensor cores (compute capability >= 8.9). `reference_int8` is the same arithmetic in
torch (float32 matmuls on the quantized values) for tests and for error estimates on any device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdit.errors import FastditError
from fastdit.kernels.fp8_rows import FP8, FP8_MAX, MIN_AMAX, missing_fp8_tensor_cores

QUANT_BLOCK = 128  # tokens per Q / K scale; the kernel's BLOCK_M and BLOCK_N divide it
# Elements of one sample's (S_pad, H, D) slab. Offsets inside a slab are 32-bit, so it must stay below 2**31
# (a 2048x2048 image: 16896 tokens x 24 heads x 128 = 5.2e7); the batch offset on top is 64-bit (`_bh_offset`).
MAX_SLAB = 2**31
P_SCALE = FP8_MAX  # P in [0, 1] is stored as P * 448 in e4m3 (largest finite e4m3), far from subnormals
LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------------------------------------
# Quantization (torch; fused by inductor when compiled)


def quantize_qkv(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_mask: Tensor | None = None,
    sm_scale: float | None = None,
    pv_fp8: bool = True,
):
    """(B, S, H, D) q, k, v -> int8 / fp8 operands padded to a multiple of QUANT_BLOCK tokens:

    q8, k8: (B, Sp, H, D) int8; q_scale, k_scale: (B, H, Sp / QUANT_BLOCK) float32;
    vt8: (B, H, D, Sp) e4m3 (V transposed: the fp8 tensor-core GEMM wants the reduction dim contiguous);
    v_scale: (B, H, D) float32. Padded tokens are zero, and so are keys and values that `key_mask` (B, S)
    masks: they get no attention weight, so they must not widen the int8 / fp8 scales or shift K's mean.
    """
    b, s, h, d = q.shape
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    pad = -s % QUANT_BLOCK
    nblk = (s + pad) // QUANT_BLOCK

    def blockwise_int8(x: Tensor) -> tuple[Tensor, Tensor]:
        x = F.pad(x, (0, 0, 0, 0, 0, pad)).unflatten(1, (nblk, QUANT_BLOCK))  # (B, nblk, 128, H, D)
        scale = x.abs().amax(dim=(2, 4), keepdim=True).clamp(min=MIN_AMAX) / 127.0
        x8 = (x / scale).round().clamp(-127, 127).to(torch.int8).flatten(1, 2)
        return x8, scale.squeeze(4).squeeze(2).transpose(1, 2).contiguous()  # (B, H, nblk)

    q8, q_scale = blockwise_int8(q.float() * (sm_scale * LOG2E))
    kf = k.float()
    if key_mask is None:
        k_mean = kf.mean(dim=1, keepdim=True)
    else:
        keep = key_mask[:, :, None, None]
        kf, v = kf * keep, v * keep
        k_mean = kf.sum(dim=1, keepdim=True) / keep.sum(dim=1, keepdim=True).clamp(min=1)
    k8, k_scale = blockwise_int8((kf - k_mean) if key_mask is None else (kf - k_mean) * keep)
    if not pv_fp8:  # V as given (bf16), a (B, H, D, Sp) view of the padded (B, Sp, H, D) tensor
        vt = F.pad(v.to(torch.bfloat16), (0, 0, 0, 0, 0, pad)).permute(0, 2, 3, 1)
        return q8, k8, vt, q_scale, k_scale, torch.ones(b, h, d, device=v.device)
    vf = v.float()
    v_scale = vf.abs().amax(dim=1).clamp(min=MIN_AMAX) / FP8_MAX  # (B, H, D)
    vt8 = F.pad((vf / v_scale[:, None]).to(FP8).permute(0, 2, 3, 1), (0, pad)).contiguous()  # (B, H, D, Sp)
    return q8, k8, vt8, q_scale, k_scale, v_scale


def reference_int8(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None, pv_fp8: bool = True) -> Tensor:
    """The kernel's arithmetic with float32 matmuls on the quantized values (any device). P is rounded to
    e4m3 against the row's final maximum here, against the running maximum in the kernel: the two agree
    to e4m3 rounding, not bit for bit."""
    b, s, h, d = q.shape
    q8, k8, vt8, q_scale, k_scale, v_scale = quantize_qkv(q, k, v, key_mask, pv_fp8=pv_fp8)
    p_scale = P_SCALE if pv_fp8 else 1.0
    qs = q_scale.repeat_interleave(QUANT_BLOCK, dim=2)  # (B, H, Sp)
    ks = k_scale.repeat_interleave(QUANT_BLOCK, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q8.float(), k8.float()) * qs[..., :, None] * ks[..., None, :]
    valid = torch.arange(scores.shape[-1], device=q.device) < s
    if key_mask is not None:
        valid = valid & F.pad(key_mask, (0, scores.shape[-1] - s))[:, None, None, :]
    scores = scores.masked_fill(~valid, float("-inf"))
    p = torch.exp2(scores - scores.amax(-1, keepdim=True))  # (B, H, Sp, Sp)
    row_sum = p.sum(-1, keepdim=True)
    p8 = (p * p_scale).to(vt8.dtype).float()
    out = torch.einsum("bhqk,bhdk->bqhd", p8, vt8.float()) / (row_sum.transpose(1, 2) * p_scale)
    return (out * v_scale[:, None]).to(q.dtype)[:, :s]


# ---------------------------------------------------------------------------------------------------------
# Kernel


def int8_attention_available(device: torch.device | str) -> bool:
    try:
        check_int8_attention_device(device)
    except FastditError:
        return False
    return True


def check_int8_attention_device(device: torch.device | str) -> None:
    """Raise FastditError unless the 8-bit kernel can run on `device`."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise FastditError(f"8-bit attention runs on CUDA GPUs (compute capability >= 8.9), not on {device}")
    if problem := missing_fp8_tensor_cores(device):
        raise FastditError(f"8-bit attention needs fp8 tensor cores: {problem}")
    if triton is None:
        raise FastditError("8-bit attention needs Triton (pip install triton)")


try:
    import triton
    import triton.language as tl
except ImportError:  # the op is then unavailable; check_int8_attention_device says why
    triton = None


def _launch(kernel, q8, k8, vt8, q_scale, k_scale, v_scale, key_mask, seq_len: int, **meta) -> Tensor:
    """Run `kernel` (the autotuned Triton kernel, or its torch.library wrapper) over the quantized operands;
    `meta` fixes BLOCK_M / BLOCK_N / num_warps when calling the untuned kernel (`_attn_fwd.fn`)."""
    b, sp, h, d = q8.shape
    out = torch.empty((b, seq_len, h, d), device=q8.device, dtype=torch.bfloat16)
    mask = key_mask if key_mask is not None else q_scale  # any pointer; never read without a mask

    def grid(meta):
        return (triton.cdiv(seq_len, meta["BLOCK_M"]), b * h)

    kernel[grid](
        q8, k8, vt8, q_scale, k_scale, v_scale, mask, out,
        q8.stride(0), q8.stride(1), q8.stride(2),
        k8.stride(0), k8.stride(1), k8.stride(2),
        vt8.stride(0), vt8.stride(1), vt8.stride(2), vt8.stride(3),
        out.stride(0), out.stride(1), out.stride(2),
        h, seq_len, seq_len, sp, sp // QUANT_BLOCK, sp // QUANT_BLOCK,
        HEAD_DIM=d, QBLOCK=QUANT_BLOCK, HAS_MASK=key_mask is not None, EVEN_KV=seq_len == sp,
        P_SCALE=P_SCALE if vt8.dtype == FP8 else 1.0, **meta,
    )  # fmt: skip
    return out


if triton is not None:

    @triton.jit
    def _bh_offset(b, h, stride_b, stride_h):
        """Offset of (sample b, head h) in 64 bits: b * stride_b passes 2**31 from a batch of 42 at 2048x2048
        (CFG doubles the batch), where 32-bit arithmetic would wrap to another sample's memory."""
        return b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h

    _CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
        for bm, bn, w, st in [
            (128, 128, 8, 3),
            (128, 64, 8, 3),
            (128, 128, 8, 2),
            (64, 128, 4, 3),
            (128, 64, 4, 3),
            (128, 64, 4, 4),
            (128, 32, 4, 4),
            (64, 64, 4, 4),
        ]
    ]

    @triton.autotune(_CONFIGS, key=["HEAD_DIM", "HAS_MASK", "EVEN_KV", "P_SCALE"])
    @triton.jit
    def _attn_fwd(
        Q, K, VT, QS, KS, VS, MASK, OUT,
        stride_qb, stride_qs, stride_qh,
        stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vh, stride_vd, stride_vn,
        stride_ob, stride_os, stride_oh,
        H, S_Q, S_KV, S_PAD, N_QBLK, N_KBLK,
        HEAD_DIM: tl.constexpr, QBLOCK: tl.constexpr, HAS_MASK: tl.constexpr, EVEN_KV: tl.constexpr,
        P_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        # One program: BLOCK_M queries of one (batch, head) against all keys.
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)

        q = tl.load(Q + _bh_offset(b, h, stride_qb, stride_qh) + offs_m[:, None] * stride_qs + offs_d[None, :])
        q_scale = tl.load(QS + pid_bh * N_QBLK + (pid_m * BLOCK_M) // QBLOCK)
        k_ptrs = K + _bh_offset(b, h, stride_kb, stride_kh) + offs_n[:, None] * stride_ks + offs_d[None, :]
        v_ptrs = VT + _bh_offset(b, h, stride_vb, stride_vh) + offs_d[:, None] * stride_vd + offs_n[None, :] * stride_vn

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        for start in range(0, S_PAD, BLOCK_N):
            k = tl.load(k_ptrs)  # (BLOCK_N, D) int8
            k_scale = tl.load(KS + pid_bh * N_KBLK + start // QBLOCK)
            s = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32) * (q_scale * k_scale)  # log2 units
            if HAS_MASK:
                keep = tl.load(MASK + b * S_KV + start + offs_n, mask=start + offs_n < S_KV, other=0)
                s = tl.where(keep[None, :] != 0, s, float("-inf"))
            elif not EVEN_KV:
                s = tl.where((start + offs_n)[None, :] < S_KV, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
            if HAS_MASK:  # while every key so far is masked, m stays -inf: subtract 0 instead (no inf - inf)
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_use[:, None])
            alpha = tl.math.exp2(m_i - m_use)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptrs)  # (D, BLOCK_N) e4m3 (or bf16)
            acc = tl.dot((p * P_SCALE).to(v.dtype), tl.trans(v), acc * alpha[:, None])
            m_i = m_new
            k_ptrs += BLOCK_N * stride_ks
            v_ptrs += BLOCK_N * stride_vn

        v_scale = tl.load(VS + pid_bh * HEAD_DIM + offs_d)
        out = acc * (v_scale[None, :] / (l_i[:, None] * P_SCALE))
        o_ptrs = OUT + _bh_offset(b, h, stride_ob, stride_oh) + offs_m[:, None] * stride_os + offs_d[None, :]
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=offs_m[:, None] < S_Q)

    @torch.library.triton_op("fastdit::attention_int8", mutates_args=())
    def _attention_int8_op(
        q8: Tensor,
        k8: Tensor,
        vt8: Tensor,
        q_scale: Tensor,
        k_scale: Tensor,
        v_scale: Tensor,
        key_mask: Tensor | None,
        seq_len: int,
    ) -> Tensor:
        kernel = torch.library.wrap_triton(_attn_fwd)
        return _launch(kernel, q8, k8, vt8, q_scale, k_scale, v_scale, key_mask, seq_len)


def check_slab(s: int, h: int, d: int) -> None:
    """One sample's padded (S, H, D) must have fewer than MAX_SLAB elements (the kernel's 32-bit in-slab offsets)."""
    padded = s + (-s % QUANT_BLOCK)
    if padded * h * d >= MAX_SLAB:
        raise FastditError(
            f"8-bit attention supports fewer than 2**31 elements per sample; {padded} tokens x {h} heads x {d} is "
            "more: use another --attention backend"
        )


def attention_int8(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None, pv_fp8: bool = True) -> Tensor:
    """(B, S, H, D) bf16 q, k, v (+ optional (B, S) bool key mask) -> (B, S, H, D) bf16."""
    if triton is None:
        raise FastditError("8-bit attention needs Triton (pip install triton)")
    _, s, h, d = q.shape
    if d not in (64, 128, 256):
        raise FastditError(f"8-bit attention supports head dims 64, 128 and 256, got {d}")
    check_slab(s, h, d)
    q8, k8, vt8, q_scale, k_scale, v_scale = quantize_qkv(q, k, v, key_mask, pv_fp8=pv_fp8)
    mask = None if key_mask is None else key_mask.to(torch.int8).contiguous()
    out = _attention_int8_op(q8, k8, vt8, q_scale, k_scale, v_scale, mask, q.shape[1])
    return out.to(q.dtype)
