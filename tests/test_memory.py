"""Memory plans (fastdit.memory): offloaded runs draw the resident run's image; plans are chosen and refused from
sizes known before any weight is read.

Offload correctness runs the real code paths on the CPU: the "device" buffers are separate CPU tensors, so every
streamed block really is copied from its host buffer into a slot before it runs (fastdit.memory.offload's `Copier`
copies at once where CUDA would use a side stream). The plan arithmetic is checked on the full-size Qwen-Image
footprint (the DiT's from its config.json and the preset's shapes; the text encoder's and VAE's sizes as the
released checkpoints hold them), against the cards of issue 21 (80, 24 and 16 GiB).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch._dynamo

from fastdit import compile_blocks, load_transformer
from fastdit.cli.main import main
from fastdit.memory import PlanError, offload_blocks_plan, plan_memory
from fastdit.memory.offload import BlockStreamer
from fastdit.memory.plan import GIB, Footprint, Workload, _dit_sizes, choose, spread
from fastdit.pipelines.qwenimage import QwenImagePipeline
from fastdit.quant.fp8 import MODULATION

KW = dict(negative_prompt=" ", height=64, width=64, num_inference_steps=3, seed=0, show_progress=False)


def dit_inputs(cfg, seed: int, b=2, h=4, w=6, n_txt=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h * w, cfg.in_channels, generator=g)
    txt = torch.randn(b, n_txt, cfg.joint_dim, generator=g)
    return x, txt, None, torch.rand(b, generator=g), [[(1, h, w)]] * b


def image(pipe) -> np.ndarray:
    return np.asarray(pipe("a red fox in the snow", **KW)[0])


@pytest.fixture(scope="module")
def reference(tiny_dir):
    return image(QwenImagePipeline.from_pretrained(tiny_dir, dtype=torch.float32, device="cpu"))


@pytest.mark.parametrize("resident, slots", [(0, 1), (1, 1), (0, 2)])
def test_offload_blocks_draws_the_resident_image(tiny_dir, reference, resident, slots):
    """Blocks streamed through 1 or 2 slots (none or one of the 2 blocks resident), modulation and text encoder
    loaded per use: the very same image as everything resident, with one copy per streamed block and step, and
    every streamed weight back in its host buffer between calls."""
    plan = offload_blocks_plan(2, resident, slots=slots, modulation_paths=MODULATION)
    pipe = QwenImagePipeline.from_pretrained(tiny_dir, dtype=torch.float32, device="cpu", memory=plan)
    streamer = pipe.transformer.offload.streamer
    assert np.array_equal(image(pipe), reference)
    assert streamer.copies == len(plan.streamed) * KW["num_inference_steps"]
    for index in plan.streamed:
        host = streamer.host[index]
        lo, hi = host.data_ptr(), host.data_ptr() + host.numel()
        for name, p in pipe.transformer.blocks[index].named_parameters():
            assert lo <= p.data_ptr() < hi or "_mod" in name, name
    assert not pipe.memory.text.loaded and not pipe.transformer.offload.modulation.loaded


def test_offload_text_draws_the_resident_image_and_cleans_up_after_an_error(tiny_dir, reference, monkeypatch):
    """offload-text: the text encoder's modules come to the device only while they run (the same image); an
    error inside the encoder leaves none of it on the device."""
    pipe = QwenImagePipeline.from_pretrained(tiny_dir, dtype=torch.float32, device="cpu", memory="offload-text")
    assert np.array_equal(image(pipe), reference)
    down = pipe.text_encoder.model.language_model.layers[1].mlp.down_proj
    seen = []

    def fail(*args, **kwargs):
        seen.append(down in pipe.memory.text.loaded and down.weight.data_ptr() != host.data_ptr())
        raise torch.OutOfMemoryError("injected")

    host = down.weight
    monkeypatch.setattr(down, "forward", fail)
    with pytest.raises(torch.OutOfMemoryError):
        image(pipe)
    assert seen == [True] and not pipe.memory.text.loaded and down.weight is host
    monkeypatch.undo()
    assert np.array_equal(image(pipe), reference)


def test_streamer_copies_blocks_it_was_not_ready_for(tiny_dir):
    """Blocks called out of the usual order (as when a step cache skips some) still get their own weights: the
    streamed model's output equals the resident one's block by block."""
    ref = load_transformer(tiny_dir, dtype=torch.float32, device="cpu")
    model = load_transformer(tiny_dir, dtype=torch.float32, device="cpu", memory=offload_blocks_plan(2, 0, slots=1))
    streamer: BlockStreamer = model.offload.streamer
    for block_ref, block in zip(ref.blocks, model.blocks, strict=True):
        for (n, a), (_, b) in zip(block_ref.named_parameters(), block.named_parameters(), strict=True):
            assert torch.equal(a, b), n
    calls = []
    for index in (1, 0, 1):  # a new forward starts at each index <= the last one
        streamer.enter(index)
        calls.append(torch.equal(model.blocks[index].attn.img_qkv.weight, ref.blocks[index].attn.img_qkv.weight))
        slot = streamer.slots[0]
        ptr = model.blocks[index].attn.img_qkv.weight.data_ptr()
        assert slot.data_ptr() <= ptr < slot.data_ptr() + slot.numel()
        streamer.exit(index)
    assert calls == [True, True, True]


def test_streamed_blocks_compile_without_graph_breaks_or_recompiles(tiny_dir):
    """Regional compilation (fullgraph) over a model with one block streamed: the streamed block runs the same
    graph as the resident one on its slot's weights; no recompile across calls; output equals eager."""
    ref = load_transformer(tiny_dir, dtype=torch.float32, device="cpu")
    model = load_transformer(tiny_dir, dtype=torch.float32, device="cpu", memory=offload_blocks_plan(2, 1))
    assert model.offload.streamer.order == [1]
    args = dit_inputs(ref.cfg, seed=0)
    torch._dynamo.reset()
    compile_blocks(model, backend="aot_eager")
    with torch.no_grad():
        want = ref(*args)
        first = model(*args)
        with torch._dynamo.config.patch(error_on_recompile=True):
            second = model(*dit_inputs(ref.cfg, seed=1))
            again = model(*args)
    assert torch.allclose(first, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(again, first) and not torch.equal(second, first)


# ---- choosing plans -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_transformer(tmp_path_factory):
    """A transformer folder holding only Qwen-Image's config.json (the DiT's sizes come from its shapes)."""
    folder = tmp_path_factory.mktemp("qwen-image") / "transformer"
    folder.mkdir()
    config = {"_class_name": "QwenImageTransformer2DModel", "num_layers": 60, "num_attention_heads": 24}
    config |= {"attention_head_dim": 128, "joint_attention_dim": 3584, "in_channels": 64, "out_channels": 16}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def qwen_image(folder, quantize=None) -> Footprint:
    """Full-size Qwen-Image in bf16: the DiT from its shapes; Qwen2.5-VL-7B (8.29 B parameters, embedding
    152064 x 3584) and the VAE (127 M parameters) as the released checkpoints hold them."""
    return Footprint(
        **_dit_sizes(folder, torch.bfloat16, quantize),
        text_encoder=8_292_166_656 * 2,
        text_encoder_one=152064 * 3584 * 2,
        text_hidden=3584,
        text_intermediate=18944,
        text_layers=28,
        vae=126_892_531 * 2,
        element=2,
    )


def test_int4_dit_weights_fit_in_11_5_gb(full_transformer):
    """int4 (block linears and modulation, groups of 128, bf16 scales and offsets) brings the full-size DiT
    from 40.9 GB to under 11.5 GB; fp8-fast (every block linear) to 27.3 GB, fp8 (the MLPs' second linears in
    bf16) to 31.8 GB."""
    bf16, int4, fp8, fast = (qwen_image(full_transformer, q) for q in (None, "int4", "fp8", "fp8-fast"))
    assert 40.8e9 < bf16.dit < 41.0e9, bf16.dit
    assert int4.dit < 11.5e9, int4.dit / 1e9
    assert 0.26 < int4.dit / bf16.dit < 0.28
    assert 31e9 < fp8.dit < 32.5e9 and 27e9 < fast.dit < 28e9, (fp8.dit / 1e9, fast.dit / 1e9)


CARDS = [
    # budget GiB, quantize, the plan auto picks, streamed DiT blocks (a count or a range)
    (80, None, "full", 0),
    (24, None, "offload-blocks", (5, 30)),
    (24, "fp8", "offload-blocks", 0),
    (24, "fp8-fast", "offload-blocks", 0),
    (24, "int4", "offload-text", 0),
    (16, None, "offload-blocks", (20, 45)),
    (16, "fp8", "offload-blocks", (10, 30)),
    (16, "fp8-fast", "offload-blocks", (1, 10)),
    (16, "int4", "offload-text", 0),
]


@pytest.mark.parametrize("gib, quantize, plan, streamed", CARDS)
def test_auto_picks_a_plan_for_each_card(full_transformer, gib, quantize, plan, streamed):
    """`auto` on the cards of issue 21 (1024 x 1024, CFG): the lightest plan that fits, and as many resident
    blocks as the budget leaves room for; its estimated need is within the budget."""
    fp = qwen_image(full_transformer, quantize)
    chosen = choose("auto", fp, Workload(), gib * GIB, "cuda:0")
    assert chosen.name == plan and chosen.need <= gib * GIB, chosen.describe()
    if isinstance(streamed, tuple):
        assert streamed[0] <= len(chosen.streamed) <= streamed[1], chosen.describe()
        assert chosen.slots == 2 and chosen.stage_on_host
    else:
        assert len(chosen.streamed) == streamed, chosen.describe()
    if plan != "full":
        assert chosen.offload_text and (plan == "offload-text") != chosen.offload_modulation


def test_a_plan_that_cannot_fit_names_one_that_would(full_transformer):
    """Asking for `full` on a 24 GiB card is refused in one line naming the plan that fits; nothing fits in
    2 GiB, and the message says to quantize."""
    fp = qwen_image(full_transformer)
    with pytest.raises(PlanError, match=r"'full' needs ~\d+\.\d GiB .* 24\.0 GiB are free .* 'offload-blocks' fits"):
        choose("full", fp, Workload(), 24 * GIB, "cuda:0")
    with pytest.raises(PlanError, match="no memory plan fits.*int4") as e:
        choose("offload-blocks", fp, Workload(), 2 * GIB, "cuda:0")
    assert "\n" not in str(e.value)


def test_streamed_blocks_are_spread_out():
    """Streamed blocks sit between resident ones, the first late enough for its copy to overlap earlier blocks."""
    assert spread(60, 1) == (59,)
    assert spread(60, 3) == (19, 39, 59)
    assert spread(4, 4) == (0, 1, 2, 3)


def test_cli_refuses_a_plan_before_reading_weights(tiny_cache, tiny_dir, monkeypatch, capsys, tmp_path):
    """`fastdit generate --memory full` on a device with too little memory for it (the tiny model, margins off,
    a budget between what offload-text and full need): exit 2, one line naming the plan that fits, and no weight
    read."""
    import fastdit.load
    import fastdit.memory.plan as plan_module

    monkeypatch.setattr(plan_module, "MARGIN_BYTES", 0)
    monkeypatch.setattr(plan_module, "MARGIN_SHARE", 0.0)
    fp = plan_module.footprint(tiny_dir, torch.float32, None)
    wl = Workload(64, 64, 1, cfg=False)
    full, text = (plan_module.plan_for(n, fp, wl, None, "cpu").need for n in ("full", "offload-text"))
    assert text < full
    monkeypatch.setenv("FASTDIT_CACHE", str(tiny_cache))
    monkeypatch.setattr(plan_module, "available_bytes", lambda device: (full + text) // 2)

    def no_read(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(fastdit.load, "load_state_dict_into", no_read)
    argv = ["generate", "--model", "tiny-random", "--prompt", "x", "--height", "64", "--width", "64"]
    argv += ["--steps", "1", "--device", "cpu", "--output", str(tmp_path / "x.png")]
    assert main([*argv, "--memory", "full"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "memory plan 'full' needs" in err[-1] and "fits" in err[-1], err


def test_auto_says_what_it_chose(tiny_dir, monkeypatch):
    """`auto` with a known budget says its choice in one line; off CUDA without a budget it is no plan at all."""
    lines = []
    plan = plan_memory(
        "auto", tiny_dir, dtype=torch.float32, device=torch.device("cpu"), budget=8 * GIB, say=lines.append
    )
    assert plan.name == "full" and len(lines) == 1 and lines[0].startswith("memory plan auto -> full:")
    assert plan_memory("auto", tiny_dir, dtype=torch.float32, device=torch.device("cpu")) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fast", ["eager", "compile", "compile+cuda-graph"])
def test_offload_on_gpu_draws_the_resident_image(tiny_dir, fast):
    """On CUDA (side-stream copies from pinned memory, events): offload-blocks with both blocks streamed through one
    slot, modulation and text encoder on demand, eager, compiled, and compiled + replayed from a CUDA graph (the
    copies recorded in the graph): the resident pipeline's image (bf16, within 2 levels), twice in a row."""

    def build(memory):
        pipe = QwenImagePipeline.from_pretrained(tiny_dir, dtype=torch.bfloat16, device="cuda", memory=memory)
        if "compile" in fast:
            pipe.compile()
        if "graph" in fast:
            pipe.enable_cuda_graph()
        return pipe

    torch._dynamo.reset()
    want = image(build(None)).astype(int)
    plan = offload_blocks_plan(2, 0, slots=1, device="cuda", modulation_paths=MODULATION)
    pipe = build(plan)
    assert pipe.transformer.offload.streamer.copier.stream is not None
    for _ in range(2):
        assert np.abs(image(pipe).astype(int) - want).max() <= 2
    assert not pipe.memory.text.loaded
    for p in pipe.text_encoder.parameters():
        assert p.device.type == "cpu" and p.is_pinned()


def test_reference_tokens_count_in_the_dit_activations(full_transformer):
    """An edit's reference tokens join the image tokens of every row: two 1024^2 references more than double the
    DiT's activations at 1024^2 (the modulation table is the same), and on a 24 GiB card offload-blocks in bf16 keeps
    fewer blocks resident for the edit (40 against 45 of 60)."""
    from fastdit.memory.plan import activations, plan_for

    fp = qwen_image(full_transformer)
    plain, edit = Workload(), Workload(reference_tokens=2 * 4096, reference_pixels=1024 * 1024)
    a, b = activations(fp, plain), activations(fp, edit)
    assert b.dit > 2 * a.dit and b.encode > 0 == a.encode
    resident = [plan_for("offload-blocks", fp, wl, 24 * GIB, "cuda").resident for wl in (plain, edit)]
    assert resident == [45, 40]
