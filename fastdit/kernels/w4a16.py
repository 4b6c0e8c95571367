"""Weight-only int4 (W4A16) GEMM: y = x @ W.T + b with W stored as group-wise asymmetric int4.

Format (one row of W, `K` values, in groups of `GROUP` = 128 along K; 64 or 32 for layers whose K 128 does not
divide, as in tiny test models): q in [0, 15] and per group a scale and an offset in the compute dtype, with
W ~= q * scale + offset. Two values share a byte: within each group, byte j holds element j in its low nibble and
element j + GROUP / 2 in its high nibble. So a group is GROUP / 2 contiguous bytes whose low nibbles are the
group's first half and high nibbles its second half: a kernel that takes one group per K step unpacks it with a
mask and a shift (no interleaving) and runs two dots against the two contiguous halves of x. Shapes: `qweight`
(N, K / 2) uint8, `scale` and `offset` (N, K / GROUP); the group size follows from them.

`w4a16_linear(x, qweight, scale, offset, bias, gelu=False)` runs the Triton kernel on CUDA (a `torch.library`
op, so torch.compile keeps it whole: no graph break) and `w4a16_reference` elsewhere: the same dequantization in
float32, rounded to the compute dtype, then one GEMM. Compiled on CUDA, the reference becomes one fused
dequantization kernel plus cuBLAS, the other way to run int4 on a GPU (`Int4Linear.kernel`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdit.errors import FastditError

GROUP = 128
GROUPS = (128, 64, 32)  # the largest that divides K

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def group_size(k: int) -> int:
    """The group size of a layer with `k` input features; FastditError if none of GROUPS divides it."""
    for group in GROUPS:
        if k % group == 0:
            return group
    raise FastditError(f"int4 weights need in_features divisible by {GROUPS[-1]}, got {k}")


def quantize_int4(weight: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(N, K) float weight -> (qweight (N, K / 2) uint8, scale (N, K / G), offset (N, K / G)) in `dtype`, G the
    `group_size`.

    Min-max per group: offset = min, scale = (max - min) / 15; q is rounded against the scale and offset as stored
    in `dtype`, so the error is that of the stored values."""
    n, k = weight.shape
    group = group_size(k)
    half = group // 2
    w = weight.detach().float().reshape(n, k // group, group)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=torch.finfo(dtype).tiny).to(dtype)
    offset = lo.to(dtype)
    q = ((w - offset.float()[..., None]) / scale.float()[..., None]).round().clamp(0, 15).to(torch.uint8)
    packed = q[..., :half] | (q[..., half:] << 4)  # (N, K / G, G / 2)
    return packed.reshape(n, k // 2), scale, offset


def dequantize_int4(qweight: Tensor, scale: Tensor, offset: Tensor, dtype: torch.dtype) -> Tensor:
    """The (N, K) weight in `dtype`: q * scale + offset in float32, then rounded once."""
    n, groups = scale.shape
    group = 2 * qweight.shape[1] // groups
    b = qweight.reshape(n, groups, group // 2)
    q = torch.cat([b & 15, b >> 4], dim=-1)  # (N, K / G, G)
    w = q.float() * scale.float()[..., None] + offset.float()[..., None]
    return w.reshape(n, groups * group).to(dtype)


def w4a16_reference(x: Tensor, qweight: Tensor, scale: Tensor, offset: Tensor, bias: Tensor | None, gelu=False):
    """The torch path: dequantize, then one GEMM (with the GELU(tanh) after it when asked)."""
    y = F.linear(x, dequantize_int4(qweight, scale, offset, x.dtype), bias)
    return F.gelu(y, approximate="tanh") if gelu else y


def _launch(kernel, x: Tensor, qweight: Tensor, scale: Tensor, offset: Tensor, bias, gelu: bool, **meta) -> Tensor:
    """Run `kernel` (the autotuned kernel, its torch.library wrapper, or `_w4a16_kernel.fn` with `meta` fixing the
    block sizes for the interpreter) over x (..., K)."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    m, n = x2.shape[0], qweight.shape[0]
    y = torch.empty((m, n), device=x.device, dtype=x.dtype)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    kernel[grid](
        x2, qweight, scale, offset, bias if bias is not None else scale, y, m, n, k, x2.stride(0),
        GROUP=k // scale.shape[1], HAS_BIAS=bias is not None, GELU=gelu, **meta,
    )  # fmt: skip
    return y.reshape(*x.shape[:-1], n)


if triton is not None:
    _CONFIGS = [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8}, num_warps=w, num_stages=st)
        for bm, bn, w, st in [
            (128, 128, 8, 3),
            (128, 256, 8, 3),
            (128, 128, 4, 4),
            (64, 128, 4, 4),
            (128, 64, 4, 4),
            (64, 64, 4, 4),
            (32, 128, 4, 4),
            (16, 128, 4, 4),
            (16, 64, 4, 5),
        ]
    ]

    @triton.jit
    def _w4a16_kernel_body(
        X, QW, S, OFF, B, Y, M, N, K, stride_xm,
        GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
    ):  # fmt: skip
        # Programs in GROUP_M-tall columns of output tiles, so consecutive programs share weight tiles in L2.
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        rows = tl.minimum(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % per_group) % rows
        pid_n = (pid % per_group) // rows

        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        HALF: tl.constexpr = GROUP // 2
        rk = tl.arange(0, HALF)
        m_ok = rm < M
        n_ok = rn < N
        groups = K // GROUP
        x_ptrs = X + rm[:, None].to(tl.int64) * stride_xm + rk[None, :]
        q_ptrs = QW + rn[:, None].to(tl.int64) * (K // 2) + rk[None, :]
        s_ptrs = S + rn.to(tl.int64) * groups
        o_ptrs = OFF + rn.to(tl.int64) * groups
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for g in range(0, groups):
            x_lo = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)  # (BLOCK_M, HALF): the group's first half
            x_hi = tl.load(x_ptrs + HALF, mask=m_ok[:, None], other=0.0)
            q = tl.load(q_ptrs, mask=n_ok[:, None], other=0)  # (BLOCK_N, HALF) bytes of the group
            s = tl.load(s_ptrs + g, mask=n_ok, other=0.0).to(tl.float32)
            o = tl.load(o_ptrs + g, mask=n_ok, other=0.0).to(tl.float32)
            w_lo = ((q & 15).to(tl.float32) * s[:, None] + o[:, None]).to(x_lo.dtype)
            w_hi = ((q >> 4).to(tl.float32) * s[:, None] + o[:, None]).to(x_lo.dtype)
            acc = tl.dot(x_lo, tl.trans(w_lo), acc)
            acc = tl.dot(x_hi, tl.trans(w_hi), acc)
            x_ptrs += GROUP
            q_ptrs += HALF
        if HAS_BIAS:
            acc += tl.load(B + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if GELU:  # GELU(tanh): x * sigmoid(2u), u = sqrt(2 / pi) (x + 0.044715 x^3)
            acc = acc * tl.sigmoid(2.0 * (0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)))
        y_ptrs = Y + rm[:, None].to(tl.int64) * N + rn[None, :]
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    _w4a16_kernel = triton.autotune(_CONFIGS, key=["M", "N", "K", "GROUP", "HAS_BIAS", "GELU"])(_w4a16_kernel_body)

    @torch.library.triton_op("fastdit::w4a16_linear", mutates_args=())
    def _w4a16_op(x: Tensor, qweight: Tensor, scale: Tensor, offset: Tensor, bias: Tensor | None, gelu: bool) -> Tensor:
        return _launch(torch.library.wrap_triton(_w4a16_kernel), x, qweight, scale, offset, bias, gelu)


def triton_available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


def w4a16_linear(
    x: Tensor, qweight: Tensor, scale: Tensor, offset: Tensor, bias: Tensor | None, gelu: bool = False
) -> Tensor:
    """(..., K) x -> (..., N): the Triton kernel on CUDA (bf16 / fp16 x), else `w4a16_reference`."""
    if triton_available(x.device) and x.dtype in (torch.bfloat16, torch.float16) and x.numel() > 0:
        return _w4a16_op(x, qweight, scale, offset, bias, gelu)
    return w4a16_reference(x, qweight, scale, offset, bias, gelu)
