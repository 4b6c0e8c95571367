"""QK RMSNorm + RoPE of both streams in one pass, written straight into the joint [image; text] q and k.

Per block the DiT turns each stream's fused QKV output (B, S_stream, 3 * H * D) into attention operands:
q and k get a per-head RMSNorm (weights per stream), then RoPE, and are joined along the sequence. Written
in torch, inductor makes that one norm + RoPE kernel per stream, and when the result is also quantized to
e4m3 (fp8 attention) it joins the streams with an extra copy. `qk_norm_rope` is one Triton kernel launch per
stream for its q and k: each program reads one token's q or k row from the stream's QKV output, and writes the
normalised, rotated row (bf16, or e4m3 with a given scale) at its place in the joint (2, B, S, H, D) output
(the time saved is in benchmarks/RESULTS.md).

The arithmetic is the torch path's, rounding for rounding: the normalised row is rounded to the
activation dtype before the weight multiply, the product again, the rotation is done in float32 and
rounded once more, and e4m3 is (x / scale) clamped to +-448. The torch path (`reference=True`) runs off
CUDA and is what the kernel is tested against.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdit.kernels.fp8_rows import FP8, to_e4m3

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm over the last dim in float32, rounded to x's dtype, times the weight (in x's dtype)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.to(x.dtype) * weight


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved channel pairs (x[2i], x[2i+1]) of x (B, S, H, D) by tables cos, sin (S, D) (angles
    repeated per pair, the rotation's sign folded into sin; fastdit.models.qwenimage.Rope): (x0, x1) -> (x0 c - x1 s,
    x1 c + x0 s). Computed in float32, returned in x's dtype.

    Written as x * cos + pairswap(x) * sin so that inductor emits one pointwise pass."""
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0, x3, x2, ...)
    return (xf * cos[None, :, None, :] + swapped * sin[None, :, None, :]).to(x.dtype)


def _kernel_runs(x: Tensor, head_dim: int) -> bool:
    """The kernel takes CUDA bf16 / fp16 activations and a power-of-two head_dim (a Triton block dimension)."""
    power_of_two = head_dim >= 2 and head_dim & (head_dim - 1) == 0
    return triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and power_of_two


def qk_norm_rope(
    txt_qkv: Tensor,
    img_qkv: Tensor,
    norms: tuple[Tensor, Tensor, Tensor, Tensor],
    cos: Tensor,
    sin: Tensor,
    eps: float,
    head_dim: int,
    scales: tuple[Tensor, Tensor] | None = None,
    *,
    reference: bool = False,
) -> Tensor:
    """Joint q and k from each stream's fused QKV projection output (B, S_txt / S_img, 3 * H * D), laid out
    [q | k | v] with H heads of `head_dim`: RMSNorm per head (`norms`: the (D,) weights of text q, text k,
    image q, image k), then RoPE with the joint tables `cos`, `sin` (S_img + S_txt, D) float32.

    Returns (2, B, S_img + S_txt, H, D): q then k, in the activations' dtype, or with `scales` (q's and k's
    (1,) float32) as e4m3 x / scale, clamped to +-448. One Triton kernel on CUDA (bf16 / fp16, head_dim a
    power of two), the torch path elsewhere or with `reference=True`."""
    if not reference and _kernel_runs(txt_qkv, head_dim):
        q_scale, k_scale = (None, None) if scales is None else scales
        return _qk_norm_rope_op(txt_qkv, img_qkv, *norms, cos, sin, eps, head_dim, q_scale, k_scale)
    n_img, out = img_qkv.shape[1], []
    for i in range(2):  # q, k
        joint = []
        for qkv, weight, rows in ((img_qkv, norms[2 + i], slice(0, n_img)), (txt_qkv, norms[i], slice(n_img, None))):
            x = qkv.unflatten(-1, (3, -1, head_dim))[:, :, i]  # (B, S_stream, H, D)
            joint.append(apply_rope(rms_norm(x, weight, eps), cos[rows], sin[rows]))
        x = torch.cat(joint, dim=1)
        out.append(x if scales is None else to_e4m3(x, scales[i]))
    return torch.stack(out)


