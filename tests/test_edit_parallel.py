"""Editing under tensor, sequence and CFG parallelism on CPU (gloo): each layout gives the one-process result.

One group of 2 ranks runs everything (spawned processes are expensive): the zero_cond_t DiT with reference tokens
under tp=2, sp=2 and cfg=2, where under sp=2 the target / reference boundary falls inside a rank's part of the
image tokens (with and without padded tokens); sp=2 compiled with symbolic token counts over two reference sizes;
and the Edit-2511 pipeline (two references, true CFG) under each layout, without and with the step cache.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from fastdit import StepCache, load_transformer
from fastdit.parallel import ParallelState, launch, make_parallel_state
from tests.dit_utils import rel_err, save_tiny

pytestmark = pytest.mark.dist

TOL = 1e-5
HEADS4 = dict(num_attention_heads=4, attention_head_dim=16, axes_dims_rope=(4, 6, 6))
LAYOUTS = [(2, 1, 1), (1, 2, 1), (1, 1, 2)]
PIPE_ARGS = dict(
    prompt="make the sky green",
    negative_prompt=" ",
    num_inference_steps=2,
    seed=5,
    vae_image_area=64 * 64,
    vl_image_area=48 * 48,
    show_progress=False,
)
# 5 steps at a threshold that caches 1 to 4 of them (one process caches 2): the decisions follow the measured change
CACHED = dict(PIPE_ARGS, num_inference_steps=5)
CACHE = StepCache(front_blocks=1, back_blocks=0, threshold=0.2, warmup_steps=1)


def _case(layout, txt_lens, seed):
    """A CFG-style batch of 2 over `layout` (target first) with padded text of `txt_lens`."""
    g = torch.Generator().manual_seed(seed)
    n, n_txt = sum(f * h * w for f, h, w in layout), max(txt_lens)
    x, enc = torch.randn(2, n, 64, generator=g), torch.randn(2, n_txt, 48, generator=g)
    mask = torch.arange(n_txt)[None, :] < torch.tensor(txt_lens)[:, None]
    return x, enc, mask, txt_lens, [layout] * 2


def make_cases() -> dict:
    """Named DiT inputs, each a CFG-style batch of 2 with padded text.

    "boundary-padded": 15 target + 12 reference tokens = 27, padded to 28 under sp=2: rank 1 holds the last target
    token, the 12 reference tokens and the pad. "boundary-even": 16 + 8 = 24, no padding: rank 1 holds target
    tokens 12..15 and the references (attention then runs per sample on the text lengths, unmasked).
    """
    return {
        "boundary-padded": _case([(1, 3, 5), (1, 2, 6)], (7, 4), seed=0),
        "boundary-even": _case([(1, 4, 4), (1, 2, 4)], (7, 4), seed=1),
    }


def run_cases(model, cases, per_call: bool = True) -> dict[str, torch.Tensor]:
    """Each case as the pipeline runs it (modulation table, token index, text lengths) and, with `per_call`, with
    AdaLN computed in the call."""
    out = {}
    with torch.inference_mode():
        table = model.modulation_table(torch.tensor([0.4]))
        for name, (x, enc, mask, lens, shapes) in cases.items():
            index = model.modulation_index(shapes)
            t = torch.tensor([0.4, 0.4])  # with the table only its batch size counts (a cfg split takes its rows)
            out[name] = model(x, enc, mask, t, shapes, txt_lens=lens, modulation=table[0], mod_index=index)
            if per_call:
                out[name + "/per-call"] = model(x, enc, mask, t, shapes)
    return out


def _compiled_sp(state: ParallelState, path: str) -> dict:
    """sp=2, blocks compiled (aot_eager: dynamo's guards and tracing, no C++ build) with symbolic token counts: a
    second reference size and text length (padded under sp both) must not recompile; outputs as eager."""
    from fastdit.runtime.compile import compile_blocks, dynamic_tokens

    first = {"first": _case([(1, 3, 5), (1, 2, 6)], (7, 4), seed=2)}
    second = {"second": _case([(1, 3, 5), (1, 4, 4)], (9, 5), seed=3)}
    model = load_transformer(path, parallel=state, dtype=torch.float32, device="cpu")
    eager = run_cases(model, {**first, **second}, per_call=False)
    torch._dynamo.reset()
    compile_blocks(model, backend="aot_eager")
    with dynamic_tokens():
        compiled = run_cases(model, first, per_call=False)
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled.update(run_cases(model, second, per_call=False))
    return {k: rel_err(v, eager[k]) for k, v in compiled.items()}


def _worker(state: ParallelState, path: str, cases, folder: str) -> dict:
    from fastdit import load_pipeline

    results = {}
    for layout in LAYOUTS:
        st = state if layout == (state.tp, state.sp, state.cfg) else make_parallel_state(*layout, state.device)
        model = load_transformer(path, parallel=st, dtype=torch.float32, device="cpu")
        pipe = load_pipeline(folder, parallel=st, dtype=torch.float32, device="cpu")
        image = pipe(image=_images(), **PIPE_ARGS)[0]
        cached = pipe(image=_images(), cache=CACHE, **CACHED)
        results[layout] = {
            "dit": run_cases(model, cases),
            "pixels": np.asarray(image).astype(np.int16),
            "cached": (np.asarray(cached[0]).astype(np.int16), cached.cached_steps),
        }
    sp2 = make_parallel_state(1, 2, 1, state.device)
    results["compiled-sp2"] = _compiled_sp(sp2, path)
    return results


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("zero-cond-heads4")
    save_tiny(path, seed=5, zero_cond_t=True, **HEADS4)
    return path


@pytest.fixture(scope="module")
def folder(tiny_folders):
    return tiny_folders("edit-2511")


@pytest.fixture(scope="module")
def cases():
    return make_cases()


@pytest.fixture(scope="module")
def world2(ckpt, cases, folder):
    return launch(_worker, str(ckpt), cases, str(folder), tp=2, device="cpu", timeout_s=600)


def _images():
    a = Image.fromarray(np.random.RandomState(0).randint(0, 256, (48, 96, 3), dtype=np.uint8))
    b = Image.fromarray(np.random.RandomState(1).randint(0, 256, (72, 40, 3), dtype=np.uint8))
    return [a, b]


@pytest.fixture(scope="module")
def one_process(ckpt, cases, folder):
    """The single-process DiT outputs, pipeline image, and cached image with its cached-step count."""
    from fastdit import load_pipeline

    dit = run_cases(load_transformer(ckpt, dtype=torch.float32, device="cpu"), cases)
    pipe = load_pipeline(folder, dtype=torch.float32, device="cpu")
    cached = pipe(image=_images(), cache=CACHE, **CACHED)
    cached = (np.asarray(cached[0]).astype(np.int16), cached.cached_steps)
    return dit, np.asarray(pipe(image=_images(), **PIPE_ARGS)[0]).astype(np.int16), cached


@pytest.mark.parametrize("layout", LAYOUTS, ids=["tp2", "sp2", "cfg2"])
def test_zero_cond_t_dit_matches_one_process(world2, one_process, layout):
    """tp=2, sp=2 (the token index split with the tokens, the boundary inside rank 1's part, padded or not) and
    cfg=2 give the one-process DiT output."""
    expected, _, _ = one_process
    assert set(world2[layout]["dit"]) == set(expected)
    for name, out in world2[layout]["dit"].items():
        assert rel_err(out, expected[name]) <= TOL, (layout, name)


def test_sp2_compiled_with_symbolic_tokens(world2):
    """Under sp=2 the compiled blocks serve a second reference size without recompiling, and match eager."""
    errors = world2["compiled-sp2"]
    assert len(errors) == 2 and max(errors.values()) <= TOL, errors


@pytest.mark.parametrize("layout", LAYOUTS, ids=["tp2", "sp2", "cfg2"])
def test_edit_pipeline_matches_one_process(world2, one_process, layout):
    """The Edit-2511 pipeline (two references, true CFG) on 2 ranks draws the one-process image within 1/255."""
    _, expected, _ = one_process
    got = world2[layout]["pixels"]
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1


@pytest.mark.parametrize("layout", LAYOUTS, ids=["tp2", "sp2", "cfg2"])
def test_cached_edit_matches_one_process(world2, one_process, layout):
    """Edit-2511 with the step cache on 2 ranks (decisions from statistics summed over the ranks; under sp=2 the
    reference tokens' t = 0 gates split with the tokens) caches the same steps and draws the one-process image."""
    _, _, (expected, cached_steps) = one_process
    got, got_steps = world2[layout]["cached"]
    assert 0 < cached_steps < 4 and got_steps == cached_steps
    assert np.abs(got - expected).max() <= 1
