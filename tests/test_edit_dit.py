"""The DiT with reference images and `zero_cond_t` (Qwen-Image-Edit-2511) against diffusers' model, and its fast
paths: the modulation tables, regional compile without graph breaks or recompiles (also across reference sizes),
fp8 (emulated on CPU)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from fastdit import load_transformer
from fastdit.errors import ConfigError
from fastdit.models.qwenimage import DiTConfig
from fastdit.runtime.compile import compile_blocks, dynamic_tokens
from tests.dit_utils import rel_err, save_tiny

TOL = 1e-5


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(diffusers QwenImageTransformer2DModel(zero_cond_t=True), fastdit's model loaded from its folder)."""
    path = tmp_path_factory.mktemp("zero-cond-t")
    ref = save_tiny(path, seed=7, zero_cond_t=True)
    return ref, load_transformer(path, dtype=torch.float32, device="cpu")


def inputs(layout, txt_lens=(7, 4), seed=0):
    """A CFG-style batch of 2 over `layout` (target first, then references): latents, text, mask, img_shapes."""
    g = torch.Generator().manual_seed(seed)
    n = sum(f * h * w for f, h, w in layout)
    n_txt = max(txt_lens)
    x = torch.randn(2, n, 64, generator=g)
    enc = torch.randn(2, n_txt, 48, generator=g)
    mask = torch.arange(n_txt)[None, :] < torch.tensor(txt_lens)[:, None]
    return x, enc, mask, [list(layout)] * 2


def reference_output(ref, x, enc, mask, t, shapes):
    with torch.no_grad():
        return ref(
            hidden_states=x, encoder_hidden_states=enc, encoder_hidden_states_mask=mask, timestep=t, img_shapes=shapes
        ).sample


