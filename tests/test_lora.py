"""LoRA on the tiny text-to-image pipeline against diffusers' `load_lora_weights` + `set_adapters` (PEFT), and the
transform's guarantees: unload gives the base image bit for bit, a failed load changes nothing, switching adapters
does not recompile, merging into fp8 re-quantizes. Float32 on CPU; images compared as uint8 (within 1 level).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from fastdit.errors import LoraError
from fastdit.lora.layer import LoraLinear
from tests.lora_utils import LAYOUTS, random_lora

pytest.importorskip("peft")

ARGS = dict(negative_prompt=" ", height=32, width=48, num_inference_steps=2, true_cfg_scale=3.0)
PROMPT = "a red fox in the snow"


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB")) for im in images]).astype(np.int16)


@pytest.fixture(scope="module")
def pipe(tiny_dir):
    """A pipeline of its own: these tests load adapters into it (each test unloads them again)."""
    from fastdit.pipelines.qwenimage import QwenImagePipeline

    p = QwenImagePipeline.from_pretrained(tiny_dir, dtype=torch.float32, device="cpu")
    yield p
    p.unload_loras()


@pytest.fixture(scope="module")
def reference(tiny_dir, pipe):
    from diffusers import QwenImagePipeline as DiffusersQwenImagePipeline

    ref = DiffusersQwenImagePipeline.from_pretrained(tiny_dir, tokenizer=pipe.tokenizer, dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    return ref


@pytest.fixture(scope="module")
def base_image(pipe):
    return _pixels(pipe(PROMPT, seed=3, show_progress=False, **ARGS))


def ours(pipe, seed=3) -> np.ndarray:
    return _pixels(pipe(PROMPT, seed=seed, show_progress=False, **ARGS))


def theirs(reference, seed=3) -> np.ndarray:
    return _pixels(reference(PROMPT, generator=torch.Generator().manual_seed(seed), **ARGS).images)


def _file(tmp_path, name, sd) -> str:
    path = tmp_path / f"{name}.safetensors"
    save_file(sd, str(path))
    return str(path)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_format_matches_diffusers(pipe, reference, base_image, tmp_path, layout):
    """A LoRA of every linear (Q/K/V into the fused QKV, out-projections, MLPs, modulation, img_in, txt_in,
    timestep embedder, norm_out, proj_out) in each trainer's layout, at scale 0.7: the same image as diffusers."""
    path = _file(tmp_path, layout, random_lora(1, layout))
    pipe.load_lora(path, adapter_name="a", scale=0.7)
    reference.load_lora_weights(path, adapter_name="a")
    reference.set_adapters(["a"], [0.7])
    try:
        got, want = ours(pipe), theirs(reference)
    finally:
        pipe.unload_loras()
        reference.unload_lora_weights()
    assert np.abs(got - want).max() <= 1
    assert np.abs(got - base_image).max() > 10  # the LoRA does change the image


def test_two_adapters_unfused_and_fused_match_diffusers(pipe, reference, base_image, tmp_path):
    """Two adapters of different layouts and layer sets at 0.8 and 0.5: dynamic (stacked along the rank) and then
    merged into the weights, against diffusers' set_adapters and fuse_lora; unload gives the base image bit for bit."""
    a = _file(tmp_path, "a", random_lora(2, "kohya"))
    attn_only = [k for k in random_lora(0) if ".attn." in k]
    b = _file(
        tmp_path,
        "b",
        random_lora(3, "diffusers", layers=[k.removeprefix("transformer.").rsplit(".", 2)[0] for k in attn_only]),
    )
    pipe.load_lora(a, adapter_name="a")
    pipe.load_lora(b, adapter_name="b")
    pipe.set_loras({"a": 0.8, "b": 0.5})
    reference.load_lora_weights(a, adapter_name="a")
    reference.load_lora_weights(b, adapter_name="b")
    reference.set_adapters(["a", "b"], [0.8, 0.5])
    try:
        dynamic, want = ours(pipe), theirs(reference)
        pipe.fuse_loras()
        assert not any(isinstance(m, LoraLinear) and m.active for m in pipe.transformer.modules())
        fused = ours(pipe)
        reference.fuse_lora(adapter_names=["a", "b"])
        want_fused = theirs(reference)
    finally:
        pipe.unload_loras()
        reference.unfuse_lora()
        reference.unload_lora_weights()
    assert np.abs(dynamic - want).max() <= 1
    assert np.abs(fused - want_fused).max() <= 1
    assert np.abs(fused - dynamic).max() <= 1
    assert np.array_equal(ours(pipe), base_image)
    assert not any(isinstance(m, LoraLinear) for m in pipe.transformer.modules())


