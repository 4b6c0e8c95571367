"""Tensor, Ulysses sequence and CFG parallelism for the Qwen-Image 2.1 DiT, applied from outside the model file.

`parallelize_qwenimage21(model, state)` swaps, in every block of a model built on the meta device:

    qkv, mlp.gate_up   ColumnParallelLinear (q, k, v / gate, up each sharded by heads / hidden units)
    out, mlp.down      RowParallelLinear (one all-reduce each)
    core               UlyssesPrefixAttention when sp > 1

The shared modulation (one Linear for all blocks), the embedders and the final layer stay whole on every rank.
fastdit.parallel.transformer's `shard_plan` reads the slices from these layer types; the loader slices each source
tensor (to_q / to_k / to_v, gate / proj) before fusing, so rank r's fused weight is [q_r; k_r; v_r].

The prefix K/V cache is sharded by heads, over tp and over sp alike: rank (t, s) keeps the K/V of its
num_heads / (tp * sp) heads for every prefix token. Under tp that is what its column-parallel Q/K/V computes;
under sp, Ulysses' all-to-all hands each rank all tokens of its heads before attention, and those are the heads
whose keys its noise queries need. So a step reads the cache locally with no collective beyond Ulysses' own
all-to-alls of the noise tokens, and each rank stores 1 / (tp * sp) of it (~2.3 GB in bf16 for a 1024^2 condition
image at full size). Replicated, every rank would hold the whole cache only to slice its heads out of it; sharded
by sequence, every step would have to all-to-all the prefix (P keys per layer) besides the noise.

`ParallelQwenImage21` has the model's call (make_rope, modulation, prefill, forward): CFG rows split over the cfg
group (the cache of a cfg rank holds its rows only), prefix and noise tokens padded and split over the sp group,
outputs gathered back; every rank gets the full batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import Tensor, nn

from fastdit.errors import ConfigError
from fastdit.models.layers import Rope
from fastdit.models.qwenimage21 import AdaLN, PrefixAttention, PrefixCache, QwenImage21Transformer
from fastdit.models.qwenimage21_layout import PrefixLayout, Segment
from fastdit.parallel.layers import ColumnParallelLinear, RowParallelLinear, all_gather
from fastdit.parallel.state import ParallelState
from fastdit.parallel.transformer import check_parallel_config
from fastdit.parallel.ulysses import _heads_to_seq, _seq_to_heads


class UlyssesPrefixAttention(PrefixAttention):
    """`PrefixAttention` over sequence-sharded q, k, v (B, S / sp, H, D): all-to-all to (B, S, H / sp, D), the
    single-device attention on this rank's heads, all-to-all back. The K/V it returns to cache, and the prefix K/V
    a step reads, are this rank's heads for every prefix token: (B, P, H / sp, D)."""

    def __init__(self, sp: int, group, backend: str = "sdpa"):
        super().__init__(backend)
        self.sp, self.group = sp, group

    def _heads(self, x: Tensor) -> Tensor:
        return _seq_to_heads(x, self.sp, self.group)

    def prefill(
        self, q: Tensor, k: Tensor, v: Tensor, segments: tuple[Segment, ...], key_valid: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self._heads(q), self._heads(k), self._heads(v)  # (B, P_pad, H / sp, D)
        p = segments[-1].end  # the tokens after it are sp padding: never queried, never a key
        out, k, v = super().prefill(q, k[:, :p], v[:, :p], segments, key_valid)
        out = F.pad(out, (0, 0, 0, 0, 0, q.shape[1] - p))
        return _heads_to_seq(out, self.sp, self.group), k, v

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
        q, k, v = self._heads(q), self._heads(k), self._heads(v)  # (B, N_pad, H / sp, D)
        out = super().step(q, k, v, prefix_k, prefix_v, prefix_lens, key_mask)
        return _heads_to_seq(out, self.sp, self.group)


def parallelize_qwenimage21(model: QwenImage21Transformer, state: ParallelState, shard_modulation: bool = False):
    """Swap the 2.1 DiT's block layers for tensor / sequence-parallel ones, in place, on a model built on meta;
    returns it. `shard_modulation` is accepted for the loader's common call: the one modulation Linear of 2.1
    (shared by all blocks, ~2 % of the weights) is always replicated."""
    cfg = model.cfg
    check_parallel_config(cfg, state.tp, state.sp)
    tp, dim, hidden = state.tp, cfg.dim, cfg.mlp_ratio * cfg.dim
    if tp > 1 and any(p.device.type != "meta" for p in model.parameters()):
        raise ConfigError("parallelize_qwenimage21() swaps layers before loading: build the model on the meta device")
    for block in model.blocks:
        if tp > 1:
            with torch.device("meta"):
                block.qkv = ColumnParallelLinear(dim, 3 * dim, tp, bias=False)
                block.out = RowParallelLinear(dim, dim, tp, state.tp_group, bias=False)
                block.mlp.gate_up = ColumnParallelLinear(dim, 2 * hidden, tp, bias=False)
                block.mlp.down = RowParallelLinear(hidden, dim, tp, state.tp_group, bias=False)
        if state.sp > 1:
            block.core = UlyssesPrefixAttention(state.sp, state.sp_group, block.core.backend)
    return model


def _pad_to(x: Tensor, n: int, dim: int) -> Tensor:
    """x padded with zeros along `dim` (counted from the front) to length n."""
    pad = n - x.shape[dim]
    if pad == 0:
        return x
    return F.pad(x, [0, 0] * (x.dim() - 1 - dim) + [0, pad])


def _rope_rows(rope: Rope, rows: slice) -> Rope:
    """The per-sample rows of (B, S, D) tables; (S, D) tables are shared by every row."""
    return Rope(rope.cos[rows], rope.sin[rows]) if rope.cos.dim() == 3 else rope


def _rope_tokens(rope: Rope, n: int, tokens: slice) -> Rope:
    """The tokens `tokens` of tables padded to n tokens (angle 0 on padding), along the token dim."""
    dim = rope.cos.dim() - 2
    return Rope(*(_pad_to(t, n, dim)[(slice(None),) * dim + (tokens,)] for t in (rope.cos, rope.sin)))


class ParallelQwenImage21(nn.Module):
    """A parallelized `QwenImage21Transformer` behind the same call; every rank gets and returns the full batch.

    CFG parallel: a batch that splits into cfg equal parts ([cond; uncond]) runs part c on cfg rank c, from
    `prefill` on (the cache `prefill` returns holds this rank's rows; `forward` must get a batch of the same size);
    one all-gather per step puts the velocity back together. A batch that does not split runs whole everywhere.
    Sequence parallel: tokens padded to a multiple of sp, rank s runs its part; padded keys are masked."""

    def __init__(self, model: QwenImage21Transformer, state: ParallelState):
        super().__init__()
        self.model = model
        self.cfg = model.cfg
        self.state = state

    @property
    def base(self) -> QwenImage21Transformer:
        return self.model

    def make_rope(self, layout: PrefixLayout, grid: tuple[int, int], device=None) -> tuple[Rope, Rope]:
        return self.model.make_rope(layout, grid, device)

    def modulation(self, timestep: Tensor) -> AdaLN:
        return self.model.modulation(timestep)

    def _rows(self, b: int) -> slice | None:
        st = self.state
        if st.cfg == 1 or b % st.cfg:
            return None
        n = b // st.cfg
        return slice(st.cfg_rank * n, (st.cfg_rank + 1) * n)

    def _tokens(self, n: int) -> tuple[int, slice]:
        """(padded length, this rank's slice) of n tokens split over the sp group."""
        local = -(-n // self.state.sp)
        return local * self.state.sp, slice(self.state.sp_rank * local, (self.state.sp_rank + 1) * local)

    def prefill(
        self,
        text: Tensor,
        text_mask: Tensor | None,
        cond: Tensor | None,
        layout: PrefixLayout,
        rope: Rope,
        timestep: Tensor | None = None,
    ) -> PrefixCache:
        rows = self._rows(text.shape[0])
        if rows is not None:
            text = text[rows]
            text_mask = None if text_mask is None else text_mask[rows]
            cond = None if cond is None else cond[rows]
            timestep = None if timestep is None or timestep.shape[0] == 1 else timestep[rows]
        if self.state.sp == 1:
            return self.model.prefill(text, text_mask, cond, layout, rope, timestep)
        x, key_valid = self.model.embed_prefix(text, text_mask, cond, layout)  # (B, P, dim)
        padded, mine = self._tokens(x.shape[1])
        x = _pad_to(x, padded, 1)[:, mine]
        return self.model.prefill_tokens(x, key_valid, layout.segments, _rope_tokens(rope, padded, mine), timestep)

    def forward(
        self,
        noise: Tensor,
        timestep: Tensor | None,
        cache: PrefixCache,
        rope: Rope,
        modulation: AdaLN | None = None,
        step_cache=None,
    ) -> Tensor:
        """The model's step on this rank's rows (CFG) and tokens (sp). `step_cache`: its statistics count this
        rank's real noise tokens and are summed over every rank, so all ranks cache the same steps."""
        st = self.state
        group = dist.group.WORLD if st.world_size > 1 else None
        b = noise.shape[0]
        rows = self._rows(b)
        if rows is not None:
            noise, rope = noise[rows], _rope_rows(rope, rows)
            timestep = None if timestep is None else timestep[rows]
            if modulation is not None:
                modulation = AdaLN(*(f if f.shape[0] == 1 else f[rows] for f in modulation))
        if st.sp == 1:
            step_cache = None if step_cache is None else step_cache.shard(None, group)
            out = self.model(noise, timestep, cache, rope, modulation, step_cache=step_cache)
        else:
            n = noise.shape[1]
            padded, mine = self._tokens(n)
            if step_cache is not None:
                local = padded // st.sp
                step_cache = step_cache.shard(min(max(n - st.sp_rank * local, 0), local), group)
            key_mask = None
            if padded > n:  # padded noise keys are masked, and with them the prefix padding (cache.lens)
                p = cache.k.shape[2]
                lens = cache.lens or (p,) * noise.shape[0]
                own = torch.arange(padded, device=noise.device) < n
                prefix = torch.arange(p, device=noise.device)[None] < torch.tensor(lens, device=noise.device)[:, None]
                key_mask = torch.cat([own.expand(len(lens), -1), prefix], dim=1)
            x = _pad_to(noise, padded, 1)[:, mine]
            rope_mine = _rope_tokens(rope, padded, mine)
            out = self.model(x, timestep, cache, rope_mine, modulation, key_mask, step_cache=step_cache)
            out = all_gather(out, 1, st.sp_group)[:, :n]  # (B, N, out_channels)
        if rows is not None:
            out = all_gather(out, 0, st.cfg_group)
        if rows is not None or st.sp > 1:
            out = funcol.wait_tensor(out)  # eager funcol results are lazy; the caller gets a finished tensor
        return out
