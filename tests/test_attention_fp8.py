"""fastdit.kernels.attention_fp8: cuDNN's fp8 attention (per-tensor e4m3 Q, K, V, P and O), against exact attention.

- CPU: the quantization and `reference_sdpa_fp8` (cuDNN's arithmetic in float32 torch; the op's CPU
  implementation) against `math_attention`; the custom op under torch.compile(fullgraph=True); the backend
  refused off CUDA / without the frontend, with one sentence saying what is missing.
- CUDA, Hopper or newer, with nvidia-cudnn-frontend (`gpu` marker): cuDNN's kernel at the DiT's shape
  against the reference and exact attention, eager and compiled, and inside the DiT.

Thresholds, measured with std-1 inputs (a property of the scheme, not of the seed): reference vs exact 0.055-0.06
relative L2 at D = 128, almost all of it from Q and K in e4m3 (3 mantissa bits; alone 0.05), then V and O
(0.026 each) and P (0.015). Bound 0.09. With V's rows shuffled (a wrong key <-> value pairing) it is > 1.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastdit.kernels.attention_fp8 as afp8
from fastdit.errors import FastditError
from fastdit.kernels.attention import attention, available_backends, math_attention, resolve_backend
from fastdit.kernels.attention_fp8 import (
    FP8,
    attention_fp8,
    check_fp8_attention_device,
    missing_fp8_attention,
    quantize_qkv,
    quantize_tensor,
    reference_sdpa_fp8,
    rms_norm_bound,
    sdpa_fp8,
)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def qkv(b, s, h, d, seed, dtype=torch.float32, device="cpu", s_kv=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, h, d, generator=g)
    k, v = (torch.randn(b, s_kv or s, h, d, generator=g) for _ in range(2))
    return tuple(x.to(device, dtype) for x in (q, k, v))


# ---- CPU ------------------------------------------------------------------------------------------------


def test_quantize_tensor_maps_the_largest_value_to_448():
    x = torch.randn(3, 50, 2, 16) * 7.0
    x8, scale = quantize_tensor(x)
    assert x8.dtype == FP8 and scale.shape == (1,) and scale.dtype == torch.float32
    assert x8.float().abs().max().item() == 448.0
    assert rel(x8.float() * scale, x) < 0.04  # e4m3: 3 mantissa bits
    z8, zs = quantize_tensor(torch.zeros(4, 8))
    assert (z8.float() == 0).all() and zs.item() > 0 and torch.isfinite(zs).all()


@pytest.mark.parametrize("shape", [(2, 200, 3, 64, 200), (1, 333, 2, 128, 333), (2, 160, 2, 32, 97)])
def test_reference_scheme_is_close_to_exact(shape):
    """attention_fp8 on CPU (quantization + reference op) vs float32 attention; k/v may be shorter than q (the
    per-sample calls that drop padded text keys)."""
    b, s, h, d, s_kv = shape
    q, k, v = qkv(b, s, h, d, seed=s, s_kv=s_kv)
    exact = math_attention(q, k, v, None)
    out = attention_fp8(q, k, v)
    assert out.shape == q.shape and out.dtype == q.dtype
    err = rel(out, exact)
    assert err < 0.09, err
    assert F.cosine_similarity(out.flatten(), exact.flatten(), dim=0) > 0.995
    wrong = attention_fp8(q, k, v[:, torch.randperm(s_kv)])  # values paired with the wrong keys
    assert rel(wrong, exact) > 10 * err


def test_output_cannot_overflow():
    """O is written in V's units: a query that puts all its weight on the largest value gives exactly 448, not
    NaN (e4m3fn has no inf), however large V is."""
    q, k, v = qkv(1, 64, 1, 32, seed=3)
    k[0, 7] = q[0, 0] * 40.0  # query 0 attends (almost) only to key 7
    v = v * 1e4
    v[0, 7] = 5e5  # the largest value of V, in every channel
    q8, qs = quantize_tensor(q)
    k8, ks = quantize_tensor(k)
    v8, vs = quantize_tensor(v)
    o8 = reference_sdpa_fp8(q8, k8, v8, qs, ks, vs, vs)
    assert o8.dtype == FP8 and torch.isfinite(o8.float()).all()
    assert o8[0, 0].float().abs().max().item() == 448.0
    assert rel(o8[0, 0].float() * vs, v[0, 7]) < 0.01


def test_rms_norm_bound_holds_and_is_tight():
    """RoPE(RMSNorm(h) * w) never exceeds `rms_norm_bound(w)`; a head with all its energy in one pair of
    channels (the worst case) comes within 2 % of it."""
    from fastdit.kernels.qk_norm_rope import apply_rope
    from fastdit.models.layers import RMSNorm
    from fastdit.models.qwenimage import rope_tables

    d = 32
    norm = RMSNorm(d, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(d) * 3 - 1.5)
    j = int(norm.weight.abs().argmax())
    cos, sin = rope_tables((1, 4, 4), 8, (8, 12, 12))
    h = torch.randn(1, 24, 2, d) * 5
    h[0, :, 0] = 0.0
    h[0, :, 0, j] = 3.0  # one-hot heads: |RMSNorm(h)_j| = sqrt(d)
    for dtype in (torch.float32, torch.bfloat16):
        x = apply_rope(norm.to(dtype)(h.to(dtype)), cos, sin).float()
        bound = rms_norm_bound(norm.weight).item()
        assert x.abs().max().item() <= bound
        assert x[0, :, 0].abs().max().item() >= bound / 1.02


def _tiny_dit(fp8_linears: bool = False):
    """The tiny DiT (float32, CPU; block linears fp8-emulated if asked) and a CFG-like batch of 2 inputs."""
    from fastdit.bench.weights import dit_inputs, random_dit
    from fastdit.models.qwenimage import PRESETS
    from fastdit.quant.fp8 import quantize_model

    cfg = PRESETS["tiny"]
    model = random_dit(cfg, torch.float32, torch.device("cpu"))
    if fp8_linears:
        quantize_model(model, emulate=True)
    return model, dit_inputs(cfg, 2, 64, 64, 16, torch.float32, torch.device("cpu"))


def _use_fp8_attention(model) -> None:
    """Every attention core on fp8, set directly (resolve_backend refuses fp8 off CUDA): on CPU the op's
    reference implementation stands in for cuDNN."""
    from fastdit.models.layers import Attention

    for m in model.modules():
        if isinstance(m, Attention):
            m.backend = "fp8"


def test_dit_quantizes_with_the_norm_bound_and_stays_close(monkeypatch):
    """The tiny DiT with fp8 attention: each block quantizes q and k (both streams) with the RMSNorm bound
    (>= their absmax, so nothing saturates), and the velocity stays within cosine 0.999 of exact attention."""
    import fastdit.models.qwenimage

    model, (x, enc, t, shapes) = _tiny_dit()
    seen = []
    real = fastdit.models.qwenimage.qk_norm_rope

    def spy(*args):
        *float_args, scales = args
        q, k = real(*float_args, None)  # the same q and k before quantization
        seen.append((scales, q.abs().max(), k.abs().max()))
        return real(*args)

    with torch.no_grad():
        exact = model(x, enc, None, t, img_shapes=shapes)
        _use_fp8_attention(model)
        monkeypatch.setattr(fastdit.models.qwenimage, "qk_norm_rope", spy)
        out = model(x, enc, None, t, img_shapes=shapes)
    assert len(seen) == len(model.blocks)
    for (q_scale, k_scale), q_max, k_max in seen:
        assert q_max <= q_scale * 448 and k_max <= k_scale * 448
        assert q_max > q_scale * 448 / 4 and k_max > k_scale * 448 / 4  # and the bound is not loose
    cos = F.cosine_similarity(out.flatten().double(), exact.flatten().double(), dim=0).item()
    assert 0.999 < cos < 1.0, cos


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_fp8_out_projections_take_the_e4m3_output(monkeypatch, padded):
    """With fp8 (emulated) out-projections, the attention output goes into their GEMMs as e4m3 with V's scale
    (`forward_e4m3`, no requantization) as one contiguous block of rows per stream (O is sequence-major, so no
    copy; also when a padded CFG batch runs attention per sample): same velocity as dequantizing it first,
    within fp8 rounding."""
    from fastdit.quant.fp8 import Fp8Linear

    model, (x, enc, t, shapes) = _tiny_dit(fp8_linears=True)
    mask, lens = None, None
    if padded:  # the second sample's text is 9 of 16 tokens
        lens = (16, 9)
        mask = torch.arange(16)[None, :] < torch.tensor(lens)[:, None]
    calls = []
    real_gemm = Fp8Linear.forward_e4m3

    def spy(self, x8, scale):
        calls.append((x8.dtype, x8.is_contiguous()))
        return real_gemm(self, x8, scale)

    with torch.no_grad():
        exact = model(x, enc, mask, t, img_shapes=shapes)
        _use_fp8_attention(model)
        with monkeypatch.context() as m:
            m.setattr(Fp8Linear, "forward_e4m3", spy)
            direct = model(x, enc, mask, t, img_shapes=shapes, txt_lens=lens)
        # Out-projections that do not take e4m3: the attention dequantizes O, and they quantize it per row.
        monkeypatch.setattr(Fp8Linear, "takes_e4m3", False)
        requantized = model(x, enc, mask, t, img_shapes=shapes, txt_lens=lens)
    assert calls == [(FP8, True)] * (2 * len(model.blocks))
    assert rel(direct, requantized) < 0.02
    assert F.cosine_similarity(direct.flatten().double(), exact.flatten().double(), dim=0) > 0.999


def test_forward_e4m3_is_the_linear_of_the_dequantized_input():
    from fastdit.quant.fp8 import Fp8Linear

    layer = Fp8Linear(64, 48, emulate=True, dtype=torch.float32)
    layer.load_float(torch.randn(48, 64) / 8, torch.randn(48))
    x8, scale = quantize_tensor(torch.randn(3, 5, 64))
    w = layer.weight.float() * layer.weight_scale[:, None]
    expected = (x8.float() * scale) @ w.t() + layer.bias
    got = layer.forward_e4m3(x8, scale)
    assert got.shape == (3, 5, 48) and got.dtype == torch.float32
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_padded_cfg_batch_runs_per_sample_on_e4m3():
    """A CFG batch whose texts differ in length: with the valid lengths (the pipeline's way) each sample runs
    unmasked on its slice of the e4m3 operands, close to exact masked attention; with only a mask the fp8
    backend falls back to exact attention (bit-identical)."""
    model, (x, enc, t, shapes) = _tiny_dit()
    mask = torch.arange(16)[None, :] < torch.tensor([16, 9])[:, None]
    with torch.no_grad():
        exact = model(x, enc, mask, t, img_shapes=shapes)
        _use_fp8_attention(model)
        lengths = model(x, enc, mask, t, img_shapes=shapes, txt_lens=(16, 9))
        masked = model(x, enc, mask, t, img_shapes=shapes)
    assert F.cosine_similarity(lengths.flatten(), exact.flatten(), dim=0) > 0.999
    assert 0 < rel(lengths, exact) < 0.05
    assert torch.equal(masked, exact)


def test_quantize_qkv_gives_each_its_absmax_scale():
    q, k, v = qkv(2, 9, 2, 16, seed=3)
    q8, k8, v8, scales = quantize_qkv(q, k * 4, v)
    for x, x8, scale in ((q, q8, scales.q), (k * 4, k8, scales.k), (v, v8, scales.v)):
        ref, ref_scale = quantize_tensor(x)
        assert torch.equal(scale, ref_scale) and torch.equal(x8.view(torch.uint8), ref.view(torch.uint8))
    assert scales.out_dtype == torch.float32


def test_op_compiles_fullgraph_and_matches_eager():
    """The custom op (CPU implementation here) inside torch.compile(fullgraph=True): no graph break, the
    quantization traced around it, the same result as eager."""
    torch._dynamo.reset()
    q, k, v = qkv(2, 96, 2, 32, seed=5)
    compiled = torch.compile(attention_fp8, fullgraph=True)
    assert torch.equal(compiled(q, k, v), attention_fp8(q, k, v))


def test_op_schema_and_fake():
    q8, k8, v8 = (quantize_tensor(x)[0] for x in qkv(2, 40, 2, 16, seed=6, s_kv=24))
    one = torch.ones(1)
    out = sdpa_fp8(q8, k8, v8, one, one, one)
    assert out.shape == q8.transpose(0, 1).shape and out.is_contiguous() and out.dtype == FP8
    torch.library.opcheck(sdpa_fp8, (q8, k8, v8, one, one, one), test_utils=("test_faketensor",))
    torch.library.opcheck(sdpa_fp8, (q8, k8, v8, one, one, one, [24, 17]), test_utils=("test_faketensor",))


def test_key_counts_per_sample_equal_separate_calls():
    """`kv_lens`: each sample attends to a prefix of the keys, written into its column of one sequence-major
    output: bit for bit the per-sample calls on the sliced keys, and different from attending to all keys."""
    q, k, v = qkv(2, 50, 2, 16, seed=9)
    q8, k8, v8, sc = quantize_qkv(q, k, v)
    out = sdpa_fp8(q8, k8, v8, sc.q, sc.k, sc.v, [50, 31])
    assert out.shape == (50, 2, 2, 16) and out.is_contiguous()
    for b, n in enumerate((50, 31)):
        one = sdpa_fp8(q8[b : b + 1], k8[b : b + 1, :n], v8[b : b + 1, :n], sc.q, sc.k, sc.v)
        assert torch.equal(out[:, b].view(torch.uint8), one[:, 0].view(torch.uint8))
    full = sdpa_fp8(q8, k8, v8, sc.q, sc.k, sc.v)
    assert torch.equal(out[:, 0].view(torch.uint8), full[:, 0].view(torch.uint8))
    assert not torch.equal(out[:, 1].view(torch.uint8), full[:, 1].view(torch.uint8))


def test_bad_shapes_are_refused():
    q, k, v = qkv(1, 16, 2, 24, seed=7)
    with pytest.raises(FastditError, match="multiple of 16"):
        attention_fp8(q, k, v)
    q, k, v = qkv(1, 16, 2, 32, seed=7)
    with pytest.raises(FastditError, match="fp8 attention needs"):
        attention_fp8(q, k[:, :, :1], v[:, :, :1])


def test_backend_refused_off_cuda():
    assert "fp8" not in available_backends("cpu")
    assert "CUDA" in missing_fp8_attention("cpu")
    with pytest.raises(FastditError, match="fp8 attention runs on CUDA GPUs through cuDNN, not on cpu"):
        resolve_backend("fp8", "cpu")
    assert resolve_backend("auto", "cpu") == "sdpa"


def test_missing_frontend_or_old_gpu_says_what_to_do(monkeypatch):
    """On a CUDA machine: a pre-Hopper GPU, or no cuDNN frontend installed, is one sentence naming the fix."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    assert "Hopper" in missing_fp8_attention("cuda") and "8.9" in missing_fp8_attention("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))

    def no_frontend():
        raise ImportError("No module named 'cudnn'")

    monkeypatch.setattr(afp8, "_frontend", no_frontend)
    why = missing_fp8_attention("cuda")
    assert "nvidia-cudnn-frontend" in why and "pip install" in why
    with pytest.raises(FastditError, match="pip install"):
        check_fp8_attention_device("cuda")


