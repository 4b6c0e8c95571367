"""The Qwen-Image diffusion transformer (MMDiT), top-down: config -> math -> layers -> blocks -> model.

Architectural choices (all fixed by the Qwen-Image checkpoints; diffusers' QwenImageTransformer2DModel
is the numerical reference):
- Dual-stream blocks: image and text tokens keep separate weights (modulation, QKV, norms, MLP) and meet
  only in one joint attention over the sequence [image; text] (diffusers orders it [text; image]; attention
  does not depend on the order of its keys, and with the text last, a sample's padded text keys are the tail
  of the sequence: its valid keys are a prefix, so per-sample attention takes views, not copies).
- AdaLN-Zero style modulation from the timestep embedding: shift/scale before attention and MLP, gate on
  the residual. LayerNorms have no affine weights; Q and K get an RMSNorm per head.
- `zero_cond_t` (Qwen-Image-Edit-2511): the image tokens of reference images (every image after the first in
  a sample's layout) are modulated at t = 0, the target's at t; the text stream and the final norm at t. The
  blocks pick per token with a bool `index`, so the target / reference boundary is data, not graph structure.
- 3-axis RoPE (frame, height, width) on interleaved channel pairs. Image rows/columns are centred around
  zero; text tokens sit on the diagonal just past the largest image index. Tables are real cos/sin,
  computed by pure functions outside the blocks.
- GELU(tanh) MLPs with 4x expansion.
- Q/K/V of each stream are one fused Linear (fused at load time, see loader.py).

Layers return tensors; parallelism (tensor / sequence) is applied from outside by `fastdit.parallel`,
which swaps Linear layers and the attention core for parallel ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from itertools import islice
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdit.errors import ConfigError
from fastdit.kernels.qk_norm_rope import qk_norm_rope
from fastdit.models.layers import (
    Attention,
    Linear,
    Modulation,
    Residual,
    RMSNorm,
    Rope,
    modulate,
    per_token,
    rope_from_positions,
    timestep_embedding,
)

# ---------------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class DiTConfig:
    num_layers: int = 60
    num_heads: int = 24
    head_dim: int = 128
    joint_dim: int = 3584  # width of the text encoder's hidden states
    in_channels: int = 64  # latent channels x patch^2
    out_channels: int = 16  # latent channels
    patch_size: int = 2
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    rope_theta: float = 10000.0
    eps: float = 1e-6
    mlp_ratio: int = 4
    zero_cond_t: bool = False  # reference-image tokens modulated at t = 0 (Qwen-Image-Edit-2511)

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ("rope_theta", "eps", "axes_dims_rope", "zero_cond_t"):
                continue
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"DiTConfig.{f.name} must be a positive integer, got {v!r}")
        if len(self.axes_dims_rope) != 3 or any(d <= 0 or d % 2 for d in self.axes_dims_rope):
            raise ConfigError(
                f"DiTConfig.axes_dims_rope must be 3 positive even ints (frame, height, width), "
                f"got {self.axes_dims_rope!r}"
            )
        if sum(self.axes_dims_rope) != self.head_dim:
            raise ConfigError(
                f"DiTConfig.axes_dims_rope {tuple(self.axes_dims_rope)} sums to {sum(self.axes_dims_rope)}, "
                f"but RoPE must cover the whole head: set them to sum to head_dim={self.head_dim}"
            )
        if self.eps <= 0 or self.rope_theta <= 0:
            raise ConfigError("DiTConfig.eps and rope_theta must be positive")

    @property
    def dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def out_dim(self) -> int:
        return self.patch_size**2 * self.out_channels

    @classmethod
    def from_diffusers(cls, cfg: dict) -> DiTConfig:
        """Build from a diffusers `QwenImageTransformer2DModel` config.json dict."""
        unsupported = [k for k in ("use_additional_t_cond", "use_layer3d_rope") if cfg.get(k)]
        if unsupported:
            raise ConfigError(f"unsupported Qwen-Image variant: {', '.join(unsupported)} set in config.json")
        if cfg.get("guidance_embeds"):
            raise ConfigError("guidance_embeds=true (guidance-distilled variant) is not supported")
        try:
            return cls(
                num_layers=cfg.get("num_layers", 60),
                num_heads=cfg.get("num_attention_heads", 24),
                head_dim=cfg.get("attention_head_dim", 128),
                joint_dim=cfg.get("joint_attention_dim", 3584),
                in_channels=cfg.get("in_channels", 64),
                out_channels=cfg.get("out_channels") or cfg.get("in_channels", 64),
                patch_size=cfg.get("patch_size", 2),
                axes_dims_rope=tuple(cfg.get("axes_dims_rope", (16, 56, 56))),
                zero_cond_t=bool(cfg.get("zero_cond_t", False)),
            )
        except TypeError as e:
            raise ConfigError(f"bad transformer config: {e}") from None


PRESETS: dict[str, DiTConfig] = {
    "qwen-image": DiTConfig(),
    # 2 layers, 2 heads x 32: parity and compile tests run in well under a second on a CPU.
    "tiny": DiTConfig(num_layers=2, num_heads=2, head_dim=32, joint_dim=48, axes_dims_rope=(8, 12, 12)),
}


# ---------------------------------------------------------------------------------------------------------
# RoPE: pure functions of the image grid and the text length.


def normalize_img_shapes(img_shapes) -> list[tuple[int, int, int]]:
    """Accepts one sample's shapes as (f, h, w) or [(f, h, w), ...]; returns the list of (f, h, w)."""
    if isinstance(img_shapes, tuple) and len(img_shapes) == 3 and all(isinstance(v, int) for v in img_shapes):
        return [img_shapes]
    out = [tuple(int(v) for v in s) for s in img_shapes]
    if not out or any(len(s) != 3 or min(s) < 1 for s in out):
        raise ConfigError(f"img_shapes must be (frames, height, width) tuples in patches, got {img_shapes!r}")
    return out


