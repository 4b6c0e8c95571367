"""Tensor, Ulysses sequence and CFG parallelism applied to the DiT from outside the model file.

`parallelize(model, state)` swaps modules of a model built on the meta device (before loading):

    attn.img_qkv, attn.txt_qkv, img_mlp.fc1, txt_mlp.fc1   ColumnParallelLinear (q, k, v each sharded by heads)
    attn.img_out, attn.txt_out, img_mlp.fc2, txt_mlp.fc2   RowParallelLinear (one all-reduce each)
    img_mod.lin, txt_mod.lin                               replicated (default) or column-parallel + all-gather
    attn.core                                              UlyssesAttention when sp > 1

`JointAttention` derives the head count from tensor shapes, so a rank holding num_heads / tp heads needs
no change in the model file. `shard_plan` tells the loader which slice of each checkpoint tensor this rank
reads; the fused Q/K/V weight of rank r is exactly [q_r; k_r; v_r] because each source is sliced before
fusing.

`ParallelTransformer` wraps the parallelized model with the same call as `QwenImageTransformer`
(so the pipeline uses either): CFG rows split over the cfg group, image tokens padded and split over the
sp group, the model's own `prepare` / blocks / final layer run on the local part, outputs gathered back.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import Tensor, nn

from fastdit.errors import ConfigError
from fastdit.models.layers import Rope
from fastdit.models.qwenimage import DiTConfig, QwenImageTransformer, StepModulation
from fastdit.parallel.layers import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear, all_gather
from fastdit.parallel.state import ParallelState
from fastdit.parallel.ulysses import UlyssesAttention


def check_parallel_config(cfg: DiTConfig, tp: int, sp: int) -> None:
    """Heads are split over tp (weights) and then over sp (Ulysses): both must divide them."""
    if cfg.num_heads % (tp * sp):
        fits = [d for d in range(1, cfg.num_heads + 1) if cfg.num_heads % d == 0]
        raise ConfigError(
            f"the model has {cfg.num_heads} attention heads, not divisible by tp x sp = {tp} x {sp} = {tp * sp}; "
            f"choose tp x sp among {fits}"
        )


def parallelize(model: QwenImageTransformer, state: ParallelState, shard_modulation: bool = False):
    """Swap the DiT's layers for tensor/sequence-parallel ones, in place; returns the model.

    Call on a model built on the meta device, then load with `shard_plan(model, state)`. Modulation is
    replicated by default: its output (B, 6 * dim) is needed whole on every rank, so sharding it saves
    memory (about a third of the DiT's weights) at the price of one all-gather per stream and block.
    """
    cfg = model.cfg
    check_parallel_config(cfg, state.tp, state.sp)
    tp, dim, hidden = state.tp, cfg.dim, cfg.mlp_ratio * cfg.dim
    if tp > 1 and any(p.device.type != "meta" for p in model.parameters()):
        raise ConfigError("parallelize() swaps layers before loading: build the model on the meta device")
    for block in model.blocks:
        with torch.device("meta"):
            if tp > 1:
                attn = block.attn
                attn.img_qkv = ColumnParallelLinear(dim, 3 * dim, tp)
                attn.txt_qkv = ColumnParallelLinear(dim, 3 * dim, tp)
                attn.img_out = RowParallelLinear(dim, dim, tp, state.tp_group)
                attn.txt_out = RowParallelLinear(dim, dim, tp, state.tp_group)
                for mlp in (block.img_mlp, block.txt_mlp):
                    mlp.fc1 = ColumnParallelLinear(dim, hidden, tp)
                    mlp.fc2 = RowParallelLinear(hidden, dim, tp, state.tp_group)
                for mod in (block.img_mod, block.txt_mod):
                    mod.lin = (
                        ColumnParallelLinear(dim, 6 * dim, tp, group=state.tp_group, gather_output=True)
                        if shard_modulation
                        else ReplicatedLinear(dim, 6 * dim)
                    )
        if state.sp > 1:
            block.attn.core = UlyssesAttention(state.sp, state.sp_rank, state.sp_group, block.attn.core.backend)
    return model


def shard_plan(model: nn.Module, state: ParallelState) -> Callable[[str], tuple[int, int, int] | None]:
    """Parameter name -> the slice this rank reads, (dim, rank, world) (None: the whole tensor), from the swapped
    layer types; the loader's `fastdit.checkpoint.ShardSpec`."""
    specs: dict[str, tuple[int, int, int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, ColumnParallelLinear) and module.world > 1:
            # weight_scale: the per-row fp8 scales of a saved fp8 checkpoint (fastdit.quant.fp8) go with their rows.
            spec = (0, state.tp_rank, state.tp)
            specs[f"{name}.weight"] = specs[f"{name}.bias"] = specs[f"{name}.weight_scale"] = spec
        elif isinstance(module, RowParallelLinear) and module.world > 1:
            specs[f"{name}.weight"] = (1, state.tp_rank, state.tp)  # bias: whole, added once
    return specs.get


def _pad_tokens(x: Tensor, n: int, dim: int) -> Tensor:
    if n == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim) + [0, n]  # F.pad lists dims from the last one
    return F.pad(x, pad)


class ParallelTransformer(nn.Module):
    """A parallelized `QwenImageTransformer` behind the same call; every rank gets and returns the full batch.

    CFG parallel: the batch [cond; uncond] is split into cfg equal parts, cfg rank c runs part c, and one
    all-gather per call puts the prediction back together (a batch that does not split evenly runs whole
    on every cfg rank). Sequence parallel: see `_forward_local`.
    """

    def __init__(self, model: QwenImageTransformer, state: ParallelState):
        super().__init__()
        self.model = model
        self.cfg = model.cfg
        self.state = state

    @property
    def base(self) -> QwenImageTransformer:
        return self.model

    def make_rope(self, img_shapes, txt_len: int, device=None) -> Rope:
        return self.model.make_rope(img_shapes, txt_len, device)

    def modulation_table(self, timesteps: Tensor) -> list[StepModulation]:
        # With sharded modulation each layer all-gathers: every rank must call this together (the pipeline does).
        return self.model.modulation_table(timesteps)

    def modulation_index(self, img_shapes, device=None) -> Tensor | None:
        return self.model.modulation_index(img_shapes, device)

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
        st = self.state
        if rope is None:
            rope = self.model.make_rope(img_shapes, encoder_hidden_states.shape[1], hidden_states.device)
        if mod_index is None and img_shapes is not None and self.cfg.zero_cond_t:
            mod_index = self.model.modulation_index(img_shapes, hidden_states.device)
        b = hidden_states.shape[0]
        split = st.cfg > 1 and b % st.cfg == 0
        if split:
            n = b // st.cfg
            rows = slice(st.cfg_rank * n, (st.cfg_rank + 1) * n)
            hidden_states, encoder_hidden_states, timestep = (
                hidden_states[rows],
                encoder_hidden_states[rows],
                timestep[rows],
            )
            if encoder_hidden_states_mask is not None:
                encoder_hidden_states_mask = encoder_hidden_states_mask[rows]
            if txt_lens is not None:
                txt_lens = tuple(txt_lens[rows])
        local = (hidden_states, encoder_hidden_states, encoder_hidden_states_mask, timestep, rope, txt_lens)
        out = self._forward_local(*local, modulation, cache, mod_index)
        if split:
            out = all_gather(out, 0, st.cfg_group)  # (B, S_img, out_dim), rank order
        if split or st.sp > 1:
            # Eager funcol results are lazy (AsyncCollectiveTensor); the caller gets a finished tensor.
            out = funcol.wait_tensor(out)
        return out

    def _forward_local(
        self,
        hidden: Tensor,
        enc: Tensor,
        mask: Tensor | None,
        timestep: Tensor,
        rope: Rope,
        txt_lens=None,
        modulation: StepModulation | None = None,
        cache=None,
        mod_index: Tensor | None = None,
    ):
        """One cfg part. With sp ranks, pad S_img to a multiple of sp, run tokens [r * L, (r + 1) * L) here.

        `cache` (fastdit.cache.CachedLoop): its statistics count this rank's real image tokens and are summed over
        every rank, so that all ranks skip the same steps (and the collectives of the blocks skipped).
        The per-token modulation index (zero_cond_t) is split with the tokens: a rank's part may hold target and
        reference tokens both (the boundary falls where it falls); padded tokens get the target's modulation, and
        their keys are masked and their outputs dropped, so it does not matter which."""
        st, model = self.state, self.model
        group = dist.group.WORLD if st.world_size > 1 else None
        if st.sp == 1:
            cache = None if cache is None else cache.shard(None, group)
            return model(
                hidden,
                enc,
                mask,
                timestep,
                rope=rope,
                txt_lens=txt_lens,
                modulation=modulation,
                cache=cache,
                mod_index=mod_index,
            )
        b, s_img = hidden.shape[:2]
        n_txt = enc.shape[1]
        local = -(-s_img // st.sp)
        pad = local * st.sp - s_img
        if cache is not None:
            cache = cache.shard(min(max(s_img - st.sp_rank * local, 0), local), group)
        mine = slice(st.sp_rank * local, (st.sp_rank + 1) * local)
        x = _pad_tokens(hidden, pad, 1)[:, mine]  # (B, L, in_channels)
        # RoPE rows of [this rank's image tokens; text]; padded positions get angle 0 (their keys are masked).
        cos_i, sin_i = (
            _pad_tokens(rope.cos[:s_img], pad, 0)[mine],
            _pad_tokens(rope.sin[:s_img], pad, 0)[mine],
        )
        rope_local = Rope(torch.cat([cos_i, rope.cos[s_img:]]), torch.cat([sin_i, rope.sin[s_img:]]))
        inp = model.prepare(x, enc, None, timestep if modulation is None else None, rope=rope_local)
        # The global key mask over [all padded image tokens; text]: attention sees the whole sequence.
        key_mask = None
        if mask is not None or pad:
            txt_mask = mask.to(torch.bool) if mask is not None else enc.new_ones(b, n_txt, dtype=torch.bool)
            img_mask = (torch.arange(local * st.sp, device=hidden.device) < s_img).expand(b, -1)
            key_mask = torch.cat([img_mask, txt_mask], dim=1)
        txt_lens = None if pad else txt_lens  # padded image keys need the mask
        index = None if mod_index is None else _pad_tokens(mod_index, pad, 0)[mine]  # (L,) bool
        out = model.run_blocks(inp.img, inp.txt, inp.temb, rope_local, key_mask, txt_lens, modulation, cache, index)
        out = all_gather(out, 1, st.sp_group)  # (B, sp * L, out_dim)
        return out[:, :s_img]
