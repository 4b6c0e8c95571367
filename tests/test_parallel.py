"""Tensor, Ulysses sequence and CFG parallelism on CPU (gloo): sharded == single device, compiled == eager.

Torchtitan style: every parallel run is compared against a single-process model loaded from the same
unsharded checkpoint. Spawned processes are expensive (each imports torch), so one group of 2 ranks and one
of 4 run every check for several layouts (a rank builds the groups of each layout from the same world).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from fastdit import load_transformer
from fastdit.errors import ConfigError, FastditError
from fastdit.models.qwenimage import DiTConfig
from fastdit.parallel import (
    ParallelState,
    RankError,
    check_parallel_config,
    launch,
    make_parallel_state,
)
from fastdit.parallel.layers import ColumnParallelLinear, RowParallelLinear
from fastdit.runtime.compile import compile_blocks
from tests.dit_utils import rel_err, save_tiny

pytestmark = pytest.mark.dist

TOL = 1e-5
# 4 heads x 16 so that tp=2 x sp=2 and sp=4 split them.
HEADS4 = dict(num_attention_heads=4, attention_head_dim=16, axes_dims_rope=(4, 6, 6))
LAUNCH_TIMEOUT_S = 150


def make_inputs():
    """Named DiT input cases, each a CFG-style batch of 2 ([cond; uncond])."""
    g = torch.Generator().manual_seed(0)
    cases = {}
    # 24 image tokens (divides by 2 and 4), text padded: lengths 5 and 3 with a mask.
    mask = torch.arange(5)[None, :] < torch.tensor([5, 3])[:, None]
    cases["masked"] = (torch.randn(2, 24, 64, generator=g), torch.randn(2, 5, 48, generator=g), mask, (4, 6))
    # 15 image tokens (3 x 5): padded to a multiple of sp, the padded keys masked; no text mask.
    cases["odd_tokens"] = (
        torch.randn(2, 15, 64, generator=g),
        torch.randn(2, 7, 48, generator=g),
        None,
        (3, 5),
    )
    # Batch of 1: does not split over cfg ranks, so each cfg rank runs it whole.
    cases["batch1"] = (torch.randn(1, 15, 64, generator=g), torch.randn(1, 3, 48, generator=g), None, (3, 5))
    return {
        k: (x, enc, m, torch.tensor([0.7, 0.3][: x.shape[0]]), [[(1, *hw)]] * x.shape[0])
        for k, (x, enc, m, hw) in cases.items()
    }


def run_cases(model, cases) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {name: model(*args) for name, args in cases.items()}


def _same_on_every_rank(out: torch.Tensor) -> bool:
    gathered = [torch.empty_like(out) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, out.contiguous())
    return all(torch.equal(g, gathered[0]) for g in gathered)


def _param_bytes(model) -> dict[str, int]:
    """Bytes of the tensor-parallel layers' parameters on this rank, and of all parameters."""
    tp_layers = [m for m in model.modules() if isinstance(m, ColumnParallelLinear | RowParallelLinear)]
    return {
        "sharded": sum(p.numel() * p.element_size() for m in tp_layers for p in m.parameters()),
        "total": sum(p.numel() * p.element_size() for p in model.parameters()),
    }


def _compile_checks(model, cases) -> dict:
    """Regional compile (`compile_blocks`, fullgraph=True, inductor) of the parallel blocks: compiled == eager
    and new values with the same shapes do not recompile; plus dynamo's graph-break count for the whole
    parallel forward (pad/split, blocks, final layer, gathers)."""
    x, enc, mask, t, shapes = cases["masked"]
    x2, enc2, t2 = x * 0.5, enc + 1, t * 0.5
    with torch.no_grad():
        eager, eager2 = model(x, enc, mask, t, shapes), model(x2, enc2, mask, t2, shapes)
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(model)(x, enc, mask, t, shapes)
        torch._dynamo.reset()
        compile_blocks(model.model, backend="inductor")
        out = model(x, enc, mask, t, shapes)
        with torch._dynamo.config.patch(error_on_recompile=True):
            out2 = model(x2, enc2, mask, t2, shapes)
    return {
        "graph_breaks": explanation.graph_break_count,
        "graphs": explanation.graph_count,
        "break_reasons": [str(r.reason) for r in explanation.break_reasons],
        "err": rel_err(out, eager),
        "err2": rel_err(out2, eager2),
    }


