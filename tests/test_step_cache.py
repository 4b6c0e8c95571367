"""The step cache (fastdit.cache): its invariants on the tiny pipeline, parity with diffusers' First-Block Cache,
its extrapolation, its settings and the commands that take it (generate, eval-cache, bench, the server's metrics).
Everything in float32 on CPU."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fastdit.cache import StepCache, parse_schedule
from fastdit.cache.loop import CachedLoop, extrapolation_weights
from fastdit.cli.main import main
from fastdit.errors import ConfigError
from fastdit.models.qwenimage import Residual
from fastdit.server.engine import Engine, Job
from tests.dit_utils import save_tiny

KW = dict(height=48, width=64, num_inference_steps=8, seed=3, show_progress=False)


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB")) for im in images]).astype(np.int16)


def test_threshold_zero_caches_nothing_and_changes_no_bit(tiny_pipe):
    """Threshold 0: no step is cached and the image (CFG batch) equals the uncached one bit for bit."""
    base = tiny_pipe("a red fox", negative_prompt=" ", **KW)
    ours = tiny_pipe("a red fox", negative_prompt=" ", cache=StepCache(front_blocks=1, threshold=0), **KW)
    assert (ours.steps, ours.cached_steps, base.cached_steps) == (8, 0, 0)
    assert np.array_equal(_pixels(ours), _pixels(base))


@pytest.mark.parametrize(("threshold", "steps", "size", "cached"), [(0.3, 10, (48, 96), 3), (0.5, 8, (64, 64), 6)])
def test_first_block_cache_matches_diffusers(tiny_dir, tiny_pipe, threshold, steps, size, cached):
    """StepCache(front_blocks=1, back_blocks=0, warmup_steps=1) draws diffusers' FirstBlockCache image at the same
    threshold (one forward per step: no CFG, as diffusers decides for cond and uncond separately), caching the
    same number of steps."""
    from diffusers import QwenImagePipeline as DiffusersQwenImagePipeline
    from diffusers.hooks import FirstBlockCacheConfig
    from diffusers.hooks.first_block_cache import FBCHeadBlockHook

    ref = DiffusersQwenImagePipeline.from_pretrained(tiny_dir, tokenizer=tiny_pipe.tokenizer, dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    ref.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    decisions, decide = [], FBCHeadBlockHook._should_compute_remaining_blocks

    def spy(self, residual):
        decisions.append(decide(self, residual))
        return decisions[-1]

    kw = dict(height=size[0], width=size[1], num_inference_steps=steps)
    FBCHeadBlockHook._should_compute_remaining_blocks = spy
    try:
        expected = ref("a lighthouse", generator=torch.Generator().manual_seed(1), **kw).images
    finally:
        FBCHeadBlockHook._should_compute_remaining_blocks = decide
    cache = StepCache(front_blocks=1, back_blocks=0, threshold=threshold, warmup_steps=1)
    ours = tiny_pipe("a lighthouse", seed=1, show_progress=False, cache=cache, **kw)
    assert decisions.count(False) == ours.cached_steps == cached
    assert np.abs(_pixels(ours) - _pixels(expected)).max() <= 1


def test_infinite_threshold_caches_every_step_after_warmup_and_keeps_no_state(tiny_pipe):
    """threshold=inf, warmup_steps=2 over 8 steps caches 6; the same StepCache used again (or with another call in
    between) gives the same image: nothing carries over between calls."""
    cache = StepCache(front_blocks=1, threshold=math.inf, warmup_steps=2)
    first = tiny_pipe("a kite", negative_prompt=" ", cache=cache, **KW)
    tiny_pipe("something else", cache=StepCache(front_blocks=1, threshold=math.inf, warmup_steps=1), **KW)
    again = tiny_pipe("a kite", negative_prompt=" ", cache=cache, **KW)
    assert first.cached_steps == again.cached_steps == 6
    assert np.array_equal(_pixels(first), _pixels(again))
    plain = tiny_pipe("a kite", negative_prompt=" ", **KW)
    assert not np.array_equal(_pixels(first), _pixels(plain))


def test_default_cache_of_the_pipeline_and_a_fixed_schedule(tiny_pipe):
    """`enable_step_cache` sets the cache of every call; a fixed schedule caches exactly its zeros and measures
    nothing; a schedule of the wrong length or a cache too deep for the model is a ConfigError."""
    schedule = parse_schedule("compute 2, then every 2nd", 8)
    assert schedule == (True, True, False, True, False, True, False, True)
    try:
        tiny_pipe.enable_step_cache(StepCache(front_blocks=1, schedule=schedule))
        out = tiny_pipe("a kite", **KW)
        assert out.cached_steps == 3
        with pytest.raises(ConfigError, match="schedule has 8 entries, but the call runs 4 steps"):
            tiny_pipe("a kite", **{**KW, "num_inference_steps": 4})
    finally:
        tiny_pipe.enable_step_cache(None)
    with pytest.raises(ConfigError, match="front_blocks=2 \\+ back_blocks=0 must leave at least one"):
        tiny_pipe("a kite", cache=StepCache(front_blocks=2), **KW)
    with pytest.raises(ConfigError, match="must be a fastdit.StepCache"):
        tiny_pipe("a kite", cache="F1B0", **KW)


# ---------------------------------------------------------------------------------------------------------
# The loop on a DiT with 4 blocks: caps, back blocks, compile


@pytest.fixture(scope="module")
def dit4(tmp_path_factory):
    from fastdit import load_transformer

    path = tmp_path_factory.mktemp("dit4")
    save_tiny(path, seed=2, num_layers=4)
    return load_transformer(path, dtype=torch.float32, device="cpu")


def _inputs(model, steps: int, b: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, enc = torch.randn(b, 24, 64, generator=g), torch.randn(b, 5, 48, generator=g)
    rope = model.make_rope([(1, 4, 6)], 5)
    table = model.modulation_table(torch.linspace(1.0, 0.1, steps))
    return x, enc, rope, table


def _run(model, loop, steps: int, x, enc, rope, table):
    with torch.no_grad():
        return [model(x * (1 - 0.05 * i), enc, rope=rope, modulation=table[i], cache=loop) for i in range(steps)]


def test_caps_are_respected(dit4):
    """max_consecutive_cached=2 and max_cached_steps=3 bound the cached steps of an always-caching cache."""
    x, enc, rope, table = _inputs(dit4, 10)
    loop = CachedLoop(StepCache(front_blocks=1, threshold=math.inf, warmup_steps=1, max_consecutive_cached=2), 10)
    _run(dit4, loop, 10, x, enc, rope, table)
    assert loop.cached == [1, 2, 4, 5, 7, 8]
    loop = CachedLoop(StepCache(front_blocks=1, threshold=math.inf, warmup_steps=1, max_cached_steps=3), 10)
    _run(dit4, loop, 10, x, enc, rope, table)
    assert loop.cached == [1, 2, 3]


def test_a_cached_step_adds_the_stored_middle_residual_then_runs_the_back_blocks(dit4):
    """F1B1 on 4 blocks: a cached step = front block, + the middle blocks' residual of the last computed step (per
    CFG row and stream), then the back block and the final layer; computed steps equal the uncached model."""
    x, enc, rope, table = _inputs(dit4, 3)
    loop = CachedLoop(StepCache(front_blocks=1, back_blocks=1, threshold=math.inf, warmup_steps=2), 3)
    outs = _run(dit4, loop, 3, x, enc, rope, table)
    plain = _run(dit4, None, 3, x, enc, rope, table)
    assert loop.cached == [2]
    assert torch.equal(outs[0], plain[0]) and torch.equal(outs[1], plain[1])

    def streams(i):
        inp = dit4.prepare(x * (1 - 0.05 * i), enc, None, None, rope=rope)
        return Residual.start(inp.img, 1), Residual.start(inp.txt, 1)

    with torch.no_grad():
        f_img, f_txt = dit4.run_segment(0, 1, *streams(1), None, rope, None, modulation=table[1])
        m_img, m_txt = dit4.run_segment(1, 3, f_img, f_txt, None, rope, None, modulation=table[1])
        res_img, res_txt = m_img.total() - f_img.total(), m_txt.total() - f_txt.total()
        f_img, f_txt = dit4.run_segment(0, 1, *streams(2), None, rope, None, modulation=table[2])
        img, txt = Residual.start(f_img.total() + res_img, 1), Residual.start(f_txt.total() + res_txt, 1)
        img, _ = dit4.run_segment(3, 4, img, txt, None, rope, None, modulation=table[2])
        expected = dit4.final(img, None, table[2].final)
    torch.testing.assert_close(outs[2], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_segments_do_not_recompile_across_steps(dit4):
    """Compiled blocks and the cache's own tensor work: computed and cached steps (with an extrapolated residual)
    run without a recompile after the first of each, and give the eager loop's outputs."""
    from fastdit.cache.loop import Workspace
    from fastdit.runtime.compile import compile_blocks

    x, enc, rope, table = _inputs(dit4, 8)
    cache = StepCache(
        front_blocks=1, back_blocks=1, threshold=1.5, warmup_steps=1, max_consecutive_cached=1, taylor_order=1
    )
    eager_loop = CachedLoop(cache, 8)
    eager = _run(dit4, eager_loop, 8, x, enc, rope, table)
    assert 0 < eager_loop.cached_steps < 7, eager_loop.changes  # both kinds of step after the first ones
    torch._dynamo.reset()
    compile_blocks(dit4)
    try:
        loop = CachedLoop(cache, 8, Workspace(cache, compiled=True))
        warm = _run(dit4, loop, 3, x, enc, rope, table)  # compiles front, a computed and a cached step
        assert loop.cached == [2] and eager_loop.cached[0] == 2
        with torch._dynamo.config.patch(error_on_recompile=True):
            loop = CachedLoop(cache, 8, Workspace(cache, compiled=True))
            outs = _run(dit4, loop, 8, x, enc, rope, table)
    finally:
        for block in dit4.blocks:
            block._compiled_call_impl = None
        dit4.final._compiled_call_impl = None
        torch._dynamo.reset()
    assert loop.cached == eager_loop.cached
    for a, b in zip(warm + outs, eager[:3] + eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Taylor extrapolation


class LinearMiddle(torch.nn.Module):
    """A stand-in DiT of 3 'blocks': block 0 and 2 pass the streams on, block 1 adds a residual that is a
    polynomial of the input's value s: c0 + c1 * s + c2 * s^2. Feeding s = step index makes the middle residual a
    polynomial in the step."""

    def __init__(self, c: tuple[float, ...]):
        super().__init__()
        self.c = c
        self.blocks = torch.nn.ModuleList([torch.nn.Identity()] * 3)

    def run_segment(self, start, end, img, txt, temb, rope, key_mask, txt_lens=None, modulation=None, refs=None):
        if start <= 1 < end:  # img.gate and img.update are zero here: the streams start each segment unpended
            s = img.total()
            img = Residual(s + sum(c * s**k for k, c in enumerate(self.c)), img.gate, img.update)
        return img, txt

    def final(self, img, temb, mod=None, index=None):
        return img.total()


@pytest.mark.parametrize(("order", "coeffs"), [(1, (0.5, 0.25)), (2, (0.5, 0.25, -0.125))])
def test_taylor_order_k_reproduces_residuals_polynomial_of_degree_k(order, coeffs):
    """With taylor_order=K, a cached step's residual is the polynomial through the last K + 1 computed steps: exact
    when the middle residual is a polynomial of degree K in the step index (order 0 would repeat the last one)."""
    model, steps = LinearMiddle(coeffs), 9
    cache = StepCache(front_blocks=1, threshold=math.inf, warmup_steps=order + 1, taylor_order=order)
    loop = CachedLoop(cache, steps, None)
    rope = (torch.zeros(1), torch.zeros(1))
    outs = []
    for i in range(steps):
        img = torch.full((1, 2, 4), float(i))
        outs.append(loop.run(model, img, torch.zeros(1, 1, 4), torch.zeros(1, 24), rope, None)[0, 0, 0].item())
    assert loop.cached == list(range(order + 1, steps))
    assert outs == [i + sum(c * i**k for k, c in enumerate(coeffs)) for i in range(steps)]


def test_extrapolation_weights_are_exact_for_polynomials():
    """The weights over K + 1 (unevenly spaced) nodes reproduce every polynomial of degree <= K at a later point."""
    nodes = [1, 2, 4, 7]
    for degree in range(4):
        w = extrapolation_weights(nodes, 10)
        assert math.isclose(sum(wj * x**degree for wj, x in zip(w, nodes, strict=True)), 10**degree, rel_tol=1e-12)
    assert extrapolation_weights([5], 9) == [1.0]


# ---------------------------------------------------------------------------------------------------------
# Settings and their text forms


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(threshold=-0.1), "StepCache.threshold"),
        (dict(threshold=math.nan), "StepCache.threshold"),
        (dict(warmup_steps=-1), "StepCache.warmup_steps"),
        (dict(taylor_order=-1), "StepCache.taylor_order"),
        (dict(front_blocks=0), "StepCache.front_blocks"),
        (dict(back_blocks=-1), "StepCache.back_blocks"),
        (dict(max_cached_steps=-2), "StepCache.max_cached_steps"),
        (dict(max_consecutive_cached=1.5), "StepCache.max_consecutive_cached"),
        (dict(schedule=(0, 1)), "must compute step 0"),
        (dict(schedule="1101"), "StepCache.schedule"),
    ],
)
def test_invalid_settings_name_the_field(kwargs, field):
    """Every bad setting is a ConfigError (a ValueError) whose message names the field."""
    with pytest.raises(ConfigError, match=field.replace(".", "\\.")):
        StepCache(**kwargs)
    assert issubclass(ConfigError, ValueError)