def test_masked_call_falls_back_to_exact_attention():
    """fp8 takes no key mask (like the cudnn and flash backends): a masked call runs SDPA, exactly."""
    q, k, v = qkv(2, 30, 2, 16, seed=8)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 3:9] = False
    assert torch.allclose(attention(q, k, v, mask, "fp8"), math_attention(q, k, v, mask), atol=1e-5)


# ---- CUDA (Hopper or newer, cuDNN frontend installed) ------------------------------------------------------


def _require_fp8_gpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    why = missing_fp8_attention("cuda")
    if why is not None:
        pytest.skip(why)


@pytest.mark.gpu
@pytest.mark.parametrize("s_kv", [4224, 4144], ids=["joint", "shorter-keys"])
def test_gpu_cudnn_matches_reference_and_exact(s_kv):
    """B = 2, S = 4224 (4096 image + 128 text tokens), 24 heads of 128: cuDNN vs its float32 reference (same
    quantized operands) < 0.05 (0.038 measured on an H100: cuDNN rounds P against the running row maximum),
    vs exact attention < 0.09."""
    _require_fp8_gpu()
    q, k, v = qkv(2, 4224, 24, 128, seed=0, dtype=torch.bfloat16, device="cuda", s_kv=s_kv)
    out = attention(q, k, v, None, "fp8")
    assert out.shape == q.shape and out.dtype == torch.bfloat16 and out.isfinite().all()
    for b in range(2):  # one sample at a time: float32 scores of both would need ~7 GB each
        qs, ks, vs = (x[b : b + 1] for x in (q, k, v))
        (q8, sq), (k8, sk), (v8, sv) = (quantize_tensor(x) for x in (q, k, v))
        ref = reference_sdpa_fp8(q8[b : b + 1], k8[b : b + 1], v8[b : b + 1], sq, sk, sv, sv).float() * sv
        exact = math_attention(qs.float(), ks.float(), vs.float(), None)
        assert rel(out[b : b + 1], ref) < 0.05, rel(out[b : b + 1], ref)
        assert rel(out[b : b + 1], exact) < 0.09, rel(out[b : b + 1], exact)


