"""fastdit's DiT reproduces diffusers' QwenImageTransformer2DModel loaded from the same checkpoint."""

import pytest
import torch

from fastdit import load_transformer
from fastdit.models.qwenimage import rope_positions
from tests.dit_utils import rel_err, save_tiny

TOL = 1e-5


@pytest.fixture(scope="module", params=["unsharded", "sharded"])
def pair(request, tmp_path_factory):
    sharded = request.param == "sharded"
    path = tmp_path_factory.mktemp(request.param)
    ref = save_tiny(path, sharded=sharded)
    if sharded:
        assert (path / "diffusion_pytorch_model.safetensors.index.json").exists()
    return ref, load_transformer(path, dtype=torch.float32, device="cpu")


def run_both(ref, ours, h, w, txt_lens, t=(0.8, 0.25), seed=1):
    g = torch.Generator().manual_seed(seed)
    b, n_txt = len(txt_lens), max(txt_lens)
    x = torch.randn(b, h * w, 64, generator=g)
    enc = torch.randn(b, n_txt, 48, generator=g)
    mask = torch.arange(n_txt)[None, :] < torch.tensor(txt_lens)[:, None]
    ts = torch.tensor(t[:b])
    shapes = [[(1, h, w)]] * b
    with torch.no_grad():
        expected = ref(
            hidden_states=x,
            encoder_hidden_states=enc,
            encoder_hidden_states_mask=mask,
            timestep=ts,
            img_shapes=shapes,
        ).sample
        got = ours(x, enc, mask, ts, shapes)
    return got, expected


@pytest.mark.parametrize(
    "h,w,txt_lens",
    [
        (4, 4, [5, 5]),  # square, no padding
        (6, 4, [7, 3]),  # non-square (taller), batch 2 with different text lengths: padding + mask
        (3, 8, [9, 9]),  # non-square (wider), odd height
        (5, 5, [1, 1]),  # a 1-token text
        (4, 6, [1, 6]),  # 1-token text padded next to a longer one
    ],
)
def test_parity_with_diffusers(pair, h, w, txt_lens):
    ref, ours = pair
    got, expected = run_both(ref, ours, h, w, txt_lens)
    assert got.shape == expected.shape == (len(txt_lens), h * w, 64)
    err = rel_err(got, expected)
    assert err <= TOL, f"relative L2 error {err:.3g} > {TOL}"


def test_padding_does_not_change_a_sample(pair):
    """A sample padded with masked text tokens gives the same output as the same sample alone."""
    _, ours = pair
    g = torch.Generator().manual_seed(3)
    x, enc = torch.randn(1, 16, 64, generator=g), torch.randn(1, 4, 48, generator=g)
    t = torch.tensor([0.5])
    with torch.no_grad():
        alone = ours(x, enc, None, t, [(1, 4, 4)])
        padded_enc = torch.cat([enc, torch.randn(1, 3, 48, generator=g) * 100], dim=1)
        mask = torch.tensor([[True] * 4 + [False] * 3])
        padded = ours(x, padded_enc, mask, t, [(1, 4, 4)])
    assert rel_err(padded, alone) <= TOL


def test_batch_of_one_equals_batch_of_two(pair):
    """Batching a sample with a padded neighbour does not change its output."""
    _, ours = pair
    g = torch.Generator().manual_seed(4)
    x, enc = torch.randn(2, 16, 64, generator=g), torch.randn(2, 5, 48, generator=g)
    mask = torch.tensor([[True] * 5, [True] * 2 + [False] * 3])
    t = torch.tensor([0.6, 0.6])
    with torch.no_grad():
        both = ours(x, enc, mask, t, [[(1, 4, 4)]] * 2)
        first = ours(x[:1], enc[:1], None, t[:1], [[(1, 4, 4)]])
    assert rel_err(both[:1], first) <= TOL


def test_rope_positions_centre_the_image_and_put_text_past_it():
    pos = rope_positions([(1, 3, 4)], txt_len=2)
    # text last: (m, m, m), (m+1, ...) with m = max(3 // 2, 4 // 2) = 2
    assert pos[-2:].tolist() == [[2, 2, 2], [3, 3, 3]]
    img = pos[:-2].view(3, 4, 3)
    assert img[:, 0, 1].tolist() == [-2, -1, 0]  # rows -(h - h//2) .. h//2 - 1
    assert img[0, :, 2].tolist() == [-2, -1, 0, 1]
    assert (img[..., 0] == 0).all()


@pytest.mark.parametrize("h,w,txt_lens", [(6, 4, [7, 3]), (4, 6, [1, 6]), (4, 4, [2, 5, 5])])
def test_text_lengths_instead_of_a_mask(pair, h, w, txt_lens):
    """With host-side text lengths, attention runs unmasked per sample: same output as diffusers' masked one."""
    ref, ours = pair
    g = torch.Generator().manual_seed(7)
    b, n_txt = len(txt_lens), max(txt_lens)
    x, enc = torch.randn(b, h * w, 64, generator=g), torch.randn(b, n_txt, 48, generator=g)
    mask = torch.arange(n_txt)[None, :] < torch.tensor(txt_lens)[:, None]
    ts, shapes = torch.rand(b, generator=g), [[(1, h, w)]] * b
    with torch.no_grad():
        expected = ref(
            hidden_states=x, encoder_hidden_states=enc, encoder_hidden_states_mask=mask, timestep=ts, img_shapes=shapes
        ).sample
        got = ours(x, enc, mask, ts, shapes, txt_lens=tuple(txt_lens))
    assert rel_err(got, expected) <= TOL