if triton is not None:

    @triton.jit
    def _qk_norm_rope_kernel(
        SRC,
        W_Q,
        W_K,
        COS,
        SIN,
        Q_SCALE,
        K_SCALE,
        OUT,
        rows,
        first,
        seq,
        src_stride_b,
        src_stride_s,
        out_stride_qk,
        eps,
        H: tl.constexpr,
        D: tl.constexpr,
        HB: tl.constexpr,
        QUANTIZE: tl.constexpr,
    ):
        # One program per token of one stream (`rows` tokens per sample, at `first` in the joint sequence),
        # q or k (program_id 1); the whole row of H heads x D in registers, HB = H rounded up to a power of 2.
        # No branches on pointers: Triton then still knows the rows are aligned and loads 16 bytes at a time.
        row = tl.program_id(0)
        is_k = tl.program_id(1)
        b = row // rows
        t = row % rows
        s = first + t  # position in the joint sequence
        act = SRC.dtype.element_ty
        h = tl.arange(0, HB)[:, None]
        d = tl.arange(0, D)[None, :]
        keep = h < H
        offs = h * D + d
        src = SRC + b.to(tl.int64) * src_stride_b + t.to(tl.int64) * src_stride_s + is_k * (H * D)
        x = tl.load(src + offs, mask=keep, other=0.0).to(tl.float32)
        w = tl.where(is_k == 1, tl.load(W_K + d), tl.load(W_Q + d)).to(tl.float32)
        # RMSNorm rounded to the activation dtype, times the weight, rounded again (as RMSNorm.forward).
        r = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)
        x = ((x * r[:, None]).to(act).to(tl.float32) * w).to(act).to(tl.float32)
        # RoPE on (even, odd) channel pairs: (x0, x1) -> (x0 c + x1 s0, x1 c + x0 s1) with the tables' folded
        # signs (s0 = -sin, s1 = +sin).
        x0, x1 = tl.split(tl.reshape(x, (HB, D // 2, 2)))
        c0, c1 = tl.split(tl.reshape(tl.load(COS + s * D + d), (1, D // 2, 2)))
        s0, s1 = tl.split(tl.reshape(tl.load(SIN + s * D + d), (1, D // 2, 2)))
        y = tl.reshape(tl.join(x0 * c0 + x1 * s0, x1 * c1 + x0 * s1), (HB, D)).to(act)
        dst = OUT + is_k.to(tl.int64) * out_stride_qk + (b * seq + s).to(tl.int64) * (H * D) + offs
        if QUANTIZE:
            scale = tl.where(is_k == 1, tl.load(K_SCALE), tl.load(Q_SCALE))
            tl.store(dst, tl.clamp(y.to(tl.float32) / scale, -448.0, 448.0).to(tl.float8e4nv), mask=keep)
        else:
            tl.store(dst, y, mask=keep)

    @torch.library.triton_op("fastdit::qk_norm_rope", mutates_args=())
    def _qk_norm_rope_op(
        txt_qkv: Tensor,
        img_qkv: Tensor,
        w_tq: Tensor,
        w_tk: Tensor,
        w_iq: Tensor,
        w_ik: Tensor,
        cos: Tensor,
        sin: Tensor,
        eps: float,
        head_dim: int,
        q_scale: Tensor | None,
        k_scale: Tensor | None,
    ) -> Tensor:
        kernel = torch.library.wrap_triton(_qk_norm_rope_kernel)
        return _launch(kernel, txt_qkv, img_qkv, (w_tq, w_tk, w_iq, w_ik), cos, sin, eps, head_dim, q_scale, k_scale)


def _launch(kernel, txt_qkv, img_qkv, norms, cos, sin, eps, head_dim, q_scale=None, k_scale=None) -> Tensor:
    """Two launches into one joint output: the image stream's tokens, then the text stream's."""
    b, n_txt, width = txt_qkv.shape
    n_img = img_qkv.shape[1]
    seq = n_img + n_txt
    heads = int(width) // (3 * head_dim)  # a kernel constant: int() specializes a width torch.compile made dynamic
    quantize = q_scale is not None
    out = torch.empty((2, b, seq, heads, head_dim), device=txt_qkv.device, dtype=FP8 if quantize else txt_qkv.dtype)
    cos, sin = cos.contiguous(), sin.contiguous()
    scales = (q_scale, k_scale) if quantize else (cos, cos)  # pointers the kernel does not read then
    for qkv, (w_q, w_k), first in ((img_qkv, norms[2:], 0), (txt_qkv, norms[:2], n_img)):
        if qkv.stride(-1) != 1:
            qkv = qkv.contiguous()
        rows = qkv.shape[1]
        kernel[(b * rows, 2)](
            qkv,
            w_q.contiguous(),
            w_k.contiguous(),
            cos,
            sin,
            *scales,
            out,
            rows,
            first,
            seq,
            qkv.stride(0),
            qkv.stride(1),
            out.stride(0),
            eps,
            H=heads,
            D=head_dim,
            HB=triton.next_power_of_2(heads),
            QUANTIZE=quantize,
            num_warps=4,
        )
    return out
