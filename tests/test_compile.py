"""torch.compile(fullgraph=True) traces the whole DiT with no graph break and does not recompile."""

import pytest
import torch
import torch._dynamo

from fastdit import compile_blocks, load_transformer
from tests.dit_utils import rel_err, save_tiny


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    save_tiny(path)
    return load_transformer(path, dtype=torch.float32, device="cpu")


def inputs(b=2, h=4, w=6, n_txt=5, seed=0, masked=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h * w, 64, generator=g)
    enc = torch.randn(b, n_txt, 48, generator=g)
    mask = torch.ones(b, n_txt, dtype=torch.bool)
    mask[-1, n_txt // 2 :] = False
    t = torch.rand(b, generator=g)
    return x, enc, (mask if masked else None), t, [[(1, h, w)]] * b


@pytest.mark.parametrize("masked", [True, False])
def test_fullgraph_compile_matches_eager_and_does_not_recompile(model, masked):
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    args = inputs(masked=masked)
    with torch.no_grad():
        eager = model(*args)
        out = compiled(*args)
        assert rel_err(out, eager) <= 1e-5
        # New values, same shapes: must reuse the graph.
        with torch._dynamo.config.patch(error_on_recompile=True):
            args2 = inputs(seed=1, masked=masked)
            out2 = compiled(*args2)
            out3 = compiled(*args2)
    assert rel_err(out2, model(*args2)) <= 1e-5
    assert torch.equal(out2, out3)


def test_no_graph_breaks_reported_by_explain(model):
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(*inputs())
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_precomputed_rope_gives_the_same_output(model):
    x, enc, mask, t, shapes = inputs()
    rope = model.make_rope(shapes, enc.shape[1], device="cpu")
    with torch.no_grad():
        assert torch.equal(model(x, enc, mask, t, shapes), model(x, enc, mask, t, rope=rope))


def test_regional_compile_reuses_one_block_graph(tmp_path):
    """compile_blocks compiles each block in place; all blocks share one compiled graph."""
    save_tiny(tmp_path, seed=2)
    model = load_transformer(tmp_path, dtype=torch.float32, device="cpu")
    args = inputs()
    with torch.no_grad():
        eager = model(*args)
        torch._dynamo.reset()
        compile_blocks(model, backend="inductor")
        # The second block (and the second call) must hit the graph compiled for the first block.
        with torch._dynamo.config.patch(error_on_recompile=True):
            out = model(*args)
            out_again = model(*args)
    assert rel_err(out, eager) <= 1e-5
    assert torch.equal(out, out_again)


def test_text_lengths_compile_without_breaks_or_recompiles_per_step(model):
    """The per-sample unmasked attention (txt_lens) traces into one graph; repeated steps reuse it."""
    x, enc, mask, t, shapes = inputs(n_txt=6)
    lens = (6, 3)
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(x, enc, mask, t, shapes, txt_lens=lens)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="inductor")
        first = compiled(x, enc, mask, t, shapes, txt_lens=lens)
        with torch._dynamo.config.patch(error_on_recompile=True):
            again = compiled(x, enc, mask, t, shapes, txt_lens=lens)
    assert torch.equal(first, again)
    assert rel_err(first, model(x, enc, mask, t, shapes)) <= 1e-5


def _steps(n_steps=3, b=2):
    timesteps = torch.tensor([0.9, 0.55, 0.2])[:n_steps]
    return timesteps, [timesteps[i].expand(b) for i in range(n_steps)]


def test_modulation_table_gives_the_same_output(model):
    """Precomputed AdaLN vectors (one GEMM per layer for all steps) == computing them in every step."""
    x, enc, mask, _, shapes = inputs()
    timesteps, per_step = _steps()
    with torch.no_grad():
        table = model.modulation_table(timesteps)
        assert len(table) == 3 and table[0].img.shape == (len(model.blocks), 1, 6 * model.cfg.dim)
        for t, mod in zip(per_step, table, strict=True):
            assert rel_err(model(x, enc, mask, t, shapes, modulation=mod), model(x, enc, mask, t, shapes)) <= 1e-6


def test_regional_compile_with_the_modulation_table_reuses_one_graph_across_steps(tmp_path):
    """fastdit's default compile backend (fastdit.runtime.compile) on every block; the steps of a denoising loop,
    each with its own table entry, hit the graph compiled for the first block of the first step."""
    save_tiny(tmp_path, seed=3)
    model = load_transformer(tmp_path, dtype=torch.float32, device="cpu")
    x, enc, mask, _, shapes = inputs()
    timesteps, per_step = _steps()
    with torch.no_grad():
        table = model.modulation_table(timesteps)
        eager = [model(x, enc, mask, t, shapes, modulation=m) for t, m in zip(per_step, table, strict=True)]
        torch._dynamo.reset()
        compile_blocks(model)
        first = model(x, enc, mask, per_step[0], shapes, modulation=table[0])
        with torch._dynamo.config.patch(error_on_recompile=True):
            rest = [model(x, enc, mask, t, shapes, modulation=m) for t, m in zip(per_step[1:], table[1:], strict=True)]
    for out, ref in zip([first, *rest], eager, strict=True):
        assert rel_err(out, ref) <= 1e-5
