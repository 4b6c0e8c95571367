"""fastdit's Qwen-Image 2.1 DiT reproduces diffusers' QwenImage21Transformer2DModel loaded from the same
checkpoint, with and without the prefix K/V cache; its blocks compile without graph breaks or recompiles; bad
checkpoints raise CheckpointError naming the key."""

import json
import shutil

import pytest
import torch
import torch._dynamo
from safetensors.torch import load_file, save_file

from fastdit.errors import CheckpointError, ConfigError
from fastdit.load import load_transformer
from fastdit.models.layers import Rope
from fastdit.models.qwenimage21 import PRESETS, QwenImage21Transformer, cat_prefix_caches
from fastdit.models.qwenimage21_keys import checkpoint_keys
from fastdit.models.qwenimage21_layout import prefix_layout, rope_positions
from tests.dit_utils import rel_err

TOL = 1e-5
SINGLE = "diffusion_pytorch_model.safetensors"
TINY = dict(
    num_layers=2,
    attention_head_dim=32,
    num_attention_heads=2,
    context_in_dim=48,
    in_channels=16,
    out_channels=16,
    axes_dims_rope=(8, 12, 12),
)


def tiny_reference(seed=0, **overrides):
    """diffusers' model with every parameter (norm weights too) drawn at random."""
    from diffusers import QwenImage21Transformer2DModel

    torch.manual_seed(seed)
    ref = QwenImage21Transformer2DModel(**{**TINY, **overrides})
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.2)
    return ref.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("q21")
    ref = tiny_reference()
    ref.save_pretrained(path)
    return path, ref


@pytest.fixture(scope="module")
def pair(saved):
    path, ref = saved
    return ref, load_transformer(path, dtype=torch.float32, device="cpu")