def test_set_loras_switches_and_turns_off(pipe, base_image, tmp_path):
    """set_loras replaces the active set: an adapter alone equals loading it alone; {} gives the base image exactly."""
    pipe.load_lora(random_lora(4), adapter_name="a", scale=0.5)
    alone = ours(pipe)
    pipe.load_lora(random_lora(5, "musubi"), adapter_name="b")
    both = ours(pipe)
    pipe.set_loras({"a": 0.5})
    again = ours(pipe)
    pipe.set_loras({})
    off = ours(pipe)
    names = [d["name"] for d in pipe.lora_adapters()]
    pipe.unload_loras()
    assert np.array_equal(alone, again) and np.abs(both - alone).max() > 10
    assert np.array_equal(off, base_image)
    assert names == ["a", "b"]


def test_a_failed_load_changes_nothing(pipe, base_image, tmp_path):
    """A LoRA whose one layer has the wrong width is refused (naming file and layer) before any weight changes:
    with no adapter, the image is the base one; with one active, it stays that adapter's image."""
    bad = random_lora(6)
    bad["transformer.transformer_blocks.1.img_mlp.net.2.lora_A.weight"] = torch.zeros(4, 64)
    path = _file(tmp_path, "bad", bad)
    weights = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    with pytest.raises(LoraError, match=r"bad\.safetensors: transformer_blocks\.1\.img_mlp\.net\.2: lora_down"):
        pipe.load_lora(path)
    assert all(torch.equal(v, weights[k]) for k, v in pipe.transformer.state_dict().items())
    assert np.array_equal(ours(pipe), base_image)
    pipe.load_lora(random_lora(7), adapter_name="good")
    good = ours(pipe)
    with pytest.raises(LoraError):
        pipe.load_lora(path)
    with pytest.raises(LoraError, match="no LoRA adapter named 'nope'"):
        pipe.set_loras({"good": 1.0, "nope": 1.0})
    with pytest.raises(LoraError, match="finite"):
        pipe.set_loras({"good": float("nan")})
    still = ours(pipe)
    pipe.unload_loras()
    assert np.array_equal(still, good)


def test_widened_layers_share_the_base_weight_and_unload_restores_it(pipe, tmp_path):
    """Layers with more outputs than inputs (fused Q/K/V, the MLPs' first linears) run LoRA as one GEMM over
    [x | x @ down.T] with [W | up]: the base weight becomes a view of the wider tensor (no second copy), the others
    keep side GEMMs; a rank beyond the capacity widens again; unload gives every layer a contiguous weight with
    the base values bit for bit."""
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora(random_lora(10, rank=4), adapter_name="a")
    wrappers = {n: m for n, m in pipe.transformer.named_modules() if isinstance(m, LoraLinear)}
    block = "blocks.0."
    wide = {n.split(block)[-1] for n, m in wrappers.items() if block in n and m.wide}
    assert {"attn.img_qkv", "img_mlp.fc1", "txt_mlp.fc1"} <= wide, wide
    assert not any(n.endswith(("fc2", "img_out", "txt_out")) for n in wide), wide
    layer = next(m for n, m in wrappers.items() if n.endswith(block + "img_mlp.fc1"))
    assert layer.weight.data_ptr() == layer.widened.data_ptr() and not layer.weight.is_contiguous()
    first_capacity = layer.capacity
    pipe.load_lora(random_lora(11, rank=24), adapter_name="b")  # the stacked rank outgrows the capacity
    assert layer.capacity > first_capacity and layer.weight.data_ptr() == layer.widened.data_ptr()
    pipe.unload_loras()
    after = pipe.transformer.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(m.weight.is_contiguous() for m in pipe.transformer.modules() if isinstance(m, torch.nn.Linear))


def test_widened_layer_compiled_with_inductor_equals_eager():
    """The widened GEMM's input (pad, then the down product written into the pad's columns in place) through
    inductor: the same output as eager, and as the side-GEMM form of the same update."""
    from fastdit.models.layers import Linear

    torch.manual_seed(0)
    base = Linear(32, 96)
    layer = LoraLinear(base, dtype=torch.float32, device=torch.device("cpu"))
    down, up = torch.randn(5, 32), torch.randn(96, 5)
    layer.pack([(0, down, up)], 5)
    assert layer.wide and layer.capacity == 16
    h = torch.randn(2, 7, 32)

    def block(h: torch.Tensor) -> torch.Tensor:  # a LayerNorm pass producing the layer's input, as in a block
        return layer(torch.nn.functional.layer_norm(h, (32,)) * 1.5)

    with torch.no_grad():
        eager = block(h)
        compiled = torch.compile(block, fullgraph=True)(h)
        x = torch.nn.functional.layer_norm(h, (32,)) * 1.5
        side = base(x) + x @ down.T @ up.T
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eager, side, rtol=1e-5, atol=1e-5)


