"""The Qwen-Image 2.1 diffusion transformer, top-down: config -> RoPE tables -> layers -> blocks -> model.
Checkpoint names are in qwenimage21_keys.py, the token layout (where each prefix token comes from, RoPE positions)
in qwenimage21_layout.py. diffusers' QwenImage21Transformer2DModel is the numerical reference.

Architectural choices (fixed by the checkpoints):
- Single stream: text, condition-image and noise tokens share every weight. The sequence is the text encoder's
  (Qwen3-VL) sequence with each condition-image slot expanded into the 2x2 latent tokens it stands for, then the
  noise tokens: [prefix; noise], prefix = text with condition images in their slots.
- Block-causal attention: a text token sees every earlier token (causal), an image block (each condition image,
  and the noise image) sees every earlier token and all of its own block. The noise is last, so it sees everything
  and nothing sees it: the prefix is computed once per image (`prefill`), each layer's prefix K/V is kept
  (`PrefixCache`), and a denoising step runs the noise tokens alone over [own K/V; cached prefix K/V].
- One modulation for all blocks: SiLU -> Linear(dim, 4 * dim) = (scale1, gate1, scale2, gate2) from the timestep
  embedding, the same in every block. LayerNorm (no affine) then x * (1 + scale); gates go through tanh; no
  shift. The prefix is modulated from t = 0 (`causal_condition`), which is what makes its K/V step-independent.
- 3-axis RoPE (frame, height, width) on interleaved pairs: text tokens advance one position on all axes; an
  image block sits at one frame (the position so far), rows / columns centred on zero, and advances the
  position by max(h, w). Tables are real cos/sin computed by pure functions outside the blocks.
- SwiGLU MLP (3x), no biases anywhere; Q/K/V fused into one Linear and gate/up into one, at load time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdit.errors import ConfigError
from fastdit.kernels.qk_norm_rope import rms_norm
from fastdit.models.layers import Attention, Linear, Rope, rope_from_positions
from fastdit.models.qwenimage21_layout import PrefixLayout, Segment, rope_positions

# ---------------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class QwenImage21Config:
    num_layers: int = 32
    num_heads: int = 32
    head_dim: int = 128
    context_dim: int = 4096  # width of the text encoder's hidden states
    in_channels: int = 64  # VAE latent channels (the model reads latents unpatched: patch_size 1)
    out_channels: int = 64
    patch_size: int = 1
    mlp_ratio: int = 3
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    rope_theta: float = 10000.0
    eps: float = 1e-6
    causal_condition: bool = True  # prefix modulated from t = 0; required by the prefix cache

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("rope_theta", "eps", "axes_dims_rope", "causal_condition"):
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"QwenImage21Config.{f.name} must be a positive integer, got {v!r}")
        axes = self.axes_dims_rope
        if len(axes) != 3 or any(not isinstance(d, int) or d <= 0 or d % 2 for d in axes):
            raise ConfigError(f"QwenImage21Config.axes_dims_rope must be 3 positive even ints, got {axes!r}")
        if sum(axes) != self.head_dim:
            raise ConfigError(
                f"QwenImage21Config.axes_dims_rope {tuple(axes)} sums to {sum(axes)}, but RoPE must cover the whole "
                f"head: set them to sum to head_dim={self.head_dim}"
            )
        if not self.eps > 0 or not self.rope_theta > 0:
            raise ConfigError("QwenImage21Config.eps and rope_theta must be positive")
        if not isinstance(self.causal_condition, bool):
            raise ConfigError(
                f"QwenImage21Config.causal_condition must be true or false, got {self.causal_condition!r}"
            )

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    @classmethod
    def from_diffusers(cls, cfg: dict) -> QwenImage21Config:
        """Build from a diffusers `QwenImage21Transformer2DModel` config.json dict."""
        name = cfg.get("_class_name", "QwenImage21Transformer2DModel")
        if name != "QwenImage21Transformer2DModel":
            raise ConfigError(f"_class_name is {name!r}: this loader reads QwenImage21Transformer2DModel folders")
        try:
            return cls(
                num_layers=cfg.get("num_layers", 32),
                num_heads=cfg.get("num_attention_heads", 32),
                head_dim=cfg.get("attention_head_dim", 128),
                context_dim=cfg.get("context_in_dim", 4096),
                in_channels=cfg.get("in_channels", 64),
                out_channels=cfg.get("out_channels") or cfg.get("in_channels", 64),
                patch_size=cfg.get("patch_size", 1),
                mlp_ratio=cfg.get("mlp_ratio", 3),
                axes_dims_rope=tuple(cfg.get("axes_dims_rope", (16, 56, 56))),
                eps=cfg.get("eps", 1e-6),
                causal_condition=cfg.get("causal_condition", True),
            )
        except TypeError as e:
            raise ConfigError(f"bad transformer config: {e}") from None


PRESETS: dict[str, QwenImage21Config] = {
    "qwen-image-2.1": QwenImage21Config(),
    # 2 layers, 2 heads x 32: parity and compile tests run in about a second on a CPU.
    "tiny": QwenImage21Config(
        num_layers=2,
        num_heads=2,
        head_dim=32,
        context_dim=48,
        in_channels=16,
        out_channels=16,
        axes_dims_rope=(8, 12, 12),
    ),
}

# ---------------------------------------------------------------------------------------------------------
# RoPE tables: from the layout's positions (fastdit.models.qwenimage21_layout), outside the blocks.


def rope_tables(positions: Tensor, axes_dims: tuple[int, int, int], theta: float, device=None) -> Rope:
    """Real RoPE tables (S, head_dim) from (S, 3) positions, in fastdit.models.layers.Rope's layout (angles repeated
    per pair, the rotation's sign folded into sin)."""
    return rope_from_positions(positions.to(device=device), axes_dims, theta)


