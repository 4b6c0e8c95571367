"""`fastdit bench --stage pipeline` (whole images) and `--stage vae` (fastdit's decode against diffusers') run end to
end on the CPU with the tiny preset; the GPU numbers come from the same code at full size."""

from __future__ import annotations

import json

import pytest

from fastdit.bench.config import BenchConfig
from fastdit.bench.pipeline import PipelineBench
from fastdit.cli.main import main
from fastdit.errors import FastditError

TINY = ["--preset", "tiny", "--device", "cpu", "--dtype", "fp32", "--warmup", "0"]


def test_bench_pipeline_lightning(tmp_path, capsys):
    """Eight Lightning steps without CFG at 64x48: seconds per image, the stage split, and the VAE decode alone
    (fastdit's and diffusers', equal pixels in float32)."""
    out = tmp_path / "p.json"
    argv = ["bench", "--stage", "pipeline", *TINY, "--height", "48", "--width", "64", "--text-len", "12"]
    assert main([*argv, "--iters", "2", "--scheduler", "lightning", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["sampling"] == {"steps": 8, "scheduler": "lightning", "cfg": False}
    split = res["split_median"]
    assert split["denoise_s_per_step"] == pytest.approx(split["denoise_s"] / 8)  # two calls: medians are means
    assert res["per_image"]["median_s"] > 0 and res["per_image"]["n"] == 2
    for stage in ("text_encode_s", "denoise_s", "vae_decode_s"):
        assert split[stage] > 0
    decode = res["vae_decode"]
    assert decode["fastdit"]["median_s"] > 0 and decode["diffusers"]["median_s"] > 0
    assert decode["max_abs_diff"] < 1e-5
    table = capsys.readouterr().out
    assert "seconds per image" in table and "VAE decode alone: fastdit" in table


def test_bench_pipeline_options():
    """The flags become explicit options: steps default to the scheduler's, CFG runs with the default schedule
    only; flags of the DiT-step bench are refused."""
    import torch

    lightning = PipelineBench.from_config(BenchConfig(stage="pipeline", scheduler="lightning"), torch.bfloat16)
    assert (lightning.steps, lightning.cfg) == (8, False)
    default = PipelineBench.from_config(BenchConfig(stage="pipeline", steps=4), torch.bfloat16)
    assert (default.steps, default.cfg, default.scheduler) == (4, True, "checkpoint")
    assert not PipelineBench.from_config(BenchConfig(stage="pipeline", no_cfg=True), torch.bfloat16).cfg
    with pytest.raises(FastditError, match="--compile full"):
        PipelineBench.from_config(BenchConfig(stage="pipeline", compile="full"), torch.bfloat16)


def test_bench_vae_fast_decode_against_diffusers(tmp_path, capsys):
    """--stage vae times diffusers' decode and fastdit's (NCHW, channels-last) in one run, with the ratio and the
    largest pixel difference."""
    out = tmp_path / "v.json"
    argv = ["bench", "--stage", "vae", *TINY, "--height", "32", "--width", "48", "--iters", "1"]
    assert main([*argv, "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["runs"]) == {"diffusers decode", "fastdit decode (NCHW)", "fastdit decode (channels-last)"}
    for name, run in res["runs"].items():
        assert run["median_s"] > 0
        if name != "diffusers decode":
            assert run["max_abs_diff_vs_diffusers"] < 1e-5
    table = capsys.readouterr().out
    assert "vs base = diffusers decode median" in table and "largest |fastdit - diffusers|" in table