def test_front_plus_back_must_leave_a_middle_block():
    """front + back blocks >= the model's blocks is refused (nothing would be cached)."""
    StepCache(front_blocks=59, back_blocks=0).check_fits(60)
    for front, back in ((60, 0), (61, 0), (50, 10)):
        with pytest.raises(ConfigError, match=f"front_blocks={front} \\+ back_blocks={back}"):
            StepCache(front_blocks=front, back_blocks=back).check_fits(60)


def test_text_form_round_trip_and_errors():
    """`--cache` text: F<n>B<m> and key=value settings; spec() reads back; bad items name themselves."""
    c = StepCache.parse("F8B2, threshold=0.08, warmup=4, taylor=1, max-cached=20, max_consecutive=3")
    assert c == StepCache(8, 2, 0.08, 4, 20, 3, 1)
    assert StepCache.parse(c.spec()) == c and StepCache.parse("default") == StepCache()
    assert StepCache.parse("F1,threshold=inf").threshold == math.inf
    for bad, says in (("F8B0,foo=1", "'foo=1'"), ("warmup=x", "warmup='x'"), ("", "empty"), ("F8B0,", "empty")):
        with pytest.raises(ConfigError, match=says):
            StepCache.parse(bad)


def test_schedule_spellings():
    """Fixed schedules: phrases, 'then every Kth' filling the rest, a 0/1 mask; 23 of 50 cached for
    'compute 4, then every 2nd'."""
    assert parse_schedule("compute 4, then every 2nd", 50).count(False) == 23
    assert parse_schedule("compute 2, cache 2, compute 1", 7) == (True, True, False, False, True, True, True)
    assert parse_schedule("compute 1, every 3rd", 7) == (True, False, False, True, False, False, True)
    assert parse_schedule("1101", 4) == (True, True, False, True)
    for bad, says in (("1101", "4 digits for 5 steps"), ("compute 9", "covers 9 steps"), ("cache 1", "step 0")):
        with pytest.raises(ConfigError, match=says):
            parse_schedule(bad, 5)
    with pytest.raises(ConfigError, match="phrase 'every 2nd, compute 1'|phrase 'every 2nd'"):
        parse_schedule("every 2nd, compute 1", 5)


