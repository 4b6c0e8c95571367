"""`fastdit bench` runs end to end on the CPU with the tiny preset (the GPU numbers come from the same code)."""

import json

import pytest
import torch

from fastdit.bench.timing import dit_flops
from fastdit.cli.main import main
from fastdit.models.qwenimage import PRESETS


def test_flop_count_matches_the_known_qwen_image_step():
    # 1024x1024 (4096 image tokens), 128 text tokens, CFG batch of 2: about 141 TFLOP.
    assert dit_flops(PRESETS["qwen-image"], 2, 4096, 128) == pytest.approx(141e12, rel=0.01)


def test_bench_dit_compiled_and_diffusers(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--preset", "tiny", "--device", "cpu", "--dtype", "fp32", "--height", "64", "--width", "96"]
    argv += ["--text-len", "7", "--warmup", "1", "--iters", "2", "--compile", "--compare", "diffusers-eager"]
    assert main([*argv, "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["runs"]) == {"fastdit eager", "fastdit compiled (regional)", "diffusers eager"}
    for r in res["runs"].values():
        assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"] and r["n"] == 2
    assert res["shapes"]["batch"] == 2 and res["shapes"]["image_tokens"] == 24
    assert res["rel_l2_vs_diffusers"] < 1e-5  # same weights, fp32
    assert res["matmul_tflops"] > 0 and res["environment"]["torch"] and res["dtype"] == "fp32"
    table = capsys.readouterr().out
    assert "fastdit compiled (regional)" in table and "vs base" in table
    assert "fp32 matmul ceiling this run" in table  # the ceiling of the run's own dtype


@pytest.mark.parametrize("stage", ["vae", "text-encoder"])
def test_bench_other_stages(tmp_path, stage):
    out = tmp_path / "s.json"
    argv = ["bench", "--stage", stage, "--preset", "tiny", "--device", "cpu", "--dtype", "fp32"]
    argv += ["--height", "32", "--width", "32", "--text-len", "4", "--warmup", "0", "--iters", "1"]
    assert main([*argv, "--json", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"].values()
    assert runs and all(run["median_s"] > 0 for run in runs)


def test_bench_bad_size_is_a_clean_error(capsys):
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--height", "100"]) == 2
    err = capsys.readouterr().err
    assert "multiples of 16" in err and "Traceback" not in err


def test_bench_cuda_graph_and_int8_attention_need_a_gpu(capsys):
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--cuda-graph"]) == 2
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--attention", "int8"]) == 2
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--attention", "fp8"]) == 2
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--profile"]) == 2
    err = capsys.readouterr().err
    assert "--cuda-graph times the DiT step on a CUDA GPU" in err and "8-bit attention runs on CUDA" in err
    assert "--profile reads the GPU's kernel times" in err
    assert "fp8 attention runs on CUDA GPUs through cuDNN, not on cpu" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("padding", ["lengths", "mask"])
def test_bench_padded_uncond_text(tmp_path, padding):
    """A shorter negative prompt (padded uncond text): both attention strategies give diffusers' output."""
    out = tmp_path / "p.json"
    argv = ["bench", "--preset", "tiny", "--device", "cpu", "--dtype", "fp32", "--height", "32", "--width", "32"]
    argv += ["--text-len", "9", "--uncond-text-len", "3", "--padding", padding, "--warmup", "0", "--iters", "1"]
    assert main([*argv, "--compare", "diffusers-eager", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["shapes"]["uncond_text_tokens"] == 3 and res["shapes"]["padding"] == padding
    assert res["rel_l2_vs_diffusers"] < 1e-5


def test_bench_on_two_ranks(tmp_path, capsys):
    """--tp 2 (two gloo ranks on the CPU): the DiT step timed on tensor-parallel ranks, reported by rank 0; in
    bf16, so the parallel layers (created after the model) must be cast too."""
    out = tmp_path / "tp.json"
    argv = ["bench", "--preset", "tiny", "--device", "cpu", "--dtype", "bf16", "--height", "64", "--width", "64"]
    argv += ["--text-len", "8", "--warmup", "1", "--iters", "2", "--tp", "2", "--json", str(out)]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    assert res["ranks"] == {"tp": 2, "sp": 1, "cfg": 1}
    (run,) = res["runs"].values()
    assert 0 < run["min_s"] <= run["median_s"] and run["n"] == 2
    assert "ranks: tp=2 sp=1 cfg=1" in capsys.readouterr().out


def test_bench_on_ranks_refuses_what_it_does_not_time(capsys):
    base = ["bench", "--preset", "tiny", "--device", "cpu", "--cfg-parallel"]
    for extra in (["--compare", "diffusers"], ["--stage", "vae"], ["--compile", "full"]):
        assert main([*base, *extra]) == 2
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--tp", "4"]) == 2  # the tiny DiT has 2 heads
    err = capsys.readouterr().err
    assert err.count("cannot be combined with --tp / --sp / --cfg-parallel") == 3
    assert "not divisible by tp x sp" in err and "Traceback" not in err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bench_profile_on_gpu(tmp_path, capsys):
    """--profile adds each run's GPU kernel time per step and its NCCL share (none on one GPU)."""
    out = tmp_path / "p.json"
    args = ["bench", "--preset", "tiny", "--iters", "2", "--warmup", "1", "--profile", "--json", str(out)]
    assert main(args) == 0
    runs = json.loads(out.read_text())["runs"]
    assert runs and all(r["gpu_kernel_s"] > 0 and r["nccl_share"] == 0 for r in runs.values())
    assert "% in NCCL" in capsys.readouterr().out
