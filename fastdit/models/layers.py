"""Layers shared by fastdit's DiTs, and the one interface every linear layer of a block implements.

A block's linear layers may be plain (`Linear`), tensor-parallel (fastdit.parallel) or fp8 (fastdit.quant);
the blocks call them only through the `LinearLayer` entry points below, so the model file holds no branch on
the layer kind. Each kind says, by two class attributes, which fusions it performs itself:

- `fuses_gelu_input`: `forward_gelu_input(h)` applies GELU inside its own input pass (fp8: inside the per-row
  quantization), so an MLP should hand it fc1's raw output rather than GELU it first;
- `takes_e4m3`: `forward_e4m3(x8, scale)` consumes an e4m3 input (the fp8 attention's output) without a
  dequantize pass, so the attention may leave its output in e4m3.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdit.kernels.attention import attention, resolve_backend
from fastdit.kernels.attention_fp8 import Fp8Scales, fp8_scale, quantize_tensor, rms_norm_bound
from fastdit.kernels.qk_norm_rope import rms_norm


class LinearLayer(Protocol):
    """What a block needs of a linear layer (plain, tensor-parallel or fp8): (..., in) -> (..., out)."""

    fuses_gelu_input: bool
    takes_e4m3: bool
    partial_sum_group: object | None
    gathers_output: bool

    def __call__(self, x: Tensor) -> Tensor: ...

    def forward_gelu(self, x: Tensor) -> Tensor:
        """GELU(tanh)(linear(x))."""

    def forward_gelu_input(self, h: Tensor) -> Tensor:
        """linear(GELU(tanh)(h))."""

    def forward_e4m3(self, x8: Tensor, scale: Tensor) -> Tensor:
        """linear(x8 * scale) for an e4m3 x8 with one float32 scale."""


def linear_gelu(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """GELU(tanh)(x @ weight.T + bias). On CUDA the GELU runs in the GEMM's epilogue (cuBLASLt), which saves a
    write and a read of the 4x-wide hidden activations."""
    if x.is_cuda and bias is not None:
        out = torch._addmm_activation(bias, x.flatten(0, -2), weight.t(), use_gelu=True)
        return out.unflatten(0, x.shape[:-1])
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


class Linear(nn.Linear):
    """nn.Linear with the `LinearLayer` entry points (float weights: no fusion of its own)."""

    fuses_gelu_input = False
    takes_e4m3 = False
    # How a tensor-parallel subclass is split (fastdit.parallel.layers): a row-parallel layer's GEMM gives partial
    # sums that are all-reduced over this group before the bias; a gathering column-parallel layer all-gathers.
    partial_sum_group = None
    gathers_output = False
    world = 1

    def forward_gelu(self, x: Tensor) -> Tensor:
        return linear_gelu(x, self.weight, self.bias)

    def forward_gelu_input(self, h: Tensor) -> Tensor:
        return self(F.gelu(h, approximate="tanh"))

    def forward_e4m3(self, x8: Tensor, scale: Tensor) -> Tensor:
        return self((x8.float() * scale).to(self.weight.dtype))


# ---------------------------------------------------------------------------------------------------------
# AdaLN modulation. With `zero_cond_t` (Qwen-Image-Edit-2511) the image stream holds two kinds of tokens: the
# target's, modulated at the step's t, and the reference images', modulated at t = 0. A per-token bool `index`
# (1, S, 1), True for reference tokens, picks between the two vectors; without it nothing is selected.


class ModulationOut(NamedTuple):
    shift: Tensor  # (B, 1, dim)
    scale: Tensor
    gate: Tensor


class Modulation(nn.Module):
    """SiLU -> Linear(dim, 6*dim): (shift, scale, gate) for the attention half and for the MLP half."""

    def __init__(self, dim: int):
        super().__init__()
        self.lin = Linear(dim, 6 * dim)

    def forward(self, temb: Tensor) -> tuple[ModulationOut, ModulationOut]:
        return self.split(self.lin(F.silu(temb)))

    @staticmethod
    def split(vec: Tensor) -> tuple[ModulationOut, ModulationOut]:
        """(B, 6 * dim) -> 6 x (B, 1, dim), in the checkpoint's order: the attention half, the MLP half."""
        shift1, scale1, gate1, shift2, scale2, gate2 = vec[:, None, :].chunk(6, dim=-1)
        return ModulationOut(shift1, scale1, gate1), ModulationOut(shift2, scale2, gate2)


def per_token(index: Tensor | None, vec: Tensor, ref: Tensor | None) -> Tensor:
    """`vec` (B, 1, dim), or with a token `index` (1, S, 1) each token's vector: `ref`'s (1, 1, dim) where index is
    True. Compiled, the select fuses into the kernel that reads the vector (no (B, S, dim) tensor is stored); eager,
    it is one more pass."""
    return vec if index is None else torch.where(index, ref, vec)


def modulate(
    x: Tensor, mod: ModulationOut, eps: float, ref: ModulationOut | None = None, index: Tensor | None = None
) -> Tensor:
    """LayerNorm without affine, then x * (1 + scale) + shift; per token from `mod` or `ref` with an `index`."""
    scale = per_token(index, mod.scale, None if ref is None else ref.scale)
    shift = per_token(index, mod.shift, None if ref is None else ref.shift)
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale) + shift