def _layout_worker(state: ParallelState, path: str, layouts, cases, compile_layouts) -> dict:
    """On every rank: for each (tp, sp, cfg) layout, load sharded, run all cases; rank 0's results returned."""
    results = {}
    for layout in layouts:
        st = state if layout == (state.tp, state.sp, state.cfg) else make_parallel_state(*layout, state.device)
        model = load_transformer(path, parallel=st, dtype=torch.float32, device="cpu", shard_modulation=False)
        cores = [type(b.attn.core).__name__ for b in model.model.blocks]
        assert cores == ["UlyssesAttention" if st.sp > 1 else "Attention"] * len(cores), cores
        outs = run_cases(model, cases)
        agree = all(_same_on_every_rank(o) for o in outs.values())
        entry = {"outs": outs, "agree": agree, "bytes": _param_bytes(model.model)}
        if layout in compile_layouts:
            entry["compile"] = _compile_checks(model, cases)
        results[layout] = entry
    return results


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("heads4")
    save_tiny(path, seed=5, **HEADS4)
    return path


@pytest.fixture(scope="module")
def cases():
    return make_inputs()


@pytest.fixture(scope="module")
def reference(ckpt, cases):
    model = load_transformer(ckpt, dtype=torch.float32, device="cpu")
    return run_cases(model, cases), model


def _world2_worker(state: ParallelState, path: str, cases, pipe_folder: str, fp8_path: str) -> dict:
    layouts = [(2, 1, 1), (1, 2, 1), (1, 1, 2)]
    results = _layout_worker(state, path, layouts, cases, compile_layouts=[(2, 1, 1), (1, 2, 1)])
    # Modulation sharded too (column-parallel + all-gather) instead of replicated.
    model = load_transformer(path, parallel=state, dtype=torch.float32, device="cpu", shard_modulation=True)
    outs = run_cases(model, cases)
    agree = all(_same_on_every_rank(o) for o in outs.values())
    results["tp2_shard_mod"] = {"outs": outs, "agree": agree, "bytes": _param_bytes(model.model)}
    # A checkpoint saved by `fastdit quantize`, loaded sharded (fp8 emulated on CPU).
    model = load_transformer(fp8_path, parallel=state, dtype=torch.float32, device="cpu", quantize="fp8-emulated")
    outs = run_cases(model, cases)
    results["tp2_saved_fp8"] = {"outs": outs, "agree": all(_same_on_every_rank(o) for o in outs.values())}
    results["fp8_attention"] = _fp8_attention_worker(state, fp8_path, cases)
    results["pipeline"] = _pipeline_worker(state, pipe_folder, layouts)
    return results


def _unmasked_case(cases) -> dict:
    x, enc, _, t, shapes = cases["masked"]  # 24 image tokens: no padding under sp = 2, so no key mask at all
    return {"unmasked": (x, enc, None, t, shapes)}


def _with_fp8_attention(model, case) -> tuple[dict, list]:
    """Run `case` with every attention core on fp8 (set directly: on CPU the op's reference implementation stands
    in for cuDNN); returns the outputs and the dtypes of q in each fp8 attention call."""
    import fastdit.kernels.attention
    from fastdit.models.layers import Attention

    for m in model.modules():
        if isinstance(m, Attention):
            m.backend = "fp8"
    seen, real = [], fastdit.kernels.attention.attention_fp8

    def spy(q, k, v, scales=None):
        seen.append(str(q.dtype))
        return real(q, k, v, scales)

    fastdit.kernels.attention.attention_fp8 = spy
    try:
        return run_cases(model, case), seen
    finally:
        fastdit.kernels.attention.attention_fp8 = real


def _fp8_attention_worker(state: ParallelState, fp8_path: str, cases) -> dict:
    """fp8 linears + fp8 attention under tp=2 and sp=2: e4m3 q/k/v cross sp's all-to-all, and the e4m3 output its
    all-to-all / all-gather, as bytes; tp's out-projections take the e4m3 output of their heads directly."""
    out = {}
    for layout in [(2, 1, 1), (1, 2, 1)]:
        st = state if layout == (state.tp, state.sp, state.cfg) else make_parallel_state(*layout, state.device)
        model = load_transformer(fp8_path, parallel=st, dtype=torch.float32, device="cpu", quantize="fp8-emulated")
        outs, seen = _with_fp8_attention(model, _unmasked_case(cases))
        out[layout] = {"outs": outs, "seen": seen, "agree": all(_same_on_every_rank(o) for o in outs.values())}
    return out