def test_lora_on_streamed_blocks_matches_resident(tiny_dir, pipe):
    """With every DiT block streamed from host memory (offload-blocks), a dynamic LoRA gives the resident
    pipeline's image (uint8 within 1); the streamed layers keep their weights where the streamer puts them (not widened), and
    the modulation linears, brought to the device for each call, are called through their hooks."""
    from fastdit.memory import offload_blocks_plan
    from fastdit.pipelines.qwenimage import QwenImagePipeline
    from fastdit.quant.fp8 import MODULATION

    plan = offload_blocks_plan(2, 0, slots=1, modulation_paths=MODULATION)
    streamed = QwenImagePipeline.from_pretrained(tiny_dir, dtype=torch.float32, device="cpu", memory=plan)
    lora = random_lora(12)
    pipe.load_lora(lora, adapter_name="a")
    streamed.load_lora(lora, adapter_name="a")
    try:
        want, got = ours(pipe), ours(streamed)
    finally:
        pipe.unload_loras()
    blocks = [m for n, m in streamed.transformer.named_modules() if isinstance(m, LoraLinear) and "blocks." in n]
    assert blocks and not any(m.wide for m in blocks)
    modulation = [m for n, m in streamed.transformer.named_modules() if isinstance(m, LoraLinear) and "_mod." in n]
    assert modulation and all(m.hooked for m in modulation)
    assert np.abs(got - want).max() <= 1  # the same update, summed in another order (float32)


def _e4m3_step(units: torch.Tensor) -> torch.Tensor:
    """The spacing of e4m3 values (3 mantissa bits, subnormals below 2^-6) around `units`."""
    return torch.exp2(torch.floor(torch.log2(units.clamp(min=2.0**-6))) - 3)


def test_fused_into_fp8_equals_quantized_fused_float(tiny_dir):
    """Merging into an fp8 model (dequantize, merge in float32, re-quantize) gives the weights that quantizing the
    merged float model gives, within fp8 rounding, and the update reaches every layer. Unload restores the e4m3 weights and their scales bit for bit."""
    from fastdit.load import load_transformer
    from fastdit.lora.model import DiTLoras
    from fastdit.quant.fp8 import Fp8Linear, quantize_model

    lora = random_lora(10, std=0.05)
    fp8 = load_transformer(tiny_dir, dtype=torch.float32, device="cpu", quantize="fp8-fast-emulated")
    before = {k: v.clone() for k, v in fp8.state_dict().items()}
    on_fp8 = DiTLoras(fp8, torch.float32)
    on_fp8.load(lora, "a")
    on_fp8.activate({"a": 1.0})
    on_fp8.fuse()
    flt = load_transformer(tiny_dir, dtype=torch.float32, device="cpu")
    on_float = DiTLoras(flt, torch.float32)
    on_float.load(lora, "a")
    on_float.activate({"a": 1.0})
    on_float.fuse(keep_originals=False)
    quantize_model(flt, emulate=True)
    layers = [(n, m) for n, m in fp8.named_modules() if isinstance(m, Fp8Linear)]
    assert len(layers) == 16 and not any(isinstance(m, LoraLinear) for m in fp8.modules())
    survived = 0
    for name, ours_layer in layers:
        want = flt.get_submodule(name)
        got_w = ours_layer.weight.float() * ours_layer.weight_scale[:, None]
        want_w = want.weight.float() * want.weight_scale[:, None]
        base_w = before[f"{name}.weight"].float() * before[f"{name}.weight_scale"][:, None]
        # The two roundings fp8 adds: the base weight's (half an e4m3 step at its size, before the merge) and the
        # result's (one step at the larger result), plus what the rows' scales differ by.
        s_got, s_want = ours_layer.weight_scale[:, None], want.weight_scale[:, None]
        s_min, s_max = torch.minimum(s_got, s_want), torch.maximum(s_got, s_want)
        units = torch.maximum(got_w.abs(), want_w.abs()) / s_min
        bound = _e4m3_step(units) * s_max + 0.5 * _e4m3_step(base_w.abs() / s_min) * s_max
        bound += units * (s_got - s_want).abs()
        assert ((got_w - want_w).abs() <= bound * 1.001 + 1e-9).all(), name
        # A row's absmax moves by at most half an e4m3 step of its binade: its scale by at most 2^-4 of itself.
        assert ((ours_layer.weight_scale - want.weight_scale).abs() <= want.weight_scale * 2**-4).all()
        survived += int(not torch.equal(got_w, base_w))
    assert survived == len(layers)
    on_fp8.unload()
    assert all(torch.equal(v, before[k]) for k, v in fp8.state_dict().items())