LAYOUTS = {
    "one-ref": [(1, 4, 6), (1, 3, 5)],
    "two-refs": [(1, 4, 6), (1, 5, 4), (1, 2, 7)],
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_zero_cond_t_matches_diffusers(pair, layout):
    """Reference tokens at t = 0, target and text at t: diffusers' output, per sample timesteps (AdaLN computed in
    the call), and from the modulation table with text lengths (the pipeline's path)."""
    ref, ours = pair
    x, enc, mask, shapes = inputs(LAYOUTS[layout])
    expected = reference_output(ref, x, enc, mask, torch.tensor([0.8, 0.3]), shapes)
    with torch.inference_mode():
        per_step = ours(x, enc, mask, torch.tensor([0.8, 0.3]), shapes)
        table = ours.modulation_table(torch.tensor([0.6, 0.3]))
        index = ours.modulation_index(shapes)
        from_table = ours(x, enc, mask, None, shapes, txt_lens=(7, 4), modulation=table[1], mod_index=index)
    assert rel_err(per_step, expected) <= TOL
    same_t = reference_output(ref, x, enc, mask, torch.tensor([0.3, 0.3]), shapes)
    assert rel_err(from_table, same_t) <= TOL
    n_target = 24
    assert index.shape == (x.shape[1],) and not index[:n_target].any() and index[n_target:].all()


def test_t0_table_is_shared_and_reference_modulation_equals_it(pair):
    """The t = 0 vectors are one tensor for all steps, equal to what a call without the table computes."""
    _, ours = pair
    with torch.inference_mode():
        table = ours.modulation_table(torch.tensor([0.9, 0.5, 0.1]))
        assert all(m.ref is table[0].ref for m in table)
        assert table[0].ref.shape == (2, 1, 6 * ours.cfg.dim)
        assert rel_err(table[0].ref, ours.reference_modulation()) <= 1e-6


def test_no_reference_images_means_no_per_token_work(pair, tmp_path):
    """A zero_cond_t model over one image: no token index, and the same output as the model without zero_cond_t
    on the same weights (and as diffusers' zero_cond_t model); a model without zero_cond_t refuses an index."""
    ref, ours = pair
    x, enc, mask, shapes = inputs([(1, 4, 6)])
    assert ours.modulation_index(shapes) is None
    t = torch.tensor([0.7, 0.7])
    save_tiny(tmp_path, seed=7)  # the same weights, zero_cond_t off
    plain = load_transformer(tmp_path, dtype=torch.float32, device="cpu")
    assert DiTConfig.from_diffusers({"zero_cond_t": True}).zero_cond_t and not plain.cfg.zero_cond_t
    with torch.inference_mode():
        out = ours(x, enc, mask, t, shapes)
        assert torch.equal(out, plain(x, enc, mask, t, shapes))
        with pytest.raises(ConfigError, match="zero_cond_t model only"):
            plain(x, enc, mask, t, rope=plain.make_rope(shapes, 7), mod_index=torch.zeros(24, dtype=torch.bool))
    assert rel_err(out, reference_output(ref, x, enc, mask, t, shapes)) <= TOL


def test_fp8_emulated_with_references(pair, tmp_path):
    """fp8 block linears (emulated on CPU) with zero_cond_t and two references: close to the float model."""
    _, ours = pair
    save_tiny(tmp_path, seed=7, zero_cond_t=True)
    fp8 = load_transformer(tmp_path, dtype=torch.float32, device="cpu", quantize="fp8-emulated")
    x, enc, mask, shapes = inputs(LAYOUTS["two-refs"])
    with torch.inference_mode():
        table = fp8.modulation_table(torch.tensor([0.5]))
        got = fp8(x, enc, mask, None, shapes, txt_lens=(7, 4), modulation=table[0])
        exact = ours(
            x, enc, mask, None, shapes, txt_lens=(7, 4), modulation=ours.modulation_table(torch.tensor([0.5]))[0]
        )
    assert 0 < rel_err(got, exact) < 0.08


def _unique_graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("per_dim", [True, False], ids=["per-dim-entries", "whole-tensor-entries"])
def test_regional_compile_no_breaks_no_recompiles_across_steps_and_reference_sizes(tmp_path, per_dim, monkeypatch):
    """compile_blocks (fastdit's inductor backend) with the token counts symbolic (`dynamic_tokens`, as the edit
    pipeline runs): the first step compiles one block graph and one final-layer graph; the other steps, a new
    reference size, a new text length and new text lengths per sample compile nothing; compiled == eager. (A
    batch without text padding, or of another size, is another variant of the graphs: compiled once too.)
    Both ways of naming the token dims: per dim (torch >= 2.13) and whole tensors (the releases before)."""
    import fastdit.runtime.compile

    if per_dim and not fastdit.runtime.compile._per_dim_entries():
        pytest.skip("this torch has no per-dim dynamic_sources entries")
    monkeypatch.setattr(fastdit.runtime.compile, "_per_dim_entries", lambda: per_dim)
    save_tiny(tmp_path, seed=8, zero_cond_t=True)
    model = load_transformer(tmp_path, dtype=torch.float32, device="cpu")
    calls = [
        (LAYOUTS["one-ref"], (7, 4)),
        (LAYOUTS["two-refs"], (9, 5)),  # a second reference, and longer texts
        ([(1, 4, 6), (1, 6, 6)], (8, 3)),  # a larger reference
    ]

    def run_steps(layout, lens):
        x, enc, mask, shapes = inputs(layout, lens)
        with torch.inference_mode(), dynamic_tokens():
            table = model.modulation_table(torch.tensor([0.9, 0.5, 0.1]))
            index = model.modulation_index(shapes)
            rope = model.make_rope(shapes, enc.shape[1])
            return [model(x, enc, mask, None, rope=rope, txt_lens=lens, modulation=m, mod_index=index) for m in table]

    with torch.inference_mode():
        x, enc, mask, shapes = inputs(LAYOUTS["one-ref"])
        explanation = torch._dynamo.explain(model)(x, enc, mask, torch.tensor([0.5, 0.5]), shapes)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    eager = [run_steps(*c) for c in calls]
    torch._dynamo.reset()
    compile_blocks(model)
    before = _unique_graphs()
    first = run_steps(*calls[0])[:1]
    assert _unique_graphs() - before == 2  # the block graph (shared by every block) and the final layer's
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = [first + run_steps(*calls[0])[1:], run_steps(*calls[1]), run_steps(*calls[2])]
    for outs, refs in zip(compiled, eager, strict=True):
        for out, expected in zip(outs, refs, strict=True):
            assert rel_err(out, expected) <= TOL