class Residual(NamedTuple):
    """A residual stream x + gate * update whose last update is not added yet: x, update (B, S, dim), gate
    (B, 1, dim). A block hands its MLP update to the next block (or the final layer) this way, which adds it
    in its first kernel, the LayerNorm + modulation pass that reads x anyway: at each block boundary the
    stream is read and written once instead of twice. `ref_gate` (1, 1, dim): the reference tokens' gate,
    applied where the token index is True (zero_cond_t); None without reference tokens."""

    x: Tensor
    gate: Tensor
    update: Tensor
    ref_gate: Tensor | None = None

    @classmethod
    def start(cls, x: Tensor, gate_rows: int, ref_table: Tensor | None = None) -> Residual:
        """x with nothing pending: a zero update, and zero gates shaped and strided like the gates blocks hand
        over ((gate_rows, 1, dim) out of a (gate_rows, 6 * dim) modulation vector; the reference gate out of one
        layer's row of `ref_table` (num_layers, 1, 6 * dim), given with reference tokens), so that one compiled
        graph serves every block."""
        gate = Modulation.split(x.new_zeros(gate_rows, 6 * x.shape[-1]))[1].gate
        ref = None if ref_table is None else Modulation.split(torch.zeros_like(ref_table)[0])[1].gate
        return cls(x, gate, torch.zeros_like(x), ref)

    def total(self, index: Tensor | None = None) -> Tensor:
        return self.x + per_token(index, self.gate, self.ref_gate) * self.update


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class Rope(NamedTuple):
    """RoPE tables over a sequence, each (S, head_dim), float32.

    Full width with each pair's angle repeated (c0, c0, c1, c1, ...), and the rotation's sign folded into
    sin (-s0, s0, -s1, s1, ...), so applying it is two fused multiply-adds per element (fastdit.kernels.qk_norm_rope).
    """

    cos: Tensor
    sin: Tensor


def axis_freqs(dim: int, theta: float, device=None) -> Tensor:
    """(dim // 2,) inverse frequencies of one RoPE axis; float32 like the reference checkpoints were trained with."""
    return 1.0 / torch.pow(theta, torch.arange(0, dim, 2, device=device, dtype=torch.float32).div(dim))


def rope_from_positions(pos: Tensor, axes_dims: tuple[int, ...], theta: float) -> Rope:
    """(S, n_axes) positions -> interleaved-pair RoPE tables; the axes' pairs are concatenated in order."""
    pos = pos.to(torch.float32)
    angles = torch.cat(
        [pos[:, a : a + 1] * axis_freqs(d, theta, pos.device)[None, :] for a, d in enumerate(axes_dims)], dim=1
    )
    cos, sin = torch.cos(angles), torch.sin(angles)  # (S, head_dim // 2)
    sign = torch.tensor([-1.0, 1.0], device=pos.device).repeat(cos.shape[1])
    return Rope(cos.repeat_interleave(2, dim=1), sin.repeat_interleave(2, dim=1) * sign)


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of sigma in [0, 1] (scaled by 1000): (B,) -> (B, dim) float32, [cos | sin]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None, :] * 1000.0  # this rounding order matches the checkpoints' code
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Attention(nn.Module):
    """Attention core over already-projected heads: q, k, v (B, S, H, D) -> (B, S, H, D).

    `key_mask` (B, S) bool marks keys that may be attended to (None: all). `num_txt` is the number of text
    tokens at the end of the sequence; the single-device core uses it only with `txt_lens`, the sequence-parallel
    core (fastdit.parallel) needs it to split text from image tokens. `txt_lens` (host ints, optional) says the
    mask is text padding only, so attention can run unmasked per sample (fastdit.kernels.attention). `backend`
    is one of fastdit.kernels.attention.BACKENDS, resolved for the device (see `set_attention_backend`).
    `fp8`: q, k, v are e4m3 with these scales (fastdit.kernels.attention_fp8; backend "fp8").
    """

    def __init__(self, backend: str = "sdpa"):
        super().__init__()
        self.backend = backend

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, num_txt: int, key_mask: Tensor | None, txt_lens=None, fp8=None
    ) -> Tensor:
        return attention(q, k, v, key_mask, self.backend, txt_lens, num_txt, fp8)

    def amax(self, x: Tensor) -> Tensor:
        """max |x| (0-d float32) over every process whose part of x this core's attention mixes: here x itself;
        a sequence-parallel core reduces over its group (e4m3 scales must agree across ranks that exchange
        e4m3 values)."""
        return x.abs().amax().float()

    def fp8_operands(
        self, v: Tensor, q_norms: tuple[Tensor, Tensor], k_norms: tuple[Tensor, Tensor], unmasked: bool
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None, Fp8Scales | None]:
        """For the fp8 backend on an unmasked call: (e4m3 v, (q scale, k scale), scales); else (v, None, None).

        |q|, |k| after RMSNorm + RoPE are bounded by the norm weights (`rms_norm_bound`), so their scales need
        no reduction and the QK-norm + RoPE kernel can write e4m3 directly; v's scale is its absmax."""
        if self.backend != "fp8" or not unmasked:
            return v, None, None
        qk_scales = (fp8_scale(rms_norm_bound(*q_norms)), fp8_scale(rms_norm_bound(*k_norms)))
        v8, v_scale = quantize_tensor(v, self.amax(v))
        return v8, qk_scales, Fp8Scales(*qk_scales, v_scale, v.dtype)


def set_attention_backend(model: nn.Module, backend: str = "auto") -> str:
    """Point every attention core of `model` at `backend` (resolved for the model's device); returns it."""
    device = next(model.parameters()).device
    resolved = resolve_backend(backend, device)
    for module in model.modules():
        if isinstance(module, Attention):
            module.backend = resolved
    return resolved