class Case:
    """One prompt layout: T text-encoder positions with vision slots, condition images, a noise grid, a batch."""

    def __init__(self, grid, cond_grids=(), adjacent=False, text_len=7, pads=None, seed=0):
        g = torch.Generator().manual_seed(seed)
        slots = [False] * 2  # two text tokens, then each image's slot run (followed by a text token unless adjacent)
        for h, w in cond_grids:
            slots += [True] * (h * w // 4) + ([] if adjacent else [False])
        slots += [False] * (text_len - slots.count(False))
        self.slots, self.cond_grids, self.grid = slots, list(cond_grids), grid
        b, t, n = len(pads or [0, 0]), len(slots), grid[0] * grid[1]
        self.enc = torch.randn(b, t, 48, generator=g)
        # pads[i]: sample i's text is right-padded by that many positions (the pipeline's padding)
        self.mask = None if pads is None else torch.arange(t)[None] < t - torch.tensor(pads)[:, None]
        n_cond = sum(h * w for h, w in cond_grids)
        self.cond = torch.randn(b, n_cond, 16, generator=g) if cond_grids else None
        self.noise = [torch.randn(b, n, 16, generator=g) for _ in range(2)]
        self.t = [torch.tensor([0.9, 0.7, 0.5][:b]), torch.tensor([0.4, 0.35, 0.2][:b])]

    def reference(self, ref, step, **kwargs):
        """diffusers' velocity for the noise tokens of `step`."""
        b, n = self.noise[step].shape[:2]
        img_mask = torch.tensor(self.slots + [True] * (n // 4))[None].expand(b, -1)
        latents = self.noise[step] if self.cond is None else torch.cat([self.cond, self.noise[step]], dim=1)
        shapes = [[(1, h, w) for h, w in [*self.cond_grids, self.grid]]] * b
        out = ref(
            hidden_states=latents,
            encoder_hidden_states=self.enc,
            encoder_hidden_states_mask=self.mask,
            timestep=self.t[step],
            img_shapes=shapes,
            img_mask=img_mask,
            **kwargs,
        ).sample
        return out[:, -n:]

    def prefill(self, ours, timestep=None):
        layout = prefix_layout(self.slots, self.cond_grids)
        prefix_rope, noise_rope = ours.make_rope(layout, self.grid)
        return ours.prefill(self.enc, self.mask, self.cond, layout, prefix_rope, timestep), noise_rope


CASES = {
    "square": dict(grid=(4, 4)),
    "non-square": dict(grid=(4, 6)),
    "padded text": dict(grid=(6, 4), text_len=9, pads=[0, 4]),
    "condition image": dict(grid=(4, 4), cond_grids=[(4, 2)]),
    "two condition images, padded": dict(grid=(4, 4), cond_grids=[(2, 2), (2, 6)], pads=[2, 0]),
    "two adjacent condition images, padded": dict(
        grid=(2, 6), cond_grids=[(2, 4), (4, 6)], adjacent=True, text_len=9, pads=[0, 3]
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_parity_without_the_cache(pair, name):
    """Prefix and noise recomputed at every call (diffusers without kv_cache): relative L2 <= 1e-5."""
    ref, ours = pair
    case = Case(**CASES[name])
    with torch.no_grad():
        for step in range(2):
            cache, rope = case.prefill(ours)
            got = ours(case.noise[step], case.t[step], cache, rope)
            expected = case.reference(ref, step)
            assert got.shape == expected.shape
            assert rel_err(got, expected) <= TOL


@pytest.mark.parametrize("name", CASES)
def test_parity_with_the_prefix_cache_over_two_steps(pair, name):
    """One prefill, then two steps with different noise and timesteps, against diffusers' "extract" step and its
    "cached" step."""
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

    ref, ours = pair
    case = Case(**CASES[name])
    ref_cache = QwenImage21KVCache(len(ref.transformer_blocks))
    with torch.no_grad():
        cache, rope = case.prefill(ours)
        for step, mode in enumerate(("extract", "cached")):
            expected = case.reference(ref, step, kv_cache=ref_cache, kv_cache_mode=mode)
            assert rel_err(ours(case.noise[step], case.t[step], cache, rope), expected) <= TOL


def test_separately_prefilled_prompts_batch_like_separate_calls(pair):
    """Two prompts of different lengths (a prompt and its negative), each prefilled alone, then denoised in one
    batch with per-sample noise RoPE: the same as two diffusers calls."""
    ref, ours = pair
    cases = [Case(grid=(4, 4), cond_grids=[(2, 4)], text_len=n, seed=n) for n in (8, 5)]
    with torch.no_grad():
        prefilled = [case.prefill(ours) for case in cases]
        cache = cat_prefix_caches([c for c, _ in prefilled])
        # The noise's frame position follows its prompt's length: per-sample (B, N, D) tables.
        rope = Rope(*(torch.cat([getattr(r, f).expand(2, -1, -1) for _, r in prefilled]) for f in ("cos", "sin")))
        noise = torch.cat([case.noise[0] for case in cases])
        t = torch.cat([case.t[0] for case in cases])
        got = ours(noise, t, cache, rope)
        expected = torch.cat([case.reference(ref, 0) for case in cases])
    assert cache.lens is not None
    assert rel_err(got, expected) <= TOL


def test_parity_without_causal_condition(tmp_path):
    """A causal_condition=false checkpoint modulates the prefix from the step's timestep: prefill(timestep=t)."""
    ref = tiny_reference(seed=1, causal_condition=False)
    ref.save_pretrained(tmp_path)
    ours = load_transformer(tmp_path, dtype=torch.float32, device="cpu")
    case = Case(grid=(4, 6), cond_grids=[(2, 4)], pads=[0, 2])
    with torch.no_grad():
        cache, rope = case.prefill(ours, timestep=case.t[1])
        assert rel_err(ours(case.noise[1], case.t[1], cache, rope), case.reference(ref, 1)) <= TOL
        with pytest.raises(ConfigError, match="timestep"):
            case.prefill(ours)


def test_rope_positions_follow_the_text_and_centre_each_image():
    """Text advances one position on all axes; an image sits at one frame, centred, and advances max(h, w)."""
    layout = prefix_layout([False, False, True, True, False], [(2, 4)])
    pos = rope_positions(layout, (2, 2))
    assert pos[:2].tolist() == [[0, 0, 0], [1, 1, 1]]
    image = pos[2:10]
    assert (image[:, 0] == 2).all()
    assert image[:, 1].tolist() == [-1] * 4 + [0] * 4 and image[:4, 2].tolist() == [-2, -1, 0, 1]
    assert pos[10].tolist() == [6, 6, 6]  # 2 + max(2, 4)
    assert pos[11:].tolist() == [[7, -1, -1], [7, -1, 0], [7, 0, -1], [7, 0, 0]]


def test_layouts_whose_slots_do_not_fit_the_images_are_refused():
    with pytest.raises(ConfigError, match="cond_grids"):
        prefix_layout([False, True, True, False], [(2, 2)])  # 8 latent tokens of slots, 4 of image
    with pytest.raises(ConfigError, match="2 condition images"):
        prefix_layout([False, True, False], [(2, 2), (2, 2)])


def test_blocks_compile_without_breaks_or_recompiles_across_steps(saved):
    """torch.compile(fullgraph=True) of each block; two cached steps with different timesteps and noise reuse the
    graph compiled for the first block of the first step; the prefill traces without graph breaks."""
    path, _ = saved
    model = load_transformer(path, dtype=torch.float32, device="cpu")
    case = Case(grid=(4, 6), cond_grids=[(2, 4)], pads=[3, 0])
    with torch.no_grad():
        cache, rope = case.prefill(model)
        eager = [model(case.noise[s], case.t[s], cache, rope) for s in range(2)]
        layout = prefix_layout(case.slots, case.cond_grids)
        x = torch.randn(2, len(layout.source), model.cfg.dim)
        key_valid = torch.ones(x.shape[:2], dtype=torch.bool)
        key_valid[0, -3:] = False
        prefix_rope = model.make_rope(layout, case.grid)[0]
        explained = torch._dynamo.explain(model.blocks[0].prefill)(
            x, model.modulation(torch.zeros(1)), prefix_rope, layout.segments, key_valid
        )
        assert explained.graph_break_count == 0, explained.break_reasons
        torch._dynamo.reset()
        for block in model.blocks:
            block.compile(fullgraph=True, backend="inductor")
        first = model(case.noise[0], case.t[0], cache, rope)
        with torch._dynamo.config.patch(error_on_recompile=True):
            second = model(case.noise[1], case.t[1], cache, rope)
    assert rel_err(first, eager[0]) <= TOL and rel_err(second, eager[1]) <= TOL


def test_every_parameter_maps_to_checkpoint_keys_that_exist(saved):
    path, _ = saved
    keys = set(load_file(path / SINGLE))
    with torch.device("meta"):
        model = QwenImage21Transformer(PRESETS["tiny"])
    used = [k for name, _ in model.named_parameters() for k in checkpoint_keys(name)]
    assert len(used) == len(set(used)) and set(used) == keys


@pytest.fixture
def copy(saved, tmp_path):
    return shutil.copytree(saved[0], tmp_path / "ckpt")


def expect_error(path, *needles):
    with pytest.raises(CheckpointError) as exc:
        load_transformer(path, dtype=torch.float32, device="cpu")
    for needle in needles:
        assert needle in str(exc.value), f"{needle!r} not in: {exc.value}"


def test_missing_key(copy):
    sd = load_file(copy / SINGLE)
    del sd["transformer_blocks.1.attn.to_k.weight"]
    save_file(sd, copy / SINGLE)
    expect_error(copy, "missing", "transformer_blocks.1.attn.to_k.weight")


def test_mis_shaped_key(copy):
    sd = load_file(copy / SINGLE)
    sd["transformer_blocks.0.img_mlp.gate_layer.weight"] = torch.zeros(100, 64)
    save_file(sd, copy / SINGLE)
    expect_error(copy, "shape mismatch", "transformer_blocks.0.img_mlp.gate_layer.weight", SINGLE)


def test_a_folder_of_another_model_is_refused(copy):
    """A transformer folder whose config names a DiT fastdit does not run is refused naming config.json and it."""
    cfg = json.loads((copy / "config.json").read_text())
    cfg["_class_name"] = "FluxTransformer2DModel"
    (copy / "config.json").write_text(json.dumps(cfg))
    expect_error(copy, "config.json", "FluxTransformer2DModel")