# ---------------------------------------------------------------------------------------------------------
# Commands


def test_generate_with_cache(tiny_cache, tmp_path, capsys, monkeypatch):
    """`generate --cache` reports the cached steps; a malformed or too deep --cache is one line, exit 2."""
    monkeypatch.setenv("FASTDIT_CACHE", str(tiny_cache))
    base = ["generate", "--model", "tiny-random", "--prompt", "a fox", "--height", "32", "--width", "32"]
    base += ["--steps", "6", "--device", "cpu", "--output", str(tmp_path / "x.png")]
    assert main([*base, "--cache", "F1B0,threshold=inf,warmup=2", "--timings-json", str(tmp_path / "t.json")]) == 0
    assert "(6 steps, 4 cached," in capsys.readouterr().out
    assert json.loads((tmp_path / "t.json").read_text())["cached_steps"] == 4
    with pytest.raises(SystemExit) as e:
        main([*base, "--cache", "F1B0,speed=9"])
    assert e.value.code == 2 and "'speed=9' is not one of" in capsys.readouterr().err
    assert main([*base, "--cache", "default"]) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(error) == 1 and "--cache F8B0" in error[0] and "leave at least one of the model's 2 blocks" in error[0]


def test_eval_cache_on_the_tiny_pipeline(tiny_cache, tmp_path, capsys, monkeypatch):
    """`fastdit eval-cache` renders each prompt with and without the cache and prints PSNR, SSIM and speed-up."""
    monkeypatch.setenv("FASTDIT_CACHE", str(tiny_cache))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n# skipped\n\na lighthouse\n")
    args = ["eval-cache", "--model", "tiny-random", "--prompts", str(prompts), "--device", "cpu", "--steps", "5"]
    args += ["--height", "32", "--width", "32", "--cache", "F1B0,threshold=inf,warmup=2", "--warmup", "0"]
    args += ["--json", str(tmp_path / "e.json"), "--output-dir", str(tmp_path / "img")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "PSNR dB" in out and "SSIM" in out and "speed-up" in out and "mean: 3.0 of 5 steps cached" in out
    record = json.loads((tmp_path / "e.json").read_text())
    assert [r["cached_steps"] for r in record["images"]] == [3, 3]
    assert all(0 < r["ssim"] <= 1 and r["psnr_db"] > 10 for r in record["images"])
    assert sorted(p.name for p in (tmp_path / "img").iterdir()) == [
        "0-base.png",
        "0-cache.png",
        "1-base.png",
        "1-cache.png",
    ]
    prompts.write_text("# nothing\n")
    assert main(args) == 2 and "no prompt in it" in capsys.readouterr().err


def test_bench_cache_schedule_on_cpu(tmp_path, capsys):
    """`fastdit bench --cache-schedule` times whole images with and without the fixed schedule; without cache-dit
    installed the comparison is skipped with a note."""
    path = tmp_path / "b.json"
    args = ["bench", "--preset", "tiny", "--device", "cpu", "--dtype", "fp32", "--height", "32", "--width", "32"]
    args += ["--text-len", "8", "--steps", "6", "--cache-schedule", "compute 2, then every 2nd", "--cache", "F1B0"]
    args += ["--warmup", "0", "--iters", "1", "--compare", "diffusers-eager", "--json", str(path)]
    assert main(args) == 0
    res = json.loads(path.read_text())
    assert res["schedule"] == "110101" and res["cached_steps"] == 2
    assert [r["cached_steps"] for r in res["runs"].values()][:2] == [0, 2]
    out = capsys.readouterr().out
    assert "s/image" in out
    try:
        import cache_dit  # noqa: F401
    except ImportError:
        assert "cache-dit is not installed" in res["note"]
    else:
        assert res["cache_dit_cached_steps"] == 2 and res["max_rel_l2_vs_cache_dit"] < 1e-5
    assert main([*args[:-2], "--cache-schedule", "cache 1"]) == 2


def test_server_metrics_count_cached_steps():
    """The engine adds each call's cached steps to fastdit_cached_steps_total on /metrics."""

    class Result(list):
        cached_steps = 3

    def generator(prompt, *, progress=None, **kwargs):
        from PIL import Image

        return Result([Image.new("RGB", (16, 16))] * len(prompt))

    engine = Engine(lambda: generator, max_queue=4, max_batch=1)
    engine.start()
    try:
        assert engine.ready.wait(30)
        for _ in range(2):
            job = Job("a fox", None, 1, 16, 16, 2, 1.0, seed=1)
            engine.submit(job)
            job.future.result(timeout=30)
        assert "fastdit_cached_steps_total 6" in engine.metrics.expose()
    finally:
        engine.close()
        engine.join(timeout=10)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "cache",
    [
        StepCache(front_blocks=1, threshold=math.inf, warmup_steps=1, max_consecutive_cached=1, taylor_order=1),
        StepCache(front_blocks=1, threshold=0.3, warmup_steps=1),
    ],
    ids=["alternating-taylor", "measured"],
)
def test_cuda_graphs_replay_computed_and_cached_steps(tiny_dir, cache):
    """With CUDA graphs, the front, computed and cached segments replay their own graphs, decided on the host: the
    same cached steps and images as without graphs; a later call with the same shapes reuses the graphs."""
    from fastdit.pipelines.qwenimage import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(tiny_dir, dtype=torch.float32, device="cuda")
    kw = dict(negative_prompt=" ", height=48, width=64, num_inference_steps=8, show_progress=False, cache=cache)
    runs = [("a red fox", 5), ("a tan cat", 6)]  # same token count: one set of graphs
    plain = [pipe(prompt, seed=seed, **kw) for prompt, seed in runs]
    pipe.enable_cuda_graph()
    graphed, workspaces = [], []
    for prompt, seed in runs:
        graphed.append(pipe(prompt, seed=seed, **kw))
        workspaces.append(pipe._cache_workspace)
    assert workspaces[0] is workspaces[1]
    fns = workspaces[0].functions
    assert all(g.graph is not None for g in (fns.front, fns.computed)), "front and computed steps are graphed"
    for a, b in zip(graphed, plain, strict=True):
        assert a.cached_steps == b.cached_steps
        assert np.abs(_pixels(a) - _pixels(b)).max() <= 1
    if graphed[0].cached_steps:
        assert fns.cached.graph is not None
