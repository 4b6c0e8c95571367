"""FP8 (e4m3) W8A8 layers and checkpoints (fastdit.quant.fp8), on CPU in float32 with the fp8 rounding emulated.

Emulation does exactly the GPU's rounding (weights per output channel, activations per token, e4m3) and
multiplies in float32, so these tests pin the numerics of the scheme; the real `torch._scaled_mm` path is
checked on an H100 by benchmarks/fp8_check.py. Thresholds (all measured on these seeds, with margin):
- one layer: relative L2 error vs the exact float product between 2% and 6% (3.7%; e4m3 keeps 3 mantissa bits);
- tiny DiT (every weight random, modulation included): cosine similarity >= 0.99 vs float32 (0.9992);
- tiny pipeline (2 steps, CFG): PSNR >= 40 dB of the 8-bit image vs the float32 image (measured 57 dB).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from fastdit import compile_blocks, load_transformer
from fastdit.checkpoint import load_state_dict_into, weight_map
from fastdit.cli.main import main
from fastdit.errors import FastditError
from fastdit.kernels.fp8_rows import gelu_quantize_rows, gelu_quantize_rows_torch
from fastdit.load import read_config
from fastdit.models.qwenimage import MLP, QwenImageTransformer
from fastdit.models.qwenimage_keys import checkpoint_keys
from fastdit.parallel import ParallelState, parallelize, shard_plan
from fastdit.quant.fp8 import (
    BLOCK_LINEARS,
    FP8,
    Fp8Linear,
    quantize_model,
    quantize_rows,
)
from tests.dit_utils import rel_err, save_tiny
from tests.triton_interpreter import run_interpreted


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    save_tiny(path)
    return path


def inputs(b=2, h=4, w=6, n_txt=5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, h * w, 64, generator=g).to(dtype)
    enc = torch.randn(b, n_txt, 48, generator=g).to(dtype)
    mask = torch.ones(b, n_txt, dtype=torch.bool)
    mask[-1, n_txt // 2 :] = False
    t = torch.rand(b, generator=g)
    return x, enc, mask, t, [[(1, h, w)]] * b


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def test_emulated_linear_error_is_that_of_e4m3():
    """Fp8Linear(emulate) = (x_q * s_x) @ (w_q * s_w).T + b exactly, and its error vs float is e4m3-sized."""
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(256, 128)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(128, 256, generator=g) / 16)
    x = torch.randn(3, 40, 256, generator=g)
    x[0, 0] *= 1000  # per-token scales: one loud token does not swamp the others
    fp8 = Fp8Linear(256, 128, emulate=True, dtype=torch.float32)
    fp8.load_float(lin.weight, lin.bias)
    assert fp8.weight.dtype == FP8 and fp8.weight_scale.shape == (128,)

    with torch.no_grad():
        exact, out = lin(x), fp8(x)
    xq, xs = quantize_rows(x)
    by_hand = (xq.float() * xs) @ (fp8.weight.float() * fp8.weight_scale[:, None]).t() + lin.bias
    assert rel_err(out, by_hand) < 1e-6  # the same math up to float32 summation order
    err = rel_err(out, exact)
    assert 0.02 < err < 0.06, err
    assert rel_err(out[0, 1:], exact[0, 1:]) < 0.06  # the quiet tokens next to the loud one
    # Rounding each row to e4m3: relative error per element at most 2^-4 (3 mantissa bits, round to nearest)
    # for values in the normal range.
    w = lin.weight.detach()
    wq = fp8.weight.float() * fp8.weight_scale[:, None]
    normal = w.abs() >= 2**-6 * fp8.weight_scale[:, None]
    assert ((wq - w).abs() <= 2**-4 * w.abs() + 1e-12)[normal].all()


def test_quantized_tiny_dit_is_close_to_float(ckpt):
    """All 8 block linears in fp8 (fp8-fast, emulated): cosine similarity >= 0.99 with the float32 output. The
    `fp8` recipe swaps the same layers but the MLPs' second linears, which stay in float."""
    ref = load_transformer(ckpt, dtype=torch.float32, device="cpu")
    q = load_transformer(ckpt, dtype=torch.float32, device="cpu", quantize="fp8-fast-emulated")
    for block in q.blocks:
        for path in BLOCK_LINEARS:
            assert isinstance(block.get_submodule(path), Fp8Linear), path
        assert isinstance(block.img_mod.lin, nn.Linear)  # modulation stays in float
    with torch.no_grad():
        a, b = ref(*inputs()), q(*inputs())
    assert cosine(b, a) >= 0.99, cosine(b, a)
    safe = load_transformer(ckpt, dtype=torch.float32, device="cpu", quantize="fp8-emulated")
    for block in safe.blocks:
        for path in BLOCK_LINEARS:
            float_kept = path in ("img_mlp.fc2", "txt_mlp.fc2")
            assert isinstance(block.get_submodule(path), nn.Linear if float_kept else Fp8Linear), path