def test_dynamic_lora_on_fp8_layers(tiny_dir):
    """Dynamic LoRA on an fp8 model (side GEMMs in float beside the e4m3 GEMMs, GELU / e4m3-input entry points
    included) is as close to the float model with the same LoRA as the fp8 base is to the float base."""
    from fastdit.load import load_transformer
    from fastdit.lora.model import DiTLoras

    g = torch.Generator().manual_seed(0)
    x, enc = torch.randn(2, 6, 64, generator=g), torch.randn(2, 5, 32, generator=g)
    t, shapes = torch.tensor([0.7, 0.3]), [[(1, 2, 3)]] * 2
    outs = {}
    for mode in (None, "fp8-emulated"):
        model = load_transformer(tiny_dir, dtype=torch.float32, device="cpu", quantize=mode)
        with torch.no_grad():
            base = model(x, enc, None, t, shapes)
            loras = DiTLoras(model, torch.float32)
            loras.load(random_lora(11), "a")
            loras.activate({"a": 1.0})
            outs[mode] = (base, model(x, enc, None, t, shapes))
    (fb, fl), (qb, ql) = outs[None], outs["fp8-emulated"]
    err = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert err(fl, fb) > 0.1  # the LoRA matters
    assert err(ql, fl) < 2 * err(qb, fb) + 1e-3


def test_switching_adapters_does_not_recompile(pipe):
    """Regional compile (`compile_blocks`, fullgraph) with dynamic LoRA: once the with- and without-LoRA graphs
    exist, switching between adapters, scales and sets (rank within the capacity) runs without a recompile, and
    each compiled image is the eager one. Recompiles are dynamo's decision, made before the backend runs, so the
    aot_eager backend proves the same as inductor in a fraction of the time."""
    from fastdit.runtime.compile import compile_blocks

    p = pipe  # last test of the module: the pipeline stays compiled
    p.load_lora(random_lora(8), adapter_name="a")
    p.load_lora(random_lora(9, "kohya", rank=3), adapter_name="b")
    sets = [{"a": 0.3}, {"b": 1.2}, {"a": 1.0, "b": 0.5}, {}, {"b": -0.5, "a": 0.25}]
    eager = []
    for s in sets:
        p.set_loras(s)
        eager.append(ours(p))
    compile_blocks(p.transformer, backend="aot_eager")
    for warm in ({"a": 1.0, "b": 1.0}, {}):  # the two graphs: with side GEMMs (at full capacity) and without
        p.set_loras(warm)
        ours(p)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for s, want in zip(sets, eager, strict=True):
            p.set_loras(s)
            assert np.abs(ours(p) - want).max() <= 1, s
    p.unload_loras()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dynamic_lora_on_gpu_compiled_and_graphed(tiny_dir):
    """On CUDA (cuBLASLt's GELU epilogue on the widened fc1, inductor's Triton kernels for the padded input): the
    dynamic LoRA's image compiled and replayed from a CUDA graph equals the eager one and the merged one (the same
    update in the weights), uint8 within 1; switching scales reuses the graph."""
    from fastdit.pipelines.qwenimage import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(tiny_dir, dtype=torch.float32, device="cuda")
    kw = dict(negative_prompt=" ", height=32, width=48, num_inference_steps=2, true_cfg_scale=3.0, show_progress=False)
    pipe.load_lora(random_lora(13), adapter_name="a", scale=0.8)
    assert any(m.wide for m in pipe.transformer.modules() if isinstance(m, LoraLinear))
    eager = _pixels(pipe(PROMPT, seed=3, **kw))
    pipe.compile()
    pipe.enable_cuda_graph()
    graphed = _pixels(pipe(PROMPT, seed=3, **kw))
    graph = pipe._graph
    pipe.set_loras({"a": 0.4})
    _pixels(pipe(PROMPT, seed=3, **kw))
    assert pipe._graph is graph
    pipe.set_loras({"a": 0.8})
    again = _pixels(pipe(PROMPT, seed=3, **kw))
    pipe.fuse_loras()
    merged = _pixels(pipe(PROMPT, seed=3, **kw))
    assert np.abs(graphed - eager).max() <= 1 and np.array_equal(again, graphed)
    assert np.abs(merged - eager).max() <= 1