@pytest.mark.gpu
def test_gpu_key_counts_per_sample_equal_separate_calls():
    """A padded CFG batch at the DiT's shape (the second sample's text 9 of 128 tokens) through one op call with
    `kv_lens`: each sample's output, written in place, is bit for bit its own unmasked cuDNN call's."""
    _require_fp8_gpu()
    q, k, v = qkv(2, 4224, 24, 128, seed=3, dtype=torch.bfloat16, device="cuda")
    q8, k8, v8, sc = quantize_qkv(q, k, v)
    lens = [4224, 4096 + 9]
    out = sdpa_fp8(q8, k8, v8, sc.q, sc.k, sc.v, lens)
    for b, n in enumerate(lens):
        one = sdpa_fp8(q8[b : b + 1], k8[b : b + 1, :n], v8[b : b + 1, :n], sc.q, sc.k, sc.v)
        assert torch.equal(out[:, b].view(torch.uint8), one[:, 0].view(torch.uint8)), b


@pytest.mark.gpu
def test_gpu_compiled_equals_eager_and_graph_capture():
    """torch.compile(fullgraph=True) around the cuDNN op equals eager within 1e-2; a CUDA graph replays it."""
    _require_fp8_gpu()
    torch._dynamo.reset()
    q, k, v = qkv(2, 4224, 24, 128, seed=1, dtype=torch.bfloat16, device="cuda")
    compiled = torch.compile(attention_fp8, fullgraph=True)
    eager, out = attention_fp8(q, k, v), compiled(q, k, v)
    assert rel(out, eager) < 1e-2, rel(out, eager)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        compiled(q, k, v)
        with torch.cuda.graph(graph, stream=stream):
            static = compiled(q, k, v)
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize()
    assert rel(static, eager) < 1e-2