def apply_rope(x: Tensor, rope: Rope) -> Tensor:
    """Rotate interleaved pairs of x (B, S, H, D) in float32; tables (S, D), or (B, S, D) per sample."""
    xf = x.float()
    swapped = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0, x3, x2, ...)
    return (xf * rope.cos.unsqueeze(-2) + swapped * rope.sin.unsqueeze(-2)).to(x.dtype)


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of sigma in [0, 1]: (B,) -> (B, dim) float32, [cos | sin] of (1000 * t) * freq."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = (1000.0 * t.float())[:, None] * freqs[None]  # this rounding order matches the checkpoints' code
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# ---------------------------------------------------------------------------------------------------------
# Layers


class AdaLN(NamedTuple):
    """One timestep's modulation, shared by every block: each (B, 1, dim); gates already through tanh."""

    scale1: Tensor
    gate1: Tensor
    scale2: Tensor
    gate2: Tensor
    final_scale: Tensor


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class ZeroCentredRMSNorm(nn.Module):
    """RMSNorm whose checkpoint weight is stored as scale - 1; all in float32, rounded once at the end."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * (self.weight.float() + 1)).to(x.dtype)


class TextProjection(nn.Module):
    """Zero-centred RMSNorm -> Linear -> GELU(tanh) -> Linear: text-encoder states to the model width."""

    def __init__(self, context_dim: int, dim: int, eps: float):
        super().__init__()
        self.norm = ZeroCentredRMSNorm(context_dim, eps)
        self.fc1 = Linear(context_dim, dim, bias=False)
        self.fc2 = Linear(dim, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x)), approximate="tanh"))


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.fc1 = Linear(freq_dim, dim, bias=False)
        self.fc2 = Linear(dim, dim, bias=False)

    def forward(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        # The reference rounds sigma to the model dtype before embedding it; so do we (bf16 parity).
        return self.fc2(F.silu(self.fc1(timestep_embedding(t.to(dtype), self.freq_dim).to(dtype))))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = Linear(dim, 2 * hidden, bias=False)  # [gate | up], fused at load
        self.down = Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def modulate(x: Tensor, scale: Tensor, eps: float) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=eps) * (1 + scale)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, start: int, key_valid: Tensor | None) -> Tensor:
    """A text run's queries q (B, n, H, D) at positions [start, start + n) over keys k, v (B, start + n, H, D):
    query i sees keys [0, start + i]. Masked keys (key_valid (B, start + n), False) are skipped, except a token's
    own, so that no row is empty (a padding query's output is never read: its key is masked everywhere).

    The one masked call of the model: its (n, S) mask is small (a text run by the keys so far, once per image),
    and fastdit.kernels.attention takes key masks only, so it goes to torch's SDPA directly."""
    n, s = q.shape[1], k.shape[1]
    allowed = torch.ones(n, s, dtype=torch.bool, device=q.device).tril(diagonal=start)  # (n, S)
    if key_valid is not None:
        own = torch.eye(n, s, dtype=torch.bool, device=q.device).roll(start, dims=1)
        allowed = allowed & (key_valid[:, None, :] | own)  # (B, n, S)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), allowed.unsqueeze(-3))
    return out.transpose(1, 2)


class PrefixAttention(Attention):
    """The attention core of a 2.1 block: the block-causal prefill and a step's attention over the cached prefix.
    Both are methods of the core so that fastdit.parallel's sequence-parallel core can wrap them in all-to-alls."""

    def prefill(
        self, q: Tensor, k: Tensor, v: Tensor, segments: tuple[Segment, ...], key_valid: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The prefix's q, k, v (B, P, H, D), one call per segment over the keys up to its end -> (out, the k and v
        to cache)."""
        outs = []
        for start, end, grid in segments:
            valid = None if key_valid is None else key_valid[:, :end]
            if grid is None:
                outs.append(causal_attention(q[:, start:end], k[:, :end], v[:, :end], start, valid))
            else:
                outs.append(self(q[:, start:end], k[:, :end], v[:, :end], 0, valid))
        return torch.cat(outs, dim=1), k, v

    def step(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        prefix_k: Tensor,
        prefix_v: Tensor,
        prefix_lens: tuple[int, ...] | None,
        key_mask: Tensor | None = None,
    ) -> Tensor:
        """The noise tokens' q, k, v (B, N, H, D) over [their own K/V; the cached prefix K/V (B, P, H, D)].
        `key_mask` (B, N + P) bool, when some noise keys are padding (sequence parallel), replaces `prefix_lens`."""
        k, v = torch.cat([k, prefix_k], dim=1), torch.cat([v, prefix_v], dim=1)
        return self(q, k, v, prefix_k.shape[1], key_mask, prefix_lens if key_mask is None else None)


# ---------------------------------------------------------------------------------------------------------
# Blocks


class Block(nn.Module):
    """One single-stream block: modulated attention and SwiGLU, each added through a tanh gate."""

    def __init__(self, dim: int, head_dim: int, mlp_hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.head_dim = head_dim
        self.qkv = Linear(dim, 3 * dim, bias=False)  # [q | k | v], fused at load
        self.q_norm = RMSNorm(head_dim, eps)
        self.k_norm = RMSNorm(head_dim, eps)
        self.core = PrefixAttention()
        self.out = Linear(dim, dim, bias=False)
        self.mlp = SwiGLU(dim, mlp_hidden)

    def _qkv(self, x: Tensor, mod: AdaLN, rope: Rope) -> tuple[Tensor, Tensor, Tensor]:
        """(B, S, dim) -> q, k, v (B, S, H, D): q and k RMS-normed per head and rotated."""
        q, k, v = self.qkv(modulate(x, mod.scale1, self.eps)).unflatten(-1, (3, -1, self.head_dim)).unbind(2)
        return apply_rope(self.q_norm(q), rope), apply_rope(self.k_norm(k), rope), v

    def _finish(self, x: Tensor, attn: Tensor, mod: AdaLN) -> Tensor:
        x = x + mod.gate1 * self.out(attn.flatten(2))
        x = x + mod.gate2 * self.mlp(modulate(x, mod.scale2, self.eps))
        return x.clip(-65504, 65504) if x.dtype == torch.float16 else x

    def forward(
        self,
        x: Tensor,
        mod: AdaLN,
        rope: Rope,
        prefix_k: Tensor,
        prefix_v: Tensor,
        prefix_lens: tuple[int, ...] | None = None,
        key_mask: Tensor | None = None,
    ) -> Tensor:
        """A denoising step: noise tokens x (B, N, dim) attend over [their own K/V; the prefix's cached K/V
        (B, P, H, D)]. `prefix_lens` (host ints): sample b's valid prefix keys are its first prefix_lens[b];
        `key_mask` (B, N + P): see `PrefixAttention.step`."""
        q, k, v = self._qkv(x, mod, rope)
        return self._finish(x, self.core.step(q, k, v, prefix_k, prefix_v, prefix_lens, key_mask), mod)

    def prefill(
        self, x: Tensor, mod: AdaLN, rope: Rope, segments: tuple[Segment, ...], key_valid: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The prefix x (B, P, dim), block-causal, one attention call per segment over the keys up to its end
        (`key_valid` (B, P) bool: text padding). Returns the new x and this layer's k, v (B, P, H, D)."""
        out, k, v = self.core.prefill(*self._qkv(x, mod, rope), segments, key_valid)
        return self._finish(x, out, mod), k, v


class FinalLayer(nn.Module):
    """LayerNorm (no affine) * (1 + scale) from the timestep, then the projection to latent channels."""

    def __init__(self, dim: int, out_dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.mod = Linear(dim, dim, bias=False)
        self.proj = Linear(dim, out_dim, bias=False)

    def forward(self, x: Tensor, scale: Tensor) -> Tensor:
        return self.proj(modulate(x, scale, self.eps))


# ---------------------------------------------------------------------------------------------------------
# Model


class PrefixCache(NamedTuple):
    """Every layer's prefix keys and values, post-norm and post-RoPE: (num_layers, B, P, H, D) each. Within a
    sample, valid tokens come first (attention does not depend on the order of its keys); `lens` (host ints) are
    the valid counts when they differ from P, else None."""

    k: Tensor
    v: Tensor
    lens: tuple[int, ...] | None


def pack_prefix(k: Tensor, v: Tensor, key_valid: Tensor | None) -> PrefixCache:
    """Move each sample's masked prefix keys to its end, drop the columns no sample needs."""
    if key_valid is None:
        return PrefixCache(k, v, None)
    order = torch.argsort((~key_valid).to(torch.uint8), dim=1, stable=True)[None, :, :, None, None]
    lens = tuple(int(n) for n in key_valid.sum(1).tolist())  # one host sync per image
    k, v = (torch.take_along_dim(t, order, dim=2)[:, :, : max(lens)] for t in (k, v))
    return PrefixCache(k, v, None if min(lens) == max(lens) else lens)


def cat_prefix_caches(caches: Sequence[PrefixCache]) -> PrefixCache:
    """Batch caches prefilled separately (e.g. a prompt and its negative, of different lengths) along B."""
    p = max(c.k.shape[2] for c in caches)
    lens = tuple(n for c in caches for n in (c.lens or (c.k.shape[2],) * c.k.shape[1]))
    pad = [(0, 0, 0, 0, 0, p - c.k.shape[2]) for c in caches]  # zero keys at the end of the shorter prefixes
    k = torch.cat([F.pad(c.k, widths) for c, widths in zip(caches, pad, strict=True)], dim=1)
    v = torch.cat([F.pad(c.v, widths) for c, widths in zip(caches, pad, strict=True)], dim=1)
    return PrefixCache(k, v, None if min(lens) == p else lens)


class QwenImage21Transformer(nn.Module):
    """The Qwen-Image 2.1 DiT; `base` is the model under any wrapper (as for fastdit.models.qwenimage)."""

    def __init__(self, cfg: QwenImage21Config):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.img_in = Linear(cfg.in_channels * cfg.patch_size**2, dim, bias=False)
        self.txt_in = TextProjection(cfg.context_dim, dim, cfg.eps)
        self.time_embed = TimestepEmbedder(dim)
        self.mod = Linear(dim, 4 * dim, bias=False)  # (scale1, gate1, scale2, gate2), shared by every block
        self.blocks = nn.ModuleList(
            [Block(dim, cfg.head_dim, cfg.mlp_ratio * dim, cfg.eps) for _ in range(cfg.num_layers)]
        )
        self.final = FinalLayer(dim, cfg.patch_size**2 * cfg.out_channels, cfg.eps)

    @property
    def base(self) -> QwenImage21Transformer:
        return self

    def make_rope(self, layout: PrefixLayout, grid: tuple[int, int], device=None) -> tuple[Rope, Rope]:
        """RoPE tables of the prefix (P, D) and of the noise image of `grid` (h, w) latent tokens (N, D)."""
        rope = rope_tables(rope_positions(layout, grid), self.cfg.axes_dims_rope, self.cfg.rope_theta, device)
        p = len(layout.source)
        return Rope(rope.cos[:p], rope.sin[:p]), Rope(rope.cos[p:], rope.sin[p:])

    def modulation(self, timestep: Tensor) -> AdaLN:
        """(B,) sigma in [0, 1] -> the step's AdaLN vectors."""
        dtype = self.img_in.weight.dtype
        act = F.silu(self.time_embed(timestep, dtype))
        scale1, gate1, scale2, gate2 = self.mod(act)[:, None].chunk(4, dim=-1)
        return AdaLN(scale1, gate1.tanh(), scale2, gate2.tanh(), self.final.mod(act)[:, None])

    def prefill(
        self,
        text: Tensor,
        text_mask: Tensor | None,
        cond: Tensor | None,
        layout: PrefixLayout,
        rope: Rope,
        timestep: Tensor | None = None,
    ) -> PrefixCache:
        """Run the prefix through every block; returns each layer's prefix K/V.

        text (B, T, context_dim): the text encoder's states, vision slots included; text_mask (B, T) bool: valid
        text (None: all); cond (B, N_c, in_channels): condition-image latents, images in slot order; rope: the
        prefix table of `make_rope`. `timestep` is for `causal_condition=False` checkpoints only, whose prefix
        depends on the step (prefill again each step); otherwise the prefix is modulated from t = 0.
        """
        x, key_valid = self.embed_prefix(text, text_mask, cond, layout)
        return self.prefill_tokens(x, key_valid, layout.segments, rope, timestep)

    def embed_prefix(
        self, text: Tensor, text_mask: Tensor | None, cond: Tensor | None, layout: PrefixLayout
    ) -> tuple[Tensor, Tensor | None]:
        """The prefix tokens (B, P, dim) in layout order, and which of them are valid keys (B, P) (None: all)."""
        parts, valid = [self.txt_in(text)], [text_mask]
        if cond is not None:
            parts.append(self.img_in(cond))
            valid.append(None if text_mask is None else text_mask.new_ones(cond.shape[:2]))
        source = torch.tensor(layout.source, device=text.device)
        x = torch.cat(parts, dim=1)[:, source]  # (B, P, dim)
        key_valid = None if text_mask is None else torch.cat(valid, dim=1).to(torch.bool)[:, source]
        return x, key_valid

    def prefill_tokens(
        self,
        x: Tensor,
        key_valid: Tensor | None,
        segments: tuple[Segment, ...],
        rope: Rope,
        timestep: Tensor | None = None,
    ) -> PrefixCache:
        """`prefill` from embedded prefix tokens x (B, P_x, dim) with their RoPE rows: P_x = P on one device, this
        rank's part of them under sequence parallelism (whose attention core gathers the segments' keys)."""
        if (timestep is None) != self.cfg.causal_condition:
            need = "no timestep (it is modulated from t = 0)" if self.cfg.causal_condition else "the step's timestep"
            raise ConfigError(f"prefill of a causal_condition={self.cfg.causal_condition} model takes {need}")
        t = torch.zeros(1, device=x.device) if timestep is None else timestep
        mod = self.modulation(t)
        ks, vs = [], []
        for block in self.blocks:
            x, k, v = block.prefill(x, mod, rope, segments, key_valid)
            ks.append(k)
            vs.append(v)
        return pack_prefix(torch.stack(ks), torch.stack(vs), key_valid)

    def forward(
        self,
        noise: Tensor,
        timestep: Tensor | None,
        cache: PrefixCache,
        rope: Rope,
        modulation: AdaLN | None = None,
        key_mask: Tensor | None = None,
        step_cache=None,
    ) -> Tensor:
        """One denoising step: noise latents (B, N, in_channels) in row-major order, sigma (B,) in [0, 1], the
        prefix cache and the noise RoPE table of `make_rope` -> velocity (B, N, out_channels).
        `modulation`: this step's `modulation(sigma)`, computed ahead; it replaces `timestep`. `key_mask`
        (B, N + P) bool: the keys that may be attended to, when some noise tokens are padding (fastdit.parallel).
        `step_cache` (fastdit.cache.CachedLoop): runs the blocks as front / middle / back segments, the middle ones
        skipped on the steps it caches."""
        mod = self.modulation(timestep) if modulation is None else modulation
        x = self.img_in(noise)
        if step_cache is not None:
            return step_cache.run_single_stream(self, x, cache, rope, mod, key_mask)
        for i, block in enumerate(self.blocks):
            x = block(x, mod, rope, cache.k[i], cache.v[i], cache.lens, key_mask)
        return self.final(x, mod.final_scale)