@pytest.fixture(scope="module")
def fp8_ckpt(ckpt, tmp_path_factory):
    from fastdit.cli.main import main

    out = tmp_path_factory.mktemp("fp8") / "transformer"
    assert main(["quantize", "--model", str(ckpt), "--output", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def world2(ckpt, cases, tiny_dir, fp8_ckpt):
    """One group of 2 ranks runs the DiT checks for tp=2, sp=2 and cfg=2, then the pipeline for each."""
    return launch(
        _world2_worker, str(ckpt), cases, str(tiny_dir), str(fp8_ckpt), tp=2, device="cpu", timeout_s=LAUNCH_TIMEOUT_S
    )


@pytest.fixture(scope="module")
def world4(ckpt, cases):
    layouts = [(2, 2, 1), (1, 4, 1), (2, 1, 2), (1, 2, 2)]
    return launch(_layout_worker, str(ckpt), layouts, cases, [], tp=2, sp=2, device="cpu", timeout_s=LAUNCH_TIMEOUT_S)


def _check_parity(result, reference, layout):
    expected, _ = reference
    assert result["agree"], f"{layout}: ranks returned different outputs"
    for name, out in result["outs"].items():
        assert out.shape == expected[name].shape, (layout, name)
        err = rel_err(out, expected[name])
        if os.environ.get("FASTDIT_PRINT_ERRORS"):
            print(f"{layout} {name}: rel L2 err {err:.2e}")
        assert err <= TOL, f"{layout} case {name}: relative L2 error {err:.3g} > {TOL}"


@pytest.mark.parametrize("layout", [(2, 1, 1), (1, 2, 1), (1, 1, 2)], ids=["tp2", "sp2", "cfg2"])
def test_two_ranks_match_one_process(world2, reference, layout):
    """tp=2, sp=2 (Ulysses) and cfg-parallel each give the single-process DiT output, on masked text,
    15 image tokens (padded for sp) and a batch of 1 (not split over cfg ranks)."""
    _check_parity(world2[layout], reference, layout)


@pytest.mark.parametrize(
    "layout", [(2, 2, 1), (1, 4, 1), (2, 1, 2), (1, 2, 2)], ids=["tp2xsp2", "sp4", "tp2xcfg2", "sp2xcfg2"]
)
def test_four_ranks_match_one_process(world4, reference, layout):
    """Combined layouts over 4 ranks: tp x sp, sp=4 (15 tokens padded to 16), cfg with tp and with sp."""
    _check_parity(world4[layout], reference, layout)


@pytest.mark.parametrize("layout", [(2, 1, 1), (1, 2, 1)], ids=["tp2", "sp2"])
def test_fullgraph_compile_under_tp_and_sp(world2, layout):
    """Functional collectives trace: zero graph breaks over the whole parallel forward, and the blocks
    compiled with fullgraph=True (inductor) match eager without recompiling for new values."""
    c = world2[layout]["compile"]
    assert c["graph_breaks"] == 0, c["break_reasons"]
    assert c["graphs"] == 1
    assert c["err"] <= TOL and c["err2"] <= TOL, c


def test_tp2_with_sharded_modulation_matches_and_halves_the_blocks(world2, reference):
    """shard_modulation=True: modulation column-parallel + all-gather, same output, and now every block
    parameter except the QK norms and row biases is split."""
    _check_parity(world2["tp2_shard_mod"], reference, "tp2_shard_mod")
    _, single = reference
    blocks1 = sum(p.numel() * p.element_size() for p in single.blocks.parameters())
    assert world2["tp2_shard_mod"]["bytes"]["sharded"] <= blocks1 / 2 * 1.02


def test_tp2_loads_a_saved_fp8_checkpoint(world2, fp8_ckpt, cases, reference):
    """`fastdit quantize` output under tp=2 (gloo, fp8 emulated): both ranks agree, and the sharded fp8 model is
    as close to the float model as the one-process fp8 model is (each rank scales the activations of its half
    of a row-parallel layer itself, so the two fp8 results differ by fp8 noise, not more)."""
    exact, _ = reference
    one = run_cases(load_transformer(fp8_ckpt, dtype=torch.float32, device="cpu", quantize="fp8-emulated"), cases)
    result = world2["tp2_saved_fp8"]
    assert result["agree"]
    for name, out in result["outs"].items():
        err_tp, err_one = rel_err(out, exact[name]), rel_err(one[name], exact[name])
        if os.environ.get("FASTDIT_PRINT_ERRORS"):
            print(f"saved fp8, tp2 {name}: vs float {err_tp:.3e}, one-process fp8 vs float {err_one:.3e}")
        assert err_tp < 0.08 and abs(err_tp - err_one) < 0.02, (name, err_tp, err_one)
        assert rel_err(out, one[name]) < 0.08, name


@pytest.mark.parametrize("layout", [(2, 1, 1), (1, 2, 1)], ids=["tp2", "sp2"])
def test_fp8_attention_under_tp_and_sp(world2, fp8_ckpt, cases, reference, layout):
    """fp8 linears + fp8 attention (CPU reference op) under tp=2 / sp=2 (gloo): every block's attention ran on e4m3
    operands, the ranks agree, and the result is as close to one process's fp8 attention as fp8 noise allows
    (under tp the V scale is per rank, over its heads). Under sp the ranks exchange e4m3 v, so they share one V
    scale (the group's absmax): the result is one process's."""
    single = load_transformer(fp8_ckpt, dtype=torch.float32, device="cpu", quantize="fp8-emulated")
    case = _unmasked_case(cases)
    exact = run_cases(reference[1], case)["unmasked"]  # the float model
    one, seen_one = _with_fp8_attention(single, case)
    result = world2["fp8_attention"][layout]
    assert result["agree"]
    n_layers = len(single.blocks)
    assert seen_one == ["torch.float8_e4m3fn"] * n_layers
    assert result["seen"] == ["torch.float8_e4m3fn"] * n_layers
    err, err_one = rel_err(result["outs"]["unmasked"], one["unmasked"]), rel_err(one["unmasked"], exact)
    err_float = rel_err(result["outs"]["unmasked"], exact)
    if os.environ.get("FASTDIT_PRINT_ERRORS"):
        print(f"fp8 attention {layout}: vs one process {err:.3e}, vs float {err_float:.3e} (one process {err_one:.3e})")
    assert err < 0.08 and err_float < 0.1 and abs(err_float - err_one) < 0.03, (err, err_float, err_one)
    if layout == (1, 2, 1):  # with a scale per rank: 2.1e-2
        assert err < 1e-6, err


def test_tp2_halves_sharded_parameter_bytes(world2, reference):
    """Each tp=2 rank holds half of the sharded layers' bytes; the rest (modulation, embeddings) is replicated."""
    _, single = reference
    tp1_sharded = sum(
        p.numel() * p.element_size()
        for b in single.blocks
        for m in (b.attn.img_qkv, b.attn.txt_qkv, b.attn.img_out, b.attn.txt_out)
        + (b.img_mlp.fc1, b.img_mlp.fc2, b.txt_mlp.fc1, b.txt_mlp.fc2)
        for p in m.parameters()
    )
    tp1_total = sum(p.numel() * p.element_size() for p in single.parameters())
    tp2 = world2[(2, 1, 1)]["bytes"]
    # Row-parallel biases stay whole: a little over half.
    assert tp1_sharded / 2 <= tp2["sharded"] <= tp1_sharded / 2 * 1.02, (tp2, tp1_sharded)
    assert tp2["total"] == tp1_total - (tp1_sharded - tp2["sharded"])


# ---------------------------------------------------------------------------------------------------------
# Bad input and failing ranks


def test_heads_not_divisible_is_a_config_error(ckpt):
    with pytest.raises(ConfigError, match="not divisible by tp x sp"):
        check_parallel_config(DiTConfig(num_heads=6, head_dim=16, axes_dims_rope=(4, 6, 6)), 4, 1)
    # Before any tensor is read, without process groups.
    with pytest.raises(ConfigError, match="4 attention heads"):
        load_transformer(ckpt, parallel=ParallelState(tp=8, sp=1, cfg=1), dtype=torch.float32, device="cpu")
    with pytest.raises(ConfigError, match="tp x sp = 2 x 4"):
        load_transformer(ckpt, parallel=ParallelState(tp=2, sp=4, cfg=1), dtype=torch.float32, device="cpu")


def test_too_many_ranks_for_the_machine():
    with pytest.raises(FastditError, match="GPUs"):
        launch(print, tp=torch.cuda.device_count() + 1, device="cuda")
    with pytest.raises(FastditError, match="CPU ranks"):
        launch(print, tp=8, sp=4, device="cpu")
    with pytest.raises(FastditError, match="1 or 2"):
        launch(print, cfg=3, device="cpu")


def test_port_in_use_is_refused_before_spawning():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(FastditError, match=f"--master-port {port} is already in use"):
            launch(print, tp=2, device="cpu", master_port=port)
        assert time.monotonic() - t0 < 2  # nothing was spawned


def _failing_worker(state: ParallelState, kind: str) -> None:
    if state.tp_rank == 1:
        if kind == "fastdit":
            raise ConfigError("bad setting seen by rank 1")
        raise ValueError("boom from rank 1")
    # Rank 0 waits in a collective that rank 1 never joins: it must be terminated, not left hanging.
    dist.all_reduce(torch.ones(1))
    dist.barrier()


def test_a_failing_rank_stops_the_others_with_its_error():
    """Rank 1 raises while rank 0 blocks in a collective: launch raises rank 1's error promptly, no hang."""
    t0 = time.monotonic()
    with pytest.raises(RankError, match="rank 1 failed: ValueError: boom from rank 1"):
        launch(_failing_worker, "plain", tp=2, device="cpu", timeout_s=60)
    # FastditErrors come back as themselves, so the CLI prints them as one line.
    with pytest.raises(ConfigError, match="bad setting seen by rank 1"):
        launch(_failing_worker, "fastdit", tp=2, device="cpu", timeout_s=60)
    assert time.monotonic() - t0 < 60


# ---------------------------------------------------------------------------------------------------------
# The pipeline and the CLI

PIPE_ARGS = dict(negative_prompt=" ", height=64, width=80, num_inference_steps=2, true_cfg_scale=3.0, seed=7)


def _pixels(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).astype(np.int16))


def _pipeline_worker(state: ParallelState, folder: str, layouts) -> dict:
    from fastdit.pipelines.qwenimage import QwenImagePipeline

    images = {}
    for layout in layouts:
        st = state if layout == (state.tp, state.sp, state.cfg) else make_parallel_state(*layout, state.device)
        pipe = QwenImagePipeline.from_pretrained(folder, dtype=torch.float32, device="cpu", parallel=st)
        out = pipe("a red fox in the snow", show_progress=st.is_main, **PIPE_ARGS)
        images[layout] = [_pixels(im) for im in out]
    return images


@pytest.mark.parametrize("layout", [(2, 1, 1), (1, 2, 1), (1, 1, 2)], ids=["tp2", "sp2", "cfg2"])
def test_pipeline_gives_the_same_image_as_one_process(world2, tiny_pipe, layout):
    """The full pipeline (true CFG, 64x80 px = 20 image tokens) with tp=2, sp=2 or cfg-parallel draws the
    same 8-bit image as one process."""
    expected = [_pixels(im) for im in tiny_pipe("a red fox in the snow", **PIPE_ARGS)]
    for a, b in zip(world2["pipeline"][layout], expected, strict=True):
        assert a.shape == b.shape
        # Sharded sums round differently in the last bits; after 8-bit quantisation at most 1 level.
        assert (a - b).abs().max() <= 1


@pytest.mark.parametrize("launcher", ["self", "torchrun"])
def test_cli_generate_with_cfg_parallel(tiny_cache, tiny_pipe, tmp_path, launcher):
    """`fastdit generate --cfg-parallel` starts its 2 ranks itself, or joins the 2 ranks torchrun started;
    rank 0 alone prints and writes, and the image is the one-process pipeline's."""
    out = tmp_path / "cfg.png"
    cmd = [sys.executable, "-m", "fastdit", "generate", "--model", "tiny-random", "--prompt", "a fox"]
    if launcher == "torchrun":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd[1:2] = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), "-m"]
    cmd += ["--negative-prompt", " ", "--height", "32", "--width", "48", "--steps", "2", "--seed", "3"]
    cmd += ["--device", "cpu", "--dtype", "float32", "--output", str(out), "--cfg-parallel"]
    env = {**os.environ, "FASTDIT_CACHE": str(tiny_cache)}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("wrote ") == 1 and r.stdout.count("loaded ") == 1, r.stdout
    expected = tiny_pipe("a fox", negative_prompt=" ", height=32, width=48, num_inference_steps=2, seed=[3])
    assert (_pixels(Image.open(out)) - _pixels(expected[0])).abs().max() <= 1


def test_cli_refuses_bad_parallel_settings(tiny_cache, tmp_path):
    """Too many ranks and heads that do not split: one-line errors, exit status 2, before any rank starts."""
    env = {**os.environ, "FASTDIT_CACHE": str(tiny_cache)}
    base = [sys.executable, "-m", "fastdit", "generate", "--model", "tiny-random", "--prompt", "a fox"]
    base += ["--device", "cpu", "--height", "32", "--width", "32", "--output", str(tmp_path / "x.png")]
    for extra, message in ((["--tp", "4", "--sp", "8"], "at most"), (["--tp", "4"], "not divisible by tp x sp")):
        r = subprocess.run(base + extra, env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and message in r.stderr, r.stderr