def shared_layout(img_shapes) -> list[tuple[int, int, int]]:
    """One sample's (f, h, w) list, from it or from a per-sample list whose samples must all share it."""
    if isinstance(img_shapes, list) and img_shapes and not isinstance(img_shapes[0], int):
        per_sample = [normalize_img_shapes(s) for s in img_shapes]
        if any(s != per_sample[0] for s in per_sample):
            raise ConfigError(f"all samples in a batch must share one image layout, got {img_shapes!r}")
        return per_sample[0]
    return normalize_img_shapes(img_shapes)


def rope_positions(img_shapes: list[tuple[int, int, int]], txt_len: int, device=None) -> Tensor:
    """(S_img + S_txt, 3) integer positions (frame, row, col) of the joint sequence [image; text].

    Image k of a sample sits at frame k; rows run from -(h - h//2) to h//2 - 1 (centred), columns alike.
    Text token j sits at (m + j, m + j, m + j) with m = max over images of max(h//2, w//2).
    """
    parts, m = [], 0
    for k, (f, h, w) in enumerate(img_shapes):
        ff = torch.arange(k, k + f, device=device)
        hh = torch.arange(-(h - h // 2), h // 2, device=device)
        ww = torch.arange(-(w - w // 2), w // 2, device=device)
        grid = torch.stack(torch.meshgrid(ff, hh, ww, indexing="ij"), dim=-1)  # (f, h, w, 3)
        parts.append(grid.reshape(-1, 3))
        m = max(m, h // 2, w // 2)
    txt = (m + torch.arange(txt_len, device=device)).unsqueeze(1).expand(txt_len, 3)
    return torch.cat([*parts, txt], dim=0)


def rope_tables(img_shapes, txt_len: int, axes_dims: tuple[int, int, int], theta: float = 10000.0, device=None) -> Rope:
    """Real RoPE tables for the joint sequence of one (shared) image layout; see `rope_positions`."""
    return rope_from_positions(rope_positions(normalize_img_shapes(img_shapes), txt_len, device), axes_dims, theta)


# ---------------------------------------------------------------------------------------------------------
# Layers


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        # GELU sits between the GEMMs: in fc1's epilogue, unless fc2 folds it into its own input pass (fp8).
        if self.fc2.fuses_gelu_input:
            return self.fc2.forward_gelu_input(self.fc1(x))
        return self.fc2(self.fc1.forward_gelu(x))


class JointAttention(nn.Module):
    """QKV projections, per-head QK RMSNorm and RoPE for both streams, one attention over [image; text]."""

    def __init__(self, dim: int, head_dim: int, eps: float):
        super().__init__()
        self.head_dim = head_dim
        self.img_qkv = Linear(dim, 3 * dim)
        self.txt_qkv = Linear(dim, 3 * dim)
        self.img_q_norm = RMSNorm(head_dim, eps)
        self.img_k_norm = RMSNorm(head_dim, eps)
        self.txt_q_norm = RMSNorm(head_dim, eps)
        self.txt_k_norm = RMSNorm(head_dim, eps)
        self.core = Attention()
        self.img_out = Linear(dim, dim)
        self.txt_out = Linear(dim, dim)

    def forward(
        self, img: Tensor, txt: Tensor, rope: Rope, key_mask: Tensor | None, txt_lens=None
    ) -> tuple[Tensor, Tensor]:
        n_txt = txt.shape[1]
        txt_qkv, img_qkv = self.txt_qkv(txt), self.img_qkv(img)  # (B, S, 3 * H * D), [q | k | v]
        # v of both streams, joined: (B, S_img + S_txt, H, D); H is whatever this rank holds (all heads without TP).
        v = torch.cat([x.unflatten(-1, (3, -1, self.head_dim))[:, :, 2] for x in (img_qkv, txt_qkv)], dim=1)
        # QK RMSNorm weights: text q, text k, image q, image k.
        norms = tuple(n.weight for n in (self.txt_q_norm, self.txt_k_norm, self.img_q_norm, self.img_k_norm))
        w_tq, w_tk, w_iq, w_ik = norms
        unmasked = key_mask is None or txt_lens is not None
        v, qk_scales, fp8 = self.core.fp8_operands(v, (w_tq, w_iq), (w_tk, w_ik), unmasked)
        if fp8 is not None and self.img_out.takes_e4m3 and self.txt_out.takes_e4m3:
            fp8 = fp8._replace(out_dtype=None)  # the out-projections take the e4m3 output as it is
        # q and k of both streams: QK norm + RoPE (+ e4m3) in one pass, written into the joint sequence.
        q, k = qk_norm_rope(txt_qkv, img_qkv, norms, *rope, self.txt_q_norm.eps, self.head_dim, qk_scales).unbind(0)
        out = self.core(q, k, v, n_txt, key_mask, txt_lens, fp8)  # (B, S_img + S_txt, H, D)
        if out.dtype == torch.float8_e4m3fn:  # in units of V's scale
            # cuDNN writes O sequence-major: as (S, B, H * D), each stream's rows are one contiguous block.
            img_o, txt_o = out.transpose(0, 1).flatten(2).split([out.shape[1] - n_txt, n_txt])
            img_a, txt_a = self.img_out.forward_e4m3(img_o, fp8.v), self.txt_out.forward_e4m3(txt_o, fp8.v)
            return img_a.transpose(0, 1), txt_a.transpose(0, 1)  # (B, S_x, dim) views
        img_o, txt_o = out.flatten(2).split([out.shape[1] - n_txt, n_txt], dim=1)
        return self.img_out(img_o), self.txt_out(txt_o)


class Block(nn.Module):
    """One dual-stream MMDiT block. Takes and returns the (img, txt) residual streams in that order."""

    def __init__(self, dim: int, head_dim: int, mlp_hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.img_mod = Modulation(dim)
        self.txt_mod = Modulation(dim)
        self.attn = JointAttention(dim, head_dim, eps)
        self.img_mlp = MLP(dim, mlp_hidden)
        self.txt_mlp = MLP(dim, mlp_hidden)

    def forward(
        self,
        img: Residual,
        txt: Residual,
        temb: Tensor | None,
        rope: Rope,
        key_mask: Tensor | None,
        txt_lens=None,
        img_mod: Tensor | None = None,
        txt_mod: Tensor | None = None,
        ref_mod: Tensor | None = None,
        index: Tensor | None = None,
    ) -> tuple[Residual, Residual]:
        # img_mod / txt_mod: this block's (1, 6 * dim) vectors for this step, precomputed (StepModulation).
        # index (1, S_img, 1) bool: reference tokens, modulated by ref_mod (1, 6 * dim), the t = 0 vectors.
        img_m1, img_m2 = self.img_mod(temb) if img_mod is None else Modulation.split(img_mod)
        txt_m1, txt_m2 = self.txt_mod(temb) if txt_mod is None else Modulation.split(txt_mod)
        ref_m1, ref_m2 = Modulation.split(ref_mod) if index is not None else (None, None)
        img, txt = img.total(index), txt.total()  # the previous block's MLP update, fused into the norms below
        img_in, txt_in = modulate(img, img_m1, self.eps, ref_m1, index), modulate(txt, txt_m1, self.eps)
        img_a, txt_a = self.attn(img_in, txt_in, rope, key_mask, txt_lens)
        img = img + per_token(index, img_m1.gate, None if ref_m1 is None else ref_m1.gate) * img_a
        txt = txt + txt_m1.gate * txt_a
        img_u = self.img_mlp(modulate(img, img_m2, self.eps, ref_m2, index))
        txt_u = self.txt_mlp(modulate(txt, txt_m2, self.eps))
        img_ref_gate = None if ref_m2 is None else ref_m2.gate
        return Residual(img, img_m2.gate, img_u, img_ref_gate), Residual(txt, txt_m2.gate, txt_u)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.fc1 = Linear(freq_dim, dim)
        self.fc2 = Linear(dim, dim)

    def forward(self, t: Tensor, dtype: torch.dtype) -> Tensor:
        return self.fc2(F.silu(self.fc1(timestep_embedding(t, self.freq_dim).to(dtype))))


class FinalLayer(nn.Module):
    """AdaLN (scale, shift from temb) over a non-affine LayerNorm, then the patch projection."""

    def __init__(self, dim: int, out_dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.mod = Linear(dim, 2 * dim)
        self.proj = Linear(dim, out_dim)

    def forward(
        self, x: Residual, temb: Tensor | None, mod: Tensor | None = None, index: Tensor | None = None
    ) -> Tensor:
        # mod: this step's (1, 2 * dim) vector, precomputed (StepModulation); else computed from temb. Every token
        # is normed at t (zero_cond_t too); `index` only completes the last block's pending residual.
        scale, shift = (self.mod(F.silu(temb)) if mod is None else mod)[:, None, :].chunk(2, dim=-1)
        x = x.total(index)
        return self.proj(F.layer_norm(x, x.shape[-1:], eps=self.eps) * (1 + scale) + shift)


# ---------------------------------------------------------------------------------------------------------
# Model


class StepModulation(NamedTuple):
    """One denoising step's AdaLN vectors for every block, computed ahead for all steps at once by
    `QwenImageTransformer.modulation_table` (they depend on the timestep only): per step the model then skips
    2 x num_layers weight-bound GEMVs (2 x 113 MB of weights per block in bf16).
    """

    img: Tensor  # (num_layers, 1, 6 * dim)
    txt: Tensor  # (num_layers, 1, 6 * dim)
    final: Tensor  # (1, 2 * dim)
    # zero_cond_t: the image-stream vectors at t = 0 for reference tokens, (num_layers, 1, 6 * dim); one tensor
    # shared by every step's entry. None for models without zero_cond_t.
    ref: Tensor | None = None


@dataclass
class DiTInputs:
    """Everything the blocks need, prepared outside them (embeddings, RoPE tables, key mask)."""

    img: Tensor  # (B, S_img, dim)
    txt: Tensor  # (B, S_txt, dim)
    temb: Tensor | None  # (B, dim); None when the caller passes a precomputed StepModulation
    rope: Rope
    key_mask: Tensor | None = field(default=None)  # (B, S_img + S_txt) bool, None: attend to all


class QwenImageTransformer(nn.Module):
    """The Qwen-Image DiT. fastdit.parallel wraps it behind the same call; `base` is the model under any wrapper."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        dim = cfg.dim
        self.img_in = Linear(cfg.in_channels, dim)
        self.txt_norm = RMSNorm(cfg.joint_dim, cfg.eps)
        self.txt_in = Linear(cfg.joint_dim, dim)
        self.time_embed = TimestepEmbedder(dim)
        self.blocks = nn.ModuleList(
            [Block(dim, cfg.head_dim, cfg.mlp_ratio * dim, cfg.eps) for _ in range(cfg.num_layers)]
        )
        self.final = FinalLayer(dim, cfg.out_dim, cfg.eps)

    @property
    def base(self) -> QwenImageTransformer:
        return self

    def make_rope(self, img_shapes, txt_len: int, device=None) -> Rope:
        """RoPE tables for a batch whose samples all share `img_shapes` (one sample's (f, h, w) list)."""
        return rope_tables(shared_layout(img_shapes), txt_len, self.cfg.axes_dims_rope, self.cfg.rope_theta, device)

    def modulation_index(self, img_shapes, device=None) -> Tensor | None:
        """zero_cond_t: the (S_img,) bool token index, True for reference-image tokens (every image after a
        sample's first), which are modulated at t = 0. None without zero_cond_t or without reference images:
        then the blocks do no per-token work at all."""
        if not self.cfg.zero_cond_t:
            return None
        shapes = shared_layout(img_shapes)
        if len(shapes) < 2:
            return None
        sizes = [f * h * w for f, h, w in shapes]
        return torch.arange(sum(sizes), device=device) >= sizes[0]

    def prepare(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        encoder_hidden_states_mask: Tensor | None,
        timestep: Tensor | None,
        img_shapes=None,
        rope: Rope | None = None,
    ) -> DiTInputs:
        """Embeddings, RoPE tables and key mask. `timestep` None: no temb (the step's modulation is precomputed)."""
        dtype = hidden_states.dtype
        img = self.img_in(hidden_states)
        txt = self.txt_in(self.txt_norm(encoder_hidden_states))
        # The reference rounds sigma to the model dtype before embedding it; so do we (bf16 parity).
        temb = None if timestep is None else self.time_embed(timestep.to(dtype), dtype)
        if rope is None:
            rope = self.make_rope(img_shapes, txt.shape[1], txt.device)
        key_mask = None
        if encoder_hidden_states_mask is not None:
            txt_mask = encoder_hidden_states_mask.to(torch.bool)
            img_mask = txt_mask.new_ones(img.shape[:2])
            key_mask = torch.cat([img_mask, txt_mask], dim=1)
        return DiTInputs(img, txt, temb, rope, key_mask)

    @torch.no_grad()
    def modulation_table(self, timesteps: Tensor) -> list[StepModulation]:
        """Every block's modulation vectors for each of `timesteps` (T,) (sigma in [0, 1], as `forward` takes
        it), as T `StepModulation`s: one GEMM of T rows per layer instead of one GEMV per layer and step.
        Pass table[i] as `forward(..., modulation=)` for a step whose samples all have timesteps[i]."""
        dtype = self.img_in.weight.dtype  # the compute dtype (block linears may be fp8, img_in never is)
        n = len(timesteps)
        if self.cfg.zero_cond_t:  # one more row: t = 0, the reference tokens' image-stream vectors
            timesteps = torch.cat([timesteps, timesteps.new_zeros(1)])
        act = F.silu(self.time_embed(timesteps.to(dtype), dtype))  # (T (+ 1), dim)
        img = torch.stack([block.img_mod.lin(act) for block in self.blocks])  # (L, T (+ 1), 6 * dim)
        txt = torch.stack([block.txt_mod.lin(act[:n]) for block in self.blocks])
        final = self.final.mod(act[:n])  # (T, 2 * dim)
        ref = img[:, n:] if self.cfg.zero_cond_t else None  # (L, 1, 6 * dim)
        return [StepModulation(img[:, i : i + 1], txt[:, i : i + 1], final[i : i + 1], ref) for i in range(n)]

    @torch.no_grad()
    def reference_modulation(self) -> Tensor:
        """zero_cond_t: every block's image-stream vectors at t = 0, (num_layers, 1, 6 * dim), for a forward
        without a `modulation_table` entry."""
        dtype = self.img_in.weight.dtype
        act = F.silu(self.time_embed(torch.zeros(1, device=self.img_in.weight.device), dtype))
        return torch.stack([block.img_mod.lin(act) for block in self.blocks])

    def forward(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        encoder_hidden_states_mask: Tensor | None = None,
        timestep: Tensor | None = None,
        img_shapes=None,
        rope: Rope | None = None,
        txt_lens: tuple[int, ...] | None = None,
        modulation: StepModulation | None = None,
        cache=None,
        mod_index: Tensor | None = None,
    ) -> Tensor:
        """(B, S_img, in_channels) latents, (B, S_txt, joint_dim) text states, (B, S_txt) mask, (B,) sigma,
        per-sample (frames, h, w) in patches -> (B, S_img, patch^2 * out_channels) velocity.

        Optional: `rope` precomputed by `make_rope`; `txt_lens`, the valid text length of each sample as
        host ints, when the mask is padding at the end of the text (then attention needs no mask);
        `modulation`, this step's entry of `modulation_table` (every sample must be at that timestep);
        `mod_index`, `modulation_index(img_shapes)` precomputed (zero_cond_t; derived from img_shapes if absent);
        `cache`, a step cache's loop for this call (see `run_blocks`).
        """
        if mod_index is None and img_shapes is not None and self.cfg.zero_cond_t:
            mod_index = self.modulation_index(img_shapes, hidden_states.device)
        t = timestep if modulation is None else None  # the table replaces the time embedding
        x = self.prepare(hidden_states, encoder_hidden_states, encoder_hidden_states_mask, t, img_shapes, rope)
        return self.run_blocks(x.img, x.txt, x.temb, x.rope, x.key_mask, txt_lens, modulation, cache, mod_index)

    def run_blocks(
        self,
        img: Tensor,
        txt: Tensor,
        temb: Tensor | None,
        rope: Rope,
        key_mask: Tensor | None,
        txt_lens=None,
        modulation: StepModulation | None = None,
        cache=None,
        mod_index: Tensor | None = None,
    ) -> Tensor:
        """The blocks and the final layer over prepared inputs: (B, S_img, dim) -> (B, S_img, out_dim).
        Needs `temb` unless `modulation` is given. `cache` (fastdit.cache.CachedLoop): runs the blocks as
        segments through `run_segment`, deciding per step whether the middle ones run. `mod_index` (S_img,) bool:
        reference tokens (zero_cond_t), modulated at t = 0."""
        index, ref = None, None
        if mod_index is not None:
            if not self.cfg.zero_cond_t:
                raise ConfigError("mod_index selects t = 0 modulation for reference tokens: a zero_cond_t model only")
            index = mod_index.view(1, -1, 1)
            ref = self.reference_modulation() if modulation is None or modulation.ref is None else modulation.ref
        refs = None if index is None else (ref, index)
        if cache is not None:
            return cache.run(self, img, txt, temb, rope, key_mask, txt_lens, modulation, refs=refs)
        gate_rows = temb.shape[0] if modulation is None else 1  # the table's vectors serve the whole batch
        img, txt = Residual.start(img, gate_rows, ref), Residual.start(txt, gate_rows)
        img, txt = self.run_segment(0, len(self.blocks), img, txt, temb, rope, key_mask, txt_lens, modulation, refs)
        return self.final(img, temb, None if modulation is None else modulation.final, index)

    def run_segment(
        self,
        start: int,
        end: int,
        img: Residual,
        txt: Residual,
        temb: Tensor | None,
        rope: Rope,
        key_mask: Tensor | None,
        txt_lens=None,
        modulation: StepModulation | None = None,
        refs: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Residual, Residual]:
        """Blocks [start, end) over the (img, txt) residual streams. `refs`: (the t = 0 table (L, 1, 6 * dim), the
        token index (1, S_img, 1)) with zero_cond_t reference tokens."""
        for i, block in islice(enumerate(self.blocks), start, end):
            mods = (None, None) if modulation is None else (modulation.img[i], modulation.txt[i])
            ref = (None, None) if refs is None else (refs[0][i], refs[1])
            img, txt = block(img, txt, temb, rope, key_mask, txt_lens, *mods, *ref)
        return img, txt
