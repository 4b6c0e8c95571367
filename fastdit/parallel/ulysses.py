"""Ulysses sequence parallelism for the joint [image; text] attention.

Each of the sp ranks holds 1/sp of the (padded) image tokens and ALL text tokens (the text stream is
short, so every rank runs it whole rather than splitting it). Around the attention:

    image q/k/v  (B, S_img/sp, H, D) --all-to-all--> (B, S_img, H/sp, D)   sequence-sharded -> head-sharded
    text  q/k/v  (B, S_txt, H, D)    --local slice--> (B, S_txt, H/sp, D)   this rank's heads
    attention over [image; text] with the global key mask, on H/sp heads
    image out    (B, S_img, H/sp, D) --all-to-all--> (B, S_img/sp, H, D)
    text  out    (B, S_txt, H/sp, D) --all-gather--> (B, S_txt, H, D)

H is the heads this rank holds after tensor parallelism (num_heads / tp), so it must divide by sp.
"""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol
from torch import Tensor
from torch.distributed import ProcessGroup

from fastdit.kernels.attention import attention
from fastdit.models.qwenimage import Attention
from fastdit.parallel.layers import all_gather


def _collective(fn, x: Tensor, *args) -> Tensor:
    """fn(x, *args) for a functional collective; e4m3 (the fp8 attention's tensors) travels as bytes, as not
    every backend has fp8."""
    if x.dtype == torch.float8_e4m3fn:
        return fn(x.view(torch.uint8), *args).view(x.dtype)
    return fn(x, *args)


def _all_to_all(x: Tensor, group: ProcessGroup) -> Tensor:
    """all-to-all over dim 0."""
    return _collective(funcol.all_to_all_single, x, None, None, group)


def _seq_to_heads(x: Tensor, sp: int, group: ProcessGroup) -> Tensor:
    """(B, S/sp, H, D) on each rank -> (B, S, H/sp, D): rank r sends head chunk j to rank j."""
    b, s, h, d = x.shape
    x = x.reshape(b, s, sp, h // sp, d).permute(2, 0, 1, 3, 4).contiguous()  # (sp, B, S/sp, H/sp, D)
    x = _all_to_all(x, group)  # dim 0 now indexes the source rank = sequence chunk
    return x.permute(1, 0, 2, 3, 4).reshape(b, sp * s, h // sp, d)


def _heads_to_seq(x: Tensor, sp: int, group: ProcessGroup) -> Tensor:
    """Inverse of `_seq_to_heads`: (B, S, H/sp, D) -> (B, S/sp, H, D)."""
    b, s, h, d = x.shape
    x = x.reshape(b, sp, s // sp, h, d).transpose(0, 1).contiguous()  # (sp, B, S/sp, H/sp, D)
    x = _all_to_all(x, group)  # dim 0 now indexes the source rank = head chunk
    return x.permute(1, 2, 0, 3, 4).reshape(b, s // sp, sp * h, d)


class UlyssesAttention(Attention):
    """Drop-in for `fastdit.models.qwenimage.Attention`: q, k, v (B, S_img/sp + S_txt, H, D) -> same shape.

    `key_mask` is the GLOBAL (B, S_img + S_txt) mask over [all padded image tokens; text]: after the
    all-to-all every rank attends over the whole sequence.
    """

    def __init__(self, sp: int, sp_rank: int, group: ProcessGroup, backend: str = "sdpa"):
        super().__init__(backend)
        self.sp, self.sp_rank, self.group = sp, sp_rank, group

    def amax(self, x: Tensor) -> Tensor:
        """max |x| over the sp group: fp8 attention's v is quantized before the all-to-all, so every rank must use
        the same scale (each receives the e4m3 values of all the others)."""
        return funcol.all_reduce(super().amax(x).reshape(1), "max", self.group).reshape(())

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, num_txt: int, key_mask: Tensor | None, txt_lens=None, fp8=None
    ) -> Tensor:
        h = q.shape[2] // self.sp
        heads = slice(self.sp_rank * h, (self.sp_rank + 1) * h)

        def joint(x: Tensor) -> Tensor:  # (B, S_img/sp + S_txt, H, D) -> (B, S_img + S_txt, H/sp, D)
            img, txt = x[:, : x.shape[1] - num_txt], x[:, x.shape[1] - num_txt :]
            return torch.cat([_seq_to_heads(img, self.sp, self.group), txt[:, :, heads]], dim=1)

        # (B, S_img + S_txt, H/sp, D); txt_lens only when no image token is padding (ParallelTransformer).
        out = attention(joint(q), joint(k), joint(v), key_mask, self.backend, txt_lens, num_txt, fp8)
        img, txt = out[:, : out.shape[1] - num_txt], out[:, out.shape[1] - num_txt :]
        txt = _collective(all_gather, txt, 2, self.group)  # (B, S_txt, H, D), heads in rank order
        return torch.cat([_heads_to_seq(img, self.sp, self.group), txt], dim=1)