def test_fp8_without_emulation_is_refused_on_cpu(ckpt):
    """No silent fallback: asking for real fp8 on a CPU raises FastditError saying what is needed."""
    with pytest.raises(FastditError, match=r"compute capability >= 8\.9.*cpu"):
        load_transformer(ckpt, dtype=torch.bfloat16, device="cpu", quantize="fp8")
    model = load_transformer(ckpt, dtype=torch.bfloat16, device="cpu")
    with pytest.raises(FastditError, match="compute capability"):
        quantize_model(model)
    layer = Fp8Linear(64, 64)
    layer.load_float(torch.randn(64, 64, dtype=torch.bfloat16), None)
    with pytest.raises(FastditError, match="runs on CUDA"):
        layer(torch.randn(2, 64, dtype=torch.bfloat16))
    with pytest.raises(FastditError, match="quantize must be one of"):
        load_transformer(ckpt, dtype=torch.float32, device="cpu", quantize="int8")


def test_quantize_cli_round_trip_and_size(ckpt, tmp_path, capsys):
    """`fastdit quantize` writes fp8 weights + float32 scales; the folder loads through load_transformer
    (fp8 on meta, no float copy), gives exactly the quantize-at-load output, and its quantized weights take
    about half the bytes of bf16 ones."""
    out = tmp_path / "fp8"
    argv = ["quantize", "--model", str(ckpt), "--output", str(out), "--shard-size-gb", "0.0001"]
    assert main([*argv, "--format", "fp8-fast"]) == 0
    assert "wrote" in capsys.readouterr().out
    where = weight_map(out)
    assert len(set(where.values())) > 1  # sharded, with an index
    cfg = read_config(out)

    # Bytes: each quantized weight (e4m3 + a float32 scale per row) vs the same weight in bf16.
    q_bytes = bf16_bytes = total = total_bf16 = 0
    for key, f in where.items():
        with safe_open(str(f), framework="pt") as h:
            t = h.get_tensor(key)
        total += t.numel() * t.element_size()
        if key.endswith("_scale"):
            q_bytes += t.numel() * 4
            continue
        total_bf16 += t.numel() * 2
        if t.dtype == FP8:
            q_bytes += t.numel()
            bf16_bytes += t.numel() * 2
        else:
            assert t.dtype == torch.bfloat16, key
    assert bf16_bytes > 0 and 0.5 < q_bytes / bf16_bytes < 0.55, q_bytes / bf16_bytes
    # Modulation (a third of the block weights) stays bf16: a block is 2/3 of its bf16 size; with this tiny
    # model's relatively large embedders the whole file is 0.72 of bf16 (Qwen-Image: 0.67).
    assert total / total_bf16 < 0.75, total / total_bf16
    assert cfg.num_layers == 2

    with pytest.raises(FastditError, match="compute capability"):
        load_transformer(out, dtype=torch.bfloat16, device="cpu")  # fp8 folder, real fp8: needs a GPU
    from fastdit.parallel.state import single_device

    with pytest.raises(FastditError, match="compute capability"):  # the parallel loader checks the same way
        load_transformer(out, parallel=single_device("cpu"), dtype=torch.bfloat16, device="cpu")
    saved = load_transformer(out, dtype=torch.bfloat16, device="cpu", quantize="fp8-fast-emulated")
    at_load = load_transformer(ckpt, dtype=torch.bfloat16, device="cpu", quantize="fp8-fast-emulated")
    assert saved.blocks[0].attn.img_qkv.weight.dtype == FP8
    assert saved.blocks[0].attn.img_qkv.weight_scale.dtype == torch.float32
    for (name, p), (name2, p2) in zip(saved.named_parameters(), at_load.named_parameters(), strict=True):
        assert name == name2 and p.dtype == p2.dtype and torch.equal(p.float(), p2.float()), name
    args = inputs(dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(saved(*args), at_load(*args))

    assert main(["quantize", "--model", str(ckpt), "--output", str(out)]) == 2  # never overwrites
    assert "not empty" in capsys.readouterr().err


def test_quantize_cli_takes_a_hub_repo_id(ckpt, tmp_path, monkeypatch, capsys):
    """`fastdit quantize --model owner/name` downloads first (faked here) and quantizes the download; an output
    folder that is not empty is refused before anything is downloaded."""
    import huggingface_hub

    fetched = []

    def snapshot(repo_id, **kw):
        fetched.append(repo_id)
        return str(ckpt)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert main(["quantize", "--model", "someone/tiny-qwen", "--output", str(taken)]) == 2
    assert "not empty" in capsys.readouterr().err and fetched == []

    out = tmp_path / "fp8"
    assert main(["quantize", "--model", "someone/tiny-qwen", "--output", str(out)]) == 0
    assert fetched == ["someone/tiny-qwen"] and "wrote" in capsys.readouterr().out
    saved = load_transformer(out, dtype=torch.bfloat16, device="cpu", quantize="fp8-emulated")
    assert saved.blocks[0].attn.img_qkv.weight.dtype == FP8


def test_saved_fp8_checkpoint_loads_sharded_under_tensor_parallelism(ckpt, tmp_path):
    """A `fastdit quantize` folder under tp=2: each rank holds exactly its slices of the saved e4m3 weights
    and scales (column-parallel: rows and their scales; row-parallel: columns, scales of whole rows), and the
    two ranks' MLP partial sums add up to the one-process fp8 MLP (within the per-rank activation scaling)."""
    from fastdit import load_transformer

    out = tmp_path / "fp8"
    assert main(["quantize", "--model", str(ckpt), "--output", str(out), "--format", "fp8-fast"]) == 0
    one = load_transformer(out, dtype=torch.float32, device="cpu", quantize="fp8-fast-emulated")
    x = torch.randn(2, 7, one.cfg.dim, generator=torch.Generator().manual_seed(0))
    partials = []
    for rank in range(2):
        # A stand-in group: loading needs none, and the all-reduce below is done by hand.
        state = ParallelState(tp=2, sp=1, cfg=1, tp_rank=rank, tp_group="stand-in")
        par = load_transformer(out, parallel=state, dtype=torch.float32, device="cpu", quantize="fp8-fast-emulated")
        for path in BLOCK_LINEARS:
            mine, full = par.model.blocks[1].get_submodule(path), one.blocks[1].get_submodule(path)
            assert isinstance(mine, Fp8Linear) and mine.weight.dtype == FP8, path
            n, k = mine.weight.shape
            if mine.world > 1:  # columns [rank * k, (rank + 1) * k), whole-row scales
                want_w, want_s = full.weight[:, rank * k : (rank + 1) * k], full.weight_scale
            elif path.endswith("qkv"):  # fused q, k, v: this rank's half of the rows of each, stacked
                want_w = torch.cat([p.chunk(2)[rank] for p in full.weight.float().chunk(3)])
                want_s = torch.cat([p.chunk(2)[rank] for p in full.weight_scale.chunk(3)])
            else:  # rows [rank * n, (rank + 1) * n)
                want_w, want_s = full.weight[rank * n : (rank + 1) * n], full.weight_scale[rank * n : (rank + 1) * n]
            assert torch.equal(mine.weight.float(), want_w.float()), path
            assert torch.equal(mine.weight_scale, want_s), path
        mlp = par.model.blocks[0].img_mlp
        with torch.no_grad():
            partials.append(mlp.fc2._gemm(mlp.fc1(x), gelu_input=True))
        bias = mlp.fc2.bias
    with torch.no_grad():
        tp_out = partials[0] + partials[1] + bias
        ref = one.blocks[0].img_mlp(x)
    assert rel_err(tp_out, ref) < 0.05


def test_compile_fullgraph_under_emulation(ckpt):
    """Regional compile with fullgraph=True traces the fp8 blocks with no graph break and no recompile."""
    model = load_transformer(ckpt, dtype=torch.float32, device="cpu", quantize="fp8-emulated")
    with torch.no_grad():
        eager = model(*inputs())
    torch._dynamo.reset()
    compile_blocks(model, backend="aot_eager")  # fullgraph=True: a graph break would raise
    with torch.no_grad():
        out = model(*inputs())
        with torch._dynamo.config.patch(error_on_recompile=True):
            out2 = model(*inputs(seed=1))
    torch._dynamo.reset()
    assert rel_err(out, eager) < 1e-5
    assert out2.shape == out.shape


def test_quantize_after_tensor_parallel_sharding(ckpt):
    """TP: quantizing a model whose layers hold one rank's shards (tp=2, loaded with the TP shard plan)
    gives fp8 local GEMMs; the two ranks' row-parallel partial sums add up to the unsharded fp8 MLP."""
    full = load_transformer(ckpt, dtype=torch.float32, device="cpu")
    ref_mlp = full.blocks[0].img_mlp
    x = torch.randn(2, 7, full.cfg.dim, generator=torch.Generator().manual_seed(0))
    unsharded = MLP(full.cfg.dim, full.cfg.mlp_ratio * full.cfg.dim)
    unsharded.load_state_dict(ref_mlp.state_dict())
    for name in ("fc1", "fc2"):
        layer = Fp8Linear(*reversed(getattr(unsharded, name).weight.shape), emulate=True, dtype=torch.float32)
        layer.load_float(getattr(unsharded, name).weight, getattr(unsharded, name).bias)
        setattr(unsharded, name, layer)

    partials = []
    for rank in range(2):
        # A stand-in group: this test does the all-reduce by hand, so no process group is ever used.
        state = ParallelState(tp=2, sp=1, cfg=1, tp_rank=rank, tp_group="stand-in")
        with torch.device("meta"):
            model = QwenImageTransformer(full.cfg)
        parallelize(model, state)
        load_state_dict_into(
            model,
            ckpt,
            dtype=torch.float32,
            device=torch.device("cpu"),
            shard_plan=shard_plan(model, state),
            key_map=checkpoint_keys,
        )
        quantize_model(model, emulate=True)
        mlp = model.blocks[0].img_mlp
        assert type(mlp.fc1) is Fp8Linear and mlp.fc1.world == 1 and mlp.fc2.world == 2
        assert model.blocks[0].attn.img_out.world == 2
        assert mlp.fc1.weight.shape == (full.cfg.mlp_ratio * full.cfg.dim // 2, full.cfg.dim)
        with torch.no_grad():
            partials.append(mlp.fc2._gemm(mlp.fc1.forward_gelu(x)))
        bias = mlp.fc2.bias
    with torch.no_grad():
        tp_out = partials[0] + partials[1] + bias
        exact, one = ref_mlp(x), unsharded(x)
    # Per-rank activation scales cover half of K each: as accurate as the unsharded fp8 layer, not equal.
    assert rel_err(tp_out, one) < 0.05
    assert abs(rel_err(tp_out, exact) - rel_err(one, exact)) < 0.02


def test_tiny_pipeline_image_psnr(tiny_dir, tiny_pipe):
    """The tiny pipeline with fp8 (emulated) DiT draws the float32 image within PSNR >= 40 dB."""
    from fastdit.pipelines.qwenimage import QwenImagePipeline

    fp8 = QwenImagePipeline.from_pretrained(tiny_dir, dtype=torch.float32, device="cpu", quantize="fp8-emulated")
    assert isinstance(fp8.transformer.blocks[0].img_mlp.fc1, Fp8Linear)
    kw = dict(negative_prompt=" ", height=64, width=64, num_inference_steps=2, seed=0, show_progress=False)
    a = np.asarray(tiny_pipe("a red fox in the snow", **kw)[0].convert("RGB")).astype(np.float64)
    b = np.asarray(fp8("a red fox in the snow", **kw)[0].convert("RGB")).astype(np.float64)
    mse = ((a - b) ** 2).mean()
    psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
    assert psnr >= 40, psnr  # measured: 57 dB


def test_gelu_quantize_rows_matches_gelu_then_quantize():
    """fastdit.kernels.fp8_rows's torch path (CPU) is GELU(tanh) in float32 followed by the per-row quantization."""
    h = torch.randn(6, 200, generator=torch.Generator().manual_seed(1)) * 3
    v, s = gelu_quantize_rows(h)
    rv, rs = quantize_rows(F.gelu(h, approximate="tanh"))
    assert v.dtype == FP8 and s.shape == (6, 1)
    assert torch.equal(s, rs) and torch.equal(v.float(), rv.float())
    # and the MLP takes that path when fc2 is fp8: same output as GELU between two emulated fp8 layers
    mlp = MLP(64, 256)
    x = torch.randn(3, 64)
    ref = mlp.fc2(F.gelu(mlp.fc1(x), approximate="tanh"))
    fc2 = Fp8Linear(256, 64, emulate=True, dtype=torch.float32)
    fc2.load_float(mlp.fc2.weight.detach(), mlp.fc2.bias.detach())
    mlp.fc2 = fc2
    assert rel_err(mlp(x), ref) < 0.06


GELU_INTERPRETED = """
from fastdit.kernels.fp8_rows import _gelu_quantize_rows_kernel, _launch, gelu_quantize_rows_torch

assert FP8_FIXED  # the interpreter's float32 -> e4m3 conversion replaced by torch's (tests/triton_interpreter.py)
for width in (12288, 10000, 16384, 200, 96, 16):  # 3 whole chunks, 3 with a partial last, 4, small, 1 chunk
    h = torch.randn(7, width, generator=torch.Generator().manual_seed(width)) * 3
    v, s = _launch(_gelu_quantize_rows_kernel, h)
    rv, rs = gelu_quantize_rows_torch(h)
    assert v.shape == h.shape and s.shape == (7, 1), (v.shape, s.shape)
    assert torch.allclose(s, rs, rtol=1e-5, atol=0), (width, (s / rs - 1).abs().max())
    # The interpreter's sigmoid differs from torch's in the last bits: a few values round the other way (a chunk
    # read or written in the wrong place would differ almost everywhere).
    differ = (v.float() != rv.float()).float().mean().item()
    assert differ < 1e-3, (width, differ)
print("ok")
"""


def test_gelu_kernel_under_the_interpreter():
    """The GELU + quantize kernel's chunking (1 to 4 chunks of a power of two, the last one partial or whole)
    under Triton's interpreter on the CPU, against the torch path."""
    pytest.importorskip("triton")
    run = run_interpreted(GELU_INTERPRETED)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.startswith("ok")


FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.gpu
@pytest.mark.skipif(not FP8_GPU, reason="needs a CUDA GPU with fp8 (compute capability >= 8.9)")
@pytest.mark.parametrize("width", [12288, 6144, 10000, 16384, 96])
def test_gelu_quantize_rows_kernel_on_gpu(width):
    """The Triton kernel (one pass, row in registers) against the torch composition: the DiT's fc2 width, its
    tp=2 shard, and widths whose last chunk is partial (10000, 96) or that need four chunks (16384)."""
    h = torch.randn(300, width, device="cuda", generator=torch.Generator("cuda").manual_seed(0)).bfloat16() * 2
    v, s = gelu_quantize_rows(h)
    rv, rs = gelu_quantize_rows_torch(h)
    assert torch.allclose(s, rs, rtol=1e-5, atol=0)
    # GELU via sigmoid vs torch's tanh form differ in the last float32 bits: a few values round the other way.
    assert (v.float() != rv.float()).float().mean().item() < 1e-3
    assert rel_err(v.float() * s, rv.float() * rs) < 1e-3
    # dynamic=True: the width symbolic too (as after several widths through one compiled function)
    compiled = torch.compile(gelu_quantize_rows, fullgraph=True, dynamic=True)
    cv, cs = compiled(h)
    assert torch.equal(cv.float(), v.float()) and torch.equal(cs, s)


def test_recipes_choose_layers_by_role():
    """fp8 keeps the MLPs' second linears in float, fp8-fast quantizes every block linear, fp8-blockwise gives the
    MLPs' second linears 1 x 128 / 128 x 128 scales, int4 adds the modulation; bad names are one-line errors."""
    from fastdit.load import FAMILIES
    from fastdit.quant.recipes import FP8, FP8_BLOCK, INT4, parse_quantize

    roles = FAMILIES["QwenImageTransformer2DModel"].roles
    fc2 = {"img_mlp.fc2", "txt_mlp.fc2"}
    assert parse_quantize("fp8").layers(roles) == {p: FP8 for p in BLOCK_LINEARS if p not in fc2}
    assert parse_quantize("fp8-fast").layers(roles) == dict.fromkeys(BLOCK_LINEARS, FP8)
    blockwise = parse_quantize("fp8-blockwise-emulated")
    assert blockwise.emulate and {p for p, k in blockwise.layers(roles).items() if k == FP8_BLOCK} == fc2
    assert parse_quantize("int4").layers(roles) == dict.fromkeys(BLOCK_LINEARS + ("img_mod.lin", "txt_mod.lin"), INT4)
    for bad in ("int4-emulated", "fp4", "FP8"):
        with pytest.raises(FastditError, match="quantize must be one of"):
            parse_quantize(bad)
